//! Refunds (issue 17, CREDIT): a merchant's security card credits a purchase back to the
//! card. The refund is counted off the security card's totals when its credit command is
//! issued, and counted back only on the card's proof that it was not credited; the card
//! credits once, logs it, and signs its answer. Tampered, replayed, another card's and
//! wrong-key commands are refused.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{PurseCard, commands};
use proto::money::Money;
use proto::purse::*;
use proto::security_card::{DrawData, SecurityCard, SecurityCardError};

/// SELECT + INITIALIZE FOR CREDIT, as the refund's data.
fn credit_data(card: &mut PurseCard, amount: u64) -> DrawData {
    select(card);
    let init = PurchaseInit::decode(&ok(card, &commands::init_credit(TODAY))).unwrap();
    DrawData {
        merchant_id: "M-CABLE".into(),
        transaction_id: "refund-1".into(),
        amount: Money::new(amount, EUR),
        init,
    }
}

/// A fresh proof INITIALIZE (no session).
fn proof(card: &mut PurseCard) -> PurchaseInit {
    select(card);
    PurchaseInit::decode(&ok(card, &commands::init_purchase_proof(TODAY))).unwrap()
}

#[test]
fn a_purchase_is_refunded_to_the_card_once() {
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    purchase(&mut card, &mut sc, 499, "sale-1");
    assert_eq!((card.state.balance, sc.total(EUR).amount), (9_501, 499));
    let d = credit_data(&mut card, 499);
    let cc = sc.issue_credit(&d, TODAY).unwrap();
    assert_eq!(sc.total(EUR).amount, 0, "counted off at issue");
    let resp = CreditResponse::decode(&ok(&mut card, &commands::credit(&cc))).unwrap();
    assert_eq!(resp.0.new_balance, 10_000);
    sc.complete_credit(cc.0.security_card_txn, &resp).unwrap();
    sc.complete_credit(cc.0.security_card_txn, &resp).unwrap();
    assert_eq!((card.state.balance, sc.total(EUR).amount), (10_000, 0));
    let log = card.state.log.back().unwrap();
    assert_eq!(
        (log.kind, log.amount, log.balance_after),
        (LogKind::Credit, 499, 10_000)
    );
    // The log proves it for recovery.
    assert_eq!(log.credit_response(card.state.card_id), Some(resp.clone()));
    assert_eq!(log.debit_response(card.state.card_id), None);
    // The same CREDIT again: no session; in a later session: an old counter.
    assert_eq!(
        send(&mut card, &commands::credit(&cc)).sw,
        StatusWord::WRONG_STATE
    );
    credit_data(&mut card, 1);
    assert_eq!(
        send(&mut card, &commands::credit(&cc)).sw,
        StatusWord::REPLAY
    );
    assert_eq!(card.state.balance, 10_000, "credited once");
    // More than the security card counted is no refund.
    let d = credit_data(&mut card, 1);
    assert_eq!(
        sc.issue_credit(&d, TODAY).unwrap_err(),
        SecurityCardError::RefundExceedsTotals {
            total: 0,
            amount: 1
        }
    );
    // A refund is no sale: the debit path refuses its response, and reversing it blind too.
    assert_eq!(
        sc.complete(cc.0.security_card_txn, &resp.0),
        Err(SecurityCardError::ResponseMismatch)
    );
    assert_eq!(
        sc.reverse(cc.0.security_card_txn),
        Err(SecurityCardError::CreditNeedsProof(cc.0.security_card_txn))
    );
}

