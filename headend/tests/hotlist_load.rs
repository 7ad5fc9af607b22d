//! Issue 16, the card hotlist at load authorisation: the issuer's signed list installed with
//! the real `headend hotlist install` into an all-in-one head end (clearing, payment and load
//! server at once); the load server's HSM refuses a bank load to the listed card with
//! `CardHotlisted`, and nothing moves: the card, the account, its hold, the HSM's totals.

mod hotlist_support;
mod load_support;

use std::time::Duration;

use headend::assembly::Roles;
use hotlist_support::*;
use proto::messages::*;
use proto::money::Currency;

use load_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hotlisted_card_is_refused_at_load_authorisation_and_nothing_moves() {
    let keys = tempfile::tempdir().unwrap();
    // Box 1's card (see `LoadBox::new`): read back below, listed by the issuer.
    let he0 = start().await;
    let probe = LoadBox::new(&he0, BOX1, 1_000, 100_000).await;
    let card_id = {
        let mut p = probe;
        p.purse().card_id
    };
    he0.running.stop().await;
    let (verify, list) = issuer_signs(keys.path(), 4, &[card_id]);
    let verify_s = verify.display().to_string();
    let he = start_roles(Roles::ALL, move |t| {
        t + &format!("\n[hotlist]\nverify_key_file = \"{verify_s}\"\nrefresh_secs = 1\n")
    })
    .await;
    // The all-in-one config runs clearing, the load server and the payment server: the
    // install reaches all three journals at once.
    let out = headend(&[
        "hotlist",
        "install",
        "--config",
        s(&he.config_path),
        "--file",
        s(&list),
    ]);
    assert!(out.contains("load: hotlist version 4"), "{out}");
    let load = he.running.load.clone().unwrap();
    assert!(
        within(Duration::from_secs(20), || held_version(load.journal())
            == 4)
        .await,
        "the load server holds the list"
    );
    // Its HSM takes it at the next refresh: wait for a refresh to pass.
    tokio::time::sleep(Duration::from_millis(2_500)).await;

    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    assert_eq!(b.purse().card_id, card_id);
    let account_before = he
        .running
        .bank
        .as_ref()
        .unwrap()
        .funds
        .account(ACCOUNT)
        .unwrap()
        .balance;
    let float_before = load.hsm_loaded(Currency::EUR).await;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 2_000).unwrap();
    let req = b.load_request(&offer, init, 2_000, Some(&he.pin));
    let answer = b.call(&Message::LoadRequest(req.clone())).await;
    let Message::Error(e) = &answer else {
        panic!("expected CardHotlisted, got {answer:?}")
    };
    assert_eq!(e.code, ErrorCode::CardHotlisted, "{}", e.reason);
    assert_eq!(b.balance(), 1_000, "the card is not loaded");
    assert_eq!(load.hsm_loaded(Currency::EUR).await, float_before);
    let bank = he.running.bank.as_ref().unwrap();
    assert!(
        within(Duration::from_secs(10), || {
            bank.funds.account(ACCOUNT).unwrap().balance == account_before
                && bank.funds.account(ACCOUNT).unwrap().held == 0
        })
        .await,
        "the account is debited nothing and holds nothing: {:?}",
        bank.funds.account(ACCOUNT)
    );
    he.running.stop().await;
}
