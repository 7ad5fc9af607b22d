//! Loads from a pre-funded account (001 [0141]–[0160]) over real QUIC on loopback: the
//! load server holds the voucher itself, no bank involved, with the same hold / capture /
//! release discipline; the conservation check after every test.

mod load_support;

use headend::funds::HoldState;
use load_support::*;
use proto::messages::*;
use proto::money::Money;

fn voucher_hold(he: &HeadEnd, txid: &str) -> Option<HoldState> {
    he.running
        .load
        .as_ref()
        .unwrap()
        .prefunded
        .hold(txid)
        .map(|h| h.state)
}

#[tokio::test]
async fn voucher_load_needs_no_bank_and_captures_into_the_float() {
    voucher_load(pg_rig::Backend::Sqlite).await;
}

#[tokio::test]
async fn voucher_load_needs_no_bank_and_captures_into_the_float_on_postgres() {
    voucher_load(pg_rig::Backend::Postgres).await;
}

async fn voucher_load(backend: pg_rig::Backend) {
    let Some(he) = start_on(backend).await else {
        return;
    };
    let mut b = LoadBox::new(&he, BOX1, 500, 100_000).await;
    let offer = b.offer(voucher_source(VOUCHER)).await;
    assert_eq!(
        offer.max_amount,
        Money::new(10_000, EUR),
        "the voucher's value"
    );
    assert_eq!(offer.limited_by, "funds");
    assert!(!offer.pin_required);
    let (offer, conf) = b.load(voucher_source(VOUCHER), 7_500, None).await;
    let Message::LoadConfirmation(c) = &conf else {
        panic!("{conf:?}")
    };
    assert!(c.loaded);
    assert_eq!(b.balance(), 8_000);
    assert_eq!(
        voucher_hold(&he, &offer.transaction_id),
        Some(HoldState::Captured)
    );
    let load = he.running.load.as_ref().unwrap();
    assert_eq!(
        load.prefunded
            .account(&proto::messages::voucher_ref(VOUCHER))
            .unwrap()
            .balance,
        2_500,
        "voucher debited"
    );
    // The bank saw nothing of it.
    let bank = he.running.bank.as_ref().unwrap();
    assert!(bank.funds.holds().is_empty());
    assert!(bank.funds.float().is_empty());
    let steps = load.journal().steps(&offer.transaction_id).unwrap();
    assert_eq!(
        steps,
        [
            "load offer made",
            "hold requested",
            "hold placed",
            "load request received",
            "S1 verified: load command issued",
            "load response received",
            "confirmation sealed",
            "hold captured: moved to the issuer float"
        ]
    );
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (7_500, 7_500, 7_500));
    if let Some(db) = &he.pg {
        db.assert_every_role_here(&he.cfg.state_dir, &["gateway", "load"]);
    }
    he.running.stop().await;
}

#[tokio::test]
async fn voucher_refusals_move_nothing() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    // More than the voucher holds.
    let offer = b.offer(voucher_source(VOUCHER)).await;
    let init = b.init_load(&offer, 10_001).unwrap();
    let req = b.load_request(&offer, init, 10_001, None);
    let answer = b.call(&Message::LoadRequest(req)).await;
    assert_eq!(
        error_code(&answer),
        ErrorCode::InsufficientFunds,
        "{answer:?}"
    );
    // Another box's voucher.
    let answer = b.ask_offer(voucher_source("VOUCHER-0002")).await;
    assert_eq!(error_code(&answer), ErrorCode::NotYourAccount);
    // An unknown voucher: the very same refusal (nothing to tell a guesser), which never
    // repeats the code.
    let answer = b.ask_offer(voucher_source("NO-SUCH")).await;
    let Message::Error(e) = &answer else {
        panic!("{answer:?}")
    };
    assert_eq!(e.code, ErrorCode::NotYourAccount);
    assert!(!e.reason.contains("NO-SUCH"), "{}", e.reason);
    // A forged S1: the voucher hold is released.
    let offer = b.offer(voucher_source(VOUCHER)).await;
    let mut init = b.init_load(&offer, 1_000).unwrap();
    init.s1[0] ^= 1;
    let req = b.load_request(&offer, init, 1_000, None);
    let answer = b.call(&Message::LoadRequest(req)).await;
    assert_eq!(error_code(&answer), ErrorCode::BadSignature);
    assert_eq!(
        voucher_hold(&he, &offer.transaction_id),
        Some(HoldState::Released)
    );
    assert_eq!(b.balance(), 0);
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
}

#[tokio::test]
async fn card_pulled_mid_load_resolves_from_the_zero_value_s1() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    // Loaded, but the response was lost when the card was pulled: the zero-value S1
    // proves the load (FalseNegative branch), the voucher pays.
    let offer = b.offer(voucher_source(VOUCHER)).await;
    let init = b.init_load(&offer, 2_000).unwrap();
    let req = b.load_request(&offer, init, 2_000, None);
    let cmd = LoadBox::command(&b.call(&Message::LoadRequest(req)).await);
    b.run_load(&cmd).unwrap();
    let zero = b.zero_value(&offer);
    let conf = b
        .call(&LoadBox::response_msg(&offer, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    // Pulled before LOAD: the zero-value S1 proves no load, the hold is released.
    let offer = b.offer(voucher_source(VOUCHER)).await;
    let init = b.init_load(&offer, 3_000).unwrap();
    let req = b.load_request(&offer, init, 3_000, None);
    LoadBox::command(&b.call(&Message::LoadRequest(req)).await);
    let zero = b.zero_value(&offer);
    let conf = b
        .call(&LoadBox::response_msg(&offer, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );
    assert_eq!(b.balance(), 2_000);
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (2_000, 2_000, 2_000));
    he.running.stop().await;
}

/// 002 [0166]: points are loaded "much in the same way that currency is loaded": a
/// pre-funded points account (an airline's miles for a member, currency 000) loads 5,000
/// points through the load server onto the card's points purse; the card's money does not
/// move; the points float gains what the account lost (the conservation check, per
/// currency). A money load after it still goes to the money purse.
#[tokio::test]
async fn five_thousand_points_load_from_a_pre_funded_points_account() {
    let he = start_roles(headend::assembly::Roles::ALL, |t| {
        t + r#"
[[vouchers]]
code = "MILES-FF-0042"
box_id = "box-000001"
currency = 0
exponent = 0
amount = 30000
"#
    })
    .await;
    let mut b = LoadBox::new(&he, BOX1, 500, 100_000).await;
    let pts = proto::money::Currency::POINTS;
    let offer = b.offer(voucher_source("MILES-FF-0042")).await;
    assert_eq!(
        offer.max_amount,
        Money::new(30_000, pts),
        "the account's points"
    );
    let (offer, conf) = b.load(voucher_source("MILES-FF-0042"), 5_000, None).await;
    let Message::LoadConfirmation(c) = &conf else {
        panic!("{conf:?}")
    };
    assert!(c.loaded);
    let purse = b.purse();
    assert_eq!(
        (purse.points, purse.balance),
        (5_000, 500),
        "points in, money kept"
    );
    assert_eq!(
        voucher_hold(&he, &offer.transaction_id),
        Some(HoldState::Captured)
    );
    let last = b.card.state.log.back().unwrap();
    assert_eq!((last.amount, last.currency), (5_000, pts));
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&pts], (5_000, 5_000, 5_000));
    // A money load still goes to the money purse.
    let (_, conf) = b.load(voucher_source(VOUCHER), 1_000, None).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    let purse = b.purse();
    assert_eq!((purse.points, purse.balance), (5_000, 1_500));
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
}
