//! Loads from a bank account over real QUIC on loopback: a test box with a purse card, the
//! gateway, the bank (PIN, limits, hold → capture / release, issuer float) and the load
//! server with its HSM. Every refusal the issue lists, each with its reason and nothing
//! moved; each branch of the negative-result procedure of 001 [0129]–[0132] with who ends
//! up debited; and the conservation check after every test.

mod load_support;

use std::process::Command;

use headend::funds::HoldState;
use headend::load::LoadState;
use load_support::*;
use proto::apdu::StatusWord;
use proto::card::CardFault;
use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::{CardKeys, IssuerKeys};

fn bank_hold(he: &HeadEnd, txid: &str) -> Option<HoldState> {
    he.running
        .bank
        .as_ref()
        .unwrap()
        .funds
        .hold(txid)
        .map(|h| h.state)
}

fn account_balance(he: &HeadEnd, id: &str) -> u64 {
    he.running
        .bank
        .as_ref()
        .unwrap()
        .funds
        .account(id)
        .unwrap()
        .balance
}

#[tokio::test]
async fn bank_load_captures_the_hold_into_the_issuer_float() {
    bank_load_captures(pg_rig::Backend::Sqlite).await;
}

#[tokio::test]
async fn bank_load_captures_the_hold_into_the_issuer_float_on_postgres() {
    bank_load_captures(pg_rig::Backend::Postgres).await;
}

async fn bank_load_captures(backend: pg_rig::Backend) {
    let Some(he) = start_on(backend).await else {
        return;
    };
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let offer = b.offer(bank_source()).await;
    // Least of card room 99 000, funds 50 000, daily limit 30 000.
    assert_eq!(offer.max_amount, Money::new(30_000, EUR));
    assert_eq!(offer.limited_by, "daily limit");
    assert!(offer.pin_required);

    let init = b.init_load(&offer, 12_345).unwrap();
    let req = b.load_request(&offer, init, 12_345, Some(&he.pin));
    let answer = b.call(&Message::LoadRequest(req.clone())).await;
    let cmd = LoadBox::command(&answer);
    // The hold is placed, nothing debited yet.
    assert_eq!(bank_hold(&he, &offer.transaction_id), Some(HoldState::Held));
    assert_eq!(account_balance(&he, ACCOUNT), 50_000);
    // A retried load request gets the same load command, never a second authorization.
    assert_eq!(b.call(&Message::LoadRequest(req)).await, answer);

    let resp = b.run_load(&cmd).unwrap();
    let msg = LoadBox::response_msg(&offer, Some(resp), None);
    let conf = b.call(&msg).await;
    let Message::LoadConfirmation(c) = &conf else {
        panic!("expected a confirmation, got {conf:?}")
    };
    assert!(c.loaded);
    assert_eq!(c.new_balance, Some(13_345));
    assert_eq!(b.balance(), 13_345);
    assert_eq!(
        bank_hold(&he, &offer.transaction_id),
        Some(HoldState::Captured)
    );
    assert_eq!(account_balance(&he, ACCOUNT), 50_000 - 12_345);
    // A retried load response gets the same confirmation and moves nothing.
    assert_eq!(b.call(&msg).await, conf);

    let txid = &offer.transaction_id;
    let bank = he.running.bank.as_ref().unwrap();
    assert_eq!(
        bank.journal().steps(txid).unwrap(),
        [
            "load offer made",
            "hold requested",
            "hold placed",
            "hold captured: moved to the issuer float"
        ]
    );
    let load = he.running.load.as_ref().unwrap();
    assert_eq!(
        load.journal().steps(txid).unwrap(),
        [
            "load request received",
            "S1 verified: load command issued",
            "load response received",
            "confirmation sealed"
        ]
    );
    let gw = he.running.gateway.as_ref().unwrap();
    assert_eq!(
        gw.journal().steps(txid).unwrap(),
        [
            "load offer relayed",
            "load request received",
            "hold placed",
            "load command relayed",
            "load response relayed",
            "load confirmation received",
            "hold captured"
        ]
    );
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (12_345, 12_345, 12_345));
    if let Some(db) = &he.pg {
        db.assert_every_role_here(&he.cfg.state_dir, &["gateway", "bank", "load"]);
    }
    he.running.stop().await;
}

