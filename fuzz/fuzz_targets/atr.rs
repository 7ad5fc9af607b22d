//! Answers to reset from any bytes (as PC/SC reports them, and raw from a serial line).
#![no_main]
use libfuzzer_sys::fuzz_target;
use reader_drivers::serial::atr::Atr;

fuzz_target!(|data: &[u8]| {
    let _ = Atr::parse(data);
    let _ = Atr::parse_raw(data);
});
