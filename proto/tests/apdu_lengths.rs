//! ISO 7816-4 lengths at the card: short APDUs get 6700, a wrong Le gets 6Cxx with the
//! right length and undoes the command, so the reader's resend runs it exactly once.

mod common;

use common::*;
use proto::apdu::{Command, StatusWord};
use proto::card::commands;
use proto::purse::*;

/// The command with its Le byte replaced.
fn with_le(apdu: &[u8], le: u8) -> Vec<u8> {
    let mut c = Command::parse(apdu).unwrap();
    c.le = Some(le);
    c.to_bytes()
}

#[test]
fn apdus_of_one_to_four_bytes_get_wrong_length() {
    let mut card = card_with(1_000, 10_000);
    for apdu in [
        &[0x00][..],
        &[0x80, 0xB0],
        &[0x80, 0xB0, 0x00],
        &[0x80, 0xB0, 0, 0],
    ] {
        assert_eq!(
            send(&mut card, apdu).sw,
            StatusWord::WRONG_LENGTH,
            "{apdu:02X?}"
        );
    }
    // The card still works afterwards.
    select(&mut card);
    assert_eq!(read_purse(&mut card).balance, 1_000);
}

#[test]
fn read_purse_with_a_short_le_gets_6c_and_the_exact_length() {
    let mut card = card_with(1_000, 10_000);
    select(&mut card);
    let full = ok(&mut card, &commands::read_purse());
    let r = send(&mut card, &with_le(&commands::read_purse(), 5));
    assert_eq!(r.sw, StatusWord(0x6C00 | full.len() as u16));
    assert!(r.data.is_empty());
    let exact = ok(
        &mut card,
        &with_le(&commands::read_purse(), full.len() as u8),
    );
    assert_eq!(exact, full);
}

#[test]
fn a_debit_with_a_wrong_le_is_undone_and_runs_once_on_the_resend() {
    let mut card = card_with(1_000, 10_000);
    let mut security_card = security_card();
    let d = draw(&mut card, 250, "t1");
    let auth = security_card.issue_debit(&d, TODAY, false).unwrap();
    let apdu = commands::debit(&auth.command);
    let r = send(&mut card, &with_le(&apdu, 3));
    assert_eq!(r.sw.sw1(), 0x6C, "{:?}", r.sw);
    let right = r.sw.sw2();
    assert_eq!(card.state.balance, 1_000, "nothing debited");
    assert!(card.state.log.is_empty());
    let resp = DebitResponse::decode(&ok(&mut card, &with_le(&apdu, right))).unwrap();
    assert_eq!(resp.new_balance, 750);
    assert_eq!(card.state.balance, 750, "debited once");
    // The session is spent: the same DEBIT again is refused.
    assert_ne!(send(&mut card, &apdu).sw, StatusWord::OK);
    assert_eq!(card.state.balance, 750);
}
