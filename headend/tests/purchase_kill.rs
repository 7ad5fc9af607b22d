//! A payment server SIGKILLed mid-transaction and restarted: the transaction completes (the
//! box re-sends the debit response) or is reversed from the journal (the box never comes
//! back), the merchant releases at most once, and value is conserved. Real processes: the
//! `headend all-in-one` binary, killed with SIGKILL; every role journaling on SQLite, and
//! again on PostgreSQL (a commit the process made before the kill is there after it).

mod purchase_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use headend::assembly::{DemoOptions, init_demo};
use headend::config::HeadendConfig;
use headend::journal::{self, Journal};
use headend::payment::{PayState, PayTxn};
use headend::role::to_payload;
use proto::messages::*;
use proto::money::Currency;
use proto::security_card::SecurityCard;
use purchase_support::pg_rig::{Backend, PgDb};
use purchase_support::*;

fn free_udp_port() -> SocketAddr {
    headend::assembly::free_loopback_ports(1).unwrap()[0]
}

fn spawn_headend(config: &Path, log: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(["all-in-one", "--config"])
        .arg(config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

async fn connect_when_up(
    b: &mut Option<TestBox>,
    ca: &Path,
    cfg: &HeadendConfig,
    addr: SocketAddr,
    balance: u64,
) -> TestBox {
    // The process needs a moment to bind; retry the connection, bounded.
    for _ in 0..100 {
        let attempt = tokio::time::timeout(Duration::from_millis(500), async {
            let client = headend::quic::QuicClient::connect(
                &headend::quic::ClientTls::new(
                    headend::quic::load_certs(&ca.join("ca.crt.pem")).unwrap(),
                    (headend::pki::OperatorCa::load(ca)
                        .unwrap()
                        .issue_device(&headend::quic::BoxId::new("box-000777").unwrap())
                        .unwrap())
                    .tls_identity(),
                    "gateway",
                ),
                &headend::quic::TransportSettings::default(),
                addr,
                "localhost",
            )
            .await?;
            client.call(&to_payload(&Message::CatalogRequest)).await?;
            Ok::<_, headend::quic::QuicError>(client)
        })
        .await;
        if let Ok(Ok(client)) = attempt {
            return match b.take() {
                Some(mut existing) => {
                    existing.0.client = client;
                    existing
                }
                None => TestBox(purchase_support::wire_box::WireBox {
                    id: "box-000777".into(),
                    client,
                    card: new_card(cfg, 0xBEEF, balance),
                }),
            };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("headend did not come up on {addr}");
}

/// A role's journal where the config puts it (a file, or a PostgreSQL schema).
fn journal_of(cfg: &HeadendConfig, role: &str) -> Journal {
    Journal::open_target(&cfg.journal_target(role).unwrap()).unwrap()
}

/// Reads the payment server's state from its journal, as an operator would.
fn payment_state(cfg: &HeadendConfig, txid: &str) -> (Option<PayTxn>, u64) {
    let j = journal_of(cfg, "payment");
    let txn = j
        .get(headend::journal::Kind::Txn, txid)
        .unwrap()
        .map(|b| journal::decode::<PayTxn>(&b).unwrap());
    let totals = j
        .all(headend::journal::Kind::SecurityCard)
        .unwrap()
        .iter()
        .map(|(_, b)| {
            journal::decode::<SecurityCard>(b)
                .unwrap()
                .total(Currency::EUR)
                .amount
        })
        .sum();
    (txn, totals)
}

fn releases(cfg: &HeadendConfig, txid: &str) -> usize {
    let j = journal_of(cfg, "merchant");
    usize::from(
        j.get(headend::journal::Kind::Release, txid)
            .unwrap()
            .is_some(),
    )
}

/// The all-in-one deployment with its journals on `backend`; `None` (said why) without
/// PostgreSQL. The database (if any) comes back to be held for the test's length.
#[allow(clippy::type_complexity)]
fn setup(
    timeout_secs: u64,
    backend: Backend,
) -> Option<(tempfile::TempDir, HeadendConfig, SocketAddr, Option<PgDb>)> {
    let db = match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(PgDb::fresh()?),
    };
    let dir = tempfile::tempdir().unwrap();
    let addr = free_udp_port();
    let files = init_demo(
        dir.path(),
        &DemoOptions {
            gateway_listen: addr,
            transaction_timeout_secs: timeout_secs,
            ..Default::default()
        },
    )
    .unwrap();
    if let Some(db) = &db {
        let text = std::fs::read_to_string(&files.config).unwrap() + &db.journal_section();
        proto::secret::write_private(&files.config, text.as_bytes()).unwrap();
    }
    let cfg = HeadendConfig::load(&files.config).unwrap();
    Some((dir, cfg, addr, db))
}

#[tokio::test]
async fn killed_after_the_debit_command_completes_when_the_box_resends() {
    completes_when_the_box_resends(Backend::Sqlite).await;
}

#[tokio::test]
async fn killed_after_the_debit_command_completes_when_the_box_resends_on_postgres() {
    completes_when_the_box_resends(Backend::Postgres).await;
}

async fn completes_when_the_box_resends(backend: Backend) {
    let Some((dir, cfg, addr, _db)) = setup(30, backend) else {
        return;
    };
    let (ca, log) = (dir.path().join("ca"), dir.path().join("headend.log"));
    let mut child = spawn_headend(&cfg_path(&dir), &log);
    let mut b = connect_when_up(&mut None, &ca, &cfg, addr, 5_000).await;

    let offer = b.offer("CABLE", "ppv-1001").await;
    let draw = b.draw_request(&offer);
    let mut txn = b.0.client.transaction().await.unwrap();
    let answer = Message::from_payload(
        &txn.exchange(&to_payload(&Message::DrawRequest(draw)))
            .await
            .unwrap(),
    )
    .unwrap();
    let cmd = TestBox::open_debit_command(&offer, &answer);

    child.kill().unwrap(); // SIGKILL, mid-transaction
    child.wait().unwrap();
    let resp = b.debit(&offer, &cmd); // the card debits while the head end is down
    assert_eq!(b.balance(), 4_501);

    let mut child = spawn_headend(&cfg_path(&dir), &log);
    let mut slot = Some(b);
    let b = connect_when_up(&mut slot, &ca, &cfg, addr, 5_000).await;
    let receipt = b.call(&Message::DebitResponse(resp.clone())).await;
    assert!(
        matches!(receipt, Message::Receipt(ref r) if r.released),
        "{receipt:?}"
    );
    // Re-sent again (the box's own retry): same answer, nothing more.
    assert_eq!(b.call(&Message::DebitResponse(resp)).await, receipt);

    child.kill().unwrap();
    child.wait().unwrap();
    let (t, totals) = payment_state(&cfg, &offer.transaction_id);
    assert_eq!(t.unwrap().state, PayState::Completed);
    assert_eq!(totals, 499, "the security card counted the sale once");
    assert_eq!(
        releases(&cfg, &offer.transaction_id),
        1,
        "released exactly once"
    );
    let mut b = b;
    assert_eq!(b.balance() + totals, 5_000, "value conserved");
}

#[tokio::test]
async fn killed_after_the_debit_command_reverses_when_the_card_never_debited() {
    reverses_when_the_card_never_debited(Backend::Sqlite).await;
}

#[tokio::test]
async fn killed_after_the_debit_command_reverses_when_the_card_never_debited_on_postgres() {
    reverses_when_the_card_never_debited(Backend::Postgres).await;
}

async fn reverses_when_the_card_never_debited(backend: Backend) {
    let Some((dir, cfg, addr, _db)) = setup(1, backend) else {
        return;
    };
    let (ca, log) = (dir.path().join("ca"), dir.path().join("headend.log"));
    let mut child = spawn_headend(&cfg_path(&dir), &log);
    let mut b = connect_when_up(&mut None, &ca, &cfg, addr, 5_000).await;
    let offer = b.offer("CABLE", "ppv-1001").await;
    let draw = b.draw_request(&offer);
    let answer = b.call(&Message::DrawRequest(draw)).await;
    TestBox::open_debit_command(&offer, &answer);
    child.kill().unwrap(); // SIGKILL; the card is pulled and never runs DEBIT
    child.wait().unwrap();
    let (t, _) = payment_state(&cfg, &offer.transaction_id);
    assert_eq!(
        t.unwrap().state,
        PayState::DebitIssued,
        "open in the journal at the kill"
    );

    let mut child = spawn_headend(&cfg_path(&dir), &log);
    let _b = connect_when_up(&mut Some(b), &ca, &cfg, addr, 5_000).await;
    // The restarted payment server re-arms the open transaction and reverses it at its deadline.
    let reversed = eventually(|| {
        payment_state(&cfg, &offer.transaction_id).0.unwrap().state == PayState::Reversed
    })
    .await;
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(reversed, "reversed from the journal after the restart");
    let (_, totals) = payment_state(&cfg, &offer.transaction_id);
    assert_eq!(totals, 0);
    assert_eq!(releases(&cfg, &offer.transaction_id), 0);
}

fn cfg_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
    dir.path().join("headend.toml")
}
