//! APDU round trips through the serial driver (tokio-serial on a real pty) against the Phoenix
//! emulator at 9600 baud 8E2, reported against the wire-time floor.
//!
//! A pty moves bytes instantly, so the emulator paces every character it puts on the line
//! (the card's bytes and the echo of the host's) at 12 bits per character, as a real 9600 8E2
//! line would. The floor is (characters on the line, both directions, echo not counted) × bits
//! per character / baud. Run: `cargo bench -p reader-drivers --bench serial_roundtrip`.

use std::time::{Duration, Instant};

use proto::apdu::CardApplication;
use reader_drivers::emulator::phoenix::{PhoenixConfig, PhoenixEmulator};
use reader_drivers::serial::{SerialConfig, SerialDriver};
use reader_drivers::{ReaderDriver, transmit_whole};

struct BenchCard;

impl CardApplication for BenchCard {
    fn atr(&self) -> Vec<u8> {
        // T=0 only, no TA1: the line stays at 9600 baud.
        vec![
            0x3B, 0x6E, 0x00, 0x00, 0x80, 0x31, 0x80, 0x66, 0xB0, 0x84, 0x0C, 0x01, 0x6E, 0x01,
            0x83, 0x00, 0x90, 0x00,
        ]
    }
    fn reset(&mut self) {}
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        match apdu.get(1) {
            Some(0xA4) => vec![0x90, 0x00],
            Some(0xB0) => {
                let mut out = vec![0x5A; 16];
                out.extend_from_slice(&[0x90, 0x00]);
                out
            }
            _ => vec![0x6D, 0x00],
        }
    }
}

const BAUD: u32 = 9600;
/// 8E2: 1 start + 8 data + 1 parity + 2 stop.
const BITS_PER_CHAR: u32 = 12;
const ROUNDS: u32 = 30;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        let emu = PhoenixEmulator::start(Box::new(BenchCard), PhoenixConfig::default())
            .expect("emulator on a pty");
        let driver = SerialDriver::with_lines(
            SerialConfig::new("phoenix0", emu.path()),
            emu.lines_factory(),
        );
        let (mut session, _atr) = driver.connect("phoenix0").await.expect("connect");
        println!(
            "serial round trip: tokio-serial on pty {} ↔ Phoenix emulator, {BAUD} baud 8E2 \
             ({BITS_PER_CHAR} bits/char), emulator paces its output at the line speed \
             (a pty alone does not)",
            emu.path()
        );
        let cases: [(&str, &[u8]); 2] = [
            (
                "SELECT (case 3, 4 data bytes)",
                &[0x00, 0xA4, 0x04, 0x00, 0x04, 0xF0, 0x50, 0x55, 0x52],
            ),
            ("READ BINARY (case 2, 16 bytes)", &[0x00, 0xB0, 0, 0, 16]),
        ];
        for (name, apdu) in cases {
            // Warm-up round, not measured.
            transmit_whole(session.as_mut(), apdu).await.expect("apdu");
            let before = emu.stats();
            let start = Instant::now();
            for _ in 0..ROUNDS {
                transmit_whole(session.as_mut(), apdu).await.expect("apdu");
            }
            let elapsed = start.elapsed() / ROUNDS;
            let after = emu.stats();
            let chars = ((after.host_bytes - before.host_bytes)
                + (after.card_bytes - before.card_bytes))
                / u64::from(ROUNDS);
            let floor =
                Duration::from_secs_f64(chars as f64 * f64::from(BITS_PER_CHAR) / f64::from(BAUD));
            let floor11 = Duration::from_secs_f64(chars as f64 * 11.0 / f64::from(BAUD));
            println!(
                "  {name}: {chars} chars on the line; mean round trip {:.2} ms over {ROUNDS}; \
                 floor {:.2} ms at {BITS_PER_CHAR} bits/char → ratio {:.3} \
                 (against the 11-bit floor {:.2} ms: {:.3})",
                elapsed.as_secs_f64() * 1e3,
                floor.as_secs_f64() * 1e3,
                elapsed.as_secs_f64() / floor.as_secs_f64(),
                floor11.as_secs_f64() * 1e3,
                elapsed.as_secs_f64() / floor11.as_secs_f64(),
            );
        }
        session.power_down().await.expect("power down");
    });
}
