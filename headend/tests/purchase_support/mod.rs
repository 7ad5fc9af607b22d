//! Test fixtures for the purchase tests: a head end started from a fresh `init_demo`
//! deployment, and [`TestBox`], the library's simulated box with test-friendly unwrapping.
#![allow(dead_code)]

#[path = "../wire_box/mod.rs"]
pub mod wire_box;

#[path = "../pg_rig/mod.rs"]
pub mod pg_rig;

use std::path::Path;
use std::time::Duration;

use headend::assembly::{self, DemoOptions, Roles, Running};
use headend::config::HeadendConfig;
use pg_rig::{Backend, PgDb};
use proto::apdu::Response;
use proto::card::PurseCard;
use proto::messages::*;
use proto::purse::*;
use wire_box::WireBox;

pub struct HeadEnd {
    pub dir: tempfile::TempDir,
    pub cfg: HeadendConfig,
    pub running: Running,
    /// The database every role journals on, on a PostgreSQL run (last: dropped after the
    /// roles).
    pub pg: Option<PgDb>,
}

pub fn options(embodiment: &str, message_layer: bool) -> DemoOptions {
    DemoOptions {
        gateway_listen: ([127, 0, 0, 1], 0).into(),
        embodiment: embodiment.into(),
        message_layer,
        transaction_timeout_secs: 30,
        ..Default::default()
    }
}

/// The all-in-one head end with its journals on SQLite.
pub async fn start(opts: DemoOptions) -> HeadEnd {
    start_on(Backend::Sqlite, opts)
        .await
        .expect("SQLite is always there")
}

/// The all-in-one head end with every role journaling on `backend`: `None` (said why)
/// when that is PostgreSQL and it is not installed.
pub async fn start_on(backend: Backend, opts: DemoOptions) -> Option<HeadEnd> {
    start_edited(backend, opts, |t| t.to_string()).await
}

/// [`start_on`] with `edit` applied to the demo's `headend.toml` first.
pub async fn start_edited(
    backend: Backend,
    opts: DemoOptions,
    edit: impl FnOnce(&str) -> String,
) -> Option<HeadEnd> {
    start_prepared(backend, opts, |_, t| edit(t)).await
}

/// [`start_edited`] whose `edit` also gets the config file's path (to find the files the
/// demo made beside it).
pub async fn start_prepared(
    backend: Backend,
    opts: DemoOptions,
    edit: impl FnOnce(&Path, &str) -> String,
) -> Option<HeadEnd> {
    let dir = tempfile::tempdir().unwrap();
    let files = assembly::init_demo(dir.path(), &opts).unwrap();
    let text = edit(
        &files.config,
        &std::fs::read_to_string(&files.config).unwrap(),
    );
    proto::secret::write_private(&files.config, text.as_bytes()).unwrap();
    let pg = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => {
            let db = PgDb::fresh()?;
            let text = std::fs::read_to_string(&files.config).unwrap() + &db.journal_section();
            proto::secret::write_private(&files.config, text.as_bytes()).unwrap();
            Some(db)
        }
    };
    let cfg = HeadendConfig::load(&files.config).unwrap();
    let running = assembly::start(&cfg, Roles::ALL).await.unwrap();
    Some(HeadEnd {
        dir,
        cfg,
        running,
        pg,
    })
}

pub fn new_card(cfg: &HeadendConfig, card_id: u64, balance: u64) -> PurseCard {
    let dir = cfg
        .state_dir
        .parent()
        .expect("state dir inside the demo dir");
    let issuer = headend::config::load_issuer_keys(&dir.join("issuer-keys.toml")).unwrap();
    wire_box::new_card(&issuer, card_id, balance, 100_000)
}

/// The simulated box, unwrapping as a test does.
pub struct TestBox(pub WireBox);

impl TestBox {
    pub async fn new(he: &HeadEnd, box_id: &str, balance: u64) -> Self {
        Self::connect(
            &he.dir.path().join("ca"),
            &he.cfg,
            box_id,
            he.running.gateway_addr.unwrap(),
            balance,
        )
        .await
    }

    pub async fn connect(
        ca: &Path,
        cfg: &HeadendConfig,
        box_id: &str,
        addr: std::net::SocketAddr,
        balance: u64,
    ) -> Self {
        let client = wire_box::connect(ca, box_id, addr).await.unwrap();
        Self(WireBox {
            id: box_id.into(),
            client,
            card: new_card(cfg, 0xC0DE_0000 + balance, balance),
        })
    }

    pub async fn call(&self, msg: &Message) -> Message {
        self.0.call(msg).await.unwrap()
    }
    pub fn apdu(&mut self, apdu: &[u8]) -> Response {
        self.0.apdu(apdu)
    }
    pub fn balance(&mut self) -> u64 {
        self.0.balance()
    }
    pub async fn offer(&self, merchant: &str, item: &str) -> Offer {
        self.0.offer(merchant, item).await.unwrap()
    }
    pub fn proof(&mut self) -> PurchaseInit {
        self.0.proof().unwrap()
    }
    pub fn draw_request(&mut self, offer: &Offer) -> DrawRequest {
        self.0.draw_request(offer).unwrap()
    }
    pub fn open_debit_command(offer: &Offer, msg: &Message) -> DebitCommand {
        WireBox::open_debit_command(offer, msg).unwrap()
    }
    pub fn debit(&mut self, offer: &Offer, cmd: &DebitCommand) -> DebitResponseMsg {
        self.0.debit(offer, cmd).unwrap()
    }
    pub async fn buy(&mut self, merchant: &str, item: &str) -> (Offer, Message) {
        self.0.buy(merchant, item).await.unwrap()
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

/// Adds a benefits server (002 FIG. 16: a `loyalty` merchant, "M-MILES") to the demo's
/// config: its shared key beside the others, one benefit claimed by an authentication
/// (price 0 in currency 999), one redeemed for 20,000 points (currency 000), and the card of `TestBox::new(_, _, 10_000)` as member
/// "FF-0042".
pub fn with_benefits_server(config: &std::path::Path, text: &str, embodiment: &str) -> String {
    use rand::RngCore;
    let mut key = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut key);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    let keys = config.parent().unwrap().join("keys");
    proto::secret::write_private(&keys.join("merchant-M-MILES.key"), hex.as_bytes()).unwrap();
    let member = 0xC0DE_0000u64 + 10_000;
    format!(
        r#"{text}
[[merchants]]
id = "M-MILES"
name = "Miles programme"
kind = "loyalty"
shared_key_file = "{keys}/merchant-M-MILES.key"
embodiment = "{embodiment}"
payment = "payment"
merchant = "merchant"

[[merchants.items]]
id = "lounge"
title = "Airport lounge pass"
kind = "benefit"
amount = 0
currency = 999
exponent = 0

[[merchants.items]]
id = "ticket"
title = "Round-trip ticket"
kind = "benefit"
amount = 20000
currency = 0
exponent = 0

[[merchants.members]]
card_id = {member}
account = "FF-0042"
"#,
        keys = keys.display()
    )
}
