//! The purse card fed any sequence of APDUs (the input split at 0xFF 0xFE): every answer
//! ends with a status word, the card never panics, and no value appears from nowhere.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::DesKey;
use proto::money::Currency;
use proto::purse::IssuerKeys;

fuzz_target!(|data: &[u8]| {
    let issuer = IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    };
    let state = CardState::personalise(&CardSpec::demo(7, Currency::EUR, 1_000, 100_000), &issuer)
        .with_pin("4711", 500)
        .expect("a valid PIN");
    let mut card = PurseCard::new(state, 1);
    let _ = card.process_apdu(&commands::select());
    for apdu in data.split(|b| *b == 0xFF) {
        let out = card.process_apdu(apdu);
        assert!(
            Response::parse(&out).is_ok(),
            "an answer without a status word"
        );
    }
    // Without the issuer's keys no command can add value.
    assert!(card.state.balance <= 1_000);
});
