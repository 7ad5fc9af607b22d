//! The PC/SC driver sharing a card with another program on the same REAL pcscd (issue 13,
//! item 6), with a card on vpcd ("Virtual PCD 00 00").
//!
//! "The other program" is a second PC/SC client played by the test with the `pcsc` crate
//! directly (its own context, its own connection), as OSCam or OpenSC would be. The
//! daemon-level tests (a purchase through stbd's code) are in `stb/tests/pcsc_shared.rs`.

mod pcsc_common;

use std::ffi::CString;
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use pcsc_common::*;
use reader_drivers::emulator::vpcd::{self, VpcdPortLock};
use reader_drivers::pcsc::PcscDriver;
use reader_drivers::{CardPresence, ReaderDriver, ReaderError, ReaderEvent, transmit_whole};

const PORT: u16 = vpcd::DEFAULT_PORT;
const READER: &str = "Virtual PCD 00 00";
/// A SELECT of another application (a payment applet): the fake purse answers 6A82.
const SELECT_OTHER_APP: [u8; 12] = [
    0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10,
];

/// The other program's connection.
fn other_connect() -> pcsc::Card {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("other: context");
    ctx.connect(
        &CString::new(READER).unwrap(),
        pcsc::ShareMode::Shared,
        pcsc::Protocols::ANY,
    )
    .expect("other: connect")
}

fn other_transmit(card: &pcsc::Card, apdu: &[u8]) -> Result<Vec<u8>, pcsc::Error> {
    let mut buf = [0u8; 300];
    card.transmit(apdu, &mut buf).map(|r| r.to_vec())
}

/// Waits until pcscd reports the reader empty (a card of an earlier test may still show).
async fn wait_reader_empty(driver: &PcscDriver) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let readers = driver.list().await.expect("list readers");
        if readers
            .iter()
            .any(|r| r.name == READER && r.card == CardPresence::Absent)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reader {READER} never empty: {readers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Takes the reader, attaches `card` and waits until pcscd sees it.
async fn attach(
    card: Box<dyn proto::apdu::CardApplication>,
) -> (VpcdPortLock, PcscDriver, vpcd::VpcdAttachment) {
    let lock = VpcdPortLock::acquire(PORT).expect("vpcd port lock");
    let driver = PcscDriver::new();
    wait_reader_empty(&driver).await;
    let mut events = driver.events();
    let att = vpcd::attach(vpcd::shared(card), "127.0.0.1", PORT)
        .await
        .expect("attach");
    wait_for(
        &mut events,
        "CardInserted",
        Duration::from_secs(10),
        |e| matches!(e, ReaderEvent::CardInserted { reader, .. } if reader == READER),
    )
    .await;
    (lock, driver, att)
}

async fn setup() -> (VpcdPortLock, PcscDriver, vpcd::VpcdAttachment) {
    attach(Box::new(FakePurseCard::new())).await
}

/// Between our SELECT and READ PURSE, inside our transaction, the other program's SELECT of
/// its own application waits until the transaction ends; and ending our session leaves the
/// card as it is for the other program (no reset under it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn our_transaction_holds_another_program_off_and_our_session_ends_leaving_the_card() {
    if !require_pcscd("our_transaction_holds_another_program_off") {
        return;
    }
    let (_lock, driver, att) = setup().await;
    let (mut s, _) = driver.connect(READER).await.expect("connect");
    // The other program is connected too (as OSCam would be all along).
    let (go_tx, go_rx) = std_mpsc::channel::<()>();
    let (done_tx, done_rx) = std_mpsc::channel();
    let other = std::thread::spawn(move || {
        let card = other_connect();
        go_rx.recv().unwrap();
        let sent = Instant::now();
        let r = other_transmit(&card, &SELECT_OTHER_APP);
        done_tx.send(()).unwrap();
        (card, sent, Instant::now(), r)
    });
    tokio::time::sleep(Duration::from_millis(300)).await;

    assert!(!s.begin_transaction().await.expect("begin"));
    let began = Instant::now();
    let r = transmit_whole(s.as_mut(), &SELECT_PURSE).await.unwrap();
    assert!(r.ends_with(&[0x90, 0x00]), "{r:02X?}");
    // The other program sends its SELECT now, between our SELECT and READ PURSE.
    go_tx.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(
        done_rx.try_recv().is_err(),
        "the other program's SELECT went through inside our transaction"
    );
    let r = transmit_whole(s.as_mut(), &READ_PURSE).await.unwrap();
    assert_eq!(r[..8], FAKE_PURSE, "READ PURSE after our SELECT: {r:02X?}");
    let ended = Instant::now();
    s.end_transaction().await.expect("end");
    let (card, sent, answered, r) = other.join().unwrap();
    assert_eq!(r, Ok(vec![0x6A, 0x82]));
    eprintln!(
        "our transaction began at {:?}, ended at {:?}; the other program's SELECT sent at {:?}, answered at {:?} \
         (waited {:?})",
        Duration::ZERO,
        ended - began,
        sent - began,
        answered - began,
        answered - sent
    );
    assert!(
        answered >= ended,
        "the other program was answered before our transaction ended"
    );

    // Our session ends: the other program's connection sees no reset.
    s.power_down().await.expect("power down");
    drop(s);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        other_transmit(&card, &SELECT_OTHER_APP),
        Ok(vec![0x6A, 0x82]),
        "our session's end reset the card under the other program"
    );
    let _ = card.disconnect(pcsc::Disposition::LeaveCard);
    att.detach().await;
}

