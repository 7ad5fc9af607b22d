//! The deterministic in-process pair (`sim::pair`): the real box core (`stb_flow`) with its
//! card and `stbd`'s journal against the head end's roles in process. Every purchase
//! embodiment (FIG. 4–7, FIG. 8 on and off), both loads, the viewer's cancels, and the
//! loss, duplication, delay and tampering of messages with box crashes and recovery from
//! the journal, back ends down (`Busy`) and head-end restarts.
//! Each test ends with the conservation check (`Ledger::assert_conserved`): the card's
//! balance + the security-card totals + the merchant's releases agree, and for loads the
//! card's credit = the funding accounts' debit = the floats' gain = the HSM's total, with no
//! hold, purchase or box transaction left open.

use proto::card::{INS_DEBIT, INS_LOAD};
use proto::messages::{CancelReason, Message, Protected};
use sim::pair::{BackEnd, Ended, Failure, LOST_AFTER, Leg, Pair, PairOptions, Viewer};
use stb_flow::load::Outcome as LoadOutcome;
use stb_flow::purchase::Outcome as PurchaseOutcome;
use stb_flow::show::{Doubt, Refusal, Show};
use stb_flow::{CardFailure, NetworkFailure};

const START: u64 = 10_000;

fn paid(out: &Option<Ended>) -> bool {
    matches!(out, Some(Ended::Purchase(PurchaseOutcome::Paid { receipt, .. })) if receipt.released)
}

fn txid_of(p: &Pair) -> String {
    match p.last_outcome() {
        Some(Ended::Purchase(
            PurchaseOutcome::Paid { transaction_id, .. }
            | PurchaseOutcome::InDoubt { transaction_id, .. },
        )) => transaction_id.clone(),
        Some(Ended::Load(
            LoadOutcome::Loaded { transaction_id, .. }
            | LoadOutcome::NotLoaded { transaction_id }
            | LoadOutcome::InDoubt { transaction_id, .. },
        )) => transaction_id.clone(),
        other => panic!("no transaction id in {other:?}"),
    }
}

/// Starts a purchase and drives it to the offer popup, then OK: the flow's next request is
/// in the queue.
fn accepted(p: &mut Pair, merchant: &str, item: &str) {
    p.start_purchase(merchant, item);
    p.drive();
    p.viewer(Viewer::Accept);
}

/// Starts a bank load of `amount` and drives it to the point where the PIN went in.
fn load_entered(p: &mut Pair, amount: i64) {
    p.start_load(Pair::bank_source());
    p.drive();
    p.viewer(Viewer::Amount(amount));
    let pin = p.pin().to_string();
    p.viewer(Viewer::Pin(pin));
}

fn full_purchase(embodiment: &str, layer: bool, merchant: &str, item: &str, price: u64) {
    let mut p = Pair::with(embodiment, layer);
    let out = p.buy(merchant, item);
    assert!(paid(&out), "{embodiment}/{layer}: {out:?}");
    let txid = txid_of(&p);
    assert_eq!(p.card_balance(), START - price, "{embodiment}/{layer}");
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("completed"));
    let l = p.assert_conserved();
    assert_eq!(l.sold, price, "{embodiment}/{layer}: {l:?}");
    assert_eq!(l.released, price);
    if embodiment == "gateway" {
        let steps = p.head_end.gateway.journal().steps(&txid).unwrap();
        assert!(
            steps.iter().any(|s| s == "gateway compared: match"),
            "{steps:?}"
        );
    }
}

#[test]
fn fig4_security_card_compares() {
    full_purchase("security-card", true, "CABLE", "ppv-1001", 499);
}

#[test]
fn fig5_payment_server_compares() {
    full_purchase("payment-server", true, "M-WEBSHOP", "ebook-1", 1250);
}

#[test]
fn fig6_gateway_compares() {
    full_purchase("gateway", true, "CABLE", "shop-2001", 2995);
}

#[test]
fn fig7_merchant_compares() {
    full_purchase("merchant", true, "M-WEBSHOP", "ebook-1", 1250);
}

#[test]
fn fig8_layer_off_in_every_embodiment() {
    for emb in ["security-card", "payment-server", "gateway", "merchant"] {
        full_purchase(emb, false, "CABLE", "ppv-1002", 399);
    }
}

#[test]
fn bank_load_with_pin() {
    let mut p = Pair::new(PairOptions::default());
    let out = p.load(Pair::bank_source(), 2_000);
    assert!(
        matches!(&out, Some(Ended::Load(LoadOutcome::Loaded { new_balance, .. })) if *new_balance == START + 2_000),
        "{out:?}"
    );
    assert_eq!(p.card_balance(), START + 2_000);
    let l = p.assert_conserved();
    assert_eq!(
        (l.loaded, l.funders_debited, l.float),
        (2_000, 2_000, 2_000)
    );
}

