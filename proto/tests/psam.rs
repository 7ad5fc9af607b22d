//! The PSAM application over its APDU interface: the [0093] replay (CARD ATR, INITIALIZE,
//! DEBIT RESPONSE) against a real purse card, FIG. 5's early release, reversal, the
//! not-debited proof, chained hotlist loading, refusals with their `94xx` and GET LAST ERROR,
//! and any bytes answered with a status word.

mod common;

use common::*;
use proptest::prelude::*;
use proto::apdu::{Response, StatusWord};
use proto::card::commands as purse;
use proto::hotlist::Hotlist;
use proto::psam::{self, Psam, PsamStatus, commands};
use proto::purse::*;
use proto::security_card::SecurityCardError;

fn keys_file() -> MasterKeysFile {
    MasterKeysFile {
        keys: vec![MasterKeyEntry {
            key_version: 1,
            master: hex::encode_upper(issuer().purchase_master.bytes()),
            retired: false,
        }],
    }
}

fn psam() -> Psam {
    let mut p = Psam::personalise(0xAA01, keys_file()).unwrap();
    ask_ok(&mut p, &commands::select());
    p
}

fn ask(p: &mut Psam, apdu: &[u8]) -> Response {
    Response::parse(&p.process(apdu).response).expect("a status word")
}

fn ask_ok(p: &mut Psam, apdu: &[u8]) -> Vec<u8> {
    let r = ask(p, apdu);
    assert_eq!(r.sw, StatusWord::OK, "APDU {}", hex::encode(apdu));
    r.data
}

fn status(p: &mut Psam) -> PsamStatus {
    PsamStatus::decode(&ask_ok(p, &commands::get_status())).unwrap()
}

fn last_error(p: &mut Psam) -> SecurityCardError {
    postcard::from_bytes(&ask_ok(p, &commands::get_last_error())).unwrap()
}

#[test]
fn fig4_replay_debits_the_card_and_counts_the_sale_once() {
    let mut card = card_with(1_000, 10_000);
    let mut p = psam();
    let d = draw(&mut card, 250, "tx-1");
    // INITIALIZE without the card's ATR first is out of sequence.
    let init = commands::initialize(&d, TODAY, false).unwrap();
    assert_eq!(ask(&mut p, &init).sw, StatusWord::WRONG_STATE);
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let auth = commands::decode_authorization(&ask_ok(&mut p, &init), false).unwrap();
    assert_eq!(auth.expected_card_signature, None);
    // The session is spent: the same INITIALIZE again needs a new ATR.
    assert_eq!(ask(&mut p, &init).sw, StatusWord::WRONG_STATE);
    let resp = DebitResponse::decode(&ok(&mut card, &purse::debit(&auth.command))).unwrap();
    assert_eq!(status(&mut p).totals.get(&EUR).map(|t| t.amount), None);
    let n = auth.command.security_card_txn;
    ask_ok(&mut p, &commands::debit_response(n, &resp));
    ask_ok(&mut p, &commands::debit_response(n, &resp)); // a repeat counts nothing more
    let s = status(&mut p);
    assert_eq!((s.totals[&EUR].count, s.totals[&EUR].amount), (1, 250));
    assert_eq!((s.security_card_id, s.txn_counter), (0xAA01, 1));
    assert_eq!(read_purse(&mut card).balance, 750);
    // A settled sale cannot be reversed: 948A and its number from GET LAST ERROR.
    assert_eq!(ask(&mut p, &commands::reverse(n)).sw, StatusWord(0x948A));
    assert_eq!(last_error(&mut p), SecurityCardError::AlreadyCompleted(n));
    assert_eq!(ask_ok(&mut p, &commands::forget(n)), [1]);
}

#[test]
fn fig5_initialize_hands_out_the_expected_signature_and_counts_at_once() {
    let mut card = card_with(1_000, 10_000);
    let mut p = psam();
    let d = draw(&mut card, 100, "tx-5");
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let init = commands::initialize(&d, TODAY, true).unwrap();
    let auth = commands::decode_authorization(&ask_ok(&mut p, &init), true).unwrap();
    let expected = auth.expected_card_signature.unwrap();
    let resp = DebitResponse::decode(&ok(&mut card, &purse::debit(&auth.command))).unwrap();
    assert!(
        proto::security_card::SecurityCard::signatures_match(&expected, &resp),
        "the card signs what the PSAM expects"
    );
    let mut forged = resp.clone();
    forged.new_balance += 1;
    assert!(
        !proto::security_card::SecurityCard::signatures_match(&expected, &forged),
        "the genuine signature with another new balance is not it"
    );
    assert_eq!(status(&mut p).totals[&EUR].amount, 100, "counted at issue");
    // Reversed (say the box never answered): the count goes back.
    ask_ok(&mut p, &commands::reverse(auth.command.security_card_txn));
    assert_eq!(status(&mut p).totals[&EUR].amount, 0);
}

