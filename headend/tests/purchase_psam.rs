//! Purchases with the security card in a PC/SC reader: the PSAM application
//! (`proto::psam`, the file-backed `reader_drivers::vpsam::VirtualPsam`) served through the
//! real pcscd and vsmartcard's vpcd in the "Purselink PSAM 00 00" reader
//! (`scripts/system-setup.sh`), driven by the payment server's PC/SC terminal
//! (`headend::payment::terminal`). The card's own APDU trace — what reached it through
//! pcscd — shows the [0093] replay, and FIG. 5's silence after the debit command.
//!
//! Needs pcscd with the PSAM readers (`./dev test` starts it); `PURSELINK_SKIP_PCSC=1` skips.

mod purchase_support;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use headend::payment::PayState;
use proto::apdu::CardApplication;
use proto::messages::*;
use proto::psam::{self, PsamStatus};
use purchase_support::pg_rig::Backend;
use purchase_support::*;
use reader_drivers::emulator::vpcd;
use reader_drivers::vpsam::VirtualPsam;

const PORT: u16 = vpcd::PSAM_PORT;
const READER: &str = "Purselink PSAM 00 00";
const PSAM_ID: u64 = 0x5A11_0001;
const SOFT_ID: u64 = 0x5A11_0002;

/// One APDU the security card received, and its status word.
#[derive(Debug, Clone)]
struct Seen {
    ins: u8,
    data: Vec<u8>,
    sw: u16,
}

impl Seen {
    /// The security card's transaction the command names (DEBIT RESPONSE, REVERSE, VERIFY
    /// NOT DEBITED, FORGET carry it first).
    fn txn(&self) -> Option<u32> {
        matches!(
            self.ins,
            psam::INS_DEBIT_RESPONSE
                | psam::INS_REVERSE
                | psam::INS_VERIFY_NOT_DEBITED
                | psam::INS_FORGET
        )
        .then(|| {
            self.data
                .get(..4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        })
        .flatten()
    }
}

/// A broken security card, by mode ([`GARBAGE`], [`WRONG_MAC`]; 0: none).
type Fault = Arc<std::sync::atomic::AtomicU8>;
/// From the next INITIALIZE on, every answer is bytes that mean nothing, with `9000`
/// (until cleared: the card "repaired").
const GARBAGE: u8 = 1;
/// INITIALIZE answers a debit command whose security-card signature has one bit flipped
/// (a failing card, or one with the wrong keys for signing).
const WRONG_MAC: u8 = 2;

fn no_fault() -> Fault {
    Arc::default()
}

/// The security card with its APDU trace (the card's side of pcscd).
struct Recording {
    inner: VirtualPsam,
    seen: Arc<Mutex<Vec<Seen>>>,
    fault: Fault,
    broken: bool,
}

impl CardApplication for Recording {
    fn atr(&self) -> Vec<u8> {
        self.inner.atr()
    }
    fn reset(&mut self) {
        self.inner.reset();
    }
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        let mut out = self.inner.process_apdu(apdu);
        let mode = self.fault.load(std::sync::atomic::Ordering::SeqCst);
        let initialize = apdu.get(1) == Some(&psam::INS_INITIALIZE);
        self.broken = mode == GARBAGE && (self.broken || initialize);
        if self.broken {
            out = vec![0xDE, 0xAD, 0xBE, 0xEF, 0x90, 0x00];
        } else if mode == WRONG_MAC && initialize && out.ends_with(&[0x90, 0x00]) {
            // The debit command ends with its signature; early release appends the
            // expected card signature (8 bytes) after it.
            let early = apdu
                .get(2)
                .is_some_and(|p1| p1 & psam::P1_EARLY_RELEASE != 0);
            let end = out.len() - 2 - if early { 8 } else { 0 };
            out[end - 1] ^= 0x01;
        }
        let cmd = proto::apdu::Command::parse(apdu).ok();
        let sw = out
            .len()
            .checked_sub(2)
            .map(|i| u16::from_be_bytes([out[i], out[i + 1]]))
            .unwrap_or(0);
        self.seen.lock().unwrap().push(Seen {
            ins: apdu.get(1).copied().unwrap_or(0),
            data: cmd.map(|c| c.data).unwrap_or_default(),
            sw,
        });
        out
    }
}