#[test]
fn voucher_load() {
    let mut p = Pair::new(PairOptions::default());
    let source = p.voucher_source();
    let out = p.load(source, 10_000);
    assert!(
        matches!(&out, Some(Ended::Load(LoadOutcome::Loaded { .. }))),
        "{out:?}"
    );
    assert_eq!(p.card_balance(), START + 10_000);
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 10_000);
}

#[test]
fn a_load_then_purchases_in_two_embodiments_share_one_ledger() {
    let mut p = Pair::with("gateway", true);
    let out = p.load(Pair::bank_source(), 1_000);
    assert!(matches!(out, Some(Ended::Load(LoadOutcome::Loaded { .. }))));
    assert!(paid(&p.buy("CABLE", "ppv-1001")));
    assert!(paid(&p.buy("M-WEBSHOP", "ebook-1")));
    assert_eq!(p.card_balance(), START + 1_000 - 499 - 1_250);
    let l = p.assert_conserved();
    assert_eq!((l.loaded, l.sold), (1_000, 1_749));
}

#[test]
fn viewer_cancels_before_the_debit() {
    for timeout in [false, true] {
        let mut p = Pair::new(PairOptions::default());
        p.start_purchase("CABLE", "ppv-1001");
        p.drive();
        p.viewer(Viewer::Decline { timeout });
        p.drive();
        let reason = if timeout {
            CancelReason::Timeout
        } else {
            CancelReason::Viewer
        };
        match p.last_outcome() {
            Some(Ended::Purchase(PurchaseOutcome::Cancelled {
                transaction_id: Some(txid),
                reason: r,
            })) => {
                assert_eq!(*r, reason);
                let t = p.head_end.gateway.txn(txid).unwrap();
                assert_eq!(t.state, headend::gateway::GwState::Cancelled);
                assert!(p.head_end.payment.txn(txid).is_none(), "no draw");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(p.card_balance(), START);
        assert!(
            p.trace()
                .iter()
                .any(|l| l.contains("box → gateway: a cancel"))
        );
        p.assert_conserved();
    }
}

#[test]
fn viewer_cancels_a_load_before_the_request() {
    let mut p = Pair::new(PairOptions::default());
    p.start_load(Pair::bank_source());
    p.drive();
    p.viewer(Viewer::CancelLoad);
    assert!(matches!(
        p.last_outcome(),
        Some(Ended::Load(LoadOutcome::Cancelled { .. }))
    ));
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 0);
}

#[test]
fn lost_debit_response_then_crash_recovers_from_the_journal() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a debit response")));
    p.vanish();
    assert!(p.flow_active(), "the box still waits for the receipt");
    p.crash();
    p.drive();
    let c = p.recovery_counts();
    assert_eq!(c.resolved, 1, "{c:?}");
    assert_eq!(p.card_balance(), START - 499);
    let l = p.assert_conserved();
    assert_eq!((l.sold, l.released), (499, 499));
    assert!(
        p.trace()
            .iter()
            .any(|l| l.starts_with("recovery: box → gateway: a debit response"))
    );
}

#[test]
fn lost_card_answer_to_debit_then_crash_recovers_from_the_card_log() {
    for emb in ["security-card", "gateway"] {
        let mut p = Pair::with(emb, true);
        accepted(&mut p, "CABLE", "ppv-1001");
        assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
        p.step(); // the card debits
        assert!(p.peek().unwrap().is_card_reply());
        p.vanish();
        p.crash();
        p.drive();
        assert!(
            p.trace()
                .iter()
                .any(|l| l.contains("the card's log holds the debit")),
            "{emb}"
        );
        assert_eq!(p.card_balance(), START - 499, "{emb}");
        p.assert_conserved();
    }
}

#[test]
fn reader_failure_during_debit_is_in_doubt_and_the_recovery_timer_settles_it() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.step();
    p.lose(); // the reader reports an error; the card did debit
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Purchase(PurchaseOutcome::InDoubt {
                doubt: Doubt::CardLostDuringDebit { .. },
                ..
            }))
        ),
        "{:?}",
        p.last_outcome()
    );
    p.recover();
    p.drive();
    assert_eq!(p.card_balance(), START - 499);
    p.assert_conserved();
}

#[test]
fn debit_never_reached_the_card_then_crash_cancels_with_proof() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.crash(); // DEBIT journaled as sent, never given to the reader
    p.drive();
    let txid = txid_of_journal(&p);
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!((l.sold, l.released), (0, 0));
    assert_eq!(
        p.head_end.payment.txn(&txid).unwrap().state,
        headend::payment::PayState::Reversed
    );
}

