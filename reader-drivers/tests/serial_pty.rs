//! The serial driver through tokio-serial on a real pty, against the Phoenix emulator: ATR
//! (direct and inverse), T=0 procedure bytes, 61xx / 6Cxx, PPS, a mute card, a timeout.
//!
//! Reset and card detect go through the emulator's line-control seam (ptys have no modem
//! lines); every data byte crosses the pty.

use std::time::Duration;

use proto::apdu::{CardApplication, Command};
use reader_drivers::emulator::phoenix::{Fault, PhoenixConfig, PhoenixEmulator};
use reader_drivers::serial::{SerialConfig, SerialDriver};
use reader_drivers::{CardPresence, ReaderDriver, ReaderError, ReaderEvent, transmit_whole};

/// A small T=0 card: SELECT → 9000; READ BINARY → 16 bytes whatever Le (so a wrong Le gets
/// 6Cxx); case 4 `80 50` → the data reversed (via 61xx); case 3 `80 E0` → 9000.
struct TestCard {
    atr: Vec<u8>,
}

const READ_DATA: [u8; 16] = *b"purselink-serial";

impl CardApplication for TestCard {
    fn atr(&self) -> Vec<u8> {
        self.atr.clone()
    }
    fn reset(&mut self) {}
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        let Ok(cmd) = Command::parse(apdu) else {
            return vec![0x67, 0x00];
        };
        match (cmd.cla, cmd.ins) {
            (0x00, 0xA4) => vec![0x90, 0x00],
            (0x00, 0xB0) => [&READ_DATA[..], &[0x90, 0x00]].concat(),
            (0x80, 0x50) => {
                let mut out: Vec<u8> = cmd.data.iter().rev().copied().collect();
                out.extend_from_slice(&[0x90, 0x00]);
                out
            }
            (0x80, 0xE0) if !cmd.data.is_empty() => vec![0x90, 0x00],
            _ => vec![0x6D, 0x00],
        }
    }
}

fn hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect()
}

/// T=0 only, no TA1 (a real-world ATR, 9600 baud throughout).
const ATR_T0: &str = "3B 6E 00 00 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00";
/// Viaccess, inverse convention, TA1 = 18 (Fi 372, Di 12: 115200 baud after PPS).
const ATR_INVERSE: &str = "3F 77 18 00 00 C2 EB 41 02 6C 90 00";
/// Direct, TA1 = 13 (Fi 372, Di 4: 38400 baud after PPS), two historical bytes.
const ATR_PPS: &str = "3B 12 13 50 4C";
/// TD1 = 40 → TC2 = 02: work waiting time 960 × 2 × 372 / 3.5712 MHz = 200 ms.
const ATR_WI2: &str = "3B 80 40 02";

const SELECT: [u8; 9] = [0x00, 0xA4, 0x04, 0x00, 0x04, 0xF0, 0x50, 0x55, 0x52];

fn setup(atr: &str) -> (PhoenixEmulator, SerialDriver) {
    let emu = PhoenixEmulator::start(
        Box::new(TestCard { atr: hex(atr) }),
        PhoenixConfig::default(),
    )
    .expect("emulator on a pty");
    let mut cfg = SerialConfig::new("phoenix0", emu.path());
    cfg.poll_interval = Duration::from_millis(50);
    let driver = SerialDriver::with_lines(cfg, emu.lines_factory());
    (emu, driver)
}

/// Every test is bounded: a hang is a failure, not a stuck CI job.
async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(20), f)
        .await
        .expect("test exceeded 20 s")
}

#[tokio::test]
async fn select_and_wrong_le_read_at_9600_8e2() {
    bounded(async {
        let (emu, driver) = setup(ATR_T0);
        let (mut session, atr) = driver.connect("phoenix0").await.unwrap();
        assert_eq!(atr, hex(ATR_T0));
        let line = emu.line_settings().unwrap();
        assert_eq!(
            (
                line.data_bits,
                line.parity_check,
                line.odd_parity,
                line.stop_bits,
                line.parmrk
            ),
            (8, true, false, 2, true),
            "driver must configure 8E2 with parity marking"
        );

        let resp = transmit_whole(session.as_mut(), &SELECT).await.unwrap();
        assert_eq!(resp, [0x90, 0x00]);

        // Le = 0 (256) is wrong: the card answers 6C10 and transmit_whole re-sends Le = 16.
        let raw = session
            .transmit_raw(&[0x00, 0xB0, 0, 0, 0x00])
            .await
            .unwrap();
        assert_eq!(raw, [0x6C, 0x10]);
        let resp = transmit_whole(session.as_mut(), &[0x00, 0xB0, 0, 0, 0x00])
            .await
            .unwrap();
        assert_eq!(resp[..16], READ_DATA);
        assert_eq!(resp[16..], [0x90, 0x00]);
        assert_eq!(emu.stats().wrong_le, 2);
        assert_eq!(emu.stats().pps1, None);
        session.power_down().await.unwrap();
    })
    .await
}

