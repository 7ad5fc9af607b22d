//! Full purchases (card ↔ security card) and loads (card ↔ HSM) in process, every tamper
//! case with its specific status word or error, and each branch of the negative-result
//! procedure of 001 [0129]–[0132].

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{CardFault, commands};
use proto::hsm::{HsmError, LoadVerdict, NegativeVerdict};
use proto::money::{Currency, Money};
use proto::purse::*;
use proto::security_card::{SecurityCard, SecurityCardError};

#[test]
fn full_purchase_moves_value_and_logs() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let before = {
        select(&mut card);
        read_purse(&mut card)
    };
    let resp = purchase(&mut card, &mut security_card, 1_250, "tx-1");
    let after = read_purse(&mut card);
    assert_eq!(after.balance, 8_750);
    assert_eq!(resp.new_balance, 8_750);
    assert_eq!(after.atc, before.atc + 1);
    assert_eq!(security_card.total(EUR).amount, 1_250);
    assert_eq!(security_card.total(EUR).count, 1);
    assert_eq!(security_card.txn_counter, 1);
    let log = LogRecord::decode(&ok(&mut card, &commands::read_log(1))).unwrap();
    assert_eq!(
        (log.kind, log.amount, log.balance_after),
        (LogKind::Debit, 1_250, 8_750)
    );
    assert_eq!(log.debit_response(after.card_id).unwrap(), resp);
    assert_eq!(security_card.collection().len(), 1);
}

#[test]
fn early_release_hands_out_the_signature_the_card_then_gives() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let d = draw(&mut card, 500, "tx-e");
    let auth = security_card.issue_debit(&d, TODAY, true).unwrap();
    let expected = auth.expected_card_signature.unwrap();
    assert_eq!(
        security_card.total(EUR).amount,
        500,
        "early release counts at issue"
    );
    let resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    assert!(SecurityCard::signatures_match(&expected, &resp));
    let mut forged = resp.clone();
    forged.card_signature[0] ^= 0x80;
    assert!(!SecurityCard::signatures_match(&expected, &forged));
    // The genuine signature with a field changed is not the expected response either.
    for change in [
        |r: &mut DebitResponse| r.new_balance += 1,
        |r: &mut DebitResponse| r.amount -= 1,
        |r: &mut DebitResponse| r.atc += 1,
    ] {
        let mut forged = resp.clone();
        change(&mut forged);
        assert!(!SecurityCard::signatures_match(&expected, &forged));
    }
}

#[test]
fn full_load_credits_and_hsm_totals() {
    let mut card = card_with(1_000, 50_000);
    let mut hsm = hsm();
    let resp = load(&mut card, &mut hsm, 4_000, "ld-1");
    assert!(resp.is_loaded());
    let info = read_purse(&mut card);
    assert_eq!((info.balance, info.load_count, info.atc), (5_000, 1, 1));
    assert_eq!(hsm.total(EUR).amount, 4_000);
    let log = LogRecord::decode(&ok(&mut card, &commands::read_log(1))).unwrap();
    assert_eq!((log.kind, log.amount), (LogKind::Load, 4_000));
}

#[test]
fn log_keeps_the_last_twenty_or_more() {
    let mut card = card_with(100_000, 100_000);
    let mut security_card = security_card();
    for i in 0..25 {
        purchase(&mut card, &mut security_card, 10 + i, &format!("tx-{i}"));
    }
    for n in 1..=20u8 {
        let rec = LogRecord::decode(&ok(&mut card, &commands::read_log(n))).unwrap();
        assert_eq!(rec.amount, 10 + 25 - u64::from(n));
    }
    assert_eq!(
        send(&mut card, &commands::read_log(33)).sw,
        proto::card::SW_RECORD_NOT_FOUND
    );
}

// ---- tamper cases: purchase ----

#[test]
fn amount_changed_in_debit_command_is_refused() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let d = draw(&mut card, 100, "tx");
    let mut cmd = security_card.issue_debit(&d, TODAY, false).unwrap().command;
    cmd.amount = 1;
    assert_eq!(
        send(&mut card, &commands::debit(&cmd)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(read_purse(&mut card).balance, 10_000);
}

#[test]
fn every_flipped_bit_in_the_security_card_signature_is_refused() {
    let mut card = card_with(10_000, 50_000);
    for bit in 0..64 {
        let mut security_card = security_card();
        let d = draw(&mut card, 100, "tx");
        let mut cmd = security_card.issue_debit(&d, TODAY, false).unwrap().command;
        cmd.security_card_signature[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            send(&mut card, &commands::debit(&cmd)).sw,
            StatusWord::BAD_SIGNATURE,
            "bit {bit}"
        );
        // Keep the bad-key counter below the lock for this test: a good debit resets it.
        if bit % 5 == 4 {
            purchase(&mut card, &mut security_card, 1, "reset");
        }
    }
}

#[test]
fn every_flipped_bit_in_the_card_signature_is_refused_by_the_security_card() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let d = draw(&mut card, 100, "tx");
    let auth = security_card.issue_debit(&d, TODAY, false).unwrap();
    let resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    for bit in 0..64 {
        let mut r = resp.clone();
        r.card_signature[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            security_card.complete(auth.command.security_card_txn, &r),
            Err(SecurityCardError::BadCardSignature)
        );
    }
    assert_eq!(security_card.total(EUR).amount, 0);
    security_card
        .complete(auth.command.security_card_txn, &resp)
        .unwrap();
    assert_eq!(security_card.total(EUR).amount, 100);
}

