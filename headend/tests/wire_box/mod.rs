//! A scripted box for the head end's own tests: a device certificate, a QUIC connection to
//! the gateway and an in-process purse card (the real `proto` card), with each step of the
//! box's side of a purchase (001 [0075]–[0083]) as its own call, so a test can stop after
//! any step, repeat one, tamper with one or kill a role between two. It is a test kit that
//! speaks the wire protocol, not a box: the box is `stbd`, and the simulators in `sim` drive
//! the box core (`stb-flow`) the way `stbd` does.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::Path;

use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::messages::*;
use proto::money::Currency;
use proto::purse::*;

use headend::pki::OperatorCa;
use headend::quic::{BoxId, ClientTls, QuicClient, TransportSettings, load_certs};
use headend::role::to_payload;

pub struct WireBox {
    pub id: String,
    pub client: QuicClient,
    pub card: PurseCard,
}

/// A card personalised under `issuer` with `balance` EUR cents.
pub fn new_card(issuer: &IssuerKeys, card_id: u64, balance: u64, max_balance: u64) -> PurseCard {
    let spec = CardSpec::demo(card_id, Currency::EUR, balance, max_balance);
    PurseCard::new(CardState::personalise(&spec, issuer), card_id)
}

/// Connects as box `box_id` with a device certificate freshly issued by the CA in `ca_dir`.
pub async fn connect(ca_dir: &Path, box_id: &str, addr: SocketAddr) -> Result<QuicClient, String> {
    let ca = OperatorCa::load(ca_dir).map_err(|e| e.to_string())?;
    let issued = ca
        .issue_device(&BoxId::new(box_id).map_err(|e| e.to_string())?)
        .map_err(|e| e.to_string())?;
    let tls = ClientTls::new(
        load_certs(&ca_dir.join("ca.crt.pem")).map_err(|e| e.to_string())?,
        issued.tls_identity(),
        "gateway",
    );
    QuicClient::connect(&tls, &TransportSettings::default(), addr, "localhost")
        .await
        .map_err(|e| e.to_string())
}

fn decode(bytes: Result<Vec<u8>, headend::quic::QuicError>) -> Result<Message, String> {
    Message::from_payload(&bytes.map_err(|e| e.to_string())?).map_err(|e| e.to_string())
}

/// Today's date, as the box's clock gives it.
pub fn today() -> Date {
    headend::payment::today()
}

impl WireBox {
    pub async fn call(&self, msg: &Message) -> Result<Message, String> {
        decode(self.client.call(&to_payload(msg)).await)
    }

    pub fn apdu(&mut self, apdu: &[u8]) -> Response {
        Response::parse(&self.card.process_apdu(apdu))
            .expect("the card always answers a status word")
    }

    pub fn balance(&mut self) -> u64 {
        self.apdu(&commands::select());
        PurseInfo::decode(&self.apdu(&commands::read_purse()).data)
            .map(|i| i.balance)
            .unwrap_or(0)
    }

    pub async fn offer(&self, merchant: &str, item: &str) -> Result<Offer, String> {
        match self
            .call(&Message::OfferRequest {
                merchant_id: merchant.into(),
                item_id: item.into(),
            })
            .await?
        {
            Message::Offer(o) => Ok(o),
            other => Err(format!("expected an offer, got {other:?}")),
        }
    }

