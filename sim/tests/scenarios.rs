//! Issue 11 ("value integrity under faults"), scenarios 2 and 4 with real processes: a split
//! head end (gateway, payment, merchant, bank and load each a `headend <role>` process of its
//! own, QUIC between them: `sim::deploy`), real `stbd` boxes (virtual card files, the TV UI
//! in tmux, the local app API: `sim::stbd`), faults by SIGSTOP/SIGCONT of role processes and
//! SIGKILL of stbd. Each test ends by stopping every process and running the audit from the
//! raw journals and card files (`sim::audit`), which must hold.
//!
//! - scenario 2: the payment role stopped; purchase A (3.99) drawn, stbd SIGKILLed once A's
//!   draw is journaled and before any debit command can reach it; the payment role back;
//!   purchase B (4.99) on the same card debits with A's transaction counter; box 1 restarts.
//!   A must be cancelled with the card's proof (never matched to B's debit by counter), B
//!   completed and released once. Box 1 itself makes a new purchase wait while an older one
//!   on the card is in doubt and resolvable, so B debits before box 1 resolves A only when
//!   the viewer takes the card to another box ([`BOn::OtherBox`], the card file moved there
//!   and back); [`BOn::SameBox`] makes B on box 1 as soon as it is back. Both must end alike.
//! - scenario 4: with stbd and its gateway connection up throughout (same process, one
//!   connection, the gateway never restarted), the payment role (a FIG. 4 purchase), the load
//!   server or the bank (a bank load) stopped long enough for the transaction to go in doubt;
//!   the TV answers the remote meanwhile; after SIGCONT stbd's recovery timer alone settles
//!   it, and no bank hold stays open. A payment outage at the draw does not leave a purchase
//!   in doubt (the gateway answers Busy within its call deadline, before the box's own, and
//!   the box ends the purchase: no debit command, nothing to settle), so the purchase is
//!   held by the test hook after the card paid (`STBD_TEST_HOOK_RELEASE`), the payment role
//!   stopped, and released: its debit response meets the stopped payment server.
//!
//! - two gateways on one PostgreSQL (issue 15): the gateways journal in one shared schema,
//!   the box lists both; gateway A is frozen by its test hook in the middle of a purchase
//!   (holding the transaction's lock), then SIGKILLed; the box fails over to gateway B,
//!   which finds the transaction in the shared journal and completes it exactly once.
//!
//! `PURSELINK_SCENARIOS_KEEP=1` keeps a failed test's directory (journals, cards, logs); the
//! tails of the logs are printed on any failure.