/// The other program resets the card between our SELECT and READ PURSE (no transaction of
/// ours open): READ PURSE is not re-sent blindly (which the card would refuse, 6985); we hear
/// "card was reset", and the next sequence starts over with SELECT. A reset between two
/// sequences shows at the start of the next one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_another_program_is_reported_and_the_sequence_starts_over() {
    if !require_pcscd("a_reset_by_another_program_is_reported") {
        return;
    }
    let (_lock, driver, att) = setup().await;
    let (mut s, _) = driver.connect(READER).await.expect("connect");
    let other = other_connect();

    let r = transmit_whole(s.as_mut(), &SELECT_PURSE).await.unwrap();
    assert!(r.ends_with(&[0x90, 0x00]));
    let mut other = other;
    other
        .reconnect(
            pcsc::ShareMode::Shared,
            pcsc::Protocols::ANY,
            pcsc::Disposition::ResetCard,
        )
        .expect("other: reset");
    assert_eq!(
        transmit_whole(s.as_mut(), &READ_PURSE).await,
        Err(ReaderError::CardReset {
            reader: READER.into()
        }),
        "a command after another program's reset must not be re-sent blindly"
    );
    // Starting over works.
    assert!(!s.begin_transaction().await.unwrap());
    assert!(
        transmit_whole(s.as_mut(), &SELECT_PURSE)
            .await
            .unwrap()
            .ends_with(&[0x90, 0x00])
    );
    assert_eq!(
        transmit_whole(s.as_mut(), &READ_PURSE).await.unwrap()[..8],
        FAKE_PURSE
    );
    s.end_transaction().await.unwrap();

    // A reset between two sequences: the next begin says so.
    other
        .reconnect(
            pcsc::ShareMode::Shared,
            pcsc::Protocols::ANY,
            pcsc::Disposition::ResetCard,
        )
        .expect("other: reset");
    assert!(
        s.begin_transaction().await.unwrap(),
        "begin after another program's reset must report it"
    );
    assert!(
        transmit_whole(s.as_mut(), &SELECT_PURSE)
            .await
            .unwrap()
            .ends_with(&[0x90, 0x00])
    );
    assert_eq!(
        transmit_whole(s.as_mut(), &READ_PURSE).await.unwrap()[..8],
        FAKE_PURSE
    );
    s.end_transaction().await.unwrap();
    drop(s);
    let _ = other.disconnect(pcsc::Disposition::LeaveCard);
    att.detach().await;
}

/// 61xx → GET RESPONSE is one transaction: the other program's SELECT, sent while the card
/// works on the first half, comes after GET RESPONSE, which therefore still finds its data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_response_follows_61xx_with_nothing_in_between() {
    if !require_pcscd("get_response_follows_61xx_with_nothing_in_between") {
        return;
    }
    let (go_tx, go_rx) = std_mpsc::channel::<()>();
    let (_lock, driver, att) = attach(Box::new(Hooked {
        inner: FakePurseCard::new(),
        on_get_data: Some(go_tx),
    }))
    .await;
    let (mut s, _) = driver.connect(READER).await.expect("connect");
    let other = std::thread::spawn(move || {
        let card = other_connect();
        go_rx.recv().unwrap();
        let r = other_transmit(&card, &SELECT_OTHER_APP);
        let _ = card.disconnect(pcsc::Disposition::LeaveCard);
        r
    });
    let r = transmit_whole(s.as_mut(), &GET_DATA_CHAINED).await.unwrap();
    assert_eq!(r[..8], FAKE_DATA, "GET RESPONSE lost its data: {r:02X?}");
    assert_eq!(other.join().unwrap(), Ok(vec![0x6A, 0x82]));
    drop(s);
    att.detach().await;
}

/// The fake purse that, on GET DATA, lets the other program go and gives it time to queue
/// its command before answering 61xx.
struct Hooked {
    inner: FakePurseCard,
    on_get_data: Option<std_mpsc::Sender<()>>,
}

impl proto::apdu::CardApplication for Hooked {
    fn atr(&self) -> Vec<u8> {
        self.inner.atr()
    }
    fn reset(&mut self) {
        self.inner.reset()
    }
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        if apdu.starts_with(&GET_DATA_CHAINED[..4]) {
            if let Some(go) = self.on_get_data.take() {
                let _ = go.send(());
                std::thread::sleep(Duration::from_millis(400));
            }
        }
        self.inner.process_apdu(apdu)
    }
}
