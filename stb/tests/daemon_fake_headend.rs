//! The daemon against the in-process `FakeHeadEnd` over real QUIC with mutual TLS, on a real
//! `VirtualCard` file behind the virtual reader driver, with a real SQLite journal.

mod support;

use proto::messages::CancelReason;
use stb::daemon::event::Event;
use stb::journal::Journal;
use stb_flow::purchase::Outcome;
use support::*;
use tokio::sync::oneshot;
use ui::RemoteKey;

async fn pay(b: &Box_) -> oneshot::Receiver<Outcome> {
    let (tx, rx) = oneshot::channel();
    b.events
        .send(Event::Pay {
            merchant_id: "cable".into(),
            item_id: "ppv-7".into(),
            reply: tx,
        })
        .await
        .unwrap();
    rx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purchase_ok_debits_once_and_back_leaves_everything_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(&pki, Quirks::default()).await;
    let card = card_file(dir.path());
    let cfg = config(dir.path(), &pki, fake.addr, &card, 5);
    let mut b = start_box(cfg, &card).await;
    b.until("card on the home screen", |s| s.card_balance == Some(1000))
        .await;

    // OK path.
    let rx = pay(&b).await;
    let s = b.until("the offer popup", |s| s.offer.is_some()).await;
    let txid = s.offer.unwrap();
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(
        matches!(out, Outcome::Paid { ref receipt, .. } if receipt.released),
        "{out:?}"
    );
    assert_eq!(balance(&card), 1000 - PRICE);
    assert_eq!(fake.released(&txid), 1);
    assert_eq!(fake.debit_responses(&txid), 1);
    b.until("new balance shown", |s| {
        s.card_balance == Some((1000 - PRICE) as i64)
    })
    .await;

    // BACK path: nothing moves, the offer is cancelled.
    let rx = pay(&b).await;
    let s = b.until("the second offer", |s| s.offer.is_some()).await;
    let tx2 = s.offer.unwrap();
    b.key(RemoteKey::Back).await;
    let out = rx.await.unwrap();
    assert!(matches!(out, Outcome::Cancelled { .. }), "{out:?}");
    assert_eq!(balance(&card), 1000 - PRICE);
    assert_eq!(fake.released(&tx2), 0);
    let cancels = fake.cancels();
    assert_eq!(cancels.len(), 1);
    assert_eq!(
        (cancels[0].transaction_id.as_str(), cancels[0].reason),
        (tx2.as_str(), CancelReason::Viewer)
    );
    b.stop().await;

    let j = Journal::open(&dir.path().join("state")).unwrap();
    assert_eq!(j.state(&txid).unwrap().as_deref(), Some("completed"));
    assert_eq!(
        j.steps(&txid).unwrap(),
        [
            "accepted",
            "draw_sent",
            "debit_command",
            "debit_sent",
            "debit_responded",
            "completed"
        ]
    );
    assert_eq!(
        j.state(&tx2).unwrap(),
        None,
        "a declined offer never reached the journal"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amount_mismatch_is_refused_before_the_card() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            inflate: 100,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let rx = pay(&b).await;
    let txid = b.until("offer", |s| s.offer.is_some()).await.offer.unwrap();
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(
        matches!(
            out,
            Outcome::Failed {
                refusal: stb_flow::show::Refusal::AmountMismatch { .. },
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(balance(&card), 1000);
    let c = fake.cancels();
    assert_eq!(c.len(), 1);
    assert_eq!(c[0].reason, CancelReason::AmountMismatch);
    assert!(
        c[0].proof.is_some(),
        "a fresh INITIALIZE proves the card did not debit"
    );
    b.until("error screen", |s| s.screen == ui::ScreenId::Error)
        .await;
    b.stop().await;
    let j = Journal::open(&dir.path().join("state")).unwrap();
    assert_eq!(j.state(&txid).unwrap().as_deref(), Some("ended"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_confirmation_is_resent_from_the_journal_and_settled_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            lose_first_receipt: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 1), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let rx = pay(&b).await;
    let txid = b.until("offer", |s| s.offer.is_some()).await.offer.unwrap();
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(matches!(out, Outcome::InDoubt { .. }), "{out:?}");
    assert_eq!(balance(&card), 1000 - PRICE);
    // The unanswered request dropped the connection; the reconnect (or the recovery timer)
    // re-sends the journaled debit response, without a restart.
    b.until("recovered", |s| s.recovered == 1).await;
    assert_eq!(fake.debit_responses(&txid), 2, "re-sent once");
    assert_eq!(fake.released(&txid), 1, "released exactly once");
    b.stop().await;

    // A restart finds nothing left to do.
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(b.status.borrow().recovered, 0);
    b.stop().await;
    assert_eq!(fake.debit_responses(&txid), 2);
    assert_eq!(balance(&card), 1000 - PRICE, "debited exactly once");
    let j = Journal::open(&dir.path().join("state")).unwrap();
    assert_eq!(j.state(&txid).unwrap().as_deref(), Some("completed"));
    assert!(j.in_doubt().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draw_without_debit_is_cancelled_with_proof_by_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            hang_draws: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 1), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let rx = pay(&b).await;
    let txid = b.until("offer", |s| s.offer.is_some()).await.offer.unwrap();
    b.key(RemoteKey::Ok).await;
    assert!(matches!(rx.await.unwrap(), Outcome::InDoubt { .. }));
    // Pull and reinsert the card: the insertion triggers recovery (if the reconnect after
    // the unanswered draw has not already).
    assert!(b.driver.remove());
    b.until("card gone", |s| s.card_balance.is_none()).await;
    b.driver
        .insert(reader_drivers::vcard::VirtualCard::open(&card).unwrap());
    b.until("recovered", |s| s.recovered == 1).await;
    let c = fake.cancels();
    assert_eq!(c.len(), 1);
    assert_eq!(
        (c[0].transaction_id.as_str(), c[0].reason),
        (txid.as_str(), CancelReason::NotDebited)
    );
    let proof = c[0].proof.as_ref().expect("proof");
    assert_eq!(proof.atc, 1, "the card's counter never moved");
    assert_eq!(balance(&card), 1000);
    b.stop().await;
}
