//! ISO 7816-4 command and response APDUs from any bytes: a typed error, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = proto::apdu::Command::parse(data);
    let _ = proto::apdu::Response::parse(data);
});