/// The security card served in the PSAM reader until dropped.
struct Served {
    seen: Arc<Mutex<Vec<Seen>>>,
    file: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Served {
    async fn start(file: &Path, fault: Fault, seen: Arc<Mutex<Vec<Seen>>>) -> Self {
        let card = Recording {
            inner: VirtualPsam::open(file).unwrap(),
            seen: seen.clone(),
            fault,
            broken: false,
        };
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let shared = vpcd::shared(Box::new(card));
        let task = tokio::spawn(async move {
            vpcd::serve_forever(
                shared,
                "127.0.0.1",
                PORT,
                Duration::from_millis(200),
                async {
                    let _ = rx.await;
                },
            )
            .await;
        });
        let me = Self {
            seen,
            file: file.into(),
            stop: Some(stop),
            task: Some(task),
        };
        wait_reader(true).await;
        me
    }

    /// Pulls the security card out of its reader (vpcd reports the card removed).
    async fn detach(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
        wait_reader(false).await;
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// The card's own status, read from its file.
    fn status(&self) -> PsamStatus {
        VirtualPsam::open(&self.file).unwrap().psam().status()
    }
}

/// Waits (bounded) until pcscd sees a working card in the PSAM reader, or none.
async fn wait_reader(present: bool) {
    let reader = std::ffi::CString::new(READER).unwrap();
    for _ in 0..100 {
        let r = tokio::task::spawn_blocking({
            let reader = reader.clone();
            move || {
                let ctx = pcsc::Context::establish(pcsc::Scope::User).ok()?;
                let c = ctx
                    .connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
                    .ok()?;
                let _ = c.disconnect(pcsc::Disposition::LeaveCard);
                Some(())
            }
        })
        .await
        .unwrap();
        if r.is_some() == present {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "pcscd did not see the security card {}",
        if present { "arrive" } else { "leave" }
    );
}

/// pcscd with the PSAM reader; `false`: skipped (PURSELINK_SKIP_PCSC=1). Anything missing
/// fails the test, saying what to do.
fn require_psam_reader(test: &str) -> bool {
    if std::env::var("PURSELINK_SKIP_PCSC").as_deref() == Ok("1") {
        eprintln!("{test}: SKIPPED because PURSELINK_SKIP_PCSC=1");
        return false;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/start-pcscd.sh");
    let out = std::process::Command::new("sh")
        .arg(&script)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{test}: pcscd: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("pcscd context");
    let names: Vec<String> = ctx
        .list_readers_owned()
        .unwrap_or_default()
        .iter()
        .map(|n| n.to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().any(|n| n == READER),
        "{test}: pcscd does not list {READER:?} (it lists {names:?}): run scripts/system-setup.sh as root, which adds it and restarts pcscd"
    );
    true
}

/// Exclusive use of the PSAM reader across test processes.
async fn lock_reader() -> vpcd::VpcdPortLock {
    tokio::task::spawn_blocking(|| vpcd::VpcdPortLock::acquire(PORT).unwrap())
        .await
        .unwrap()
}

/// The security card file, personalised with the demo's purchase keys (`config` is the
/// demo's headend.toml).
fn make_psam(config_file: &Path, config: &str, dir: &Path) -> PathBuf {
    let v: toml::Value = toml::from_str(config).unwrap();
    let keys = config_file
        .parent()
        .unwrap()
        .join(v["payment"]["purchase_keys"].as_str().unwrap());
    let text = std::fs::read_to_string(&keys).unwrap();
    let keys: proto::purse::AnyMasterKeyFile = toml::from_str(&text).unwrap();
    let mut keys = keys.into_generations();
    let file = dir.join("psam.plsc");
    VirtualPsam::create(&file, PSAM_ID, keys.clone()).unwrap();
    // Its twin personalised with wrong keys: the high bit of each master's first byte
    // flipped (a key bit, not a DES parity bit).
    for k in &mut keys.keys {
        let first = u8::from_str_radix(&k.master[..1], 16).unwrap() ^ 0x8;
        k.master.replace_range(..1, &format!("{first:X}"));
    }
    VirtualPsam::create(&file.with_file_name(WRONG_KEYS), PSAM_ID, keys).unwrap();
    file
}

/// The file of the security card with the wrong keys, beside the right one.
const WRONG_KEYS: &str = "wrong-keys.plsc";

/// `headend.toml` with the terminals `list` (TOML array) in place of the software count.
fn with_terminals(config: &str, list: &str) -> String {
    config.replace("security_cards = 4", &format!("security_cards = {list}"))
}

const PCSC_ONLY: &str =
    r#"[{ kind = "pcsc", id = 0x5A110001, reader = "Purselink PSAM 00 00", timeout_ms = 3000 }]"#;
const PCSC_THEN_SOFTWARE: &str = r#"[{ kind = "pcsc", id = 0x5A110001, reader = "Purselink PSAM 00 00", timeout_ms = 3000 }, { kind = "software", id = 0x5A110002 }]"#;

/// Starts a head end whose terminals are `list`, the security card served first.
async fn start_with_psam(
    embodiment: &str,
    list: &'static str,
    fault: Fault,
) -> (HeadEnd, Served, tempfile::TempDir) {
    start_with_psam_edited(embodiment, list, fault, |_, t| t.to_string()).await
}

/// [`start_with_psam`] with `edit` applied to the config first.
async fn start_with_psam_edited(
    embodiment: &str,
    list: &'static str,
    fault: Fault,
    edit: impl FnOnce(&Path, &str) -> String,
) -> (HeadEnd, Served, tempfile::TempDir) {
    let psam_dir = tempfile::tempdir().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let file = Arc::new(Mutex::new(None));
    let (f2, d2) = (file.clone(), psam_dir.path().to_path_buf());
    let he = start_prepared(Backend::Sqlite, options(embodiment, true), move |c, t| {
        *f2.lock().unwrap() = Some(make_psam(c, t, &d2));
        with_terminals(&edit(c, t), list)
    })
    .await
    .unwrap();
    let file = file.lock().unwrap().clone().unwrap();
    // Served after the head end started: its terminal starts out of the pool and comes
    // back when the sweep finds it answering.
    let served = Served::start(&file, fault, seen).await;
    (he, served, psam_dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fig4_to_7_purchases_with_the_security_card_in_a_pcsc_reader() {
    if !require_psam_reader("fig4_to_7_purchases_with_the_security_card_in_a_pcsc_reader") {
        return;
    }
    let _lock = lock_reader().await;
    for embodiment in ["security-card", "payment-server", "gateway", "merchant"] {
        let (he, served, _dir) = start_with_psam(embodiment, PCSC_ONLY, no_fault()).await;
        let payment = he.running.payment.as_ref().unwrap();
        // The terminal answered at start or comes back within a sweep.
        assert!(
            eventually(|| payment.pool().down().is_empty()).await,
            "{embodiment}: terminal in the pool: {:?}",
            payment.pool().down()
        );
        let mut b = TestBox::new(&he, "box-000001", 10_000).await;
        let (offer, answer) = b.buy("CABLE", "ppv-1001").await;
        let txid = offer.transaction_id.clone();
        let Message::Receipt(r) = answer else {
            panic!("{embodiment}: expected a receipt, got {answer:?}")
        };
        assert!(r.released, "{embodiment}: released");
        let price = 10_000 - b.balance();
        assert!(price > 0, "{embodiment}: card debited");
        assert!(
            eventually(|| payment
                .txn(&txid)
                .is_some_and(|t| t.state == PayState::Completed))
            .await,
            "{embodiment}: completed"
        );
        let t = payment.txn(&txid).unwrap();
        assert_eq!(
            t.security_card_id, PSAM_ID,
            "{embodiment}: the PC/SC terminal issued it"
        );
        let n = t.security_card_txn;
        // The security card's own totals (its file): the sale counted once.
        let s = served.status();
        let eur = s
            .totals
            .get(&proto::money::Currency::EUR)
            .copied()
            .unwrap_or_default();
        assert_eq!(
            (eur.count, eur.amount),
            (1, price),
            "{embodiment}: card totals"
        );

        // The card's APDU trace: the [0093] replay — the purse card's ATR, then its
        // INITIALIZE response — in that order, then only what the embodiment asks.
        let seen = served.seen();
        let at = seen
            .iter()
            .position(|s| s.ins == psam::INS_CARD_ATR)
            .unwrap_or_else(|| panic!("{embodiment}: no CARD ATR in {seen:?}"));
        assert_eq!(
            seen[at].data,
            proto::card::CARD_ATR,
            "{embodiment}: the purse card's ATR replayed"
        );
        assert_eq!(
            seen[at + 1].ins,
            psam::INS_INITIALIZE,
            "{embodiment}: INITIALIZE right after the ATR"
        );
        assert_eq!(seen[at + 1].sw, 0x9000);
        let after: Vec<u8> = seen[at + 2..]
            .iter()
            .filter(|s| s.txn() == Some(n))
            .map(|s| s.ins)
            .collect();
        match embodiment {
            // FIG. 5 ([0097]): the payment server compares; the card hears nothing more.
            "payment-server" => assert_eq!(
                after,
                Vec::<u8>::new(),
                "FIG. 5: no APDU after the debit command"
            ),
            // FIG. 4 compares in the card; FIG. 6/7's notification reaches it.
            _ => assert_eq!(
                after,
                vec![psam::INS_DEBIT_RESPONSE, psam::INS_FORGET],
                "{embodiment}: the card's commands after INITIALIZE"
            ),
        }
        he.running.stop().await;
        drop(served);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_detached_reader_reverses_takes_the_terminal_out_and_the_next_draw_uses_another() {
    if !require_psam_reader("a_detached_reader_reverses") {
        return;
    }
    let _lock = lock_reader().await;
    let (he, mut served, _dir) =
        start_with_psam("security-card", PCSC_THEN_SOFTWARE, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    // FIG. 4: the debit command comes from the PC/SC terminal (slot 0, the first free).
    let offer = b.offer("CABLE", "ppv-1001").await;
    let txid = offer.transaction_id.clone();
    let draw = b.draw_request(&offer);
    let answer = b.call(&Message::DrawRequest(draw)).await;
    let cmd = TestBox::open_debit_command(&offer, &answer);
    assert_eq!(cmd.security_card_id, PSAM_ID);
    // The reader goes dead mid-transaction: the card is pulled from it.
    served.detach().await;
    let resp = b.debit(&offer, &cmd);
    let paid = b.balance();
    assert!(paid < 10_000, "the purse card did debit");
    let answer = b.call(&Message::DebitResponse(resp.clone())).await;
    assert!(
        matches!(&answer, Message::Error(e) if e.code == ErrorCode::Busy),
        "the terminal cannot check the signature: {answer:?}"
    );
    // Reversed here, the terminal out of the pool, and `headend status` says so.
    assert_eq!(payment.txn(&txid).unwrap().state, PayState::Reversed);
    assert_eq!(payment.pool().down().len(), 1);
    assert_eq!(payment.pool().down()[0].0, 0);
    payment.sync_terminals();
    let report = headend::status::report(&he.cfg.state_dir).unwrap();
    assert!(
        report.contains("terminal 0 (security card 0x5A110001) DOWN"),
        "status lists the dead terminal:\n{report}"
    );
    assert!(
        report.contains("security cards owe 1 reversals"),
        "the card's own reversal is owed until it answers:\n{report}"
    );

    // The next draw uses the other terminal.
    let mut b2 = TestBox::new(&he, "box-000002", 5_000).await;
    let (offer2, answer2) = b2.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer2, Message::Receipt(ref r) if r.released),
        "{answer2:?}"
    );
    let t2 = payment.txn(&offer2.transaction_id).unwrap();
    assert_eq!((t2.slot, t2.security_card_id), (1, SOFT_ID));

    // The card goes back in: the sweep finds it, it does the reversal it owed, and the
    // box's late proof of the debit is counted then (no value lost).
    let served = Served::start(&served.file.clone(), no_fault(), served.seen.clone()).await;
    assert!(
        eventually(|| payment.pool().down().is_empty()).await,
        "the terminal comes back: {:?}",
        payment.pool().down()
    );
    // Back in the pool, it does the reversal it owed first; `headend status` clears.
    let dir = he.cfg.state_dir.clone();
    assert!(
        eventually(|| {
            let r = headend::status::report(&dir).unwrap();
            !r.contains("DOWN") && !r.contains("owe")
        })
        .await,
        "{}",
        headend::status::report(&dir).unwrap()
    );
    // The debit the card did make is proved by its response — which the gateway journaled
    // and asks the payment server with again in the background, as the box does on its
    // retry — and counted then: no value lost, counted once.
    let answer = b.call(&Message::DebitResponse(resp)).await;
    assert!(
        eventually(|| payment
            .txn(&txid)
            .is_some_and(|t| t.state == PayState::Completed))
        .await,
        "the proved debit is counted: {answer:?}"
    );
    let s = served.status();
    let eur = s
        .totals
        .get(&proto::money::Currency::EUR)
        .copied()
        .unwrap_or_default();
    assert_eq!(
        (eur.count, eur.amount),
        (1, 10_000 - paid),
        "the card counted the proved debit once"
    );
    he.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_card_answering_garbage_is_taken_out_and_nothing_is_debited() {
    if !require_psam_reader("a_security_card_answering_garbage") {
        return;
    }
    let _lock = lock_reader().await;
    let fault = no_fault();
    let (he, served, _dir) =
        start_with_psam("payment-server", PCSC_THEN_SOFTWARE, fault.clone()).await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    fault.store(GARBAGE, std::sync::atomic::Ordering::SeqCst);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    // The draw meets the garbage at the PC/SC terminal, which leaves the pool with the
    // reason, and goes to the software one: the viewer buys as usual.
    let (offer, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    let price = 10_000 - b.balance();
    let t = payment.txn(&offer.transaction_id).unwrap();
    assert_eq!(t.security_card_id, SOFT_ID);
    let down = payment.pool().down();
    assert_eq!(down.len(), 1, "{down:?}");
    assert!(
        down[0].1.contains("does not answer the draw") && down[0].1.contains("DEADBEEF"),
        "the operator's message names what it answered: {}",
        down[0].1
    );
    payment.sync_terminals();
    let report = headend::status::report(&he.cfg.state_dir).unwrap();
    assert!(report.contains("DOWN"), "{report}");
    // The security card did number (and, FIG. 5, count) the transaction whose answer was
    // garbage: it owes a reversal nobody journaled. Repaired, it answers the sweep's
    // probe, the terminal comes back, and that transaction is reversed in it first.
    let s = served.status();
    assert_eq!(
        (s.txn_counter, s.totals[&proto::money::Currency::EUR].count),
        (1, 1)
    );
    fault.store(0, std::sync::atomic::Ordering::SeqCst);
    assert!(
        eventually(|| payment.pool().down().is_empty()).await,
        "repaired, the terminal comes back: {:?}",
        payment.pool().down()
    );
    let s = served.status();
    let eur = s
        .totals
        .get(&proto::money::Currency::EUR)
        .copied()
        .unwrap_or_default();
    assert_eq!(
        (s.txn_counter, eur.count, eur.amount),
        (1, 0, 0),
        "the unanswered draw reversed in the card"
    );
    assert!(price > 0);
    he.running.stop().await;
}

/// Sends the security card in the PSAM reader the INITIALIZE of a draw (`txid`, for the
/// card whose fresh INITIALIZE answer is `init`) straight through pcscd, as a payment
/// server that died before journaling it did; every answer must be `9000`.
async fn initialize_directly(txid: &str, init: proto::purse::PurchaseInit) {
    let draw = proto::security_card::DrawData {
        merchant_id: "CABLE".into(),
        transaction_id: txid.into(),
        amount: proto::money::Money::new(100, proto::money::Currency::EUR),
        init,
    };
    let init = psam::commands::initialize(&draw, headend::payment::today(), true).unwrap();
    let answers = tokio::task::spawn_blocking(move || {
        let ctx = pcsc::Context::establish(pcsc::Scope::User).unwrap();
        let reader = std::ffi::CString::new(READER).unwrap();
        let card = ctx
            .connect(&reader, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
            .unwrap();
        let mut out = Vec::new();
        for apdu in [
            psam::commands::select(),
            psam::commands::card_atr(&proto::card::CARD_ATR),
            init,
        ] {
            let mut buf = [0u8; 300];
            out.push(card.transmit(&apdu, &mut buf).unwrap().to_vec());
        }
        let _ = card.disconnect(pcsc::Disposition::LeaveCard);
        out
    })
    .await
    .unwrap();
    assert!(
        answers.iter().all(|a| a.ends_with(&[0x90, 0x00])),
        "{answers:02X?}"
    );
}

/// Bad input from the security card: a debit command whose signature is wrong. The card
/// refuses the DEBIT (`6982`) and nothing moves; the box cancels naming that status word,
/// with its proof; the payment server reverses, and `headend status` counts the refusal
/// against the terminal that signed — not taking it out on a box's word.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_mac_from_the_security_card_is_reversed_and_counted_against_its_terminal() {
    if !require_psam_reader("a_wrong_mac_from_the_security_card") {
        return;
    }
    let _lock = lock_reader().await;
    let fault = no_fault();
    let (he, served, _dir) = start_with_psam("security-card", PCSC_ONLY, fault.clone()).await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    fault.store(WRONG_MAC, std::sync::atomic::Ordering::SeqCst);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    let offer = b.offer("CABLE", "ppv-1001").await;
    let txid = offer.transaction_id.clone();
    let draw = b.draw_request(&offer);
    let answer = b.call(&Message::DrawRequest(draw)).await;
    let cmd = TestBox::open_debit_command(&offer, &answer);
    assert_eq!(cmd.security_card_id, PSAM_ID);
    let r = b.apdu(&proto::card::commands::debit(&cmd));
    assert_eq!(
        r.sw,
        proto::apdu::StatusWord::BAD_SIGNATURE,
        "the card checks the security card's signature"
    );
    assert_eq!(b.balance(), 10_000, "nothing debited");
    let cancel = Message::Cancel(CancelMsg {
        transaction_id: txid.clone(),
        reason: CancelReason::DebitRefused { sw: r.sw },
        proof: Some(b.proof()),
    });
    let answer = b.call(&cancel).await;
    assert!(
        matches!(&answer, Message::Receipt(r) if !r.released),
        "{answer:?}"
    );
    assert_eq!(payment.txn(&txid).unwrap().state, PayState::Reversed);
    // A retried cancel is answered the same (once the gateway has settled the first) and
    // counted once.
    let mut again = b.call(&cancel).await;
    for _ in 0..50 {
        if !matches!(&again, Message::Error(e) if e.code == ErrorCode::Busy) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = b.call(&cancel).await;
    }
    assert!(
        matches!(&again, Message::Receipt(r) if !r.released),
        "{again:?}"
    );
    let report = headend::status::report(&he.cfg.state_dir).unwrap();
    assert!(
        report.contains(
            "terminal 0 (security card 0x5A110001): cards refused 1 of its debit commands (6982"
        ) && report.contains(&txid)
            && report.contains("check its keys"),
        "the operator sees which terminal's signature failed:\n{report}"
    );
    assert!(
        payment.pool().down().is_empty(),
        "a box's word alone takes no terminal out"
    );
    // Repaired, the same terminal sells; its card counted no sale for the reversed one.
    fault.store(0, std::sync::atomic::Ordering::SeqCst);
    let (offer2, answer2) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer2, Message::Receipt(ref r) if r.released),
        "{answer2:?}"
    );
    let price = 10_000 - b.balance();
    assert_eq!(
        payment
            .txn(&offer2.transaction_id)
            .unwrap()
            .security_card_id,
        PSAM_ID
    );
    let eur = served.status().totals[&proto::money::Currency::EUR];
    assert_eq!(
        (eur.count, eur.amount),
        (1, price),
        "one sale, the paid one"
    );
    he.running.stop().await;
}

/// A security card personalised with the wrong purchase keys verifies no genuine card
/// (B6). The payment server asks another terminal to verify the same INITIALIZE; that one
/// accepts it, so the first leaves the pool — for good, however well it answers probes —
/// and the viewer buys as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_card_with_the_wrong_keys_is_found_out_by_a_second_terminal() {
    if !require_psam_reader("a_security_card_with_the_wrong_keys") {
        return;
    }
    let _lock = lock_reader().await;
    let (he, served, _dir) =
        start_with_psam("payment-server", PCSC_THEN_SOFTWARE, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    // The card in the reader now: same id, keys of another issuer.
    let mut served = served;
    served.detach().await;
    let wrong = served.file.with_file_name(WRONG_KEYS);
    let served = Served::start(&wrong, no_fault(), served.seen.clone()).await;
    assert!(
        eventually(|| payment.pool().down().is_empty()).await,
        "{:?}",
        payment.pool().down()
    );
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    // The first disagreement takes it out until it answers (it might have been a glitch);
    // the second in a row, for good.
    for (round, reason) in [
        (1, "1 of 2 in a row"),
        (
            2,
            "2 draws in a row: its purchase keys are not the issuer's",
        ),
    ] {
        assert!(
            eventually(|| payment.pool().down().is_empty()).await,
            "round {round}: {:?}",
            payment.pool().down()
        );
        let (offer, answer) = b.buy("CABLE", "ppv-1001").await;
        assert!(
            matches!(answer, Message::Receipt(ref r) if r.released),
            "the viewer buys as usual: {answer:?}"
        );
        let t = payment.txn(&offer.transaction_id).unwrap();
        assert_eq!((t.slot, t.security_card_id), (1, SOFT_ID));
        let down = payment.pool().down();
        if round == 1 {
            // Out until the sweep's probe brings it back (maybe already): never for good.
            assert!(
                down.iter()
                    .all(|(slot, why)| *slot == 0 && why.contains(reason)),
                "round 1: {down:?}"
            );
        } else {
            assert!(
                down.len() == 1 && down[0].0 == 0 && down[0].1.contains(reason),
                "round {round}: {down:?}"
            );
        }
    }
    // It answers every probe, and still stays out.
    for _ in 0..3 {
        payment.sweep().await;
    }
    assert_eq!(payment.pool().down().len(), 1);
    let report = headend::status::report(&he.cfg.state_dir).unwrap();
    assert!(
        report.contains("terminal 0 (security card 0x5A110001) DOWN")
            && report.contains("purchase keys are not the issuer's"),
        "{report}"
    );
    // The wrong-keys card numbered nothing.
    assert_eq!(served.status().txn_counter, 0);
    he.running.stop().await;
}

/// A crash between the security card's INITIALIZE and the payment server's journal write
/// leaves a transaction the card numbered (and, early release, counted) that no journal
/// knows. Played here by sending that INITIALIZE to the card directly, as the dead payment
/// server did; at restart the terminal reverses it in the card before anything else.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_the_card_numbered_but_no_journal_knows_is_reversed_at_restart() {
    if !require_psam_reader("a_transaction_the_card_numbered_but_no_journal_knows") {
        return;
    }
    let _lock = lock_reader().await;
    let (mut he, served, _dir) = start_with_psam("payment-server", PCSC_ONLY, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap().clone();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    let (offer, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    let price = 10_000 - b.balance();
    drop(payment);
    he.running.stop().await;

    // The INITIALIZE of a draw whose journal write never happened.
    initialize_directly("never-journaled", b.proof()).await;
    let s = served.status();
    let eur = s.totals[&proto::money::Currency::EUR];
    assert_eq!(
        (s.txn_counter, eur.count),
        (2, 2),
        "the card counted the orphan"
    );

    // Restart: the terminal finds transaction 2 past everything journaled and reverses it.
    he.running = headend::assembly::start(&he.cfg, headend::assembly::Roles::ALL)
        .await
        .unwrap();
    let s = served.status();
    let eur = s.totals[&proto::money::Currency::EUR];
    assert_eq!(
        (s.txn_counter, eur.count, eur.amount),
        (2, 1, price),
        "only the journaled sale stays counted"
    );
    let payment = he.running.payment.as_ref().unwrap();
    assert_eq!(
        payment.txn(&offer.transaction_id).unwrap().state,
        PayState::Completed
    );
    he.running.stop().await;
}

/// A card with the terminal's id but a counter behind the one the terminal already used (a
/// replacement, or one restored from a backup) would number transactions again that were
/// collected already: it is never used — the terminal stays out of the pool saying why, the
/// journal keeps the real card's summary (also across a restart), and the draws go to the
/// other terminal. With its own card back, the terminal returns.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_behind_the_terminal_s_counter_is_never_used() {
    if !require_psam_reader("a_card_behind_the_terminal_s_counter_is_never_used") {
        return;
    }
    let _lock = lock_reader().await;
    let (mut he, mut served, dir) =
        start_with_psam("payment-server", PCSC_THEN_SOFTWARE, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap().clone();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    let (offer, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    assert_eq!(
        payment.txn(&offer.transaction_id).unwrap().security_card_id,
        PSAM_ID
    );

    // Another card personalised with the same id, at counter 0, takes its place.
    served.detach().await;
    let keys = he.cfg.payment.as_ref().unwrap().purchase_keys.clone();
    let text = std::fs::read_to_string(&keys).unwrap();
    let keys: proto::purse::AnyMasterKeyFile = toml::from_str(&text).unwrap();
    let twin = dir.path().join("twin.plsc");
    VirtualPsam::create(&twin, PSAM_ID, keys.into_generations()).unwrap();
    let impostor = Served::start(&twin, no_fault(), Arc::new(Mutex::new(Vec::new()))).await;
    let behind = |p: &headend::payment::PaymentServer| {
        p.pool()
            .down()
            .iter()
            .any(|(slot, why)| *slot == 0 && why.contains("behind"))
    };
    assert!(
        eventually(|| behind(&payment)).await,
        "out of the pool, saying why: {:?}",
        payment.pool().down()
    );
    let (offer2, answer2) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer2, Message::Receipt(ref r) if r.released),
        "{answer2:?}"
    );
    assert_eq!(
        payment
            .txn(&offer2.transaction_id)
            .unwrap()
            .security_card_id,
        SOFT_ID
    );
    assert_eq!(impostor.status().txn_counter, 0, "nothing was sent to it");

    // A restart with that card in the reader: still out, and the journal's summary of the
    // terminal's real card stands (one sale), not the impostor's.
    drop(payment);
    he.running.stop().await;
    he.running = headend::assembly::start(&he.cfg, headend::assembly::Roles::ALL)
        .await
        .unwrap();
    let payment = he.running.payment.as_ref().unwrap().clone();
    assert!(
        eventually(|| behind(&payment)).await,
        "{:?}",
        payment.pool().down()
    );
    let report = headend::status::report(&he.cfg.state_dir).unwrap();
    assert!(
        report.contains("security cards: 2 sales"),
        "the real card's sale and the software one's:\n{report}"
    );
    assert!(
        report.contains("terminal 0 (security card 0x5A110001) DOWN"),
        "{report}"
    );

    // Its own card back: the terminal returns.
    drop(impostor);
    wait_reader(false).await;
    let served = Served::start(&served.file.clone(), no_fault(), served.seen.clone()).await;
    assert!(
        eventually(|| payment.pool().down().is_empty()).await,
        "{:?}",
        payment.pool().down()
    );
    assert_eq!(served.status().txn_counter, 1);
    he.running.stop().await;
}

/// A key rollover reaching the terminals one at a time: the security card in the reader
/// holds only version 1, the software one versions 1 and 2. A version-2 card's draw meets
/// the security card first; it cannot verify that version, so another terminal is asked,
/// serves it — and the security card stays in the pool (it is behind, not wrong).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_card_without_the_card_s_key_version_hands_the_draw_to_one_with_it() {
    if !require_psam_reader("a_security_card_without_the_card_s_key_version") {
        return;
    }
    let _lock = lock_reader().await;
    let psam_dir = tempfile::tempdir().unwrap();
    let file = Arc::new(Mutex::new(None));
    let (f2, d2) = (file.clone(), psam_dir.path().to_path_buf());
    let v2 = proto::purse::IssuerKeys {
        key_version: 2,
        purchase_master: proto::crypto::DesKey::new([0x5C; 16]),
        load_master: proto::crypto::DesKey::new([0x6D; 16]),
    };
    let v2_master = v2.purchase_master.clone();
    let he = start_prepared(Backend::Sqlite, options("payment-server", false), move |c, t| {
        // The security card is made on version 1 alone; then the payment server's key
        // file gains version 2 (the software terminal holds both).
        *f2.lock().unwrap() = Some(make_psam(c, t, &d2));
        let v: toml::Value = toml::from_str(t).unwrap();
        let keys = c
            .parent()
            .unwrap()
            .join(v["payment"]["purchase_keys"].as_str().unwrap());
        let v1 = headend::config::load_issuer_keys(&c.parent().unwrap().join("issuer-keys.toml"))
            .unwrap();
        let text = format!(
            "[[keys]]\nkey_version = 1\nmaster = \"{}\"\n\n[[keys]]\nkey_version = 2\nmaster = \"{}\"\n",
            hex::encode_upper(v1.purchase_master.bytes()),
            hex::encode_upper(v2_master.bytes()),
        );
        proto::secret::write_private(&keys, text.as_bytes()).unwrap();
        with_terminals(t, PCSC_THEN_SOFTWARE)
    })
    .await
    .unwrap();
    let file = file.lock().unwrap().clone().unwrap();
    let served = Served::start(&file, no_fault(), Arc::new(Mutex::new(Vec::new()))).await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    b.0.card = purchase_support::wire_box::new_card(&v2, 0x0002_0001, 10_000, 100_000);
    let (offer, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "the version-2 card buys: {answer:?}"
    );
    let t = payment.txn(&offer.transaction_id).unwrap();
    assert_eq!((t.slot, t.security_card_id), (1, SOFT_ID));
    assert!(
        payment.pool().down().is_empty(),
        "the security card behind on keys stays in the pool: {:?}",
        payment.pool().down()
    );
    assert_eq!(served.status().txn_counter, 0, "it numbered nothing");
    he.running.stop().await;
}

/// A security card with a history this payment server's journal does not know (moved from
/// another server, or the journal is new): its counter when it first answers is the
/// baseline, and it is journaled at once. A number it hands out after that which no journal
/// holds (a crash mid-draw) is then reversed at the next start; the numbers before the
/// baseline are not this server's and are left alone. (The outside attack on issue 16
/// found the baseline lived only in memory: such an orphan was never reversed.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_security_card_new_to_the_journal_has_its_baseline_journaled_when_it_first_answers() {
    if !require_psam_reader("a_security_card_new_to_the_journal") {
        return;
    }
    let _lock = lock_reader().await;
    let (mut he, served, _dir) = start_with_psam("payment-server", PCSC_ONLY, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap().clone();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    // Down at start (served after it), it answered later: its baseline is journaled then,
    // before any draw.
    assert!(
        eventually(|| payment
            .journal()
            .get(headend::journal::Kind::SecurityCard, "0000")
            .unwrap()
            .is_some())
        .await,
        "the baseline of a terminal that first answers after the start"
    );
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    let (_, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    let price = 10_000 - b.balance();
    drop(payment);
    he.running.stop().await;
    // The payment server's journal starts over: the card's sale 1 is history to it.
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(he.cfg.state_dir.join(format!("payment.sqlite{suffix}")));
    }
    he.running = headend::assembly::start(&he.cfg, headend::assembly::Roles::ALL)
        .await
        .unwrap();
    he.running.stop().await;
    // A draw numbered after that first answer, never journaled: the crash.
    initialize_directly("numbered-after-the-baseline", b.proof()).await;
    let s = served.status();
    assert_eq!(
        (s.txn_counter, s.totals[&proto::money::Currency::EUR].count),
        (2, 2)
    );
    he.running = headend::assembly::start(&he.cfg, headend::assembly::Roles::ALL)
        .await
        .unwrap();
    let s = served.status();
    let eur = s.totals[&proto::money::Currency::EUR];
    assert_eq!(
        (s.txn_counter, eur.count, eur.amount),
        (2, 1, price),
        "the orphan reversed; the history before the baseline left alone"
    );
    he.running.stop().await;
}

/// `headend collect` and `ack-batch` beside the running daemon open the payment server's
/// journal only: not the daemon's readers. (Opening a PC/SC terminal reverses the numbers
/// past the journal: it would undo a draw the daemon has in flight.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_commands_send_nothing_to_the_daemon_s_security_card() {
    if !require_psam_reader("offline_commands_send_nothing") {
        return;
    }
    let _lock = lock_reader().await;
    let (he, served, _dir) = start_with_psam("payment-server", PCSC_ONLY, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap().clone();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    let (_, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    // The sweep probes the idle terminal every other second: the offline command's own
    // commands would be GET STATUS/SELECT too, so count the ones with another effect.
    let seen_before: Vec<u8> = served
        .seen()
        .iter()
        .filter(|s| s.ins != psam::INS_GET_STATUS)
        .map(|s| s.ins)
        .collect();
    let offline = headend::payment::PaymentServer::open_offline(&he.cfg).unwrap();
    let batch = offline.close_batch().unwrap().expect("a batch to collect");
    assert_eq!(batch.records.len(), 1);
    drop(offline);
    let seen_after: Vec<u8> = served
        .seen()
        .iter()
        .filter(|s| s.ins != psam::INS_GET_STATUS)
        .map(|s| s.ins)
        .collect();
    assert_eq!(
        seen_after, seen_before,
        "the offline command sent the security card nothing but the daemon's probes"
    );
    he.running.stop().await;
}

/// 002 FIG. 16 and points with the security card in a PC/SC reader: the PSAM verifies an
/// authentication and counts nothing (its own totals), and redeems 20,000 of a card's
/// 30,000 points under the points purse's keys, counted in points.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_authentication_and_a_points_redemption_through_the_pcsc_security_card() {
    if !require_psam_reader(
        "an_authentication_and_a_points_redemption_through_the_pcsc_security_card",
    ) {
        return;
    }
    let _lock = lock_reader().await;
    let (he, served, _dir) =
        start_with_psam_edited("security-card", PCSC_ONLY, no_fault(), |c, t| {
            with_benefits_server(c, t, "security-card")
        })
        .await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    b.0.card.state.points = 30_000;
    let (offer, answer) = b.buy("M-MILES", "lounge").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    assert_eq!(
        payment.txn(&offer.transaction_id).unwrap().security_card_id,
        PSAM_ID
    );
    let (_, answer) = b.buy("M-MILES", "ticket").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    let card = &b.0.card.state;
    assert_eq!((card.balance, card.points, card.atc), (10_000, 10_000, 2));
    // The security card's own file: the points counted, the authentication nowhere.
    let s = served.status();
    let points = s.totals.get(&proto::money::Currency::POINTS).copied();
    assert_eq!(points.map(|t| (t.count, t.amount)), Some((1, 20_000)));
    assert!(
        !s.totals
            .contains_key(&proto::money::Currency::AUTHENTICATION),
        "{:?}",
        s.totals
    );
    he.running.stop().await;
    drop(served);
}

/// Issue 17: a refund through the security card in its PC/SC reader — INITIALIZE CREDIT
/// issues the credit command and counts the refund off the card's own totals, CREDIT
/// RESPONSE completes it; a refund the card proves it never ran is counted back (REVERSE
/// CREDIT), and the card's totals in its own file agree at each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_through_the_pcsc_security_card() {
    if !require_psam_reader("a_refund_through_the_pcsc_security_card") {
        return;
    }
    let _lock = lock_reader().await;
    let (he, served, _dir) = start_with_psam("security-card", PCSC_ONLY, no_fault()).await;
    let payment = he.running.payment.as_ref().unwrap();
    assert!(eventually(|| payment.pool().down().is_empty()).await);
    let mut b = TestBox::new(&he, "box-000001", 10_000).await;
    let (one, answer) = b.buy("CABLE", "ppv-1001").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    let (two, answer) = b.buy("CABLE", "ppv-1002").await;
    assert!(
        matches!(answer, Message::Receipt(ref r) if r.released),
        "{answer:?}"
    );
    let eur = proto::money::Currency::EUR;
    let sold = one.amount.minor + two.amount.minor;
    assert_eq!(served.status().totals[&eur].amount, sold);
    let paid = b.balance();

    // Refund one: the command is lost, the card proves it never ran it: counted back.
    headend::payment::refund::authorize(payment, &one.transaction_id, None).unwrap();
    let req = b.0.refund_request(&one.transaction_id).unwrap();
    let lost = b.call(&Message::RefundRequest(req)).await;
    assert!(matches!(lost, Message::RefundCommand(_)), "{lost:?}");
    assert_eq!(served.status().totals[&eur].amount, sold - one.amount.minor);
    let proof = b.proof();
    let back = b
        .call(&Message::RefundProof(RefundProofMsg {
            transaction_id: one.transaction_id.clone(),
            proof,
        }))
        .await;
    assert!(
        matches!(back, Message::Receipt(ref r) if !r.released),
        "{back:?}"
    );
    assert_eq!(served.status().totals[&eur].amount, sold);
    // Then it runs: credited once, counted off once.
    let done = b.0.refund(&one.transaction_id).await.unwrap();
    assert!(
        matches!(done, Message::Receipt(ref r) if r.released),
        "{done:?}"
    );
    assert_eq!(b.balance(), paid + one.amount.minor);
    assert_eq!(served.status().totals[&eur].amount, sold - one.amount.minor);
    assert_eq!(
        payment
            .refund(&one.transaction_id)
            .unwrap()
            .security_card_id,
        PSAM_ID
    );
    he.running.stop().await;
    drop(served);
}
