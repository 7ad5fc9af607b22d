//! Issue 11, scenario 8, with real processes (a split head end, each role its own `headend
//! <role>` process, with short lifetimes in their configs): nothing stays open for ever.
//!
//! - a purchase offer never drawn: Expired at the gateway (a later draw is refused
//!   `OfferExpired`, not the card's `Expired`) and at the merchant;
//! - a load offer never requested: expired at the gateway;
//! - a hold placed while the load server was SIGKILLed, the box never returning: released at
//!   expiry, the reason journaled, the account as it was;
//! - a hold whose load command was issued, the box never returning: NOT released — awaiting
//!   an operator, and `headend status` says so;
//! - a purchase reversed at the payment server's deadline: the merchant's offer moves to
//!   Reversed (the gateway passes the reversal feed on); the late genuine debit response
//!   still completes the sale and releases the goods once.

mod split_support;

use std::process::Command;
use std::time::{Duration, Instant};

use headend::funds::HoldState;
use headend::gateway::GwState;
use headend::merchant::OfferState;
use headend::payment::PayState;
use proto::messages::*;
use proto::money::Currency;
use split_support::load_support::{ACCOUNT, LoadBox, bank_source};
use split_support::wire_box::WireBox;
use split_support::*;

const ANSWER: Duration = Duration::from_secs(30);
/// Lifetimes plus the sweepers' periods (5 s) and slack.
const EXPIRY_WITHIN: Duration = Duration::from_secs(30);

