//! Issue 6, "Must show" 2 and 3, end to end against the REAL head end: pcscd + vpcd with the
//! card served by `vcard attach-vpcd`, `headend all-in-one` (gateway, payment, merchant on
//! SQLite) on a loopback QUIC port, and `stbd` with its TV UI in an 80×24 tmux pane, driven
//! with `send-keys` and read with `capture-pane`.
//!
//! - `ppv_purchase_with_ok_debits_the_card_and_releases_the_event`: catalog → event → OK;
//!   the offer and the receipt are on screen; the card lost exactly the price; the merchant
//!   journal holds the entitlement.
//! - `back_on_the_offer_leaves_everything_untouched`: BACK on the offer; the cancel reaches
//!   the gateway; card, payment server and merchant are unchanged.
//! - `stbd_sigkilled_between_debit_and_confirmation_completes_once_after_restart`: stbd
//!   frozen by its test hook right after journaling the card's debit response, SIGKILLed,
//!   restarted: recovery re-sends the response; paid once, released once.
//! - `stbd_sigkilled_before_debit_cancels_with_proof_after_restart`: frozen after journaling
//!   DebitSent, before DEBIT reaches the card; after the restart the box cancels with the
//!   card's INITIALIZE as proof, the real payment server verifies it and reverses.
//!
//! Needs pcscd with vsmartcard-vpcd (started by scripts/start-pcscd.sh if it is not
//! running); `PURSELINK_SKIP_PCSC=1` skips. The tests take turns on the vpcd reader.

mod support;

use std::time::Instant;

use proto::purse::LogKind;
use support::*;

/// The receipt's "Reference" line on the screen: the transaction id.
fn reference(screen: &str) -> String {
    screen
        .lines()
        .find_map(|l| {
            let i = l.find("Reference")?;
            l[i + "Reference".len()..]
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("no Reference on the receipt:\n{screen}"))
}

#[test]
fn ppv_purchase_with_ok_debits_the_card_and_releases_the_event() {
    let t0 = Instant::now();
    let Some(mut w) = World::new(
        "ppv_ok",
        Options {
            local_api: false,
            ..Options::default()
        },
    ) else {
        return;
    };
    let home = w.start_stbd(None);
    assert!(home.contains("50.00 EUR"), "opening balance shown:\n{home}");

    let offer = w.open_ppv_offer();
    assert!(offer.contains(PPV_TITLE), "{offer}");
    assert!(offer.contains("4.99 EUR"), "the price:\n{offer}");
    assert!(offer.contains("50.00 EUR"), "the balance now:\n{offer}");
    assert!(offer.contains("45.01 EUR"), "the balance after:\n{offer}");
    assert_eq!(
        w.card_state().balance,
        START_BALANCE,
        "nothing moves before OK"
    );

    w.tv().keys(&["Enter"]); // OK: pay
    let receipt = w
        .tv()
        .wait_screen("the receipt", |s| s.contains("Purchase complete"));
    assert!(receipt.contains(PPV_TITLE), "{receipt}");
    assert!(receipt.contains("4.99 EUR"), "{receipt}");
    assert!(receipt.contains("45.01 EUR"), "new balance:\n{receipt}");
    let txid = reference(&receipt);

    // The card: exactly the price, one debit in its log.
    let card = w.card_state();
    assert_eq!(
        card.balance,
        START_BALANCE - PPV_PRICE,
        "card debited by the price"
    );
    let debits: Vec<_> = card
        .log
        .iter()
        .filter(|r| r.kind == LogKind::Debit)
        .collect();
    assert_eq!(debits.len(), 1, "one debit on the card: {:?}", card.log);
    assert_eq!(debits[0].amount, PPV_PRICE);

    // The head end: the merchant released the event to this box, once.
    let releases = w.headend_state("merchant", "release");
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0].0, txid);
    let entitlement = String::from_utf8(releases[0].1.clone()).unwrap();
    assert_eq!(entitlement, format!("{BOX_ID}/{PPV_ITEM}/{txid}"));
    let ents = w.headend_state("merchant", "entitlement");
    assert!(
        ents.iter()
            .any(|(k, v)| *k == entitlement && v.as_slice() == txid.as_bytes()),
        "the entitlement is recorded: {ents:?}"
    );
    assert_eq!(w.count_steps("merchant", &txid, "goods released"), 1);
    let txns = w.payment_txns();
    assert_eq!(txns.len(), 1);
    assert_eq!(txns[0].state, headend::payment::PayState::Completed);
    assert_eq!(w.security_card_total(), PPV_PRICE);
    // The box's journal closed it.
    assert_eq!(w.stb_txns(), vec![(txid.clone(), "completed".to_string())]);

    // OK on the receipt: home, with the new balance.
    w.tv().keys(&["Enter"]);
    w.tv().wait_screen("home with the new balance", |s| {
        s.contains("Smart card") && s.contains("45.01 EUR")
    });
    eprintln!("ppv_ok: passed in {:?}", t0.elapsed());
}

