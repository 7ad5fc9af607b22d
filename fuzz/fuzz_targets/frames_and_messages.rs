//! The wire: length-prefixed frames fed in arbitrary chunks, and every message decoded from
//! any payload; the sealed bodies' layouts too (debit result M, "authentication OK").
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::frame::{DEFAULT_MAX_FRAME, FrameDecoder};
use proto::messages::{AuthenticationOk, DebitResultM, Message};

fuzz_target!(|data: &[u8]| {
    let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
    for chunk in data.chunks(7) {
        d.push(chunk);
        while let Ok(Some(p)) = d.next_frame() {
            let _ = Message::from_payload(&p);
        }
    }
    let _ = Message::from_payload(data);
    let _ = Message::from_frame(data, 4096);
    let _ = postcard::from_bytes::<DebitResultM>(data);
    let _ = postcard::from_bytes::<AuthenticationOk>(data);
});