/// Sends a load request and expects a refusal with `code`; checks nothing moved.
async fn refused(
    he: &HeadEnd,
    b: &mut LoadBox,
    req: LoadRequest,
    code: ErrorCode,
    reason_has: &str,
) {
    let before = b.balance();
    let answer = b.call(&Message::LoadRequest(req.clone())).await;
    let Message::Error(e) = &answer else {
        panic!("expected {code:?}, got {answer:?}")
    };
    assert_eq!(e.code, code, "{}", e.reason);
    assert!(
        e.reason.contains(reason_has),
        "reason {:?} lacks {reason_has:?}",
        e.reason
    );
    assert_eq!(b.balance(), before, "card untouched");
    assert_ne!(
        bank_hold(he, &req.transaction_id),
        Some(HoldState::Held),
        "no hold left"
    );
}

#[tokio::test]
async fn over_max_balance_insufficient_funds_and_over_daily_limit_are_refused() {
    let he = start().await;
    // Over max balance: the card has room for 500; the box claims 800 on an S1 for 500
    // (the card itself refuses INITIALIZE FOR LOAD for 800).
    let mut b = LoadBox::new(&he, BOX1, 99_500, 100_000).await;
    let offer = b.offer(bank_source()).await;
    assert_eq!(
        (offer.max_amount.minor, offer.limited_by.as_str()),
        (500, "card")
    );
    assert_eq!(b.init_load(&offer, 800), Err(StatusWord::OVER_MAX_BALANCE));
    let init = b.init_load(&offer, 500).unwrap();
    let req = b.load_request(&offer, init, 800, Some(&he.pin));
    refused(
        &he,
        &mut b,
        req,
        ErrorCode::OverMaxBalance,
        "maximum balance",
    )
    .await;
    conservation(&he, &mut [&mut b]).await;

    // Insufficient funds: the savings account holds 1 000.
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let poor = LoadSource::Bank {
        account: POOR.into(),
    };
    let offer = b.offer(poor).await;
    assert_eq!(
        (offer.max_amount.minor, offer.limited_by.as_str()),
        (1_000, "funds")
    );
    let init = b.init_load(&offer, 1_500).unwrap();
    let req = b.load_request(&offer, init, 1_500, Some(&he.pin));
    refused(&he, &mut b, req, ErrorCode::InsufficientFunds, "available").await;

    // Over the daily limit: 30 000 a day; 20 000 loaded, then 10 001 more is refused.
    let (_, conf) = b.load(bank_source(), 20_000, Some(&he.pin)).await;
    assert!(matches!(conf, Message::LoadConfirmation(ref c) if c.loaded));
    let offer = b.offer(bank_source()).await;
    assert_eq!(
        (offer.max_amount.minor, offer.limited_by.as_str()),
        (10_000, "daily limit")
    );
    let init = b.init_load(&offer, 10_001).unwrap();
    let req = b.load_request(&offer, init, 10_001, Some(&he.pin));
    refused(&he, &mut b, req, ErrorCode::OverDailyLimit, "daily limit").await;
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (20_000, 20_000, 20_000));
    he.running.stop().await;
}

#[tokio::test]
async fn wrong_currency_and_another_boxs_account_are_refused() {
    let he = start().await;
    // A card in US dollars against a euro account: refused at the offer.
    let mut usd = LoadBox::with_currency(&he, BOX1, 0, 100_000, Currency::USD).await;
    let answer = usd.ask_offer(bank_source()).await;
    assert_eq!(error_code(&answer), ErrorCode::WrongCurrency);

    // A load request in another currency than the account's: refused at the bank.
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 1_000).unwrap();
    let mut req = b.load_request(&offer, init, 1_000, Some(&he.pin));
    req.amount = Money::new(1_000, Currency::USD);
    refused(&he, &mut b, req, ErrorCode::WrongCurrency, "USD").await;

    // Box 2 asks to load from box 1's account, and tries box 1's transaction.
    let mut other = LoadBox::new(&he, BOX2, 0, 100_000).await;
    let answer = other.ask_offer(bank_source()).await;
    let Message::Error(e) = &answer else {
        panic!("{answer:?}")
    };
    assert_eq!(e.code, ErrorCode::NotYourAccount);
    assert!(e.reason.contains("no such account"), "{}", e.reason);
    let stolen = LoadOffer { ..offer.clone() };
    let init = other.init_load(&stolen, 1_000).unwrap();
    let req = other.load_request(&stolen, init, 1_000, Some(&he.pin));
    refused(
        &he,
        &mut other,
        req,
        ErrorCode::NotYourAccount,
        "another box",
    )
    .await;
    conservation(&he, &mut [&mut usd, &mut b, &mut other]).await;
    he.running.stop().await;
}

