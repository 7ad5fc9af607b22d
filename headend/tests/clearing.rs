//! Issue 15, clearing and settlement, over real QUIC on loopback: two payment servers — the
//! cable head end's (`payment`, merchant CABLE) and an internet merchant's (`payment-web`,
//! merchant M-WEBSHOP, 001 [0038], [0040]) — each their own role with its own certificate,
//! behind one gateway, and the clearing role on its own QUIC port. Purchases go through the
//! gateway from wire-level test boxes with real purse cards; the payment servers close
//! their batches and their outboxes send them to clearing; settlement pays each merchant;
//! `headend reconcile` (the real binary) reads the raw journals.
//!
//! - `two_payment_servers_clear_settle_and_reconcile`: 50 purchases each, both batches
//!   received over QUIC and acknowledged (remaining-to-settle 0), the report pays each
//!   merchant exactly its sum, reconcile exits 0; then one amount changed in a payment
//!   journal and reconcile names that transaction.
//! - `bad_batches_are_refused_with_their_reason_and_nothing_settles`: a batch from an
//!   unknown payment server, one sent by another party, totals that do not add up, a
//!   duplicate batch id with other content, a transaction already cleared.

mod clearing_support;
mod purchase_support;

use clearing_support::*;

use std::collections::BTreeMap;
use std::sync::Arc;

use headend::assembly::{self, DemoOptions, Roles};
use headend::clearing::ClearingServer;
use headend::config::HeadendConfig;
use headend::journal::Kind;
use headend::payment::collection::BatchState;
use headend::role::{Caller, Role};
use proto::clearing::{BatchRecord, CollectionBatch};
use proto::messages::*;
use proto::money::{Currency, Money};
use purchase_support::*;

const EUR: Currency = Currency::EUR;
const PURCHASES_EACH: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_payment_servers_clear_settle_and_reconcile() {
    two_payment_servers_case(purchase_support::pg_rig::Backend::Sqlite).await;
}

/// The same with every role — both payment servers and clearing included — on PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_payment_servers_clear_settle_and_reconcile_on_postgres() {
    two_payment_servers_case(purchase_support::pg_rig::Backend::Postgres).await;
}