/// The one purchase the box journaled (for tests whose flow died in a crash).
fn txid_of_journal(p: &Pair) -> String {
    let steps = p.trace().iter().filter(|l| l.contains("journal")).count();
    assert!(steps > 0);
    p.head_end
        .gateway
        .journal()
        .all(headend::journal::Kind::Gw)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .next()
        .expect("one purchase at the gateway")
}

#[test]
fn lost_debit_command_is_cancelled_with_proof_by_recovery() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_answer("a debit command")));
    p.lose();
    p.drive();
    assert!(matches!(
        p.last_outcome(),
        Some(Ended::Purchase(PurchaseOutcome::InDoubt {
            doubt: Doubt::NoDebitCommand { .. },
            ..
        }))
    ));
    let txid = txid_of(&p);
    p.recover();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn crash_with_the_draw_request_on_the_wire() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a draw request")));
    // The draw request is on the wire: it reaches the payment server after the crash, and
    // recovery's cancel (with the card's proof) follows it.
    p.crash();
    p.drive();
    let txid = txid_of_journal(&p);
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn lost_receipt_is_fetched_again_by_recovery() {
    for emb in ["payment-server", "merchant"] {
        let mut p = Pair::with(emb, true);
        accepted(&mut p, "M-WEBSHOP", "ebook-1");
        assert!(p.step_until(|i| i.is_answer("a receipt")));
        p.lose();
        p.drive();
        assert!(matches!(
            p.last_outcome(),
            Some(Ended::Purchase(PurchaseOutcome::InDoubt {
                doubt: Doubt::ConfirmationLost { .. },
                ..
            }))
        ));
        let txid = txid_of(&p);
        p.recover();
        p.drive();
        assert_eq!(
            p.purchase_state(&txid).as_deref(),
            Some("completed"),
            "{emb}"
        );
        assert_eq!(p.head_end.merchant.releases(&txid), 1, "released once");
        let l = p.assert_conserved();
        assert_eq!(l.sold, 1_250);
    }
}

#[test]
fn duplicated_requests_and_answers_change_nothing() {
    for emb in ["security-card", "payment-server", "gateway", "merchant"] {
        let mut p = Pair::with(emb, true);
        accepted(&mut p, "CABLE", "ppv-1001");
        assert!(p.step_until(|i| i.is_request("a draw request")));
        p.duplicate();
        assert!(p.step_until(|i| i.is_request("a debit response")));
        p.duplicate();
        assert!(p.step_until(|i| i.is_answer("a receipt")));
        p.duplicate();
        p.drive();
        let out = p.last_outcome().cloned();
        assert!(paid(&out), "{emb}: {out:?}");
        assert_eq!(p.card_balance(), START - 499, "{emb}");
        let l = p.assert_conserved();
        assert_eq!(l.sold, 499, "{emb}: sold once");
    }
}

#[test]
fn a_request_on_the_wire_when_the_box_dies_arrives_after_recoverys_own() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a debit response")));
    p.crash(); // the old debit response is still on the wire; recovery re-sends it
    assert_eq!(p.in_flight().len(), 2);
    p.delay(); // the old one now arrives second
    p.drive();
    assert_eq!(p.recovery_counts().resolved, 1);
    assert_eq!(p.card_balance(), START - 499);
    let l = p.assert_conserved();
    assert_eq!(l.sold, 499);
}

#[test]
fn card_refusing_debit_is_cancelled_with_proof() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    // A corrupted DEBIT on the way to the card: the card refuses it and debits nothing.
    p.tamper(|leg| {
        if let Leg::ToCard(apdu) = leg {
            let n = apdu.len();
            apdu[n - 2] ^= 0xFF;
        }
    });
    p.drive();
    match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(txid),
            ..
        })) => {
            let txid = txid.clone();
            assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!(l.sold, 0);
}

#[test]
fn lost_load_response_then_crash_recovers_from_the_journal() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_request("a load response")));
    p.vanish();
    p.crash();
    p.drive();
    assert_eq!(p.recovery_counts().resolved, 1);
    assert_eq!(p.card_balance(), START + 2_000);
    let l = p.assert_conserved();
    assert_eq!(
        (l.loaded, l.funders_debited, l.float),
        (2_000, 2_000, 2_000)
    );
}

