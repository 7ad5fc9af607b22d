//! The audit from raw data: it opens every role's SQLite journal, every box journal and
//! every card file itself (no running process is asked anything), decodes the records with
//! the `headend` and `proto` types, and checks that value was conserved.
//!
//! Purchases, per currency: what the cards' logs say they paid = the security cards' totals
//! = the payment server's completed transactions = what the merchant released; and per
//! transaction: every card debit belongs to exactly one completed sale, every completed
//! sale to a card debit (when the card's history is complete) and to one release, and no
//! release to a sale that is not completed.
//!
//! Loads, per currency: what the cards' logs say they received = the load server's records
//! marked loaded = the HSM's totals = the captured holds = the issuer floats (bank float +
//! pre-funded float); every account's balance + what it moved to the float = its opening
//! balance; and per transaction: every card load belongs to exactly one loaded record with
//! a captured hold of the same amount, and back.
//!
//! In doubt: anything a box journal, the payment server, a funder, the load server or the
//! gateway still holds open, and what the simulated boxes report they could not resolve.
//!
//! Lifetimes: holds and offers open past their configured lifetime — checked only when the
//! role configurations carry lifetime keys (see [`Lifetimes`]).
//!
//! A card's log keeps only its last 32 records, so the harness also keeps each card's log
//! as it saw it during the run (a `<card>.history.json` next to the card file: every record
//! seen, by transaction counter). Every logged operation moves the counter by one, so the
//! union of both is provably complete when it holds every counter from 1 to the card's; if
//! it does not, the audit says so and checks only what it can.
//!
//! [`audit`] returns an [`AuditReport`]; its `Display` is the readable report, naming every
//! transaction that breaks an invariant.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use headend::funds::{Account, Hold, HoldState};
use headend::gateway::load::GwLoad;
use headend::gateway::{GwState, GwTxn};
use headend::load::{LoadRec, LoadState};
use headend::merchant::{OfferRecord, OfferState};
use headend::payment::{PayState, PayTxn};
use proto::card::CardState;
use proto::hsm::Hsm;
use proto::messages::Message;
use proto::money::{Currency, Money};
use proto::purse::{LogKind, LogRecord};
use proto::security_card::SecurityCard;
use rusqlite::{Connection, OpenFlags};
use serde::{Deserialize, Serialize};

/// Where the raw data is.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub gateway: PathBuf,
    /// The gateways' journal when they keep it on PostgreSQL (several gateways share one
    /// schema): read there, and `gateway` is not.
    pub gateway_postgres: Option<headend::journal::PgTarget>,
    pub payment: PathBuf,
    pub merchant: PathBuf,
    pub bank: PathBuf,
    pub load: PathBuf,
    /// `stbd` journals: (box id, `journal.sqlite`).
    pub boxes: Vec<(String, PathBuf)>,
    /// Card files (`vcard` format); a `<file>.history.json` next to one adds the log records
    /// seen during the run.
    pub cards: Vec<PathBuf>,
    /// What the simulated boxes could not resolve (JSON list of [`SimPending`]).
    pub sim_pending: Option<PathBuf>,
    /// The role configurations, for lifetimes.
    pub role_configs: Vec<PathBuf>,
    /// The moment the head end stopped (lifetimes are measured to it); now if `None`.
    pub as_of: Option<std::time::SystemTime>,
}

/// A simulated box's unresolved transaction, as it reports it at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimPending {
    pub box_id: String,
    pub transaction_id: String,
    pub what: String,
}

/// The history sidecar of a card file.
pub fn history_path(card: &Path) -> PathBuf {
    let mut p = card.as_os_str().to_owned();
    p.push(".history.json");
    p.into()
}

/// A card's history sidecar: its balance when personalised (if the harness knows it) and
/// every log record seen during the run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct History {
    pub opening_balance: Option<u64>,
    pub records: Vec<LogRecord>,
}

/// Writes `card`'s history sidecar.
pub fn write_history(card: &Path, h: &History) -> Result<(), String> {
    let p = history_path(card);
    let text = serde_json::to_string(h).map_err(|e| e.to_string())?;
    std::fs::write(&p, text).map_err(|e| format!("{}: {e}", p.display()))
}

/// Reads `card`'s history sidecar (empty if there is none).
pub fn read_history(card: &Path) -> Result<History, String> {
    let p = history_path(card);
    if !p.exists() {
        return Ok(History::default());
    }
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

/// Which ledger disagrees.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The invariant, short (e.g. "card debit without a completed sale").
    pub invariant: &'static str,
    pub txid: Option<String>,
    /// Where the evidence is (e.g. "card 57B00001 log atc 7 / payment txn").
    pub ledger: String,
    pub detail: String,
}

/// Something still open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Open {
    pub ledger: String,
    pub txid: String,
    pub state: String,
}

/// Per-currency totals, minor units.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub card_debits: u64,
    pub card_debit_count: u64,
    pub security_cards: u64,
    pub completions: u64,
    pub completion_count: u64,
    pub releases: u64,
    pub release_count: u64,
    pub card_credits: u64,
    pub card_credit_count: u64,
    pub loaded_records: u64,
    pub loaded_count: u64,
    pub hsm: u64,
    pub captured: u64,
    pub floats: u64,
    pub accounts_debited: u64,
}

/// Whether lifetimes could be checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LifetimeCheck {
    /// The configurations name no lifetimes: nothing to check against (why).
    NotCheckable(String),
    /// Checked against these lifetimes (seconds, by name); violations are in the report.
    Checked(Vec<(String, u64)>),
}

/// The audit's findings.
#[derive(Debug, Clone)]
pub struct AuditReport {
    pub totals: BTreeMap<Currency, Totals>,
    pub violations: Vec<Violation>,
    pub open: Vec<Open>,
    pub lifetimes: LifetimeCheck,
    /// Facts that limit the audit (e.g. a card whose history is incomplete).
    pub notes: Vec<String>,
    /// Releases per merchant id, and sales reversed per merchant id.
    pub per_merchant: BTreeMap<String, (u64, u64)>,
    /// Loads captured per funder ("bank", "voucher").
    pub per_funder: BTreeMap<String, u64>,
    pub cards: usize,
    pub cards_complete: usize,
    pub purchases_seen: usize,
    pub loads_seen: usize,
}

impl AuditReport {
    /// No invariant broken.
    pub fn conserved(&self) -> bool {
        self.violations.is_empty()
    }

    pub fn nothing_in_doubt(&self) -> bool {
        self.open.is_empty()
    }

    pub fn holds(&self) -> bool {
        self.conserved() && self.nothing_in_doubt()
    }

    /// The violations of one invariant.
    pub fn of(&self, invariant: &str) -> Vec<&Violation> {
        self.violations
            .iter()
            .filter(|v| v.invariant == invariant)
            .collect()
    }
}

/// The audit could not read its data (a missing or unreadable journal or card file).
#[derive(Debug)]
pub struct AuditError(pub String);

impl fmt::Display for AuditError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "audit: {}", self.0)
    }
}

impl std::error::Error for AuditError {}

fn err(e: impl fmt::Display) -> AuditError {
    AuditError(e.to_string())
}

/// A journal opened for reading.
struct Db {
    store: DbStore,
    name: String,
}

enum DbStore {
    /// The SQLite file, read with SQL of its own.
    Sqlite(Connection),
    /// A PostgreSQL schema, read through the journal's own reader.
    Journal(headend::journal::Journal),
}

#[derive(Debug, Clone)]
struct StepRow {
    txid: String,
    step: String,
}

