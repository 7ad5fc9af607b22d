//! stbd's purchase flow on a REAL pcscd shared with another program (issue 13, item 6).
//!
//! The daemon runs in process (`stb::daemon::run`) with the real PC/SC driver; the card is the
//! real file-backed purse (`VirtualCard`) attached to vsmartcard's vpcd ("Virtual PCD 00 00"
//! on port 35963, "Virtual PCD 00 01" on 35964), wrapped in a recorder that logs what the card
//! sees and when; the head end is the in-process `FakeHeadEnd` (a named fake: a real security
//! card signs the debit commands, so the card really debits).
//!
//! "The other program" (OSCam, OpenSC) is a second PC/SC client on the same pcscd, played by
//! the test with the `pcsc` crate directly: its own context and connection. The recorder
//! lets it act at an exact point of our card sequence (right when our SELECT reaches the card),
//! and holds that command 300 ms so the other program's request is at pcscd before our next
//! command can be.
//!
//! Needs pcscd with vsmartcard-vpcd (scripts/start-pcscd.sh); fails with that advice if it
//! is not running, unless PURSELINK_SKIP_PCSC=1. Every test takes the vpcd port locks, so
//! they run one at a time and never alongside another process's test on the same reader.

mod support;

use std::ffi::CString;
use std::path::Path;
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto::apdu::CardApplication;
use proto::card::{CardSpec, INS_DEBIT, INS_INITIALIZE, INS_SELECT, commands};
use proto::money::Currency;
use proto::purse::Expiry;
use reader_drivers::emulator::vpcd::{self, VpcdPortLock};
use reader_drivers::pcsc::PcscDriver;
use reader_drivers::vcard::VirtualCard;
use reader_drivers::{CardPresence, ReaderDriver, ReaderEvent};
use stb::daemon::event::{Event, Status};
use stb::daemon::{Handles, Io};
use stb_flow::purchase::Outcome;
use support::*;
use tokio::sync::{mpsc, oneshot, watch};
use ui::RemoteKey;

const PORT_A: u16 = vpcd::DEFAULT_PORT;
const PORT_B: u16 = vpcd::DEFAULT_PORT + 1;
const READER_A: &str = "Virtual PCD 00 00";
const READER_B: &str = "Virtual PCD 00 01";
/// A SELECT of another application (what OSCam or OpenSC would send): the purse answers
/// 6A82 and is no longer selected.
const FOREIGN_SELECT: [u8; 12] = [
    0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0x00, 0x00, 0x00, 0x03, 0x10, 0x10,
];
const WAIT: Duration = Duration::from_secs(15);
/// How long the recorder holds our command before the card answers it, once it has let the
/// other program go.
const HOLD: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------------------
// The recorded card

/// What the card saw.
#[derive(Debug, Clone)]
enum Seen {
    Apdu {
        at: Instant,
        cmd: Vec<u8>,
        sw: [u8; 2],
    },
    /// Power-up or reset (vpcd does not tell them apart).
    Reset { at: Instant },
}

impl Seen {
    fn at(&self) -> Instant {
        match self {
            Seen::Apdu { at, .. } | Seen::Reset { at } => *at,
        }
    }
    fn label(&self) -> String {
        match self {
            Seen::Reset { .. } => "reset".into(),
            Seen::Apdu { cmd, sw, .. } => {
                let name = match (cmd.get(1).copied(), cmd.get(2).copied()) {
                    _ if cmd.starts_with(&FOREIGN_SELECT) => "SELECT (other program)",
                    (Some(INS_SELECT), _) => "SELECT",
                    (Some(INS_INITIALIZE), _) => "INITIALIZE",
                    (Some(INS_DEBIT), _) => "DEBIT",
                    (Some(0xB0), _) => "READ PURSE",
                    (Some(0xB2), _) => "READ LOG",
                    _ => "?",
                };
                format!("{name} {:02X}{:02X}", sw[0], sw[1])
            }
        }
    }
}

type Hook = Box<dyn FnMut(&[u8]) + Send>;

/// The purse, recording what it sees; a hook runs before each command is processed.
struct Recorded {
    card: VirtualCard,
    log: Arc<Mutex<Vec<Seen>>>,
    hook: Arc<Mutex<Option<Hook>>>,
}