#[test]
fn tampered_card_data_in_the_draw_request_is_refused() {
    let mut card = card_with(100, 50_000);
    let mut security_card = security_card();
    let mut d = draw(&mut card, 5_000, "tx");
    d.init.balance = 1_000_000; // claim more value than the card has
    assert_eq!(
        security_card.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::BadCardData)
    );
    d.init.balance = 100;
    d.init.card_mac[3] ^= 4;
    assert_eq!(
        security_card.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::BadCardData)
    );
}

#[test]
fn replayed_debit_command_is_refused() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let d = draw(&mut card, 300, "tx");
    let cmd = security_card.issue_debit(&d, TODAY, false).unwrap().command;
    ok(&mut card, &commands::debit(&cmd));
    // Straight replay: no open session.
    assert_eq!(
        send(&mut card, &commands::debit(&cmd)).sw,
        StatusWord::WRONG_STATE
    );
    // Replay into a fresh session: the transaction number is spent.
    ok(&mut card, &commands::init_purchase(TODAY));
    assert_eq!(
        send(&mut card, &commands::debit(&cmd)).sw,
        StatusWord::REPLAY
    );
    assert_eq!(read_purse(&mut card).balance, 9_700);
}

#[test]
fn wrong_card_key_is_refused() {
    let mut card = card_with(10_000, 50_000);
    let mut other = IssuerKeys {
        purchase_master: proto::crypto::DesKey::new([0x33; 16]),
        load_master: proto::crypto::DesKey::new([0x44; 16]),
        ..issuer()
    };
    other.key_version = 1;
    let mut rogue_psam = SecurityCard::new(0xDEAD, other.purchase());
    let d = draw(&mut card, 100, "tx");
    // The rogue security card cannot even verify the card's data...
    assert_eq!(
        rogue_psam.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::BadCardData)
    );
    // ...and a debit command signed under the wrong key is refused by the card.
    let mut legit = security_card();
    let mut cmd = legit.issue_debit(&d, TODAY, false).unwrap().command;
    let wrong_sk = other.card_keys(cmd.card_id).purchase_session(cmd.atc);
    cmd.security_card_signature =
        proto::crypto::sign(&wrong_sk, b"DCMD", &cmd.signed_fields(&d.init.card_random));
    assert_eq!(
        send(&mut card, &commands::debit(&cmd)).sw,
        StatusWord::BAD_SIGNATURE
    );
    // The HSM under the wrong key refuses S1.
    let mut rogue_hsm = proto::hsm::Hsm::new(1, other.load());
    let init = init_load(&mut card, 100, 1).unwrap();
    assert_eq!(
        rogue_hsm.authorize("l", &init, Money::new(100, EUR), TODAY),
        Err(HsmError::BadS1)
    );
}

#[test]
fn wrong_currency_expired_over_max_insufficient() {
    // Wrong currency: at the security card and at the card's INITIALIZE FOR LOAD.
    let mut card = card_with(10_000, 20_000);
    let mut security_card = security_card();
    let mut d = draw(&mut card, 100, "tx");
    d.amount = Money::new(100, Currency::USD);
    assert!(matches!(
        security_card.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::WrongCurrency { .. })
    ));
    select(&mut card);
    let r = send(
        &mut card,
        &commands::init_load(&LoadInitRequest {
            amount: 1,
            currency: Currency::USD,
            timestamp: 0,
            date: TODAY,
        }),
    );
    assert_eq!(r.sw, StatusWord::WRONG_CURRENCY);

    // Over max balance.
    assert_eq!(
        init_load(&mut card, 10_001, 0),
        Err(StatusWord::OVER_MAX_BALANCE)
    );

    // Insufficient value: the security card refuses (the card's own refusal of a signed
    // debit beyond its balance is `card_refuses_a_signed_debit_beyond_its_balance`).
    let d = draw(&mut card, 10_001, "tx");
    assert!(matches!(
        security_card.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::InsufficientValue { .. })
    ));

    // Expired: the card refuses INITIALIZE with a date past its expiry.
    let mut card = card_with(10_000, 20_000);
    select(&mut card);
    let late = Date::new(2029, 1, 1);
    assert_eq!(
        send(&mut card, &commands::init_purchase(late)).sw,
        StatusWord::EXPIRED
    );
    let d = draw(&mut card, 100, "tx");
    assert_eq!(
        security_card.issue_debit(&d, late, false),
        Err(SecurityCardError::Expired)
    );
}

