//! The PC/SC driver against a REAL pcscd with a card attached through vsmartcard's vpcd
//! (reader "Virtual PCD 00 00", port 35963), and opensc-tool reaching the same card.
//!
//! Needs pcscd running with vsmartcard-vpcd (scripts/system-setup.sh, scripts/start-pcscd.sh);
//! fails with that advice if it is not, unless PURSELINK_SKIP_PCSC=1. Every test takes the
//! cross-process vpcd port lock, so they run one at a time (and never alongside another
//! process's test on the same reader).

mod pcsc_common;

use std::process::Command;
use std::time::{Duration, Instant};

use pcsc_common::*;
use reader_drivers::emulator::vpcd::{self, VpcdPortLock};
use reader_drivers::pcsc::PcscDriver;
use reader_drivers::{CardPresence, ReaderDriver, ReaderError, ReaderEvent, transmit_whole};

const PORT: u16 = vpcd::DEFAULT_PORT;
const READER: &str = "Virtual PCD 00 00";
/// pcscd polls vpcd every 400 ms; give it room on a loaded machine.
const EVENT_WAIT: Duration = Duration::from_secs(10);

fn lock_reader() -> VpcdPortLock {
    VpcdPortLock::acquire(PORT).expect("vpcd port lock")
}

fn fake_card() -> vpcd::SharedCard {
    vpcd::shared(Box::new(FakePurseCard::new()))
}

fn is_inserted(ev: &ReaderEvent) -> bool {
    matches!(ev, ReaderEvent::CardInserted { reader, .. } if reader == READER)
}
fn is_removed(ev: &ReaderEvent) -> bool {
    matches!(ev, ReaderEvent::CardRemoved { reader } if reader == READER)
}