#[test]
fn lost_card_answer_to_load_then_crash_recovers_from_the_card_log() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_card_command(INS_LOAD)));
    p.step(); // the card loads
    p.vanish();
    p.crash();
    p.drive();
    assert!(
        p.trace()
            .iter()
            .any(|l| l.contains("the card's log holds the load"))
    );
    assert_eq!(p.card_balance(), START + 2_000);
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 2_000);
}

#[test]
fn load_never_reached_the_card_then_crash_proves_not_loaded() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_card_command(INS_LOAD)));
    p.crash(); // LOAD journaled as sent, never given to the reader
    p.drive();
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!((l.loaded, l.funders_debited), (0, 0));
}

#[test]
fn lost_load_command_ends_with_the_zero_value_proof() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_answer("a load command")));
    p.lose();
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Load(LoadOutcome::NotLoaded { .. }))
        ),
        "{:?}",
        p.last_outcome()
    );
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 0);
}

#[test]
fn lost_load_confirmation_is_fetched_again_by_recovery() {
    let mut p = Pair::new(PairOptions::default());
    let source = p.voucher_source();
    p.start_load(source);
    p.drive();
    p.viewer(Viewer::Amount(3_000));
    assert!(p.step_until(|i| i.is_answer("a load confirmation")));
    p.lose();
    p.drive();
    assert!(matches!(
        p.last_outcome(),
        Some(Ended::Load(LoadOutcome::InDoubt {
            doubt: Doubt::LoadConfirmationLost { .. },
            ..
        }))
    ));
    let txid = txid_of(&p);
    p.recover();
    p.drive();
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_completed"));
    assert_eq!(p.card_balance(), START + 3_000);
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 3_000);
}

/// One scenario with faults and a crash, as a trace.
fn scenario() -> Vec<String> {
    let mut p = Pair::with("gateway", true);
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a debit response")));
    p.duplicate();
    p.step();
    p.crash();
    p.drive();
    let _ = p.load(Pair::bank_source(), 500);
    p.assert_conserved();
    p.trace().to_vec()
}

#[test]
fn same_inputs_same_sequence() {
    let a = scenario();
    let b = scenario();
    assert_eq!(a, b);
    assert!(a.len() > 40, "{a:#?}");
}

#[test]
fn a_duplicated_offer_request_makes_a_second_offer_the_box_ignores() {
    let mut p = Pair::new(PairOptions::default());
    p.start_purchase("CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("an offer request")));
    p.duplicate();
    p.step(); // the first offer request: its offer goes behind the duplicate
    p.delay(); // the duplicate goes behind the first offer
    p.drive();
    p.viewer(Viewer::Accept);
    p.drive();
    assert!(paid(&p.last_outcome().cloned()));
    let offers = p
        .trace()
        .iter()
        .filter(|l| l.contains("gateway → box: an offer"))
        .count();
    assert_eq!(offers, 2, "two offers made, one bought");
    assert!(
        matches!(
            p.head_end
                .gateway
                .journal()
                .all(headend::journal::Kind::Gw)
                .unwrap()
                .len(),
            2
        ),
        "the second offer stays open at the gateway"
    );
    p.assert_conserved();
}

#[test]
fn debit_command_for_another_amount_is_cancelled_with_proof() {
    // FIG. 8 off, so the debit command travels in clear and can be forged on the way.
    let mut p = Pair::with("security-card", false);
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_answer("a debit command")));
    p.tamper(|leg| {
        if let Leg::FromGateway(Ok(Message::DebitCommand(d))) = leg {
            if let Protected::Clear(b) = &mut d.body {
                b.command.amount = 1;
            }
        }
    });
    p.drive();
    match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(txid),
            refusal: Refusal::AmountMismatch { .. },
        })) => {
            let txid = txid.clone();
            assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
            assert_eq!(
                p.head_end.payment.txn(&txid).unwrap().state,
                headend::payment::PayState::Reversed
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn mangled_answer_to_debit_the_cancel_is_refused_and_recovery_finds_the_debit_in_the_log() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.step(); // the card debits
    // The reader mangles the answer into a refusal: the flow believes nothing was debited.
    p.tamper(|leg| {
        if let Leg::FromCard(Ok(r)) = leg {
            r.response = vec![0x69, 0x85];
        }
    });
    p.drive();
    let txid = match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(t),
            ..
        })) => t.clone(),
        other => panic!("{other:?}"),
    };
    // The card's fresh INITIALIZE shows a debit: the payment server rejects the proof, and
    // the cancel stays pending for recovery.
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("cancel_pending"));
    p.recover();
    p.drive();
    assert!(
        p.trace()
            .iter()
            .any(|l| l.contains("the card's log holds the debit"))
    );
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("completed"));
    assert_eq!(p.card_balance(), START - 499);
    let l = p.assert_conserved();
    assert_eq!(l.sold, 499);
}