#[test]
fn purchase_and_credit_sessions_and_signatures_never_stand_for_each_other() {
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    purchase(&mut card, &mut sc, 2_000, "sale-1");
    // A purchase INITIALIZE offered for a refund, and a credit INITIALIZE for a purchase.
    let purchase_init = draw(&mut card, 100, "x");
    assert_eq!(
        sc.issue_credit(&purchase_init, TODAY).unwrap_err(),
        SecurityCardError::BadCardData
    );
    let credit_init = credit_data(&mut card, 100);
    assert_eq!(
        sc.issue_debit(&credit_init, TODAY, false).unwrap_err(),
        SecurityCardError::BadCardData
    );
    // A genuine debit command sent as CREDIT in a credit session: not the credit label.
    let d = draw(&mut card, 100, "sale-2");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let d = credit_data(&mut card, 100);
    let mut as_credit = auth.command.clone();
    as_credit.atc = d.init.atc;
    assert_eq!(
        send(&mut card, &commands::credit(&CreditCommand(as_credit))).sw,
        StatusWord::BAD_SIGNATURE
    );
    // A tampered credit command (a larger amount).
    let d = credit_data(&mut card, 100);
    let mut cc = sc.issue_credit(&d, TODAY).unwrap();
    cc.0.amount = 10_000;
    assert_eq!(
        send(&mut card, &commands::credit(&cc)).sw,
        StatusWord::BAD_SIGNATURE
    );
    // A credit command sent as DEBIT in a purchase session.
    let d = draw(&mut card, 100, "sale-3");
    sc.issue_debit(&d, TODAY, false).unwrap();
    let d2 = credit_data(&mut card, 100);
    let cc = sc.issue_credit(&d2, TODAY).unwrap();
    draw(&mut card, 100, "sale-4");
    assert_eq!(
        send(&mut card, &commands::debit(&cc.0)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(card.state.balance, 8_000, "nothing moved");
    assert_eq!(card.state.bad_key_count, 3, "each counted toward the lock");
    // Another card's refund: refused as data for another card.
    let mut other = card_with(0, 100_000);
    other.state.card_id += 1;
    select(&mut other);
    ok(&mut other, &commands::init_credit(TODAY));
    let d = credit_data(&mut card, 100);
    let cc = sc.issue_credit(&d, TODAY).unwrap();
    assert_eq!(
        send(&mut other, &commands::credit(&cc)).sw,
        StatusWord::BAD_DATA
    );
    // A security card of another issuer cannot read the card's INITIALIZE FOR CREDIT.
    let mut foreign = SecurityCard::new(
        0xAA02,
        IssuerKeys {
            purchase_master: proto::crypto::DesKey::new([0x77; 16]),
            ..issuer()
        }
        .purchase(),
    );
    let d = credit_data(&mut card, 100);
    assert_eq!(
        foreign.issue_credit(&d, TODAY).unwrap_err(),
        SecurityCardError::BadCardData
    );
}

#[test]
fn an_in_doubt_refund_is_settled_from_the_card_either_way() {
    let mut card = card_with(10_000, 10_400);
    let mut sc = security_card();
    purchase(&mut card, &mut sc, 3_000, "sale-1");
    // More sales (another card of the same programme, here a twin): the security card has
    // more counted than this card could take.
    let mut other = card_with(50_000, 100_000);
    purchase(&mut other, &mut sc, 10_000, "sale-2");
    // Credited, the answer lost: the card's log proves it.
    let d = credit_data(&mut card, 1_000);
    let cc = sc.issue_credit(&d, TODAY).unwrap();
    ok(&mut card, &commands::credit(&cc));
    let logged = card
        .state
        .log
        .back()
        .unwrap()
        .credit_response(card.state.card_id)
        .unwrap();
    sc.complete_credit(cc.0.security_card_txn, &logged).unwrap();
    // The card's later INITIALIZE says it was credited: it stays counted off.
    let p = proof(&mut card);
    assert_eq!(sc.resolve_credit(cc.0.security_card_txn, &p), Ok(true));
    assert_eq!((card.state.balance, sc.total(EUR).amount), (8_000, 12_000));
    // Never reached the card: a later proof whose counter has not moved counts it back.
    let d = credit_data(&mut card, 500);
    let cc = sc.issue_credit(&d, TODAY).unwrap();
    assert_eq!(sc.total(EUR).amount, 11_500);
    let stale = d.init.clone();
    assert_eq!(
        sc.resolve_credit(cc.0.security_card_txn, &stale),
        Err(SecurityCardError::BadCardData),
        "the credit INITIALIZE itself is no proof (another label)"
    );
    let p = proof(&mut card);
    assert_eq!(sc.resolve_credit(cc.0.security_card_txn, &p), Ok(false));
    assert_eq!(sc.resolve_credit(cc.0.security_card_txn, &p), Ok(false));
    assert_eq!(sc.total(EUR).amount, 12_000, "counted back once");
    // After the proof the card can never run that CREDIT.
    assert_eq!(
        send(&mut card, &commands::credit(&cc)).sw,
        StatusWord::WRONG_STATE
    );
    // The card refuses (over its maximum): proved not credited the same way.
    let d = credit_data(&mut card, 2_500);
    let cc = sc.issue_credit(&d, TODAY).unwrap();
    assert_eq!(
        send(&mut card, &commands::credit(&cc)).sw,
        StatusWord::OVER_MAX_BALANCE
    );
    let p = proof(&mut card);
    assert_eq!(sc.resolve_credit(cc.0.security_card_txn, &p), Ok(false));
    assert_eq!((card.state.balance, sc.total(EUR).amount), (8_000, 12_000));
    // A later INITIALIZE after a credit that did happen names its session: credited.
    let d = credit_data(&mut card, 100);
    let cc = sc.issue_credit(&d, TODAY).unwrap();
    ok(&mut card, &commands::credit(&cc));
    let p = proof(&mut card);
    // Open until settled: kept; settled (credited, or proved not): forgotten.
    assert!(
        !sc.forget(cc.0.security_card_txn),
        "still open until proved"
    );
    assert_eq!(sc.resolve_credit(cc.0.security_card_txn, &p), Ok(true));
    assert_eq!(sc.total(EUR).amount, 11_900, "stays counted off");
    let logged = card
        .state
        .log
        .back()
        .unwrap()
        .credit_response(card.state.card_id)
        .unwrap();
    sc.complete_credit(cc.0.security_card_txn, &logged).unwrap();
    assert!(sc.forget(cc.0.security_card_txn));
}

/// The INITIALIZE count of the card session a security-card transaction was issued for.
fn d_init_count(sc: &SecurityCard, txn: u32) -> u32 {
    sc.txns[&txn].draw.init.init_count
}

/// The outside attack on refunds through the binaries (F1, F2): an issued refund whose
/// card then moved on — a purchase after a credit command it never ran, or 34 purchases
/// after a credit whose answer was lost (its log record gone) — was stuck for good: the
/// proof "counter not moved" was refused, and the log no longer held the answer. The card's
/// later INITIALIZE names the credit sessions it ran, so either is settled from it.
#[test]
fn a_refund_is_settled_from_the_cards_word_whatever_it_did_since() {
    // Never ran; then a purchase moved the counter: not credited, counted back.
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    let d = draw(&mut card, 2_000, "sale-1");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let r = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    sc.complete(auth.command.security_card_txn, &r).unwrap();
    let lost = sc
        .issue_credit(&credit_data(&mut card, 500), TODAY)
        .unwrap();
    let d = draw(&mut card, 100, "sale-2");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let r = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    sc.complete(auth.command.security_card_txn, &r).unwrap();
    assert_eq!(sc.total(EUR).amount, 2_100 - 500);
    let p = proof(&mut card);
    assert_eq!(sc.resolve_credit(lost.0.security_card_txn, &p), Ok(false));
    assert_eq!(sc.total(EUR).amount, 2_100, "counted back");
    // Ran, answer lost, then 34 purchases (the log keeps 32): credited.
    let ran = sc
        .issue_credit(&credit_data(&mut card, 300), TODAY)
        .unwrap();
    ok(&mut card, &commands::credit(&ran));
    for n in 0..34 {
        let d = draw(&mut card, 1, &format!("small-{n}"));
        let auth = sc.issue_debit(&d, TODAY, false).unwrap();
        let r = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
        sc.complete(auth.command.security_card_txn, &r).unwrap();
    }
    assert!(!card.state.log.iter().any(|r| r.kind == LogKind::Credit));
    let p = proof(&mut card);
    assert_eq!(sc.resolve_credit(ran.0.security_card_txn, &p), Ok(true));
    assert_eq!(sc.total(EUR).amount, 2_100 + 34 - 300, "stays counted off");
    // A proof from before the session is stale; a list of credits the card did not MAC
    // (a box claiming the session ran) is no proof.
    let early = proof(&mut card);
    let c = sc.issue_credit(&credit_data(&mut card, 10), TODAY).unwrap();
    assert_eq!(
        sc.resolve_credit(c.0.security_card_txn, &early),
        Err(SecurityCardError::StaleProof)
    );
    let mut forged = proof(&mut card);
    forged.credits[0] = (c.0.security_card_txn, 0);
    forged.credits[RECENT_RUNS - 1] = (d_init_count(&sc, c.0.security_card_txn), sc.id);
    assert_eq!(
        sc.resolve_credit(c.0.security_card_txn, &forged),
        Err(SecurityCardError::BadCardData)
    );
    // More than four credits since: the card's list no longer reaches back.
    for _ in 0..4 {
        let cc = sc.issue_credit(&credit_data(&mut card, 1), TODAY).unwrap();
        ok(&mut card, &commands::credit(&cc));
        let logged = card
            .state
            .log
            .back()
            .unwrap()
            .credit_response(card.state.card_id)
            .unwrap();
        sc.complete_credit(cc.0.security_card_txn, &logged).unwrap();
    }
    let p = proof(&mut card);
    assert_eq!(
        sc.resolve_credit(c.0.security_card_txn, &p),
        Err(SecurityCardError::ProofUnavailable(c.0.security_card_txn))
    );
}

/// The outside attack on refunds (F3): a refund taken against an early-recorded sale
/// (FIG. 5-7) that is then reversed would take the sale off the totals twice (a panic in
/// the security card, and the PSAM). Only settled totals can be refunded now.
#[test]
fn a_refund_never_takes_what_may_still_be_reversed() {
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    let d = draw(&mut card, 1_000, "sale-early");
    let auth = sc.issue_debit(&d, TODAY, true).unwrap();
    assert_eq!(sc.total(EUR).amount, 1_000, "counted early");
    let c = credit_data(&mut card, 1_000);
    assert_eq!(
        sc.issue_credit(&c, TODAY).unwrap_err(),
        SecurityCardError::RefundExceedsTotals {
            total: 0,
            amount: 1_000
        }
    );
    sc.reverse(auth.command.security_card_txn).unwrap();
    assert_eq!(sc.total(EUR).amount, 0);
    assert_eq!(card.state.balance, 10_000);
}

/// (F4) One INITIALIZE FOR CREDIT gets one refund: a second command for it could never run,
/// nor be proved not run once the first moved the card's counter — the merchant's totals
/// would stay short for good.
#[test]
fn one_initialize_for_credit_gets_one_refund() {
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    purchase(&mut card, &mut sc, 2_000, "s1");
    let c = credit_data(&mut card, 500);
    let cc = sc.issue_credit(&c, TODAY).unwrap();
    assert!(matches!(
        sc.issue_credit(&c, TODAY),
        Err(SecurityCardError::InitializeUsed { .. })
    ));
    let r = CreditResponse::decode(&ok(&mut card, &commands::credit(&cc))).unwrap();
    sc.complete_credit(cc.0.security_card_txn, &r).unwrap();
    assert_eq!(card.state.balance + sc.total(EUR).amount, 10_000);
}
