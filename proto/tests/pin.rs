//! Seed 004's PIN threshold (MIN_TRANS/MAX_TRANS) on the purse card: a DEBIT above the
//! card's threshold needs VERIFY of the cardholder PIN in the same session; up to it, OK
//! alone. Three wrong PINs block the PIN, not the purchases under the threshold.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{PinRule, PurseCard, commands, pin_block};
use proto::purse::{DebitResponse, PurchaseInit};
use proto::security_card::SecurityCard;

const PIN: &str = "4711";
/// 5.00 EUR.
const THRESHOLD: u64 = 500;

fn card() -> PurseCard {
    let c = card_with(10_000, 100_000);
    PurseCard::new(c.state.with_pin(PIN, THRESHOLD).unwrap(), 7)
}

/// SELECT, VERIFY (if `pin`), INITIALIZE, the security card's debit command, DEBIT: the
/// DEBIT's status word.
fn buy(card: &mut PurseCard, sc: &mut SecurityCard, amount: u64, pin: Option<&str>) -> StatusWord {
    let fci = ok(card, &commands::select());
    assert_eq!(
        PinRule::from_fci(&fci),
        Some(PinRule {
            threshold: THRESHOLD,
            tries_left: card.state.pin.as_ref().unwrap().tries_left
        }),
        "SELECT tells the box the rule"
    );
    if let Some(p) = pin {
        let r = send(card, &commands::verify_pin(p).unwrap());
        if !r.sw.is_ok() {
            return r.sw;
        }
    }
    init_and_debit(card, sc, amount)
}

#[test]
fn under_the_threshold_ok_alone_above_it_the_pin() {
    let mut c = card();
    let mut sc = security_card();
    assert_eq!(
        buy(&mut c, &mut sc, 499, None),
        StatusWord::OK,
        "4.99: OK alone"
    );
    assert_eq!(
        buy(&mut c, &mut sc, 500, None),
        StatusWord::OK,
        "5.00: at the threshold"
    );
    assert_eq!(
        buy(&mut c, &mut sc, 2_995, None),
        StatusWord::PIN_REQUIRED,
        "29.95 without the PIN"
    );
    assert_eq!(
        c.state.balance,
        10_000 - 999,
        "the refused DEBIT moved nothing"
    );
    assert_eq!(buy(&mut c, &mut sc, 2_995, Some(PIN)), StatusWord::OK);
    assert_eq!(c.state.balance, 10_000 - 999 - 2_995);
}

/// INITIALIZE (no SELECT, no VERIFY) and the DEBIT the security card signs for `amount`,
/// settled in the security card (completed, or reversed if the card refused): the DEBIT's
/// status word.
fn init_and_debit(c: &mut PurseCard, sc: &mut SecurityCard, amount: u64) -> StatusWord {
    let init = PurchaseInit::decode(&ok(c, &commands::init_purchase(TODAY))).unwrap();
    let d = proto::security_card::DrawData {
        merchant_id: "M-CABLE".into(),
        transaction_id: format!("t-{}", init.atc),
        amount: proto::money::Money::new(amount, EUR),
        init,
    };
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let r = send(c, &commands::debit(&auth.command));
    if r.sw.is_ok() {
        let resp = DebitResponse::decode(&r.data).unwrap();
        sc.complete(auth.command.security_card_txn, &resp).unwrap();
    } else {
        sc.reverse(auth.command.security_card_txn).unwrap();
    }
    r.sw
}

#[test]
fn a_verified_pin_lasts_one_debit_and_no_longer_than_the_session() {
    let mut c = card();
    let mut sc = security_card();
    assert_eq!(buy(&mut c, &mut sc, 2_995, Some(PIN)), StatusWord::OK);
    // The next DEBIT in the same session (a new INITIALIZE, no new VERIFY) needs it again.
    assert_eq!(
        init_and_debit(&mut c, &mut sc, 2_995),
        StatusWord::PIN_REQUIRED
    );
    // A VERIFY, then a SELECT (or a reset): forgotten.
    ok(&mut c, &commands::select());
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    ok(&mut c, &commands::select());
    assert_eq!(
        init_and_debit(&mut c, &mut sc, 2_995),
        StatusWord::PIN_REQUIRED
    );
}