use std::io::{BufRead, BufReader, ErrorKind as IoErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use headend::funds::{Hold, HoldState};
use headend::gateway::GwTxn;
use headend::gateway::load::GwLoad;
use headend::load::{LoadRec, LoadState};
use headend::payment::{PayState, PayTxn};
use proto::money::Currency;
use proto::security_card::SecurityCard;
use reader_drivers::vcard::VirtualCard;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use sim::audit::{AuditReport, Sources, audit};
use sim::bins::Bins;
use sim::deploy::{self, HeadEnd, ItemSpec, Layout, RoleName, Spec};
use sim::stbd::{Histories, StbBox, Tmux, home};

#[path = "../../headend/tests/pg_rig/mod.rs"]
mod pg_rig;
use ui::model::ErrorKind;

// ------------------------------------------------------------------------------ the world

/// A split head end, stbd boxes in a private tmux server, a temporary directory. Dropping it
/// continues any stopped role, kills the boxes and the roles and removes the directory (kept
/// on a failure with `PURSELINK_SCENARIOS_KEEP=1`; the log tails are printed on a failure).
struct World {
    name: &'static str,
    t0: Instant,
    layout: Layout,
    he: Option<HeadEnd>,
    tmux: Option<Tmux>,
    boxes: Vec<StbBox>,
    dir: Option<tempfile::TempDir>,
}

impl World {
    fn new(name: &'static str, spec: Spec) -> Self {
        let ok = std::process::Command::new("tmux")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            ok,
            "tmux is needed for the stbd boxes' TV (apt-get install tmux)"
        );
        let bins = Bins::locate().expect("headend and stbd binaries");
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("purselink-{name}-"))
            .tempdir()
            .expect("temporary directory");
        let layout = deploy::generate(dir.path(), &spec).expect("split deployment");
        let he = HeadEnd::start(&layout, &bins.headend).expect("five role processes ready");
        let tmux = Tmux::new(name, dir.path()).expect("tmux");
        let boxes = layout
            .stbd_boxes
            .iter()
            .map(|s| StbBox::prepare(&layout, s, &bins.stbd).expect("stbd box"))
            .collect();
        let w = Self {
            name,
            t0,
            layout,
            he: Some(he),
            tmux: Some(tmux),
            boxes,
            dir: Some(dir),
        };
        w.say("split head end up: gateway, payment, merchant, bank, load (one process each)");
        w
    }

    fn say(&self, s: impl AsRef<str>) {
        eprintln!(
            "{} [{:>6.2}s] {}",
            self.name,
            self.t0.elapsed().as_secs_f64(),
            s.as_ref()
        );
    }

    fn tmux(&self) -> &Tmux {
        self.tmux.as_ref().expect("tmux")
    }

    fn he(&mut self) -> &mut HeadEnd {
        self.he.as_mut().expect("head end")
    }

    fn role_pid(&mut self, r: RoleName) -> i32 {
        self.he().role(r).pid().expect("role running")
    }

    fn stop_role(&mut self, r: RoleName) -> Instant {
        let pid = self.role_pid(r);
        signal(pid, libc::SIGSTOP);
        self.say(format!("SIGSTOP {r} (pid {pid})"));
        Instant::now()
    }

    fn continue_role(&mut self, r: RoleName) -> Instant {
        let pid = self.role_pid(r);
        signal(pid, libc::SIGCONT);
        self.say(format!("SIGCONT {r} (pid {pid})"));
        Instant::now()
    }

    /// Starts box `i` in its pane (with extra environment for stbd) and waits for its home
    /// screen; the stbd process id.
    fn start_box(&self, i: usize, env: &[(&str, &str)]) -> i32 {
        let b = &self.boxes[i];
        b.start_with(self.tmux(), &b.command_with_env(env))
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = self.stbd_pid(i).expect("stbd running in its pane");
        self.say(format!("{} up (stbd pid {pid})", b.spec.box_id));
        pid
    }

    /// Runs box `i` again in its pane (stbd resolves its journal at start).
    fn restart_box(&self, i: usize) -> i32 {
        let b = &self.boxes[i];
        self.tmux()
            .respawn(b.session(), &b.command())
            .unwrap_or_else(|e| panic!("{e}"));
        b.wait_home(self.tmux(), Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("{e}"));
        let pid = self.stbd_pid(i).expect("stbd running in its pane");
        self.say(format!("{} restarted (stbd pid {pid})", b.spec.box_id));
        pid
    }

    /// The pane's process, if it is stbd (the pane's script execs it).
    fn stbd_pid(&self, i: usize) -> Option<i32> {
        let s = self.boxes[i].session();
        if self.tmux().pane_dead(s) {
            return None;
        }
        let pid = self.tmux().pane_pid(s)?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        (comm.trim() == "stbd").then_some(pid)
    }

    /// Signals box `i`'s stbd and waits until its pane is dead.
    fn end_box(&self, i: usize, sig: libc::c_int) {
        let s = self.boxes[i].session();
        let pid = self
            .stbd_pid(i)
            .unwrap_or_else(|| panic!("{s}: stbd is not running"));
        signal(pid, sig);
        let dead = poll(Duration::from_secs(15), Duration::from_millis(20), || {
            self.tmux().pane_dead(s).then_some(())
        });
        assert!(
            dead.is_some(),
            "{s}: stbd {pid} still alive after signal {sig}"
        );
        self.say(format!(
            "{s}: stbd {pid} {}",
            if sig == libc::SIGKILL {
                "SIGKILLed"
            } else {
                "stopped"
            }
        ));
    }

    fn sources(&self, cards: &[PathBuf], as_of: Option<SystemTime>) -> Sources {
        Sources {
            gateway: self.layout.journal(RoleName::Gateway),
            gateway_postgres: self.layout.gateway_journal.clone(),
            payment: self.layout.journal(RoleName::Payment),
            merchant: self.layout.journal(RoleName::Merchant),
            bank: self.layout.journal(RoleName::Bank),
            load: self.layout.journal(RoleName::Load),
            boxes: self
                .boxes
                .iter()
                .map(|b| (b.spec.box_id.clone(), b.journal()))
                .collect(),
            cards: cards.to_vec(),
            sim_pending: None,
            role_configs: self.layout.configs.values().cloned().collect(),
            as_of,
        }
    }

    /// Waits until nothing is open anywhere (as the audit sees it, head end running).
    fn settle(&self, cards: &[PathBuf], limit: Duration) -> Duration {
        let t = Instant::now();
        let mut last = Vec::new();
        let done = poll(limit, Duration::from_millis(500), || {
            match audit(&self.sources(cards, None)) {
                Ok(r) if r.open.is_empty() => Some(()),
                Ok(r) => {
                    last = r.open;
                    None
                }
                Err(e) => {
                    last = vec![sim::audit::Open {
                        ledger: "audit".into(),
                        txid: String::new(),
                        state: e.to_string(),
                    }];
                    None
                }
            }
        });
        if done.is_none() {
            self.say(format!("still open after {limit:?}: {last:?}"));
        } else {
            self.say(format!(
                "nothing open anywhere after {:.2} s",
                t.elapsed().as_secs_f64()
            ));
        }
        t.elapsed()
    }

    /// Stops every stbd (SIGTERM) and every role, then audits the journals and `cards`
    /// (their log histories as seen now, with their opening balances).
    fn finish(&mut self, cards: &[(PathBuf, u64)]) -> AuditReport {
        for i in 0..self.boxes.len() {
            if self.stbd_pid(i).is_some() {
                self.end_box(i, libc::SIGTERM);
            }
        }
        let h = Histories::default();
        let files: Vec<PathBuf> = cards.iter().map(|(c, _)| c.clone()).collect();
        for (c, opening) in cards {
            h.opening(c, *opening);
        }
        h.sample(&files);
        h.write().expect("card history sidecars");
        let stopped_at = SystemTime::now();
        for r in RoleName::ALL {
            // A role a test SIGKILLed (a failed-over gateway) is not there to continue.
            if let Some(pid) = self.he().role(r).pid() {
                signal(pid, libc::SIGCONT);
            }
        }
        self.he().stop();
        let report = audit(&self.sources(&files, Some(stopped_at))).expect("the audit ran");
        self.say(format!("audit:\n{report}"));
        report
    }

    fn dump_logs(&self) {
        let Some(dir) = &self.dir else { return };
        let mut logs: Vec<PathBuf> = self.boxes.iter().map(|b| b.log.clone()).collect();
        for r in RoleName::ALL {
            logs.push(dir.path().join("logs").join(format!("{r}.log")));
        }
        for g in &self.layout.more_gateways {
            logs.push(dir.path().join("logs").join(format!("{}.log", g.name)));
        }
        for l in logs {
            eprintln!("----- {} (last 40 lines)\n{}", l.display(), tail(&l, 40));
        }
        for b in &self.boxes {
            if let Some(t) = &self.tmux {
                eprintln!("----- {} TV\n{}", b.spec.box_id, t.screen(b.session()));
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        if let Some(he) = &self.he {
            for p in he.roles.values() {
                if let Some(pid) = p.pid() {
                    // Never leave a role stopped: SIGTERM would wait for SIGCONT.
                    signal_quiet(pid, libc::SIGCONT);
                }
            }
        }
        if failed {
            self.dump_logs();
        }
        for i in 0..self.boxes.len() {
            if let Some(pid) = self.stbd_pid(i) {
                signal_quiet(pid, libc::SIGKILL);
            }
        }
        drop(self.tmux.take());
        drop(self.he.take());
        if let Some(dir) = self.dir.take() {
            if failed && std::env::var("PURSELINK_SCENARIOS_KEEP").as_deref() == Ok("1") {
                eprintln!("{}: kept {}", self.name, dir.keep().display());
            }
        }
    }
}

fn signal(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started.
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(rc, 0, "kill({pid}, {sig}) failed");
}

fn signal_quiet(pid: i32, sig: libc::c_int) {
    // SAFETY: kill(2) on a process this test started.
    unsafe {
        libc::kill(pid, sig);
    }
}

fn poll<T>(limit: Duration, step: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + limit;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(step);
    }
}

fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn log_count(p: &Path, needle: &str) -> usize {
    std::fs::read_to_string(p)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(needle))
        .count()
}

fn item(layout: &Layout, amount: u64) -> (String, ItemSpec) {
    layout
        .merchants
        .iter()
        .find_map(|m| {
            m.items
                .iter()
                .find(|i| i.amount == amount && i.currency == Currency::EUR)
                .map(|i| (m.id.clone(), i.clone()))
        })
        .unwrap_or_else(|| panic!("no EUR item at {amount}"))
}

fn card_balance(card: &Path) -> u64 {
    VirtualCard::open(card).expect("card file").state().balance
}

// ------------------------------------------------------------------------------ journals

