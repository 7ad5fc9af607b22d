//! A test set-top box for the load tests: a device certificate, a QUIC connection to the
//! gateway, an in-process `proto` purse card, and the box's per-box PIN key. It plays the
//! box's side of 001 [0117]–[0132]: load offer, INITIALIZE FOR LOAD (S1), load request with
//! the sealed PIN, LOAD (S3), and the zero-value INITIALIZE FOR LOAD of the negative-result
//! procedure. [`Ledger`] is the conservation check every test ends with.
#![allow(dead_code)]

#[path = "../pg_rig/mod.rs"]
pub mod pg_rig;
pub mod token;

use std::collections::BTreeMap;
use std::path::Path;

use headend::assembly::{self, DemoOptions, Roles, Running};
use headend::bank::{box_pin_key, pin_verification_value};
use headend::config::{HeadendConfig, hex_key, read_key_file};
use headend::funds::HoldState;
use headend::pki::OperatorCa;
use headend::quic::{BoxId, ClientTls, QuicClient, TransportSettings, load_certs};
use headend::role::to_payload;
use proto::apdu::{CardApplication, Response, StatusWord};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::*;

pub const EUR: Currency = Currency::EUR;
pub const ACCOUNT: &str = assembly::DEMO_ACCOUNT;
/// The demo voucher under a fixed code the tests can name (`demo` puts it in the config in
/// place of the generated one).
pub const VOUCHER: &str = "TEST-VOUCHER-0001";
pub const BOX1: &str = assembly::DEMO_BOX;
pub const BOX2: &str = "box-000002";
/// A second account of box 1 with little money in it.
pub const POOR: &str = "ACC-POOR";

pub struct HeadEnd {
    pub dir: tempfile::TempDir,
    pub cfg: HeadendConfig,
    pub config_path: std::path::PathBuf,
    pub running: Running,
    pub pin: String,
    /// The database every role journals on, on a PostgreSQL run (last: dropped after the
    /// roles).
    pub pg: Option<pg_rig::PgDb>,
    /// The PKCS#11 token the load server's HSM runs on, when it does ([`token::ENV`]).
    pub token: Option<headend::load::token::TokenDef>,
}

/// Writes the demo deployment plus test accounts: `POOR` (1 000, same PIN) for box 1, and
/// a second voucher for box 2. `edit` may change the config text further.
pub fn demo(
    edit: impl FnOnce(String) -> String,
) -> (tempfile::TempDir, std::path::PathBuf, String) {
    let dir = tempfile::tempdir().unwrap();
    let files = assembly::init_demo(
        dir.path(),
        &DemoOptions {
            gateway_listen: ([127, 0, 0, 1], 0).into(),
            ..Default::default()
        },
    )
    .unwrap();
    let pin = std::fs::read_to_string(&files.pin_file)
        .unwrap()
        .trim()
        .to_string();
    let cfg = HeadendConfig::load(&files.config).unwrap();
    let master = read_key_file("pin master", &cfg.bank.as_ref().unwrap().pin_master_file).unwrap();
    let extra = format!(
        r#"
[[bank_accounts]]
id = "{POOR}"
holder = "Demo viewer (savings)"
box_id = "{BOX1}"
currency = 978
exponent = 2
opening_balance = 1000
pin_verification_value = "{}"

[[vouchers]]
code = "VOUCHER-0002"
box_id = "{BOX2}"
currency = 978
exponent = 2
amount = 5000
"#,
        pin_verification_value(&master, POOR, &pin)
    );
    let vouchers = files.keys_dir.join("vouchers.toml");
    let v = std::fs::read_to_string(&vouchers)
        .unwrap()
        .replace(&files.voucher, VOUCHER);
    proto::secret::write_private(&vouchers, v.as_bytes()).unwrap();
    let text = std::fs::read_to_string(&files.config).unwrap() + &extra;
    proto::secret::write_private(&files.config, edit(text).as_bytes()).unwrap();
    (dir, files.config, pin)
}

pub async fn start() -> HeadEnd {
    start_roles(Roles::ALL, |t| t).await
}

pub async fn start_roles(roles: Roles, edit: impl FnOnce(String) -> String) -> HeadEnd {
    start_roles_on(pg_rig::Backend::Sqlite, roles, edit)
        .await
        .expect("SQLite is always there")
}

/// The whole head end with every role journaling on `backend`; `None` (said why) when
/// that is PostgreSQL and it is not installed.
pub async fn start_on(backend: pg_rig::Backend) -> Option<HeadEnd> {
    start_roles_on(backend, Roles::ALL, |t| t).await
}

/// [`start_roles`] with every role journaling on `backend`.
pub async fn start_roles_on(
    backend: pg_rig::Backend,
    roles: Roles,
    edit: impl FnOnce(String) -> String,
) -> Option<HeadEnd> {
    start_prepared(backend, roles, edit, |_| {}).await
}