#[test]
fn lost_draw_request_is_cancelled_by_recovery() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a draw request")));
    p.lose(); // never reached the gateway
    p.drive();
    let txid = txid_of(&p);
    p.recover();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert!(
        p.head_end.payment.txn(&txid).is_none(),
        "no draw reached it"
    );
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn lost_answer_to_the_flows_cancel_after_the_draw_is_settled_by_recovery() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.tamper(|leg| {
        if let Leg::ToCard(apdu) = leg {
            let n = apdu.len();
            apdu[n - 2] ^= 0xFF;
        }
    });
    assert!(p.step_until(|i| i.is_answer("a receipt")));
    p.lose(); // the payment server reversed; the box does not hear it
    p.drive();
    let txid = match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(t),
            ..
        })) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("cancel_pending"));
    p.crash();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn crash_while_the_viewer_decides_leaves_nothing_to_recover() {
    let mut p = Pair::new(PairOptions::default());
    p.start_purchase("CABLE", "ppv-1001");
    p.drive();
    p.crash();
    p.drive();
    assert_eq!(p.recovery_counts().resolved, 0);
    assert!(!p.flow_active());
    // The box buys again after its restart.
    assert!(paid(&p.buy("CABLE", "ppv-1001")));
    let l = p.assert_conserved();
    assert_eq!(l.sold, 499);
}

#[test]
fn card_refusing_load_ends_not_loaded() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_card_command(INS_LOAD)));
    p.tamper(|leg| {
        if let Leg::ToCard(apdu) = leg {
            let n = apdu.len();
            apdu[n - 2] ^= 0xFF;
        }
    });
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Load(LoadOutcome::NotLoaded { .. }))
        ),
        "{:?}",
        p.last_outcome()
    );
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!((l.loaded, l.funders_debited), (0, 0));
}

#[test]
fn crash_with_the_load_request_on_the_wire_proves_not_loaded() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_request("a load request")));
    p.crash(); // the request reaches the gateway; recovery's zero-value proof follows it
    p.drive();
    assert_eq!(p.recovery_counts().resolved, 1);
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!((l.loaded, l.funders_debited), (0, 0));
}

#[test]
fn lost_load_request_ends_with_the_zero_value_proof() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_request("a load request")));
    p.lose(); // never reached the gateway
    p.drive();
    // The flow proves with a fresh zero-value S1 that the card was not loaded; the load
    // server confirms "not loaded" and nothing is held.
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Load(LoadOutcome::NotLoaded { .. }))
        ),
        "{:?}",
        p.last_outcome()
    );
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 0);
}

/// REAL time: the payment server's deadline is 1 s here, and the test waits it out.
#[test]
fn a_debit_response_after_the_payment_servers_deadline_still_counts() {
    let mut p = Pair::new(PairOptions {
        transaction_timeout_secs: 1,
        ..Default::default()
    });
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a debit response")));
    p.vanish();
    let txid = txid_of_journal(&p);
    std::thread::sleep(std::time::Duration::from_millis(1_100));
    p.head_end_sweep(); // the payment server reverses at its deadline
    p.drive(); // the reversal feed tells the merchant
    assert_eq!(
        p.head_end.payment.txn(&txid).unwrap().state,
        headend::payment::PayState::Reversed
    );
    assert_eq!(p.head_end.merchant.releases(&txid), 0);
    p.crash(); // the box re-sends its journaled debit response: the late proof counts
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("completed"));
    assert_eq!(p.head_end.merchant.releases(&txid), 1);
    assert_eq!(p.card_balance(), START - 499);
    let l = p.assert_conserved();
    assert_eq!((l.sold, l.released), (499, 499));
}

#[test]
fn a_recovery_round_asked_for_during_a_flow_runs_when_it_ends() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_answer("a receipt")));
    p.lose();
    p.drive();
    let first = txid_of(&p);
    p.start_purchase("CABLE", "ppv-1002");
    p.drive();
    p.recover(); // the timer fires while the viewer looks at the offer
    assert!(
        p.trace()
            .iter()
            .any(|l| l == "recovery: waits for the flow")
    );
    assert_eq!(p.purchase_state(&first).as_deref(), Some("debit_responded"));
    p.viewer(Viewer::Accept);
    p.drive();
    assert_eq!(p.purchase_state(&first).as_deref(), Some("completed"));
    assert_eq!(p.card_balance(), START - 499 - 399);
    let l = p.assert_conserved();
    assert_eq!(l.sold, 898);
}

