//! Issue 17, unloads through the head end (seed 004 card-to-bank), over real QUIC on
//! loopback: the box asks the bank for an unload offer to its account, the card makes S1 of
//! INITIALIZE FOR UNLOAD over the offer's time stamp, the bank checks the PIN and reserves
//! the amount out of the issuer float it holds, the load server's HSM verifies S1 and issues
//! the unload command (S2), the card runs UNLOAD and answers S3; the load server's sealed
//! confirmation reaches the bank through the gateway, and only then is the account credited.
//! A card that never ran UNLOAD proves it with a zero-value INITIALIZE FOR UNLOAD (the
//! negative-result procedure in reverse) and nothing is credited; a card whose answer was
//! lost proves that it did, and the account is credited once.

mod load_support;

use headend::assembly::Roles;
use headend::funds::HoldState;
use load_support::*;
use proto::card::commands;
use proto::messages::*;
use proto::money::Money;
use proto::purse::LoadResponse;

fn funds(he: &HeadEnd) -> &headend::funds::Funds {
    &he.running.bank.as_ref().unwrap().funds
}

/// Account balance + the issuer float at the bank (what an unload keeps: it moves value
/// from the float to the account), and the float less the card's balance (the float backs
/// the card's value: both drop by the unload).
fn value(he: &HeadEnd, b: &mut LoadBox) -> (u64, i128) {
    let f = funds(he);
    let float = f.float().get(&EUR).copied().unwrap_or(0);
    (
        f.account(ACCOUNT).unwrap().balance + float,
        i128::from(float) - i128::from(b.balance()),
    )
}

#[tokio::test]
async fn an_unload_credits_the_account_only_on_the_cards_proof() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    // A bank load first: the issuer float at the bank holds what an unload pays out.
    let (_, conf) = b.load(bank_source(), 20_000, Some(&he.pin)).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    let total = value(&he, &mut b);
    let account = funds(&he).account(ACCOUNT).unwrap().balance;

    // The offer: at most what the card holds.
    let offer = b.offer(unload_source()).await;
    assert_eq!(offer.max_amount, Money::new(21_000, EUR));
    assert!(offer.pin_required);
    assert_eq!(offer.source, unload_source());

    // The unload: reserved out of the float at the request, credited only on S3.
    let (offer, answer) = b.unload_request(5_000, &he.pin).await;
    let cmd = LoadBox::command(&answer);
    let hold = funds(&he).hold(&offer.transaction_id).unwrap();
    assert!(hold.unload && hold.state == HoldState::Held);
    assert_eq!(
        funds(&he).account(ACCOUNT).unwrap().balance,
        account,
        "nothing yet"
    );
    assert_eq!(funds(&he).float()[&EUR], 20_000 - 5_000, "reserved");
    let r = b.apdu(&commands::unload(&cmd));
    assert!(r.sw.is_ok(), "UNLOAD: {}", r.sw);
    let resp = LoadResponse::decode(&r.data).unwrap();
    assert_eq!(b.balance(), 16_000);
    // A forged S3 is refused and credits nothing.
    let mut forged = resp.clone();
    forged.s3[0] ^= 1;
    let m = b
        .call(&LoadBox::response_msg(&offer, Some(forged), None))
        .await;
    assert!(matches!(m, Message::Error(_)), "{m:?}");
    assert_eq!(funds(&he).account(ACCOUNT).unwrap().balance, account);
    let msg = LoadBox::response_msg(&offer, Some(resp), None);
    let conf = b.call(&msg).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(
        funds(&he).account(ACCOUNT).unwrap().balance,
        account + 5_000,
        "credited on the card's S3"
    );
    assert_eq!(
        funds(&he).hold(&offer.transaction_id).unwrap().state,
        HoldState::Captured
    );
    // A repeat moves nothing.
    assert_eq!(b.call(&msg).await, conf);
    assert_eq!(
        funds(&he).account(ACCOUNT).unwrap().balance,
        account + 5_000
    );
    assert_eq!(value(&he, &mut b), total, "value moved, none made or lost");
    let steps = funds(&he).journal.steps(&offer.transaction_id).unwrap();
    assert_eq!(
        steps,
        [
            "load offer made",
            "hold requested",
            "unload hold placed: reserved out of the issuer float",
            "unload captured: credited to the account"
        ]
    );

    // More than the card holds (its own INITIALIZE refuses that too), or than the issuer
    // float at the bank holds (15,000 now, the card 16,000), is refused before any S2.
    let offer = b.offer(unload_source()).await;
    let init = b.init_unload(&offer, 16_000);
    let m = b
        .call(&Message::LoadRequest(b.load_request(
            &offer,
            init.clone(),
            16_001,
            Some(&he.pin),
        )))
        .await;
    assert_eq!(error_code(&m), ErrorCode::InsufficientValue, "{m:?}");
    let offer = b.offer(unload_source()).await;
    let init = b.init_unload(&offer, 16_000);
    let m = b
        .call(&Message::LoadRequest(b.load_request(
            &offer,
            init,
            16_000,
            Some(&he.pin),
        )))
        .await;
    assert_eq!(error_code(&m), ErrorCode::InsufficientFunds, "{m:?}");
    assert_eq!(b.balance(), 16_000);
    assert_eq!(value(&he, &mut b), total);
    he.running.stop().await;
}