impl Db {
    fn open(name: &str, path: &Path) -> Result<Self, AuditError> {
        if !path.exists() {
            return Err(AuditError(format!(
                "{name} journal {} does not exist",
                path.display()
            )));
        }
        // Read-write like any SQLite reader of a WAL database (it may need the -shm); the
        // audit never writes.
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| AuditError(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        Ok(Self {
            store: DbStore::Sqlite(conn),
            name: name.to_string(),
        })
    }

    fn open_postgres(name: &str, target: &headend::journal::PgTarget) -> Result<Self, AuditError> {
        let j = headend::journal::Journal::open_existing(&headend::journal::Target::Postgres(
            target.clone(),
        ))
        .map_err(|e| AuditError(format!("{name}: {e}")))?
        .ok_or_else(|| {
            AuditError(format!(
                "{name} journal: schema {} does not exist",
                target.schema
            ))
        })?;
        Ok(Self {
            store: DbStore::Journal(j),
            name: name.to_string(),
        })
    }

    fn sqlite(&self, what: &str) -> Result<&Connection, AuditError> {
        match &self.store {
            DbStore::Sqlite(c) => Ok(c),
            DbStore::Journal(_) => Err(AuditError(format!(
                "{}: {what} is read from SQLite journals only",
                self.name
            ))),
        }
    }

    fn state(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, AuditError> {
        if let DbStore::Journal(j) = &self.store {
            let k = headend::journal::Kind::ALL
                .into_iter()
                .find(|k| k.as_str() == kind)
                .ok_or_else(|| AuditError(format!("{}: no record kind {kind}", self.name)))?;
            return j
                .all(k)
                .map_err(|e| AuditError(format!("{}: {e}", self.name)));
        }
        let mut st = self
            .sqlite("state")?
            .prepare("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key")
            .map_err(|e| AuditError(format!("{}: {e}", self.name)))?;
        let rows = st
            .query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }

    fn steps(&self) -> Result<Vec<StepRow>, AuditError> {
        let mut st = self
            .sqlite("the step log")?
            .prepare("SELECT txid, step FROM steps ORDER BY id")
            .map_err(|e| AuditError(format!("{}: {e}", self.name)))?;
        let rows = st
            .query_map([], |r| {
                Ok(StepRow {
                    txid: r.get(0)?,
                    step: r.get(1)?,
                })
            })
            .map_err(err)?;
        rows.collect::<Result<_, _>>().map_err(err)
    }
}

/// A card as the audit sees it: its final state and every log record known.
struct CardView {
    state: CardState,
    records: BTreeMap<u32, LogRecord>,
    complete: bool,
}

fn card_name(id: u64) -> String {
    format!("card {id:X}")
}

fn money(m: u64, c: Currency) -> String {
    Money::new(m, c).to_string()
}

struct Ctx {
    violations: Vec<Violation>,
    open: Vec<Open>,
    notes: Vec<String>,
    totals: BTreeMap<Currency, Totals>,
}

impl Ctx {
    fn broken(
        &mut self,
        invariant: &'static str,
        txid: Option<&str>,
        ledger: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.violations.push(Violation {
            invariant,
            txid: txid.map(str::to_string),
            ledger: ledger.into(),
            detail: detail.into(),
        });
    }

    fn open(&mut self, ledger: impl Into<String>, txid: &str, state: impl Into<String>) {
        self.open.push(Open {
            ledger: ledger.into(),
            txid: txid.to_string(),
            state: state.into(),
        });
    }

    fn t(&mut self, c: Currency) -> &mut Totals {
        self.totals.entry(c).or_default()
    }
}

fn decode_all<T: serde::de::DeserializeOwned>(
    cx: &mut Ctx,
    db: &Db,
    kind: &str,
) -> Result<Vec<(String, T)>, AuditError> {
    let mut out = Vec::new();
    for (k, v) in db.state(kind)? {
        match headend::journal::decode::<T>(&v) {
            Ok(t) => out.push((k, t)),
            Err(e) => cx.broken(
                "journal record readable",
                Some(&k),
                format!("{} journal, kind {kind}", db.name),
                e,
            ),
        }
    }
    Ok(out)
}

fn read_cards(cx: &mut Ctx, files: &[PathBuf]) -> Result<BTreeMap<u64, CardView>, AuditError> {
    let mut out = BTreeMap::new();
    for f in files {
        let card = reader_drivers::vcard::VirtualCard::open(f).map_err(err)?;
        let state = card.state().clone();
        let mut records: BTreeMap<u32, LogRecord> = BTreeMap::new();
        let history = read_history(f).map_err(AuditError)?;
        for r in history.records {
            records.insert(r.atc, r);
        }
        for r in &state.log {
            if let Some(prev) = records.get(&r.atc) {
                if prev != r {
                    cx.broken(
                        "card log consistent",
                        None,
                        format!("{} ({})", card_name(state.card_id), f.display()),
                        format!(
                            "atc {}: the card's log holds {r:?} but it was seen during the run as {prev:?}",
                            r.atc
                        ),
                    );
                }
            }
            records.insert(r.atc, r.clone());
        }
        let complete = (1..=state.atc).all(|a| records.contains_key(&a))
            && records.keys().all(|a| *a >= 1 && *a <= state.atc);
        if !complete {
            let missing: Vec<u32> = (1..=state.atc)
                .filter(|a| !records.contains_key(a))
                .collect();
            cx.notes.push(format!(
                "{} ({}): history incomplete (counter {}, {} record(s) missing, e.g. atc {:?}); its totals are partial and sales or loads it cannot show are not held against it",
                card_name(state.card_id),
                f.display(),
                state.atc,
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
        // The balance chain: opening (before the first record) + credits - debits = balance,
        // record by record.
        if complete {
            let mut bal: Option<u64> = history.opening_balance;
            // The money purse's chain: points and authentications move other purses (or
            // none).
            for r in records.values().filter(|r| r.currency == state.currency) {
                let before = if r.kind.takes_value() {
                    r.balance_after.checked_add(r.amount)
                } else {
                    r.balance_after.checked_sub(r.amount)
                };
                if let (Some(b), Some(before)) = (bal, before) {
                    if b != before {
                        cx.broken(
                            "card balance chain",
                            None,
                            card_name(state.card_id),
                            format!(
                                "atc {}: balance before is {} by the record but {} after the previous one",
                                r.atc,
                                money(before, r.currency),
                                money(b, r.currency)
                            ),
                        );
                    }
                }
                bal = Some(r.balance_after);
            }
            if let Some(b) = bal {
                if b != state.balance {
                    cx.broken(
                        "card balance chain",
                        None,
                        card_name(state.card_id),
                        format!(
                            "the last log record leaves {} but the card holds {}",
                            money(b, state.currency),
                            money(state.balance, state.currency)
                        ),
                    );
                }
            }
        }
        if out.contains_key(&state.card_id) {
            return Err(AuditError(format!(
                "two card files for {}",
                card_name(state.card_id)
            )));
        }
        out.insert(
            state.card_id,
            CardView {
                state,
                records,
                complete,
            },
        );
    }
    Ok(out)
}

/// Purchase states of a box journal in which value may be in flight, and the settled ones
/// (`stb::journal`). A state the audit does not know counts as in doubt.
const BOX_SETTLED: &[&str] = &["completed", "ended"];
/// Accepted, but the draw request never went out: nothing anywhere to settle.
const BOX_UNSENT: &str = "accepted";
const BOX_LOAD_SETTLED: &[&str] = &["load_completed", "load_ended"];

fn box_journals(
    cx: &mut Ctx,
    boxes: &[(String, PathBuf)],
) -> Result<BTreeMap<String, (String, String)>, AuditError> {
    // txid -> (box, state)
    let mut states = BTreeMap::new();
    for (box_id, path) in boxes {
        if !path.exists() {
            cx.notes
                .push(format!("box {box_id}: no journal at {}", path.display()));
            continue;
        }
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| AuditError(format!("{}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        for (table, settled) in [("txns", BOX_SETTLED), ("loads", BOX_LOAD_SETTLED)] {
            let mut st = match conn.prepare(&format!(
                "SELECT transaction_id, state FROM {table} ORDER BY created_at, rowid"
            )) {
                Ok(s) => s,
                Err(e) if e.to_string().contains("no such table") => continue,
                Err(e) => return Err(AuditError(format!("{}: {e}", path.display()))),
            };
            let rows: Vec<(String, String)> = st
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for (txid, state) in rows {
                if !settled.contains(&state.as_str()) && state != BOX_UNSENT {
                    cx.open(
                        format!("box {box_id} journal ({table})"),
                        &txid,
                        state.clone(),
                    );
                }
                states.insert(txid, (box_id.clone(), state));
            }
        }
    }
    Ok(states)
}

/// The lifetimes the role configurations set (seconds), by the key that sets them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lifetimes {
    /// `[gateway] offer_lifetime_secs`: purchase and load offers not drawn / requested.
    pub gateway_offer: Option<u64>,
    /// `[gateway] hold_lifetime_secs`: a load between its request and its response.
    pub gateway_hold: Option<u64>,
    /// `[merchant] offer_lifetime_secs`: offers without a confirmation.
    pub merchant_offer: Option<u64>,
}

impl Lifetimes {
    fn named(&self) -> Vec<(String, u64)> {
        [
            ("[gateway] offer_lifetime_secs", self.gateway_offer),
            ("[gateway] hold_lifetime_secs", self.gateway_hold),
            ("[merchant] offer_lifetime_secs", self.merchant_offer),
        ]
        .into_iter()
        .filter_map(|(n, v)| Some((n.to_string(), v?)))
        .collect()
    }
}

/// Reads the lifetime keys from the role configurations. A role that does not know them
/// (before issue 11's item 8) would refuse the key, so their absence means "not in this
/// build"; their defaults apply when the section is there but the key is not.
pub fn lifetimes(configs: &[PathBuf]) -> Lifetimes {
    let mut out = Lifetimes::default();
    let known = headend_knows_lifetimes();
    for c in configs {
        let Ok(text) = std::fs::read_to_string(c) else {
            continue;
        };
        let Ok(v) = text.parse::<toml::Table>() else {
            continue;
        };
        let get = |section: &str, key: &str| {
            let t = v.get(section)?.as_table()?;
            match t.get(key).and_then(|x| x.as_integer()) {
                Some(n) => Some(n.max(0) as u64),
                None => known.map(|(offer, hold)| {
                    if key == "hold_lifetime_secs" {
                        hold
                    } else {
                        offer
                    }
                }),
            }
        };
        if v.contains_key("gateway") {
            out.gateway_offer = get("gateway", "offer_lifetime_secs");
            out.gateway_hold = get("gateway", "hold_lifetime_secs");
        }
        if v.contains_key("merchant") {
            out.merchant_offer = get("merchant", "offer_lifetime_secs");
        }
    }
    out
}

/// The head end's default offer and hold lifetimes, if this build has lifetimes.
fn headend_knows_lifetimes() -> Option<(u64, u64)> {
    Some((
        headend::config::default_offer_lifetime(),
        headend::config::default_hold_lifetime(),
    ))
}

/// Runs every check.
pub fn audit(src: &Sources) -> Result<AuditReport, AuditError> {
    let mut cx = Ctx {
        violations: Vec::new(),
        open: Vec::new(),
        notes: Vec::new(),
        totals: BTreeMap::new(),
    };
    let cards = read_cards(&mut cx, &src.cards)?;
    let box_states = box_journals(&mut cx, &src.boxes)?;

    let payment = Db::open("payment", &src.payment)?;
    let merchant = Db::open("merchant", &src.merchant)?;
    let gateway = match &src.gateway_postgres {
        Some(t) => Db::open_postgres("gateway", t)?,
        None => Db::open("gateway", &src.gateway)?,
    };
    let bank = Db::open("bank", &src.bank)?;
    let load = Db::open("load", &src.load)?;

    let mut per_merchant: BTreeMap<String, (u64, u64)> = BTreeMap::new();

    // ---------------------------------------------------------------- purchases
    let pay: Vec<(String, PayTxn)> = decode_all(&mut cx, &payment, "txn")?;
    let security_cards: Vec<(String, SecurityCard)> = decode_all(&mut cx, &payment, "psam")?;
    let offers: BTreeMap<String, OfferRecord> = decode_all(&mut cx, &merchant, "offer")?
        .into_iter()
        .collect();
    let releases: BTreeMap<String, Vec<u8>> = merchant.state("release")?.into_iter().collect();
    let merchant_steps = merchant.steps()?;
    let gw: BTreeMap<String, GwTxn> = decode_all(&mut cx, &gateway, "gw")?.into_iter().collect();
    let pay_by_txid: BTreeMap<&str, &PayTxn> = pay.iter().map(|(k, t)| (k.as_str(), t)).collect();
    let mut pay_by_psam: BTreeMap<(u64, u32), &PayTxn> = BTreeMap::new();
    for (k, t) in &pay {
        if k != &t.transaction_id {
            cx.broken(
                "journal record readable",
                Some(k),
                "payment txn",
                format!("stored under {k} but names {}", t.transaction_id),
            );
        }
        if let Some(other) = pay_by_psam.insert((t.security_card_id, t.security_card_txn), t) {
            cx.broken(
                "one sale per security-card transaction",
                Some(&t.transaction_id),
                format!(
                    "payment txn / security card {:X} txn {}",
                    t.security_card_id, t.security_card_txn
                ),
                format!("also used by {}", other.transaction_id),
            );
        }
    }

    // Security-card totals, per card and in all.
    let mut completed_by_psam: BTreeMap<u64, BTreeMap<Currency, u64>> = BTreeMap::new();
    for (_, t) in &pay {
        match t.state {
            PayState::Completed => {
                *completed_by_psam
                    .entry(t.security_card_id)
                    .or_default()
                    .entry(t.amount.currency)
                    .or_default() += t.amount.minor;
                let tt = cx.t(t.amount.currency);
                tt.completions += t.amount.minor;
                tt.completion_count += 1;
            }
            PayState::DebitIssued => cx.open(
                "payment txn",
                &t.transaction_id,
                "DebitIssued (awaiting the debit response or reversal)",
            ),
            PayState::Reversed => {
                per_merchant.entry(t.merchant_id.clone()).or_default().1 += 1;
            }
        }
    }
    for (slot, card) in &security_cards {
        for (c, tot) in &card.totals {
            cx.t(*c).security_cards += tot.amount;
            let done = completed_by_psam
                .get(&card.id)
                .and_then(|m| m.get(c))
                .copied()
                .unwrap_or(0);
            if tot.amount != done {
                cx.broken(
                    "security-card totals = its completed sales",
                    None,
                    format!("security card {:X} (slot {slot})", card.id),
                    format!(
                        "the card counts {} but the payment server completed {} on it",
                        money(tot.amount, *c),
                        money(done, *c)
                    ),
                );
            }
        }
        for c in completed_by_psam
            .get(&card.id)
            .map(|m| m.keys().copied().collect::<Vec<_>>())
            .unwrap_or_default()
        {
            if !card.totals.contains_key(&c) {
                cx.broken(
                    "security-card totals = its completed sales",
                    None,
                    format!("security card {:X} (slot {slot})", card.id),
                    format!(
                        "no {} total but completed sales in {}",
                        c.alpha(),
                        c.alpha()
                    ),
                );
            }
        }
    }

    // Card debits ↔ sales.
    let mut debited_sales: BTreeSet<String> = BTreeSet::new();
    for cv in cards.values() {
        for r in cv.records.values().filter(|r| r.kind == LogKind::Debit) {
            let tt = cx.t(r.currency);
            tt.card_debits += r.amount;
            tt.card_debit_count += 1;
            let ledger = format!(
                "{} log atc {} (security card {:X} txn {})",
                card_name(cv.state.card_id),
                r.atc,
                r.counterparty,
                r.counterparty_txn
            );
            let Some(t) = pay_by_psam.get(&(r.counterparty, r.counterparty_txn)) else {
                cx.broken(
                    "card debit belongs to a sale",
                    None,
                    ledger,
                    format!(
                        "the card paid {} but the payment server has no transaction for that security-card transaction",
                        money(r.amount, r.currency)
                    ),
                );
                continue;
            };
            let txid = t.transaction_id.as_str();
            if t.card_id != cv.state.card_id || t.amount != Money::new(r.amount, r.currency) {
                cx.broken(
                    "same amount in every ledger",
                    Some(txid),
                    format!("{ledger} / payment txn"),
                    format!(
                        "{} paid {} but the sale is {} for {}",
                        card_name(cv.state.card_id),
                        money(r.amount, r.currency),
                        card_name(t.card_id),
                        t.amount
                    ),
                );
            }
            if !debited_sales.insert(txid.to_string()) {
                cx.broken(
                    "one card debit per sale",
                    Some(txid),
                    ledger.clone(),
                    "a second card debit for the same sale",
                );
            }
            let box_view = box_states
                .get(txid)
                .map(|(b, s)| format!("; box {b} journal says {s}"))
                .unwrap_or_default();
            match t.state {
                PayState::Completed => {}
                PayState::Reversed => cx.broken(
                    "card debit belongs to a completed sale",
                    Some(txid),
                    format!("{ledger} / payment txn Reversed"),
                    format!(
                        "the card paid {} but the sale was reversed: value destroyed{box_view}",
                        money(r.amount, r.currency)
                    ),
                ),
                // Listed as open above; a sale still open is not (yet) a broken one.
                PayState::DebitIssued => {}
            }
        }
    }

    // Completed sales ↔ card debits and releases; releases ↔ sales.
    for (txid, t) in &pay {
        if t.state != PayState::Completed {
            continue;
        }
        match cards.get(&t.card_id) {
            Some(cv) if cv.complete => {
                if !debited_sales.contains(txid) {
                    cx.broken(
                        "completed sale has its card debit",
                        Some(txid),
                        format!("payment txn Completed / {}", card_name(t.card_id)),
                        format!(
                            "the sale of {} is completed but the card's full history has no debit for security card {:X} txn {}: value created",
                            t.amount, t.security_card_id, t.security_card_txn
                        ),
                    );
                }
            }
            Some(_) => {}
            None => cx.notes.push(format!(
                "sale {txid}: {} is not among the card files; its debit was not checked",
                card_name(t.card_id)
            )),
        }
        if !releases.contains_key(txid) {
            cx.broken(
                "completed sale is released",
                Some(txid),
                format!("payment txn Completed / merchant ({})", t.merchant_id),
                format!(
                    "paid {} (FIG. {}) but the merchant released nothing",
                    t.amount,
                    fig(t.embodiment)
                ),
            );
        }
    }
    let mut release_count: BTreeMap<&str, usize> = BTreeMap::new();
    for s in &merchant_steps {
        if s.step == "goods released" {
            *release_count.entry(s.txid.as_str()).or_default() += 1;
        }
    }
    for (txid, n) in &release_count {
        if *n > 1 {
            cx.broken(
                "released at most once",
                Some(txid),
                "merchant steps",
                format!("goods released {n} times"),
            );
        }
    }
    for txid in releases.keys() {
        let Some(rec) = offers.get(txid) else {
            cx.broken(
                "release has its offer",
                Some(txid),
                "merchant release",
                "released with no offer record",
            );
            continue;
        };
        let amount = rec.offer.amount;
        let tt = cx.t(amount.currency);
        tt.releases += amount.minor;
        tt.release_count += 1;
        per_merchant
            .entry(rec.offer.merchant_id.clone())
            .or_default()
            .0 += 1;
        if rec.state != OfferState::Released {
            cx.broken(
                "release has its offer",
                Some(txid),
                "merchant release / offer",
                format!("released but the offer record says {:?}", rec.state),
            );
        }
        match pay_by_txid.get(txid.as_str()) {
            None => cx.broken(
                "release has a completed sale",
                Some(txid),
                format!("merchant release ({}) / payment", rec.offer.merchant_id),
                format!("released {amount} but the payment server never drew it"),
            ),
            Some(t) => {
                if t.amount != amount {
                    cx.broken(
                        "same amount in every ledger",
                        Some(txid),
                        "merchant offer / payment txn",
                        format!("offer {amount}, sale {}", t.amount),
                    );
                }
                match t.state {
                    PayState::Completed => {}
                    PayState::Reversed => cx.broken(
                        "release has a completed sale",
                        Some(txid),
                        format!("merchant release ({}) / payment txn Reversed", rec.offer.merchant_id),
                        format!(
                            "goods released for {amount} but the sale is reversed (FIG. {}): merchant unpaid",
                            fig(t.embodiment)
                        ),
                    ),
                    PayState::DebitIssued => {}
                }
            }
        }
    }
    for (txid, g) in &gw {
        if let Some(Message::Receipt(r)) = &g.receipt {
            if r.released && !releases.contains_key(txid) {
                cx.broken(
                    "gateway receipt matches a release",
                    Some(txid),
                    "gateway gw / merchant",
                    "the gateway relayed a release the merchant has no record of",
                );
            }
        }
    }
    for (key, _) in gateway.state("notify")? {
        cx.open(
            "gateway notify (debit response not yet delivered to the payment server)",
            key.rsplit_once('/').map_or(key.as_str(), |(t, _)| t),
            "pending",
        );
    }
    for (key, _) in gateway.state("release")? {
        cx.open(
            "gateway release (confirmation not yet delivered to the merchant)",
            key.rsplit_once('/').map_or(key.as_str(), |(t, _)| t),
            "pending",
        );
    }
    // Reversals reach the merchant (its offer moves to Reversed) through the gateway's
    // reading of the payment server's feed.
    let feed: Vec<(String, proto::messages::ReversalNotice)> =
        decode_all(&mut cx, &payment, "reversal")?;
    let last_seq = feed.iter().map(|(_, n)| n.seq).max().unwrap_or(0);
    let cursor = gateway
        .state("cursor")?
        .into_iter()
        .find(|(k, _)| k == "payment")
        .and_then(|(_, v)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_be_bytes);
    if cursor < last_seq {
        cx.open(
            "gateway reversal feed (reversals not yet passed on to the merchant)",
            &format!("feed positions {}..={last_seq}", cursor + 1),
            "pending",
        );
    }
    for (_, n) in &feed {
        let Some(t) = pay_by_txid.get(n.transaction_id.as_str()) else {
            continue;
        };
        if t.state != PayState::Reversed || n.seq > cursor {
            continue;
        }
        match offers.get(&n.transaction_id).map(|o| o.state) {
            Some(OfferState::Reversed) | Some(OfferState::Released) => {}
            other => cx.broken(
                "reversed sale is reversed at the merchant",
                Some(&n.transaction_id),
                format!("payment reversal feed #{} / merchant offer", n.seq),
                format!(
                    "the payment server reversed it and the gateway passed position {cursor}, but the merchant's offer is {}",
                    other.map_or("missing".to_string(), |s| format!("{s:?}"))
                ),
            ),
        }
    }
    let gwloads: BTreeMap<String, GwLoad> = decode_all(&mut cx, &gateway, "gwload")?
        .into_iter()
        .collect();
    for (txid, t) in &gwloads {
        if t.awaiting_operator && t.is_open() {
            cx.open(
                "gateway gwload",
                txid,
                "past its hold lifetime: awaiting the box's proof or an operator",
            );
        }
    }

    // ---------------------------------------------------------------- loads
    let recs: Vec<(String, LoadRec)> = decode_all(&mut cx, &load, "load")?;
    let hsm: Vec<(String, Hsm)> = decode_all(&mut cx, &load, "hsm")?;
    let bank_holds: Vec<(String, Hold)> = decode_all(&mut cx, &bank, "hold")?;
    let pre_holds: Vec<(String, Hold)> = decode_all(&mut cx, &load, "hold")?;
    let bank_accounts: Vec<(String, Account)> = decode_all(&mut cx, &bank, "account")?;
    let pre_accounts: Vec<(String, Account)> = decode_all(&mut cx, &load, "account")?;
    let bank_float: Vec<(String, Money)> = decode_all(&mut cx, &bank, "float")?;
    let pre_float: Vec<(String, Money)> = decode_all(&mut cx, &load, "float")?;

    let mut rec_by_card_atc: BTreeMap<(u64, u32), &LoadRec> = BTreeMap::new();
    for (_, r) in &recs {
        match r.state {
            LoadState::Loaded => {
                let tt = cx.t(r.amount.currency);
                tt.loaded_records += r.amount.minor;
                tt.loaded_count += 1;
            }
            LoadState::Authorized | LoadState::NegativePending => {
                cx.open("load record", &r.transaction_id, format!("{:?}", r.state))
            }
            LoadState::NotLoaded | LoadState::Refused => {}
        }
        if let Message::LoadCommand(c) = &r.answer {
            rec_by_card_atc.insert((c.command.card_id, c.command.atc), r);
        }
    }
    for (_, h) in &hsm {
        for (c, tot) in &h.totals {
            cx.t(*c).hsm += tot.amount;
        }
    }
    // Card loads ↔ load records.
    let mut loaded_on_card: BTreeSet<String> = BTreeSet::new();
    for cv in cards.values() {
        for r in cv.records.values().filter(|r| r.kind == LogKind::Load) {
            let tt = cx.t(r.currency);
            tt.card_credits += r.amount;
            tt.card_credit_count += 1;
            let ledger = format!("{} log atc {}", card_name(cv.state.card_id), r.atc);
            let Some(rec) = rec_by_card_atc.get(&(cv.state.card_id, r.atc)) else {
                cx.broken(
                    "card load belongs to a load record",
                    None,
                    ledger,
                    format!(
                        "the card received {} but the load server issued no load command for this counter",
                        money(r.amount, r.currency)
                    ),
                );
                continue;
            };
            let txid = rec.transaction_id.as_str();
            loaded_on_card.insert(txid.to_string());
            if rec.amount != Money::new(r.amount, r.currency) {
                cx.broken(
                    "same amount in every ledger",
                    Some(txid),
                    format!("{ledger} / load record"),
                    format!(
                        "card received {} but the record is for {}",
                        money(r.amount, r.currency),
                        rec.amount
                    ),
                );
            }
            match rec.state {
                LoadState::Loaded => {}
                LoadState::NotLoaded | LoadState::Refused => cx.broken(
                    "card load belongs to a loaded record",
                    Some(txid),
                    format!("{ledger} / load record {:?}", rec.state),
                    format!(
                        "the card received {} but the load server settled it as not loaded: value created",
                        money(r.amount, r.currency)
                    ),
                ),
                LoadState::Authorized | LoadState::NegativePending => {}
            }
        }
    }
    // Holds by transaction, across both funders.
    let mut holds: BTreeMap<&str, (&'static str, &Hold)> = BTreeMap::new();
    for (funder, list) in [("bank", &bank_holds), ("voucher", &pre_holds)] {
        for (k, h) in list.iter() {
            if let Some((other, _)) = holds.insert(k.as_str(), (funder, h)) {
                cx.broken(
                    "one hold per load",
                    Some(k),
                    format!("{funder} hold / {other} hold"),
                    "two funders hold for the same load",
                );
            }
        }
    }
    let mut per_funder: BTreeMap<String, u64> = BTreeMap::new();
    for (txid, (funder, h)) in &holds {
        match h.state {
            HoldState::Held => cx.open(format!("{funder} hold ({})", h.account), txid, "Held"),
            HoldState::Captured => {
                cx.t(h.amount.currency).captured += h.amount.minor;
                *per_funder.entry(funder.to_string()).or_default() += 1;
                match recs.iter().find(|(k, _)| k == txid).map(|(_, r)| r) {
                    Some(r) if r.state == LoadState::Loaded => {
                        if r.amount != h.amount {
                            cx.broken(
                                "same amount in every ledger",
                                Some(txid),
                                format!("{funder} hold / load record"),
                                format!("captured {} but loaded {}", h.amount, r.amount),
                            );
                        }
                    }
                    other => cx.broken(
                        "captured hold belongs to a loaded record",
                        Some(txid),
                        format!("{funder} hold Captured / load record"),
                        format!(
                            "{} taken from {} but the load server says {}",
                            h.amount,
                            h.account,
                            other
                                .map(|r| format!("{:?}", r.state))
                                .unwrap_or("nothing".into())
                        ),
                    ),
                }
            }
            HoldState::Released => {}
        }
    }
    for (txid, r) in &recs {
        if r.state != LoadState::Loaded {
            continue;
        }
        match holds.get(txid.as_str()) {
            Some((_, h)) if h.state == HoldState::Captured => {}
            Some((funder, h)) => cx.broken(
                "loaded record has its captured hold",
                Some(txid),
                format!("load record Loaded / {funder} hold {:?}", h.state),
                format!(
                    "the card was loaded {} but the funder's hold is {:?}{}",
                    r.amount,
                    h.state,
                    if h.state == HoldState::Released {
                        ": value created"
                    } else {
                        ""
                    }
                ),
            ),
            None => cx.broken(
                "loaded record has its captured hold",
                Some(txid),
                "load record Loaded / funders",
                format!(
                    "the card was loaded {} but no funder holds anything for it: value created",
                    r.amount
                ),
            ),
        }
        match cards.get(&r.card_id) {
            Some(cv) if cv.complete => {
                if !loaded_on_card.contains(txid) {
                    cx.broken(
                        "loaded record has its card load",
                        Some(txid),
                        format!("load record Loaded / {}", card_name(r.card_id)),
                        format!(
                            "settled as loaded ({}) but the card's full history has no such load: value destroyed",
                            r.amount
                        ),
                    );
                }
            }
            Some(_) => {}
            None => cx.notes.push(format!(
                "load {txid}: {} is not among the card files; its credit was not checked",
                card_name(r.card_id)
            )),
        }
    }
    // Accounts and floats, per funder.
    for (funder, accounts, floats, holds) in [
        ("bank", &bank_accounts, &bank_float, &bank_holds),
        ("voucher", &pre_accounts, &pre_float, &pre_holds),
    ] {
        let mut opening: BTreeMap<Currency, u64> = BTreeMap::new();
        let mut balance: BTreeMap<Currency, u64> = BTreeMap::new();
        for (id, a) in accounts.iter() {
            *opening.entry(a.currency).or_default() += a.opening_balance;
            *balance.entry(a.currency).or_default() += a.balance;
            cx.t(a.currency).accounts_debited += a.opening_balance.saturating_sub(a.balance);
            let held: u64 = holds
                .iter()
                .filter(|(_, h)| h.account == *id && h.state == HoldState::Held)
                .map(|(_, h)| h.amount.minor)
                .sum();
            let captured: u64 = holds
                .iter()
                .filter(|(_, h)| h.account == *id && h.state == HoldState::Captured)
                .map(|(_, h)| h.amount.minor)
                .sum();
            if a.held != held {
                cx.broken(
                    "account held = its open holds",
                    None,
                    format!("{funder} account {id}"),
                    format!(
                        "holds {} but its open holds total {}",
                        money(a.held, a.currency),
                        money(held, a.currency)
                    ),
                );
            }
            if a.opening_balance.checked_sub(a.balance) != Some(captured) {
                cx.broken(
                    "account debited = its captured holds",
                    None,
                    format!("{funder} account {id}"),
                    format!(
                        "opened with {} and holds {}, but its captured holds total {}",
                        money(a.opening_balance, a.currency),
                        money(a.balance, a.currency),
                        money(captured, a.currency)
                    ),
                );
            }
        }
        let mut float: BTreeMap<Currency, u64> = BTreeMap::new();
        for (_, m) in floats.iter() {
            *float.entry(m.currency).or_default() += m.minor;
            cx.t(m.currency).floats += m.minor;
        }
        let currencies: BTreeSet<Currency> = opening.keys().chain(float.keys()).copied().collect();
        for c in currencies {
            let (o, b, f) = (
                opening.get(&c).copied().unwrap_or(0),
                balance.get(&c).copied().unwrap_or(0),
                float.get(&c).copied().unwrap_or(0),
            );
            if b.checked_add(f) != Some(o) {
                cx.broken(
                    "account balances + float = opening balances",
                    None,
                    format!("{funder} accounts / {funder} float"),
                    format!(
                        "{}: balances {} + float {} ≠ opening {}",
                        c.alpha(),
                        money(b, c),
                        money(f, c),
                        money(o, c)
                    ),
                );
            }
        }
    }

    // ---------------------------------------------------------------- totals
    let complete_all = cards.values().all(|c| c.complete);
    let totals = cx.totals.clone();
    for (c, t) in &totals {
        let purchase = [
            ("security-card totals", t.security_cards),
            ("payment completions", t.completions),
            ("merchant releases", t.releases),
        ];
        let mut chain = vec![("card debits", t.card_debits)];
        if !complete_all {
            chain.clear();
        }
        chain.extend(purchase);
        if chain.windows(2).any(|w| w[0].1 != w[1].1) {
            cx.broken(
                "purchase totals equal",
                None,
                format!("{} totals", c.alpha()),
                chain
                    .iter()
                    .map(|(n, v)| format!("{n} {}", money(*v, *c)))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        let mut chain = vec![("card credits", t.card_credits)];
        if !complete_all {
            chain.clear();
        }
        chain.extend([
            ("loaded records", t.loaded_records),
            ("HSM totals", t.hsm),
            ("captured holds", t.captured),
            ("floats", t.floats),
            ("accounts debited", t.accounts_debited),
        ]);
        if chain.windows(2).any(|w| w[0].1 != w[1].1) {
            cx.broken(
                "load totals equal",
                None,
                format!("{} totals", c.alpha()),
                chain
                    .iter()
                    .map(|(n, v)| format!("{n} {}", money(*v, *c)))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
    }

    // ---------------------------------------------------------------- the simulated boxes
    if let Some(p) = &src.sim_pending {
        if p.exists() {
            let text = std::fs::read_to_string(p).map_err(err)?;
            let list: Vec<SimPending> = serde_json::from_str(&text)
                .map_err(|e| AuditError(format!("{}: {e}", p.display())))?;
            for s in list {
                cx.open(
                    format!("simulated box {}", s.box_id),
                    &s.transaction_id,
                    s.what,
                );
            }
        }
    }

    // ---------------------------------------------------------------- lifetimes
    let lt = lifetimes(&src.role_configs);
    let lifetimes = if lt.named().is_empty() {
        LifetimeCheck::NotCheckable("the role configurations set no offer or hold lifetime".into())
    } else {
        let as_of = src
            .as_of
            .unwrap_or_else(std::time::SystemTime::now)
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        check_lifetimes(&mut cx, &lt, as_of, &gw, &gwloads, &offers, &holds, &recs);
        LifetimeCheck::Checked(lt.named())
    };

    let purchases_seen = offers.len();
    let loads_seen = recs.len().max(holds.len());
    Ok(AuditReport {
        totals: cx.totals,
        violations: cx.violations,
        open: cx.open,
        lifetimes,
        notes: cx.notes,
        per_merchant,
        per_funder,
        cards: cards.len(),
        cards_complete: cards.values().filter(|c| c.complete).count(),
        purchases_seen,
        loads_seen,
    })
}

fn fig(e: proto::messages::Embodiment) -> u8 {
    use proto::messages::Embodiment::*;
    match e {
        SecurityCard => 4,
        PaymentServer => 5,
        Gateway => 6,
        Merchant => 7,
    }
}

/// What a sweep may lag behind a lifetime: its period (5 s) and a restart of its role.
pub const SWEEP_SLACK_SECS: u64 = 15;

/// Offers and holds still open past their lifetime (+ [`SWEEP_SLACK_SECS`]) at `as_of`
/// (seconds since the epoch).
#[allow(clippy::too_many_arguments)]
fn check_lifetimes(
    cx: &mut Ctx,
    lt: &Lifetimes,
    as_of: u64,
    gw: &BTreeMap<String, GwTxn>,
    gwloads: &BTreeMap<String, GwLoad>,
    offers: &BTreeMap<String, OfferRecord>,
    holds: &BTreeMap<&str, (&'static str, &Hold)>,
    recs: &[(String, LoadRec)],
) {
    let past = |since: u64, life: u64| as_of > since + life + SWEEP_SLACK_SECS;
    if let Some(life) = lt.merchant_offer {
        for (txid, o) in offers {
            if o.state == OfferState::Offered && past(o.created, life) {
                cx.broken(
                    "no offer open past its lifetime",
                    Some(txid),
                    format!("merchant offer ({})", o.offer.merchant_id),
                    format!(
                        "still Offered {} s after it was made; lifetime {life} s",
                        as_of - o.created
                    ),
                );
            }
        }
    }
    if let Some(life) = lt.gateway_offer {
        for (txid, t) in gw {
            if t.state == GwState::Offered && past(t.created, life) {
                cx.broken(
                    "no offer open past its lifetime",
                    Some(txid),
                    format!("gateway gw ({})", t.merchant_id),
                    format!(
                        "still Offered {} s after it was relayed; lifetime {life} s",
                        as_of - t.created
                    ),
                );
            }
        }
        for (txid, t) in gwloads {
            if t.is_open() && t.request.is_none() && past(t.created, life) {
                cx.broken(
                    "no offer open past its lifetime",
                    Some(txid),
                    format!("gateway gwload ({})", t.funder),
                    format!("load offer not requested and not expired {} s after it was relayed; lifetime {life} s", as_of - t.created),
                );
            }
        }
    }
    if let Some(life) = lt.gateway_hold {
        let authorised = |txid: &str| {
            recs.iter().any(|(k, r)| {
                k == txid && matches!(r.state, LoadState::Authorized | LoadState::NegativePending)
            })
        };
        for (txid, t) in gwloads {
            let Some(at) = t.requested_at else { continue };
            if !t.is_open() || !past(at, life) {
                continue;
            }
            if t.awaiting_operator || authorised(txid) {
                // Never released blindly: the box's proof or an operator settles it. It is
                // listed as open (in doubt).
                continue;
            }
            cx.broken(
                "no hold open past its lifetime",
                Some(txid),
                format!("gateway gwload ({})", t.funder),
                format!(
                    "the load server never authorised it, yet it is neither released nor settled {} s after the request; lifetime {life} s",
                    as_of - at
                ),
            );
        }
        for (txid, (funder, h)) in holds {
            if h.state != HoldState::Held {
                continue;
            }
            let Some(at) = gwloads.get(*txid).and_then(|t| t.requested_at) else {
                continue;
            };
            if past(at, life) && !authorised(txid) {
                cx.broken(
                    "no hold open past its lifetime",
                    Some(txid),
                    format!("{funder} hold ({})", h.account),
                    format!(
                        "Held {} s after the load request with no S2 issued; lifetime {life} s",
                        as_of - at
                    ),
                );
            }
        }
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "AUDIT: {} — {} invariant violation(s), {} open item(s)",
            if self.holds() { "HOLDS" } else { "FAILED" },
            self.violations.len(),
            self.open.len()
        )?;
        writeln!(
            f,
            "  data: {} card file(s) ({} with complete history), {} purchase offer(s), {} load(s)",
            self.cards, self.cards_complete, self.purchases_seen, self.loads_seen
        )?;
        for (c, t) in &self.totals {
            let m = |v: u64| money(v, *c);
            writeln!(
                f,
                "  {} purchases: card debits {} ({}) | security-card totals {} | payment completions {} ({}) | merchant releases {} ({})",
                c.alpha(),
                m(t.card_debits),
                t.card_debit_count,
                m(t.security_cards),
                m(t.completions),
                t.completion_count,
                m(t.releases),
                t.release_count
            )?;
            writeln!(
                f,
                "  {} loads:     card credits {} ({}) | loaded records {} ({}) | HSM totals {} | captured holds {} | floats {} | accounts debited {}",
                c.alpha(),
                m(t.card_credits),
                t.card_credit_count,
                m(t.loaded_records),
                t.loaded_count,
                m(t.hsm),
                m(t.captured),
                m(t.floats),
                m(t.accounts_debited)
            )?;
        }
        if !self.per_merchant.is_empty() {
            let s: Vec<String> = self
                .per_merchant
                .iter()
                .map(|(m, (r, v))| format!("{m} {r}/{v}"))
                .collect();
            writeln!(f, "  released/reversed per merchant: {}", s.join(", "))?;
        }
        if !self.per_funder.is_empty() {
            let s: Vec<String> = self
                .per_funder
                .iter()
                .map(|(m, n)| format!("{m} {n}"))
                .collect();
            writeln!(f, "  captured loads per funder: {}", s.join(", "))?;
        }
        match &self.lifetimes {
            LifetimeCheck::NotCheckable(why) => {
                writeln!(f, "  lifetimes: not yet checkable — {why}")?
            }
            LifetimeCheck::Checked(l) => writeln!(
                f,
                "  lifetimes: checked against {}",
                l.iter()
                    .map(|(n, s)| format!("{n} = {s} s"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )?,
        }
        if !self.violations.is_empty() {
            writeln!(f, "  VIOLATIONS:")?;
            for v in &self.violations {
                writeln!(
                    f,
                    "   - [{}] {} @ {}: {}",
                    v.invariant,
                    v.txid.as_deref().unwrap_or("-"),
                    v.ledger,
                    v.detail
                )?;
            }
        }
        if !self.open.is_empty() {
            writeln!(f, "  STILL OPEN (in doubt):")?;
            for o in &self.open {
                writeln!(f, "   - {} @ {}: {}", o.txid, o.ledger, o.state)?;
            }
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! The audit against real data: a split deployment generated by [`crate::deploy`], each
    //! role served in this process on its own QUIC listener, simulated boxes buying from
    //! every merchant (one sale cancelled with proof) and loading from bank and voucher.
    //! The untouched data passes; each test then tampers with one fact in a copy of the
    //! journals or card files, and the audit must name it.

    use super::*;
    use std::sync::OnceLock;

    use headend::assembly::{self, Roles};
    use headend::config::HeadendConfig;

    use crate::deploy::{self, RoleName, Spec};
    use crate::fleet::{SimFleet, Timing};

    struct Fixture {
        dir: PathBuf,
        /// (txid, amount) of a completed EUR sale.
        sale: (String, u64),
        /// A captured bank load.
        bank_load: String,
        /// The card of the sale.
        card: String,
        /// A sale drawn, never debited, cancelled with the card's proof.
        reversed: String,
    }

    fn fixture() -> &'static Fixture {
        static F: OnceLock<Fixture> = OnceLock::new();
        F.get_or_init(|| {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(build())
        })
    }

    async fn build() -> Fixture {
        // Shared by every test of this process, so it outlives them; fixtures of processes
        // that are gone are removed here.
        let base = std::env::temp_dir();
        for e in std::fs::read_dir(&base).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(pid) = name
                .strip_prefix("purselink-audit-fixture-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            {
                if !Path::new(&format!("/proc/{pid}")).exists() {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("purselink-audit-fixture-{}-", std::process::id()))
            .tempdir()
            .unwrap()
            .keep();
        let layout = deploy::generate(
            &dir,
            &Spec {
                stbd_boxes: 0,
                sim_boxes: 2,
                gbp_every: 2,
                ..Default::default()
            },
        )
        .unwrap();
        let mut running = Vec::new();
        for role in [
            RoleName::Payment,
            RoleName::Merchant,
            RoleName::Bank,
            RoleName::Load,
            RoleName::Gateway,
        ] {
            let cfg = HeadendConfig::load(&layout.configs[&role]).unwrap();
            let roles = Roles {
                gateway: role == RoleName::Gateway,
                payment: role == RoleName::Payment,
                merchant: role == RoleName::Merchant,
                bank: role == RoleName::Bank,
                load: role == RoleName::Load,
                clearing: false,
            };
            running.push(assembly::start(&cfg, roles).await.unwrap());
        }
        let fleet = SimFleet::connect(&layout, Timing::default()).await.unwrap();
        let (eur, gbp) = (&fleet.devices[0], &fleet.devices[1]);
        let mut sale = None;
        let reversed;
        {
            let mut d = eur.lock().await;
            for m in &layout.merchants {
                let item = &m.items[0];
                let (txid, o) = d.purchase(&m.id, &item.id, None).await;
                assert_eq!(o, crate::record::Outcome::Completed, "{} {:?}", m.id, txid);
                sale.get_or_insert((txid.unwrap(), item.amount));
            }
            // A sale drawn, never debited (the box lost power once the debit command was
            // journaled), cancelled with the card's proof by the box's recovery round.
            let (txid, o) = d
                .purchase(
                    "F4-L",
                    "F4-L-b",
                    Some((crate::fleet::Outage::BeforeDebit, std::time::Duration::ZERO)),
                )
                .await;
            assert!(matches!(o, crate::record::Outcome::InDoubt(_)), "{o:?}");
            reversed = txid.unwrap();
            assert!(d.settle().await, "cancelled with proof");
            let (_, o) = d.load(false, 500, None).await;
            assert_eq!(o, crate::record::Outcome::Completed);
        }
        let bank_load;
        {
            let mut d = gbp.lock().await;
            let (_, o) = d.purchase("F5-N", "F5-N-g", None).await;
            assert_eq!(o, crate::record::Outcome::Completed);
            let (txid, o) = d.load(true, 700, None).await;
            assert_eq!(o, crate::record::Outcome::Completed);
            bank_load = txid.unwrap();
        }
        let card = format!("{}.plvc", eur.lock().await.spec.box_id);
        fleet.close().await;
        for r in running {
            r.stop().await;
        }
        fleet
            .write_cards(&dir.join("sim-cards"), &dir.join("sim-pending.json"))
            .await
            .unwrap();
        drop(fleet);
        Fixture {
            dir,
            sale: sale.unwrap(),
            bank_load,
            card,
            reversed,
        }
    }

    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.file_type().unwrap().is_dir() {
                copy_dir(&e.path(), &t);
            } else {
                std::fs::copy(e.path(), t).unwrap();
            }
        }
    }

    /// A private copy of the fixture's journals and cards.
    struct Copy {
        _dir: tempfile::TempDir,
        root: PathBuf,
    }

    impl Copy {
        fn new() -> Self {
            let f = fixture();
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().to_path_buf();
            for sub in ["state", "sim-cards", "config"] {
                copy_dir(&f.dir.join(sub), &root.join(sub));
            }
            std::fs::copy(
                f.dir.join("sim-pending.json"),
                root.join("sim-pending.json"),
            )
            .unwrap();
            Self { _dir: dir, root }
        }

        fn journal(&self, role: RoleName) -> PathBuf {
            self.root
                .join("state")
                .join(role.as_str())
                .join(role.journal_file())
        }

        fn sources(&self) -> Sources {
            let cards = std::fs::read_dir(self.root.join("sim-cards"))
                .unwrap()
                .map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|x| x == "plvc"))
                .collect();
            Sources {
                gateway: self.journal(RoleName::Gateway),
                gateway_postgres: None,
                payment: self.journal(RoleName::Payment),
                merchant: self.journal(RoleName::Merchant),
                bank: self.journal(RoleName::Bank),
                load: self.journal(RoleName::Load),
                boxes: Vec::new(),
                cards,
                sim_pending: Some(self.root.join("sim-pending.json")),
                role_configs: std::fs::read_dir(self.root.join("config"))
                    .unwrap()
                    .map(|e| e.unwrap().path())
                    .collect(),
                as_of: None,
            }
        }

        fn audit(&self) -> AuditReport {
            let r = audit(&self.sources()).unwrap();
            eprintln!("{r}");
            r
        }

        /// Rewrites one postcard record of a head-end journal.
        fn edit<T: serde::de::DeserializeOwned + serde::Serialize>(
            &self,
            role: RoleName,
            kind: &str,
            key: &str,
            f: impl FnOnce(&mut T),
        ) {
            let c = Connection::open(self.journal(role)).unwrap();
            let v: Vec<u8> = c
                .query_row(
                    "SELECT value FROM state WHERE kind = ?1 AND key = ?2",
                    [kind, key],
                    |r| r.get(0),
                )
                .unwrap();
            let mut t: T = headend::journal::decode(&v).unwrap();
            f(&mut t);
            c.execute(
                "UPDATE state SET value = ?3 WHERE kind = ?1 AND key = ?2",
                rusqlite::params![kind, key, headend::journal::encode(&t)],
            )
            .unwrap();
        }

        fn sql(&self, role: RoleName, sql: &str) {
            Connection::open(self.journal(role))
                .unwrap()
                .execute_batch(sql)
                .unwrap();
        }
    }

    fn names<'a>(r: &'a AuditReport, invariant: &str) -> Vec<&'a str> {
        r.of(invariant)
            .into_iter()
            .filter_map(|v| v.txid.as_deref())
            .collect()
    }

    #[test]
    fn the_untouched_run_holds_in_every_ledger() {
        let r = Copy::new().audit();
        assert!(r.holds(), "{r}");
        let eur = &r.totals[&Currency::EUR];
        assert!(eur.card_debits > 0 && eur.card_debits == eur.releases);
        assert_eq!(eur.card_debit_count, 8, "one sale per merchant");
        assert!(eur.card_credits > 0 && eur.card_credits == eur.captured);
        assert!(r.totals[&Currency::GBP].completions > 0);
        assert_eq!(r.per_merchant.len(), 8, "{:?}", r.per_merchant);
        assert_eq!(r.per_merchant["F4-L"], (1, 1), "one released, one reversed");
        assert_eq!(r.cards_complete, 2);
    }

    #[test]
    fn a_changed_sale_amount_is_named() {
        let c = Copy::new();
        let (txid, _) = &fixture().sale;
        c.edit::<PayTxn>(RoleName::Payment, "txn", txid, |t| t.amount.minor += 1);
        let r = c.audit();
        assert!(!r.conserved());
        assert!(
            names(&r, "same amount in every ledger").contains(&txid.as_str()),
            "{r}"
        );
        assert!(!r.of("purchase totals equal").is_empty(), "{r}");
        assert!(
            !r.of("security-card totals = its completed sales")
                .is_empty(),
            "{r}"
        );
    }

    #[test]
    fn a_sale_reversed_after_the_card_paid_is_named() {
        let c = Copy::new();
        let (txid, _) = &fixture().sale;
        c.edit::<PayTxn>(RoleName::Payment, "txn", txid, |t| {
            t.state = PayState::Reversed
        });
        let r = c.audit();
        assert!(
            names(&r, "card debit belongs to a completed sale").contains(&txid.as_str()),
            "{r}"
        );
        assert!(
            names(&r, "release has a completed sale").contains(&txid.as_str()),
            "{r}"
        );
    }

    #[test]
    fn a_missing_release_is_named() {
        let c = Copy::new();
        let (txid, _) = &fixture().sale;
        c.sql(
            RoleName::Merchant,
            &format!("DELETE FROM state WHERE kind = 'release' AND key = '{txid}'"),
        );
        let r = c.audit();
        assert!(
            names(&r, "completed sale is released").contains(&txid.as_str()),
            "{r}"
        );
        assert!(!r.of("purchase totals equal").is_empty(), "{r}");
    }

    #[test]
    fn a_reversal_the_merchant_never_heard_of_is_named() {
        let c = Copy::new();
        let txid = &fixture().reversed;
        c.edit::<OfferRecord>(RoleName::Merchant, "offer", txid, |o| {
            o.state = OfferState::Expired
        });
        let r = c.audit();
        assert!(
            names(&r, "reversed sale is reversed at the merchant").contains(&txid.as_str()),
            "{r}"
        );
    }

    #[test]
    fn a_second_release_is_named() {
        let c = Copy::new();
        let (txid, _) = &fixture().sale;
        c.sql(
            RoleName::Merchant,
            &format!(
                "INSERT INTO steps (txid, step, detail, at) VALUES ('{txid}', 'goods released', 'again', '2026-01-01T00:00:00.000')"
            ),
        );
        let r = c.audit();
        assert!(
            names(&r, "released at most once").contains(&txid.as_str()),
            "{r}"
        );
    }

    /// Rewrites the card's record with counter `atc` in its file and its history sidecar
    /// (`None` deletes it).
    fn edit_card_record(path: &Path, atc: u32, f: impl Fn(&mut LogRecord) -> bool) {
        let mut vc = reader_drivers::vcard::VirtualCard::open(path).unwrap();
        vc.update(|s| {
            s.log.retain_mut(|r| r.atc != atc || f(r));
        })
        .unwrap();
        let mut hist = read_history(path).unwrap();
        hist.records.retain_mut(|r| r.atc != atc || f(r));
        write_history(path, &hist).unwrap();
    }

    /// The card's debit record of the fixture's sale.
    fn sale_record(path: &Path) -> LogRecord {
        let (_, amount) = &fixture().sale;
        read_history(path)
            .unwrap()
            .records
            .into_iter()
            .find(|r| r.kind == LogKind::Debit && r.amount == *amount)
            .unwrap()
    }

    #[test]
    fn a_card_debit_that_is_not_the_sale_is_named() {
        let c = Copy::new();
        let f = fixture();
        let path = c.root.join("sim-cards").join(&f.card);
        let target = sale_record(&path);
        // The card's record now names another security-card transaction: the sale has no
        // debit on the card any more (value created), and the card paid for nothing known.
        edit_card_record(&path, target.atc, |r| {
            r.counterparty_txn = 9_999;
            true
        });
        let r = c.audit();
        assert!(
            names(&r, "completed sale has its card debit").contains(&f.sale.0.as_str()),
            "{r}"
        );
        assert_eq!(r.of("card debit belongs to a sale").len(), 1, "{r}");
    }

    #[test]
    fn a_changed_card_debit_amount_is_named() {
        let c = Copy::new();
        let f = fixture();
        let path = c.root.join("sim-cards").join(&f.card);
        let target = sale_record(&path);
        edit_card_record(&path, target.atc, |r| {
            r.amount -= 1;
            true
        });
        let r = c.audit();
        assert!(
            names(&r, "same amount in every ledger").contains(&f.sale.0.as_str()),
            "{r}"
        );
        assert!(!r.of("purchase totals equal").is_empty(), "{r}");
        assert!(!r.of("card balance chain").is_empty(), "{r}");
    }

    #[test]
    fn a_hole_in_a_card_history_is_reported_not_hidden() {
        let c = Copy::new();
        let f = fixture();
        let path = c.root.join("sim-cards").join(&f.card);
        let target = sale_record(&path);
        edit_card_record(&path, target.atc, |_| false);
        let r = c.audit();
        assert!(
            r.notes.iter().any(|n| n.contains("history incomplete")),
            "{r}"
        );
        assert_eq!(r.cards_complete, 1, "{r}");
    }

    #[test]
    fn a_changed_card_balance_is_named() {
        let c = Copy::new();
        let f = fixture();
        let path = c.root.join("sim-cards").join(&f.card);
        reader_drivers::vcard::VirtualCard::open(&path)
            .unwrap()
            .update(|s| s.balance += 1)
            .unwrap();
        let r = c.audit();
        assert!(!r.of("card balance chain").is_empty(), "{r}");
    }

    #[test]
    fn a_load_whose_hold_was_released_is_named() {
        let c = Copy::new();
        let txid = &fixture().bank_load;
        c.edit::<Hold>(RoleName::Bank, "hold", txid, |h| {
            h.state = HoldState::Released
        });
        let r = c.audit();
        assert!(
            names(&r, "loaded record has its captured hold").contains(&txid.as_str()),
            "{r}"
        );
        assert!(!r.of("load totals equal").is_empty(), "{r}");
    }

    #[test]
    fn a_load_settled_not_loaded_that_the_card_got_is_named() {
        let c = Copy::new();
        let txid = &fixture().bank_load;
        c.edit::<LoadRec>(RoleName::Load, "load", txid, |l| {
            l.state = LoadState::NotLoaded
        });
        let r = c.audit();
        assert!(
            names(&r, "card load belongs to a loaded record").contains(&txid.as_str()),
            "{r}"
        );
        assert!(
            names(&r, "captured hold belongs to a loaded record").contains(&txid.as_str()),
            "{r}"
        );
    }

    #[test]
    fn a_changed_float_or_hsm_total_is_named() {
        let c = Copy::new();
        c.edit::<Money>(RoleName::Bank, "float", "826", |m| m.minor += 100);
        let r = c.audit();
        assert!(
            !r.of("account balances + float = opening balances")
                .is_empty(),
            "{r}"
        );
        assert!(!r.of("load totals equal").is_empty(), "{r}");

        let c = Copy::new();
        c.edit::<Hsm>(RoleName::Load, "hsm", "0", |h| {
            for t in h.totals.values_mut() {
                t.amount += 1;
            }
        });
        let r = c.audit();
        assert!(!r.of("load totals equal").is_empty(), "{r}");
    }

    #[test]
    fn open_holds_sales_and_box_journals_are_reported_in_doubt() {
        let c = Copy::new();
        let txid = &fixture().bank_load;
        c.edit::<Hold>(RoleName::Bank, "hold", txid, |h| h.state = HoldState::Held);
        let (sale, _) = &fixture().sale;
        c.edit::<PayTxn>(RoleName::Payment, "txn", sale, |t| {
            t.state = PayState::DebitIssued
        });
        let boxj = c.root.join("box.sqlite");
        let conn = Connection::open(&boxj).unwrap();
        conn.execute_batch(
            "CREATE TABLE txns (transaction_id TEXT, state TEXT, created_at INTEGER);
             INSERT INTO txns VALUES ('T-BOX-1', 'debit_responded', 1);
             INSERT INTO txns VALUES ('T-BOX-2', 'completed', 2);
             CREATE TABLE loads (transaction_id TEXT, state TEXT, created_at INTEGER);
             INSERT INTO loads VALUES ('LD-BOX', 'load_sent', 3);",
        )
        .unwrap();
        drop(conn);
        let mut s = c.sources();
        s.boxes.push(("stb-x".into(), boxj));
        let r = audit(&s).unwrap();
        eprintln!("{r}");
        let open: Vec<&str> = r.open.iter().map(|o| o.txid.as_str()).collect();
        for t in [txid.as_str(), sale.as_str(), "T-BOX-1", "LD-BOX"] {
            assert!(open.contains(&t), "{t} not reported open: {r}");
        }
        assert!(!open.contains(&"T-BOX-2"));
        assert!(!r.holds());
    }

    #[test]
    fn an_offer_or_hold_open_past_its_lifetime_is_named() {
        let c = Copy::new();
        let r = c.audit();
        assert!(matches!(r.lifetimes, LifetimeCheck::Checked(_)), "{r}");
        assert!(r.of("no offer open past its lifetime").is_empty(), "{r}");
        // An offer the merchant never expired.
        let (txid, _) = &fixture().sale;
        c.edit::<OfferRecord>(RoleName::Merchant, "offer", txid, |o| {
            o.state = OfferState::Offered;
            o.created -= 10_000;
        });
        // A hold the gateway never released, its load never authorised.
        let load = &fixture().bank_load;
        c.edit::<GwLoad>(RoleName::Gateway, "gwload", load, |t| {
            t.settled = None;
            t.requested_at = t.requested_at.map(|a| a - 10_000);
        });
        c.edit::<LoadRec>(RoleName::Load, "load", load, |l| {
            l.state = LoadState::Refused
        });
        let r = c.audit();
        assert!(
            names(&r, "no offer open past its lifetime").contains(&txid.as_str()),
            "{r}"
        );
        assert!(
            names(&r, "no hold open past its lifetime").contains(&load.as_str()),
            "{r}"
        );
        let _ = Account::available;
    }
}