#[test]
fn merchant_down_at_the_debit_response_the_release_follows_and_recovery_fetches_the_receipt() {
    for emb in ["security-card", "gateway", "merchant"] {
        let mut p = Pair::with(emb, true);
        accepted(&mut p, "CABLE", "ppv-1001");
        assert!(p.step_until(|i| i.is_request("a debit response")));
        p.set_down(BackEnd::Merchant, true);
        p.drive();
        assert!(
            matches!(
                p.last_outcome(),
                Some(Ended::Purchase(PurchaseOutcome::InDoubt {
                    doubt: Doubt::PaidButRefused { .. },
                    ..
                }))
            ),
            "{emb}: {:?}",
            p.last_outcome()
        );
        let txid = txid_of(&p);
        assert_eq!(p.head_end.merchant.releases(&txid), 0);
        p.set_down(BackEnd::Merchant, false);
        p.head_end_background(); // the gateway delivers the journaled release
        assert_eq!(p.head_end.merchant.releases(&txid), 1, "{emb}");
        p.recover(); // the box's retry gets the stored receipt
        p.drive();
        assert_eq!(p.purchase_state(&txid).as_deref(), Some("completed"));
        let l = p.assert_conserved();
        assert_eq!((l.sold, l.released), (499, 499), "{emb}");
    }
}

#[test]
fn payment_server_down_at_the_draw_nothing_moves() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a draw request")));
    p.set_down(BackEnd::Payment, true);
    p.drive();
    let txid = match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(t),
            refusal: Refusal::DrawRefused { .. },
        })) => t.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    p.set_down(BackEnd::Payment, false);
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
    // The box buys again once the payment server is back.
    assert!(paid(&p.buy("CABLE", "ppv-1001")));
    p.assert_conserved();
}

#[test]
fn bank_down_at_the_load_request_the_zero_value_proof_settles_it_later() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_request("a load request")));
    p.set_down(BackEnd::Bank, true);
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Load(LoadOutcome::InDoubt {
                doubt: Doubt::LoadConfirmationRefused { .. },
                ..
            }))
        ),
        "{:?}",
        p.last_outcome()
    );
    let txid = txid_of(&p);
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_zero_value"));
    p.set_down(BackEnd::Bank, false);
    p.recover();
    p.drive();
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_completed"));
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!(l.loaded, 0);
}

#[test]
fn bank_down_at_the_load_response_recovery_settles_the_load() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_request("a load response")));
    p.set_down(BackEnd::Bank, true);
    p.drive();
    let txid = txid_of(&p);
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_responded"));
    p.set_down(BackEnd::Bank, false);
    p.recover();
    p.drive();
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_completed"));
    assert_eq!(p.card_balance(), START + 2_000);
    let l = p.assert_conserved();
    assert_eq!(
        (l.loaded, l.funders_debited, l.float),
        (2_000, 2_000, 2_000)
    );
}

#[test]
fn head_end_restart_between_the_draw_and_the_debit_response() {
    for emb in ["security-card", "payment-server", "gateway", "merchant"] {
        let mut p = Pair::with(emb, true);
        accepted(&mut p, "CABLE", "ppv-1001");
        assert!(p.step_until(|i| i.is_request("a debit response")));
        p.restart_head_end();
        p.drive();
        let out = p.last_outcome().cloned();
        assert!(paid(&out), "{emb}: {out:?}");
        let l = p.assert_conserved();
        assert_eq!((l.sold, l.released), (499, 499), "{emb}");
    }
}

#[test]
fn head_end_restart_with_a_release_pending() {
    let mut p = Pair::with("gateway", true);
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a debit response")));
    p.set_down(BackEnd::Merchant, true);
    p.drive();
    let txid = txid_of(&p);
    p.restart_head_end(); // the release is journaled; the restarted gateway delivers it
    p.head_end_background();
    assert_eq!(p.head_end.merchant.releases(&txid), 1);
    p.recover();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("completed"));
    let l = p.assert_conserved();
    assert_eq!(l.sold, 499);
}

#[test]
fn head_end_restart_in_the_middle_of_a_load() {
    for at in ["a load request", "a load response"] {
        let mut p = Pair::new(PairOptions::default());
        load_entered(&mut p, 2_000);
        assert!(p.step_until(|i| i.is_request(at)));
        p.restart_head_end();
        p.drive();
        assert!(
            matches!(
                p.last_outcome(),
                Some(Ended::Load(LoadOutcome::Loaded { .. }))
            ),
            "{at}: {:?}",
            p.last_outcome()
        );
        let l = p.assert_conserved();
        assert_eq!(l.loaded, 2_000, "{at}");
    }
}

