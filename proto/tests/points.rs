//! 002's loyalty points ([0160]–[0166]) on the card: a second purse, redeemed by a draw in
//! points and loaded like money, each under the points purse's own keys. A card with 30,000
//! points redeems 20,000 and keeps 10,000, its money untouched; 5,000 points are loaded
//! through the HSM. Tampered, replayed and wrong-key commands are refused.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{POINTS_MAX, PurseCard, commands};
use proto::crypto;
use proto::money::{Currency, Money};
use proto::purse::*;
use proto::security_card::{DrawData, SecurityCardError};

const PTS: Currency = Currency::POINTS;

fn card_with_points(points: u64) -> PurseCard {
    let mut c = card_with(10_000, 100_000);
    c.state.points = points;
    c
}

/// SELECT + INITIALIZE FOR PURCHASE of the points purse, as a draw of `points`.
fn points_draw(card: &mut PurseCard, points: u64) -> DrawData {
    select(card);
    let init =
        PurchaseInit::decode(&ok(card, &commands::init_purchase_of(Purse::Points, TODAY))).unwrap();
    DrawData {
        merchant_id: "M-MILES".into(),
        transaction_id: "redeem-1".into(),
        amount: Money::new(points, PTS),
        init,
    }
}

#[test]
fn a_card_with_30000_points_redeems_20000_and_keeps_10000() {
    let mut card = card_with_points(30_000);
    let mut sc = security_card();
    let d = points_draw(&mut card, 20_000);
    assert_eq!((d.init.balance, d.init.currency), (30_000, PTS));
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    assert_eq!((resp.new_balance, resp.currency), (10_000, PTS));
    sc.complete(auth.command.security_card_txn, &resp).unwrap();
    let info = read_purse(&mut card);
    assert_eq!(
        (info.points, info.balance),
        (10_000, 10_000),
        "money untouched"
    );
    let log = card.state.log.back().unwrap();
    assert_eq!(
        (log.kind, log.amount, log.currency, log.balance_after),
        (LogKind::Debit, 20_000, PTS, 10_000),
        "the points log record"
    );
    assert_eq!(sc.total(PTS).amount, 20_000, "points totals");
    assert_eq!(sc.total(EUR).amount, 0);
    let records = sc.collection();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0].amount, Money::new(20_000, PTS));
    // More points than the card holds.
    let d = points_draw(&mut card, 10_001);
    assert!(matches!(
        sc.issue_debit(&d, TODAY, false),
        Err(SecurityCardError::InsufficientValue { .. })
    ));
}

#[test]
fn the_purses_do_not_mix_and_each_has_its_own_keys() {
    let mut card = card_with_points(30_000);
    let mut sc = security_card();
    // A points INITIALIZE passed off as money: its MAC (under the points key) fails.
    let mut d = points_draw(&mut card, 100);
    d.init.currency = EUR;
    d.amount = Money::new(100, EUR);
    assert_eq!(
        sc.issue_debit(&d, TODAY, false).unwrap_err(),
        SecurityCardError::BadCardData
    );
    // Money asked of the points purse, signed under the points session key: refused by
    // currency; the same signed under the money key: a bad signature.
    for (key_purse, currency, sw) in [
        (Purse::Points, EUR, StatusWord::WRONG_CURRENCY),
        (
            Purse::Points,
            Currency::AUTHENTICATION,
            StatusWord::WRONG_CURRENCY,
        ),
        (Purse::Money, PTS, StatusWord::BAD_SIGNATURE),
    ] {
        select(&mut card);
        let init = PurchaseInit::decode(&ok(
            &mut card,
            &commands::init_purchase_of(Purse::Points, TODAY),
        ))
        .unwrap();
        let sk = issuer()
            .purchase()
            .purse_purchase_session(key_purse, init.card_id, init.atc);
        let mut dc = DebitCommand {
            security_card_id: 0xAA01,
            security_card_txn: 9,
            card_id: init.card_id,
            atc: init.atc,
            amount: if currency == Currency::AUTHENTICATION {
                0
            } else {
                100
            },
            currency,
            date: TODAY,
            security_card_signature: [0; 8],
        };
        dc.security_card_signature =
            crypto::sign(&sk, b"DCMD", &dc.signed_fields(&init.card_random));
        assert_eq!(
            send(&mut card, &commands::debit(&dc)).sw,
            sw,
            "{key_purse:?} {currency:?}"
        );
    }
    assert_eq!((card.state.points, card.state.balance), (30_000, 10_000));
    // A genuine redemption's command replayed: no session, then an old counter.
    let d = points_draw(&mut card, 100);
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    ok(&mut card, &commands::debit(&auth.command));
    assert_eq!(
        send(&mut card, &commands::debit(&auth.command)).sw,
        StatusWord::WRONG_STATE
    );
    points_draw(&mut card, 1);
    assert_eq!(
        send(&mut card, &commands::debit(&auth.command)).sw,
        StatusWord::REPLAY
    );
    assert_eq!(card.state.points, 29_900, "redeemed once");
    // Money still buys with the money keys.
    purchase(&mut card, &mut sc, 499, "sale-1");
    assert_eq!((card.state.points, card.state.balance), (29_900, 9_501));
}