async fn two_payment_servers_case(backend: purchase_support::pg_rig::Backend) {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let Some(d) = deployment_on(backend) else {
        return;
    };
    let only = |f: fn(&mut Roles)| {
        let mut r = Roles::NONE;
        f(&mut r);
        r
    };
    let clearing = d.start("clearing", only(|r| r.clearing = true)).await;
    assert_eq!(clearing.clearing_addr, Some(d.clearing_addr));
    let cable = d.start("payment", only(|r| r.payment = true)).await;
    let web = d.start("payment-web", only(|r| r.payment = true)).await;
    let merchant = d.start("merchant", only(|r| r.merchant = true)).await;
    let gateway = d.start("gateway", only(|r| r.gateway = true)).await;
    let gw_addr = gateway.gateway_addr.unwrap();

    // 50 purchases through each payment server, from five boxes.
    let ca = d.dir.path().join("ca");
    // (The all-in-one config only locates the demo's issuer keys for the boxes' cards.)
    let cfg = HeadendConfig::load(&d.dir.path().join("headend.toml")).unwrap();
    let mut boxes = Vec::new();
    for i in 0..5u64 {
        let id = format!("box-{:06}", 100 + i);
        boxes.push(TestBox::connect(&ca, &cfg, &id, gw_addr, 100_000 + i).await);
    }
    let mut spent: BTreeMap<&str, u64> = BTreeMap::new();
    for n in 0..PURCHASES_EACH {
        let b = &mut boxes[n % 5];
        let item = if n % 2 == 0 { "ppv-1001" } else { "ppv-1002" };
        let (offer, receipt) = b.buy("CABLE", item).await;
        assert!(
            matches!(receipt, Message::Receipt(ref r) if r.released),
            "{receipt:?}"
        );
        *spent.entry("CABLE").or_default() += offer.amount.minor;
        let (offer, receipt) = b.buy("M-WEBSHOP", "ebook-1").await;
        assert!(
            matches!(receipt, Message::Receipt(ref r) if r.released),
            "{receipt:?}"
        );
        *spent.entry("M-WEBSHOP").or_default() += offer.amount.minor;
    }
    let (pc, pw) = (cable.payment.clone().unwrap(), web.payment.clone().unwrap());
    assert!(eventually(|| completed(&pc).len() == PURCHASES_EACH).await);
    assert!(eventually(|| completed(&pw).len() == PURCHASES_EACH).await);

    // Each closes its batch; its outbox sends it to clearing over QUIC.
    let bc = pc.close_batch().unwrap().expect("a batch");
    let bw = pw.close_batch().unwrap().expect("a batch");
    assert_eq!((bc.records.len(), bw.records.len()), (50, 50));
    let c = clearing.clearing.clone().unwrap();
    assert!(
        eventually(|| c.journal().all(Kind::ClearedBatch).unwrap().len() == 2).await,
        "clearing received both batches; outboxes: {:?} {:?}",
        headend::outbox::Outbox::list(pc.journal(), "clearing"),
        headend::outbox::Outbox::list(pw.journal(), "clearing"),
    );
    assert!(
        eventually(
            || pc.batch_state(bc.batch) == Some(BatchState::Acknowledged)
                && pw.batch_state(bw.batch) == Some(BatchState::Acknowledged)
        )
        .await,
        "both acknowledged"
    );
    // [0044]: the acknowledged batches leave nothing to settle in the security cards.
    for p in [&pc, &pw] {
        let left = p.remaining_to_settle().await.unwrap();
        assert!(left.values().all(|v| *v == 0), "{left:?}");
    }

    let report = c.settle().unwrap().expect("something to settle");
    assert_eq!(report.batches.len(), 2);
    let paid = |m: &str| {
        report
            .merchants
            .iter()
            .filter(|p| p.merchant_id == m)
            .map(|p| (p.acquirer.clone(), p.count, p.amount))
            .collect::<Vec<_>>()
    };
    assert_eq!(paid("CABLE"), vec![("payment".into(), 50, spent["CABLE"])]);
    assert_eq!(
        paid("M-WEBSHOP"),
        vec![("payment-web".into(), 50, spent["M-WEBSHOP"])]
    );
    let purchases: i64 = (spent["CABLE"] + spent["M-WEBSHOP"]) as i64;
    assert_eq!(report.float.len(), 1);
    assert_eq!(report.float[0].purchases, purchases);
    assert_eq!(report.float[0].closing, -purchases, "no loads advised here");
    let (json, csv) =
        headend::clearing::settle::write(&report, &d.dir.path().join("reports")).unwrap();
    assert!(json.exists());
    let csv = std::fs::read_to_string(csv).unwrap();
    assert!(
        csv.contains(&format!("merchant,CABLE,payment,978,50,{}", spent["CABLE"])),
        "{csv}"
    );
    assert!(c.settle().unwrap().is_none(), "nothing is settled twice");

    let (ok, out) = d.reconcile();
    assert!(ok, "reconcile: {out}");

    // One amount changed in the cable payment server's journal: reconcile names it.
    let victim = bc.records[7].transaction_id.clone();
    let mut t = pc.txn(&victim).unwrap();
    t.amount = Money::new(t.amount.minor + 1, EUR);
    pc.journal()
        .put(Kind::Txn, &victim, &headend::journal::encode(&t))
        .unwrap();
    let (ok, out) = d.reconcile();
    assert!(!ok, "reconcile must fail: {out}");
    assert!(out.contains(&victim), "names {victim}: {out}");

    if let Some(pg) = &d.pg {
        // Every role journaled on PostgreSQL: no SQLite file anywhere, steps in each schema.
        for role in ["gateway", "merchant", "payment", "clearing"] {
            pg.assert_every_role_here(&d.state(role), &[role]);
        }
        assert!(!d.state("payment-web").join("payment-web.sqlite").exists());
    }
    for r in [gateway, merchant, web, cable, clearing] {
        r.stop().await;
    }
}

fn record(txid: &str, sc: u64, n: u32, minor: u64) -> BatchRecord {
    BatchRecord {
        transaction_id: txid.into(),
        merchant_id: "CABLE".into(),
        security_card_id: sc,
        security_card_txn: n,
        card_id: 0xC0DE,
        amount: Money::new(minor, EUR),
    }
}

