//! What the run did, as it happened: every transaction's outcome (who, what, when), every
//! fault, every restart and readiness; and the pacing every driver shares.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Which kind of transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum TxKind {
    Purchase,
    BankLoad,
    VoucherLoad,
}

impl TxKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TxKind::Purchase => "purchase",
            TxKind::BankLoad => "bank load",
            TxKind::VoucherLoad => "voucher load",
        }
    }

    pub fn is_load(self) -> bool {
        !matches!(self, TxKind::Purchase)
    }
}

/// How a transaction ended for the box that made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Paid and released / loaded and confirmed.
    Completed,
    /// The head end or the card said no; nothing moved (the reason, short).
    Refused(String),
    /// It could not be made (no connection, a timeout before anything was sent…).
    Failed(String),
    /// Value may have moved; the box keeps it and settles it later (why).
    InDoubt(String),
    /// The box was SIGKILLed during it.
    Interrupted,
}

impl Outcome {
    pub fn label(&self) -> String {
        match self {
            Outcome::Completed => "completed".into(),
            Outcome::Refused(r) => format!("refused: {r}"),
            Outcome::Failed(r) => format!("failed: {r}"),
            Outcome::InDoubt(r) => format!("in doubt: {r}"),
            Outcome::Interrupted => "interrupted (box killed)".into(),
        }
    }
}

/// One transaction as a box saw it.
#[derive(Debug, Clone)]
pub struct TxRecord {
    /// "sim" or "stbd".
    pub source: &'static str,
    pub box_id: String,
    pub kind: TxKind,
    pub txid: Option<String>,
    pub started: Instant,
    pub ended: Instant,
    pub outcome: Outcome,
}

/// A fault or a recovery milestone.
#[derive(Debug, Clone)]
pub enum Event {
    RoleKilled {
        role: crate::deploy::RoleName,
        at: Instant,
        ready: Option<Instant>,
    },
    /// A role process that exited by itself (not killed by the run).
    RoleExited {
        role: crate::deploy::RoleName,
        at: Instant,
        status: String,
    },
    BoxKilled {
        box_id: String,
        at: Instant,
        /// When the restarted stbd showed its home screen again.
        up: Option<Instant>,
        during: String,
    },
    Note(String),
}

/// Shared by every driver.
pub struct Recorder {
    pub t0: Instant,
    /// Start slots no simulated box could take (every one busy or holding an open
    /// transaction): not transactions, counted apart.
    shed: AtomicU64,
    txs: Mutex<Vec<TxRecord>>,
    events: Mutex<Vec<Event>>,
}

impl Recorder {
    pub fn new() -> Self {
        Self {
            t0: Instant::now(),
            shed: AtomicU64::new(0),
            txs: Mutex::new(Vec::new()),
            events: Mutex::new(Vec::new()),
        }
    }

    pub fn shed(&self) {
        self.shed.fetch_add(1, Ordering::Relaxed);
    }

    pub fn shed_count(&self) -> u64 {
        self.shed.load(Ordering::Relaxed)
    }

    pub fn tx(&self, r: TxRecord) {
        self.txs.lock().unwrap_or_else(|p| p.into_inner()).push(r);
    }

    pub fn event(&self, e: Event) {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(e);
    }

    pub fn txs(&self) -> Vec<TxRecord> {
        self.txs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Seconds since the run began, for logs.
    pub fn secs(&self, t: Instant) -> f64 {
        t.saturating_duration_since(self.t0).as_secs_f64()
    }
}

impl Default for Recorder {
    fn default() -> Self {
        Self::new()
    }
}

/// Starts transactions at a steady rate up to a total, for every driver at once.
pub struct Pacer {
    t0: Instant,
    rate: f64,
    target: u64,
    issued: AtomicU64,
    stopped: AtomicBool,
}

impl Pacer {
    pub fn new(rate: f64, target: u64) -> Self {
        Self {
            t0: Instant::now(),
            rate: rate.max(0.01),
            target,
            issued: AtomicU64::new(0),
            stopped: AtomicBool::new(false),
        }
    }

    /// The next start slot, or `None` once the total is reached or the pacer is stopped.
    pub fn next(&self) -> Option<Instant> {
        if self.stopped.load(Ordering::Relaxed) {
            return None;
        }
        let i = self.issued.fetch_add(1, Ordering::Relaxed);
        if i >= self.target {
            return None;
        }
        Some(self.t0 + Duration::from_secs_f64(i as f64 / self.rate))
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::Relaxed);
    }

    pub fn stopped(&self) -> bool {
        self.stopped.load(Ordering::Relaxed) || self.issued.load(Ordering::Relaxed) >= self.target
    }

    pub fn issued(&self) -> u64 {
        self.issued.load(Ordering::Relaxed).min(self.target)
    }
}

/// Outcome counts: (source, kind) → label → n.
pub fn tally(txs: &[TxRecord]) -> BTreeMap<(String, TxKind), BTreeMap<String, u64>> {
    let mut out: BTreeMap<(String, TxKind), BTreeMap<String, u64>> = BTreeMap::new();
    for t in txs {
        *out.entry((t.source.to_string(), t.kind))
            .or_default()
            .entry(short(&t.outcome))
            .or_default() += 1;
    }
    out
}

/// The outcome label without per-transaction detail (ids, amounts: numbers become `#`), so
/// counts group.
pub fn short(o: &Outcome) -> String {
    let l = o.label();
    let cut = l.find(" (").unwrap_or(l.len());
    let mut out = String::new();
    let mut in_number = false;
    for c in l[..cut].chars() {
        if c.is_ascii_digit() || (in_number && c == '.') {
            if !in_number {
                out.push('#');
            }
            in_number = true;
        } else {
            in_number = false;
            out.push(c);
        }
    }
    out.chars().take(90).collect()
}