    /// Card read for the offer with the checks of [0075], and the draw request of [0077].
    /// A fresh INITIALIZE FOR PURCHASE: the proof a cancel carries that the card did not
    /// run the DEBIT (its counter has not moved).
    pub fn proof(&mut self) -> Result<PurchaseInit, String> {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_purchase(today()));
        if !r.sw.is_ok() {
            return Err(format!("card refused INITIALIZE FOR PURCHASE: {}", r.sw));
        }
        PurchaseInit::decode(&r.data).map_err(|e| e.to_string())
    }

    pub fn draw_request(&mut self, offer: &Offer) -> Result<DrawRequest, String> {
        self.apdu(&commands::select());
        // A price in points redeems from the points purse (002 [0164]).
        let purse = proto::purse::Purse::of(offer.amount.currency);
        let r = self.apdu(&commands::init_purchase_of(purse, today()));
        if !r.sw.is_ok() {
            return Err(format!("card refused INITIALIZE FOR PURCHASE: {}", r.sw));
        }
        let init = PurchaseInit::decode(&r.data).map_err(|e| e.to_string())?;
        // An authentication (002 FIG. 16: zero in its own currency) fits any card.
        if init.currency != offer.amount.currency && !offer.amount.is_authentication() {
            return Err("[0075] the card holds another currency".into());
        }
        if init.balance < offer.amount.minor {
            return Err("[0075] not enough value on the card".into());
        }
        let body = DrawBody {
            amount: offer.amount,
            atr: self.card.atr(),
            init,
        };
        Ok(DrawRequest {
            transaction_id: offer.transaction_id.clone(),
            merchant_id: offer.merchant_id.clone(),
            etsk: offer.etsk.clone(),
            body: Protected::new(body, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
        })
    }

    /// The debit command, opened and checked against the offer's amount ([0082]).
    pub fn open_debit_command(offer: &Offer, msg: &Message) -> Result<DebitCommand, String> {
        let Message::DebitCommand(dc) = msg else {
            return Err(format!("expected a debit command, got {msg:?}"));
        };
        let body = dc
            .body
            .open(offer.tsk.as_ref())
            .map_err(|e| e.to_string())?;
        if body.command.amount_money() != offer.amount {
            return Err(format!(
                "[0082] debit command for {} but the offer is {}",
                body.command.amount_money(),
                offer.amount
            ));
        }
        Ok(body.command)
    }

    /// DEBIT on the card; the debit response message for the gateway.
    pub fn debit(&mut self, offer: &Offer, cmd: &DebitCommand) -> Result<DebitResponseMsg, String> {
        let r = self.apdu(&commands::debit(cmd));
        if !r.sw.is_ok() {
            return Err(format!("card refused DEBIT: {}", r.sw));
        }
        let resp = DebitResponse::decode(&r.data).map_err(|e| e.to_string())?;
        Ok(DebitResponseMsg {
            transaction_id: offer.transaction_id.clone(),
            body: Protected::new(resp, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
        })
    }

    /// The card's id (SELECT, READ PURSE).
    pub fn card_id(&mut self) -> u64 {
        self.apdu(&commands::select());
        PurseInfo::decode(&self.apdu(&commands::read_purse()).data)
            .map(|i| i.card_id)
            .unwrap_or(0)
    }

    /// The refunds due to this box's card (issue 17).
    pub async fn refunds_due(&mut self) -> Result<Vec<RefundDue>, String> {
        let card_id = self.card_id();
        match self.call(&Message::RefundsDueRequest { card_id }).await? {
            Message::RefundsDue(list) => Ok(list),
            other => Err(format!("expected refunds due, got {other:?}")),
        }
    }

    /// SELECT, INITIALIZE FOR CREDIT: the refund request for sale `txid`.
    pub fn refund_request(&mut self, txid: &str) -> Result<RefundRequest, String> {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_credit(today()));
        if !r.sw.is_ok() {
            return Err(format!("card refused INITIALIZE FOR CREDIT: {}", r.sw));
        }
        Ok(RefundRequest {
            transaction_id: txid.into(),
            atr: self.card.atr(),
            init: PurchaseInit::decode(&r.data).map_err(|e| e.to_string())?,
        })
    }

    /// CREDIT on the card; the credit response message for the gateway.
    pub fn credit(&mut self, msg: &Message) -> Result<RefundResponseMsg, String> {
        let Message::RefundCommand(c) = msg else {
            return Err(format!("expected a credit command, got {msg:?}"));
        };
        let r = self.apdu(&commands::credit(&c.command));
        if !r.sw.is_ok() {
            return Err(format!("card refused CREDIT: {}", r.sw));
        }
        Ok(RefundResponseMsg {
            transaction_id: c.transaction_id.clone(),
            response: CreditResponse::decode(&r.data).map_err(|e| e.to_string())?,
        })
    }

    /// A whole refund of sale `txid`: request, CREDIT, response; the final answer.
    pub async fn refund(&mut self, txid: &str) -> Result<Message, String> {
        let req = self.refund_request(txid)?;
        let answer = self.call(&Message::RefundRequest(req)).await?;
        let resp = self.credit(&answer)?;
        self.call(&Message::RefundResponse(resp)).await
    }

    /// A whole purchase, its two steps on one stream; the offer and the final answer.
    pub async fn buy(&mut self, merchant: &str, item: &str) -> Result<(Offer, Message), String> {
        let offer = self.offer(merchant, item).await?;
        let draw = self.draw_request(&offer)?;
        let mut txn = self.client.transaction().await.map_err(|e| e.to_string())?;
        let answer = decode(txn.exchange(&to_payload(&Message::DrawRequest(draw))).await)?;
        let cmd = Self::open_debit_command(&offer, &answer)?;
        let resp = self.debit(&offer, &cmd)?;
        let receipt = decode(txn.last(&to_payload(&Message::DebitResponse(resp))).await)?;
        Ok((offer, receipt))
    }
}