/// The demo deployment (`edit` changes its config text), then `prepare(dir)` (e.g. key
/// files written), then the head end started with `roles` journaling on `backend`. With
/// [`token::ENV`] set, the load masters go into a new SoftHSM2 token first and the load
/// server runs on it. `None` (said why) when `backend` is PostgreSQL and it is not
/// installed.
pub async fn start_prepared(
    backend: pg_rig::Backend,
    roles: Roles,
    edit: impl FnOnce(String) -> String,
    prepare: impl FnOnce(&Path),
) -> Option<HeadEnd> {
    let pg = match backend {
        pg_rig::Backend::Sqlite => None,
        pg_rig::Backend::Postgres => Some(pg_rig::PgDb::fresh()?),
    };
    let section = pg
        .as_ref()
        .map(|db| db.journal_section())
        .unwrap_or_default();
    let token = token::wanted().then(|| token::new_token(&token::fresh_label()));
    let (dir, config_path, pin) = demo(|t| {
        let t = edit(t) + &section;
        match &token {
            Some(def) => token::use_token(&t, def),
            None => t,
        }
    });
    prepare(dir.path());
    if let Some(def) = &token {
        assert!(
            !token::import_demo_keys(def, dir.path()).is_empty(),
            "no load master imported"
        );
    }
    let cfg = HeadendConfig::load(&config_path).unwrap();
    if let Some(load) = &cfg.load {
        assert_eq!(
            load.load_keys.is_none(),
            token.is_some(),
            "the load server runs on the token exactly when {} asks",
            token::ENV
        );
    }
    let running = assembly::start(&cfg, roles).await.unwrap();
    Some(HeadEnd {
        dir,
        cfg,
        config_path,
        running,
        pin,
        pg,
        token,
    })
}

pub fn today() -> Date {
    headend::payment::today()
}

/// The deployment's personalisation keys (`issuer-keys.toml` beside the config's state).
pub fn issuer_keys(cfg: &HeadendConfig) -> IssuerKeys {
    let dir = cfg
        .state_dir
        .parent()
        .expect("state dir inside the demo dir");
    headend::config::load_issuer_keys(&dir.join("issuer-keys.toml")).unwrap()
}

pub fn new_card(
    cfg: &HeadendConfig,
    card_id: u64,
    balance: u64,
    max: u64,
    currency: Currency,
) -> PurseCard {
    let spec = CardSpec::demo(card_id, currency, balance, max);
    PurseCard::new(CardState::personalise(&spec, &issuer_keys(cfg)), card_id)
}

pub async fn connect_box(ca_dir: &Path, box_id: &str, addr: std::net::SocketAddr) -> QuicClient {
    let ca = OperatorCa::load(ca_dir).unwrap();
    let issued = ca.issue_device(&BoxId::new(box_id).unwrap()).unwrap();
    let tls = ClientTls::new(
        load_certs(&ca_dir.join("ca.crt.pem")).unwrap(),
        issued.tls_identity(),
        "gateway",
    );
    QuicClient::connect(&tls, &TransportSettings::default(), addr, "localhost")
        .await
        .unwrap()
}

pub struct LoadBox {
    pub id: String,
    pub client: QuicClient,
    pub card: PurseCard,
    /// The per-box PIN key from provisioning.
    pub pin_key: DesKey,
    /// Card balance when the box was made, for the conservation check.
    pub start_balance: u64,
}

pub fn error_code(m: &Message) -> ErrorCode {
    match m {
        Message::Error(e) => e.code,
        other => panic!("expected an error, got {other:?}"),
    }
}

impl LoadBox {
    pub async fn new(he: &HeadEnd, box_id: &str, balance: u64, max: u64) -> Self {
        Self::with_currency(he, box_id, balance, max, EUR).await
    }

    pub async fn with_currency(
        he: &HeadEnd,
        box_id: &str,
        balance: u64,
        max: u64,
        currency: Currency,
    ) -> Self {
        let client = connect_box(
            &he.dir.path().join("ca"),
            box_id,
            he.running.gateway_addr.unwrap(),
        )
        .await;
        let master =
            read_key_file("pin master", &he.cfg.bank.as_ref().unwrap().pin_master_file).unwrap();
        // The demo box's key comes from its provisioning file; others are derived the same
        // way the provisioning step does.
        let file = he.dir.path().join(format!("pin-keys/{box_id}.key"));
        let pin_key = match std::fs::read_to_string(&file) {
            Ok(hex_str) => hex_key("pin key file", &hex_str).unwrap(),
            Err(_) => box_pin_key(&master, box_id),
        };
        let card_id = 0xCA4D_0000_0000 + u64::from(box_id.as_bytes()[box_id.len() - 1]);
        Self {
            id: box_id.into(),
            client,
            card: new_card(&he.cfg, card_id, balance, max, currency),
            pin_key,
            start_balance: balance,
        }
    }