#[tokio::test]
async fn case4_response_comes_through_get_response() {
    bounded(async {
        let (emu, driver) = setup(ATR_T0);
        let (mut session, _) = driver.connect("phoenix0").await.unwrap();
        let apdu = [0x80, 0x50, 0, 0, 3, 1, 2, 3, 0x00];
        let raw = session.transmit_raw(&apdu).await.unwrap();
        assert_eq!(raw, [0x61, 0x03], "card holds the data back");
        let resp = transmit_whole(session.as_mut(), &apdu).await.unwrap();
        assert_eq!(resp, [3, 2, 1, 0x90, 0x00]);
        assert_eq!(emu.stats().get_responses, 1);
    })
    .await
}

#[tokio::test]
async fn byte_at_a_time_acks_and_null_bytes() {
    bounded(async {
        let (emu, driver) = setup(ATR_T0);
        emu.set_ack_byte_by_byte(true);
        emu.set_nulls(3);
        let (mut session, _) = driver.connect("phoenix0").await.unwrap();
        // Case 3 with every data byte acknowledged by INS ^ FF, each after three NULLs.
        let resp = session
            .transmit_raw(&[0x80, 0xE0, 0, 0, 4, 0xDE, 0xAD, 0xBE, 0xEF])
            .await
            .unwrap();
        assert_eq!(resp, [0x90, 0x00]);
        // Case 2, data byte by byte.
        let resp = session.transmit_raw(&[0x00, 0xB0, 0, 0, 16]).await.unwrap();
        assert_eq!(resp[..16], READ_DATA);
        let stats = emu.stats();
        assert!(
            stats.nulls_sent >= 3 * 20,
            "nulls sent: {}",
            stats.nulls_sent
        );
    })
    .await
}

#[tokio::test]
async fn pps_raises_the_speed_when_ta1_offers_it() {
    bounded(async {
        let (emu, driver) = setup(ATR_PPS);
        let (mut session, atr) = driver.connect("phoenix0").await.unwrap();
        assert_eq!(atr, hex(ATR_PPS));
        assert_eq!(emu.stats().pps1, Some(0x13));
        // The emulator now talks at 38400; exchanges keep working at the new speed.
        let resp = transmit_whole(session.as_mut(), &[0x00, 0xB0, 0, 0, 16])
            .await
            .unwrap();
        assert_eq!(resp[..16], READ_DATA);
    })
    .await
}

#[tokio::test]
async fn pps_disabled_stays_at_the_default_speed() {
    bounded(async {
        let emu = PhoenixEmulator::start(
            Box::new(TestCard { atr: hex(ATR_PPS) }),
            PhoenixConfig::default(),
        )
        .unwrap();
        let mut cfg = SerialConfig::new("phoenix0", emu.path());
        cfg.pps = reader_drivers::serial::PpsPolicy::Off;
        let driver = SerialDriver::with_lines(cfg, emu.lines_factory());
        let (mut session, _) = driver.connect("phoenix0").await.unwrap();
        assert_eq!(emu.stats().pps1, None);
        let resp = transmit_whole(session.as_mut(), &SELECT).await.unwrap();
        assert_eq!(resp, [0x90, 0x00]);
    })
    .await
}