#[test]
fn card_pulled_while_the_viewer_decides_withdraws_the_offer() {
    let mut p = Pair::new(PairOptions::default());
    p.start_purchase("CABLE", "ppv-1001");
    p.drive();
    p.remove_card();
    p.drive();
    match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(txid),
            refusal: Refusal::CardRemoved,
        })) => {
            let t = p.head_end.gateway.txn(txid).unwrap();
            assert_eq!(t.state, headend::gateway::GwState::Cancelled);
        }
        other => panic!("{other:?}"),
    }
    p.insert_card();
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn card_pulled_before_debit_recovery_waits_for_it_then_cancels_with_proof() {
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.remove_card();
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Purchase(PurchaseOutcome::InDoubt {
                doubt: Doubt::CardLostDuringDebit { .. },
                ..
            }))
        ),
        "{:?}",
        p.last_outcome()
    );
    let txid = txid_of(&p);
    p.recover();
    p.drive();
    assert!(p.trace().iter().any(|l| l.contains("waits for its card")));
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("debit_sent"));
    p.insert_card();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}

#[test]
fn card_pulled_before_load_recovery_waits_for_it_then_proves_not_loaded() {
    let mut p = Pair::new(PairOptions::default());
    load_entered(&mut p, 2_000);
    assert!(p.step_until(|i| i.is_card_command(INS_LOAD)));
    p.remove_card();
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Load(LoadOutcome::InDoubt {
                doubt: Doubt::CardLostDuringLoad { .. },
                ..
            }))
        ),
        "{:?}",
        p.last_outcome()
    );
    let txid = txid_of(&p);
    p.recover();
    p.drive();
    assert!(p.trace().iter().any(|l| l.contains("waits for its card")));
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_sent"));
    p.insert_card();
    p.drive();
    assert_eq!(p.load_state(&txid).as_deref(), Some("load_completed"));
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!((l.loaded, l.funders_debited), (0, 0));
}

#[test]
fn too_little_on_the_card_is_refused_before_the_draw() {
    let mut p = Pair::new(PairOptions {
        balance: 100,
        ..Default::default()
    });
    p.start_purchase("CABLE", "shop-2001");
    p.drive();
    match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::Failed {
            transaction_id: Some(txid),
            refusal: Refusal::InsufficientValue { .. },
        })) => {
            let t = p.head_end.gateway.txn(txid).unwrap();
            assert_eq!(t.state, headend::gateway::GwState::Cancelled);
        }
        other => panic!("{other:?}"),
    }
    let l = p.assert_conserved();
    assert_eq!((l.card_now, l.sold), (100, 0));
}

#[test]
fn wrong_pin_refuses_the_load_and_holds_nothing() {
    let mut p = Pair::new(PairOptions::default());
    p.start_load(Pair::bank_source());
    p.drive();
    p.viewer(Viewer::Amount(2_000));
    let pin: String = p
        .pin()
        .chars()
        .map(|c| if c == '9' { '0' } else { (c as u8 + 1) as char })
        .collect();
    p.viewer(Viewer::Pin(pin));
    p.drive();
    assert!(
        matches!(
            p.last_outcome(),
            Some(Ended::Load(LoadOutcome::Failed {
                refusal: Refusal::LoadRefused { .. },
                ..
            }))
        ),
        "{:?}",
        p.last_outcome()
    );
    assert_eq!(p.card_balance(), START);
    let l = p.assert_conserved();
    assert_eq!((l.loaded, l.funders_debited), (0, 0));
}

/// The doubt a purchase flow ended in, if it did.
fn purchase_doubt(p: &Pair) -> Option<Doubt> {
    match p.last_outcome() {
        Some(Ended::Purchase(PurchaseOutcome::InDoubt { doubt, .. })) => Some(doubt.clone()),
        _ => None,
    }
}

