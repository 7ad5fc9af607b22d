//! Every purse data layout, and the FCI's PIN rule, from any bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::purse::*;

fuzz_target!(|data: &[u8]| {
    let _ = PurseInfo::decode(data);
    let _ = PurchaseInit::decode(data);
    let _ = DebitCommand::decode(data);
    let _ = DebitResponse::decode(data);
    let _ = LoadInit::decode(data);
    let _ = LoadInitRequest::decode(data);
    let _ = LoadCommand::decode(data);
    let _ = LoadResponse::decode(data);
    let _ = LogRecord::decode(data);
    let _ = KeyUpdate::decode(data);
    let _ = Unblock::decode(data);
    let _ = proto::card::PinRule::from_fci(data);
    // Card to card (seed 004 FIG. 6).
    let _ = proto::transfer::Greeting::decode(data);
    let _ = proto::transfer::ValuePacket::decode(data);
    let _ = proto::transfer::Settlement::decode(data);
    let _ = proto::transfer::TransferStatus::decode(data);
    let _ = proto::transfer::AppKey::decode(data);
    let _ = proto::transfer::read_parts::<2>(data);
});