#[test]
fn card_refuses_a_signed_debit_beyond_its_balance() {
    // A security card that signs whatever it is asked (its checks bypassed) still cannot
    // make the card go negative.
    let mut card = card_with(50, 20_000);
    let d = draw(&mut card, 50, "tx");
    let mut security_card = security_card();
    let mut cmd = security_card.issue_debit(&d, TODAY, false).unwrap().command;
    cmd.amount = 51;
    let sk = issuer().card_keys(cmd.card_id).purchase_session(cmd.atc);
    cmd.security_card_signature =
        proto::crypto::sign(&sk, b"DCMD", &cmd.signed_fields(&d.init.card_random));
    assert_eq!(
        send(&mut card, &commands::debit(&cmd)).sw,
        StatusWord::INSUFFICIENT_VALUE
    );
}

#[test]
fn bad_signatures_lock_the_card() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    for _ in 0..10 {
        let d = draw(&mut card, 1, "tx");
        let mut cmd = security_card.issue_debit(&d, TODAY, false).unwrap().command;
        cmd.security_card_signature[0] ^= 1;
        send(&mut card, &commands::debit(&cmd));
    }
    assert!(read_purse(&mut card).is_blocked());
    assert_eq!(
        send(&mut card, &commands::init_purchase(TODAY)).sw,
        StatusWord::BLOCKED
    );
}

#[test]
fn malformed_apdus_get_their_status_words() {
    let mut card = card_with(10, 10);
    assert_eq!(send(&mut card, &[0x80]).sw, StatusWord::WRONG_LENGTH);
    assert_eq!(
        send(&mut card, &commands::read_purse()).sw,
        StatusWord::WRONG_STATE
    );
    assert_eq!(
        send(&mut card, &[0x00, 0xA4, 0x04, 0x00, 0x02, 0xA0, 0x00]).sw,
        StatusWord::APP_NOT_FOUND
    );
    select(&mut card);
    // A header alone (4 bytes) is too short for any purse command.
    assert_eq!(
        send(&mut card, &[0x80, 0xEE, 0, 0]).sw,
        StatusWord::WRONG_LENGTH
    );
    assert_eq!(
        send(&mut card, &[0x80, 0xEE, 0, 0, 0]).sw,
        StatusWord::UNKNOWN_INSTRUCTION
    );
    assert_eq!(
        send(&mut card, &[0x90, 0xB0, 0, 0, 0]).sw,
        StatusWord::CLASS_NOT_SUPPORTED
    );
    assert_eq!(
        send(&mut card, &[0x80, 0x54, 0, 0, 1, 0]).sw,
        StatusWord::WRONG_STATE
    );
    ok(&mut card, &commands::init_purchase(TODAY));
    assert_eq!(
        send(&mut card, &[0x80, 0x54, 0, 0, 1, 0]).sw,
        StatusWord::BAD_DATA
    );
    assert_eq!(
        send(&mut card, &[0x80, 0x50, 0x07, 0, 1, 0]).sw,
        StatusWord::WRONG_P1P2
    );
}

// ---- tamper cases: load ----

#[test]
fn forged_s1_is_refused() {
    let mut card = card_with(0, 50_000);
    let mut hsm = hsm();
    let mut init = init_load(&mut card, 1_000, 7).unwrap();
    init.amount = 9_000; // the box asks for more than the card signed
    assert_eq!(
        hsm.authorize("l", &init, Money::new(9_000, EUR), TODAY),
        Err(HsmError::BadS1)
    );
    let mut init = init_load(&mut card, 1_000, 7).unwrap();
    init.s1[5] ^= 0x10;
    assert_eq!(
        hsm.authorize("l", &init, Money::new(1_000, EUR), TODAY),
        Err(HsmError::BadS1)
    );
}