#[tokio::test]
async fn wrong_pin_then_three_lock_the_account_until_the_operator_unlocks_it() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let wrong = if he.pin == "0000" { "1111" } else { "0000" };
    let init = b.init_load(&offer, 2_000).unwrap();
    let attempt = |pin: &str| b.load_request(&offer, init.clone(), 2_000, Some(pin));
    let (r1, r2, r3, right) = (
        attempt(wrong),
        attempt(wrong),
        attempt(wrong),
        attempt(&he.pin),
    );
    refused(&he, &mut b, r1, ErrorCode::WrongPin, "2 tries left").await;
    refused(&he, &mut b, r2, ErrorCode::WrongPin, "1 tries left").await;
    refused(&he, &mut b, r3, ErrorCode::AccountLocked, "locked").await;
    // Even the right PIN is refused now, and so is a new offer.
    refused(
        &he,
        &mut b,
        right.clone(),
        ErrorCode::AccountLocked,
        "locked",
    )
    .await;
    assert_eq!(
        error_code(&b.ask_offer(bank_source()).await),
        ErrorCode::AccountLocked
    );
    // The operator command, a real process on the bank's journal while the bank runs.
    let out = Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(["bank-unlock", "--account", ACCOUNT, "--config"])
        .arg(&he.config_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("unlocked"));
    // Unlocked: the right PIN now places the hold and the load completes (a fresh S1:
    // reading the balance above ended the card's load session).
    let init = b.init_load(&offer, 2_000).unwrap();
    let right = LoadRequest { init, ..right };
    let cmd = LoadBox::command(&b.call(&Message::LoadRequest(right)).await);
    let resp = b.run_load(&cmd).unwrap();
    let conf = b
        .call(&LoadBox::response_msg(&offer, Some(resp), None))
        .await;
    assert!(matches!(conf, Message::LoadConfirmation(ref c) if c.loaded));
    // A PIN block sealed for another transaction is refused (no replay of a sealed PIN).
    let offer2 = b.offer(bank_source()).await;
    let init = b.init_load(&offer2, 100).unwrap();
    let mut req = b.load_request(&offer2, init, 100, None);
    req.sealed_pin = Some(b.seal_pin(&offer.transaction_id, &he.pin));
    refused(&he, &mut b, req, ErrorCode::Replay, "another transaction").await;
    let steps = he
        .running
        .bank
        .as_ref()
        .unwrap()
        .journal()
        .steps(ACCOUNT)
        .unwrap();
    assert!(
        steps.iter().any(|s| s == "unlocked by the operator"),
        "{steps:?}"
    );
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (2_000, 2_000, 2_000));
    he.running.stop().await;
}

#[tokio::test]
async fn forged_s1_is_refused_and_the_hold_released() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let mut init = b.init_load(&offer, 3_000).unwrap();
    init.s1[2] ^= 0x40;
    let req = b.load_request(&offer, init, 3_000, Some(&he.pin));
    refused(&he, &mut b, req.clone(), ErrorCode::BadSignature, "S1").await;
    assert_eq!(
        bank_hold(&he, &offer.transaction_id),
        Some(HoldState::Released)
    );
    let load = he.running.load.as_ref().unwrap();
    assert_eq!(
        load.record(&offer.transaction_id).unwrap().state,
        LoadState::Refused
    );
    // The refusal is final: a retry gets the same refusal, never an authorization.
    refused(&he, &mut b, req, ErrorCode::BadSignature, "S1").await;
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
}

#[tokio::test]
async fn forged_s2_is_refused_by_the_card_and_the_zero_value_proof_releases() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 3_000).unwrap();
    let req = b.load_request(&offer, init, 3_000, Some(&he.pin));
    let mut cmd = LoadBox::command(&b.call(&Message::LoadRequest(req)).await);
    cmd.s2[7] ^= 1;
    assert_eq!(b.run_load(&cmd), Err(StatusWord::BAD_SIGNATURE));
    assert_eq!(b.balance(), 0);
    // The card never loaded: the box proves it with a zero-value S1 ([0130]).
    let zero = b.zero_value(&offer);
    let conf = b
        .call(&LoadBox::response_msg(&offer, None, Some(zero)))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );
    assert_eq!(
        bank_hold(&he, &offer.transaction_id),
        Some(HoldState::Released)
    );
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
}

