//! 002 FIG. 16, the authentication embodiment, on the card and the security card: a "draw"
//! of zero in the specially assigned currency (ISO 4217 999, `XXX`) moves the card's
//! counter and log, not its balance; the security card verifies the card's signature
//! ("authentication OK") and counts nothing; no collection record. Value in that currency,
//! a zero in money, a tampered or replayed command, and the wrong keys are refused.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::commands;
use proto::crypto;
use proto::money::{Currency, Money};
use proto::psam::status_word;
use proto::purse::{DebitCommand, DebitResponse, PurchaseInit};
use proto::security_card::{DrawData, SecurityCard, SecurityCardError};

/// SELECT + INITIALIZE, as a draw for `amount`.
fn draw_for(card: &mut proto::card::PurseCard, amount: Money) -> DrawData {
    DrawData {
        amount,
        ..draw(card, 1, "auth-1")
    }
}

#[test]
fn the_counter_moves_the_balance_does_not_and_nothing_is_counted() {
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    let d = draw_for(&mut card, Money::authentication());
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    assert_eq!(
        (auth.command.amount, auth.command.currency),
        (0, Currency::AUTHENTICATION),
        "the draw amount state is zero"
    );
    let resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    assert_eq!((resp.amount, resp.new_balance), (0, 10_000));
    let info = read_purse(&mut card);
    assert_eq!(
        (info.balance, info.atc),
        (10_000, 1),
        "counter +1, balance kept"
    );
    let log = &card.state.log;
    assert_eq!(log.len(), 1, "the card logs it");
    assert_eq!(
        (log[0].amount, log[0].currency),
        (0, Currency::AUTHENTICATION)
    );
    // The security card verifies the card's signature: "authentication OK".
    sc.complete(auth.command.security_card_txn, &resp).unwrap();
    assert!(sc.totals.is_empty(), "nothing counted: {:?}", sc.totals);
    assert!(sc.collection().is_empty(), "no collection record");
    // A sale after it is counted and collected as ever.
    purchase(&mut card, &mut sc, 499, "sale-1");
    assert_eq!(sc.total(EUR).amount, 499);
    assert_eq!(sc.collection().len(), 1);
    // A forged card signature on an authentication is refused like any other.
    let d = draw_for(&mut card, Money::authentication());
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let mut resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    resp.card_signature[0] ^= 1;
    assert_eq!(
        sc.complete(auth.command.security_card_txn, &resp),
        Err(SecurityCardError::BadCardSignature)
    );
}

#[test]
fn any_card_currency_authenticates_but_no_value_rides_in_it() {
    // A yen card authenticates too: the currency is the authentication's own.
    let mut card = card_with(10_000, 100_000);
    card.state.currency = Currency::JPY;
    let mut sc = security_card();
    let d = draw_for(&mut card, Money::authentication());
    assert!(sc.issue_debit(&d, TODAY, false).is_ok());
    // Value in the authentication currency: refused by the security card.
    let d = draw_for(&mut card, Money::new(5, Currency::AUTHENTICATION));
    let e = sc.issue_debit(&d, TODAY, false).unwrap_err();
    assert_eq!(e, SecurityCardError::ValueInAuthentication { amount: 5 });
    assert_eq!(
        status_word(&e),
        StatusWord(0x9491),
        "the PSAM's status word"
    );
    // Zero in money is still no purchase.
    let d = draw_for(&mut card, Money::new(0, Currency::JPY));
    assert_eq!(
        sc.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::ZeroAmount)
    );
    // An expired card does not authenticate.
    let mut old = card_with(10_000, 100_000);
    let d = draw_for(&mut old, Money::authentication());
    let later = proto::purse::Date::new(2029, 1, 2);
    assert_eq!(
        sc.issue_debit(&d, later, false),
        Err(SecurityCardError::Expired)
    );
}

/// A debit command as a genuine security card would sign it for this card's session,
/// with `amount` and `currency` (what a security card of the issuer could be made to say;
/// the card's own checks must refuse the rest).
fn signed_command(card: &mut proto::card::PurseCard, amount: u64, currency: Currency) -> Vec<u8> {
    select(card);
    let init = PurchaseInit::decode(&ok(card, &commands::init_purchase(TODAY))).unwrap();
    let sk = issuer().purchase().purchase_session(init.card_id, init.atc);
    let mut dc = DebitCommand {
        security_card_id: 0xAA01,
        security_card_txn: 1,
        card_id: init.card_id,
        atc: init.atc,
        amount,
        currency,
        date: TODAY,
        security_card_signature: [0; 8],
    };
    dc.security_card_signature = crypto::sign(&sk, b"DCMD", &dc.signed_fields(&init.card_random));
    commands::debit(&dc)
}

#[test]
fn the_card_takes_zero_only_in_the_authentication_currency() {
    let mut card = card_with(10_000, 100_000);
    for (amount, currency, sw) in [
        (5, Currency::AUTHENTICATION, StatusWord::BAD_AMOUNT),
        (0, EUR, StatusWord::BAD_AMOUNT),
        (0, Currency::USD, StatusWord::WRONG_CURRENCY),
        (0, Currency::AUTHENTICATION, StatusWord::OK),
    ] {
        let apdu = signed_command(&mut card, amount, currency);
        let r = send(&mut card, &apdu);
        assert_eq!(r.sw, sw, "{amount} {currency:?}");
    }
    assert_eq!(card.state.balance, 10_000);
    assert_eq!(
        card.state.atc, 1,
        "only the authentication moved the counter"
    );
}

#[test]
fn a_purchase_cannot_be_turned_into_an_authentication_nor_replayed() {
    let mut card = card_with(10_000, 100_000);
    let mut sc = security_card();
    // The box rewrites a 4.99 debit command to 0 XXX: the signature no longer verifies.
    let d = draw(&mut card, 499, "sale-1");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let mut forged = auth.command.clone();
    forged.amount = 0;
    forged.currency = Currency::AUTHENTICATION;
    assert_eq!(
        send(&mut card, &commands::debit(&forged)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(card.state.bad_key_count, 1, "counted toward the lock");
    // A genuine authentication's command, replayed in a later session: refused.
    let d = draw_for(&mut card, Money::authentication());
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    ok(&mut card, &commands::debit(&auth.command));
    assert_eq!(
        send(&mut card, &commands::debit(&auth.command)).sw,
        StatusWord::WRONG_STATE,
        "no session"
    );
    draw(&mut card, 1, "next");
    assert_eq!(
        send(&mut card, &commands::debit(&auth.command)).sw,
        StatusWord::REPLAY
    );
    assert_eq!((card.state.balance, card.state.atc), (10_000, 1));
    // A security card of another issuer cannot read the card's INITIALIZE.
    let mut other = SecurityCard::new(
        0xAA02,
        proto::purse::IssuerKeys {
            purchase_master: proto::crypto::DesKey::new([0x77; 16]),
            ..issuer()
        }
        .purchase(),
    );
    let d = draw_for(&mut card, Money::authentication());
    assert_eq!(
        other.issue_debit(&d, TODAY, false).unwrap_err(),
        SecurityCardError::BadCardData
    );
}
