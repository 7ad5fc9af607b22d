//! Connects that time out do not leak threads (issue 13, item 6), against a REAL pcscd with a
//! card on vpcd ("Virtual PCD 00 00").
//!
//! "The other program" is a second PC/SC client played by this test with the `pcsc` crate
//! directly: it connects to the card and holds a transaction. pcscd then makes every
//! `SCardConnect` on that reader wait until the transaction ends, so our connects hang. Each
//! attempt is given up after 300 ms, as the daemon's card timeout does. The test counts this
//! process's threads (Linux /proc/self/task) before and after several such attempts.
//!
//! Its own test binary with one test, so no other test's threads are counted.

mod pcsc_common;

use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use pcsc_common::*;
use reader_drivers::emulator::vpcd::{self, VpcdPortLock};
use reader_drivers::pcsc::PcscDriver;
use reader_drivers::{ReaderDriver, ReaderEvent, transmit_whole};

const PORT: u16 = vpcd::DEFAULT_PORT;
const READER: &str = "Virtual PCD 00 00";
const ATTEMPTS: usize = 6;
const GIVE_UP: Duration = Duration::from_millis(300);

fn threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task")
        .count()
}

/// The other program: connects, begins a transaction and holds it until told to stop (or
/// until `max`), then ends it and disconnects leaving the card.
fn hold_transaction(held: std_mpsc::Sender<()>, stop: std_mpsc::Receiver<()>, max: Duration) {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("other: context");
    let name = std::ffi::CString::new(READER).unwrap();
    let mut card = ctx
        .connect(&name, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
        .expect("other: connect");
    {
        let tx = card.transaction().expect("other: begin transaction");
        held.send(()).unwrap();
        let _ = stop.recv_timeout(max);
        tx.end(pcsc::Disposition::LeaveCard)
            .map_err(|(_, e)| e)
            .expect("other: end transaction");
    }
    card.disconnect(pcsc::Disposition::LeaveCard)
        .map_err(|(_, e)| e)
        .expect("other: disconnect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_that_time_out_while_another_program_holds_the_card_leak_no_threads() {
    if !require_pcscd("connects_that_time_out_while_another_program_holds_the_card_leak_no_threads")
    {
        return;
    }
    let _lock = VpcdPortLock::acquire(PORT).expect("vpcd port lock");
    let driver = PcscDriver::new();
    // A card of an earlier test may still show for a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !driver
        .list()
        .await
        .expect("list")
        .iter()
        .any(|r| r.name == READER && r.card == reader_drivers::CardPresence::Absent)
    {
        assert!(Instant::now() < deadline, "{READER} never empty");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut events = driver.events();
    let att = vpcd::attach(
        vpcd::shared(Box::new(FakePurseCard::new())),
        "127.0.0.1",
        PORT,
    )
    .await
    .expect("attach");
    wait_for(
        &mut events,
        "CardInserted",
        Duration::from_secs(10),
        |e| matches!(e, ReaderEvent::CardInserted { reader, .. } if reader == READER),
    )
    .await;

    // The card answers while nobody holds it.
    let (mut s, _) = driver.connect(READER).await.expect("connect");
    assert!(
        transmit_whole(s.as_mut(), &SELECT_PURSE)
            .await
            .unwrap()
            .ends_with(&[0x90, 0x00])
    );
    drop(s);

    let (held_tx, held_rx) = std_mpsc::channel();
    let (stop_tx, stop_rx) = std_mpsc::channel();
    let other =
        std::thread::spawn(move || hold_transaction(held_tx, stop_rx, Duration::from_secs(60)));
    held_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the other program holds its transaction");
    // Let the session thread of the first connect finish, and the runtime settle.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = threads();

    for i in 0..ATTEMPTS {
        let t = Instant::now();
        let r = tokio::time::timeout(GIVE_UP, driver.connect(READER)).await;
        // Timed out (ours, or the driver's own): not connected, not refused.
        match r {
            Err(_) | Ok(Err(reader_drivers::ReaderError::Timeout { .. })) => {}
            Ok(Ok(_)) => {
                panic!("attempt {i}: connected although the other program holds a transaction")
            }
            Ok(Err(e)) => panic!("attempt {i}: {e}"),
        }
        assert!(
            t.elapsed() < GIVE_UP + Duration::from_millis(500),
            "attempt {i} took {:?}",
            t.elapsed()
        );
    }
    let during = threads();
    eprintln!(
        "threads: {before} before, {during} after {ATTEMPTS} connects given up after {GIVE_UP:?}"
    );
    assert!(
        during <= before + 1,
        "{ATTEMPTS} timed-out connects left {} more threads (at most the one connect still in \
         pcscd may remain)",
        during - before
    );

    // The other program lets go: the connect still in pcscd returns, finds nobody waiting
    // and ends its thread, leaving the card as it was.
    stop_tx.send(()).unwrap();
    other.join().expect("the other program");
    let deadline = Instant::now() + Duration::from_secs(5);
    while threads() > before {
        assert!(
            Instant::now() < deadline,
            "threads stayed at {} (before: {before}) after the other program let go",
            threads()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And the card is reachable again at once.
    let (mut s, _) = tokio::time::timeout(Duration::from_secs(5), driver.connect(READER))
        .await
        .expect("connect after the other program let go")
        .expect("connect");
    assert!(
        transmit_whole(s.as_mut(), &SELECT_PURSE)
            .await
            .unwrap()
            .ends_with(&[0x90, 0x00])
    );
    drop(s);
    att.detach().await;
}