fn init_points_load(card: &mut PurseCard, amount: u64) -> Result<LoadInit, StatusWord> {
    init_transfer(card, Direction::Load, amount, PTS)
}

#[test]
fn five_thousand_points_are_loaded_like_money() {
    let mut card = card_with_points(0);
    let mut hsm = hsm();
    let init = init_points_load(&mut card, 5_000).unwrap();
    assert_eq!(
        (init.balance, init.max_balance, init.currency),
        (0, POINTS_MAX, PTS)
    );
    let cmd = hsm
        .authorize("load-pts", &init, Money::new(5_000, PTS), TODAY)
        .unwrap();
    let resp = LoadResponse::decode(&ok(&mut card, &commands::load(&cmd))).unwrap();
    assert!(resp.is_loaded());
    assert_eq!((resp.new_balance, resp.currency), (5_000, PTS));
    hsm.confirm("load-pts", &resp).unwrap();
    assert_eq!((card.state.points, card.state.balance), (5_000, 10_000));
    let log = card.state.log.back().unwrap();
    assert_eq!(
        (log.kind, log.amount, log.currency),
        (LogKind::Load, 5_000, PTS)
    );
    // The same LOAD again: no session.
    assert_eq!(
        send(&mut card, &commands::load(&cmd)).sw,
        StatusWord::WRONG_STATE
    );
    // Over the points purse's maximum.
    assert_eq!(
        init_points_load(&mut card, POINTS_MAX).unwrap_err(),
        StatusWord::OVER_MAX_BALANCE
    );
    // A points load's S2 made under the money load key: a bad signature, nothing loaded.
    let init = init_points_load(&mut card, 10).unwrap();
    let mut forged = LoadCommand {
        hsm_id: 0xBB01,
        card_id: init.card_id,
        atc: init.atc,
        amount: 10,
        currency: PTS,
        passbook_through: 0,
        s2: [0; 8],
    };
    let money_key = issuer().card_keys(init.card_id).load;
    forged.s2 = crypto::sign(&money_key, b"S2LD", &forged.signed_fields(&init.s1));
    assert_eq!(
        send(&mut card, &commands::load(&forged)).sw,
        StatusWord::BAD_SIGNATURE
    );
    // An issuer item (here a would-be UNBLOCK) in a points load: refused whole.
    let init = init_points_load(&mut card, 10).unwrap();
    let cmd = hsm
        .authorize("load-pts-2", &init, Money::new(10, PTS), TODAY)
        .unwrap();
    assert_eq!(
        send(
            &mut card,
            &commands::load_with_issuer(&cmd, None, Some(&[0u8; Unblock::SEALED_LEN]))
        )
        .sw,
        StatusWord::BAD_DATA
    );
    assert_eq!(card.state.points, 5_000, "nothing more loaded");
    // The HSM gives a points load no key update and no UNBLOCK.
    assert_eq!(hsm.unblock(&init), None);
}
