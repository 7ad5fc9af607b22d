//! Unloads (issue 17; 004 card-to-bank): value goes back from the card to the issuer, in
//! the load exchange reversed — INITIALIZE FOR UNLOAD (S1), the HSM's unload command (S2),
//! the card's proof (S3) — under labels of their own, and the negative-result procedure of
//! 001 [0129]–[0132] in reverse for a card that says "not unloaded" or never answers. The
//! issuer counts the value back only on the card's proof.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{CardFault, PurseCard, commands};
use proto::hsm::{HsmError, LoadVerdict, NegativeVerdict};
use proto::money::Money;
use proto::purse::*;

fn init_unload(card: &mut PurseCard, amount: u64) -> Result<LoadInit, StatusWord> {
    init_transfer(card, Direction::Unload, amount, EUR)
}

#[test]
fn an_unload_moves_value_back_only_on_the_card_s_proof() {
    let mut card = card_with(10_000, 100_000);
    let mut hsm = hsm();
    let init = init_unload(&mut card, 3_000).unwrap();
    let cmd = hsm
        .authorize_unload("u1", &init, Money::new(3_000, EUR), TODAY)
        .unwrap();
    assert_eq!(
        hsm.total_unloaded(EUR).amount,
        0,
        "nothing counted before the proof"
    );
    let resp = LoadResponse::decode(&ok(&mut card, &commands::unload(&cmd))).unwrap();
    assert!(resp.is_loaded());
    assert_eq!((resp.new_balance, card.state.balance), (7_000, 7_000));
    assert_eq!(hsm.confirm_unload("u1", &resp), Ok(LoadVerdict::Loaded));
    assert_eq!(
        hsm.confirm_unload("u1", &resp),
        Ok(LoadVerdict::Loaded),
        "idempotent"
    );
    assert_eq!(hsm.total_unloaded(EUR).amount, 3_000);
    assert_eq!(hsm.total(EUR).amount, 0, "no load counted");
    let log = card.state.log.back().unwrap();
    assert_eq!(
        (log.kind, log.amount, log.balance_after),
        (LogKind::Unload, 3_000, 7_000)
    );
    // Replayed: no session, then an old counter.
    assert_eq!(
        send(&mut card, &commands::unload(&cmd)).sw,
        StatusWord::WRONG_STATE
    );
    init_unload(&mut card, 1).unwrap();
    assert_eq!(
        send(&mut card, &commands::unload(&cmd)).sw,
        StatusWord::REPLAY
    );
    // More than the card holds: refused by the card, and by the HSM on a forged balance.
    assert_eq!(
        init_unload(&mut card, 7_001).unwrap_err(),
        StatusWord::INSUFFICIENT_VALUE
    );
    let mut init = init_unload(&mut card, 100).unwrap();
    init.balance = 1_000_000;
    assert_eq!(
        hsm.authorize_unload("u2", &init, Money::new(100, EUR), TODAY),
        Err(HsmError::BadS1)
    );
    assert_eq!(card.state.balance, 7_000);
}