#[test]
fn back_on_the_offer_leaves_everything_untouched() {
    let t0 = Instant::now();
    let Some(mut w) = World::new(
        "ppv_back",
        Options {
            local_api: false,
            ..Options::default()
        },
    ) else {
        return;
    };
    w.start_stbd(None);
    let before = w.card_state();
    let offer = w.open_ppv_offer();
    assert!(offer.contains("4.99 EUR"), "{offer}");

    w.tv().keys(&["BSpace"]); // BACK
    w.tv()
        .wait_screen("the offer gone", |s| !s.contains("Confirm purchase"));
    // The viewer's cancel reaches the head end (the gateway journals it).
    let cancelled = poll(STEP, || {
        w.headend_steps("gateway")
            .into_iter()
            .find(|(_, s, _)| s == "cancelled before the draw")
    });
    let (txid, _, _) = cancelled.unwrap_or_else(|| {
        panic!(
            "no viewer cancel at the gateway; its steps: {:?}",
            w.headend_steps("gateway")
        )
    });
    // ... and the box has finished the flow (back to the catalog or home).
    w.tv().wait_screen("the catalog or home again", |s| {
        (s.contains("Catalog") || s.contains("Smart card")) && !s.contains("Please wait")
    });

    let after = w.card_state();
    assert_eq!(after.balance, before.balance, "balance untouched");
    assert_eq!(after.log, before.log, "no new card log record");
    let gw = w.headend_steps("gateway");
    assert!(
        gw.iter().all(|(t, s, _)| t != &txid
            || s == "offer relayed"
            || s == "cancelled before the draw"),
        "only the offer and its cancel went through the gateway: {gw:?}"
    );
    assert!(
        w.payment_txns().is_empty(),
        "the payment server has no debit"
    );
    assert_eq!(w.security_card_total(), 0);
    assert!(
        w.headend_state("merchant", "release").is_empty(),
        "no release"
    );
    assert!(w.headend_state("merchant", "entitlement").is_empty());
    assert!(
        w.stb_txns().is_empty(),
        "nothing in the box's journal: {:?}",
        w.stb_txns()
    );
    eprintln!("ppv_back: passed in {:?}", t0.elapsed());
}