#[test]
fn forged_s2_is_refused_by_the_card() {
    let mut card = card_with(0, 50_000);
    let mut hsm = hsm();
    for bit in [0, 17, 63] {
        let init = init_load(&mut card, 1_000, 7).unwrap();
        let mut cmd = hsm
            .authorize(&format!("l{bit}"), &init, Money::new(1_000, EUR), TODAY)
            .unwrap();
        cmd.s2[bit / 8] ^= 1 << (bit % 8);
        assert_eq!(
            send(&mut card, &commands::load(&cmd)).sw,
            StatusWord::BAD_SIGNATURE
        );
    }
    // An amount raised in the load command breaks S2 too.
    let init = init_load(&mut card, 1_000, 7).unwrap();
    let mut cmd = hsm
        .authorize("lx", &init, Money::new(1_000, EUR), TODAY)
        .unwrap();
    cmd.amount = 40_000;
    assert_eq!(
        send(&mut card, &commands::load(&cmd)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(read_purse(&mut card).balance, 0);
}

#[test]
fn forged_s3_is_refused_by_the_hsm() {
    let mut card = card_with(0, 50_000);
    let mut hsm = hsm();
    let init = init_load(&mut card, 1_000, 7).unwrap();
    let cmd = hsm
        .authorize("l", &init, Money::new(1_000, EUR), TODAY)
        .unwrap();
    let resp = LoadResponse::decode(&ok(&mut card, &commands::load(&cmd))).unwrap();
    let mut forged = resp.clone();
    forged.s3[0] ^= 1;
    assert_eq!(hsm.confirm("l", &forged), Err(HsmError::BadS3));
    // A negative result code forged onto a real load does not verify either.
    let mut claim_not_loaded = resp.clone();
    claim_not_loaded.result = LOAD_NEGATIVE;
    assert_eq!(hsm.confirm("l", &claim_not_loaded), Err(HsmError::BadS3));
    assert_eq!(hsm.total(EUR).amount, 0);
    assert_eq!(hsm.confirm("l", &resp), Ok(LoadVerdict::Loaded));
    assert_eq!(
        hsm.confirm("l", &resp),
        Ok(LoadVerdict::Loaded),
        "idempotent"
    );
    assert_eq!(hsm.total(EUR).amount, 1_000);
}

#[test]
fn replayed_load_command_is_refused() {
    let mut card = card_with(0, 50_000);
    let mut hsm = hsm();
    let init = init_load(&mut card, 1_000, 7).unwrap();
    let cmd = hsm
        .authorize("l", &init, Money::new(1_000, EUR), TODAY)
        .unwrap();
    ok(&mut card, &commands::load(&cmd));
    assert_eq!(
        send(&mut card, &commands::load(&cmd)).sw,
        StatusWord::WRONG_STATE
    );
    init_load(&mut card, 1_000, 7).unwrap();
    assert_eq!(
        send(&mut card, &commands::load(&cmd)).sw,
        StatusWord::REPLAY
    );
    assert_eq!(read_purse(&mut card).balance, 1_000);
    // A retried load request gets the same command, never a second authorization.
    assert_eq!(
        hsm.authorize("l", &init, Money::new(1_000, EUR), TODAY)
            .unwrap(),
        cmd
    );
}

// ---- negative-result procedure, 001 [0129]–[0132] ----

/// Runs a load whose card misbehaves as `fault`, then the zero-value procedure. Returns
/// (verdict, card balance, HSM total).
fn negative_case(fault: CardFault) -> (NegativeVerdict, u64, u64) {
    let mut card = card_with(2_000, 50_000);
    let mut hsm = hsm();
    card.state.fault = Some(fault);
    let init = init_load(&mut card, 3_000, 10).unwrap();
    let cmd = hsm
        .authorize("neg", &init, Money::new(3_000, EUR), TODAY)
        .unwrap();
    let resp = LoadResponse::decode(&ok(&mut card, &commands::load(&cmd))).unwrap();
    assert_eq!(resp.result, LOAD_NEGATIVE);
    assert_eq!(
        hsm.confirm("neg", &resp),
        Ok(LoadVerdict::NegativeNeedsProof)
    );
    let zero = init_load(&mut card, 0, 11).unwrap();
    let verdict = hsm.resolve_negative("neg", &zero).unwrap();
    (
        verdict,
        read_purse(&mut card).balance,
        hsm.total(EUR).amount,
    )
}

#[test]
fn negative_true_negative_nobody_is_debited() {
    let (v, balance, settled) = negative_case(CardFault::TrueNegative);
    assert_eq!(v, NegativeVerdict::TrueNegative);
    assert_eq!(
        (balance, settled),
        (2_000, 0),
        "card not loaded, nothing settled"
    );
}

#[test]
fn negative_false_negative_is_settled_as_loaded() {
    let (v, balance, settled) = negative_case(CardFault::FalseNegative);
    assert_eq!(v, NegativeVerdict::FalseNegative);
    assert_eq!(
        (balance, settled),
        (5_000, 3_000),
        "card loaded, so the account pays"
    );
}

#[test]
fn negative_counter_bumped_by_accident_nobody_is_debited() {
    let (v, balance, settled) = negative_case(CardFault::CounterBump);
    assert_eq!(v, NegativeVerdict::CounterBumped);
    assert_eq!((balance, settled), (2_000, 0));
}

#[test]
fn negative_procedure_refuses_a_forged_zero_value_s1() {
    let mut card = card_with(2_000, 50_000);
    let mut hsm = hsm();
    card.state.fault = Some(CardFault::FalseNegative);
    let init = init_load(&mut card, 3_000, 10).unwrap();
    let cmd = hsm
        .authorize("neg", &init, Money::new(3_000, EUR), TODAY)
        .unwrap();
    let resp = LoadResponse::decode(&ok(&mut card, &commands::load(&cmd))).unwrap();
    hsm.confirm("neg", &resp).unwrap();
    let mut zero = init_load(&mut card, 0, 11).unwrap();
    // The box lies that the balance never moved, to get the load for free.
    zero.balance = 2_000;
    zero.load_count = 0;
    assert_eq!(hsm.resolve_negative("neg", &zero), Err(HsmError::BadS1));
}

#[test]
fn card_pulled_during_load_resolves_from_a_zero_value_s1() {
    // No LOAD response ever reached the HSM; the card did or did not load.
    for loaded in [false, true] {
        let mut card = card_with(0, 50_000);
        let mut hsm = hsm();
        let init = init_load(&mut card, 700, 1).unwrap();
        let cmd = hsm
            .authorize("p", &init, Money::new(700, EUR), TODAY)
            .unwrap();
        if loaded {
            ok(&mut card, &commands::load(&cmd)); // response lost
        }
        let zero = init_load(&mut card, 0, 2).unwrap();
        let v = hsm.resolve_negative("p", &zero).unwrap();
        assert_eq!(v.loaded(), loaded);
        assert_eq!(hsm.total(EUR).amount, if loaded { 700 } else { 0 });
    }
}

#[test]
fn a_fresh_initialize_proves_the_card_never_debited() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let d = draw(&mut card, 100, "tx");
    let auth = security_card.issue_debit(&d, TODAY, false).unwrap();
    // The card was pulled before DEBIT; a fresh INITIALIZE shows the same counter.
    let proof = draw(&mut card, 100, "again").init;
    assert_eq!(
        security_card.verify_not_debited(auth.command.security_card_txn, &proof),
        Ok(())
    );
    let mut forged = proof.clone();
    forged.atc += 1;
    assert_eq!(
        security_card.verify_not_debited(auth.command.security_card_txn, &forged),
        Err(SecurityCardError::BadCardData)
    );
    // Had the card debited, its counter would have moved on: no proof of a non-debit.
    let d2 = draw(&mut card, 100, "tx2");
    let auth2 = security_card.issue_debit(&d2, TODAY, false).unwrap();
    ok(&mut card, &commands::debit(&auth2.command));
    let after = draw(&mut card, 100, "again2").init;
    assert_eq!(
        security_card.verify_not_debited(auth2.command.security_card_txn, &after),
        Err(SecurityCardError::CounterMoved {
            proof: auth2.command.atc + 1,
            debit: auth2.command.atc
        })
    );
}

#[test]
fn settled_transactions_can_be_forgotten_without_touching_totals() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    let open = security_card
        .issue_debit(&draw(&mut card, 100, "open"), TODAY, false)
        .unwrap();
    purchase(&mut card, &mut security_card, 200, "done");
    assert_eq!(security_card.txns.len(), 2);
    assert!(
        !security_card.forget(open.command.security_card_txn),
        "an open transaction stays"
    );
    assert!(security_card.forget(2));
    assert_eq!(
        (security_card.txns.len(), security_card.total(EUR).amount),
        (1, 200)
    );

    let mut hsm = hsm();
    load(&mut card, &mut hsm, 500, "ld");
    let init = init_load(&mut card, 10, 2).unwrap();
    hsm.authorize("pending", &init, Money::new(10, EUR), TODAY)
        .unwrap();
    assert!(!hsm.forget("pending"));
    assert!(hsm.forget("ld"));
    assert_eq!((hsm.txns.len(), hsm.total(EUR).amount), (1, 500));
}

