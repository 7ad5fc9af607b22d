//! Issue 11, scenario 7, with real processes (a split head end: each role its own `headend
//! <role>` process): a load hold is never reused for another amount, and the load server
//! authorises nothing that does not carry its funder's hold.
//!
//! A load request for 1.00 places a hold at the bank while the load server is SIGKILLed (the
//! box hears Busy); the load server comes back and the box sends a load request for 900.00 on
//! the same transaction (a fresh INITIALIZE FOR LOAD for 900.00). Before the fix the gateway
//! skipped the bank (a hold existed) and the load server authorised 900.00. Now: `Replay`
//! at the gateway, nothing loaded, and the 1.00 hold is still released by the box's proof
//! that the card never loaded. Then others call the load server directly: an outsider with
//! a certificate of the operator CA (`headend pki issue-server`), and a holder of the
//! gateway's own certificate with forged, altered or mismatched holds.

mod split_support;

use std::time::{Duration, Instant};

use headend::funds::HoldState;
use proto::messages::*;
use proto::money::{Currency, Money};
use split_support::load_support::{ACCOUNT, LoadBox, bank_source};
use split_support::*;

const ANSWER: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_load_hold_is_never_reused_for_another_amount() {
    let mut split = Split::start(Options::default()).await;
    let pin = split.pin.clone();
    let mut b = split.load_box("box-000001", 0xCA4D_0007, 0, 200_000).await;
    let opening = split.account(ACCOUNT);

    for outage in [Outage::Killed, Outage::Stopped] {
        hold_not_reused(&mut split, &mut b, &pin, outage).await;
        let account = split.account(ACCOUNT);
        assert_eq!(
            (account.balance, account.held),
            (opening.balance, 0),
            "{outage:?}: the account is as it was"
        );
        assert_eq!(b.balance(), 0, "{outage:?}: nothing loaded");
    }

    // Others call the load server directly, for a transaction with a genuine offer and a
    // genuine S1 of 50.00.
    let offer = b.offer(bank_source()).await;
    let txid = offer.transaction_id.clone();
    let init = b.init_load(&offer, 5_000).unwrap();
    let card_id = init.card_id;
    let request = b.load_request(&offer, init, 5_000, None);
    // An outsider with a certificate of the operator CA (`headend pki issue-server`): not
    // among the load server's callers.
    let outsider = split.issue_server_cert("outsider.purselink.test");
    match split.client_with(R::Load, &outsider).await {
        Err(e) => eprintln!("outsider's handshake with the load server refused: {e}"),
        Ok(c) => {
            let a = ask(&c, &Message::LoadRequest(request.clone()), ANSWER).await;
            eprintln!("outsider's load request: {a:?}");
            assert!(
                matches!(&a, Err(_) | Ok(Message::Error(_))),
                "an outsider's load request is refused: {a:?}"
            );
        }
    }
    // Even with the gateway's own certificate (the load server's one caller, stolen): no
    // load without the funder's hold, and no hold but the funder's, for its amount.
    let stolen = split
        .client_with(R::Load, &split.role_cert(R::Gateway))
        .await
        .expect("the gateway's certificate is a caller of the load server");
    let a = ask(&stolen, &Message::LoadRequest(request.clone()), ANSWER)
        .await
        .unwrap();
    assert_eq!(
        code(&a),
        Some(ErrorCode::Forbidden),
        "a load request without the funder's hold: {a:?}"
    );
    let shared = split.key("confirmation.key");
    let eur = |minor| Money::new(minor, Currency::EUR);
    let genuine_1 = headend::funds::hold_placed(&shared, &txid, eur(100), card_id, false);
    let holds = [
        (
            "forged (no funder's MAC)",
            HoldPlaced {
                transaction_id: txid.clone(),
                amount: eur(5_000),
                card_id,
                mac: [0; 8],
            },
        ),
        (
            "altered (a 1.00 hold raised to 50.00)",
            HoldPlaced {
                amount: eur(5_000),
                ..genuine_1.clone()
            },
        ),
        ("genuine, but for 1.00", genuine_1),
    ];
    for (what, hold) in holds {
        let a = ask(
            &stolen,
            &Message::RoutedLoadRequest {
                request: request.clone(),
                hold,
            },
            ANSWER,
        )
        .await
        .unwrap();
        eprintln!("routed load request with a {what} hold: {:?}", code(&a));
        assert!(
            matches!(code(&a), Some(c) if c != ErrorCode::Busy),
            "a routed load request with a {what} hold is refused: {a:?}"
        );
    }
    assert!(
        split.load_rec(&txid).is_none(),
        "nothing authorised for the outsider"
    );
    assert!(split.hold(&txid).is_none(), "no hold at the bank");
    assert_eq!(b.balance(), 0);
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    Killed,
    Stopped,
}