/// A refund (CREDIT) through the PSAM's APDUs: counted off at issue, the card's signed
/// answer verified; a refund proved not credited counted back; a blind REVERSE refused.
#[test]
fn a_refund_over_apdus_is_counted_off_at_issue_and_back_only_on_proof() {
    let mut card = card_with(1_000, 10_000);
    let mut p = psam();
    // A sale first: the PSAM holds 600 to refund from.
    let d = draw(&mut card, 600, "tx-1");
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let auth = commands::decode_authorization(
        &ask_ok(&mut p, &commands::initialize(&d, TODAY, false).unwrap()),
        false,
    )
    .unwrap();
    let resp = DebitResponse::decode(&ok(&mut card, &purse::debit(&auth.command))).unwrap();
    ask_ok(
        &mut p,
        &commands::debit_response(auth.command.security_card_txn, &resp),
    );
    // The refund: INITIALIZE FOR CREDIT on the card, INITIALIZE CREDIT on the PSAM.
    let credit_for = |card: &mut proto::card::PurseCard, amount: u64| {
        select(card);
        let init = PurchaseInit::decode(&ok(card, &purse::init_credit(TODAY))).unwrap();
        proto::security_card::DrawData {
            merchant_id: "M-CABLE".into(),
            transaction_id: "RF-tx-1".into(),
            amount: proto::money::Money::new(amount, EUR),
            init,
        }
    };
    let c = credit_for(&mut card, 400);
    let apdu = commands::initialize_credit(&c, TODAY).unwrap();
    assert_eq!(
        ask(&mut p, &apdu).sw,
        StatusWord::WRONG_STATE,
        "CARD ATR first"
    );
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let cc = CreditCommand::decode(&ask_ok(&mut p, &apdu)).unwrap();
    assert_eq!(
        status(&mut p).totals[&EUR].amount,
        200,
        "counted off at issue"
    );
    let n = cc.0.security_card_txn;
    assert_eq!(ask(&mut p, &commands::reverse(n)).sw, StatusWord(0x9493));
    assert_eq!(last_error(&mut p), SecurityCardError::CreditNeedsProof(n));
    let resp = CreditResponse::decode(&ok(&mut card, &purse::credit(&cc))).unwrap();
    ask_ok(&mut p, &commands::credit_response(n, &resp));
    assert_eq!(read_purse(&mut card).balance, 800);
    // More than is left to refund: 9492.
    let c = credit_for(&mut card, 201);
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    assert_eq!(
        ask(&mut p, &commands::initialize_credit(&c, TODAY).unwrap()).sw,
        StatusWord(0x9492)
    );
    // Issued, never run: the card's proof counts it back.
    let c = credit_for(&mut card, 150);
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let cc = CreditCommand::decode(&ask_ok(
        &mut p,
        &commands::initialize_credit(&c, TODAY).unwrap(),
    ))
    .unwrap();
    assert_eq!(status(&mut p).totals[&EUR].amount, 50);
    select(&mut card);
    let proof = PurchaseInit::decode(&ok(&mut card, &purse::init_purchase_proof(TODAY))).unwrap();
    let answer = ask_ok(
        &mut p,
        &commands::resolve_credit(cc.0.security_card_txn, &proof),
    );
    assert_eq!(answer[0], 0, "not credited");
    assert_eq!(status(&mut p).totals[&EUR].amount, 200);
    assert_eq!(read_purse(&mut card).balance, 800);
}

#[test]
fn refusals_answer_their_status_word_and_their_fields() {
    let mut card = card_with(50, 10_000);
    let mut p = psam();
    let d = draw(&mut card, 80, "tx-2");
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let r = ask(&mut p, &commands::initialize(&d, TODAY, false).unwrap());
    assert_eq!(r.sw, StatusWord(0x9485));
    assert_eq!(
        last_error(&mut p),
        SecurityCardError::InsufficientValue {
            balance: 50,
            amount: 80
        }
    );
    // A tampered balance breaks the card's MAC: 9481.
    let mut forged = draw(&mut card, 10, "tx-3");
    forged.init.balance = 1_000_000;
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let r = ask(
        &mut p,
        &commands::initialize(&forged, TODAY, false).unwrap(),
    );
    assert_eq!(r.sw, psam::status_word(&SecurityCardError::BadCardData));
    // A hotlist, chained over several blocks, blocks the card: 948F.
    let list = Hotlist {
        version: 3,
        card_ids: (0..200u64).chain([d.init.card_id]).collect(),
    };
    let blocks = commands::load_hotlist(&list);
    assert!(blocks.len() > 1, "the list needs chaining");
    for b in &blocks {
        ask_ok(&mut p, b);
    }
    assert_eq!(status(&mut p).hotlist_version, 3);
    let fresh = draw(&mut card, 10, "tx-4");
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let r = ask(&mut p, &commands::initialize(&fresh, TODAY, false).unwrap());
    assert_eq!(r.sw, StatusWord(0x948F));
    // An older list is ignored.
    for b in commands::load_hotlist(&Hotlist::default()) {
        ask_ok(&mut p, &b);
    }
    assert_eq!(status(&mut p).hotlist_version, 3);
    // Nothing was counted, nothing debited.
    assert!(status(&mut p).totals.is_empty());
    assert_eq!(read_purse(&mut card).balance, 50);
}