/// FIG. 5's bulk housekeeping: counted transactions go, except those named open (the
/// payment server may still reverse them); one awaiting the card's comparison (FIG. 4) and a
/// reversed one stay; the totals do not move.
#[test]
fn settled_transactions_leave_in_bulk_except_the_open_ones() {
    let mut card = card_with(10_000, 50_000);
    let mut sc = security_card();
    let mut early = Vec::new();
    for (i, amount) in [100, 200, 300, 400].into_iter().enumerate() {
        let a = sc
            .issue_debit(&draw(&mut card, amount, &format!("e{i}")), TODAY, true)
            .unwrap();
        early.push(a.command.security_card_txn);
        // Each draw's INITIALIZE ends the previous session: the card debits none of them.
    }
    let awaiting = sc
        .issue_debit(&draw(&mut card, 50, "fig4"), TODAY, false)
        .unwrap()
        .command
        .security_card_txn;
    sc.reverse(early[3]).unwrap();
    assert_eq!(sc.total(EUR).amount, 600, "three early counts stand");
    let dropped = sc.purge_settled_except(&[early[1]]);
    assert_eq!(dropped, 2, "early[0] and early[2]");
    let left: Vec<u32> = sc.txns.keys().copied().collect();
    assert_eq!(left, [early[1], early[3], awaiting]);
    assert_eq!(sc.total(EUR).amount, 600, "totals unchanged");
    // The open one is still reversible.
    sc.reverse(early[1]).unwrap();
    assert_eq!(sc.total(EUR).amount, 400);
}