#[test]
fn stbd_sigkilled_between_debit_and_confirmation_completes_once_after_restart() {
    let t0 = Instant::now();
    let Some(mut w) = World::new(
        "ppv_kill",
        Options {
            local_api: false,
            ..Options::default()
        },
    ) else {
        return;
    };
    w.start_stbd(Some(HOOK_PAUSE_AFTER_DEBIT));
    w.open_ppv_offer();
    w.tv().keys(&["Enter"]); // OK: pay

    // The hook froze stbd right after journaling the card's debit response.
    wait_hook(&w, HOOK_PAUSE_AFTER_DEBIT);
    // The window: the card has paid, the box journaled it, the head end has not heard back.
    let txns = w.stb_txns();
    assert_eq!(txns.len(), 1, "{txns:?}");
    let (txid, state) = txns[0].clone();
    assert_eq!(state, "debit_responded");
    assert_eq!(
        w.card_state().balance,
        START_BALANCE - PPV_PRICE,
        "the card debited"
    );
    let pay = w.payment_txns();
    assert_eq!(pay.len(), 1);
    assert_eq!(pay[0].state, headend::payment::PayState::DebitIssued);
    assert_eq!(w.count_steps("gateway", &txid, "confirmation received"), 0);
    assert!(w.headend_state("merchant", "release").is_empty());

    sigkill_stbd(&w);

    // Restart without the hook: on start and card insertion it resolves the journal.
    let restarted = Instant::now();
    w.start_stbd(None);
    let done = poll(STEP, || {
        let released = !w.headend_state("merchant", "release").is_empty();
        let closed = w.stb_txns().iter().all(|(_, s)| s == "completed");
        (released && closed).then_some(())
    });
    assert!(
        done.is_some(),
        "not completed after the restart: box {:?}, payment {:?}\n{}",
        w.stb_txns(),
        w.payment_txns()
            .iter()
            .map(|t| &t.state)
            .collect::<Vec<_>>(),
        tail(&w.stbd_log, 20)
    );
    eprintln!(
        "ppv_kill: recovered {:?} after the restart",
        restarted.elapsed()
    );
    w.tv()
        .wait_screen("home with the balance after one purchase", |s| {
            s.contains("Smart card") && s.contains("45.01 EUR")
        });

    // Exactly once, everywhere.
    let card = w.card_state();
    assert_eq!(card.balance, START_BALANCE - PPV_PRICE, "paid once");
    assert_eq!(
        card.log.iter().filter(|r| r.kind == LogKind::Debit).count(),
        1,
        "{:?}",
        card.log
    );
    let pay = w.payment_txns();
    assert_eq!(pay.len(), 1);
    assert_eq!(pay[0].transaction_id, txid);
    assert_eq!(pay[0].state, headend::payment::PayState::Completed);
    assert_eq!(w.security_card_total(), PPV_PRICE, "counted once");
    assert_eq!(
        w.count_steps("gateway", &txid, "confirmation received"),
        1,
        "the debit response was confirmed at the head end once (the recovery's re-send)"
    );
    let releases = w.headend_state("merchant", "release");
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0].0, txid);
    assert_eq!(
        w.count_steps("merchant", &txid, "goods released"),
        1,
        "released once"
    );
    assert_eq!(w.stb_txns(), vec![(txid.clone(), "completed".to_string())]);
    eprintln!("ppv_kill: passed in {:?}", t0.elapsed());
}

