//! A box as an outsider builds it: a device certificate from `headend pki issue-device`, the
//! client of [`super::wire`], and a virtual purse card file (`reader_drivers::vcard`, the
//! real card state machine, persisted like `vcard` does) personalised under the issuer keys.
//! It plays the box's side of a purchase (offer → card read → draw request → debit command
//! → DEBIT on the card → debit response → receipt) and of a load, the way the README and
//! `proto::messages` describe them. The honest boxes and the attackers are both built from
//! it; an attacker then deviates.

use std::path::{Path, PathBuf};

use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, commands};
use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::*;
use reader_drivers::vcard::VirtualCard;

use super::deploy::HeadEnd;
use super::wire::{self, Conn, Identity, Outcome};

pub struct BoxClient {
    pub box_id: String,
    pub identity: Identity,
    pub conn: Conn,
    pub card: VirtualCard,
    pub card_path: PathBuf,
    cfg: quinn::ClientConfig,
    addr: std::net::SocketAddr,
}

/// A completed purchase.
#[derive(Debug, Clone)]
pub struct Purchase {
    pub offer: Offer,
    pub receipt: Receipt,
}

/// Today, as the box's clock gives it (UTC).
pub fn today() -> Date {
    headend::payment::today()
}

/// Personalises a card file under the deployment's issuer keys.
pub fn new_card(he: &HeadEnd, name: &str, card_id: u64, balance: u64) -> PathBuf {
    let dir = he.root.join("cards");
    std::fs::create_dir_all(&dir).expect("cards dir");
    let path = dir.join(format!("{name}.plvc"));
    VirtualCard::create(
        &path,
        &CardSpec::demo(card_id, Currency::EUR, balance, 100_000),
        &he.issuer,
    )
    .expect("card file");
    path
}

/// A card file's balance, read from the file.
pub fn card_balance(path: &Path) -> u64 {
    VirtualCard::open(path).expect("card file").state().balance
}

impl BoxClient {
    /// A box `box_id` with a new device certificate and a new card (`card_id`, `balance`).
    pub async fn new(he: &HeadEnd, box_id: &str, card_id: u64, balance: u64) -> BoxClient {
        let identity = he.device(box_id);
        let card_path = new_card(he, box_id, card_id, balance);
        Self::with(he, box_id, identity, card_path).await
    }

    /// A box with a given identity and card file, connected to the gateway.
    pub async fn with(
        he: &HeadEnd,
        box_id: &str,
        identity: Identity,
        card_path: PathBuf,
    ) -> BoxClient {
        let cfg = wire::client_config(wire::roots(&he.ca_pem()), Some(&identity), &[wire::ALPN]);
        let conn = wire::connect(he.addrs.gateway, cfg.clone())
            .await
            .unwrap_or_else(|e| panic!("{} cannot connect: {e:?}", identity.label));
        let card = VirtualCard::open(&card_path).expect("card file");
        BoxClient {
            box_id: box_id.into(),
            identity,
            conn,
            card,
            card_path,
            cfg,
            addr: he.addrs.gateway,
        }
    }

    /// A fresh connection (after the old one was closed or lost).
    pub async fn reconnect(&mut self) {
        self.conn = wire::connect(self.addr, self.cfg.clone())
            .await
            .unwrap_or_else(|e| panic!("{} cannot reconnect: {e:?}", self.box_id));
    }

    /// A fresh connection, or why the handshake failed.
    pub async fn try_reconnect(&mut self) -> Result<(), Outcome> {
        self.conn = wire::connect(self.addr, self.cfg.clone()).await?;
        Ok(())
    }

    pub async fn call(&self, msg: &Message) -> Outcome {
        self.conn.call(msg).await
    }

    pub fn apdu(&mut self, apdu: &[u8]) -> Response {
        Response::parse(&self.card.process_apdu(apdu)).expect("a status word")
    }

    pub fn balance(&self) -> u64 {
        self.card.state().balance
    }