/// The issuer's hotlist: a listed genuine card gets no debit command and no load command
/// (each its own error), nothing is counted, and the card keeps its value; an older list
/// never replaces a newer one; a card not listed goes on as before.
#[test]
fn a_hotlisted_card_gets_no_debit_command_and_no_load_command() {
    use proto::hotlist::Hotlist;
    let mut card = card_with(10_000, 50_000);
    select(&mut card);
    let id = read_purse(&mut card).card_id;
    let blocked = Hotlist {
        version: 2,
        card_ids: [id, 12345].into(),
    };
    let mut sc = security_card();
    let mut h = hsm();
    sc.set_hotlist(&blocked);
    h.set_hotlist(&blocked);
    assert_eq!(
        sc.issue_debit(&draw(&mut card, 100, "t1"), TODAY, false),
        Err(SecurityCardError::Hotlisted { card_id: id })
    );
    let init = init_load(&mut card, 500, 1).unwrap();
    assert_eq!(
        h.authorize("l1", &init, Money::new(500, EUR), TODAY),
        Err(HsmError::Hotlisted { card_id: id })
    );
    assert!(sc.txns.is_empty() && h.txns.is_empty(), "nothing opened");
    assert_eq!(sc.total(EUR).amount + h.total(EUR).amount, 0);
    select(&mut card);
    assert_eq!(read_purse(&mut card).balance, 10_000);
    // An older list (v1, empty) does not lift the block; a newer one (v3) does.
    sc.set_hotlist(&Hotlist {
        version: 1,
        card_ids: Default::default(),
    });
    assert_eq!(sc.hotlist_version(), 2);
    assert!(
        sc.issue_debit(&draw(&mut card, 100, "t2"), TODAY, false)
            .is_err()
    );
    sc.set_hotlist(&Hotlist {
        version: 3,
        card_ids: [12345].into(),
    });
    purchase(&mut card, &mut sc, 100, "t3");
    select(&mut card);
    assert_eq!(read_purse(&mut card).balance, 9_900);
}