#[tokio::test]
async fn forged_s3_is_refused_and_only_the_genuine_one_captures() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 4_000).unwrap();
    let req = b.load_request(&offer, init, 4_000, Some(&he.pin));
    let cmd = LoadBox::command(&b.call(&Message::LoadRequest(req)).await);
    let resp = b.run_load(&cmd).unwrap();
    let mut forged = resp.clone();
    forged.s3[0] ^= 0x80;
    let answer = b
        .call(&LoadBox::response_msg(&offer, Some(forged), None))
        .await;
    let Message::Error(e) = &answer else {
        panic!("{answer:?}")
    };
    assert_eq!(e.code, ErrorCode::BadSignature);
    assert!(e.reason.contains("S3"), "{}", e.reason);
    // A negative result forged onto a real load does not verify either.
    let mut claim = resp.clone();
    claim.result = proto::purse::LOAD_NEGATIVE;
    let answer = b
        .call(&LoadBox::response_msg(&offer, Some(claim), None))
        .await;
    assert_eq!(error_code(&answer), ErrorCode::BadSignature);
    assert_eq!(bank_hold(&he, &offer.transaction_id), Some(HoldState::Held));
    assert_eq!(
        account_balance(&he, ACCOUNT),
        50_000,
        "nothing captured yet"
    );
    // The genuine S3 captures.
    let conf = b
        .call(&LoadBox::response_msg(&offer, Some(resp), None))
        .await;
    assert!(matches!(conf, Message::LoadConfirmation(ref c) if c.loaded));
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (4_000, 4_000, 4_000));
    he.running.stop().await;
}

#[tokio::test]
async fn replayed_load_command_is_refused_by_the_card_and_never_paid_twice() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 0, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 1_500).unwrap();
    let req = b.load_request(&offer, init, 1_500, Some(&he.pin));
    let cmd = LoadBox::command(&b.call(&Message::LoadRequest(req.clone())).await);
    let resp = b.run_load(&cmd).unwrap();
    b.call(&LoadBox::response_msg(&offer, Some(resp), None))
        .await;
    // Straight replay, then replay into a fresh session.
    assert_eq!(b.run_load(&cmd), Err(StatusWord::WRONG_STATE));
    b.init_load(&offer, 1_500).unwrap();
    assert_eq!(b.run_load(&cmd), Err(StatusWord::REPLAY));
    // The load request again: the same command, no second hold.
    assert_eq!(
        LoadBox::command(&b.call(&Message::LoadRequest(req)).await),
        cmd
    );
    assert_eq!(b.balance(), 1_500);
    assert_eq!(
        he.running.bank.as_ref().unwrap().funds.holds().len(),
        1,
        "one hold"
    );
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (1_500, 1_500, 1_500));
    he.running.stop().await;
}

/// A load whose card answers LOAD negatively as `fault` does, then the zero-value proof.
/// Returns (verdict text, card balance, account balance, hold state).
async fn negative_case(fault: CardFault) -> (String, u64, u64, HoldState) {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 2_000, 100_000).await;
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 3_000).unwrap();
    let req = b.load_request(&offer, init, 3_000, Some(&he.pin));
    let cmd = LoadBox::command(&b.call(&Message::LoadRequest(req)).await);
    b.card.state.fault = Some(fault);
    let resp = b.run_load(&cmd).unwrap();
    assert!(!resp.is_loaded(), "negative result code");
    // Without the proof the load server asks for it, and nothing is settled.
    let answer = b
        .call(&LoadBox::response_msg(&offer, Some(resp.clone()), None))
        .await;
    assert!(
        matches!(&answer, Message::Error(e) if e.reason.contains("zero-value")),
        "{answer:?}"
    );
    assert_eq!(bank_hold(&he, &offer.transaction_id), Some(HoldState::Held));
    let zero = b.zero_value(&offer);
    let conf = b
        .call(&LoadBox::response_msg(&offer, Some(resp), Some(zero)))
        .await;
    assert!(matches!(conf, Message::LoadConfirmation(_)), "{conf:?}");
    let rec = he
        .running
        .load
        .as_ref()
        .unwrap()
        .record(&offer.transaction_id)
        .unwrap();
    let out = (
        rec.verdict.unwrap(),
        b.balance(),
        account_balance(&he, ACCOUNT),
        bank_hold(&he, &offer.transaction_id).unwrap(),
    );
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
    out
}