fn refused(m: &Message, code: ErrorCode, words: &str) {
    match m {
        Message::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.reason.contains(words), "{:?} lacks {words:?}", e.reason);
        }
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test]
async fn bad_batches_are_refused_with_their_reason_and_nothing_settles() {
    let dir = tempfile::tempdir().unwrap();
    let files = assembly::init_demo(dir.path(), &DemoOptions::default()).unwrap();
    let cfg = HeadendConfig::load(&files.config).unwrap();
    let c: Arc<ClearingServer> = ClearingServer::open(&cfg).unwrap();
    let batch = |ps: &str, n: u64, records| CollectionBatch::build(ps, n, "2026-11-30", records);
    let send = |caller: &str, b: CollectionBatch| {
        c.handle(
            Caller::Role(caller.into()),
            Message::CollectionBatch(Box::new(b)),
        )
    };

    // A payment server clearing does not know, speaking for itself.
    let m = send(
        "payment-rogue",
        batch("payment-rogue", 1, vec![record("r1", 1, 1, 100)]),
    )
    .await;
    refused(&m, ErrorCode::Forbidden, "not a collection batches sender");
    // A known payment server's batch sent by another party.
    let m = send("bank", batch("payment", 1, vec![record("r1", 1, 1, 100)])).await;
    refused(&m, ErrorCode::Forbidden, "sent by bank");
    // Totals that do not add up.
    let mut b = batch(
        "payment",
        1,
        vec![record("t1", 1, 1, 100), record("t2", 1, 2, 200)],
    );
    b.totals[0].amount = 250;
    refused(
        &send("payment", b).await,
        ErrorCode::Malformed,
        "do not add up",
    );
    // A good batch, then the same id with other content.
    let good = batch(
        "payment",
        1,
        vec![record("t1", 1, 1, 100), record("t2", 1, 2, 200)],
    );
    assert_eq!(
        send("payment", good.clone()).await,
        Message::BatchAck {
            payment_server: "payment".into(),
            batch: 1
        }
    );
    assert_eq!(
        send("payment", good.clone()).await,
        Message::BatchAck {
            payment_server: "payment".into(),
            batch: 1
        },
        "the identical batch again: the same acknowledgement"
    );
    let other = batch(
        "payment",
        1,
        vec![record("t1", 1, 1, 100), record("t2", 1, 2, 201)],
    );
    refused(
        &send("payment", other).await,
        ErrorCode::Replay,
        "other content",
    );
    // A transaction batch 1 cleared, again in batch 2.
    let again = batch(
        "payment",
        2,
        vec![record("t3", 1, 3, 50), record("t2", 1, 2, 200)],
    );
    refused(&send("payment", again).await, ErrorCode::Replay, "t2");
    // Only the good batch is in the journal, and settles once.
    assert_eq!(c.journal().all(Kind::ClearedBatch).unwrap().len(), 1);
    assert_eq!(c.journal().all(Kind::ClearedTxn).unwrap().len(), 2);
    let report = c.settle().unwrap().unwrap();
    assert_eq!(report.batches, vec!["payment/000000000001".to_string()]);
    assert_eq!(report.merchants[0].amount, 300);
    assert!(c.settle().unwrap().is_none());
    // Not a clearing message at all.
    let m = c
        .handle(Caller::Role("payment".into()), Message::CatalogRequest)
        .await;
    refused(&m, ErrorCode::Malformed, "not a catalog request");
}

/// Two clearing instances on one journal (two handles on one SQLite file, or two
/// connections to one PostgreSQL schema): batches received through either, then both settle
/// at once, from two threads, several times: every batch is settled by exactly one report.
fn two_instances_case(backend: purchase_support::pg_rig::Backend) {
    let dir = tempfile::tempdir().unwrap();
    let files = assembly::init_demo(dir.path(), &DemoOptions::default()).unwrap();
    // Held to the end: the last holder of the shared test server stops it.
    let _db = if backend == purchase_support::pg_rig::Backend::Postgres {
        let Some(db) = purchase_support::pg_rig::PgDb::fresh() else {
            return;
        };
        let text = std::fs::read_to_string(&files.config).unwrap() + &db.journal_section();
        proto::secret::write_private(&files.config, text.as_bytes()).unwrap();
        Some(db)
    } else {
        None
    };
    let cfg = HeadendConfig::load(&files.config).unwrap();
    let (a, b) = (
        ClearingServer::open(&cfg).unwrap(),
        ClearingServer::open(&cfg).unwrap(),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut expected = std::collections::BTreeSet::new();
    let mut total = 0;
    for n in 1..=40u64 {
        let records = vec![record(&format!("t{n}"), 7, n as u32, 100 + n)];
        total += 100 + n;
        let batch = CollectionBatch::build("payment", n, "2026-11-30", records);
        let to = if n % 2 == 0 { &a } else { &b };
        let answer = rt.block_on(to.handle(
            Caller::Role("payment".into()),
            Message::CollectionBatch(Box::new(batch)),
        ));
        assert!(matches!(answer, Message::BatchAck { .. }), "{answer:?}");
        expected.insert(headend::clearing::batch_key("payment", n));
    }
    // Both instances settle at once, three rounds each.
    let settle = |c: Arc<ClearingServer>| {
        std::thread::spawn(move || {
            (0..3)
                .filter_map(|_| c.settle().unwrap())
                .collect::<Vec<_>>()
        })
    };
    let (ta, tb) = (settle(a.clone()), settle(b.clone()));
    let reports: Vec<_> = ta
        .join()
        .unwrap()
        .into_iter()
        .chain(tb.join().unwrap())
        .collect();
    let mut settled = std::collections::BTreeSet::new();
    let mut paid = 0;
    for r in &reports {
        for k in &r.batches {
            assert!(settled.insert(k.clone()), "{k} settled twice: {reports:?}");
        }
        paid += r.merchants.iter().map(|m| m.amount).sum::<u64>();
    }
    assert_eq!(settled, expected, "every batch settled");
    assert_eq!(paid, total, "paid exactly once");
    let ids: std::collections::BTreeSet<_> =
        a.reports().unwrap().into_iter().map(|r| r.id).collect();
    assert_eq!(ids.len(), reports.len(), "report ids are unique");
}

#[test]
fn two_clearing_instances_never_settle_a_batch_twice() {
    two_instances_case(purchase_support::pg_rig::Backend::Sqlite);
}

#[test]
fn two_clearing_instances_on_postgres_never_settle_a_batch_twice() {
    two_instances_case(purchase_support::pg_rig::Backend::Postgres);
}
