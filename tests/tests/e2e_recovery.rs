//! Issue 11, scenario 1, end to end against the REAL head end: pcscd + vpcd with the card
//! served by `vcard attach-vpcd`, `headend all-in-one` on a loopback QUIC port, and `stbd`
//! with its TV UI in a tmux pane.
//!
//! - `paid_purchase_is_completed_from_the_box_journal_after_the_card_log_rolled_over`: stbd
//!   frozen by its test hook right after journaling the card's debit response and SIGKILLed;
//!   the card is taken out and buys 33 items elsewhere (another security card), so its
//!   32-record log no longer holds the first debit; the card goes back in and stbd
//!   restarts. The box re-sends the journaled debit response: the head end completes the
//!   purchase and the merchant releases once; no cancel is ever sent.
//!
//! Needs pcscd with vsmartcard-vpcd (started by scripts/start-pcscd.sh if it is not
//! running); `PURSELINK_SKIP_PCSC=1` skips. The tests take turns on the vpcd reader.

mod support;

use std::time::Instant;

use proto::apdu::CardApplication;
use proto::card::{LOG_CAPACITY, commands};
use proto::money::{Currency, Money};
use proto::purse::{Date, LogKind, PurchaseInit};
use proto::security_card::{DrawData, SecurityCard};
use reader_drivers::vcard::VirtualCard;
use support::*;

/// `n` purchases of `amount` on the card file, on another box with its own security card
/// (id 99, the same issuer): SELECT, INITIALIZE, the debit command, DEBIT.
fn purchases_elsewhere(w: &World, n: u32, amount: u64) {
    let keys = headend::config::load_issuer_keys(&w.he.join("issuer-keys.toml"))
        .expect("the deployment's issuer keys");
    let mut security_card = SecurityCard::new(99, keys.purchase());
    let mut card = VirtualCard::open(&w.card).expect("the card file");
    let today = Date::new(2026, 11, 22);
    let data = |r: Vec<u8>| {
        assert!(r.ends_with(&[0x90, 0x00]), "card refused: {r:02X?}");
        r[..r.len() - 2].to_vec()
    };
    for i in 0..n {
        data(card.process_apdu(&commands::select()));
        let init = PurchaseInit::decode(&data(card.process_apdu(&commands::init_purchase(today))))
            .expect("INITIALIZE answer");
        let auth = security_card
            .issue_debit(
                &DrawData {
                    merchant_id: "elsewhere".into(),
                    transaction_id: format!("elsewhere-{i}"),
                    amount: Money::new(amount, Currency::EUR),
                    init,
                },
                today,
                false,
            )
            .expect("debit command");
        data(card.process_apdu(&commands::debit(&auth.command)));
    }
}

#[test]
fn paid_purchase_is_completed_from_the_box_journal_after_the_card_log_rolled_over() {
    let t0 = Instant::now();
    let Some(mut w) = World::new(
        "ppv_kill_rolled",
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
    wait_hook(&w, HOOK_PAUSE_AFTER_DEBIT);
    let txns = w.stb_txns();
    assert_eq!(txns.len(), 1, "{txns:?}");
    let (txid, state) = txns[0].clone();
    assert_eq!(state, "debit_responded");
    sigkill_stbd(&w);

    // The viewer takes the card to another box and buys 33 items there.
    w.remove_card();
    purchases_elsewhere(&w, 33, 1);
    let card = w.card_state();
    assert_eq!(card.balance, START_BALANCE - PPV_PRICE - 33);
    assert_eq!(card.log.len(), LOG_CAPACITY);
    assert!(
        card.log.iter().all(|r| r.counterparty == 99),
        "the first debit is no longer in the card's log"
    );

    // The card comes back; stbd restarts.
    w.insert_card();
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
        tail(&w.stbd_log, 30)
    );
    eprintln!(
        "ppv_kill_rolled: completed {:?} after the restart",
        restarted.elapsed()
    );

    // Paid once, counted once, released once, never cancelled.
    let gw = w.headend_steps("gateway");
    assert!(
        !gw.iter()
            .any(|(t, s, _)| *t == txid && s.contains("cancel")),
        "no cancel for a paid purchase: {gw:?}"
    );
    let steps = w.headend_steps("payment");
    assert!(
        !steps
            .iter()
            .any(|(t, s, d)| *t == txid && (s.contains("cancel") || d.contains("cancel"))),
        "the payment server saw no cancel: {steps:?}"
    );
    let pay = w.payment_txns();
    assert_eq!(pay.len(), 1);
    assert_eq!(pay[0].transaction_id, txid);
    assert_eq!(pay[0].state, headend::payment::PayState::Completed);
    assert_eq!(w.security_card_total(), PPV_PRICE, "counted once");
    let releases = w.headend_state("merchant", "release");
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0].0, txid);
    let card = w.card_state();
    assert_eq!(card.balance, START_BALANCE - PPV_PRICE - 33);
    assert_eq!(
        card.log.iter().filter(|r| r.kind == LogKind::Debit).count(),
        LOG_CAPACITY
    );
    assert_eq!(w.stb_txns(), vec![(txid.clone(), "completed".to_string())]);
    eprintln!("ppv_kill_rolled: passed in {:?}", t0.elapsed());
}
