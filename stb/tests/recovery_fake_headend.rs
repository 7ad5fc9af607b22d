//! Issue 11, box side: recovery of in-doubt purchases and loads, the daemon in process against
//! the `FakeHeadEnd` (a fake: see `support`) over real QUIC with mutual TLS, on a real
//! `VirtualCard` file behind the virtual reader driver, with a real SQLite journal. "Killed"
//! means the daemon task is aborted mid-transaction, as SIGKILL would leave it (the journal
//! and the card file are what survives).
//!
//! - scenario 1: the journaled debit response is re-sent after the card's log rolled over;
//!   never a cancel;
//! - scenario 2: a draw that never got its debit command is cancelled with the card's proof,
//!   not matched to the next purchase's debit with the same counter;
//! - the recovery timer resolves an in-doubt purchase and load while the connection stays up;
//! - the TV answers the remote while a recovery call is outstanding;
//! - a new purchase waits for, and is refused while, an older one on the card is resolvable;
//! - the gateway client's deadline: a head end killed and restarted on the same port is
//!   reached again within seconds, not after the idle timeout;
//! - `ProofRejected` ends a purchase only when DEBIT never went out; otherwise it is
//!   `unresolvable` (never ended) and does not block the card; `AlreadyCompleted` without a
//!   debit response is `unresolvable` too.

mod support;

use std::time::{Duration, Instant};

use proto::messages::{CancelReason, Message};
use stb::daemon::event::Event;
use stb::journal::Journal;
use stb_flow::purchase::Outcome;
use stb_flow::show::Refusal;
use support::*;
use tokio::sync::oneshot;
use ui::{RemoteKey, ScreenId};

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

/// A purchase by the viewer up to OK; returns its transaction id and the outcome to come.
async fn buy(b: &mut Box_) -> (String, oneshot::Receiver<Outcome>) {
    let rx = pay(b).await;
    let txid = b
        .until("the offer popup", |s| s.offer.is_some())
        .await
        .offer
        .unwrap();
    b.key(RemoteKey::Ok).await;
    (txid, rx)
}

async fn outcome(rx: oneshot::Receiver<Outcome>) -> Outcome {
    tokio::time::timeout(Duration::from_secs(10), rx)
        .await
        .expect("an outcome within 10 s")
        .expect("the daemon answered")
}