fn db(p: &Path) -> Option<Connection> {
    if !p.exists() {
        return None;
    }
    let c = Connection::open_with_flags(
        p,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .ok()?;
    c.busy_timeout(Duration::from_secs(10)).ok()?;
    Some(c)
}

/// A purchase row of a box journal.
#[derive(Debug, Clone)]
struct BoxTxn {
    txid: String,
    merchant: String,
    state: String,
    atc: u32,
    security_card: Option<(i64, i64)>,
}

fn box_txns(journal: &Path) -> Vec<BoxTxn> {
    let Some(c) = db(journal) else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare(
        "SELECT transaction_id, merchant_id, state, atc, psam_id, psam_txn FROM txns ORDER BY created_at, rowid",
    ) else {
        return Vec::new();
    };
    st.query_map([], |r| {
        let security_card: (Option<i64>, Option<i64>) = (r.get(4)?, r.get(5)?);
        Ok(BoxTxn {
            txid: r.get(0)?,
            merchant: r.get(1)?,
            state: r.get(2)?,
            atc: r.get(3)?,
            security_card: security_card.0.zip(security_card.1),
        })
    })
    .map(|rows| rows.filter_map(Result::ok).collect())
    .unwrap_or_default()
}

fn box_txn(journal: &Path, txid: &str) -> Option<BoxTxn> {
    box_txns(journal).into_iter().find(|t| t.txid == txid)
}

fn box_steps(journal: &Path, txid: &str) -> Vec<String> {
    let Some(c) = db(journal) else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare("SELECT step FROM steps WHERE transaction_id = ?1 ORDER BY id")
    else {
        return Vec::new();
    };
    st.query_map([txid], |r| r.get(0))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// The loads of a box journal: (transaction id, state).
fn box_loads(journal: &Path) -> Vec<(String, String)> {
    let Some(c) = db(journal) else {
        return Vec::new();
    };
    let Ok(mut st) =
        c.prepare("SELECT transaction_id, state FROM loads ORDER BY created_at, rowid")
    else {
        return Vec::new();
    };
    st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// Every record of `kind` in a role's journal, decoded.
fn he_all<T: serde::de::DeserializeOwned>(journal: &Path, kind: &str) -> Vec<(String, T)> {
    let Some(c) = db(journal) else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key") else {
        return Vec::new();
    };
    let rows: Vec<(String, Vec<u8>)> = st
        .query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default();
    rows.into_iter()
        .map(|(k, v)| {
            let t = headend::journal::decode::<T>(&v)
                .unwrap_or_else(|e| panic!("{} {kind} {k}: {e}", journal.display()));
            (k, t)
        })
        .collect()
}

fn he_get<T: serde::de::DeserializeOwned>(journal: &Path, kind: &str, key: &str) -> Option<T> {
    let c = db(journal)?;
    let v: Vec<u8> = c
        .query_row(
            "SELECT value FROM state WHERE kind = ?1 AND key = ?2",
            [kind, key],
            |r| r.get(0),
        )
        .optional()
        .ok()
        .flatten()?;
    Some(headend::journal::decode::<T>(&v).expect("journal record"))
}

/// The steps a role journaled for `txid`: (step, detail).
fn he_steps(journal: &Path, txid: &str) -> Vec<(String, String)> {
    let Some(c) = db(journal) else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare("SELECT step, detail FROM steps WHERE txid = ?1 ORDER BY id") else {
        return Vec::new();
    };
    st.query_map([txid], |r| Ok((r.get(0)?, r.get(1)?)))
        .map(|rows| rows.filter_map(Result::ok).collect())
        .unwrap_or_default()
}

/// The keys of `kind` in a role's journal that belong to `txid` (`txid` or `txid/...`).
fn he_keys_of(journal: &Path, kind: &str, txid: &str) -> Vec<String> {
    let Some(c) = db(journal) else {
        return Vec::new();
    };
    let Ok(mut st) = c.prepare("SELECT key FROM state WHERE kind = ?1") else {
        return Vec::new();
    };
    st.query_map([kind], |r| r.get::<_, String>(0))
        .map(|rows| {
            rows.filter_map(Result::ok)
                .filter(|k| k == txid || k.starts_with(&format!("{txid}/")))
                .collect()
        })
        .unwrap_or_default()
}

/// What the security cards of the payment server count, per currency.
fn security_card_totals(w: &World, c: Currency) -> u64 {
    he_all::<SecurityCard>(&w.layout.journal(RoleName::Payment), "psam")
        .iter()
        .filter_map(|(_, card)| card.totals.get(&c).map(|t| t.amount))
        .sum()
}

// ------------------------------------------------------------------------------ the TV and the app

/// A payment the local app API asked for, OK pressed on the TV when its offer showed.
struct Paying {
    rd: BufReader<UnixStream>,
    _wr: UnixStream,
    buf: String,
}

impl Paying {
    fn start(w: &World, i: usize, merchant: &str, item: &ItemSpec) -> Self {
        let b = &w.boxes[i];
        let s = poll(Duration::from_secs(20), Duration::from_millis(100), || {
            UnixStream::connect(&b.socket).ok()
        })
        .unwrap_or_else(|| panic!("{}: local API socket not accepting", b.spec.box_id));
        let rd = s.try_clone().expect("socket");
        rd.set_read_timeout(Some(Duration::from_millis(100)))
            .expect("timeout");
        let mut p = Self {
            rd: BufReader::new(rd),
            _wr: s,
            buf: String::new(),
        };
        let req =
            serde_json::json!({"op": "pay", "merchant_id": merchant, "item_id": item.id, "id": 1});
        p._wr
            .write_all(format!("{req}\n").as_bytes())
            .expect("local API write");
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = p.line() {
                panic!("{}: answered before any offer showed: {v}", b.spec.box_id);
            }
            let screen = w.tmux().screen(b.session());
            if screen.contains(ui::strings::OFFER_TITLE) && screen.contains(&item.title) {
                break;
            }
            assert!(
                Instant::now() < end,
                "{}: no offer for {} on the TV within 30 s:\n{screen}",
                b.spec.box_id,
                item.title
            );
        }
        w.tmux().keys(b.session(), &["Enter"]);
        w.say(format!(
            "{}: offer for {} ({}) shown; OK pressed",
            b.spec.box_id, item.title, item.id
        ));
        p
    }

    fn line(&mut self) -> Option<serde_json::Value> {
        match self.rd.read_line(&mut self.buf) {
            Ok(0) => panic!("stbd closed the local API connection"),
            Ok(_) if self.buf.ends_with('\n') => {
                let v = serde_json::from_str(self.buf.trim()).expect("a JSON result line");
                self.buf.clear();
                Some(v)
            }
            Ok(_) => None,
            Err(e) if matches!(e.kind(), IoErrorKind::WouldBlock | IoErrorKind::TimedOut) => None,
            Err(e) => panic!("local API: {e}"),
        }
    }

    fn result(&mut self, limit: Duration) -> serde_json::Value {
        let end = Instant::now() + limit;
        loop {
            if let Some(v) = self.line() {
                return v;
            }
            assert!(
                Instant::now() < end,
                "no result line from the local API within {limit:?}"
            );
        }
    }
}

/// Presses `key` and waits until the screen shows `what`; how long it took.
fn press(
    w: &World,
    i: usize,
    key: &str,
    what: &str,
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> Duration {
    let s = w.boxes[i].session();
    let t = Instant::now();
    w.tmux().keys(s, &[key]);
    let shown = w.tmux().wait(s, limit, pred);
    let took = t.elapsed();
    assert!(
        shown.is_some(),
        "{s}: the TV did not show {what} within {limit:?} of {key}:\n{}",
        w.tmux().screen(s)
    );
    w.say(format!(
        "TV: {key} -> {what} in {:.0} ms",
        took.as_secs_f64() * 1000.0
    ));
    took
}

/// The info overlay (its keys line, up to where the TV may wrap it).
fn info_shown(s: &str) -> bool {
    let keys = ui::strings::INFO_KEYS;
    s.contains(keys.split(',').next().unwrap_or(keys))
}

fn history_shown(s: &str) -> bool {
    s.contains(ui::strings::HISTORY_EMPTY) || s.contains(ui::strings::HISTORY_CHART)
}

/// The viewer, during the outage: OK closes the error, yellow shows the card's history (the
/// daemon reads the card's log for it), MENU goes home. Each within `limit`.
fn remote_answers(w: &World, i: usize, limit: Duration) -> Vec<Duration> {
    vec![
        press(w, i, "Enter", "the home screen", limit, home),
        press(w, i, "F3", "the card history", limit, history_shown),
        press(w, i, "m", "the home screen", limit, home),
    ]
}

fn error_shown(s: &str) -> bool {
    [ErrorKind::Other, ErrorKind::Timeout, ErrorKind::Pending]
        .iter()
        .any(|k| s.contains(ui::strings::error_texts(*k).0))
}

// ------------------------------------------------------------------------------ scenario 2

/// Where the viewer makes purchase B.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BOn {
    /// On another box, the card taken there while box 1 is down: B debits before box 1
    /// can resolve A (box 1 is the first to see B's record with A's counter).
    OtherBox,
    /// On box 1 itself, as soon as it is back: B waits for A while A is in doubt and
    /// resolvable, or starts after it — whichever the box does, the end is the same.
    SameBox,
}

/// Scenario 2: A (3.99) drawn while the payment role is stopped, stbd SIGKILLed before any
/// debit command reached it; the payment role continued; B (4.99) on the same card, on
/// `b_on`; box 1 restarted. Whatever the order in which things settle (box 1's proof
/// accepted, or refused because B moved the card's counter and A reversed at the payment
/// server's deadline): A cancelled with proof, reversed, never completed or released; B
/// completed and released once; the card and the security cards 4.99 down; nothing open.
fn scenario_2(name: &'static str, b_on: BOn) {
    let mut w = World::new(
        name,
        Spec {
            stbd_boxes: if b_on == BOn::OtherBox { 2 } else { 1 },
            sim_boxes: 0,
            // The payment server reverses an unanswered draw after 15 s.
            transaction_timeout_secs: 15,
            ..Default::default()
        },
    );
    let (ma, ia) = item(&w.layout, 399);
    let (mb, ib) = item(&w.layout, 499);
    let opening = w.boxes[0].spec.card_balance;
    let card1 = w.boxes[0].card.clone();
    let j1 = w.boxes[0].journal();
    w.start_box(0, &[]);
    let atc0 = VirtualCard::open(&card1).unwrap().state().atc;

    // The payment role is stopped; purchase A (3.99) is drawn on box 1.
    w.stop_role(RoleName::Payment);
    let _a_api = Paying::start(&w, 0, &ma, &ia);
    let a = poll(Duration::from_secs(10), Duration::from_millis(10), || {
        box_txns(&j1).into_iter().find(|t| t.state == "draw_sent")
    })
    .expect("A's draw request journaled (draw_sent)");
    // Before any debit command can reach it (the payment role does not answer), stbd dies.
    w.end_box(0, libc::SIGKILL);
    let a_row = box_txn(&j1, &a.txid).unwrap();
    assert_eq!(a_row.merchant, ma, "{a_row:?}");
    assert_eq!(a_row.state, "draw_sent", "{a_row:?}");
    assert_eq!(
        a_row.security_card, None,
        "no debit command journaled: {a_row:?}"
    );
    assert_eq!(
        box_steps(&j1, &a.txid),
        ["accepted", "draw_sent"],
        "A went in doubt before any debit command"
    );
    assert_eq!(a.atc, atc0 + 1, "A's counter is the card's next one");
    assert_eq!(card_balance(&card1), opening, "A did not debit the card");
    w.say(format!(
        "A = {} in doubt on {} (draw_sent, card counter {})",
        a.txid, w.boxes[0].spec.box_id, a.atc
    ));

    // The payment role comes back and answers A's draw, to nobody.
    w.continue_role(RoleName::Payment);
    let issued = poll(Duration::from_secs(10), Duration::from_millis(50), || {
        he_get::<PayTxn>(&w.layout.journal(RoleName::Payment), "txn", &a.txid)
    })
    .expect("the payment server journaled A's debit command after SIGCONT");
    assert_eq!(issued.state, PayState::DebitIssued);
    assert_eq!(issued.amount.minor, ia.amount);

    // Purchase B (4.99) on the same card; box 1 (re)starts and resolves A from its journal.
    let (b, jb, t_restart) = match b_on {
        BOn::OtherBox => {
            // The viewer takes the card to box 2.
            let card2 = w.boxes[1].card.clone();
            std::fs::remove_file(&card2).unwrap();
            std::fs::rename(&card1, &card2).unwrap();
            w.start_box(1, &[]);
            let mut b_api = Paying::start(&w, 1, &mb, &ib);
            let r = b_api.result(Duration::from_secs(30));
            assert_eq!(r["result"], "paid", "B: {r}");
            assert_eq!(r["released"], true, "B: {r}");
            let b = r["transaction_id"].as_str().unwrap().to_string();
            w.say(format!(
                "B = {b} paid and released on {}",
                w.boxes[1].spec.box_id
            ));
            let atc_b = VirtualCard::open(&card2).unwrap().state().atc;
            assert_eq!(atc_b, a.atc, "B debited with A's transaction counter");
            w.end_box(1, libc::SIGTERM);
            // The card is back in box 1; stbd restarts.
            std::fs::rename(&card2, &card1).unwrap();
            let t = Instant::now();
            w.restart_box(0);
            (b, w.boxes[1].journal(), t)
        }
        BOn::SameBox => {
            let t = Instant::now();
            w.restart_box(0);
            let mut b_api = Paying::start(&w, 0, &mb, &ib);
            let r = b_api.result(Duration::from_secs(30));
            assert_eq!(r["result"], "paid", "B: {r}");
            assert_eq!(r["released"], true, "B: {r}");
            let b = r["transaction_id"].as_str().unwrap().to_string();
            w.say(format!(
                "B = {b} paid and released on {}; A was {} when B's offer was made",
                w.boxes[0].spec.box_id,
                box_txn(&j1, &a.txid).unwrap().state
            ));
            (b, j1.clone(), t)
        }
    };
    let settled = poll(Duration::from_secs(30), Duration::from_millis(50), || {
        box_txn(&j1, &a.txid)
            .filter(|t| !matches!(t.state.as_str(), "draw_sent" | "cancel_pending"))
    })
    .expect("A settled by box 1 within 30 s of its restart");
    w.say(format!(
        "A left draw_sent: {} on box 1 {:.2} s after its restart",
        settled.state,
        t_restart.elapsed().as_secs_f64()
    ));
    // B's debit record carries A's counter.
    let log = VirtualCard::open(&card1).unwrap().state().log.clone();
    let b_rec = log
        .iter()
        .find(|r| r.amount == ib.amount)
        .expect("B's debit in the card's log")
        .clone();
    assert_eq!(b_rec.atc, a.atc, "B debited with A's transaction counter");
    if b_on == BOn::SameBox {
        // The box restarts once more: nothing it settled opens again.
        w.end_box(0, libc::SIGKILL);
        w.restart_box(0);
    }

    // The head end reverses A (the box's proof, or its deadline), passes it to the merchant.
    let reversed = poll(Duration::from_secs(30), Duration::from_millis(200), || {
        he_get::<PayTxn>(&w.layout.journal(RoleName::Payment), "txn", &a.txid)
            .filter(|t| t.state != PayState::DebitIssued)
    })
    .expect("the payment server settled A");
    w.settle(std::slice::from_ref(&card1), Duration::from_secs(20));
    let report = w.finish(&[(card1.clone(), opening)]);

    // A: cancelled with the card's proof, never completed, never released.
    let a_row = box_txn(&j1, &a.txid).unwrap();
    let a_steps = box_steps(&j1, &a.txid);
    assert_eq!(a_row.state, "ended", "A: {a_row:?}, steps {a_steps:?}");
    assert!(
        !a_steps
            .iter()
            .any(|s| s == "debit_responded" || s == "completed"),
        "stbd journaled a debit response (B's) under A: {a_steps:?}"
    );
    assert!(
        a_steps.iter().any(|s| s == "cancel_pending"),
        "A was cancelled with the card's proof: {a_steps:?}"
    );
    assert_eq!(
        a_row.security_card, None,
        "no security card under A: {a_row:?}"
    );
    let gw_a: GwTxn = he_get(&w.layout.journal(RoleName::Gateway), "gw", &a.txid).unwrap();
    assert!(
        gw_a.debit_response.is_none() && gw_a.receipt.is_none(),
        "no debit response reached the gateway for A: {:?} {:?}",
        gw_a.debit_response,
        gw_a.receipt
    );
    let gw_steps = he_steps(&w.layout.journal(RoleName::Gateway), &a.txid);
    assert!(
        gw_steps.iter().any(|(s, _)| s == "cancel relayed"),
        "box 1's cancel reached the gateway: {gw_steps:?}"
    );
    for kind in ["notify", "release"] {
        assert!(
            he_keys_of(&w.layout.journal(RoleName::Gateway), kind, &a.txid).is_empty(),
            "the gateway holds a {kind} entry for A"
        );
    }
    assert_eq!(
        reversed.state,
        PayState::Reversed,
        "A at the payment server"
    );
    let pay_steps = he_steps(&w.layout.journal(RoleName::Payment), &a.txid);
    w.say(format!("A at the payment server: {pay_steps:?}"));
    assert!(
        !pay_steps.iter().any(|(s, _)| s.contains("complete")),
        "A never completed: {pay_steps:?}"
    );
    let merchant_a = he_steps(&w.layout.journal(RoleName::Merchant), &a.txid);
    assert!(
        !merchant_a.iter().any(|(s, _)| s == "goods released"),
        "A never released: {merchant_a:?}"
    );

    // B: completed and released exactly once.
    let b_pay: PayTxn = he_get(&w.layout.journal(RoleName::Payment), "txn", &b).unwrap();
    assert_eq!(b_pay.state, PayState::Completed);
    assert_eq!(
        (b_pay.security_card_id, b_pay.security_card_txn),
        (b_rec.counterparty, b_rec.counterparty_txn),
        "B's log record is B's sale"
    );
    let released: Vec<_> = he_steps(&w.layout.journal(RoleName::Merchant), &b)
        .into_iter()
        .filter(|(s, _)| s == "goods released")
        .collect();
    assert_eq!(released.len(), 1, "B released exactly once");
    assert_eq!(
        box_txn(&jb, &b).map(|t| t.state).as_deref(),
        Some("completed")
    );

    // Value: the card paid B only; the security cards count B only.
    assert_eq!(card_balance(&card1), opening - ib.amount);
    assert_eq!(security_card_totals(&w, Currency::EUR), ib.amount);
    let t = &report.totals[&Currency::EUR];
    assert_eq!(
        (t.card_debits, t.completions, t.releases),
        (ib.amount, ib.amount, ib.amount)
    );
    for b in &w.boxes {
        let open: Vec<_> = box_txns(&b.journal())
            .into_iter()
            .filter(|t| !matches!(t.state.as_str(), "completed" | "ended"))
            .collect();
        assert!(
            open.is_empty(),
            "{}'s journal left open: {open:?}",
            b.spec.box_id
        );
    }
    assert!(report.holds(), "the audit does not hold:\n{report}");
    w.say(format!("passed in {:.2} s", w.t0.elapsed().as_secs_f64()));
}

#[test]
fn scenario_2_a_draw_without_debit_command_is_cancelled_with_proof_not_matched_to_the_next_debit_by_counter()
 {
    scenario_2("scenario-2", BOn::OtherBox);
}

#[test]
fn scenario_2_on_one_box_the_next_purchase_waits_for_the_draw_without_debit_command_and_both_settle()
 {
    scenario_2("scenario-2-one-box", BOn::SameBox);
}

// ------------------------------------------------------------------------------ scenario 4

/// Waits until `needle` has been logged by box `i` at least `n` times.
fn logged(w: &World, i: usize, needle: &str, n: usize, limit: Duration) {
    let log = &w.boxes[i].log;
    let seen = poll(limit, Duration::from_millis(50), || {
        (log_count(log, needle) >= n).then_some(())
    });
    assert!(
        seen.is_some(),
        "stbd did not log {needle:?} {n} time(s) within {limit:?}:\n{}",
        tail(log, 30)
    );
}

/// stbd and its gateway connection stayed up: the same process, one connection, no drop,
/// the gateway never restarted.
fn assert_live_connection(w: &mut World, stbd: i32) {
    assert_eq!(w.stbd_pid(0), Some(stbd), "stbd was not restarted");
    let log = &w.boxes[0].log;
    assert_eq!(
        log_count(log, "gateway connected"),
        1,
        "one gateway connection, never re-made:\n{}",
        tail(log, 40)
    );
    for dropped in ["gateway connection lost", "gateway connection dropped"] {
        assert_eq!(log_count(log, dropped), 0, "{dropped}:\n{}", tail(log, 40));
    }
    assert_eq!(
        w.he().role(RoleName::Gateway).starts,
        1,
        "the gateway never restarted"
    );
}

#[test]
fn scenario_4_the_recovery_timer_settles_a_purchase_left_in_doubt_by_a_payment_outage_on_a_live_connection()
 {
    let mut w = World::new(
        "scenario-4-purchase",
        Spec {
            stbd_boxes: 1,
            sim_boxes: 0,
            // Longer than the outage: the payment server must not reverse on its own.
            transaction_timeout_secs: 120,
            ..Default::default()
        },
    );
    // FIG. 4: the security card at the payment server checks the card's signature.
    let (m, it) = item(&w.layout, 199);
    let opening = w.boxes[0].spec.card_balance;
    let card = w.boxes[0].card.clone();
    let j = w.boxes[0].journal();
    let release = w
        .dir
        .as_ref()
        .unwrap()
        .path()
        .join("release-debit-response");
    let release_s = release.display().to_string();
    let stbd = w.start_box(
        0,
        &[
            ("STBD_TEST_HOOK", "pause-after-debit-journaled"),
            ("STBD_TEST_HOOK_RELEASE", &release_s),
        ],
    );

    // The card pays; stbd is held after journaling the card's debit response, the payment
    // role is stopped, stbd goes on: its debit response meets a stopped payment server.
    let mut api = Paying::start(&w, 0, &m, &it);
    logged(
        &w,
        0,
        "TEST HOOK pause-after-debit-journaled:",
        1,
        Duration::from_secs(20),
    );
    let t_stop = w.stop_role(RoleName::Payment);
    std::fs::write(&release, b"").unwrap();
    // While stbd waits for the stopped payment server's answer, INFO opens and closes the
    // info overlay.
    logged(
        &w,
        0,
        "TEST HOOK pause-after-debit-journaled: released",
        1,
        Duration::from_secs(5),
    );
    let mut keys = vec![
        press(
            &w,
            0,
            "i",
            "the info overlay",
            Duration::from_secs(2),
            info_shown,
        ),
        press(
            &w,
            0,
            "i",
            "the purchase in progress",
            Duration::from_secs(2),
            |s| !info_shown(s) && s.contains(ui::strings::PROGRESS_TITLE),
        ),
    ];
    let r = api.result(Duration::from_secs(30));
    assert_eq!(r["result"], "pending", "in doubt: {r}");
    let txid = r["transaction_id"].as_str().unwrap().to_string();
    w.say(format!(
        "{txid} in doubt {:.2} s into the outage: {}",
        t_stop.elapsed().as_secs_f64(),
        r["reason"]
    ));
    assert_eq!(
        box_txn(&j, &txid).map(|t| t.state).as_deref(),
        Some("debit_responded")
    );
    assert_eq!(card_balance(&card), opening - it.amount, "the card paid");

    // Recovery runs on its timer while the payment role is still stopped; the TV answers the
    // remote meanwhile.
    keys.extend(remote_answers(&w, 0, Duration::from_secs(2)));
    logged(
        &w,
        0,
        "recovery: to the gateway",
        1,
        Duration::from_secs(10),
    );
    // At least two retries refused while it is stopped: the timer backs off and keeps going.
    logged(
        &w,
        0,
        "purchase still in doubt; retrying later",
        2,
        Duration::from_secs(30),
    );
    assert_eq!(
        box_txn(&j, &txid).map(|t| t.state).as_deref(),
        Some("debit_responded"),
        "nothing settles it while the payment role is stopped"
    );
    let rounds_during = log_count(&w.boxes[0].log, "recovery: to the gateway");

    // The payment role comes back: the timer alone settles the purchase.
    let t_cont = w.continue_role(RoleName::Payment);
    let done = poll(Duration::from_secs(40), Duration::from_millis(50), || {
        box_txn(&j, &txid).filter(|t| t.state == "completed")
    });
    let took = t_cont.elapsed();
    assert!(
        done.is_some(),
        "{txid} not settled within 40 s of SIGCONT: {:?}\n{}",
        box_txn(&j, &txid),
        tail(&w.boxes[0].log, 30)
    );
    w.say(format!(
        "{txid} completed by the recovery timer {:.2} s after SIGCONT (outage {:.2} s, {rounds_during} recovery round(s) during it; TV keys {:?})",
        took.as_secs_f64(),
        (t_cont - t_stop).as_secs_f64(),
        keys
    ));
    assert!(
        took < Duration::from_secs(20),
        "recovery took {took:?} after the payment role came back"
    );
    assert!(rounds_during >= 1);
    assert_live_connection(&mut w, stbd);

    w.settle(std::slice::from_ref(&card), Duration::from_secs(20));
    let report = w.finish(&[(card.clone(), opening)]);
    let pay: PayTxn = he_get(&w.layout.journal(RoleName::Payment), "txn", &txid).unwrap();
    assert_eq!(pay.state, PayState::Completed);
    let released = he_steps(&w.layout.journal(RoleName::Merchant), &txid)
        .into_iter()
        .filter(|(s, _)| s == "goods released")
        .count();
    assert_eq!(released, 1, "released exactly once");
    assert_eq!(card_balance(&card), opening - it.amount);
    assert_eq!(security_card_totals(&w, Currency::EUR), it.amount);
    assert!(report.holds(), "the audit does not hold:\n{report}");
    w.say(format!("passed in {:.2} s", w.t0.elapsed().as_secs_f64()));
}

/// A bank load on a live connection while `stopped` (the load server or the bank) does not
/// answer, long enough for the load to go in doubt; the recovery timer alone settles it.
fn scenario_4_load(name: &'static str, stopped: RoleName) {
    let mut w = World::new(
        name,
        Spec {
            stbd_boxes: 1,
            sim_boxes: 0,
            ..Default::default()
        },
    );
    let opening = w.boxes[0].spec.card_balance;
    let card = w.boxes[0].card.clone();
    let j = w.boxes[0].journal();
    let pin = w.boxes[0].spec.pin.clone();
    let stbd = w.start_box(0, &[]);
    let s = w.boxes[0].session().to_string();
    let tv = w.tmux();

    // The remote: green (load), 1 (bank), the amount, OK, the PIN.
    tv.keys(&s, &["F2"]);
    tv.wait(&s, Duration::from_secs(10), |x| {
        x.contains(ui::strings::LOAD_CHOOSE_SOURCE)
    })
    .expect("the load screen");
    tv.keys(&s, &["1"]);
    tv.wait(&s, Duration::from_secs(30), |x| {
        x.contains(ui::strings::LOAD_MAX)
    })
    .unwrap_or_else(|| panic!("no load offer:\n{}", tv.screen(&s)));
    tv.keys(&s, &["2", "5", "0", "0", "Enter"]);
    tv.wait(&s, Duration::from_secs(15), |x| {
        x.contains(ui::strings::PIN_TITLE)
    })
    .unwrap_or_else(|| panic!("no PIN screen:\n{}", tv.screen(&s)));
    let digits: Vec<String> = pin.chars().map(String::from).collect();
    let digits: Vec<&str> = digits.iter().map(String::as_str).collect();
    tv.keys(&s, &digits);

    // The role stops; OK sends the load request.
    let t_stop = w.stop_role(stopped);
    w.tmux().keys(&s, &["Enter"]);
    const IN_DOUBT: [&str; 5] = [
        "load_request_sent",
        "load_command",
        "load_sent",
        "load_responded",
        "load_zero_value",
    ];
    let (txid, state) = poll(Duration::from_secs(40), Duration::from_millis(100), || {
        let l = box_loads(&j).pop()?;
        let screen = w.tmux().screen(&s);
        (IN_DOUBT.contains(&l.1.as_str())
            && error_shown(&screen)
            && !screen.contains(ui::strings::PROGRESS_TITLE))
        .then_some(l)
    })
    .unwrap_or_else(|| {
        panic!(
            "the load did not go in doubt within 40 s: {:?}\n{}",
            box_loads(&j),
            w.tmux().screen(&s)
        )
    });
    w.say(format!(
        "load {txid} in doubt ({state}) {:.2} s into the {stopped} outage",
        t_stop.elapsed().as_secs_f64()
    ));
    assert_eq!(card_balance(&card), opening, "nothing loaded");

    logged(
        &w,
        0,
        "recovery: to the gateway",
        1,
        Duration::from_secs(10),
    );
    let answered_before = log_count(&w.boxes[0].log, "load still in doubt; retrying later");
    let keys = remote_answers(&w, 0, Duration::from_secs(2));
    let outstanding = answered_before == 0
        && log_count(&w.boxes[0].log, "load still in doubt; retrying later") == 0;
    w.say(format!(
        "the TV answered while the first recovery call was {}",
        if outstanding {
            "still outstanding"
        } else {
            "already answered (Busy)"
        }
    ));
    logged(
        &w,
        0,
        "load still in doubt; retrying later",
        1,
        Duration::from_secs(20),
    );
    assert!(
        box_loads(&j)
            .iter()
            .any(|(t, st)| *t == txid && IN_DOUBT.contains(&st.as_str())),
        "nothing settles it while the {stopped} role is stopped"
    );
    let rounds_during = log_count(&w.boxes[0].log, "recovery: to the gateway");
    let bank = w.layout.journal(RoleName::Bank);
    let hold_during = he_get::<Hold>(&bank, "hold", &txid).map(|h| h.state);

    let t_cont = w.continue_role(stopped);
    let done = poll(Duration::from_secs(40), Duration::from_millis(50), || {
        box_loads(&j)
            .into_iter()
            .find(|(t, st)| *t == txid && !IN_DOUBT.contains(&st.as_str()))
    });
    let took = t_cont.elapsed();
    let (_, end_state) = done.unwrap_or_else(|| {
        panic!(
            "{txid} not settled within 40 s of SIGCONT: {:?}\n{}",
            box_loads(&j),
            tail(&w.boxes[0].log, 30)
        )
    });
    w.say(format!(
        "load {txid} {end_state} by the recovery timer {:.2} s after SIGCONT (outage {:.2} s, {rounds_during} recovery round(s) during it, bank hold during it: {hold_during:?}; TV keys {keys:?})",
        took.as_secs_f64(),
        (t_cont - t_stop).as_secs_f64(),
    ));
    assert_eq!(end_state, "load_completed");
    assert!(
        took < Duration::from_secs(20),
        "recovery took {took:?} after the {stopped} role came back"
    );
    assert_live_connection(&mut w, stbd);

    w.settle(std::slice::from_ref(&card), Duration::from_secs(20));
    let report = w.finish(&[(card.clone(), opening)]);
    // Not loaded, and nothing held: the bank released what it held for it.
    assert_eq!(card_balance(&card), opening);
    let holds: Vec<(String, Hold)> = he_all(&bank, "hold");
    let open: Vec<_> = holds
        .iter()
        .filter(|(_, h)| h.state == HoldState::Held)
        .collect();
    assert!(open.is_empty(), "holds left open at the bank: {open:?}");
    if let Some(h) = he_get::<Hold>(&bank, "hold", &txid) {
        assert_eq!(h.state, HoldState::Released, "{h:?}");
    }
    let rec = he_get::<LoadRec>(&w.layout.journal(RoleName::Load), "load", &txid);
    assert!(
        rec.as_ref()
            .is_some_and(|r| matches!(r.state, LoadState::NotLoaded | LoadState::Refused)),
        "the load server says not loaded: {:?}",
        rec.map(|r| r.state)
    );
    let gw: GwLoad = he_get(&w.layout.journal(RoleName::Gateway), "gwload", &txid).unwrap();
    assert!(
        gw.settled.as_ref().is_some_and(|s| !s.captured),
        "the gateway settled it as released: {:?}",
        gw.settled
    );
    assert!(report.holds(), "the audit does not hold:\n{report}");
    w.say(format!("passed in {:.2} s", w.t0.elapsed().as_secs_f64()));
}

#[test]
fn scenario_4_the_recovery_timer_settles_a_load_left_in_doubt_by_a_load_server_outage_on_a_live_connection()
 {
    scenario_4_load("scenario-4-load-server", RoleName::Load);
}

#[test]
fn scenario_4_the_recovery_timer_settles_a_load_left_in_doubt_by_a_bank_outage_on_a_live_connection()
 {
    scenario_4_load("scenario-4-bank", RoleName::Bank);
}

// ------------------------------------------------------------------------------ two gateways

/// Two gateways on one PostgreSQL; the purchase of `amount` (a merchant of the embodiment
/// whose window `hook` is in) begins on gateway A, which freezes at `hook` holding the
/// transaction's lock and is SIGKILLed there. The box's request to A times out; it fails
/// over to gateway B, and its recovery timer re-sends the debit response there. B resumes
/// the transaction by its id from the shared journal: one confirmation at the payment
/// server, one release at the merchant, the card debited once, nothing left open.
///
/// With `busy_first`, A stays frozen (alive, its database session holding the lock) until
/// B has found the transaction held (its background pass finds A's journaled debit
/// response; a box's request there would get `Busy`): B does not act on a transaction
/// another live gateway holds.
fn gateway_failover(name: &'static str, amount: u64, hook: &str, busy_first: bool) {
    let Some(pg) = pg_rig::PgDb::fresh() else {
        return;
    };
    let mut w = World::new(
        name,
        Spec {
            stbd_boxes: 1,
            sim_boxes: 0,
            gateways: 2,
            gateway_journal_url: Some(pg.url.clone()),
            transaction_timeout_secs: 120,
            ..Default::default()
        },
    );
    let (a_addr, b_addr) = (w.layout.gateway_addr(), w.layout.more_gateways[0].addr);
    // Gateway A again, now with the hook.
    {
        let a = w.he().role(RoleName::Gateway);
        a.stop(Duration::from_secs(10));
        a.env
            .push((headend::test_hook::ENV.into(), hook.to_string()));
        let before = a.start().expect("gateway A");
        a.wait_ready(before, Duration::from_secs(30))
            .expect("gateway A ready");
    }
    let a_log = w.he().role(RoleName::Gateway).log.clone();
    w.say(format!(
        "gateways A {a_addr} (hook {hook}) and B {b_addr} on one PostgreSQL schema"
    ));
    let (m, it) = item(&w.layout, amount);
    let opening = w.boxes[0].spec.card_balance;
    let card = w.boxes[0].card.clone();
    let j = w.boxes[0].journal();
    w.start_box(0, &[]);
    assert!(
        tail(&w.boxes[0].log, 40).contains(&format!("gateway connected addr={a_addr}")),
        "the box begins with the first gateway it lists:\n{}",
        tail(&w.boxes[0].log, 20)
    );

    let mut api = Paying::start(&w, 0, &m, &it);
    let frozen = poll(Duration::from_secs(30), Duration::from_millis(20), || {
        (log_count(&a_log, &format!("TEST HOOK {hook}")) > 0).then_some(())
    });
    assert!(
        frozen.is_some(),
        "gateway A never reached {hook}:\n{}\n----- gateway B\n{}\n----- stbd\n{}",
        tail(&a_log, 30),
        tail(&w.he().more_gateways[0].log.clone(), 30),
        tail(&w.boxes[0].log, 30)
    );
    if busy_first {
        let b_log = w.he().more_gateways[0].log.clone();
        let busy = poll(Duration::from_secs(60), Duration::from_millis(50), || {
            (log_count(&b_log, "transaction held by another gateway process") > 0).then_some(())
        });
        assert!(
            busy.is_some(),
            "gateway B never found the transaction held by A:\n{}",
            tail(&b_log, 30)
        );
        w.say("gateway B found the transaction held by A (frozen, alive) and left it alone");
    }
    let t_kill = w.he().role(RoleName::Gateway).kill();
    w.say(format!("gateway A frozen at {hook}, SIGKILLed"));

    // The box's debit response went unanswered by A: after A's share of the deadline the
    // box sends it to B. With A dead, B completes it within the same request and the viewer
    // sees the receipt; with A alive (busy_first) B may answer Busy and the purchase is in
    // doubt until the recovery timer settles it through B.
    let r = api.result(Duration::from_secs(60));
    let txid = r["transaction_id"]
        .as_str()
        .expect("a transaction id")
        .to_string();
    w.say(format!("local API: {r}"));
    if !busy_first {
        assert_eq!(r["result"], "paid", "failed over within the request: {r}");
    }
    let done = poll(Duration::from_secs(90), Duration::from_millis(50), || {
        box_txn(&j, &txid).filter(|t| t.state == "completed")
    });
    assert!(
        done.is_some(),
        "{txid} not completed through gateway B within 90 s: {:?}\n{}",
        box_txn(&j, &txid),
        tail(&w.boxes[0].log, 30)
    );
    w.say(format!(
        "{txid} completed {:.2} s after gateway A was killed",
        t_kill.elapsed().as_secs_f64()
    ));
    assert!(
        log_count(&w.boxes[0].log, &format!("gateway connected addr={b_addr}")) >= 1,
        "the box failed over to gateway B:\n{}",
        tail(&w.boxes[0].log, 30)
    );

    // The shared journal: the purchase done, with its receipt; nothing of it left to deliver.
    let gw = headend::journal::Journal::open_target(&headend::journal::Target::Postgres(
        w.layout.gateway_journal.clone().expect("on PostgreSQL"),
    ))
    .expect("the gateways' journal");
    let t: GwTxn = headend::journal::decode(
        &gw.get(headend::journal::Kind::Gw, &txid)
            .unwrap()
            .expect("the purchase in the shared journal"),
    )
    .unwrap();
    assert_eq!(t.state, headend::gateway::GwState::Done, "{t:?}");
    assert!(t.receipt.is_some());
    for kind in [
        headend::journal::Kind::Confirming,
        headend::journal::Kind::Release,
    ] {
        let left: Vec<String> = gw
            .all(kind)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| k.starts_with(&txid))
            .collect();
        assert!(left.is_empty(), "{kind} left for {txid}: {left:?}");
    }
    drop(gw);

    w.settle(std::slice::from_ref(&card), Duration::from_secs(30));
    let report = w.finish(&[(card.clone(), opening)]);
    let pay: PayTxn = he_get(&w.layout.journal(RoleName::Payment), "txn", &txid).unwrap();
    assert_eq!(pay.state, PayState::Completed);
    let released = he_steps(&w.layout.journal(RoleName::Merchant), &txid)
        .into_iter()
        .filter(|(s, _)| s == "goods released")
        .count();
    assert_eq!(released, 1, "released exactly once");
    assert_eq!(card_balance(&card), opening - it.amount, "debited once");
    assert_eq!(security_card_totals(&w, Currency::EUR), it.amount);
    assert!(report.holds(), "the audit does not hold:\n{report}");
    w.say(format!("passed in {:.2} s", w.t0.elapsed().as_secs_f64()));
}

/// FIG. 5 (the payment server compares): A journaled the debit response for the payment
/// server and froze before asking it; B leaves it alone while A lives, and once A is
/// SIGKILLed asks the payment server itself.
#[test]
fn two_gateways_a_gateway_killed_before_asking_the_confirmation_fails_over_and_the_purchase_completes_once()
 {
    gateway_failover(
        "two-gateways-before-confirmation",
        399,
        headend::test_hook::GATEWAY_PAUSE_BEFORE_ASKING_CONFIRMATION,
        true,
    );
}

/// FIG. 6 (the gateway compares): A accepted the card's response and journaled the release
/// for the merchant and the notification for the payment server, and died before
/// delivering either; B delivers both.
#[test]
fn two_gateways_a_gateway_killed_after_journaling_the_confirmation_fails_over_and_the_purchase_completes_once()
 {
    gateway_failover(
        "two-gateways-after-confirmation",
        599,
        headend::test_hook::GATEWAY_PAUSE_AFTER_CONFIRMATION_JOURNALED,
        false,
    );
}