/// The card pulled mid-DEBIT (the card had debited; its reply is lost) and a network timeout
/// after DEBIT (the card paid; the receipt is lost) both leave the purchase in doubt, but
/// not alike: after the card failure no debit response is journaled, so recovery needs the
/// card's log and waits for the card; after the network failure the card's debit response is
/// journaled, so recovery re-sends it with no card in the reader. Each doubt carries the
/// failure as it was reported.
#[test]
fn card_pulled_mid_debit_waits_for_its_card_but_a_receipt_lost_to_a_timeout_does_not() {
    let pulled =
        CardFailure::Removed("reader R0: card was removed during the command — reinsert it".into());
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.step(); // the card debits; its reply is in flight
    p.fail(Failure::Card(pulled.clone()));
    p.remove_card();
    p.drive();
    assert_eq!(
        purchase_doubt(&p),
        Some(Doubt::CardLostDuringDebit {
            error: pulled.clone()
        })
    );
    assert!(
        p.shows()
            .contains(&Show::InDoubt(Doubt::CardLostDuringDebit { error: pulled }))
    );
    let txid = txid_of(&p);
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("debit_sent"));
    p.recover();
    p.drive();
    assert_eq!(
        p.purchase_state(&txid).as_deref(),
        Some("debit_sent"),
        "only the card's log can tell: recovery waits for the card"
    );
    p.insert_card();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("completed"));
    assert_eq!(p.card_balance(), START - 499);
    p.assert_conserved();

    let timeout = NetworkFailure::Timeout(LOST_AFTER);
    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_request("a debit response")));
    p.step(); // the head end takes the debit response; its answer is in flight
    p.fail(Failure::Network(timeout.clone()));
    p.remove_card();
    p.drive();
    assert_eq!(
        purchase_doubt(&p),
        Some(Doubt::ConfirmationLost {
            error: timeout.clone()
        })
    );
    let txid = txid_of(&p);
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("debit_responded"));
    p.recover();
    p.drive();
    assert_eq!(
        p.purchase_state(&txid).as_deref(),
        Some("completed"),
        "the journaled debit response settles it without the card"
    );
    assert_eq!(p.card_balance(), START - 499);
    p.assert_conserved();
}

/// Each kind of network failure of the draw request (it never reached the gateway) leaves
/// the purchase in doubt with that failure shown; recovery cancels it with the card's proof.
#[test]
fn every_network_failure_of_the_draw_request_is_in_doubt_and_cancelled_with_proof() {
    for f in [
        NetworkFailure::Unreachable("10.0.0.1:4433: no handshake within 10s".into()),
        NetworkFailure::Failed("stream reset by peer: 9".into()),
        NetworkFailure::Timeout(LOST_AFTER),
        NetworkFailure::Malformed("unexpected end of input".into()),
    ] {
        let mut p = Pair::new(PairOptions::default());
        accepted(&mut p, "CABLE", "ppv-1001");
        assert!(p.step_until(|i| i.is_request("a draw request")));
        p.fail(Failure::Network(f.clone()));
        p.drive();
        let doubt = Doubt::NoDebitCommand { error: f.clone() };
        assert_eq!(purchase_doubt(&p), Some(doubt.clone()), "{f:?}");
        assert!(p.shows().contains(&Show::InDoubt(doubt)), "{f:?}");
        let txid = txid_of(&p);
        p.recover();
        p.drive();
        assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"), "{f:?}");
        assert_eq!(p.card_balance(), START, "{f:?}");
        p.assert_conserved();
    }
}

/// A card failure during DEBIT, whatever its kind, leaves the card's log to decide: the
/// card that debited before its reply was lost is found in its log (completed); the card
/// that never got DEBIT (pulled before it reached the reader: no card) is cancelled with
/// its proof (ended).
#[test]
fn card_failures_during_debit_leave_the_card_s_log_to_decide() {
    let reader = || "R0".to_string();
    for f in [
        CardFailure::Removed("reader R0: card was removed during the command — reinsert it".into()),
        CardFailure::NoAnswer {
            reader: reader(),
            waited: std::time::Duration::from_secs(5),
        },
        CardFailure::Reader("reader R0: parity error".into()),
    ] {
        let mut p = Pair::new(PairOptions::default());
        accepted(&mut p, "CABLE", "ppv-1001");
        assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
        p.step(); // the card debits; its reply is in flight
        p.fail(Failure::Card(f.clone()));
        p.drive();
        assert_eq!(
            purchase_doubt(&p),
            Some(Doubt::CardLostDuringDebit { error: f.clone() }),
            "{f:?}"
        );
        let txid = txid_of(&p);
        p.recover();
        p.drive();
        assert_eq!(
            p.purchase_state(&txid).as_deref(),
            Some("completed"),
            "{f:?}"
        );
        assert_eq!(p.card_balance(), START - 499, "{f:?}");
        p.assert_conserved();
    }

    let mut p = Pair::new(PairOptions::default());
    accepted(&mut p, "CABLE", "ppv-1001");
    assert!(p.step_until(|i| i.is_card_command(INS_DEBIT)));
    p.remove_card(); // DEBIT is on its way to a reader with no card
    p.drive();
    assert_eq!(
        purchase_doubt(&p),
        Some(Doubt::CardLostDuringDebit {
            error: CardFailure::NoCard
        })
    );
    let txid = txid_of(&p);
    p.insert_card();
    p.drive();
    assert_eq!(p.purchase_state(&txid).as_deref(), Some("ended"));
    assert_eq!(p.card_balance(), START);
    p.assert_conserved();
}
