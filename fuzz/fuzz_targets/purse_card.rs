//! The purse card fed any sequence of APDUs (the input split at 0xFF 0xFE): every answer
//! ends with a status word, the card never panics, and no value appears from nowhere.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::DesKey;
use proto::money::Currency;
use proto::provider::{INSTRUMENT_CREDIT, ProviderSpec, ReadAccess};
use proto::purse::{IssuerKeys, MasterKey};

fuzz_target!(|data: &[u8]| {
    let issuer = IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    };
    let mut state =
        CardState::personalise(&CardSpec::demo(7, Currency::EUR, 1_000, 100_000), &issuer)
            .with_pin("4711", 500)
            .expect("a valid PIN")
            .with_app_keys(&DesKey::new([0x5A; 16]), 49)
            .expect("epochs 49–52");
    // Two service-provider records (seed 003), so READ/UPDATE RECORD (00 B2 / 00 DC) reach
    // them: record 1 read under the PIN, record 2 always.
    for (id, read_access) in [(1, ReadAccess::Pin), (2, ReadAccess::Always)] {
        let spec = ProviderSpec {
            provider_id: id,
            name: "provider".into(),
            account: vec![id as u8; 8],
            instrument: INSTRUMENT_CREDIT,
            read_access,
        };
        let master = MasterKey::new(1, DesKey::new([0x30 + id as u8; 16]));
        state = state.with_provider(&spec, &master).expect("a valid record");
    }
    let providers = state.providers.clone();
    let mut card = PurseCard::new(state, 1);
    let _ = card.process_apdu(&commands::select());
    for apdu in data.split(|b| *b == 0xFF) {
        let out = card.process_apdu(apdu);
        assert!(
            Response::parse(&out).is_ok(),
            "an answer without a status word"
        );
    }
    // Without the issuer's keys, or another card's packets, no command can add value (a
    // transfer the card sent and then cancelled comes back at most).
    assert!(card.state.balance <= 1_000);
    // Without a provider's key no UPDATE RECORD applies.
    assert_eq!(card.state.providers, providers);
});