#[tokio::test]
async fn inverse_convention_card_with_pps() {
    bounded(async {
        let (emu, driver) = setup(ATR_INVERSE);
        let (mut session, atr) = driver.connect("phoenix0").await.unwrap();
        assert_eq!(atr, hex(ATR_INVERSE), "ATR reported as values, TS = 3F");
        assert!(
            emu.line_settings().unwrap().odd_parity,
            "inverse convention needs odd parity on a direct UART"
        );
        assert_eq!(emu.stats().pps1, Some(0x18));
        let resp = transmit_whole(session.as_mut(), &SELECT).await.unwrap();
        assert_eq!(resp, [0x90, 0x00]);
        let resp = transmit_whole(session.as_mut(), &[0x80, 0x50, 0, 0, 2, 0xFF, 0x00])
            .await
            .unwrap();
        assert_eq!(resp, [0x00, 0xFF, 0x90, 0x00]);
    })
    .await
}

#[tokio::test]
async fn mute_card_is_reported_as_mute() {
    bounded(async {
        let (emu, driver) = setup(ATR_T0);
        emu.set_fault(Fault::Mute);
        let err = driver.connect("phoenix0").await.err().expect("mute card");
        assert_eq!(
            err,
            ReaderError::Mute {
                reader: "phoenix0".into()
            }
        );
        // The port is released: after the card recovers, connecting works.
        emu.set_fault(Fault::None);
        assert!(driver.connect("phoenix0").await.is_ok());
    })
    .await
}

#[tokio::test]
async fn silent_card_times_out_after_the_atr_waiting_time() {
    bounded(async {
        let (emu, driver) = setup(ATR_WI2);
        emu.set_fault(Fault::SilentOnIns(0xB0));
        let (mut session, _) = driver.connect("phoenix0").await.unwrap();
        let err = session
            .transmit_raw(&[0x00, 0xB0, 0, 0, 16])
            .await
            .unwrap_err();
        // WWT from TC2 = 2 is 200 ms, plus the 100 ms OS margin.
        assert_eq!(
            err,
            ReaderError::Timeout {
                reader: "phoenix0".into(),
                millis: 300
            }
        );
        // A reset brings the card back.
        emu.set_fault(Fault::None);
        session.reset().await.unwrap();
        assert_eq!(
            transmit_whole(session.as_mut(), &SELECT).await.unwrap(),
            [0x90, 0x00]
        );
    })
    .await
}

#[tokio::test]
async fn no_card_and_card_removed() {
    bounded(async {
        let (emu, driver) = setup(ATR_T0);
        emu.set_card_present(false);
        let err = driver.connect("phoenix0").await.err().unwrap();
        assert_eq!(
            err,
            ReaderError::NoCard {
                reader: "phoenix0".into()
            }
        );
        emu.set_card_present(true);
        let (mut session, _) = driver.connect("phoenix0").await.unwrap();
        emu.set_card_present(false);
        let err = session.transmit_raw(&SELECT).await.unwrap_err();
        assert_eq!(
            err,
            ReaderError::CardRemoved {
                reader: "phoenix0".into()
            }
        );
        // A second session while one is open is refused, not queued forever.
        emu.set_card_present(true);
        let busy = driver.connect("phoenix0").await.err().unwrap();
        assert_eq!(
            busy,
            ReaderError::InUse {
                reader: "phoenix0".into()
            }
        );
    })
    .await
}

#[tokio::test]
async fn list_and_events_follow_the_card_switch() {
    bounded(async {
        let (emu, driver) = setup(ATR_T0);
        let readers = driver.list().await.unwrap();
        assert_eq!(readers.len(), 1);
        assert_eq!(readers[0].name, "phoenix0");
        assert!(matches!(readers[0].card, CardPresence::Present { .. }));

        let mut events = driver.events();
        assert_eq!(
            events.recv().await,
            Some(ReaderEvent::ReaderAttached {
                reader: "phoenix0".into()
            })
        );
        assert_eq!(
            events.recv().await,
            Some(ReaderEvent::CardInserted {
                reader: "phoenix0".into(),
                atr: hex(ATR_T0)
            })
        );
        emu.set_card_present(false);
        assert_eq!(
            events.recv().await,
            Some(ReaderEvent::CardRemoved {
                reader: "phoenix0".into()
            })
        );
        assert_eq!(driver.list().await.unwrap()[0].card, CardPresence::Absent);
    })
    .await
}

#[tokio::test]
async fn unknown_reader_is_named() {
    let (_emu, driver) = setup(ATR_T0);
    let err = driver.connect("nope").await.err().unwrap();
    assert_eq!(
        err,
        ReaderError::UnknownReader {
            reader: "nope".into()
        }
    );
}