#[test]
fn loads_and_unloads_never_stand_for_each_other() {
    let mut card = card_with(10_000, 100_000);
    let mut hsm = hsm();
    // A load's S1 offered as an unload's, and the reverse.
    let load_init = init_load(&mut card, 500, 1).unwrap();
    assert_eq!(
        hsm.authorize_unload("u1", &load_init, Money::new(500, EUR), TODAY),
        Err(HsmError::BadS1)
    );
    let unload_init = init_unload(&mut card, 500).unwrap();
    assert_eq!(
        hsm.authorize("l1", &unload_init, Money::new(500, EUR), TODAY),
        Err(HsmError::BadS1)
    );
    // A genuine load command (S2 for a load) sent as UNLOAD in an unload session: the
    // unload label does not verify; UNLOAD in a load session is out of turn.
    let load_init = init_load(&mut card, 500, 2).unwrap();
    let load_cmd = hsm
        .authorize("l2", &load_init, Money::new(500, EUR), TODAY)
        .unwrap();
    assert_eq!(
        send(&mut card, &commands::unload(&load_cmd)).sw,
        StatusWord::WRONG_STATE,
        "UNLOAD in a load session"
    );
    let unload_init = init_unload(&mut card, 500).unwrap();
    let mut as_unload = load_cmd.clone();
    as_unload.atc = unload_init.atc;
    assert_eq!(
        send(&mut card, &commands::unload(&as_unload)).sw,
        StatusWord::BAD_SIGNATURE
    );
    // An unload command sent as LOAD in an unload session: out of turn.
    let unload_init = init_unload(&mut card, 500).unwrap();
    let unload_cmd = hsm
        .authorize_unload("u2", &unload_init, Money::new(500, EUR), TODAY)
        .unwrap();
    assert_eq!(
        send(&mut card, &commands::load(&unload_cmd)).sw,
        StatusWord::WRONG_STATE
    );
    // No issuer item rides in an unload.
    let unload_init = init_unload(&mut card, 500).unwrap();
    let cmd = hsm
        .authorize_unload("u3", &unload_init, Money::new(500, EUR), TODAY)
        .unwrap();
    let mut apdu = commands::unload(&cmd);
    let lc = apdu.len() - 1;
    apdu.truncate(lc);
    apdu[4] += Unblock::SEALED_LEN as u8;
    apdu.extend_from_slice(&[0u8; Unblock::SEALED_LEN]);
    apdu.push(0);
    assert_eq!(send(&mut card, &apdu).sw, StatusWord::BAD_DATA);
    assert_eq!(card.state.balance, 10_000, "nothing moved");
    // A blocked card gives nothing up, but still answers the zero-value proof.
    card.state.status |= STATUS_BLOCKED;
    assert_eq!(init_unload(&mut card, 1).unwrap_err(), StatusWord::BLOCKED);
    assert!(init_unload(&mut card, 0).is_ok());
}

/// One unload with the card misbehaving as `fault` (or never answering): the verdict of
/// the negative-result procedure in reverse, and the balance after.
fn negative(fault: Option<CardFault>) -> (NegativeVerdict, u64, u64) {
    let mut card = card_with(10_000, 100_000);
    let mut hsm = hsm();
    let init = init_unload(&mut card, 2_500).unwrap();
    let cmd = hsm
        .authorize_unload("u1", &init, Money::new(2_500, EUR), TODAY)
        .unwrap();
    if let Some(f) = fault {
        card.state.fault = Some(f);
        let resp = LoadResponse::decode(&ok(&mut card, &commands::unload(&cmd))).unwrap();
        assert_eq!(
            hsm.confirm_unload("u1", &resp),
            Ok(LoadVerdict::NegativeNeedsProof)
        );
    }
    // A proof made before the unload's INITIALIZE shows nothing.
    assert_eq!(
        hsm.resolve_unload_negative(
            "u1",
            &LoadInit {
                amount: 0,
                ..init.clone()
            }
        ),
        Err(HsmError::BadS1),
        "the unload's own S1 (over its amount) is no zero-value proof"
    );
    let zero = init_unload(&mut card, 0).unwrap();
    let verdict = hsm.resolve_unload_negative("u1", &zero).unwrap();
    (verdict, card.state.balance, hsm.total_unloaded(EUR).amount)
}

#[test]
fn the_negative_result_procedure_in_reverse_tells_what_the_card_did() {
    assert_eq!(
        negative(Some(CardFault::TrueNegative)),
        (NegativeVerdict::TrueNegative, 10_000, 0)
    );
    assert_eq!(
        negative(Some(CardFault::FalseNegative)),
        (NegativeVerdict::FalseNegative, 7_500, 2_500),
        "unloaded though it said not: counted"
    );
    assert_eq!(
        negative(Some(CardFault::CounterBump)),
        (NegativeVerdict::CounterBumped, 10_000, 0)
    );
    assert_eq!(
        negative(None),
        (NegativeVerdict::TrueNegative, 10_000, 0),
        "never answered (card pulled): not unloaded"
    );
}

/// INITIALIZE FOR LOAD or UNLOAD of `amount` in `currency`.
fn init_in(
    card: &mut PurseCard,
    dir: Direction,
    amount: u64,
    currency: proto::money::Currency,
) -> LoadInit {
    init_transfer(card, dir, amount, currency).unwrap()
}