/// Key generations (seed 002; 004's monthly key change): with versions 1 and 2 active,
/// cards of both buy and load; once version 1 is retired, a version-1 card is refused for
/// purchases with the re-key reason and still loads (a load is how it is re-keyed); an
/// unknown version is refused naming the newest held.
#[test]
fn cards_of_every_active_key_version_buy_and_load_and_a_retired_one_only_loads() {
    use proto::card::{CardSpec, CardState, PurseCard};
    use proto::crypto::DesKey;
    let v2 = IssuerKeys {
        key_version: 2,
        purchase_master: DesKey::new([0x33; 16]),
        load_master: DesKey::new([0x44; 16]),
    };
    let card_of = |issuer: &IssuerKeys, id: u64| {
        let spec = CardSpec {
            card_id: id,
            provider_id: 42,
            currency: EUR,
            balance: 10_000,
            max_balance: 50_000,
            expiry: Expiry {
                year: 2028,
                month: 12,
            },
        };
        PurseCard::new(CardState::personalise(&spec, issuer), 7)
    };
    let (mut old, mut new) = (card_of(&issuer(), 1), card_of(&v2, 2));
    let both = |retired: Vec<u8>, purpose: fn(&IssuerKeys) -> MasterKey| {
        MasterKeys::new([purpose(&issuer()), purpose(&v2)], retired).unwrap()
    };
    let mut sc = SecurityCard::new(0xAA02, both(vec![], IssuerKeys::purchase));
    let mut h = proto::hsm::Hsm::new(0xBB02, both(vec![], IssuerKeys::load));
    purchase(&mut old, &mut sc, 100, "p1");
    purchase(&mut new, &mut sc, 100, "p2");
    load(&mut old, &mut h, 500, "l1");
    load(&mut new, &mut h, 500, "l2");

    // Version 1 retired.
    let mut sc = SecurityCard::new(0xAA03, both(vec![1], IssuerKeys::purchase));
    let mut h = proto::hsm::Hsm::new(0xBB03, both(vec![1], IssuerKeys::load));
    assert_eq!(
        sc.issue_debit(&draw(&mut old, 100, "p3"), TODAY, false),
        Err(SecurityCardError::RetiredKeyVersion { card: 1 })
    );
    purchase(&mut new, &mut sc, 100, "p4");
    load(&mut old, &mut h, 500, "l3");

    // Only version 2 held: a version-1 card is unknown, and the newest is named.
    let mut sc = SecurityCard::new(0xAA04, v2.purchase());
    assert_eq!(
        sc.issue_debit(&draw(&mut old, 100, "p5"), TODAY, false),
        Err(SecurityCardError::UnknownKeyVersion { card: 1, ours: 2 })
    );

    // A key set must have an active version, each version once, and retire only its own.
    assert!(MasterKeys::new([issuer().purchase()], [1]).is_err());
    assert!(MasterKeys::new([issuer().purchase(), issuer().purchase()], []).is_err());
    assert!(MasterKeys::new([issuer().purchase()], [2]).is_err());
    assert_eq!(both(vec![1], IssuerKeys::purchase).newest().key_version, 2);
    assert_eq!(both(vec![2], IssuerKeys::purchase).newest().key_version, 1);
}

// ---- stale proofs (black-box finding): a proof made BEFORE the transaction's own
// INITIALIZE shows counters that a later LOAD / DEBIT moves; it must prove nothing ----

#[test]
fn a_zero_value_s1_made_before_the_load_is_stale_and_proves_nothing() {
    let mut card = card_with(1_000, 50_000);
    let mut hsm = hsm();
    // The attack: a zero-value INITIALIZE first (kept), then the real load, LOAD run on the
    // card, and the stale zero-value sent instead of S3 to have the hold released.
    let stale = init_load(&mut card, 0, 10).unwrap();
    let init = init_load(&mut card, 700, 10).unwrap();
    let cmd = hsm
        .authorize("ld", &init, Money::new(700, EUR), TODAY)
        .unwrap();
    ok(&mut card, &commands::load(&cmd));
    assert_eq!(read_purse(&mut card).balance, 1_700, "the card loaded");
    assert_eq!(
        hsm.resolve_negative("ld", &stale),
        Err(HsmError::StaleProof)
    );
    assert_eq!(hsm.total(EUR).amount, 0, "nothing settled on a stale proof");
    // A proof made after the load tells the truth: loaded.
    let fresh = init_load(&mut card, 0, 11).unwrap();
    assert!(fresh.init_count > init.init_count);
    let v = hsm.resolve_negative("ld", &fresh).unwrap();
    assert!(v.loaded(), "{v:?}");
    assert_eq!(hsm.total(EUR).amount, 700);
}

#[test]
fn a_fresh_zero_value_s1_ends_the_load_session_so_the_load_can_never_run_after_it() {
    let mut card = card_with(1_000, 50_000);
    let mut hsm = hsm();
    let init = init_load(&mut card, 700, 10).unwrap();
    let cmd = hsm
        .authorize("ld", &init, Money::new(700, EUR), TODAY)
        .unwrap();
    let zero = init_load(&mut card, 0, 11).unwrap();
    assert!(!hsm.resolve_negative("ld", &zero).unwrap().loaded());
    // The load command cannot run any more, not even after a new INITIALIZE for the same
    // amount (its S2 covers the old session's S1 and card random).
    assert_ne!(send(&mut card, &commands::load(&cmd)).sw, StatusWord::OK);
    init_load(&mut card, 700, 10).unwrap();
    assert_ne!(send(&mut card, &commands::load(&cmd)).sw, StatusWord::OK);
    assert_eq!(read_purse(&mut card).balance, 1_000);
}