#[tokio::test]
async fn negative_true_negative_nobody_is_debited() {
    let (verdict, card, account, hold) = negative_case(CardFault::TrueNegative).await;
    assert_eq!(verdict, "negative result: TrueNegative");
    assert_eq!(
        (card, account, hold),
        (2_000, 50_000, HoldState::Released),
        "card not loaded, account not debited, hold released"
    );
}

#[tokio::test]
async fn negative_false_negative_the_account_pays_for_the_load_the_card_got() {
    let (verdict, card, account, hold) = negative_case(CardFault::FalseNegative).await;
    assert_eq!(verdict, "negative result: FalseNegative");
    assert_eq!(
        (card, account, hold),
        (5_000, 47_000, HoldState::Captured),
        "card loaded despite its claim, so the account is debited and the float credited"
    );
}

#[tokio::test]
async fn negative_counter_bumped_by_accident_nobody_is_debited() {
    let (verdict, card, account, hold) = negative_case(CardFault::CounterBump).await;
    assert_eq!(verdict, "negative result: CounterBumped");
    assert_eq!((card, account, hold), (2_000, 50_000, HoldState::Released));
}

#[test]
fn example_config_documents_the_load_side_and_parses() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../config/headend.example.toml"
    );
    let cfg = headend::config::HeadendConfig::load(std::path::Path::new(path)).unwrap();
    let bank = cfg.bank.as_ref().unwrap();
    assert_eq!((bank.daily_limit, bank.pin_tries), (30_000, 3));
    assert_eq!(cfg.load.as_ref().unwrap().hsm_id, 0x4853_4D01);
    assert_eq!(cfg.bank_accounts[0].box_id, "box-000001");
    assert_eq!(cfg.vouchers[0].amount, 10_000);
    assert_eq!(cfg.transport, headend::quic::TransportSettings::default());
    // The clearing side: every sender names the clearing role the example configures.
    let clearing = cfg.clearing.as_ref().unwrap();
    assert_eq!(clearing.payment_servers, ["payment"]);
    let payment = cfg.payment.as_ref().unwrap();
    assert_eq!(payment.clearing.as_deref(), Some(clearing.name.as_str()));
    assert_eq!(payment.security_card_ids_from, 0x5A00_0000);
    assert_eq!(bank.clearing.as_deref(), Some(clearing.name.as_str()));
    assert_eq!(
        cfg.load.as_ref().unwrap().clearing.as_deref(),
        Some(clearing.name.as_str())
    );
}

/// Key update with a bank load (001 [0044]; 004's monthly key change): with load and
/// purchase keys of versions 1 and 2 (version 1 retired for purchases) and the load server
/// given the purchase masters to re-key, a version-1 card's bank load credits it and moves
/// it to version 2 in the same LOAD; its next load is under version 2 with no update; value
/// is conserved throughout.
#[tokio::test]
async fn a_version_1_card_comes_out_of_a_bank_load_on_version_2() {
    let v2 = IssuerKeys {
        key_version: 2,
        purchase_master: DesKey::new([0x5C; 16]),
        load_master: DesKey::new([0x6D; 16]),
    };
    // (The token, when the load server runs on one, replaces the load_keys line after.)
    let rekey = |t: String| {
        let line = t
            .lines()
            .find(|l| l.starts_with("load_keys = "))
            .expect("the demo's [load] load_keys")
            .to_string();
        let rekey = line
            .replace("load_keys", "rekey_purchase_keys")
            .replace("load-keys", "purchase-keys");
        t.replace(&line, &format!("{line}\n{rekey}"))
    };
    let v2_keys = v2.clone();
    let he = start_prepared(pg_rig::Backend::Sqlite, headend::assembly::Roles::ALL, rekey, move |dir| {
        let v1 = headend::config::load_issuer_keys(&dir.join("issuer-keys.toml")).unwrap();
        let keys = dir.join("keys");
        for (file, a, b, retire) in [
            ("load-keys.toml", &v1.load_master, &v2_keys.load_master, false),
            (
                "purchase-keys.toml",
                &v1.purchase_master,
                &v2_keys.purchase_master,
                true,
            ),
        ] {
            let text = format!(
                "[[keys]]\nkey_version = 1\nmaster = \"{}\"\nretired = {retire}\n\n[[keys]]\nkey_version = 2\nmaster = \"{}\"\n",
                hex::encode_upper(a.bytes()),
                hex::encode_upper(b.bytes()),
            );
            proto::secret::write_private(&keys.join(file), text.as_bytes()).unwrap();
        }
    })
    .await
    .unwrap();
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    assert_eq!(b.card.state.key_version, 1);
    let (_, answer) = b.load(bank_source(), 2_000, Some(&he.pin.clone())).await;
    assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
    assert_eq!(b.balance(), 3_000, "credited");
    assert_eq!(b.card.state.key_version, 2, "re-keyed with the load");
    assert_eq!(
        b.card.state.keys,
        CardKeys::derive(&v2, b.card.state.card_id),
        "the card holds its version-2 keys"
    );
    // The next load is a version-2 card's: no update, verified under version 2.
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 500).unwrap();
    assert_eq!(init.key_version, 2);
    let req = b.load_request(&offer, init, 500, Some(&he.pin.clone()));
    let answer = b.call(&Message::LoadRequest(req)).await;
    let Message::LoadCommand(c) = &answer else {
        panic!("{answer:?}")
    };
    assert_eq!(c.key_update, None, "nothing to update on a version-2 card");
    let resp = b.run_load(&c.command).unwrap();
    let conf = b
        .call(&LoadBox::response_msg(&offer, Some(resp), None))
        .await;
    assert!(matches!(conf, Message::LoadConfirmation(_)), "{conf:?}");
    assert_eq!(b.balance(), 3_500);
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
}