/// One whole load or unload of `amount` at `hsm`, confirmed.
fn run(
    card: &mut PurseCard,
    hsm: &mut proto::hsm::Hsm,
    dir: Direction,
    id: &str,
    amount: u64,
    currency: proto::money::Currency,
) {
    let init = init_in(card, dir, amount, currency);
    let money = Money::new(amount, currency);
    let (cmd, apdu): (LoadCommand, fn(&LoadCommand) -> Vec<u8>) = match dir {
        Direction::Load => (
            hsm.authorize(id, &init, money, TODAY).unwrap(),
            commands::load,
        ),
        Direction::Unload => (
            hsm.authorize_unload(id, &init, money, TODAY).unwrap(),
            commands::unload,
        ),
    };
    let resp = LoadResponse::decode(&ok(card, &apdu(&cmd))).unwrap();
    let verdict = match dir {
        Direction::Load => hsm.confirm(id, &resp),
        Direction::Unload => hsm.confirm_unload(id, &resp),
    };
    assert_eq!(verdict, Ok(LoadVerdict::Loaded));
}

/// The outside attack on unloads (F1, F2): a load or unload in doubt, then any other load
/// or unload of the card — its other purse, another HSM, another box — before the proof.
/// The card's load counter moved for that other one, and the HSM took it for this one
/// (5,000 created on an unload; a load charged that never reached the card). Now the card
/// names the sessions it carried out under S1, and the proof speaks of this one alone.
#[test]
fn another_load_or_unload_before_the_proof_is_not_taken_for_the_one_in_doubt() {
    let pts = proto::money::Currency::POINTS;
    for (doubt, between, currency) in [
        (Direction::Unload, Direction::Unload, EUR),
        (Direction::Unload, Direction::Load, pts),
        (Direction::Unload, Direction::Load, EUR),
        (Direction::Load, Direction::Unload, EUR),
        (Direction::Load, Direction::Load, EUR),
    ] {
        let mut card = card_with(10_000, 100_000);
        let (mut hsm, mut elsewhere) = (hsm(), proto::hsm::Hsm::new(0xBB02, issuer().load()));
        // In doubt: authorized, the command never reached the card.
        let init = init_in(&mut card, doubt, 3_000, EUR);
        let money = Money::new(3_000, EUR);
        match doubt {
            Direction::Load => hsm.authorize("x", &init, money, TODAY).unwrap(),
            Direction::Unload => hsm.authorize_unload("x", &init, money, TODAY).unwrap(),
        };
        run(&mut card, &mut elsewhere, between, "other", 1, currency);
        let zero = init_in(&mut card, doubt, 0, EUR);
        let verdict = match doubt {
            Direction::Load => hsm.resolve_negative("x", &zero),
            Direction::Unload => hsm.resolve_unload_negative("x", &zero),
        };
        assert_eq!(
            verdict,
            Ok(NegativeVerdict::CounterBumped),
            "{doubt:?} in doubt, {between:?} {currency:?} between: not carried out (the \
             counter moved for the other one)"
        );
        let moved_here = hsm.total(EUR).amount + hsm.total_unloaded(EUR).amount;
        assert_eq!(
            moved_here, 0,
            "{doubt:?}: nothing counted for the one in doubt"
        );
    }
    // The card truly said "not unloaded", then a load elsewhere: still not unloaded.
    let mut card = card_with(10_000, 100_000);
    let (mut hsm, mut elsewhere) = (hsm(), proto::hsm::Hsm::new(0xBB02, issuer().load()));
    let init = init_in(&mut card, Direction::Unload, 5_000, EUR);
    let cmd = hsm
        .authorize_unload("u1", &init, Money::new(5_000, EUR), TODAY)
        .unwrap();
    card.state.fault = Some(CardFault::TrueNegative);
    let resp = LoadResponse::decode(&ok(&mut card, &commands::unload(&cmd))).unwrap();
    assert_eq!(
        hsm.confirm_unload("u1", &resp),
        Ok(LoadVerdict::NegativeNeedsProof)
    );
    run(&mut card, &mut elsewhere, Direction::Load, "l", 100, EUR);
    let zero = init_in(&mut card, Direction::Unload, 0, EUR);
    assert!(!hsm.resolve_unload_negative("u1", &zero).unwrap().loaded());
    assert_eq!(
        card.state.balance + hsm.total_unloaded(EUR).amount,
        10_000 + elsewhere.total(EUR).amount,
        "conserved"
    );
}

