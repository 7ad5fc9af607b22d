//! APDU round trips through the serial driver (tokio-serial on a real pty, `SerialDriver::new`
//! with the modem lines on the emulator's socket, as stbd runs it) against the Phoenix
//! emulator, at 9600 baud 8E2 and at the highest speed the virtual card offers by PPS (TA1 18:
//! Di 12, 115,200 baud at 3.5712 MHz), reported against the wire-time floor.
//!
//! A pty moves bytes instantly, so the emulator paces every character it puts on the line
//! (the card's bytes and the echo of the host's) at 12 bits per character, as a real 9600 8E2
//! line would. The floor is (characters on the line, both directions, echo not counted) × bits
//! per character / baud. Run: `cargo bench -p reader-drivers --bench serial_roundtrip`.

use std::time::{Duration, Instant};

use proto::apdu::CardApplication;
use reader_drivers::emulator::phoenix::{PhoenixConfig, PhoenixEmulator};
use reader_drivers::serial::{ModemLines, PpsPolicy, SerialConfig, SerialDriver};
use reader_drivers::{ReaderDriver, transmit_whole};

struct BenchCard;

impl CardApplication for BenchCard {
    fn atr(&self) -> Vec<u8> {
        // The virtual card's serial ATR (`vcard serial-pty`): T=0, TA1 18, "PURSELINK1".
        let mut atr = vec![0x3B, 0x1A, 0x18];
        atr.extend_from_slice(b"PURSELINK1");
        atr
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

/// 8E2: 1 start + 8 data + 1 parity + 2 stop.
const BITS_PER_CHAR: u32 = 12;
const ROUNDS: u32 = 30;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async {
        for (pps, label) in [
            (PpsPolicy::Off, "no PPS"),
            (PpsPolicy::Negotiate, "PPS to TA1 18"),
        ] {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut emu = PhoenixEmulator::start(Box::new(BenchCard), PhoenixConfig::default())
                .expect("emulator on a pty");
            let sock = dir.path().join("lines");
            emu.serve_lines(&sock).expect("line socket");
            let mut cfg = SerialConfig::new("phoenix0", emu.path());
            cfg.modem_lines = ModemLines::Socket(sock);
            cfg.pps = pps;
            let driver = SerialDriver::new(cfg);
            let (mut session, _atr) = driver.connect("phoenix0").await.expect("connect");
            let baud = emu.stats().baud;
            println!(
                "serial round trip ({label}): tokio-serial on pty {} ↔ Phoenix emulator, {baud} \
                 baud 8E2 ({BITS_PER_CHAR} bits/char); the emulator paces its output at the line \
                 speed (a pty alone does not); the driver keeps 16 etu turnaround",
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
                let floor = Duration::from_secs_f64(
                    chars as f64 * f64::from(BITS_PER_CHAR) / f64::from(baud),
                );
                println!(
                    "  {name} at {baud} baud: {chars} chars on the line; mean round trip {:.2} ms \
                     over {ROUNDS}; floor {:.2} ms at {BITS_PER_CHAR} bits/char → ratio {:.3}",
                    elapsed.as_secs_f64() * 1e3,
                    floor.as_secs_f64() * 1e3,
                    elapsed.as_secs_f64() / floor.as_secs_f64(),
                );
            }
            session.power_down().await.expect("power down");
        }
    });
}