#[test]
fn stbd_sigkilled_before_debit_cancels_with_proof_after_restart() {
    let t0 = Instant::now();
    let Some(mut w) = World::new(
        "ppv_kill_undebited",
        Options {
            local_api: false,
            ..Options::default()
        },
    ) else {
        return;
    };
    w.start_stbd(Some(HOOK_PAUSE_BEFORE_DEBIT));
    w.open_ppv_offer();
    w.tv().keys(&["Enter"]); // OK: pay
    // Frozen with the debit command journaled and DEBIT not yet sent to the card.
    wait_hook(&w, HOOK_PAUSE_BEFORE_DEBIT);
    let txns = w.stb_txns();
    assert_eq!(txns.len(), 1, "{txns:?}");
    let (txid, state) = txns[0].clone();
    assert_eq!(state, "debit_sent");
    let pay = w.payment_txns();
    assert_eq!(pay.len(), 1);
    assert_eq!(pay[0].state, headend::payment::PayState::DebitIssued);
    sigkill_stbd(&w);

    // Restarted, stbd finds the card's log without this debit and cancels with the card's
    // INITIALIZE as proof; the real payment server verifies it and reverses.
    w.start_stbd(None);
    let reversed = poll(STEP, || {
        let p = w.payment_txns();
        (p.len() == 1 && p[0].state == headend::payment::PayState::Reversed).then_some(())
    });
    assert!(
        reversed.is_some(),
        "not reversed after the restart: payment {:?}, box {:?}\n{}",
        w.payment_txns()
            .iter()
            .map(|t| &t.state)
            .collect::<Vec<_>>(),
        w.stb_txns(),
        tail(&w.stbd_log, 20)
    );
    let steps = w.headend_steps("payment");
    assert!(
        steps.iter().any(|(t, _, d)| *t == txid
            && d.contains("NotDebited")
            && d.contains("card counter proves no debit")),
        "the payment server verified the box's proof: {steps:?}"
    );
    let closed = poll(STEP, || {
        (w.stb_txns() == vec![(txid.clone(), "ended".to_string())]).then_some(())
    });
    assert!(closed.is_some(), "box journal: {:?}", w.stb_txns());
    let card = w.card_state();
    assert_eq!(card.balance, START_BALANCE, "never debited");
    assert!(
        card.log.iter().all(|r| r.kind != LogKind::Debit),
        "{:?}",
        card.log
    );
    assert_eq!(w.security_card_total(), 0, "nothing counted");
    assert!(
        w.headend_state("merchant", "release").is_empty(),
        "nothing released"
    );
    w.tv().wait_screen("home with the balance untouched", |s| {
        s.contains("Smart card") && s.contains("50.00 EUR")
    });
    eprintln!("ppv_kill_undebited: passed in {:?}", t0.elapsed());
}

/// The gateway requests stbd's log says it sent (the quoted message kind after "to the
/// gateway" in its info lines) in `log`, in order.
fn requests_sent(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find("to the gateway \"")? + "to the gateway \"".len()..];
            Some(rest[..rest.find('"')?].to_string())
        })
        .collect()
}

/// Issue 14, "time from OK to receipt": the offer of the item the catalog's cursor rests on
/// is asked for ahead of OK (stbd's offer prefetch), so OK on the item shows the offer
/// without a request of its own, and from there to the receipt only the draw request and
/// the debit response go to the gateway — counted from stbd's own log, and the gateway saw
/// one offer for the purchase.
#[test]
fn a_prefetched_offer_leaves_only_draw_and_debit_response_between_ok_and_receipt() {
    let t0 = Instant::now();
    let Some(mut w) = World::new(
        "ppv_prefetch",
        Options {
            local_api: false,
            ..Options::default()
        },
    ) else {
        return;
    };
    w.start_stbd(None);
    let tv = w.tv();
    tv.keys(&["1"]); // home: the catalog, its cursor on the first event
    tv.wait_screen("the catalog with the event", |s| {
        s.contains("Catalog") && s.contains(PPV_TITLE)
    });
    let prefetched = poll(STEP, || {
        w.stbd_log().contains("offer prefetched").then_some(())
    });
    assert!(
        prefetched.is_some(),
        "stbd never prefetched the highlighted event's offer:\n{}",
        tail(&w.stbd_log, 30)
    );
    let before = w.stbd_log().len();
    tv.keys(&["Enter"]); // OK on the event
    let offer = w.wait_offer();
    assert!(offer.contains("4.99 EUR"), "{offer}");
    tv.keys(&["Enter"]); // OK on the offer: pay
    let receipt = tv.wait_screen("the receipt", |s| s.contains("Purchase complete"));
    let txid = reference(&receipt);
    let log = w.stbd_log();
    assert!(
        log[before..].contains("answered by the prefetched offer"),
        "the flow did not use the prefetched offer:\n{}",
        &log[before..]
    );
    assert_eq!(
        requests_sent(&log[before..]),
        vec!["a draw request", "a debit response"],
        "from OK on the item to the receipt:\n{}",
        &log[before..]
    );
    assert_eq!(
        w.count_steps("gateway", &txid, "offer relayed"),
        1,
        "one offer for the purchase"
    );
    assert_eq!(w.card_state().balance, START_BALANCE - 499, "paid once");
    eprintln!("ppv_prefetch: passed in {:?}", t0.elapsed());
}