/// When more loads and unloads ran since the one in doubt than the card names, the proof
/// cannot tell: refused, for an operator, rather than guessed.
#[test]
fn a_proof_that_no_longer_reaches_back_is_refused_not_guessed() {
    let mut card = card_with(10_000, 100_000);
    let (mut hsm, mut elsewhere) = (hsm(), proto::hsm::Hsm::new(0xBB02, issuer().load()));
    let init = init_in(&mut card, Direction::Load, 3_000, EUR);
    hsm.authorize("x", &init, Money::new(3_000, EUR), TODAY)
        .unwrap();
    for i in 0..RECENT_RUNS {
        run(
            &mut card,
            &mut elsewhere,
            Direction::Load,
            &format!("o{i}"),
            1,
            EUR,
        );
    }
    let zero = init_in(&mut card, Direction::Load, 0, EUR);
    assert_eq!(
        hsm.resolve_negative("x", &zero),
        Err(HsmError::ProofUnavailable)
    );
    // Points are no money to pay out: no unload of the points purse.
    select(&mut card);
    let r = send(
        &mut card,
        &commands::init_unload(&LoadInitRequest {
            amount: 1,
            currency: proto::money::Currency::POINTS,
            timestamp: 1,
            date: TODAY,
        }),
    );
    assert_eq!(r.sw, StatusWord::WRONG_CURRENCY);
}

/// The third outside attack (F1): one card session's S1 authorized under a second
/// transaction id got the same S2, and the card's one S3 confirmed both (an unload counted
/// twice; a load charged twice) — also after the first was forgotten. One S1, one
/// authorization.
#[test]
fn one_card_session_is_authorized_once_under_one_transaction_id() {
    for dir in [Direction::Load, Direction::Unload] {
        let mut card = card_with(10_000, 100_000);
        let mut hsm = hsm();
        let init = init_in(&mut card, dir, 1_000, EUR);
        let money = Money::new(1_000, EUR);
        let authorize = |hsm: &mut proto::hsm::Hsm, id: &str| match dir {
            Direction::Load => hsm.authorize(id, &init, money, TODAY),
            Direction::Unload => hsm.authorize_unload(id, &init, money, TODAY),
        };
        let cmd = authorize(&mut hsm, "a").unwrap();
        assert_eq!(
            authorize(&mut hsm, "a"),
            Ok(cmd.clone()),
            "a retry: the same"
        );
        assert!(
            matches!(authorize(&mut hsm, "b"), Err(HsmError::SessionUsed { .. })),
            "{dir:?}: the same S1 under another id"
        );
        let apdu = match dir {
            Direction::Load => commands::load(&cmd),
            Direction::Unload => commands::unload(&cmd),
        };
        let resp = LoadResponse::decode(&ok(&mut card, &apdu)).unwrap();
        let verdict = match dir {
            Direction::Load => hsm.confirm("a", &resp),
            Direction::Unload => hsm.confirm_unload("a", &resp),
        };
        assert_eq!(verdict, Ok(LoadVerdict::Loaded));
        assert!(hsm.forget("a"));
        assert!(
            matches!(authorize(&mut hsm, "c"), Err(HsmError::SessionUsed { .. })),
            "{dir:?}: nor after the first is forgotten"
        );
        let counted = hsm.total(EUR).amount + hsm.total_unloaded(EUR).amount;
        assert_eq!(counted, 1_000, "{dir:?}: counted once");
    }
}

/// (F2) One S1 authorized at two HSMs: the card carried out HSM A's command; HSM B's
/// proof must say "not by my command" — the card names the HSM of each session it ran.
#[test]
fn a_session_run_with_another_hsm_s_command_is_not_this_hsm_s() {
    let mut card = card_with(10_000, 100_000);
    let (mut a, mut b) = (hsm(), proto::hsm::Hsm::new(0xBB02, issuer().load()));
    let init = init_in(&mut card, Direction::Unload, 1_000, EUR);
    let money = Money::new(1_000, EUR);
    let cmd = a.authorize_unload("u", &init, money, TODAY).unwrap();
    b.authorize_unload("u", &init, money, TODAY).unwrap();
    let resp = LoadResponse::decode(&ok(&mut card, &commands::unload(&cmd))).unwrap();
    assert_eq!(a.confirm_unload("u", &resp), Ok(LoadVerdict::Loaded));
    let zero = init_in(&mut card, Direction::Unload, 0, EUR);
    assert!(!b.resolve_unload_negative("u", &zero).unwrap().loaded());
    assert_eq!(
        a.total_unloaded(EUR).amount + b.total_unloaded(EUR).amount,
        1_000,
        "given up once, counted once"
    );
    assert_eq!(card.state.balance, 9_000);
}