/// Waits until pcscd reports the reader empty, so a test starts from a known state (a card
/// left by a test that failed in another process goes away with that process).
async fn wait_reader_empty(driver: &PcscDriver) {
    let deadline = Instant::now() + EVENT_WAIT;
    loop {
        let readers = driver.list().await.expect("list readers");
        let r = readers.iter().find(|r| r.name == READER).unwrap_or_else(|| {
            panic!("reader {READER:?} not listed by pcscd (is vsmartcard-vpcd installed?); readers: {readers:?}")
        });
        if r.card == CardPresence::Absent {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "reader {READER} still holds a card: {:?}",
            r.card
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pcsc_driver_sees_reader_card_events_and_reads_the_purse() {
    if !require_pcscd("pcsc_driver_sees_reader_card_events_and_reads_the_purse") {
        return;
    }
    let _lock = lock_reader();
    let driver = PcscDriver::new();
    wait_reader_empty(&driver).await;

    let mut events = driver.events();
    // The stream starts with the current state: the reader is there.
    wait_for(
        &mut events,
        "ReaderAttached",
        EVENT_WAIT,
        |e| matches!(e, ReaderEvent::ReaderAttached { reader } if reader == READER),
    )
    .await;

    let card = fake_card();
    let att = vpcd::attach(card.clone(), "127.0.0.1", PORT)
        .await
        .expect("attach to vpcd");
    let ev = wait_for(&mut events, "CardInserted", EVENT_WAIT, is_inserted).await;
    assert_eq!(
        ev,
        ReaderEvent::CardInserted {
            reader: READER.into(),
            atr: FAKE_ATR.to_vec()
        }
    );

    let listed = driver.list().await.unwrap();
    let r = listed.iter().find(|r| r.name == READER).unwrap();
    assert_eq!(
        r.card,
        CardPresence::Present {
            atr: FAKE_ATR.to_vec()
        }
    );

    let (mut session, atr) = driver.connect(READER).await.expect("connect");
    assert_eq!(atr, FAKE_ATR);
    assert_eq!(session.reader(), READER);
    let sel = transmit_whole(session.as_mut(), &SELECT_PURSE)
        .await
        .unwrap();
    assert_eq!(sel, [0x90, 0x00], "SELECT purse");
    let purse = transmit_whole(session.as_mut(), &READ_PURSE).await.unwrap();
    let mut want = FAKE_PURSE.to_vec();
    want.extend_from_slice(&[0x90, 0x00]);
    assert_eq!(purse, want, "READ PURSE");
    // 61xx resolved by GET RESPONSE over the real stack.
    let data = transmit_whole(session.as_mut(), &GET_DATA_CHAINED)
        .await
        .unwrap();
    assert_eq!(&data[..8], &FAKE_DATA);
    assert_eq!(&data[8..], &[0x90, 0x00]);
    // A short command is refused before it reaches the reader.
    assert!(matches!(
        session.transmit_raw(&[0x00, 0xA4]).await,
        Err(ReaderError::Protocol { .. })
    ));
    // Reset gives the ATR again, and the card's volatile state is gone.
    assert_eq!(session.reset().await.unwrap(), FAKE_ATR);
    assert_eq!(
        transmit_whole(session.as_mut(), &READ_PURSE).await.unwrap(),
        [0x69, 0x85]
    );
    session.power_down().await.unwrap();

    // Detach: pcscd sees the card removed.
    att.detach().await;
    wait_for(&mut events, "CardRemoved", EVENT_WAIT, is_removed).await;
    match driver.connect(READER).await {
        Err(ReaderError::NoCard { reader }) => assert_eq!(reader, READER),
        other => panic!("connect to an empty reader: {:?}", other.map(|(_, a)| a)),
    }

    // And back in again.
    let att = vpcd::attach(card, "127.0.0.1", PORT)
        .await
        .expect("re-attach");
    wait_for(&mut events, "CardInserted again", EVENT_WAIT, is_inserted).await;
    let (mut session, _) = driver
        .connect(READER)
        .await
        .expect("connect after re-insert");
    assert_eq!(
        transmit_whole(session.as_mut(), &SELECT_PURSE)
            .await
            .unwrap(),
        [0x90, 0x00]
    );
    session.power_down().await.unwrap();
    att.detach().await;
    wait_for(
        &mut events,
        "CardRemoved at the end",
        EVENT_WAIT,
        is_removed,
    )
    .await;

    // Shutdown cancels the blocked SCardGetStatusChange at once (not at the next 1 s poll).
    let t = Instant::now();
    driver.shutdown();
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        while events.recv().await.is_some() {}
    })
    .await;
    assert!(end.is_ok(), "event stream did not end after shutdown");
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "shutdown took {:?}",
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn card_pulled_mid_apdu_is_card_removed_not_a_hang() {
    if !require_pcscd("card_pulled_mid_apdu_is_card_removed_not_a_hang") {
        return;
    }
    let _lock = lock_reader();
    let driver = PcscDriver::new().with_transmit_timeout(Duration::from_secs(20));
    wait_reader_empty(&driver).await;
    let mut events = driver.events();

    let att = vpcd::attach(fake_card(), "127.0.0.1", PORT)
        .await
        .expect("attach");
    wait_for(&mut events, "CardInserted", EVENT_WAIT, is_inserted).await;
    let (mut session, _) = driver.connect(READER).await.expect("connect");

    let t = Instant::now();
    let exchange = tokio::spawn(async move {
        let r = session.transmit_raw(&SLOW_COMMAND).await;
        (session, r)
    });
    // Pull the card while the card is still working on the command.
    tokio::time::sleep(Duration::from_millis(500)).await;
    att.detach().await;
    let (_session, result) = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .expect("transmit hung after the card was pulled")
        .unwrap();
    assert_eq!(
        result,
        Err(ReaderError::CardRemoved {
            reader: READER.into()
        }),
        "after {:?}",
        t.elapsed()
    );
    assert_eq!(
        result.unwrap_err().to_string(),
        "reader Virtual PCD 00 00: card was removed during the command — reinsert it"
    );
    wait_for(&mut events, "CardRemoved", EVENT_WAIT, is_removed).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_watcher_thread_ends_when_the_receiver_is_dropped() {
    if !require_pcscd("event_watcher_thread_ends_when_the_receiver_is_dropped") {
        return;
    }
    let _lock = lock_reader();
    let driver = PcscDriver::new();
    let mut events = driver.events();
    wait_for(&mut events, "ReaderAttached", EVENT_WAIT, |e| {
        matches!(e, ReaderEvent::ReaderAttached { .. })
    })
    .await;
    assert!(threads_named("pcsc-events") >= 1, "no pcsc-events thread");
    drop(events);
    let deadline = Instant::now() + Duration::from_secs(3);
    // Other tests' watchers are gone too: they hold the reader lock while they run.
    while threads_named("pcsc-events") > 0 {
        assert!(
            Instant::now() < deadline,
            "watcher thread still running after the receiver was dropped"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Threads of this process with the given name (Linux /proc).
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

/// A standard tool nobody here wrote reaches the real purse (the `vcard` binary's file-backed
/// card) through pcscd:
/// `opensc-tool -r 'Virtual PCD 00 00' -s 00:A4:04:00:0A:A0:00:00:09:99:50:55:52:53:45`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opensc_tool_selects_the_purse() {
    if !require_pcscd("opensc_tool_selects_the_purse") {
        return;
    }
    let _lock = lock_reader();
    let driver = PcscDriver::new();
    wait_reader_empty(&driver).await;
    let mut events = driver.events();
    let dir = tempfile::tempdir().unwrap();
    let card = create_card(dir.path(), 4711, 2500);
    let vcard = VcardProcess::attach(&card);
    wait_for(&mut events, "CardInserted", EVENT_WAIT, is_inserted).await;

    let out = tokio::task::spawn_blocking(|| {
        Command::new("opensc-tool")
            .args(["-r", READER, "-s", SELECT_PURSE_HEX])
            .output()
    })
    .await
    .unwrap()
    .expect("run opensc-tool (install opensc: scripts/system-setup.sh)");
    vcard.stop();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "opensc-tool failed: {}\n{stdout}\n{stderr}",
        out.status
    );
    assert!(
        stdout.contains("SW1=0x90, SW2=0x00"),
        "opensc-tool did not get 90 00:\n{stdout}\n{stderr}"
    );
}

/// The `vcard` binary with a file-backed purse card, attached through vpcd: the driver
/// reads the purse, sees the card go when `vcard` exits and come back when it restarts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vcard_binary_attached_through_vpcd_is_read_removed_and_reinserted() {
    if !require_pcscd("vcard_binary_attached_through_vpcd_is_read_removed_and_reinserted") {
        return;
    }
    let _lock = lock_reader();
    let driver = PcscDriver::new();
    wait_reader_empty(&driver).await;
    let mut events = driver.events();
    let dir = tempfile::tempdir().unwrap();
    let card = create_card(dir.path(), 123_456, 2500);

    let vcard = VcardProcess::attach(&card);
    let ev = wait_for(&mut events, "CardInserted", EVENT_WAIT, is_inserted).await;
    let ReaderEvent::CardInserted { atr, .. } = ev else {
        unreachable!()
    };
    assert_eq!(atr, proto::card::CARD_ATR);

    let (mut session, _) = driver.connect(READER).await.expect("connect");
    let sel = transmit_whole(session.as_mut(), &proto::card::commands::select())
        .await
        .unwrap();
    assert_eq!(
        &sel[sel.len() - 2..],
        &[0x90, 0x00],
        "SELECT: {}",
        hex::encode(&sel)
    );
    let resp = transmit_whole(session.as_mut(), &proto::card::commands::read_purse())
        .await
        .unwrap();
    let (body, sw) = resp.split_at(resp.len() - 2);
    assert_eq!(sw, [0x90, 0x00], "READ PURSE: {}", hex::encode(&resp));
    let info = proto::purse::PurseInfo::decode(body).expect("purse info");
    assert_eq!((info.card_id, info.balance), (123_456, 2500));
    assert_eq!(info.currency, proto::money::Currency::EUR);
    session.power_down().await.unwrap();

    vcard.stop();
    wait_for(
        &mut events,
        "CardRemoved after vcard exits",
        EVENT_WAIT,
        is_removed,
    )
    .await;

    let vcard = VcardProcess::attach(&card);
    wait_for(
        &mut events,
        "CardInserted after vcard restarts",
        EVENT_WAIT,
        is_inserted,
    )
    .await;
    let (mut session, _) = driver.connect(READER).await.expect("connect again");
    let sel = transmit_whole(session.as_mut(), &proto::card::commands::select())
        .await
        .unwrap();
    assert_eq!(&sel[sel.len() - 2..], &[0x90, 0x00]);
    session.power_down().await.unwrap();
    vcard.stop();
    wait_for(
        &mut events,
        "CardRemoved at the end",
        EVENT_WAIT,
        is_removed,
    )
    .await;
}

/// Through a real pcscd, as another PC/SC program would: a 1-byte command APDU gets 6700
/// from the virtual card (it used to be taken for a vpcd control byte and wedge the reader
/// for every program), and a READ PURSE with a short Le gets 6Cxx with the exact length.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_apdus_and_wrong_le_get_iso_answers_through_pcscd() {
    if !require_pcscd("short_apdus_and_wrong_le_get_iso_answers_through_pcscd") {
        return;
    }
    let _lock = lock_reader();
    let driver = PcscDriver::new();
    wait_reader_empty(&driver).await;
    let mut events = driver.events();
    let dir = tempfile::tempdir().unwrap();
    let card = create_card(dir.path(), 4_242, 1_000);
    let vcard = VcardProcess::attach(&card);
    wait_for(&mut events, "CardInserted", EVENT_WAIT, is_inserted).await;
    // Another program's raw SCardTransmit (our own driver refuses such APDUs before they
    // leave the host).
    let raw = std::thread::spawn(|| {
        let ctx = pcsc::Context::establish(pcsc::Scope::User).unwrap();
        let name = std::ffi::CString::new(READER).unwrap();
        let card = ctx
            .connect(&name, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
            .unwrap();
        let mut buf = [0u8; 300];
        let mut answers = Vec::new();
        for apdu in [&[0x09u8][..], &[0x80, 0xB0], &[0x80, 0xB0, 0x00, 0x00]] {
            answers.push(card.transmit(apdu, &mut buf).unwrap().to_vec());
        }
        let mut short = proto::card::commands::select();
        answers.push(card.transmit(&short, &mut buf).unwrap().to_vec());
        short = proto::card::commands::read_purse();
        *short.last_mut().unwrap() = 5; // Le = 5
        answers.push(card.transmit(&short, &mut buf).unwrap().to_vec());
        answers
    });
    let answers = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if raw.is_finished() {
                return raw.join().unwrap();
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("no answer within 20 s: the reader is wedged");
    for a in &answers[..3] {
        assert_eq!(a, &[0x67, 0x00]);
    }
    assert_eq!(
        &answers[3][answers[3].len() - 2..],
        &[0x90, 0x00],
        "the reader still works"
    );
    let (mut session, _) = driver.connect(READER).await.expect("connect");
    transmit_whole(session.as_mut(), &proto::card::commands::select())
        .await
        .unwrap();
    let full = transmit_whole(session.as_mut(), &proto::card::commands::read_purse())
        .await
        .unwrap();
    assert_eq!(
        answers[4],
        [0x6C, (full.len() - 2) as u8],
        "wrong Le: 6C with the exact length"
    );
    session.power_down().await.unwrap();
    vcard.stop();
    wait_for(&mut events, "CardRemoved", EVENT_WAIT, is_removed).await;
}

const ISSUER_KEYS_TOML: &str = "key_version = 1\n\
    purchase_master = \"0123456789ABCDEFFEDCBA9876543210\"\n\
    load_master = \"00112233445566778899AABBCCDDEEFF\"\n";

/// Creates a card file with `vcard create`.
fn create_card(dir: &std::path::Path, card_id: u64, balance: u64) -> std::path::PathBuf {
    let keys = dir.join("issuer.toml");
    std::fs::write(&keys, ISSUER_KEYS_TOML).unwrap();
    let card = dir.join("card.vcard");
    let out = Command::new(env!("CARGO_BIN_EXE_vcard"))
        .args(["create", "--card"])
        .arg(&card)
        .args([
            "--card-id",
            &card_id.to_string(),
            "--balance",
            &balance.to_string(),
        ])
        .args(["--currency", "EUR", "--expiry", "2035-12", "--issuer-keys"])
        .arg(&keys)
        .output()
        .expect("run vcard create");
    assert!(
        out.status.success(),
        "vcard create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    card
}

/// A running `vcard attach-vpcd`; killed (card removed) on stop or drop.
struct VcardProcess(Option<std::process::Child>);

impl VcardProcess {
    fn attach(card: &std::path::Path) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_vcard"))
            .args([
                "attach-vpcd",
                "--no-retry",
                "--port",
                &PORT.to_string(),
                "--card",
            ])
            .arg(card)
            .env("VCARD_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start vcard attach-vpcd");
        Self(Some(child))
    }

    /// Ends the process with SIGTERM (it detaches cleanly) and reaps it.
    fn stop(mut self) {
        if let Some(mut child) = self.0.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
            let status = child.wait().expect("wait for vcard");
            assert!(status.success(), "vcard exited with {status}");
        }
    }
}

impl Drop for VcardProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