    pub async fn call(&self, msg: &Message) -> Message {
        let bytes = self.client.call(&to_payload(msg)).await.unwrap();
        Message::from_payload(&bytes).unwrap()
    }

    pub fn apdu(&mut self, apdu: &[u8]) -> Response {
        Response::parse(&self.card.process_apdu(apdu)).unwrap()
    }

    pub fn purse(&mut self) -> PurseInfo {
        self.apdu(&commands::select());
        PurseInfo::decode(&self.apdu(&commands::read_purse()).data).unwrap()
    }

    pub fn balance(&mut self) -> u64 {
        self.purse().balance
    }

    pub async fn ask_offer(&mut self, source: LoadSource) -> Message {
        let card = self.purse();
        self.call(&Message::LoadOfferRequest(LoadOfferRequest {
            source,
            card,
        }))
        .await
    }

    pub async fn offer(&mut self, source: LoadSource) -> LoadOffer {
        match self.ask_offer(source).await {
            Message::LoadOffer(o) => o,
            other => panic!("expected a load offer, got {other:?}"),
        }
    }

    /// INITIALIZE FOR LOAD with the offer's time stamp: S1.
    pub fn init_load(&mut self, offer: &LoadOffer, amount: u64) -> Result<LoadInit, StatusWord> {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_load(&LoadInitRequest {
            amount,
            currency: offer.max_amount.currency,
            timestamp: offer.timestamp,
            date: offer.date,
        }));
        if r.sw.is_ok() {
            Ok(LoadInit::decode(&r.data).unwrap())
        } else {
            Err(r.sw)
        }
    }

    pub fn seal_pin(&self, txid: &str, pin: &str) -> Vec<u8> {
        let block = PinBlock {
            transaction_id: txid.into(),
            pin: pin.into(),
        };
        proto::crypto::seal(
            &self.pin_key,
            &postcard::to_allocvec(&block).unwrap(),
            &mut rand::rngs::OsRng,
        )
    }

    pub fn load_request(
        &self,
        offer: &LoadOffer,
        init: LoadInit,
        amount: u64,
        pin: Option<&str>,
    ) -> LoadRequest {
        LoadRequest {
            transaction_id: offer.transaction_id.clone(),
            source: offer.source.clone(),
            amount: Money::new(amount, init.currency),
            init,
            sealed_pin: pin.map(|p| self.seal_pin(&offer.transaction_id, p)),
            // As the box does: a bank load carries the card's passbook (seed 004).
            passbook: if matches!(offer.source, LoadSource::Bank { .. }) {
                self.card.state.passbook()
            } else {
                Vec::new()
            },
        }
    }

    pub fn command(msg: &Message) -> LoadCommand {
        match msg {
            Message::LoadCommand(c) => c.command.clone(),
            other => panic!("expected a load command, got {other:?}"),
        }
    }

    /// LOAD on the card.
    pub fn run_load(&mut self, cmd: &LoadCommand) -> Result<LoadResponse, StatusWord> {
        let r = self.apdu(&commands::load(cmd));
        if r.sw.is_ok() {
            Ok(LoadResponse::decode(&r.data).unwrap())
        } else {
            Err(r.sw)
        }
    }

    /// The zero-value INITIALIZE FOR LOAD of [0130]: a fresh S1 proving the card's state.
    pub fn zero_value(&mut self, offer: &LoadOffer) -> LoadInit {
        self.init_load(offer, 0)
            .expect("zero-value INITIALIZE FOR LOAD")
    }

    pub fn response_msg(
        offer: &LoadOffer,
        response: Option<LoadResponse>,
        zero_value: Option<LoadInit>,
    ) -> Message {
        Message::LoadResponse(LoadResponseMsg {
            transaction_id: offer.transaction_id.clone(),
            response,
            zero_value,
        })
    }

    /// Offer, S1, load request, load command, LOAD, load response: the whole load.
    /// Returns the offer and the final answer (a confirmation, or the refusal).
    pub async fn load(
        &mut self,
        source: LoadSource,
        amount: u64,
        pin: Option<&str>,
    ) -> (LoadOffer, Message) {
        let offer = self.offer(source).await;
        let init = self.init_load(&offer, amount).expect("INITIALIZE FOR LOAD");
        let req = self.load_request(&offer, init, amount, pin);
        let answer = self.call(&Message::LoadRequest(req)).await;
        let Message::LoadCommand(c) = &answer else {
            return (offer, answer);
        };
        // As the box does: the issuer's items (key update, UNBLOCK, application key), if
        // any, in the same LOAD.
        let r = self.apdu(&commands::load_with_items(
            &c.command,
            [&c.key_update, &c.unblock, &c.app_key].map(|i| i.as_deref()),
        ));
        assert!(r.sw.is_ok(), "card refused LOAD: {}", r.sw);
        let resp = LoadResponse::decode(&r.data).unwrap();
        let conf = self
            .call(&Self::response_msg(&offer, Some(resp), None))
            .await;
        (offer, conf)
    }
}

