//! The PC/SC driver survives a pcscd restart: against a PRIVATE pcscd (its own mount
//! namespace, so its /run/pcscd is a temp dir; its own vpcd port), which the test stops and
//! starts without disturbing the shared pcscd other tests use.
//!
//! Needs root, `unshare` and pcscd + vsmartcard-vpcd. The client library is pointed at the
//! private socket with PCSCLITE_CSOCK_NAME, which is process-wide: this binary holds this one
//! test only.

mod pcsc_common;

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use pcsc_common::*;
use reader_drivers::emulator::vpcd;
use reader_drivers::pcsc::PcscDriver;
use reader_drivers::{ReaderDriver, ReaderError, ReaderEvent, transmit_whole};

const READER: &str = "Virtual PCD 00 00";
const WAIT: Duration = Duration::from_secs(15);

struct PrivatePcscd {
    child: Option<Child>,
}

impl PrivatePcscd {
    fn start(dir: &std::path::Path) -> Self {
        let script = format!(
            "mkdir -p /run/pcscd && mount --bind {run} /run/pcscd && exec pcscd --foreground -c {conf}",
            run = dir.join("run").display(),
            conf = dir.join("conf").display()
        );
        let log = std::fs::File::options()
            .create(true)
            .append(true)
            .open(dir.join("pcscd.log"))
            .unwrap();
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", &script])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start private pcscd with unshare");
        Self { child: Some(child) }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child (sh exec'd pcscd, same pid).
            unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
            let _ = c.wait();
        }
    }
}

impl Drop for PrivatePcscd {
    fn drop(&mut self) {
        self.stop();
    }
}

async fn attach_when_listening(card: &vpcd::SharedCard, port: u16) -> vpcd::VpcdAttachment {
    let deadline = Instant::now() + WAIT;
    loop {
        match vpcd::attach(card.clone(), "127.0.0.1", port).await {
            Ok(a) => return a,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("private vpcd never listened on {port}: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn driver_reports_service_lost_and_restored_across_a_pcscd_restart() {
    if std::env::var("PURSELINK_SKIP_PCSC").as_deref() == Ok("1") {
        eprintln!("pcsc_restart: SKIPPED because PURSELINK_SKIP_PCSC=1");
        return;
    }
    // No check against the shared pcscd here: the first PC/SC call fixes the socket path.
    assert!(
        std::path::Path::new("/usr/sbin/pcscd").exists()
            && std::path::Path::new("/usr/lib/pcsc/drivers/serial/libifdvpcd.so").exists(),
        "pcscd or vsmartcard-vpcd is not installed — run scripts/system-setup.sh as root"
    );
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "this test starts a private pcscd in a mount namespace and must run as root"
    );
    // SAFETY: single-test binary; set before any PC/SC call in this process.
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("run").join("pcscd.comm");
    unsafe { std::env::set_var("PCSCLITE_CSOCK_NAME", &sock) };

    // A free port pair for the private vpcd (reader 00 00 and 00 01).
    let port = loop {
        let l = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
        let p = l.local_addr().unwrap().port();
        if p < 65000 && std::net::TcpListener::bind(("0.0.0.0", p + 1)).is_ok() {
            break p;
        }
    };
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    std::fs::create_dir_all(dir.path().join("conf")).unwrap();
    std::fs::write(
        dir.path().join("conf").join("vpcd"),
        format!(
            "FRIENDLYNAME \"Virtual PCD\"\nDEVICENAME   /dev/null:{port}\n\
             LIBPATH      /usr/lib/pcsc/drivers/serial/libifdvpcd.so\nCHANNELID    {port}\n"
        ),
    )
    .unwrap();

    let driver = PcscDriver::new().with_service_retry(Duration::from_millis(100));
    // Nothing at the private socket yet: the clear error, and ServiceLost first.
    assert_eq!(driver.list().await, Err(ReaderError::ServiceNotRunning));
    let mut events = driver.events();
    let ev = wait_for(&mut events, "ServiceLost", WAIT, |e| {
        matches!(e, ReaderEvent::ServiceLost { .. })
    })
    .await;
    let ReaderEvent::ServiceLost { reason } = ev else {
        unreachable!()
    };
    assert!(reason.contains("pcscd is not running"), "{reason}");

    let mut pcscd = PrivatePcscd::start(dir.path());
    wait_for(&mut events, "ServiceRestored", WAIT, |e| {
        *e == ReaderEvent::ServiceRestored
    })
    .await;
    wait_for(
        &mut events,
        "ReaderAttached",
        WAIT,
        |e| matches!(e, ReaderEvent::ReaderAttached { reader } if reader == READER),
    )
    .await;
    let card = vpcd::shared(Box::new(FakePurseCard::new()));
    let att = attach_when_listening(&card, port).await;
    wait_for(
        &mut events,
        "CardInserted",
        WAIT,
        |e| matches!(e, ReaderEvent::CardInserted { reader, .. } if reader == READER),
    )
    .await;

    // pcscd goes away: ServiceLost, and the card is reported removed.
    pcscd.stop();
    wait_for(&mut events, "ServiceLost after stop", WAIT, |e| {
        matches!(e, ReaderEvent::ServiceLost { .. })
    })
    .await;
    wait_for(
        &mut events,
        "CardRemoved after stop",
        WAIT,
        |e| matches!(e, ReaderEvent::CardRemoved { reader } if reader == READER),
    )
    .await;
    att.detach().await;

    // And comes back: the same watcher re-establishes its context.
    let _pcscd = PrivatePcscd::start(dir.path());
    wait_for(&mut events, "ServiceRestored after restart", WAIT, |e| {
        *e == ReaderEvent::ServiceRestored
    })
    .await;
    let att = attach_when_listening(&card, port).await;
    wait_for(
        &mut events,
        "CardInserted after restart",
        WAIT,
        |e| matches!(e, ReaderEvent::CardInserted { reader, .. } if reader == READER),
    )
    .await;
    let (mut session, _) = driver.connect(READER).await.expect("connect after restart");
    assert_eq!(
        transmit_whole(session.as_mut(), &SELECT_PURSE)
            .await
            .unwrap(),
        [0x90, 0x00]
    );
    session.power_down().await.unwrap();
    att.detach().await;
    driver.shutdown();
}