    pub fn purse(&mut self) -> PurseInfo {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::read_purse());
        PurseInfo::decode(&r.data).expect("READ PURSE")
    }

    pub async fn offer(&self, merchant: &str, item: &str) -> Result<Offer, Outcome> {
        match self
            .call(&Message::OfferRequest {
                merchant_id: merchant.into(),
                item_id: item.into(),
            })
            .await
        {
            Outcome::Answer(Message::Offer(o)) => Ok(o),
            other => Err(other),
        }
    }

    /// INITIALIZE FOR PURCHASE on the card.
    pub fn init_purchase(&mut self) -> PurchaseInit {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_purchase(today()));
        assert!(r.sw.is_ok(), "INITIALIZE FOR PURCHASE: {}", r.sw);
        PurchaseInit::decode(&r.data).expect("INITIALIZE FOR PURCHASE answer")
    }

    /// The draw request for `offer` (card read; the body sealed under the TSK when the
    /// offer carries one).
    pub fn draw_request(&mut self, offer: &Offer) -> DrawRequest {
        let init = self.init_purchase();
        let body = DrawBody {
            amount: offer.amount,
            atr: self.card.atr(),
            init,
        };
        DrawRequest {
            transaction_id: offer.transaction_id.clone(),
            merchant_id: offer.merchant_id.clone(),
            etsk: offer.etsk.clone(),
            body: Protected::new(body, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
        }
    }

    /// Opens a debit command and checks its amount against the offer ([0082]).
    pub fn debit_command(offer: &Offer, answer: &Outcome) -> Result<DebitCommand, String> {
        let Outcome::Answer(Message::DebitCommand(dc)) = answer else {
            return Err(format!("expected a debit command, got {answer:?}"));
        };
        let body = dc
            .body
            .open(offer.tsk.as_ref())
            .map_err(|e| e.to_string())?;
        if body.command.amount_money() != offer.amount {
            return Err(format!(
                "debit command for {} but the offer is {}",
                body.command.amount_money(),
                offer.amount
            ));
        }
        Ok(body.command)
    }

    /// DEBIT on the card; the debit response message.
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

    /// A whole purchase, the draw and the debit response on one stream: offer → draw
    /// request → debit command → DEBIT on the card → debit response → receipt.
    pub async fn buy(&mut self, merchant: &str, item: &str) -> Result<Purchase, String> {
        let offer = self
            .offer(merchant, item)
            .await
            .map_err(|o| format!("offer: {o:?}"))?;
        let draw = self.draw_request(&offer);
        let mut txn = self
            .conn
            .txn()
            .await
            .map_err(|o| format!("stream: {o:?}"))?;
        let answer = txn.step(&Message::DrawRequest(draw)).await;
        let cmd = Self::debit_command(&offer, &answer).map_err(|e| format!("draw: {e}"))?;
        let before = self.balance();
        let resp = self.debit(&offer, &cmd)?;
        assert_eq!(
            self.balance(),
            before - offer.amount.minor,
            "the card debited the offer's amount"
        );
        match txn.last(&Message::DebitResponse(resp)).await {
            Outcome::Answer(Message::Receipt(r)) if r.released => {
                Ok(Purchase { offer, receipt: r })
            }
            other => Err(format!("debit response: {other:?}")),
        }
    }

    /// Like [`Self::buy`], retrying a refusal that says "retry" (`Busy`, `RateLimited`) for
    /// up to `patience`; the number of tries it took.
    pub async fn buy_patiently(
        &mut self,
        merchant: &str,
        item: &str,
        patience: std::time::Duration,
    ) -> Result<(Purchase, u32), String> {
        let until = std::time::Instant::now() + patience;
        let mut tries = 0;
        loop {
            tries += 1;
            match self.buy(merchant, item).await {
                Ok(p) => return Ok((p, tries)),
                Err(e) if std::time::Instant::now() < until => {
                    eprintln!("{}: purchase try {tries} failed: {e}", self.box_id);
                    if self.conn.conn.close_reason().is_some() {
                        self.reconnect().await;
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A load offer for `source`.
    pub async fn load_offer(&mut self, source: LoadSource) -> Outcome {
        let card = self.purse();
        self.call(&Message::LoadOfferRequest(LoadOfferRequest {
            source,
            card,
        }))
        .await
    }

    /// INITIALIZE FOR LOAD for `amount` under the offer's time stamp and date (S1).
    pub fn init_load(&mut self, offer: &LoadOffer, amount: u64) -> LoadInit {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_load(&LoadInitRequest {
            amount,
            currency: offer.max_amount.currency,
            timestamp: offer.timestamp,
            date: offer.date,
        }));
        assert!(r.sw.is_ok(), "INITIALIZE FOR LOAD: {}", r.sw);
        LoadInit::decode(&r.data).expect("INITIALIZE FOR LOAD answer")
    }

    /// The load request for `offer` and `amount`, the PIN sealed under `pin` (key, digits).
    pub fn load_request(
        &mut self,
        offer: &LoadOffer,
        amount: u64,
        pin: Option<(&DesKey, &str)>,
    ) -> LoadRequest {
        let init = self.init_load(offer, amount);
        let sealed_pin = pin.map(|(key, digits)| seal_pin(key, &offer.transaction_id, digits));
        LoadRequest {
            transaction_id: offer.transaction_id.clone(),
            source: offer.source.clone(),
            amount: Money::new(amount, init.currency),
            init,
            sealed_pin,
            // As a box does: a bank load carries the card's passbook (seed 004).
            passbook: if matches!(offer.source, LoadSource::Bank { .. }) {
                self.card.state().passbook()
            } else {
                Vec::new()
            },
        }
    }

    /// LOAD on the card with `cmd`; the load response message.
    pub fn apply_load(&mut self, txid: &str, cmd: &LoadCommand) -> LoadResponseMsg {
        let r = self.apdu(&commands::load(cmd));
        assert!(r.sw.is_ok(), "LOAD: {}", r.sw);
        LoadResponseMsg {
            transaction_id: txid.into(),
            response: Some(LoadResponse::decode(&r.data).expect("LOAD answer")),
            zero_value: None,
        }
    }

    /// A whole load: offer → amount (and PIN) → INITIALIZE FOR LOAD → load request → load
    /// command → LOAD → load response → confirmation.
    pub async fn load(
        &mut self,
        source: LoadSource,
        amount: u64,
        pin: Option<(&DesKey, &str)>,
    ) -> Result<LoadConfirmation, String> {
        let offer = match self.load_offer(source).await {
            Outcome::Answer(Message::LoadOffer(o)) => o,
            other => return Err(format!("load offer: {other:?}")),
        };
        let req = self.load_request(&offer, amount, pin);
        let cmd = match self.call(&Message::LoadRequest(req)).await {
            Outcome::Answer(Message::LoadCommand(c)) => c.command,
            other => return Err(format!("load request: {other:?}")),
        };
        let resp = self.apply_load(&offer.transaction_id, &cmd);
        match self.call(&Message::LoadResponse(resp)).await {
            Outcome::Answer(Message::LoadConfirmation(c)) if c.loaded => Ok(c),
            other => Err(format!("load response: {other:?}")),
        }
    }
}

/// The PIN block sealed for the bank under the box's PIN key, bound to the transaction.
pub fn seal_pin(key: &DesKey, txid: &str, pin: &str) -> Vec<u8> {
    let block = PinBlock {
        transaction_id: txid.into(),
        pin: proto::secret::Secret::new(pin.to_string()),
    };
    let clear = postcard::to_allocvec(&block).expect("PIN block");
    proto::crypto::seal(key, &clear, &mut rand::rngs::OsRng)
}

/// A key file's key (32 hex digits).
pub fn key_file(path: &Path) -> DesKey {
    let text = std::fs::read_to_string(path).expect("key file");
    DesKey::from_slice(&hex::decode(text.trim()).expect("hex")).expect("a 16-byte key")
}
