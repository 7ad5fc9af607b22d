//! Issue 15, what an outside tester found in the first clearing (each a kind, each a test):
//!
//! - `a_forged_load_advice_is_named_by_reconcile`: a funder's certificate alone advised a
//!   load that never happened; clearing cannot know, settles it into the float, and
//!   `reconcile` must name it (it said every invariant held).
//! - `a_batch_number_taken_ahead_strands_nothing_silently`: a payment server's batch number
//!   was used first by other content; clearing refuses the real batch, and `reconcile`
//!   names every purchase in it (it named only the squatter's record), `headend status`
//!   says so, and `ack-batch` cannot paper over it while a clearing role acknowledges.
//! - `batches_are_closed_small_enough_for_one_frame`: with a small `[transport] max_frame`,
//!   a day's purchases close as several batches, each small enough to travel (one batch
//!   past the frame limit was never delivered and held up every later one).

mod load_support;
#[path = "wire_box/mod.rs"]
mod wire_box;

use headend::clearing::reconcile::{Journals, reconcile};
use headend::journal::Kind;
use headend::outbox::{OutState, Outbox};
use headend::role::{Caller, Role};
use load_support::*;
use proto::clearing::{BatchRecord, CollectionBatch, LoadAdvice};
use proto::messages::*;
use proto::money::Money;

/// `n` purchases through the gateway from one wire-level box; their amounts.
async fn buy(he: &HeadEnd, id: &str, n: usize) -> u64 {
    let issuer = issuer_keys(&he.cfg);
    let mut b = wire_box::WireBox {
        id: id.into(),
        client: wire_box::connect(
            &he.dir.path().join("ca"),
            id,
            he.running.gateway_addr.unwrap(),
        )
        .await
        .unwrap(),
        card: wire_box::new_card(&issuer, 0xF00D_0000 + n as u64, 90_000, 100_000),
    };
    let mut spent = 0;
    for i in 0..n {
        let item = if i % 2 == 0 { "ppv-1001" } else { "ppv-1002" };
        let (offer, receipt) = b.buy("CABLE", item).await.unwrap();
        assert!(
            matches!(receipt, Message::Receipt(ref r) if r.released),
            "{receipt:?}"
        );
        spent += offer.amount.minor;
    }
    spent
}