#[tokio::test]
async fn a_card_that_never_ran_unload_is_proved_and_nothing_is_credited() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (_, conf) = b.load(bank_source(), 20_000, Some(&he.pin)).await;
    assert!(matches!(conf, Message::LoadConfirmation(ref c) if c.loaded));
    let total = value(&he, &mut b);
    let account = funds(&he).account(ACCOUNT).unwrap().balance;

    // The unload command is lost: the card never runs UNLOAD.
    let (offer, answer) = b.unload_request(5_000, &he.pin).await;
    LoadBox::command(&answer);
    let zero = b.init_unload(&offer, 0);
    let conf = b
        .call(&LoadBox::response_msg(&offer, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );
    let hold = funds(&he).hold(&offer.transaction_id).unwrap();
    assert_eq!(hold.state, HoldState::Released);
    assert_eq!(funds(&he).account(ACCOUNT).unwrap().balance, account);
    assert_eq!(funds(&he).float()[&EUR], 20_000, "back in the float");
    assert_eq!(b.balance(), 21_000);
    assert_eq!(value(&he, &mut b), total);

    // The card ran UNLOAD and its answer was lost: the zero-value proof says it did.
    let (offer, answer) = b.unload_request(7_000, &he.pin).await;
    let cmd = LoadBox::command(&answer);
    assert!(b.apdu(&commands::unload(&cmd)).sw.is_ok());
    let zero = b.init_unload(&offer, 0);
    let conf = b
        .call(&LoadBox::response_msg(&offer, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(
        funds(&he).account(ACCOUNT).unwrap().balance,
        account + 7_000
    );
    assert_eq!(b.balance(), 14_000);
    assert_eq!(value(&he, &mut b), total, "credited once");
    he.running.stop().await;
}

#[test]
fn a_loads_hold_never_authorises_an_unload_nor_the_other_way() {
    let key = proto::crypto::DesKey::new([9; 16]);
    let amount = Money::new(500, EUR);
    let load = headend::funds::hold_placed(&key, "LD-1", amount, 7, false);
    let unload = headend::funds::hold_placed(&key, "LD-1", amount, 7, true);
    assert!(headend::funds::hold_verifies(&key, &load, false));
    assert!(!headend::funds::hold_verifies(&key, &load, true));
    assert!(headend::funds::hold_verifies(&key, &unload, true));
    assert!(!headend::funds::hold_verifies(&key, &unload, false));
}

/// The second outside attack (U2): one card could open unload after unload, each reserving
/// its whole balance out of the float, until other cards' unloads were refused. One unload
/// per card is open at a time: the next waits until its box finished or proved the first.
#[tokio::test]
async fn one_open_unload_per_card() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (_, conf) = b.load(bank_source(), 20_000, Some(&he.pin)).await;
    assert!(matches!(conf, Message::LoadConfirmation(ref c) if c.loaded));
    let (first, answer) = b.unload_request(5_000, &he.pin).await;
    LoadBox::command(&answer);
    assert_eq!(funds(&he).float()[&EUR], 15_000);
    let (_, again) = b.unload_request(5_000, &he.pin).await;
    assert_eq!(error_code(&again), ErrorCode::InDoubt, "{again:?}");
    assert_eq!(funds(&he).float()[&EUR], 15_000, "reserved once");
    // The first proved not run: the next may go.
    let zero = b.init_unload(&first, 0);
    let conf = b
        .call(&LoadBox::response_msg(&first, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );
    let (_, conf) = b.unload(5_000, &he.pin).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(funds(&he).float()[&EUR], 15_000);
    he.running.stop().await;
}

/// The second outside attack (U1): an unload whose command was lost, after which the card
/// ran four more sessions elsewhere, could never be proved either way (the card's list of
/// sessions run keeps four) and its reservation stayed out of the float for good. The load
/// server now settles a card's open sessions from its next request's S1, before authorising
/// it; the gateway's sweep takes the sealed verdict to the bank. Both ways: an unload never
/// run goes back to the float; one run whose answer was lost is credited to the account,
/// once. The card's next session may be of its other purse (points): it settles them too.
#[tokio::test]
async fn an_open_unload_is_settled_from_the_cards_next_request() {
    let he = start_roles(Roles::ALL, |t| {
        // The holds' lifetime is long: each verdict reaches the bank because the card's
        // next request got its load command, not because the hold expired.
        t.replacen("[gateway]\n", "[gateway]\nhold_lifetime_secs = 3600\n", 1)
            + r#"
[[vouchers]]
code = "MILES-FF-0042"
box_id = "box-000001"
currency = 0
exponent = 0
amount = 30000

[gateway.limits]
load_offers_per_minute = 600
burst = 100
"#
    })
    .await;
    let load_server = he.running.load.clone().unwrap();
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (_, conf) = b.load(bank_source(), 20_000, Some(&he.pin)).await;
    assert!(matches!(conf, Message::LoadConfirmation(ref c) if c.loaded));
    let total = value(&he, &mut b);
    let account = funds(&he).account(ACCOUNT).unwrap().balance;

    // The unload command is lost; the card goes on to load, four times.
    let (lost, answer) = b.unload_request(5_000, &he.pin).await;
    LoadBox::command(&answer);
    assert_eq!(funds(&he).float()[&EUR], 15_000, "reserved");
    for _ in 0..4 {
        let (_, conf) = b.load(bank_source(), 100, Some(&he.pin)).await;
        assert!(
            matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
            "{conf:?}"
        );
    }
    let rec = load_server.record(&lost.transaction_id).unwrap();
    assert_eq!(rec.state, headend::load::LoadState::NotLoaded, "{rec:?}");
    assert!(
        rec.verdict
            .as_deref()
            .is_some_and(|v| v.contains("settled from the card's next load request")),
        "{:?}",
        rec.verdict
    );
    assert!(
        eventually(|| funds(&he).hold(&lost.transaction_id).unwrap().state == HoldState::Released)
            .await,
        "the gateway's sweep took the no-unload to the bank"
    );
    assert_eq!(funds(&he).float()[&EUR], 20_400, "back in the float");
    assert_eq!(funds(&he).account(ACCOUNT).unwrap().balance, account - 400);
    assert_eq!(b.balance(), 21_400);
    assert_eq!(value(&he, &mut b), total);
    // The box that lost it proves it later: the same verdict.
    let zero = b.init_unload(&lost, 0);
    let conf = b
        .call(&LoadBox::response_msg(&lost, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );

    // The card ran UNLOAD and its answer was lost: the next load's S1 says it ran.
    let (ran, answer) = b.unload_request(7_000, &he.pin).await;
    let cmd = LoadBox::command(&answer);
    assert!(b.apdu(&commands::unload(&cmd)).sw.is_ok());
    let (_, conf) = b.load(bank_source(), 100, Some(&he.pin)).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(
        load_server.record(&ran.transaction_id).unwrap().state,
        headend::load::LoadState::Loaded
    );
    assert!(
        eventually(|| funds(&he).hold(&ran.transaction_id).unwrap().state != HoldState::Held).await
    );
    assert_eq!(
        funds(&he).account(ACCOUNT).unwrap().balance,
        account - 500 + 7_000,
        "credited once"
    );
    assert_eq!(b.balance(), 21_500 - 7_000);
    assert_eq!(value(&he, &mut b), total);

    // A load's hold the same way: its command lost, the next load settles it not loaded.
    let account = funds(&he).account(ACCOUNT).unwrap().balance;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 300).unwrap();
    let req = b.load_request(&offer, init, 300, Some(&he.pin));
    LoadBox::command(&b.call(&Message::LoadRequest(req)).await);
    assert_eq!(funds(&he).account(ACCOUNT).unwrap().held, 300, "held");
    let (_, conf) = b.load(bank_source(), 100, Some(&he.pin)).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(
        load_server.record(&offer.transaction_id).unwrap().state,
        headend::load::LoadState::NotLoaded
    );
    assert!(
        eventually(|| funds(&he).hold(&offer.transaction_id).unwrap().state == HoldState::Released)
            .await,
        "the lost load's hold is released"
    );
    assert_eq!(funds(&he).account(ACCOUNT).unwrap().held, 0);
    assert_eq!(funds(&he).account(ACCOUNT).unwrap().balance, account - 100);
    assert_eq!(value(&he, &mut b), total);

    // The card's list of sessions is the card's, whichever purse ran them (the third
    // outside attack): points loads settle an open money unload too.
    let float = funds(&he).float()[&EUR];
    let (lost, answer) = b.unload_request(1_000, &he.pin).await;
    LoadBox::command(&answer);
    for _ in 0..4 {
        let (_, conf) = b.load(voucher_source("MILES-FF-0042"), 10, None).await;
        assert!(
            matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
            "{conf:?}"
        );
    }
    assert_eq!(
        load_server.record(&lost.transaction_id).unwrap().state,
        headend::load::LoadState::NotLoaded
    );
    assert!(
        eventually(|| funds(&he).hold(&lost.transaction_id).unwrap().state == HoldState::Released)
            .await,
        "released by the points loads' S1"
    );
    assert_eq!(funds(&he).float()[&EUR], float);
    assert_eq!(b.purse().points, 40);
    // The bank no longer holds the card's lost unload open: its next unload goes through
    // (an outside attack found it refused `InDoubt` until the hold's lifetime).
    let (_, conf) = b.unload(1_000, &he.pin).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    he.running.stop().await;
}