#[test]
fn not_debited_proof_and_reversal_over_apdus() {
    let mut card = card_with(1_000, 10_000);
    let mut p = psam();
    let d = draw(&mut card, 100, "tx-6");
    ask_ok(&mut p, &commands::card_atr(&proto::card::CARD_ATR));
    let auth = commands::decode_authorization(
        &ask_ok(&mut p, &commands::initialize(&d, TODAY, false).unwrap()),
        false,
    )
    .unwrap();
    let n = auth.command.security_card_txn;
    // The box never sent the DEBIT: a fresh INITIALIZE proves it.
    let proof = draw(&mut card, 100, "tx-6").init;
    ask_ok(&mut p, &commands::verify_not_debited(n, &proof));
    // The draw's own INITIALIZE is a stale proof.
    let r = ask(&mut p, &commands::verify_not_debited(n, &d.init));
    assert_eq!(r.sw, StatusWord(0x948D));
    ask_ok(&mut p, &commands::reverse(n));
    ask_ok(&mut p, &commands::reverse(n)); // idempotent
    assert_eq!(
        ask(&mut p, &commands::reverse(n + 7)).sw,
        StatusWord(0x9487)
    );
    assert_eq!(
        last_error(&mut p),
        SecurityCardError::UnknownTransaction(n + 7)
    );
}

#[test]
fn sequence_and_format_errors_are_iso_status_words() {
    let mut p = Psam::personalise(1, keys_file()).unwrap();
    // Nothing before SELECT.
    assert_eq!(
        ask(&mut p, &commands::get_status()).sw,
        StatusWord::WRONG_STATE
    );
    let mut wrong = commands::select();
    *wrong.last_mut().unwrap() ^= 1;
    assert_eq!(ask(&mut p, &wrong).sw, StatusWord::APP_NOT_FOUND);
    ask_ok(&mut p, &commands::select());
    assert_eq!(ask(&mut p, &[0x80, 0x30]).sw, StatusWord::WRONG_LENGTH);
    assert_eq!(
        ask(&mut p, &[0x00, 0x30, 0, 0, 0]).sw,
        StatusWord::CLASS_NOT_SUPPORTED
    );
    assert_eq!(
        ask(&mut p, &[0x80, 0x77, 0, 0, 0]).sw,
        StatusWord::UNKNOWN_INSTRUCTION
    );
    // An ATR that is not one, and a chained block of a command that takes no chaining.
    assert_eq!(
        ask(&mut p, &commands::card_atr(&[0x12, 0x34])).sw,
        StatusWord::BAD_DATA
    );
    assert_eq!(
        ask(&mut p, &[0x90, 0x16, 0, 0, 1, 0]).sw,
        StatusWord::WRONG_STATE
    );
    // A chain switched to another INS mid-way is refused and dropped.
    ask_ok(&mut p, &[0x90, 0x1C, 0, 0, 4, 0, 0, 0, 1]);
    assert_eq!(
        ask(&mut p, &[0x80, 0x1E, 0, 0, 1, 0]).sw,
        StatusWord::WRONG_STATE
    );
    // No refusal yet: GET LAST ERROR has nothing to say.
    assert_eq!(
        ask(&mut p, &commands::get_last_error()).sw,
        StatusWord::WRONG_STATE
    );
    // State survives a round trip through its persistent form, keys and hotlist included.
    let again = Psam::new(p.state()).unwrap();
    assert_eq!(again.status(), p.status());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1_000))]

    #[test]
    fn psam_answers_any_bytes_with_a_status_word_and_counts_nothing(
        ins in prop::sample::select(vec![0x10u8, 0x12, 0x14, 0x16, 0x18, 0x1A, 0x1C, 0x1E, 0x30, 0x3E, 0x55]),
        cla in prop::sample::select(vec![0x80u8, 0x90, 0x00]),
        p1 in 0u8..3,
        body in proptest::collection::vec(any::<u8>(), 0..260),
        raw in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let mut p = psam();
        let _ = p.process(&commands::card_atr(&proto::card::CARD_ATR));
        let mut apdu = vec![cla, ins, p1, 0];
        if !body.is_empty() && body.len() < 256 {
            apdu.push(body.len() as u8);
            apdu.extend_from_slice(&body);
        }
        for bytes in [apdu, raw] {
            let out = p.process(&bytes).response;
            prop_assert!(Response::parse(&out).is_ok());
        }
        ask_ok(&mut p, &commands::select()); // ends any half-chained command
        prop_assert!(status(&mut p).totals.is_empty());
    }
}