fn journal(dir: &std::path::Path) -> Journal {
    Journal::open(&dir.join("state")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_1_the_journaled_debit_response_is_resent_after_the_card_log_rolled_over() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            hang_debit_responses: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let (txid, _rx) = buy(&mut b).await;
    // Box 1 debits the card and journals the debit response; the head end has not answered.
    eventually("the debit response journaled", 5, || {
        (state_of(dir.path(), &txid).as_deref() == Some("debit_responded")).then_some(())
    })
    .await;
    b.kill().await;
    assert_eq!(balance(&card), 1000 - PRICE, "the card paid");

    // The viewer buys 33 items on another box: the card's 32-record log no longer holds it.
    purchases_elsewhere(&card, 33, 1);
    let log = reader_drivers::vcard::VirtualCard::open(&card)
        .unwrap()
        .state()
        .log
        .clone();
    assert_eq!(log.len(), 32);
    assert!(
        log.iter().all(|r| r.counterparty == 88),
        "the first debit rolled out of the log"
    );

    // Box 1 restarts with the card back in its reader.
    fake.set(|q| q.hang_debit_responses = false);
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("recovered", |s| s.recovered == 1).await;
    assert!(
        fake.cancels().is_empty(),
        "a paid purchase is never cancelled: {:?}",
        fake.cancels()
    );
    assert_eq!(fake.debit_responses(&txid), 1, "the journaled response");
    assert_eq!(fake.released(&txid), 1, "the goods are released");
    assert_eq!(balance(&card), 1000 - PRICE - 33);
    b.stop().await;
    assert_eq!(state_of(dir.path(), &txid).as_deref(), Some("completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_2_a_draw_without_debit_is_cancelled_with_proof_not_matched_by_counter() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    // The payment role is "down": draws are never answered, settling messages get Busy.
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            hang_draws: true,
            busy: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 1), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let (a, rx) = buy(&mut b).await;
    assert!(matches!(outcome(rx).await, Outcome::InDoubt { .. }));
    b.kill().await;
    let pending = journal(dir.path()).in_doubt().unwrap();
    assert_eq!(pending.len(), 1);
    assert!(!pending[0].txn.debit_sent && pending[0].txn.security_card.is_none());
    let a_atc = pending[0].txn.atc;

    // Purchase B (4.99) on the same card debits with the same counter.
    purchases_elsewhere(&card, 1, 499);
    let log = reader_drivers::vcard::VirtualCard::open(&card)
        .unwrap()
        .state()
        .log
        .clone();
    assert_eq!(log.len(), 1);
    assert_eq!(log[0].atc, a_atc, "B used A's counter");

    // The payment role is back; the box restarts.
    fake.set(|q| {
        q.hang_draws = false;
        q.busy = false;
    });
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("recovered", |s| s.recovered == 1).await;
    b.stop().await;
    assert_eq!(state_of(dir.path(), &a).as_deref(), Some("ended"));
    let steps = journal(dir.path()).steps(&a).unwrap();
    assert!(
        !steps.iter().any(|s| s == "debit_responded"),
        "B's debit is not journaled under A: {steps:?}"
    );
    assert_eq!(fake.debit_responses(&a), 0, "no debit response sent for A");
    // Every cancel for A says "not debited" with a proof; the restarted box's proof is a
    // fresh INITIALIZE after B (the killed box's task may have got one out before it died).
    let cancels: Vec<_> = fake
        .cancels()
        .into_iter()
        .filter(|c| c.transaction_id == a)
        .collect();
    assert!(
        cancels
            .iter()
            .all(|c| c.reason == CancelReason::NotDebited && c.proof.is_some()),
        "{cancels:?}"
    );
    // The restarted box's cancel is either a fresh INITIALIZE after B (counter a_atc + 1) or,
    // when the killed box had journaled its cancel before it died, that same cancel re-sent
    // unchanged (counter a_atc, taken before B: it still proves A's session ended undebited;
    // a retry must be identical).
    assert!(
        cancels.iter().all(|c| c
            .proof
            .as_ref()
            .is_some_and(|p| p.atc == a_atc || p.atc == a_atc + 1)),
        "{cancels:?}"
    );
    let last = cancels.last().expect("a cancel for A");
    assert!(
        last.proof.as_ref().is_some_and(|p| p.atc == a_atc + 1)
            || cancels[..cancels.len() - 1].contains(last),
        "the restarted box cancelled with a fresh INITIALIZE or re-sent the journaled one: \
         {cancels:?}"
    );
    assert_eq!(balance(&card), 1000 - 499, "only B was paid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_recovery_timer_resolves_an_in_doubt_purchase_and_load_on_a_live_connection() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            busy: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    // An in-doubt load of another card, with its zero-value proof journaled.
    journal_pending_load(dir.path(), "ld-1", 777);
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    // The head end answers Busy: the purchase goes in doubt with its response journaled.
    let (txid, rx) = buy(&mut b).await;
    assert!(matches!(outcome(rx).await, Outcome::InDoubt { .. }));
    assert_eq!(
        state_of(dir.path(), &txid).as_deref(),
        Some("debit_responded")
    );
    // Busy for a while, the connection up: the box keeps retrying both on its timer.
    eventually("retries of the purchase and the load", 10, || {
        (fake.received(&txid) >= 3 && fake.received("ld-1") >= 3).then_some(())
    })
    .await;
    assert_eq!(b.status.borrow().recovered, 0);
    fake.set(|q| q.busy = false);
    b.until("both resolved", |s| s.recovered == 2).await;
    assert_eq!(fake.connections(), 1, "no reconnect");
    assert_eq!(fake.released(&txid), 1);
    assert_eq!(fake.debit_responses(&txid), 1);
    assert_eq!(balance(&card), 1000 - PRICE);
    b.stop().await;
    let j = journal(dir.path());
    assert_eq!(j.state(&txid).unwrap().as_deref(), Some("completed"));
    assert_eq!(
        j.load_state("ld-1").unwrap().as_deref(),
        Some("load_completed")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tv_answers_the_remote_while_a_recovery_call_is_outstanding() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            busy: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 10), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let (txid, rx) = buy(&mut b).await;
    assert!(matches!(outcome(rx).await, Outcome::InDoubt { .. }));
    // The head end will answer, slowly.
    fake.set(|q| {
        q.busy = false;
        q.answer_delay = Duration::from_secs(4);
    });
    // Pull and reinsert the card: a recovery round re-sends the debit response (or the
    // timer's round already has); the head end holds the answer.
    assert!(b.driver.remove());
    b.until("card gone", |s| s.card_balance.is_none()).await;
    b.driver
        .insert(reader_drivers::vcard::VirtualCard::open(&card).unwrap());
    eventually("a re-sent debit response held at the head end", 5, || {
        (fake.holding() >= 1).then_some(())
    })
    .await;
    // While its answer is held, the viewer presses yellow (history).
    let t = Instant::now();
    b.key(RemoteKey::Yellow).await;
    let shown = tokio::time::timeout(
        Duration::from_secs(1),
        b.status.wait_for(|s| s.screen == ScreenId::History),
    )
    .await
    .is_ok_and(|r| r.is_ok());
    assert!(
        shown,
        "no history screen within 1 s while recovery waited on the head end"
    );
    assert_eq!(
        fake.released(&txid),
        0,
        "the recovery answer was still held"
    );
    eprintln!("history shown after {:?}", t.elapsed());
    b.until("recovered", |s| s.recovered == 1).await;
    assert_eq!(fake.released(&txid), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_purchase_waits_for_an_older_resolvable_one_on_the_same_card() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            busy: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;
    let (a, rx) = buy(&mut b).await;
    assert!(matches!(outcome(rx).await, Outcome::InDoubt { .. }));
    let offers = fake.offers();

    // A still in doubt (the head end busy): B is refused, before any offer.
    let out = outcome(pay(&b).await).await;
    match &out {
        Outcome::Failed {
            refusal: refusal @ Refusal::EarlierInDoubt { transaction_id, .. },
            ..
        } => {
            assert_eq!(transaction_id, &a, "names the older one");
            let reason = stb::daemon::show::refusal_reason(refusal);
            assert!(reason.contains(&a), "names the older one: {reason}");
            assert!(reason.contains("still being settled"), "{reason}");
        }
        o => panic!("B must be refused while A is in doubt: {o:?}"),
    }
    assert_eq!(fake.offers(), offers, "B never asked for an offer");
    assert_eq!(balance(&card), 1000 - PRICE);

    // The head end answers again: B first settles A, then goes ahead.
    fake.set(|q| q.busy = false);
    let (b_tx, rx) = buy(&mut b).await;
    assert_eq!(
        state_of(dir.path(), &a).as_deref(),
        Some("completed"),
        "A settled before B's offer"
    );
    assert!(matches!(outcome(rx).await, Outcome::Paid { .. }));
    assert_ne!(a, b_tx);
    assert_eq!(balance(&card), 1000 - 2 * PRICE);
    assert_eq!(fake.released(&a), 1);
    assert_eq!(fake.released(&b_tx), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_head_end_killed_and_restarted_on_the_same_port_is_reached_again_within_seconds() {
    use stb::daemon::gateway::{Gateway, client_config};
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(&pki, Quirks::default()).await;
    let addr = fake.addr;
    let card = card_file(dir.path());
    let cfg = config(dir.path(), &pki, addr, &card, 2);
    let s = stb::daemon::gateway_settings(&cfg);
    let gw = Gateway::new(
        client_config(
            &cfg.headend.operator_ca,
            &cfg.headend.device_cert,
            &cfg.headend.device_key,
            &s,
        )
        .unwrap(),
        s,
    )
    .unwrap();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let keeper = tokio::spawn(gw.clone().keep(|| {}, stop_rx));
    assert!(matches!(
        gw.call(&Message::CatalogRequest).await,
        Ok(Message::Catalog(_))
    ));

    // SIGKILL of the head end, restarted on the same port: it knows nothing of the box's
    // connection, and the box is not told.
    fake.kill();
    let fake = FakeHeadEnd::start_on(&pki, Quirks::default(), addr).await;
    let t0 = Instant::now();
    let mut failures = Vec::new();
    loop {
        match gw.call(&Message::CatalogRequest).await {
            Ok(Message::Catalog(_)) => break,
            other => failures.push(format!("{:?}: {other:?}", t0.elapsed())),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "still unreachable: {failures:?}"
        );
    }
    let took = t0.elapsed();
    eprintln!("reached again after {took:?}; failures before: {failures:?}");
    assert!(
        took < Duration::from_secs(6),
        "the restarted head end took {took:?} (request timeout 2 s): {failures:?}"
    );
    assert!(
        failures.len() <= 1,
        "at most the one request that hit the deadline: {failures:?}"
    );
    assert_eq!(fake.books.lock().unwrap().catalog_requests, 1);
    let _ = stop_tx.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), keeper).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_proof_ends_only_what_never_debited_and_the_rest_is_unresolvable_not_ended() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            reject_proofs: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    // "never": drawn, no debit command. "sent": DEBIT went to the card, its answer was not
    // journaled, and the card's log has no such debit.
    journal_pending_purchase(dir.path(), "never", false, 0);
    journal_pending_purchase(dir.path(), "sent", true, 900);
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("both settled as far as this box can", |s| {
        s.recovered == 1 && s.unresolvable == 1
    })
    .await;
    let j = journal(dir.path());
    assert_eq!(j.state("never").unwrap().as_deref(), Some("ended"));
    assert_eq!(j.state("sent").unwrap().as_deref(), Some("unresolvable"));
    assert!(!j.steps("sent").unwrap().iter().any(|s| s == "ended"));
    let u = j.unresolvable().unwrap();
    assert_eq!(u.len(), 1);
    assert!(
        u[0].1.contains("rejected") && u[0].1.contains("reaches back to counter 1"),
        "the reason says why: {}",
        u[0].1
    );
    assert!(j.in_doubt().unwrap().is_empty());
    drop(j);
    // It does not block the card: a new purchase goes through.
    let (txid, rx) = buy(&mut b).await;
    assert!(matches!(outcome(rx).await, Outcome::Paid { .. }));
    assert_eq!(fake.released(&txid), 1);
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn already_completed_without_any_debit_response_is_unresolvable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(
        &pki,
        Quirks {
            already_completed: true,
            ..Quirks::default()
        },
    )
    .await;
    let card = card_file(dir.path());
    journal_pending_purchase(dir.path(), "sent", true, 900);
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("unresolvable", |s| s.unresolvable == 1).await;
    b.stop().await;
    let j = journal(dir.path());
    assert_eq!(j.state("sent").unwrap().as_deref(), Some("unresolvable"));
    let u = j.unresolvable().unwrap();
    assert!(u[0].1.contains("completed"), "{}", u[0].1);
    assert_eq!(
        fake.cancels().len(),
        0,
        "the fake records no refused cancel"
    );
    assert_eq!(
        fake.received("sent"),
        1,
        "one cancel, answered AlreadyCompleted"
    );
}