async fn offer(b: &WireBox, merchant: &str, item: &str) -> Offer {
    let ask_offer = Message::OfferRequest {
        merchant_id: merchant.into(),
        item_id: item.into(),
    };
    match ask(&b.client, &ask_offer, ANSWER).await.unwrap() {
        Message::Offer(o) => o,
        other => panic!("offer: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_loads_and_holds_expire_and_reversals_reach_the_merchant() {
    let mut split = Split::start(Options {
        transaction_timeout_secs: 3,
        lifetimes: Some(Lifetimes {
            gateway_offer_secs: 2,
            gateway_hold_secs: 3,
            merchant_offer_secs: 2,
            funder_offer_secs: 10,
        }),
        ..Options::default()
    })
    .await;
    let pin = split.pin.clone();
    let mut buyer = split.purchase_box("box-000001", 0xB0B0_0008, 100_000).await;
    let mut loader = split.load_box("box-000001", 0xCA4D_0008, 0, 200_000).await;
    let opening = split.account(ACCOUNT);

    // A purchase offer never drawn.
    let never_drawn = offer(&buyer, "CABLE", "ppv-1001").await;
    // A purchase drawn and debited whose debit response comes late (after the deadline).
    let late = offer(&buyer, "M-WEBSHOP", "ebook-1").await;
    let draw = Message::DrawRequest(buyer.draw_request(&late).unwrap());
    let answer = ask(&buyer.client, &draw, ANSWER).await.unwrap();
    let cmd = WireBox::open_debit_command(&late, &answer).unwrap();
    let late_resp = Message::DebitResponse(buyer.debit(&late, &cmd).unwrap());
    // A load offer never requested.
    let never_requested = loader.offer(bank_source()).await;
    // A load whose command was issued; the box never comes back.
    let commanded = loader.offer(bank_source()).await;
    let init = loader.init_load(&commanded, 300).unwrap();
    let req = Message::LoadRequest(loader.load_request(&commanded, init, 300, Some(&pin)));
    LoadBox::command(&ask(&loader.client, &req, ANSWER).await.unwrap());
    // A hold placed while the load server is down; the box never comes back.
    let unauthorised = loader.offer(bank_source()).await;
    let init = loader.init_load(&unauthorised, 200).unwrap();
    let req = Message::LoadRequest(loader.load_request(&unauthorised, init, 200, Some(&pin)));
    split.kill(R::Load);
    let a = ask(&loader.client, &req, ANSWER).await.unwrap();
    assert_eq!(code(&a), Some(ErrorCode::Busy), "load server down: {a:?}");
    assert_eq!(
        split.hold(&unauthorised.transaction_id).unwrap().state,
        HoldState::Held
    );
    split.spawn(R::Load).await;
    let waited = Instant::now();

    // Purchase offer never drawn: Expired at the gateway and at the merchant.
    let txid = &never_drawn.transaction_id;
    let expired = eventually(EXPIRY_WITHIN, || {
        split
            .gw_txn(txid)
            .is_some_and(|t| t.state == GwState::Expired)
            && split
                .offer(txid)
                .is_some_and(|o| o.state == OfferState::Expired)
    })
    .await;
    assert!(
        expired,
        "offer never drawn: gateway {:?}, merchant {:?}",
        split.gw_txn(txid).map(|t| t.state),
        split.offer(txid).map(|o| o.state)
    );
    let draw = Message::DrawRequest(buyer.draw_request(&never_drawn).unwrap());
    let a = ask(&buyer.client, &draw, ANSWER).await.unwrap();
    assert_eq!(
        code(&a),
        Some(ErrorCode::OfferExpired),
        "a draw after expiry: {a:?}"
    );
    assert!(
        split.pay_txn(txid).is_none(),
        "nothing reached the payment server"
    );

    // Load offer never requested: expired at the gateway.
    let txid = &never_requested.transaction_id;
    let expired = eventually(EXPIRY_WITHIN, || {
        split.gw_load(txid).is_some_and(|t| t.expired)
    })
    .await;
    assert!(
        expired,
        "load offer never requested: {:?}",
        split.gw_load(txid)
    );

    // Hold placed, load server never reached: released at expiry, the reason journaled.
    let txid = &unauthorised.transaction_id;
    let released = eventually(EXPIRY_WITHIN, || {
        split
            .hold(txid)
            .is_some_and(|h| h.state == HoldState::Released)
    })
    .await;
    assert!(released, "unauthorised hold: {:?}", split.hold(txid));
    let gw_steps = split.steps(R::Gateway, txid);
    assert!(
        gw_steps.iter().any(|(s, _)| s.contains("never authorised")),
        "the gateway journaled why: {gw_steps:?}"
    );
    let bank_steps = split.steps(R::Bank, txid);
    assert!(
        bank_steps
            .iter()
            .any(|(s, d)| s == "hold released" && d.contains("never authorized")),
        "the bank journaled why: {bank_steps:?}"
    );

    // Hold with a load command issued: never released blindly; awaiting an operator.
    let txid = &commanded.transaction_id;
    let queued = eventually(EXPIRY_WITHIN, || {
        split.gw_load(txid).is_some_and(|t| t.awaiting_operator)
    })
    .await;
    assert!(queued, "commanded load: {:?}", split.gw_load(txid));
    assert_eq!(
        split.hold(txid).unwrap().state,
        HoldState::Held,
        "a load that may be on the card keeps its hold"
    );
    let status = Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(["status", "--config"])
        .arg(&split.config[&R::Gateway])
        .output()
        .unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(
        status
            .lines()
            .any(|l| l.contains("OPERATOR") && l.contains(txid.as_str())),
        "`headend status` lists it for an operator:\n{status}"
    );
    let account = split.account(ACCOUNT);
    assert_eq!(
        (account.balance, account.held),
        (opening.balance, 300),
        "only the commanded load's 3.00 is held; the released 2.00 is back"
    );

    // A purchase reversed at the payment server's deadline: the merchant hears of it.
    let txid = &late.transaction_id;
    let reversed = eventually(EXPIRY_WITHIN, || {
        split
            .pay_txn(txid)
            .is_some_and(|t| t.state == PayState::Reversed)
            && split
                .offer(txid)
                .is_some_and(|o| o.state == OfferState::Reversed)
    })
    .await;
    assert!(
        reversed,
        "reversed at the deadline: payment {:?}, merchant {:?}",
        split.pay_txn(txid).map(|t| t.state),
        split.offer(txid).map(|o| o.state)
    );
    eprintln!(
        "every expiry seen {:.1} s after the load server came back",
        waited.elapsed().as_secs_f64()
    );
    // The late genuine debit response still completes and releases once.
    let a = until_not_busy(&buyer.client, &late_resp, Instant::now() + ANSWER)
        .await
        .unwrap();
    assert!(
        matches!(&a, Message::Receipt(r) if r.released),
        "late genuine debit response: {a:?}"
    );
    let a = ask(&buyer.client, &late_resp, ANSWER).await.unwrap();
    assert!(
        matches!(&a, Message::Receipt(r) if r.released),
        "resent: {a:?}"
    );
    assert_eq!(split.pay_txn(txid).unwrap().state, PayState::Completed);
    assert_eq!(split.releases(txid), 1);
    assert_eq!(split.entitlements(txid), 1);
    assert_eq!(split.offer(txid).unwrap().state, OfferState::Released);
    assert_eq!(
        split.security_card_totals(Currency::EUR),
        (1, 1250),
        "the security cards count the late sale once, and nothing else"
    );
}

/// A load confirmation the gateway dies waiting for (the load server SIGSTOPped with the load
/// response queued, the gateway SIGKILLed, the load server continued, the gateway restarted;
/// the box never comes back) is not stranded: past the hold lifetime the gateway asks the
/// load server (`LoadExpire`), gets the confirmation it sealed, and the bank captures the
/// hold — the card holds the value, the account paid it, the issuer float has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_confirmation_the_gateway_died_waiting_for_is_settled_at_expiry() {
    let mut split = Split::start(Options {
        lifetimes: Some(Lifetimes {
            gateway_offer_secs: 60,
            gateway_hold_secs: 2,
            merchant_offer_secs: 60,
            funder_offer_secs: 60,
        }),
        ..Options::default()
    })
    .await;
    let pin = split.pin.clone();
    let mut b = split.load_box("box-000001", 0xCA4D_0009, 0, 200_000).await;
    let opening = split.account(ACCOUNT);
    let offer = b.offer(bank_source()).await;
    let txid = offer.transaction_id.clone();
    let init = b.init_load(&offer, 1_500).unwrap();
    let req = Message::LoadRequest(b.load_request(&offer, init, 1_500, Some(&pin)));
    let cmd = LoadBox::command(&ask(&b.client, &req, ANSWER).await.unwrap());
    let resp = LoadBox::response_msg(&offer, Some(b.run_load(&cmd).unwrap()), None);
    assert_eq!(b.balance(), 1_500, "the card took the load");
    split.stop(R::Load);
    let r = ask(&b.client, &resp, Duration::from_secs(1)).await;
    assert!(r.is_err(), "no answer with the load server stopped: {r:?}");
    split.kill(R::Gateway);
    split.cont(R::Load);
    let loaded = eventually(Duration::from_secs(15), || {
        split
            .load_rec(&txid)
            .is_some_and(|r| r.state == headend::load::LoadState::Loaded)
    })
    .await;
    assert!(
        loaded,
        "the load server sealed the confirmation it had queued"
    );
    split.spawn(R::Gateway).await;
    // The box never comes back.
    let captured = eventually(EXPIRY_WITHIN, || {
        split
            .hold(&txid)
            .is_some_and(|h| h.state == HoldState::Captured)
    })
    .await;
    assert!(
        captured,
        "hold {:?}, gateway record {:?}",
        split.hold(&txid).map(|h| h.state),
        split.gw_load(&txid)
    );
    let account = split.account(ACCOUNT);
    assert_eq!(
        (account.balance, account.held),
        (opening.balance - 1_500, 0),
        "the account paid the load once"
    );
    let float: headend::journal::Journal = split.journal(R::Bank);
    let float = float
        .get(
            headend::journal::Kind::Float,
            &Currency::EUR.code.to_string(),
        )
        .unwrap()
        .map(|b| {
            headend::journal::decode::<proto::money::Money>(&b)
                .unwrap()
                .minor
        });
    assert_eq!(float, Some(1_500), "the issuer float has it");
    assert_eq!(b.balance(), 1_500);
}
