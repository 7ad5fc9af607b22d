//! A test set-top box for the head end's purchase tests: a device certificate, a QUIC
//! connection to the gateway, and an in-process purse card (the real `proto` card state
//! machine). It plays the box's side of 001 [0075]–[0083] exactly, including the amount
//! check of [0082].
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use headend::assembly::{self, DemoOptions, Roles, Running};
use headend::config::HeadendConfig;
use headend::pki::OperatorCa;
use headend::quic::{BoxId, ClientTls, QuicClient, TlsIdentity, TransportSettings, load_certs};
use headend::role::to_payload;
use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::messages::*;
use proto::money::Currency;
use proto::purse::*;

pub struct HeadEnd {
    pub dir: tempfile::TempDir,
    pub cfg: HeadendConfig,
    pub running: Running,
}

pub fn today() -> Date {
    headend::payment::today()
}

pub fn options(embodiment: &str, message_layer: bool) -> DemoOptions {
    DemoOptions {
        gateway_listen: ([127, 0, 0, 1], 0).into(),
        embodiment: embodiment.into(),
        message_layer,
        transaction_timeout_secs: 30,
    }
}

pub async fn start(opts: DemoOptions) -> HeadEnd {
    let dir = tempfile::tempdir().unwrap();
    let files = assembly::init_demo(dir.path(), &opts).unwrap();
    let cfg = HeadendConfig::load(&files.config).unwrap();
    let running = assembly::start(&cfg, Roles::ALL).await.unwrap();
    HeadEnd { dir, cfg, running }
}

pub struct TestBox {
    pub id: String,
    pub client: QuicClient,
    pub card: PurseCard,
}

pub fn issuer(cfg: &HeadendConfig) -> IssuerKeys {
    cfg.issuer_keys().unwrap()
}

pub fn new_card(cfg: &HeadendConfig, card_id: u64, balance: u64) -> PurseCard {
    let spec = CardSpec {
        card_id,
        provider_id: 7,
        currency: Currency::EUR,
        balance,
        max_balance: 100_000,
        expiry: Expiry {
            year: 2099,
            month: 12,
        },
    };
    PurseCard::new(CardState::personalise(&spec, &issuer(cfg)), card_id)
}

pub async fn connect_box(ca_dir: &Path, box_id: &str, addr: std::net::SocketAddr) -> QuicClient {
    let ca = OperatorCa::load(ca_dir).unwrap();
    let issued = ca.issue_device(&BoxId::new(box_id).unwrap()).unwrap();
    let tls = ClientTls::new(
        load_certs(&ca_dir.join("ca.crt.pem")).unwrap(),
        TlsIdentity::from_issued(&issued),
    );
    QuicClient::connect(&tls, &TransportSettings::default(), addr, "localhost")
        .await
        .unwrap()
}

impl TestBox {
    pub async fn new(he: &HeadEnd, box_id: &str, balance: u64) -> Self {
        let client = connect_box(
            &he.dir.path().join("ca"),
            box_id,
            he.running.gateway_addr.unwrap(),
        )
        .await;
        Self {
            id: box_id.into(),
            client,
            card: new_card(&he.cfg, 0xC0DE_0000 + balance, balance),
        }
    }

    pub async fn call(&self, msg: &Message) -> Message {
        let bytes = self.client.call(&to_payload(msg)).await.unwrap();
        Message::from_payload(&bytes).unwrap()
    }

    pub fn apdu(&mut self, apdu: &[u8]) -> Response {
        Response::parse(&self.card.process_apdu(apdu)).unwrap()
    }

    pub fn balance(&mut self) -> u64 {
        self.apdu(&commands::select());
        PurseInfo::decode(&self.apdu(&commands::read_purse()).data)
            .unwrap()
            .balance
    }

    pub async fn offer(&self, merchant: &str, item: &str) -> Offer {
        match self
            .call(&Message::OfferRequest {
                merchant_id: merchant.into(),
                item_id: item.into(),
            })
            .await
        {
            Message::Offer(o) => o,
            other => panic!("expected an offer, got {other:?}"),
        }
    }

    /// Card read for the offer ([0075]) and the draw request ([0077]).
    pub fn draw_request(&mut self, offer: &Offer) -> DrawRequest {
        self.apdu(&commands::select());
        let init =
            PurchaseInit::decode(&self.apdu(&commands::init_purchase(today())).data).unwrap();
        assert_eq!(
            init.currency, offer.amount.currency,
            "[0075] currency check"
        );
        assert!(init.balance >= offer.amount.minor, "[0075] balance check");
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

    /// The debit command, opened and checked against the offer's amount ([0082]).
    pub fn open_debit_command(offer: &Offer, msg: &Message) -> DebitCommand {
        let Message::DebitCommand(dc) = msg else {
            panic!("expected a debit command, got {msg:?}")
        };
        let body = dc.body.open(offer.tsk.as_ref()).unwrap();
        assert_eq!(
            body.command.amount_money(),
            offer.amount,
            "[0082] amount check"
        );
        body.command
    }

    /// DEBIT on the card; the debit response message for the gateway.
    pub fn debit(&mut self, offer: &Offer, cmd: &DebitCommand) -> DebitResponseMsg {
        let r = self.apdu(&commands::debit(cmd));
        assert!(r.sw.is_ok(), "card refused DEBIT: {}", r.sw);
        let resp = DebitResponse::decode(&r.data).unwrap();
        DebitResponseMsg {
            transaction_id: offer.transaction_id.clone(),
            body: Protected::new(resp, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
        }
    }

    /// A whole purchase, its two steps on one stream; returns the offer and the gateway's
    /// final answer.
    pub async fn buy(&mut self, merchant: &str, item: &str) -> (Offer, Message) {
        let offer = self.offer(merchant, item).await;
        let draw = self.draw_request(&offer);
        let mut txn = self.client.transaction().await.unwrap();
        let answer = Message::from_payload(
            &txn.exchange(&to_payload(&Message::DrawRequest(draw)))
                .await
                .unwrap(),
        )
        .unwrap();
        let cmd = Self::open_debit_command(&offer, &answer);
        let resp = self.debit(&offer, &cmd);
        let receipt = Message::from_payload(
            &txn.last(&to_payload(&Message::DebitResponse(resp)))
                .await
                .unwrap(),
        )
        .unwrap();
        (offer, receipt)
    }
}

/// Waits (bounded) until `f` holds; for effects that land asynchronously (FIG. 6/7
/// payment-server notification). Not a timing assertion: it only bounds the wait.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    f()
}
