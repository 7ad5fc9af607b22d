//! Shared helpers for the PC/SC integration tests: a fake purse card (until the file-backed
//! `VirtualCard` is used), the pcscd precondition check, and event waiting.

#![allow(dead_code)] // each test binary uses a different subset

use std::time::Duration;

use proto::apdu::CardApplication;
use reader_drivers::ReaderEvent;
use tokio::sync::mpsc;

/// The purse application identifier.
pub const PURSE_AID: [u8; 10] = [0xA0, 0x00, 0x00, 0x09, 0x99, 0x50, 0x55, 0x52, 0x53, 0x45];
/// SELECT by AID, case 3.
pub const SELECT_PURSE: [u8; 15] = [
    0x00, 0xA4, 0x04, 0x00, 0x0A, 0xA0, 0x00, 0x00, 0x09, 0x99, 0x50, 0x55, 0x52, 0x53, 0x45,
];
/// The same SELECT, as opensc-tool takes it.
pub const SELECT_PURSE_HEX: &str = "00:A4:04:00:0A:A0:00:00:09:99:50:55:52:53:45";
pub const READ_PURSE: [u8; 5] = [0x80, 0xB0, 0x00, 0x00, 0x00];
/// Answered with 61 08 first, so the caller must follow with GET RESPONSE.
pub const GET_DATA_CHAINED: [u8; 5] = [0x80, 0xCA, 0x00, 0x00, 0x00];
/// Takes [`FakePurseCard::slow`] to answer, so a test can pull the card meanwhile.
pub const SLOW_COMMAND: [u8; 5] = [0x80, 0xFE, 0x00, 0x00, 0x00];

pub const FAKE_ATR: [u8; 5] = [0x3B, 0x80, 0x80, 0x01, 0x01];
pub const FAKE_PURSE: [u8; 8] = [0x09, 0x78, 0x00, 0x00, 0x27, 0x10, 0x02, 0x00];
pub const FAKE_DATA: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

/// A FAKE purse card for the reader tests: answers SELECT of the purse AID, a READ PURSE,
/// a chained GET DATA (61xx + GET RESPONSE) and a deliberately slow command. The real purse
/// is `reader_drivers::vcard::VirtualCard`; these tests are about the reader stack.
pub struct FakePurseCard {
    pub slow: Duration,
    selected: bool,
    pending: Option<Vec<u8>>,
}

impl FakePurseCard {
    pub fn new() -> Self {
        Self {
            slow: Duration::from_secs(3),
            selected: false,
            pending: None,
        }
    }
}

impl CardApplication for FakePurseCard {
    fn atr(&self) -> Vec<u8> {
        FAKE_ATR.to_vec()
    }
    fn reset(&mut self) {
        self.selected = false;
        self.pending = None;
    }
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        let pending = self.pending.take();
        match apdu {
            [0x00, 0xA4, 0x04, 0x00, 0x0A, aid @ ..] if aid.starts_with(&PURSE_AID) => {
                self.selected = true;
                vec![0x90, 0x00]
            }
            [0x00, 0xA4, ..] => vec![0x6A, 0x82],
            [0x80, 0xB0, 0x00, 0x00, ..] if self.selected => {
                let mut r = FAKE_PURSE.to_vec();
                r.extend_from_slice(&[0x90, 0x00]);
                r
            }
            [0x80, 0xCA, 0x00, 0x00, ..] => {
                self.pending = Some(FAKE_DATA.to_vec());
                vec![0x61, FAKE_DATA.len() as u8]
            }
            [_, 0xC0, 0x00, 0x00, ..] => match pending {
                Some(mut d) => {
                    d.extend_from_slice(&[0x90, 0x00]);
                    d
                }
                None => vec![0x69, 0x85],
            },
            [0x80, 0xFE, ..] => {
                std::thread::sleep(self.slow);
                vec![0x90, 0x00]
            }
            [0x80, 0xB0, ..] => vec![0x69, 0x85],
            _ => vec![0x6D, 0x00],
        }
    }
}

/// pcscd must be running unless `PURSELINK_SKIP_PCSC=1`; then the caller skips (returns
/// false). Panics with what to do otherwise, so a CI without pcscd fails loudly.
pub fn require_pcscd(test: &str) -> bool {
    if std::env::var("PURSELINK_SKIP_PCSC").as_deref() == Ok("1") {
        eprintln!("{test}: SKIPPED because PURSELINK_SKIP_PCSC=1");
        return false;
    }
    if let Err(e) = pcsc::Context::establish(pcsc::Scope::User) {
        panic!(
            "{test}: pcscd is not running ({e}). Start it with scripts/start-pcscd.sh \
             (as root; install packages with scripts/system-setup.sh), or set \
             PURSELINK_SKIP_PCSC=1 to skip the PC/SC tests."
        );
    }
    if !reader_drivers::emulator::vpcd::listed_by_pcscd(
        reader_drivers::emulator::vpcd::DEFAULT_PORT,
    )
    .unwrap_or(false)
    {
        panic!(
            "{test}: pcscd runs but does not list vpcd's reader for port 35963 — install \
             vsmartcard-vpcd (scripts/system-setup.sh) and restart pcscd"
        );
    }
    true
}

/// Waits for an event matching `pred`, failing with the events seen so far.
pub async fn wait_for(
    rx: &mut mpsc::Receiver<ReaderEvent>,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&ReaderEvent) -> bool,
) -> ReaderEvent {
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(ev)) if pred(&ev) => return ev,
            Ok(Some(ev)) => seen.push(ev),
            Ok(None) => panic!("event stream ended while waiting for {what}; saw {seen:?}"),
            Err(_) => panic!("no {what} within {timeout:?}; saw {seen:?}"),
        }
    }
}