/// Seed 004's lock and unblock through the head end. A card locked by bad signatures shows
/// the count. With `[load] unblock_with_bank_loads`, a bank load carries the issuer's
/// UNBLOCK and the card comes out open and credited; without it the card refuses the LOAD
/// (`6983`) and the negative-result procedure releases the hold. A voucher (pre-funded,
/// no PIN) gets no offer for a locked card. No value lost either way.
#[tokio::test]
async fn a_locked_card_is_opened_by_a_bank_load_only_when_the_issuer_unblocks() {
    use proto::purse::STATUS_BLOCKED;
    for unblocking in [true, false] {
        let he = start_roles(headend::assembly::Roles::ALL, |t| {
            if unblocking {
                t.replacen("[load]\n", "[load]\nunblock_with_bank_loads = true\n", 1)
            } else {
                t
            }
        })
        .await;
        let lock = |b: &mut LoadBox| {
            b.card.state.status |= STATUS_BLOCKED;
            b.card.state.bad_key_count = b.card.state.bad_key_limit;
        };
        let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
        lock(&mut b);
        let purse = b.purse();
        assert!(purse.is_blocked());
        assert_eq!(purse.bad_key_count, purse.bad_key_limit, "the count shows");

        // A voucher cannot open it: no offer.
        let mut v = LoadBox::new(&he, BOX2, 0, 100_000).await;
        lock(&mut v);
        let answer = v.ask_offer(voucher_source("VOUCHER-0002")).await;
        assert!(
            matches!(&answer, Message::Error(e) if e.reason.contains("only a load from a bank account")),
            "{answer:?}"
        );

        let offer = b.offer(bank_source()).await;
        let init = b
            .init_load(&offer, 500)
            .expect("a locked card starts a load");
        let req = b.load_request(&offer, init, 500, Some(&he.pin));
        let answer = b.call(&Message::LoadRequest(req)).await;
        let Message::LoadCommand(c) = &answer else {
            panic!("{answer:?}")
        };
        assert_eq!(c.unblock.is_some(), unblocking, "{unblocking}");
        let r = b.apdu(&proto::card::commands::load_with_issuer(
            &c.command,
            c.key_update.as_deref(),
            c.unblock.as_deref(),
        ));
        if unblocking {
            assert!(r.sw.is_ok(), "{}", r.sw);
            let resp = proto::purse::LoadResponse::decode(&r.data).unwrap();
            let conf = b
                .call(&LoadBox::response_msg(&offer, Some(resp), None))
                .await;
            assert!(
                matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
                "{conf:?}"
            );
            let purse = b.purse();
            assert!(!purse.is_blocked(), "opened");
            assert_eq!((purse.balance, purse.bad_key_count), (1_500, 0));
        } else {
            assert_eq!(r.sw, StatusWord::BLOCKED);
            let zero = b.zero_value(&offer);
            let conf = b
                .call(&LoadBox::response_msg(&offer, None, Some(zero)))
                .await;
            assert!(
                matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
                "proved not loaded: {conf:?}"
            );
            let purse = b.purse();
            assert!(purse.is_blocked());
            assert_eq!(purse.balance, 1_000);
        }
        conservation(&he, &mut [&mut b]).await;
        he.running.stop().await;
    }
}