#[test]
fn three_wrong_pins_block_pin_purchases_but_not_those_under_the_threshold() {
    let mut c = card();
    let mut sc = security_card();
    for left in [2, 1, 0] {
        let sw = buy(&mut c, &mut sc, 2_995, Some("0000"));
        assert_eq!(sw, StatusWord::wrong_pin(left));
        assert_eq!(sw.pin_tries_left(), Some(left));
    }
    // Blocked: even the right PIN is refused, and nothing moves.
    assert_eq!(
        buy(&mut c, &mut sc, 2_995, Some(PIN)),
        StatusWord::wrong_pin(0)
    );
    assert_eq!(c.state.balance, 10_000);
    assert_eq!(c.state.pin.as_ref().unwrap().tries_left, 0);
    // Under the threshold, OK alone still buys.
    assert_eq!(buy(&mut c, &mut sc, 450, None), StatusWord::OK);
    assert_eq!(c.state.balance, 10_000 - 450);
}

#[test]
fn a_right_pin_restores_the_tries_and_each_wrong_one_is_persisted() {
    let mut c = card();
    ok(&mut c, &commands::select());
    let r = c.process(&commands::verify_pin("9999").unwrap());
    assert!(
        r.state_changed,
        "a wrong PIN's try is persisted before the answer"
    );
    assert_eq!(c.state.pin.as_ref().unwrap().tries_left, 2);
    let r = c.process(&commands::verify_pin(PIN).unwrap());
    assert!(r.response.ends_with(&[0x90, 0x00]) && r.state_changed);
    assert_eq!(c.state.pin.as_ref().unwrap().tries_left, 3);
}

#[test]
fn verify_refuses_malformed_input_and_cards_without_a_pin() {
    let mut c = card();
    // Not selected.
    assert_eq!(
        send(&mut c, &commands::verify_pin(PIN).unwrap()).sw,
        StatusWord::WRONG_STATE
    );
    ok(&mut c, &commands::select());
    // A block of the wrong length, wrong P2: nothing counted.
    let short = proto::apdu::Command::new(0x00, 0x20, 0, 0x80, vec![0x24, 0x71], None).to_bytes();
    assert_eq!(send(&mut c, &short).sw, StatusWord::BAD_DATA);
    let p2 = proto::apdu::Command::new(0x00, 0x20, 0, 0x81, pin_block(PIN).unwrap().to_vec(), None)
        .to_bytes();
    assert_eq!(send(&mut c, &p2).sw, StatusWord::WRONG_P1P2);
    assert_eq!(c.state.pin.as_ref().unwrap().tries_left, 3);
    // A card without a PIN.
    let mut plain = card_with(1_000, 10_000);
    let fci = ok(&mut plain, &commands::select());
    assert_eq!(PinRule::from_fci(&fci), None);
    assert_eq!(
        send(&mut plain, &commands::verify_pin(PIN).unwrap()).sw,
        StatusWord::NO_PIN
    );
}

#[test]
fn pin_blocks_are_iso_9564_format_2() {
    assert_eq!(
        pin_block("4711").unwrap(),
        [0x24, 0x47, 0x11, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]
    );
    assert_eq!(
        pin_block("123456789012").unwrap(),
        [0x2C, 0x12, 0x34, 0x56, 0x78, 0x90, 0x12, 0xFF]
    );
    for bad in ["", "123", "1234567890123", "12a4", "12 34"] {
        assert_eq!(pin_block(bad), None, "{bad:?}");
    }
    assert!(commands::verify_pin("12").is_none());
}

#[test]
fn the_pin_never_shows_in_debug() {
    let c = card();
    let shown = format!("{:?}", c.state);
    assert!(shown.contains("tries_left: 3"), "{shown}");
    // 0x47 0x11 are the PIN's digits in the block.
    assert!(
        !shown.contains("71, 17") && !shown.contains("[36, 71"),
        "{shown}"
    );
}

/// A DEBIT sent with a wrong Le is answered `6Cxx` and undone — the verified PIN with it:
/// the reader's resend with the right Le still has it (ISO 7816-4 §5.1.3).
#[test]
fn a_debit_resent_after_6cxx_keeps_the_verified_pin() {
    let mut c = card();
    let mut sc = security_card();
    ok(&mut c, &commands::select());
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    let init = PurchaseInit::decode(&ok(&mut c, &commands::init_purchase(TODAY))).unwrap();
    let d = proto::security_card::DrawData {
        merchant_id: "M-CABLE".into(),
        transaction_id: "le".into(),
        amount: proto::money::Money::new(2_995, EUR),
        init,
    };
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let mut wrong_le = commands::debit(&auth.command);
    *wrong_le.last_mut().unwrap() = 1;
    let r = send(&mut c, &wrong_le);
    assert_eq!(r.sw.sw1(), 0x6C, "{}", r.sw);
    assert_eq!(c.state.balance, 10_000, "undone");
    let mut right_le = commands::debit(&auth.command);
    *right_le.last_mut().unwrap() = r.sw.sw2();
    assert_eq!(send(&mut c, &right_le).sw, StatusWord::OK);
    assert_eq!(c.state.balance, 10_000 - 2_995);
}
