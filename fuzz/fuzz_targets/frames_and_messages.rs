//! The wire: length-prefixed frames fed in arbitrary chunks, and every message decoded from
//! any payload.
#![no_main]
use libfuzzer_sys::fuzz_target;
use proto::frame::{DEFAULT_MAX_FRAME, FrameDecoder};
use proto::messages::Message;

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
});