fn all_completed(he: &HeadEnd) -> bool {
    let p = he.running.payment.as_ref().unwrap();
    p.journal()
        .all(Kind::Txn)
        .unwrap()
        .iter()
        .all(|(k, _)| p.txn(k).unwrap().state == headend::payment::PayState::Completed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_load_advice_is_named_by_reconcile() {
    let he = start().await;
    let mut l = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (_, answer) = l.load(bank_source(), 2_500, Some(&he.pin)).await;
    assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
    let c = he.running.clearing.clone().unwrap();
    assert!(eventually(|| c.journal().all(Kind::Advice).unwrap().len() == 1).await);
    // The bank's certificate, and nothing behind it.
    let forged = LoadAdvice {
        funder: "bank".into(),
        transaction_id: "LD-FORGED-1".into(),
        account: ACCOUNT.into(),
        card_id: 0xBAD,
        amount: Money::new(25_000, EUR),
        captured_on: "2026-11-30".into(),
        unload: false,
    };
    let ack = c
        .handle(Caller::Role("bank".into()), Message::LoadAdvice(forged))
        .await;
    assert!(
        matches!(ack, Message::Ack { .. }),
        "clearing cannot tell: {ack:?}"
    );
    let report = c.settle().unwrap().unwrap();
    assert_eq!(report.float[0].loads, 27_500, "settled into the float");
    let (ps, funders) = (
        vec!["payment".to_string()],
        vec!["bank".to_string(), "load".to_string()],
    );
    let breaks = reconcile(&Journals::find(&he.cfg, &[]).unwrap(), &ps, &funders).unwrap();
    assert!(
        breaks
            .iter()
            .any(|b| b.subject == "LD-FORGED-1" && b.what.contains("captured no such load")),
        "{breaks:?}"
    );
    // The amount of a real advice changed is named too (the other direction).
    assert_eq!(breaks.len(), 1, "only the forged one: {breaks:?}");
    he.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_number_taken_ahead_strands_nothing_silently() {
    let he = start().await;
    let c = he.running.clearing.clone().unwrap();
    let p = he.running.payment.clone().unwrap();
    // Batch 1 of `payment`, taken first by other content (the payment certificate's).
    let squat = CollectionBatch::build(
        "payment",
        1,
        "2026-11-30",
        vec![BatchRecord {
            transaction_id: "SQUAT-1".into(),
            merchant_id: "CABLE".into(),
            security_card_id: 0x5A00_0000,
            security_card_txn: 999_999,
            card_id: 1,
            amount: Money::new(1, EUR),
        }],
    );
    let ack = c
        .handle(
            Caller::Role("payment".into()),
            Message::CollectionBatch(Box::new(squat)),
        )
        .await;
    assert!(matches!(ack, Message::BatchAck { .. }), "{ack:?}");
    buy(&he, "box-000071", 3).await;
    assert!(eventually(|| all_completed(&he)).await);
    let real = p.close_batch().unwrap().unwrap();
    assert_eq!(real.batch, 1);
    // Its outbox delivers it (within a retry round) and clearing refuses it for good.
    assert!(
        eventually(|| Outbox::list(p.journal(), "clearing")
            .unwrap()
            .iter()
            .any(|(_, o)| matches!(o.state, OutState::Refused { .. })))
        .await
    );
    let (ps, funders) = (vec!["payment".to_string()], Vec::new());
    let breaks = reconcile(&Journals::find(&he.cfg, &[]).unwrap(), &ps, &funders).unwrap();
    for r in &real.records {
        assert!(
            breaks
                .iter()
                .any(|b| b.subject == r.transaction_id && b.what.contains("not cleared")),
            "{} not named: {breaks:?}",
            r.transaction_id
        );
    }
    let status = headend::status::report(&he.cfg.state_dir).unwrap();
    assert!(
        status.contains("OPERATOR: a collection batch clearing/batch-000001 was refused"),
        "{status}"
    );
    let e = p.ack_batch(1).unwrap_err();
    assert!(
        e.contains("ack-batch is for an acquirer without a clearing role"),
        "{e}"
    );
    he.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_are_closed_small_enough_for_one_frame() {
    const MAX_FRAME: usize = 2048;
    let he = start_roles_on(
        pg_rig::Backend::Sqlite,
        headend::assembly::Roles::ALL,
        |t| {
            // `[transport]` is not in the demo config: add it with a small frame limit.
            // (and a box that buys 40 times in a few seconds: lift the per-box offer rate).
        format!(
            "{t}\n[transport]\nmax_frame = {MAX_FRAME}\n\n[gateway.limits]\noffers_per_minute = 100000\nburst = 1000\n"
        )
        },
    )
    .await
    .unwrap();
    let spent = buy(&he, "box-000072", 40).await;
    assert!(eventually(|| all_completed(&he)).await);
    let p = he.running.payment.clone().unwrap();
    let mut batches = Vec::new();
    while let Some(b) = p.close_batch().unwrap() {
        batches.push(b);
    }
    assert!(
        batches.len() > 1,
        "40 purchases need several {MAX_FRAME}-byte frames"
    );
    for b in &batches {
        let size = Message::CollectionBatch(Box::new(b.clone()))
            .to_payload()
            .len();
        assert!(
            size <= MAX_FRAME * 9 / 10,
            "batch {} is {size} bytes",
            b.batch
        );
    }
    let records: usize = batches.iter().map(|b| b.records.len()).sum();
    let value: i128 = batches.iter().flat_map(|b| b.value().into_values()).sum();
    assert_eq!(
        (records, value),
        (40, i128::from(spent)),
        "every purchase in exactly one batch"
    );
    he.running.stop().await;
}