#[test]
fn a_cancel_proof_made_before_the_draw_is_stale_and_reverses_nothing() {
    let mut card = card_with(10_000, 50_000);
    let mut security_card = security_card();
    // The attack: INITIALIZE #1 kept as the "proof", INITIALIZE #2 for the draw, DEBIT.
    select(&mut card);
    let stale = PurchaseInit::decode(&ok(&mut card, &commands::init_purchase(TODAY))).unwrap();
    let d = draw(&mut card, 100, "tx");
    let auth = security_card.issue_debit(&d, TODAY, false).unwrap();
    ok(&mut card, &commands::debit(&auth.command));
    assert_eq!(
        stale.atc, d.init.atc,
        "same counter: the old check was fooled"
    );
    assert_eq!(
        security_card.verify_not_debited(auth.command.security_card_txn, &stale),
        Err(SecurityCardError::StaleProof)
    );
    // A proof made after the DEBIT shows the counter moved.
    select(&mut card);
    let fresh = PurchaseInit::decode(&ok(&mut card, &commands::init_purchase(TODAY))).unwrap();
    assert!(
        security_card
            .verify_not_debited(auth.command.security_card_txn, &fresh)
            .is_err()
    );
}

/// Key update with a load (001 [0044]; 004's monthly key change): a version-1 card loaded by
/// an HSM that holds version 2 (and the purchase masters to re-key) comes out on version 2,
/// in the same state change as the credit, and buys under version 2 once version 1 is
/// retired. A key update tampered with, or one for another load, is refused with the whole
/// LOAD: nothing credited, nothing re-keyed, the card still works under version 1.
#[test]
fn a_load_re_keys_a_version_1_card_to_version_2_atomically() {
    use proto::crypto::DesKey;
    let v2 = IssuerKeys {
        key_version: 2,
        purchase_master: DesKey::new([0x33; 16]),
        load_master: DesKey::new([0x44; 16]),
    };
    let both = |retired: Vec<u8>, purpose: fn(&IssuerKeys) -> MasterKey| {
        MasterKeys::new([purpose(&issuer()), purpose(&v2)], retired).unwrap()
    };
    let mut h = proto::hsm::Hsm::new(0xBB03, both(vec![], IssuerKeys::load))
        .with_rekey(both(vec![1], IssuerKeys::purchase));
    let mut card = card_with(1_000, 10_000);
    assert_eq!(card.state.key_version, 1);

    // A tampered update: the LOAD is refused as a whole.
    let init = init_load(&mut card, 500, 1_000).unwrap();
    let cmd = h
        .authorize("l1", &init, Money::new(500, EUR), TODAY)
        .unwrap();
    let mut update = h
        .key_update(&init)
        .expect("a version-1 card gets an update");
    let last = update.len() - 1;
    update[last] ^= 1;
    let r = send(
        &mut card,
        &proto::card::commands::load_with_update(&cmd, Some(&update)),
    );
    assert!(!r.sw.is_ok(), "tampered update refused: {}", r.sw);
    assert_eq!((card.state.balance, card.state.key_version), (1_000, 1));
    // Another card's update (sealed under that card's key) is refused too.
    let again = init_load(&mut card, 500, 1_001).unwrap();
    let cmd2 = h
        .authorize("l2", &again, Money::new(500, EUR), TODAY)
        .unwrap();
    let mut someone_else = again.clone();
    someone_else.card_id ^= 1;
    let foreign = h.key_update(&someone_else).unwrap();
    let r = send(
        &mut card,
        &proto::card::commands::load_with_update(&cmd2, Some(&foreign)),
    );
    assert!(!r.sw.is_ok());
    assert_eq!((card.state.balance, card.state.key_version), (1_000, 1));

    // The genuine one: credited and re-keyed together; S3 is the old key's (the HSM checks
    // the answer under the version the load began with).
    let init = init_load(&mut card, 500, 1_002).unwrap();
    let cmd = h
        .authorize("l3", &init, Money::new(500, EUR), TODAY)
        .unwrap();
    let update = h.key_update(&init).unwrap();
    assert_eq!(
        h.key_update(&init).unwrap(),
        update,
        "deterministic for one load"
    );
    let resp = LoadResponse::decode(&ok(
        &mut card,
        &proto::card::commands::load_with_update(&cmd, Some(&update)),
    ))
    .unwrap();
    h.confirm("l3", &resp).unwrap();
    assert_eq!((card.state.balance, card.state.key_version), (1_500, 2));
    assert_eq!(card.state.keys, CardKeys::derive(&v2, card.state.card_id));
    // A version-2 card gets no update; with version 1 retired it buys under version 2.
    let init = init_load(&mut card, 1, 1_003).unwrap();
    assert_eq!(init.key_version, 2);
    assert!(h.key_update(&init).is_none());
    let mut sc = SecurityCard::new(0xAA03, both(vec![1], IssuerKeys::purchase));
    purchase(&mut card, &mut sc, 100, "p-after");
    assert_eq!(card.state.balance, 1_400);
}