/// 1.00 held while the load server is down, then 900.00 on the same transaction.
async fn hold_not_reused(split: &mut Split, b: &mut LoadBox, pin: &str, outage: Outage) {
    let offer = b.offer(bank_source()).await;
    let txid = offer.transaction_id.clone();
    let init = b.init_load(&offer, 100).unwrap();
    let first = Message::LoadRequest(b.load_request(&offer, init, 100, Some(pin)));
    match outage {
        Outage::Killed => split.kill(R::Load),
        Outage::Stopped => split.stop(R::Load),
    }
    let a = ask(&b.client, &first, ANSWER).await.unwrap();
    assert_eq!(
        code(&a),
        Some(ErrorCode::Busy),
        "{outage:?} load server: {a:?}"
    );
    let hold = split.hold(&txid).expect("the bank placed the hold");
    assert_eq!(
        (hold.state, hold.amount.minor),
        (HoldState::Held, 100),
        "1.00 held"
    );
    match outage {
        Outage::Killed => {
            split.spawn(R::Load).await;
        }
        // It may still work through the 1.00 request queued on its socket.
        Outage::Stopped => split.cont(R::Load),
    }

    // Same transaction, another amount: a fresh INITIALIZE FOR LOAD for 900.00.
    let init = b.init_load(&offer, 90_000).unwrap();
    let second = Message::LoadRequest(b.load_request(&offer, init, 90_000, Some(pin)));
    let a = until_not_busy(&b.client, &second, Instant::now() + ANSWER)
        .await
        .unwrap();
    assert_eq!(
        code(&a),
        Some(ErrorCode::Replay),
        "{outage:?}: a load request for 900.00 on the 1.00 hold's transaction: {a:?}"
    );
    let authorised = split.load_rec(&txid).map(|r| (r.state, r.amount.minor));
    eprintln!("{outage:?} load server: its record after the 900.00 request: {authorised:?}");
    assert!(
        authorised.is_none_or(|(_, minor)| minor == 100),
        "{outage:?}: the load server authorised no more than the 1.00 held: {authorised:?}"
    );
    assert_eq!(b.balance(), 0, "nothing loaded");
    let hold = split.hold(&txid).unwrap();
    assert_eq!((hold.state, hold.amount.minor), (HoldState::Held, 100));

    // The 1.00 hold is still releasable: the box proves the card never loaded (a zero-value
    // INITIALIZE FOR LOAD, no load response) and the bank releases it.
    let zero = b.zero_value(&offer);
    let a = until_not_busy(
        &b.client,
        &LoadBox::response_msg(&offer, None, Some(zero)),
        Instant::now() + ANSWER,
    )
    .await
    .unwrap();
    assert!(
        matches!(&a, Message::LoadConfirmation(c) if !c.loaded),
        "{outage:?}: no-load confirmation: {a:?}"
    );
    let hold = split.hold(&txid).unwrap();
    assert_eq!(
        hold.state,
        HoldState::Released,
        "{outage:?}: the 1.00 hold released"
    );
}