/// Three purchases on the card, made with a security card of the issuer: its passbook.
fn buy_three(he: &HeadEnd, b: &mut LoadBox) {
    use proto::card::commands;
    use proto::purse::{DebitResponse, PurchaseInit};
    let mut sc =
        proto::security_card::SecurityCard::new(0x5A00_0099, issuer_keys(&he.cfg).purchase());
    for (i, amount) in [499u64, 399, 1_250].into_iter().enumerate() {
        b.apdu(&commands::select());
        let init = PurchaseInit::decode(&b.apdu(&commands::init_purchase(today())).data).unwrap();
        let draw = proto::security_card::DrawData {
            merchant_id: "CABLE".into(),
            transaction_id: format!("p{i}"),
            amount: Money::new(amount, Currency::EUR),
            init,
        };
        let auth = sc.issue_debit(&draw, today(), false).unwrap();
        let r = b.apdu(&commands::debit(&auth.command));
        let resp = DebitResponse::decode(&r.data).unwrap();
        sc.complete(auth.command.security_card_txn, &resp).unwrap();
    }
}

/// Seed 004 PASSBOOK, through the head end: a bank load uploads the card's passbook — the
/// records since its last upload, exactly what its S1 covers — the bank keeps them with the
/// capture, and the card clears them with the credit. A box that leaves one out is refused
/// and nothing moves; with privacy on, nothing is uploaded and the bank keeps nothing more.
#[tokio::test]
async fn a_bank_load_uploads_the_passbook_to_the_bank_and_the_card_clears_it() {
    let he = start().await;
    let mut b = LoadBox::new(&he, BOX1, 5_000, 100_000).await;
    buy_three(&he, &mut b);
    // The purchases were paid elsewhere: conservation counts loads from here.
    b.start_balance = b.balance();
    let card_id = b.card.state.card_id;
    let passbook = b.card.state.passbook();
    assert_eq!(passbook.len(), 3);
    let bank = &he.running.bank.as_ref().unwrap().funds;

    // One record left out: not the card's passbook; refused, the hold released.
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 1_000).unwrap();
    let mut req = b.load_request(&offer, init, 1_000, Some(&he.pin));
    req.passbook.remove(1);
    let answer = b.call(&Message::LoadRequest(req)).await;
    assert_eq!(error_code(&answer), ErrorCode::BadSignature, "{answer:?}");
    assert!(bank.passbook(card_id).is_empty());

    // The whole passbook: uploaded, kept by the bank with the capture, cleared on the card.
    let (_, conf) = b.load(bank_source(), 1_000, Some(&he.pin)).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert!(
        eventually(|| bank.passbook(card_id).len() == 3).await,
        "the bank keeps the three purchases"
    );
    assert_eq!(bank.passbook(card_id), passbook);
    let purse = b.purse();
    assert_eq!(purse.passbook_through, passbook.last().unwrap().atc);
    let left = b.card.state.passbook();
    assert_eq!(left.len(), 1, "only the load itself is new");

    // Privacy on: the next bank load uploads nothing; the bank keeps nothing more.
    b.apdu(&proto::card::commands::select());
    assert!(b.apdu(&proto::card::commands::set_privacy(true)).sw.is_ok());
    let (_, conf) = b.load(bank_source(), 500, Some(&he.pin)).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(bank.passbook(card_id).len(), 3);
    assert_eq!(
        b.purse().passbook_through,
        passbook.last().unwrap().atc,
        "nothing cleared"
    );
    conservation(&he, &mut [&mut b]).await;
    he.running.stop().await;
}