impl LoadBox {
    /// INITIALIZE FOR UNLOAD over the offer's time stamp: S1 (`amount` 0: the zero-value
    /// proof of the negative-result procedure in reverse).
    pub fn init_unload(&mut self, offer: &LoadOffer, amount: u64) -> LoadInit {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_unload(&LoadInitRequest {
            amount,
            currency: offer.max_amount.currency,
            timestamp: offer.timestamp,
            date: offer.date,
        }));
        assert!(r.sw.is_ok(), "INITIALIZE FOR UNLOAD: {}", r.sw);
        LoadInit::decode(&r.data).unwrap()
    }

    /// Offer, S1, unload request to the bank account: the offer and the unload command (or
    /// the refusal).
    pub async fn unload_request(&mut self, amount: u64, pin: &str) -> (LoadOffer, Message) {
        let offer = self.offer(unload_source()).await;
        let init = self.init_unload(&offer, amount);
        let req = self.load_request(&offer, init, amount, Some(pin));
        let answer = self.call(&Message::LoadRequest(req)).await;
        (offer, answer)
    }

    /// A whole unload: request, UNLOAD, response; the offer and the final answer.
    pub async fn unload(&mut self, amount: u64, pin: &str) -> (LoadOffer, Message) {
        let (offer, answer) = self.unload_request(amount, pin).await;
        let Message::LoadCommand(c) = &answer else {
            return (offer, answer);
        };
        let r = self.apdu(&commands::unload(&c.command));
        assert!(r.sw.is_ok(), "card refused UNLOAD: {}", r.sw);
        let resp = LoadResponse::decode(&r.data).unwrap();
        let conf = self
            .call(&Self::response_msg(&offer, Some(resp), None))
            .await;
        (offer, conf)
    }
}

/// The demo bank account as an unload's destination (issue 17).
pub fn unload_source() -> LoadSource {
    LoadSource::Unload {
        account: ACCOUNT.into(),
    }
}

pub fn bank_source() -> LoadSource {
    LoadSource::Bank {
        account: ACCOUNT.into(),
    }
}

pub fn voucher_source(code: &str) -> LoadSource {
    LoadSource::Voucher { code: code.into() }
}

/// The conservation check: per currency, what left the funding accounts = what the cards
/// gained = what the issuer floats gained, the HSM settled exactly that, and no hold is
/// left open. Returns (debits, card credits, float increase) per currency for the report.
pub async fn conservation(
    he: &HeadEnd,
    boxes: &mut [&mut LoadBox],
) -> BTreeMap<Currency, (u64, u64, u64)> {
    let mut out: BTreeMap<Currency, (u64, u64, u64)> = BTreeMap::new();
    let mut funds = Vec::new();
    if let Some(b) = &he.running.bank {
        funds.push(&b.funds);
    }
    if let Some(l) = &he.running.load {
        funds.push(&l.prefunded);
    }
    for f in funds {
        for a in f.accounts() {
            out.entry(a.currency).or_default().0 += a.opening_balance - a.balance;
            assert_eq!(a.held, 0, "account {} still has {} held", a.id, a.held);
        }
        for h in f.holds() {
            assert_ne!(
                h.state,
                HoldState::Held,
                "hold {} left dangling",
                h.transaction_id
            );
        }
        for (c, v) in f.float() {
            out.entry(c).or_default().2 += v;
        }
    }
    for b in boxes.iter_mut() {
        let cur = b.card.state.currency;
        let gained = b.balance() - b.start_balance;
        out.entry(cur).or_default().1 += gained;
        // The points purse (002): every card starts with none.
        let points = b.purse().points;
        if points != 0 {
            out.entry(Currency::POINTS).or_default().1 += points;
        }
    }
    for (c, (debits, credits, float)) in &out {
        assert_eq!(
            debits,
            credits,
            "{}: accounts debited {debits} but cards gained {credits}",
            c.alpha()
        );
        assert_eq!(
            debits,
            float,
            "{}: accounts debited {debits} but the issuer float gained {float}",
            c.alpha()
        );
        if let Some(l) = &he.running.load {
            assert_eq!(
                l.hsm_loaded(*c).await,
                *credits,
                "{}: the HSM settled another amount",
                c.alpha()
            );
        }
    }
    eprintln!("conservation: {out:?}");
    out
}

/// Waits (bounded, 10 s) until `f` holds: deliveries run on the outboxes' own timers.
pub async fn eventually(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..400 {
        if f() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    f()
}