impl CardApplication for Recorded {
    fn atr(&self) -> Vec<u8> {
        self.card.atr()
    }
    fn reset(&mut self) {
        self.log
            .lock()
            .unwrap()
            .push(Seen::Reset { at: Instant::now() });
        self.card.reset();
    }
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        if let Some(h) = self.hook.lock().unwrap().as_mut() {
            h(apdu);
        }
        let r = self.card.process_apdu(apdu);
        let sw = [r[r.len() - 2], r[r.len() - 1]];
        self.log.lock().unwrap().push(Seen::Apdu {
            at: Instant::now(),
            cmd: apdu.to_vec(),
            sw,
        });
        r
    }
}

struct Card {
    path: std::path::PathBuf,
    log: Arc<Mutex<Vec<Seen>>>,
    hook: Arc<Mutex<Option<Hook>>>,
    att: Option<vpcd::VpcdAttachment>,
    port: u16,
}

impl Card {
    fn new(path: std::path::PathBuf, port: u16) -> Self {
        Self {
            path,
            log: Arc::default(),
            hook: Arc::default(),
            att: None,
            port,
        }
    }

    /// Puts the card into its reader (attaches it to vpcd).
    async fn insert(&mut self) {
        let card = Recorded {
            card: VirtualCard::open(&self.path).unwrap(),
            log: self.log.clone(),
            hook: self.hook.clone(),
        };
        self.att = Some(
            vpcd::attach(vpcd::shared(Box::new(card)), "127.0.0.1", self.port)
                .await
                .expect("attach to vpcd"),
        );
    }

    /// Pulls the card.
    async fn pull(&mut self) {
        if let Some(a) = self.att.take() {
            a.detach().await;
        }
    }

    fn mark(&self) -> usize {
        self.log.lock().unwrap().len()
    }

    fn seen_since(&self, mark: usize) -> Vec<Seen> {
        self.log.lock().unwrap()[mark..].to_vec()
    }

    fn set_hook(&self, h: impl FnMut(&[u8]) + Send + 'static) {
        *self.hook.lock().unwrap() = Some(Box::new(h));
    }
}

fn timeline(seen: &[Seen], t0: Instant) -> String {
    seen.iter()
        .map(|s| format!("  {:>7.1} ms  {}", ms(s.at(), t0), s.label()))
        .collect::<Vec<_>>()
        .join("\n")
}

fn ms(t: Instant, t0: Instant) -> f64 {
    if t >= t0 {
        (t - t0).as_secs_f64() * 1e3
    } else {
        -((t0 - t).as_secs_f64() * 1e3)
    }
}

/// The labels of the APDUs (and resets) seen.
fn labels(seen: &[Seen]) -> Vec<String> {
    seen.iter().map(Seen::label).collect()
}

// ---------------------------------------------------------------------------------------
// The other program

fn other_connect(reader: &str) -> pcsc::Card {
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("other: context");
    ctx.connect(
        &CString::new(reader).unwrap(),
        pcsc::ShareMode::Shared,
        pcsc::Protocols::ANY,
    )
    .expect("other: connect")
}

fn other_transmit(card: &pcsc::Card, apdu: &[u8]) -> Result<Vec<u8>, pcsc::Error> {
    let mut buf = [0u8; 300];
    card.transmit(apdu, &mut buf).map(|r| r.to_vec())
}

/// When the other program sent its command, when pcscd answered it, and the answer.
#[derive(Debug)]
struct Act {
    sent: Instant,
    done: Instant,
    result: Result<Vec<u8>, pcsc::Error>,
}

// ---------------------------------------------------------------------------------------
// pcscd, readers and the box

fn require_pcscd(test: &str) -> bool {
    if std::env::var("PURSELINK_SKIP_PCSC").as_deref() == Ok("1") {
        eprintln!("{test}: SKIPPED because PURSELINK_SKIP_PCSC=1");
        return false;
    }
    if let Err(e) = pcsc::Context::establish(pcsc::Scope::User) {
        panic!(
            "{test}: pcscd is not running ({e}). Start it with scripts/start-pcscd.sh, or set \
             PURSELINK_SKIP_PCSC=1 to skip the PC/SC tests."
        );
    }
    for port in [PORT_A, PORT_B] {
        if !vpcd::listed_by_pcscd(port).unwrap_or(false) {
            panic!(
                "{test}: pcscd runs but does not list vpcd's reader for port {port} — install vsmartcard-vpcd and restart pcscd"
            );
        }
    }
    true
}

