//! Issue 6, "Must show" 4, end to end against the REAL head end: an application on the box
//! asks stbd for a payment over the local app API (Unix socket, JSON lines); the viewer
//! confirms it with OK on the TV (tmux send-keys), and a second request is cancelled with
//! BACK. Real pcscd + vpcd + `vcard attach-vpcd`, `headend all-in-one`, `stbd` in tmux.
//!
//! `PURSELINK_SKIP_PCSC=1` skips; the test takes its turn on the vpcd reader.

mod support;

use std::time::Instant;

use proto::purse::LogKind;
use support::*;

#[test]
fn local_app_payment_confirmed_by_ok_then_one_cancelled_by_back() {
    let t0 = Instant::now();
    let Some(mut w) = World::new("local_api", Options { local_api: true }) else {
        return;
    };
    w.start_stbd(None);

    // 1. The PPV app asks for the event; the TV asks the viewer; OK.
    let mut app = w.api_send(r#"{"op":"pay","merchant_id":"CABLE","item_id":"ppv-1001","id":1}"#);
    let offer = w.wait_offer();
    assert!(offer.contains(PPV_TITLE), "{offer}");
    assert!(offer.contains("4.99 EUR"), "{offer}");
    assert_eq!(
        w.card_state().balance,
        START_BALANCE,
        "nothing moves before OK"
    );
    w.tv().keys(&["Enter"]);
    let paid = app.answer();
    assert_eq!(paid["result"], "paid", "{paid}");
    assert_eq!(paid["id"], 1, "{paid}");
    assert_eq!(paid["released"], true, "{paid}");
    assert_eq!(paid["new_balance"], START_BALANCE - PPV_PRICE, "{paid}");
    let txid = paid["transaction_id"]
        .as_str()
        .expect("a transaction id")
        .to_string();
    assert_eq!(
        paid["entitlement"].as_str(),
        Some(format!("{BOX_ID}/{PPV_ITEM}/{txid}").as_str()),
        "{paid}"
    );
    w.tv().wait_screen("the receipt", |s| {
        s.contains("Purchase complete") && s.contains(&txid)
    });
    assert_eq!(w.card_state().balance, START_BALANCE - PPV_PRICE);

    // 2. Another request (on a new connection), for the other event: BACK.
    let mut app2 =
        w.api_send(r#"{"op":"pay","merchant_id":"CABLE","item_id":"ppv-1002","id":"second"}"#);
    let offer = w.tv().wait_screen("the second offer", |s| {
        s.contains("Confirm purchase") && s.contains("The Long Road") && s.contains("3.99 EUR")
    });
    assert!(offer.contains("45.01 EUR"), "the balance now:\n{offer}");
    w.tv().keys(&["BSpace"]);
    let cancelled = app2.answer();
    assert_eq!(cancelled["result"], "cancelled", "{cancelled}");
    assert_eq!(cancelled["id"], "second", "{cancelled}");
    let txid2 = cancelled["transaction_id"]
        .as_str()
        .expect("the offer's id")
        .to_string();
    assert_ne!(txid2, txid);

    // The real state: one debit, one release, one payment-server transaction; the second
    // offer only got as far as its cancel.
    let card = w.card_state();
    assert_eq!(
        card.balance,
        START_BALANCE - PPV_PRICE,
        "only the first was paid"
    );
    assert_eq!(
        card.log.iter().filter(|r| r.kind == LogKind::Debit).count(),
        1
    );
    let releases = w.headend_state("merchant", "release");
    assert_eq!(releases.len(), 1, "{releases:?}");
    assert_eq!(releases[0].0, txid);
    let pay = w.payment_txns();
    assert_eq!(pay.len(), 1);
    assert_eq!(pay[0].transaction_id, txid);
    assert_eq!(pay[0].state, headend::payment::PayState::Completed);
    assert_eq!(w.security_card_total(), PPV_PRICE);
    let gw: Vec<_> = w
        .headend_steps("gateway")
        .into_iter()
        .filter(|(t, _, _)| *t == txid2)
        .map(|(_, s, d)| (s, d))
        .collect();
    assert_eq!(
        gw,
        vec![
            ("offer relayed".to_string(), String::new()),
            ("cancelled before the draw".to_string(), String::new())
        ]
    );
    assert_eq!(w.stb_txns(), vec![(txid, "completed".to_string())]);
    eprintln!("local_api: passed in {:?}", t0.elapsed());
}