/// Seed 004 FIG. 5, keys come down from the bank: with `[load] app_key_file` and
/// `app_epoch = 55`, a bank load through the load server pushes epoch 55's application key,
/// and a card holding {51–54} comes out holding {52–55} — its oldest replaced, in the same
/// LOAD as the credit. A voucher load pushes nothing. The pushed key is the scheme's: the
/// card then transfers with a card personalised on {54–57}, which it could not before.
#[tokio::test]
async fn a_bank_load_pushes_the_current_application_key_which_replaces_the_oldest() {
    use proto::transfer::{AppKeys, common_epochs};
    let app_master = |dir: &std::path::Path| {
        let text = std::fs::read_to_string(dir.join("issuer-keys.toml")).unwrap();
        let file: proto::purse::IssuerKeyFile = toml::from_str(&text).unwrap();
        file.app_master()
            .unwrap()
            .expect("init-demo writes an application master")
    };
    let he = start_prepared(
        pg_rig::Backend::Sqlite,
        headend::assembly::Roles::ALL,
        |t| {
            t.replacen(
                "[load]\n",
                "[load]\napp_key_file = \"keys/app-master.key\"\napp_epoch = 55\n",
                1,
            )
        },
        move |dir| {
            let hex = format!("{}\n", hex::encode_upper(app_master(dir).bytes()));
            proto::secret::write_private(&dir.join("keys/app-master.key"), hex.as_bytes()).unwrap();
        },
    )
    .await
    .unwrap();
    let master = app_master(he.dir.path());
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    b.card.state.app_keys = Some(AppKeys::from_master(&master, 51).unwrap());
    assert!(common_epochs([51, 52, 53, 54], [54, 55, 56, 57]).is_err());

    let (_, conf) = b.load(bank_source(), 2_000, Some(&he.pin.clone())).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(b.balance(), 3_000);
    let keys = b.card.state.app_keys.clone().unwrap();
    assert_eq!(
        keys.epochs(),
        [52, 53, 54, 55],
        "55 replaced the oldest, 51"
    );

    // A voucher load carries no application key.
    let mut v = LoadBox::new(&he, BOX2, 0, 100_000).await;
    v.card.state.app_keys = Some(AppKeys::from_master(&master, 51).unwrap());
    let offer = v.offer(voucher_source("VOUCHER-0002")).await;
    let init = v.init_load(&offer, 500).unwrap();
    let req = v.load_request(&offer, init, 500, None);
    let answer = v.call(&Message::LoadRequest(req)).await;
    let Message::LoadCommand(c) = &answer else {
        panic!("{answer:?}")
    };
    assert_eq!(c.app_key, None, "keys come down with bank loads only");
    let resp = v.run_load(&c.command).unwrap();
    let conf = v
        .call(&LoadBox::response_msg(&offer, Some(resp), None))
        .await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(
        v.card.state.app_keys.as_ref().unwrap().epochs(),
        [51, 52, 53, 54]
    );

    conservation(&he, &mut [&mut b, &mut v]).await;
    he.running.stop().await;

    // The pushed key is epoch 55 of the scheme: a card of {54–57} shares 54 and 55 with it.
    let spec = proto::card::CardSpec::demo(0x4EE0, EUR, 0, 100_000);
    let issuer =
        headend::config::load_issuer_keys(&he.dir.path().join("issuer-keys.toml")).unwrap();
    let newer = proto::card::CardState::personalise(&spec, &issuer)
        .with_app_keys(&master, 54)
        .unwrap();
    let mut newer = proto::card::PurseCard::new(newer, 7);
    let mut on_newer = |apdu: &[u8]| {
        let r = proto::apdu::Response::parse(&proto::apdu::CardApplication::process_apdu(
            &mut newer, apdu,
        ))
        .unwrap();
        assert!(r.sw.is_ok(), "{}", r.sw);
        r.data
    };
    use proto::card::transfer::commands as xfer;
    let today = proto::purse::Date::new(2026, 12, 1);
    on_newer(&proto::card::commands::select());
    let recv = on_newer(&xfer::receive(today, 700, EUR));
    b.apdu(&proto::card::commands::select());
    let r = b.apdu(&xfer::send(
        today,
        700,
        EUR,
        0x4EE0,
        recv[8..12].try_into().unwrap(),
        recv[12..20].try_into().unwrap(),
    ));
    assert!(r.sw.is_ok(), "{}", r.sw);
    let p23 = on_newer(&xfer::packet1(&r.data));
    let r = b.apdu(&xfer::packets23(&p23));
    assert!(r.sw.is_ok(), "{}", r.sw);
    on_newer(&xfer::packet4(today, &r.data));
    assert_eq!((b.balance(), newer.state.balance), (2_300, 700));
}