/// Waits until pcscd reports `reader` empty (a card of an earlier test may still show).
async fn wait_empty(reader: &str) {
    let d = PcscDriver::new();
    let deadline = Instant::now() + WAIT;
    loop {
        let readers = d.list().await.expect("list readers");
        if readers
            .iter()
            .any(|r| r.name == reader && r.card == CardPresence::Absent)
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{reader} never empty: {readers:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until pcscd reports a card in `reader` (or none) and gives the daemon time to hear
/// of it (pcscd polls vpcd every 400 ms; the daemon's watcher is a second listener).
async fn wait_reader(events: &mut mpsc::Receiver<ReaderEvent>, reader: &str, inserted: bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let ev = tokio::time::timeout_at(deadline, events.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "pcscd never saw {reader} {}",
                    if inserted { "get a card" } else { "empty" }
                )
            })
            .expect("events");
        match ev {
            ReaderEvent::CardInserted { reader: r, .. } if inserted && r == reader => break,
            ReaderEvent::CardRemoved { reader: r } if !inserted && r == reader => break,
            _ => {}
        }
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
}

struct PcscBox {
    events: mpsc::Sender<Event>,
    status: watch::Receiver<Status>,
    keys: mpsc::Sender<ui::UiEvent>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

/// stbd in process on the real PC/SC driver, watching readers that match `pattern`.
async fn start_box(
    dir: &Path,
    pki: &Pki,
    fake: &FakeHeadEnd,
    card: &Path,
    pattern: &str,
) -> PcscBox {
    let mut cfg = config(dir, pki, fake.addr, card, 5);
    cfg.timeouts.offer_secs = 60;
    let (ktx, krx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let (htx, hrx) = oneshot::channel::<Handles>();
    let io = Io {
        driver: Arc::new(PcscDriver::new()),
        reader_pattern: pattern.into(),
        keys: Some(krx),
        draw: false,
    };
    let task = tokio::spawn(async move {
        stb::daemon::run(
            cfg,
            io,
            async {
                let _ = stop_rx.await;
            },
            |h| {
                let _ = htx.send(h);
            },
        )
        .await
        .unwrap();
    });
    let h = hrx.await.unwrap();
    PcscBox {
        events: h.events,
        status: h.status,
        keys: ktx,
        stop: Some(stop_tx),
        task,
    }
}

impl PcscBox {
    async fn until(&mut self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        let r = tokio::time::timeout(WAIT, self.status.wait_for(|s| f(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match r {
            Ok(Ok(s)) => s,
            _ => panic!(
                "timed out waiting for {what}; status {:?}",
                *self.status.borrow()
            ),
        }
    }

    fn now(&self) -> Status {
        self.status.borrow().clone()
    }

    async fn pay(&self) -> oneshot::Receiver<Outcome> {
        let (tx, rx) = oneshot::channel();
        self.events
            .send(Event::Pay {
                merchant_id: "cable".into(),
                item_id: "ppv-7".into(),
                reply: tx,
            })
            .await
            .unwrap();
        rx
    }

    /// Waits for the offer popup; panics with the outcome if the purchase ended first.
    async fn offer(&mut self, rx: &mut oneshot::Receiver<Outcome>) -> String {
        let mut status = self.status.clone();
        tokio::select! {
            s = status.wait_for(|s| s.offer.is_some()) => s.unwrap().offer.clone().unwrap(),
            out = rx => panic!("the purchase ended before the offer was shown: {:?}", out.unwrap()),
            _ = tokio::time::sleep(WAIT) => panic!("no offer; status {:?}", self.now()),
        }
    }

    async fn ok(&self) {
        self.keys
            .send(ui::UiEvent::Key(RemoteKey::Ok))
            .await
            .unwrap();
    }

    async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

async fn outcome(rx: oneshot::Receiver<Outcome>) -> Outcome {
    tokio::time::timeout(WAIT, rx)
        .await
        .expect("no outcome")
        .expect("outcome")
}

fn lock(port: u16) -> VpcdPortLock {
    VpcdPortLock::acquire(port).expect("vpcd port lock")
}

/// A hook that, on the `nth` (from 1) command that `pick` accepts, lets the other program go
/// and holds the command for [`HOLD`], so the other program's request reaches pcscd first.
fn on_nth(
    nth: usize,
    pick: impl Fn(&[u8]) -> bool + Send + 'static,
    go: std_mpsc::Sender<()>,
) -> impl FnMut(&[u8]) + Send + 'static {
    let mut n = 0;
    move |apdu| {
        if pick(apdu) {
            n += 1;
            if n == nth {
                let _ = go.send(());
                std::thread::sleep(HOLD);
            }
        }
    }
}

fn is_our_select(apdu: &[u8]) -> bool {
    apdu.starts_with(&commands::select()[..5])
}

fn is_init(apdu: &[u8]) -> bool {
    apdu.get(1) == Some(&INS_INITIALIZE)
}

// ---------------------------------------------------------------------------------------
// The tests

/// The other program resets the card right as our SELECT reaches it (between our SELECT
/// and the command after it). Before: the reset landed there, stbd reconnected and re-sent
/// INITIALIZE blindly, and the card refused it (6985: "the card refused"). Now SELECT →
/// INITIALIZE is one transaction: the reset waits until it ends and lands while the viewer
/// decides; the OK starts the next sequence, pcscd reports the reset, and stbd selects the
/// purse again; the purchase completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_by_another_program_mid_sequence_waits_and_the_purchase_selects_again() {
    if !require_pcscd("a_reset_by_another_program") {
        return;
    }
    let _lock = lock(PORT_A);
    wait_empty(READER_A).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(&pki, Quirks::default()).await;
    let mut card = Card::new(card_file(dir.path()), PORT_A);
    card.insert().await;
    let mut b = start_box(dir.path(), &pki, &fake, &card.path, READER_A).await;
    b.until("the card on the home screen", |s| {
        s.card_balance == Some(1000)
    })
    .await;

    let (go_tx, go_rx) = std_mpsc::channel();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let other = std::thread::spawn(move || {
        let mut c = other_connect(READER_A);
        ready_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        let sent = Instant::now();
        let result = c
            .reconnect(
                pcsc::ShareMode::Shared,
                pcsc::Protocols::ANY,
                pcsc::Disposition::ResetCard,
            )
            .map(|()| Vec::new());
        let done = Instant::now();
        let _ = c.disconnect(pcsc::Disposition::LeaveCard);
        Act { sent, done, result }
    });
    // The other program is connected (as OSCam would be all along) before anything starts.
    ready_rx
        .recv_timeout(WAIT)
        .expect("the other program connects");
    let mark = card.mark();
    let t0 = Instant::now();
    card.set_hook(on_nth(1, is_our_select, go_tx));

    let mut rx = b.pay().await;
    let txid = b.offer(&mut rx).await;
    let act = tokio::task::spawn_blocking(move || other.join().unwrap())
        .await
        .unwrap();
    act.result.as_ref().expect("the other program's reset");
    b.ok().await;
    let out = outcome(rx).await;
    let seen = card.seen_since(mark);
    eprintln!(
        "the other program asked for the reset at {:.1} ms, pcscd did it at {:.1} ms; the card saw:\n{}",
        ms(act.sent, t0),
        ms(act.done, t0),
        timeline(&seen, t0)
    );
    assert!(
        matches!(out, Outcome::Paid { ref receipt, .. } if receipt.released),
        "{out:?}"
    );
    assert_eq!(balance(&card.path), 1000 - PRICE);
    assert_eq!(fake.released(&txid), 1);
    let l = labels(&seen);
    assert!(
        !l.iter().any(|x| x.ends_with("6985")),
        "the card refused something: {l:?}"
    );
    // Our SELECT and INITIALIZE back to back; the reset after them; then SELECT again,
    // INITIALIZE and DEBIT.
    let first = l
        .iter()
        .position(|x| x == "SELECT 9000")
        .expect("our SELECT");
    assert_eq!(l[first + 1], "INITIALIZE 9000", "{l:?}");
    assert_eq!(l[first + 2], "reset", "{l:?}");
    assert_eq!(
        l[first + 3..first + 6],
        ["SELECT 9000", "INITIALIZE 9000", "DEBIT 9000"],
        "{l:?}"
    );
    let init_at = seen[first + 1].at();
    assert!(
        act.sent < init_at,
        "the reset was asked for before our INITIALIZE"
    );
    assert!(
        act.done >= init_at,
        "the reset went through between our SELECT and INITIALIZE"
    );
    b.stop().await;
    card.pull().await;
}

/// The other program sends a SELECT of its own application right as our SELECT reaches the
/// card, and again right as our second INITIALIZE (the one DEBIT follows) does. Before: the
/// first came between our SELECT and INITIALIZE, which the card then refused (6985). Now
/// each waits until our transaction ends — the first until INITIALIZE is answered, the second
/// until DEBIT is — and the purchase completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_programs_select_waits_for_our_transaction() {
    if !require_pcscd("another_programs_select_waits_for_our_transaction") {
        return;
    }
    let _lock = lock(PORT_A);
    wait_empty(READER_A).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(&pki, Quirks::default()).await;
    let mut card = Card::new(card_file(dir.path()), PORT_A);
    card.insert().await;
    let mut b = start_box(dir.path(), &pki, &fake, &card.path, READER_A).await;
    b.until("the card on the home screen", |s| {
        s.card_balance == Some(1000)
    })
    .await;

    let (go1_tx, go1_rx) = std_mpsc::channel();
    let (go2_tx, go2_rx) = std_mpsc::channel();
    let (first_tx, first_rx) = std_mpsc::channel();
    let (ready_tx, ready_rx) = std_mpsc::channel();
    let other = std::thread::spawn(move || {
        let c = other_connect(READER_A);
        ready_tx.send(()).unwrap();
        let mut acts = Vec::new();
        for go in [go1_rx, go2_rx] {
            if go.recv_timeout(WAIT).is_err() {
                break;
            }
            let sent = Instant::now();
            let result = other_transmit(&c, &FOREIGN_SELECT);
            acts.push(Act {
                sent,
                done: Instant::now(),
                result,
            });
            let _ = first_tx.send(());
        }
        let _ = c.disconnect(pcsc::Disposition::LeaveCard);
        acts
    });
    // The other program is connected (as OSCam would be all along) before anything starts.
    ready_rx
        .recv_timeout(WAIT)
        .expect("the other program connects");
    let mark = card.mark();
    let t0 = Instant::now();
    let mut first_select = on_nth(1, is_our_select, go1_tx);
    let mut second_init = on_nth(2, is_init, go2_tx);
    card.set_hook(move |apdu| {
        first_select(apdu);
        second_init(apdu);
    });

    let mut rx = b.pay().await;
    let txid = b.offer(&mut rx).await;
    // The viewer presses OK once the other program's first SELECT went through.
    tokio::task::spawn_blocking(move || first_rx.recv_timeout(WAIT))
        .await
        .unwrap()
        .expect("the other program's first SELECT");
    b.ok().await;
    let out = outcome(rx).await;
    let acts = tokio::task::spawn_blocking(move || other.join().unwrap())
        .await
        .unwrap();
    let seen = card.seen_since(mark);
    for (i, a) in acts.iter().enumerate() {
        eprintln!(
            "the other program's SELECT #{}: sent at {:.1} ms, answered at {:.1} ms (waited {:.1} ms): {:02X?}",
            i + 1,
            ms(a.sent, t0),
            ms(a.done, t0),
            ms(a.done, a.sent),
            a.result
        );
    }
    eprintln!("the card saw:\n{}", timeline(&seen, t0));
    assert!(
        matches!(out, Outcome::Paid { ref receipt, .. } if receipt.released),
        "{out:?}"
    );
    assert_eq!(balance(&card.path), 1000 - PRICE);
    assert_eq!(fake.released(&txid), 1);
    assert_eq!(acts.len(), 2, "{acts:?}");
    for a in &acts {
        assert_eq!(a.result, Ok(vec![0x6A, 0x82]));
    }
    let l = labels(&seen);
    let first = l
        .iter()
        .position(|x| x == "SELECT 9000")
        .expect("our SELECT");
    assert_eq!(
        l[first..first + 6],
        [
            "SELECT 9000",
            "INITIALIZE 9000",
            "SELECT (other program) 6A82",
            "SELECT 9000",
            "INITIALIZE 9000",
            "DEBIT 9000",
        ],
        "{l:?}"
    );
    // The second comes after DEBIT (pcsc-lite's locks are not fair: the box's card refresh
    // after the receipt may come first).
    assert_eq!(
        l[first + 6..]
            .iter()
            .filter(|x| *x == "SELECT (other program) 6A82")
            .count(),
        1,
        "{l:?}"
    );
    // Held off: sent while our sequence was on, answered only after its last command.
    let (init1, debit) = (seen[first + 1].at(), seen[first + 5].at());
    assert!(acts[0].sent < init1 && acts[0].done >= init1);
    assert!(acts[1].sent < debit && acts[1].done >= debit);
    b.stop().await;
    card.pull().await;
}

/// Two readers match the box's pattern, each with a card. Pulling the card the box is not
/// using changes nothing, even in the middle of a purchase; pulling the one it uses makes it
/// carry on with the other reader's card, and a purchase then debits that card.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_readers_a_pull_from_the_other_reader_changes_nothing_and_ours_falls_back() {
    if !require_pcscd("two_readers") {
        return;
    }
    let _lock_a = lock(PORT_A);
    let _lock_b = lock(PORT_B);
    wait_empty(READER_A).await;
    wait_empty(READER_B).await;
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(&pki, Quirks::default()).await;
    let path_b = dir.path().join("card-b.plvc");
    VirtualCard::create(
        &path_b,
        &CardSpec {
            card_id: 4343,
            provider_id: 1,
            currency: Currency::EUR,
            balance: 600,
            max_balance: 100_000,
            expiry: Expiry {
                year: 2035,
                month: 12,
            },
        },
        &issuer(),
    )
    .unwrap();
    let mut a = Card::new(card_file(dir.path()), PORT_A);
    let mut bcard = Card::new(path_b, PORT_B);
    let watcher = PcscDriver::new();
    let mut events = watcher.events();

    let mut b = start_box(dir.path(), &pki, &fake, &a.path, "Virtual PCD 00 0?").await;
    a.insert().await;
    wait_reader(&mut events, READER_A, true).await;
    b.until("card A on the home screen", |s| {
        s.card_balance == Some(1000)
    })
    .await;
    bcard.insert().await;
    wait_reader(&mut events, READER_B, true).await;

    // The card in use, by its balance on the screen; pull the other one mid-purchase.
    let shown = b.now().card_balance;
    let (ours, theirs) = if shown == Some(1000) {
        (&mut a, &mut bcard)
    } else {
        (&mut bcard, &mut a)
    };
    let mut rx = b.pay().await;
    let txid = b.offer(&mut rx).await;
    theirs.pull().await;
    let theirs_reader = if theirs.port == PORT_A {
        READER_A
    } else {
        READER_B
    };
    wait_reader(&mut events, theirs_reader, false).await;
    let s = b.now();
    assert_eq!(
        (s.offer.as_deref(), s.card_balance),
        (Some(txid.as_str()), shown),
        "pulling the card the box is not using changed the box"
    );
    b.ok().await;
    let out = outcome(rx).await;
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(
        balance(&ours.path),
        shown.unwrap() as u64 - PRICE,
        "the card in use paid"
    );
    assert_eq!(
        shown,
        Some(1000),
        "the first card stays in use when a second one is inserted"
    );
    assert_eq!(balance(&bcard.path), 600, "the other card was not touched");

    // Card B back; then card A (in use) pulled: the box carries on with B.
    bcard.insert().await;
    wait_reader(&mut events, READER_B, true).await;
    assert_eq!(b.now().card_balance, Some(1000 - PRICE as i64));
    a.pull().await;
    b.until("card B on the home screen", |s| s.card_balance == Some(600))
        .await;
    let rx = b.pay().await;
    let mut rx = rx;
    b.offer(&mut rx).await;
    b.ok().await;
    let out = outcome(rx).await;
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(balance(&bcard.path), 600 - PRICE);
    assert_eq!(balance(&a.path), 1000 - PRICE);
    b.until("card B's new balance", |s| {
        s.card_balance == Some((600 - PRICE) as i64)
    })
    .await;
    b.stop().await;
    bcard.pull().await;
}
