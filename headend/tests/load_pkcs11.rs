//! The load server's HSM with its load masters in a PKCS#11 token: SoftHSM2 from Debian, a
//! token made in a temporary directory (`SOFTHSM2_CONF` of this test process), the masters
//! imported with `headend hsm import`'s code as sensitive and not extractable. The bank and
//! voucher loads, a forged S1, the negative-result procedure and a key update run through
//! the same head end as the software HSM's tests; and a token that is missing, or a wrong
//! PIN, stops the load server at start with a specific message.
//!
//! Needs SoftHSM2 (`scripts/system-setup.sh` installs it).

mod load_support;

use headend::config::HeadendConfig;
use headend::load::token::{self, TokenDef};
use load_support::token::{PIN, new_token, token_alone, use_token};
use load_support::*;
use proto::card::CardFault;
use proto::messages::*;
use proto::purse::AnyMasterKeyFile;

/// The demo head end with its load masters imported into a new token `label`.
async fn start_with_token(label: &str) -> (HeadEnd, TokenDef) {
    let def = new_token(label);
    let d2 = def.clone();
    let (dir, config_path, pin) = demo(move |t| use_token(&t, &d2));
    let keys = dir.path().join("keys/load-keys.toml");
    let file: AnyMasterKeyFile = toml::from_str(&std::fs::read_to_string(&keys).unwrap()).unwrap();
    assert_eq!(
        token::import(&def, &file.clone().into_generations()).unwrap(),
        vec![1]
    );
    assert_eq!(
        token::import(&def, &file.into_generations()).unwrap(),
        Vec::<u8>::new(),
        "a version already in the token is left"
    );
    assert!(
        !token::key_value_readable(&def, 1).unwrap(),
        "the master cannot be read out of the token"
    );
    let cfg = HeadendConfig::load(&config_path).unwrap();
    assert!(cfg.load.as_ref().unwrap().load_keys.is_none());
    let running = headend::assembly::start(&cfg, headend::assembly::Roles::ALL)
        .await
        .unwrap();
    (
        HeadEnd {
            dir,
            cfg,
            config_path,
            running,
            pin,
            pg: None,
            token: Some(def.clone()),
        },
        def,
    )
}

#[tokio::test]
async fn bank_and_voucher_loads_and_refusals_with_the_masters_in_softhsm2() {
    let (he, _def) = start_with_token("loads").await;
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (_, answer) = b.load(bank_source(), 2_000, Some(&he.pin.clone())).await;
    assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
    assert_eq!(b.balance(), 3_000);
    let mut b2 = LoadBox::new(&he, BOX2, 0, 100_000).await;
    let (_, answer) = b2.load(voucher_source("VOUCHER-0002"), 5_000, None).await;
    assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
    assert_eq!(b2.balance(), 5_000);

    // A forged S1: refused by the token-derived key, nothing loaded.
    let offer = b.offer(bank_source()).await;
    let mut init = b.init_load(&offer, 100).unwrap();
    init.s1[0] ^= 1;
    let req = b.load_request(&offer, init, 100, Some(&he.pin.clone()));
    let answer = b.call(&Message::LoadRequest(req)).await;
    assert_eq!(error_code(&answer), ErrorCode::BadSignature, "{answer:?}");

    // The negative-result procedure ([0129]–[0132]): the card answers LOAD with a true
    // negative; its zero-value S1 (checked under the token's key) shows it was not loaded.
    b.card.state.fault = Some(CardFault::TrueNegative);
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 300).unwrap();
    let req = b.load_request(&offer, init, 300, Some(&he.pin.clone()));
    let answer = b.call(&Message::LoadRequest(req)).await;
    let resp = b.run_load(&LoadBox::command(&answer)).unwrap();
    assert!(!resp.is_loaded());
    let zero = b.zero_value(&offer);
    let answer = b
        .call(&LoadBox::response_msg(&offer, Some(resp), Some(zero)))
        .await;
    let Message::LoadConfirmation(c) = &answer else {
        panic!("{answer:?}")
    };
    assert!(!c.loaded, "proved not loaded");
    assert_eq!(b.balance(), 3_000);
    conservation(&he, &mut [&mut b, &mut b2]).await;
    he.running.stop().await;
}

#[tokio::test]
async fn a_missing_token_or_a_wrong_pin_stops_the_load_server_at_start() {
    let def = token_alone("startup");
    let (dir, config_path, _pin) = demo({
        let d = def.clone();
        move |t| use_token(&t, &d)
    });
    let _keep = dir;
    let cfg = HeadendConfig::load(&config_path).unwrap();
    // No key imported yet: said so.
    let e = headend::load::LoadServer::open(&cfg).err().unwrap();
    assert!(
        e.contains("holds no load master") && e.contains("headend hsm import"),
        "{e}"
    );
    // A wrong PIN.
    proto::secret::write_private(&def.pin_file, b"000000").unwrap();
    let e = headend::load::LoadServer::open(&cfg).err().unwrap();
    assert!(e.contains("PIN") && e.contains("wrong"), "{e}");
    proto::secret::write_private(&def.pin_file, PIN.as_bytes()).unwrap();
    // A token label that is not there.
    let mut other = cfg.clone();
    other
        .load
        .as_mut()
        .unwrap()
        .token
        .as_mut()
        .unwrap()
        .token_label = "nowhere".into();
    let e = headend::load::LoadServer::open(&other).err().unwrap();
    assert!(e.contains("no token labelled \"nowhere\""), "{e}");
    // A module that is not there.
    let mut other = cfg.clone();
    other.load.as_mut().unwrap().token.as_mut().unwrap().module = "/nonexistent/libp11.so".into();
    let e = headend::load::LoadServer::open(&other).err().unwrap();
    assert!(e.contains("cannot be loaded"), "{e}");
}
