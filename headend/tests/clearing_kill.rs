//! Issue 15, "a payment server is SIGKILLed after a batch is sent but before its journal
//! commits": the cable payment server runs as a real `headend payment` process; its batch
//! (closed by `headend collect`, journaled before anything leaves) goes to clearing over
//! QUIC; the process is frozen by its test hook between clearing's acknowledgement and the
//! journal write of it, and SIGKILLed there. After the restart the outbox re-sends the
//! identical batch, clearing de-duplicates it (one batch received, every transaction cleared
//! once), the payment server journals the acknowledgement, and `headend reconcile` finds
//! nothing. On SQLite and again with every role on PostgreSQL.

mod clearing_support;
mod purchase_support;

use std::os::unix::process::ExitStatusExt;
use std::process::Command;
use std::time::Duration;

use clearing_support::*;
use headend::assembly::Roles;
use headend::config::HeadendConfig;
use headend::journal::{self, Journal, Kind};
use headend::outbox::{OutState, Outbox};
use headend::payment::collection::{BatchState, ClosedBatch};
use headend::test_hook::OUTBOX_PAUSE_BEFORE_JOURNALING_ACK;
use proto::messages::Message;
use purchase_support::*;

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !f() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "waited 30 s for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_server_killed_between_the_ack_and_its_journal_resends_the_identical_batch() {
    killed_between_ack_and_journal(pg_rig::Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payment_server_killed_between_the_ack_and_its_journal_resends_the_identical_batch_on_postgres()
 {
    killed_between_ack_and_journal(pg_rig::Backend::Postgres).await;
}

async fn killed_between_ack_and_journal(backend: pg_rig::Backend) {
    let Some(d) = deployment_on(backend) else {
        return;
    };
    // The payment server's journal where its config puts it (the file, or its schema).
    let payment_journal =
        || Journal::open_target(&d.cfg("payment").journal_target("payment").unwrap()).unwrap();
    let only = |f: fn(&mut Roles)| {
        let mut r = Roles::NONE;
        f(&mut r);
        r
    };
    let clearing = d.start("clearing", only(|r| r.clearing = true)).await;
    let mut cable = d.spawn(
        "payment",
        "payment",
        Some(OUTBOX_PAUSE_BEFORE_JOURNALING_ACK),
    );
    let merchant = d.start("merchant", only(|r| r.merchant = true)).await;
    let gateway = d.start("gateway", only(|r| r.gateway = true)).await;

    let cfg = HeadendConfig::load(&d.dir.path().join("headend.toml")).unwrap();
    let ca = d.dir.path().join("ca");
    let mut b = TestBox::connect(
        &ca,
        &cfg,
        "box-000201",
        gateway.gateway_addr.unwrap(),
        50_000,
    )
    .await;
    let mut spent = 0;
    for i in 0..8 {
        let item = if i % 2 == 0 { "ppv-1001" } else { "ppv-1002" };
        let (offer, receipt) = b.buy("CABLE", item).await;
        assert!(
            matches!(receipt, Message::Receipt(ref r) if r.released),
            "{receipt:?}"
        );
        spent += offer.amount.minor;
    }

    // `headend collect` closes the batch in the payment server's journal (a second
    // process on the same file); the running payment server's outbox sends it.
    let out = Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(["collect", "--config"])
        .arg(&d.configs["payment"])
        .arg("--out")
        .arg(d.dir.path().join("collection"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("batch 1 with 8 transactions"));

    // Clearing received it and answered; the payment server froze before journaling that.
    let c = clearing.clearing.clone().unwrap();
    wait_for("the hook", || {
        std::fs::read_to_string(d.log("payment"))
            .unwrap_or_default()
            .contains("TEST HOOK outbox-pause-before-journaling-ack")
    });
    assert_eq!(c.journal().all(Kind::ClearedBatch).unwrap().len(), 1);
    cable.kill().unwrap();
    assert_eq!(cable.wait().unwrap().signal(), Some(9), "SIGKILLed");

    // What the killed process left: the batch still closed, its delivery still pending.
    let pj = payment_journal();
    let closed: ClosedBatch =
        journal::decode(&pj.get(Kind::Batch, "000001").unwrap().unwrap()).unwrap();
    assert_eq!(closed.state, BatchState::Closed);
    assert_eq!(closed.batch.records.len(), 8);
    let pending = Outbox::list(&pj, "clearing").unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].1.state, OutState::Pending);
    drop(pj);

    // Restarted without the hook: the identical batch again, the same acknowledgement.
    let mut cable = d.spawn("payment", "payment", None);
    wait_for("the acknowledgement journaled", || {
        let pj = payment_journal();
        let b: ClosedBatch =
            journal::decode(&pj.get(Kind::Batch, "000001").unwrap().unwrap()).unwrap();
        b.state == BatchState::Acknowledged
    });
    let received = c.journal().all(Kind::ClearedBatch).unwrap();
    assert_eq!(
        received.len(),
        1,
        "clearing de-duplicated the re-sent batch"
    );
    let r: headend::clearing::Received = journal::decode(&received[0].1).unwrap();
    assert_eq!(r.batch, closed.batch, "the identical batch");
    assert_eq!(
        c.journal().all(Kind::ClearedTxn).unwrap().len(),
        8,
        "each transaction cleared once"
    );
    assert_eq!(
        c.journal().steps("payment/000000000001").unwrap(),
        ["batch received"],
        "received once: the repeat journaled nothing"
    );
    let report = c.settle().unwrap().unwrap();
    assert_eq!(report.merchants[0].amount, spent);

    cable.kill().unwrap();
    let _ = cable.wait();
    // `headend reconcile` names both payment servers; only the cable one ran here.
    let (ok, out) = d.reconcile();
    assert!(
        !ok && out.contains("payment server payment-web: its journal was not found")
            && out.lines().filter(|l| l.starts_with("BREAK")).count() == 1,
        "only the absent payment-web journal is reported: {out}"
    );
    gateway.stop().await;
    merchant.stop().await;
    clearing.stop().await;
}
