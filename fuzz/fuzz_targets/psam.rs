//! The security card's PSAM application fed any sequence of APDUs (split at 0xFF): every
//! answer ends with a status word, and nothing is counted as sold.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::apdu::Response;
use proto::psam::{Psam, commands};
use proto::purse::{MasterKeyEntry, MasterKeysFile};

fuzz_target!(|data: &[u8]| {
    let keys = MasterKeysFile {
        keys: vec![MasterKeyEntry {
            key_version: 1,
            master: "11111111111111111111111111111111".into(),
            retired: false,
        }],
    };
    let mut p = Psam::personalise(0x5A11_0001, keys).expect("a PSAM");
    let _ = p.process(&commands::select());
    for apdu in data.split(|b| *b == 0xFF) {
        let out = p.process(apdu).response;
        assert!(
            Response::parse(&out).is_ok(),
            "an answer without a status word"
        );
    }
    assert!(p.status().totals.values().all(|t| t.count == 0));
});
