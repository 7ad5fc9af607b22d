//! The durable journal every role writes before it acts, on one of two backends chosen per
//! role in the config (`[journal]`, see [`crate::config::JournalSection`]):
//! - **SQLite** (the embedded default; rusqlite, bundled) in WAL mode, each commit fsynced
//!   before it returns (group commit, below), so a committed step survives SIGKILL and power
//!   loss. The file is owner-only (0600, its -wal and -shm too) in a 0700 directory when the
//!   journal creates it;
//! - **PostgreSQL** ([`postgres`]): one schema per role, each [`Journal::atomically`] one
//!   PostgreSQL transaction committed with `synchronous_commit = on` before it returns, so
//!   several head-end machines can share one database.
//!
//! The journal never holds a master key (snapshots hold state only) but does hold
//! transaction session keys and account records.
//!
//! Two tables serve every role:
//! - `steps`: an append-only log of (transaction id, step, detail) — what happened, in order;
//! - `state`: keyed blobs (`kind`, `key`) — the stored answer for a transaction id (the
//!   idempotency key: a retried message gets the same answer), a role's transaction record,
//!   a security card's snapshot. Keys sort bytewise on both backends (PostgreSQL's column is
//!   `COLLATE "C"`), so [`Journal::range_after`] and [`Journal::last_key`] agree.
//!
//! Each `state` record has a [`Kind`], named once in that enum: the string it is stored
//! under (the `kind` column) is [`Kind::as_str`], and no role passes a kind as a bare string.
//!
//! [`Journal::atomically`] groups several writes in one transaction, so a role's "after"
//! state (security card snapshot + transaction record + answer) lands all or nothing. Inside
//! it, [`Batch::insert_new`] (a unique constraint: exactly one of two racing writers wins a
//! key) and [`Batch::get_for_update`] (a row lock held to the commit) are the primitives for
//! writers in two processes on one database. Roles see [`Journal`] and [`Batch`], never the
//! backend; a closure's error is a [`StoreError`], whichever backend runs it.
//!
//! Versions: each backend records the schema version it is at (SQLite `PRAGMA user_version`,
//! PostgreSQL a `schema_version` table), applies the migrations it is missing when it opens,
//! and refuses a journal newer than this build knows ([`StoreError::NewerSchema`]).
//!
//! SQLite group commit: SQLite commits with `synchronous=NORMAL` (the WAL frames are written,
//! not yet synced), then [`Journal::atomically`] fsyncs the WAL file itself before it
//! returns — one fsync covers every commit written before it started, so concurrent
//! transactions share one instead of queueing one each. A commit is durable when
//! `atomically` returns, exactly as with `synchronous=FULL` (which fsyncs the WAL on every
//! commit); checkpoints still sync the WAL and the database as SQLite does.

mod postgres;
mod sqlite;

use std::path::{Path, PathBuf};

use proto::secret::Secret;

/// The newest journal schema this build knows (both backends): 1 = `steps` + `state`.
pub const SCHEMA_VERSION: i64 = 1;

/// What went wrong in the store under a journal: the backend's own error, or a rule of the
/// journal's.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Postgres(#[from] tokio_postgres::Error),
    /// A file (the SQLite journal, its WAL, its directory) or the connection's thread.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// The journal was written by a newer build: its schema is past what this one knows.
    #[error("schema version {found} is newer than this build knows ({known}); refusing it")]
    NewerSchema { found: i64, known: i64 },
    /// A PostgreSQL schema name the journal cannot use (empty, or longer than PostgreSQL's
    /// 63 bytes, which it would cut silently, so two roles could meet in one schema).
    #[error("schema name {name:?}: {why}")]
    BadSchema { name: String, why: &'static str },
    /// The caller's closure gave up (its reason): the transaction is rolled back.
    #[error("{0}")]
    Aborted(String),
    /// A write made only under a [`SharedLock`] found the lock gone (its PostgreSQL session
    /// ended: another process may hold it now): nothing was written.
    #[error("the shared lock on {0} was lost with its database session; nothing written")]
    LockLost(String),
}

/// A journal that cannot be opened, read or written: where (`at`: the SQLite file, or
/// `postgres schema S on HOST/DB` — never the password), and why.
#[derive(Debug, thiserror::Error)]
#[error("journal {at}: {source}")]
pub struct JournalError {
    pub at: String,
    #[source]
    pub source: StoreError,
}

/// Where a role's journal lives, as the config resolves it
/// ([`crate::config::HeadendConfig::journal_target`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A SQLite file (`state_dir/<role>.sqlite`).
    Sqlite(PathBuf),
    Postgres(PgTarget),
}

/// A PostgreSQL journal: the connection string (libpq key=value or `postgresql://` URL; it
/// may hold a password, so `Debug` masks it) and the role's schema.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTarget {
    pub url: Secret<String>,
    pub schema: String,
}

/// The journal of one role; see the module docs.
pub struct Journal {
    store: Store,
}

enum Store {
    Sqlite(sqlite::Sqlite),
    Postgres(Box<postgres::Pg>),
}

/// The kind of a keyed record (the `state` table's `kind` column), one variant per record
/// kind any head-end role keeps. [`Kind::as_str`] is the string on disk: existing journals,
/// `sim`'s audit and the tests read the SQLite files by these strings, so they never change.
/// Two roles may use one kind in their own journals for their own records (`offer`,
/// `release`); each variant's doc names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Gateway: a purchase ([`crate::gateway::GwTxn`]), by transaction id.
    Gw,
    /// Gateway: a load ([`crate::gateway::load::GwLoad`]), by transaction id.
    GwLoad,
    /// Gateway and merchant: the sweeper's index of open offers and loads, value the
    /// creation time (seconds since the epoch, 8 bytes big-endian). Gateway keys `p/<txid>`
    /// (purchase offers) and `l/<txid>` (loads); merchant keys the transaction id of an offer still `Offered`.
    Open,
    /// Gateway: a FIG. 4/5 debit response (`DebitResponseMsg`) on its way to the payment
    /// server, by `txid/card signature` ([`crate::gateway::response_key`]): written before
    /// the payment server is asked, deleted in the write that journals its confirmation (or
    /// on its definite refusal). A gateway that dies waiting for the confirmation asks again
    /// after its restart ([`crate::gateway::Gateway::run_releases`]).
    Confirming,
    /// Gateway: an accepted confirmation for the merchant ([`crate::gateway::Outbound`]),
    /// by `txid/card signature`. Merchant: the entitlement released for a transaction id
    /// (UTF-8).
    Release,
    /// Gateway: a FIG. 6/7 debit response (`DebitResponseMsg`) to deliver to the payment
    /// server, by `txid/card signature`.
    Notify,
    /// Gateway: the reversal-feed cursor per payment server (8 bytes big-endian).
    Cursor,
    /// Merchant: an offer ([`crate::merchant::OfferRecord`]). Bank and load server: a load
    /// offer ([`crate::funds::OfferRec`]). By transaction id.
    Offer,
    /// Merchant: the transaction id (UTF-8) an entitlement was released for, by entitlement.
    Entitlement,
    /// Payment server: a purchase ([`crate::payment::PayTxn`]), by transaction id.
    Txn,
    /// Payment server: a security card's snapshot, by slot.
    SecurityCard,
    /// Payment server: the newest purchase proof seen from a card, by card id.
    CardInit,
    /// Payment server: a reversal notice of its feed, by sequence number.
    Reversal,
    /// Payment server: a collection batch's state (`open`, `acknowledged`), by batch number.
    Batch,
    /// Payment server: counters (`next-batch`, 8 bytes big-endian).
    Meta,
    /// Bank and load server: an account ([`crate::funds::Account`]), by account id.
    Account,
    /// Bank and load server: a hold ([`crate::funds::Hold`]), by transaction id.
    Hold,
    /// Bank and load server: the issuer float (`Money`), by ISO 4217 numeric currency code.
    Float,
    /// Load server: a load ([`crate::load::LoadRec`]), by transaction id.
    Load,
    /// Load server: the HSM's snapshot (key `0`).
    Hsm,
    /// Payment server, bank, load server: a message journaled before it is sent to another
    /// role and re-sent until that role acknowledges it ([`crate::outbox::Outgoing`]), by
    /// `<destination>/<id>`.
    Outbox,
    /// Clearing: a received collection batch ([`crate::clearing::Received`]), by
    /// `<payment server>/<batch number, 12 digits>`.
    ClearedBatch,
    /// Clearing: which batch cleared a security-card transaction (`<payment server>/<batch>`,
    /// UTF-8), by `<security card id, 16 hex digits>/<its transaction number, 10 digits>`.
    ClearedTxn,
    /// Clearing: which batch cleared a transaction id (`<payment server>/<batch>`, UTF-8), by
    /// `<payment server>/<transaction id>`.
    ClearedId,
    /// Clearing: a received load advice ([`crate::clearing::AdviceRec`]), by
    /// `<funder>/<transaction id>`.
    Advice,
    /// Clearing: a settlement report ([`crate::clearing::settle::Report`]), by its id.
    Settlement,
    /// Payment server, FIG. 5: the debit command and the expected card signature the
    /// security card handed out with it ([`crate::payment::Expected`]), by transaction id:
    /// the payment server compares the card's signature itself ([0097]), so the security
    /// card is not asked again. Deleted once the transaction is settled.
    Expected,
    /// Payment server, load server, clearing: the issuer's signed hotlist
    /// ([`proto::hotlist::SignedHotlist`], see [`crate::hotlist`]), key `current`.
    Hotlist,
    /// Payment server: a terminal out of the pool ([`crate::payment::TerminalDown`]), by
    /// slot; deleted when it answers again. What `headend status` lists.
    Terminal,
    /// Bank: a card's uploaded passbook record (seed 004; [`proto::purse::LogRecord`]), by
    /// `<card id, 16 hex digits>/<transaction number, 10 digits>`.
    Passbook,
    /// Payment server: a refund of a sale ([`crate::payment::refund::RefundRec`]), by the
    /// sale's transaction id (a sale is refunded at most once). Written by `headend refund`
    /// (the merchant's authorization) and then by the refund's steps.
    Refund,
    /// Payment server: the index of refunds not yet credited, by `<card id, 16 hex
    /// digits>/<sale's transaction id>` (empty value): a card's refunds due are read
    /// without reading every refund. Written with the authorization, deleted in the write
    /// that records the refund credited.
    RefundDue,
    /// Gateway: a card-to-card transfer's mailbox ([`crate::gateway::transfer::TransferRec`]),
    /// by transfer id.
    Transfer,
    /// Gateway: the transfer id (UTF-8) a transfer code names, by code.
    TransferCode,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Kind; 34] = [
        Kind::Gw,
        Kind::GwLoad,
        Kind::Open,
        Kind::Confirming,
        Kind::Release,
        Kind::Notify,
        Kind::Cursor,
        Kind::Offer,
        Kind::Entitlement,
        Kind::Txn,
        Kind::SecurityCard,
        Kind::CardInit,
        Kind::Reversal,
        Kind::Batch,
        Kind::Meta,
        Kind::Account,
        Kind::Hold,
        Kind::Float,
        Kind::Load,
        Kind::Hsm,
        Kind::Outbox,
        Kind::ClearedBatch,
        Kind::ClearedTxn,
        Kind::ClearedId,
        Kind::Advice,
        Kind::Settlement,
        Kind::Expected,
        Kind::Hotlist,
        Kind::Terminal,
        Kind::Passbook,
        Kind::Refund,
        Kind::RefundDue,
        Kind::Transfer,
        Kind::TransferCode,
    ];

    /// The string the kind is stored under (the `kind` column).
    pub const fn as_str(self) -> &'static str {
        match self {
            Kind::Gw => "gw",
            Kind::GwLoad => "gwload",
            Kind::Open => "open",
            Kind::Confirming => "confirming",
            Kind::Release => "release",
            Kind::Notify => "notify",
            Kind::Cursor => "cursor",
            Kind::Offer => "offer",
            Kind::Entitlement => "entitlement",
            Kind::Txn => "txn",
            Kind::SecurityCard => "psam",
            Kind::CardInit => "card_init",
            Kind::Reversal => "reversal",
            Kind::Batch => "batch",
            Kind::Meta => "meta",
            Kind::Account => "account",
            Kind::Hold => "hold",
            Kind::Float => "float",
            Kind::Load => "load",
            Kind::Hsm => "hsm",
            Kind::Outbox => "outbox",
            Kind::ClearedBatch => "cleared_batch",
            Kind::ClearedTxn => "cleared_txn",
            Kind::ClearedId => "cleared_txid",
            Kind::Advice => "load_advice",
            Kind::Settlement => "settlement",
            Kind::Expected => "expected_signature",
            Kind::Hotlist => "hotlist",
            Kind::Terminal => "terminal",
            Kind::Passbook => "passbook",
            Kind::Refund => "refund",
            Kind::RefundDue => "refund_due",
            Kind::Transfer => "transfer",
            Kind::TransferCode => "transfer_code",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes (and locked reads) inside one transaction of [`Journal::atomically`].
pub struct Batch<'a> {
    inner: BatchInner<'a>,
}

enum BatchInner<'a> {
    Sqlite(rusqlite::Transaction<'a>),
    Postgres(postgres::PgBatch<'a>),
}

/// A step a role journals (the `steps` table's `step` column): each role names its steps
/// once, as an enum whose text is what is on disk and what operators read. Nothing decides
/// by reading a step back; decisions read the records.
pub trait StepText {
    /// The step's text as journaled; it never changes for a variant.
    fn text(&self) -> std::borrow::Cow<'static, str>;
}

impl Batch<'_> {
    /// Appends one step of `txid`, with `detail` (free text for people: amounts, reasons).
    ///
    /// # Errors
    /// The store refuses the write; the transaction is then rolled back.
    pub fn step(&self, txid: &str, step: &impl StepText, detail: &str) -> Result<(), StoreError> {
        let step = step.text();
        match &self.inner {
            BatchInner::Sqlite(tx) => sqlite::step(tx, txid, &step, detail),
            BatchInner::Postgres(b) => b.step(txid, &step, detail),
        }
    }

    /// Stores `value` under (`kind`, `key`), replacing what was there.
    ///
    /// # Errors
    /// The store refuses the write.
    pub fn put(&self, kind: Kind, key: &str, value: &[u8]) -> Result<(), StoreError> {
        match &self.inner {
            BatchInner::Sqlite(tx) => sqlite::put(tx, kind, key, value),
            BatchInner::Postgres(b) => b.put(kind, key, value),
        }
    }

    /// Stores `value` under (`kind`, `key`) only if no record is there: true when this
    /// transaction wrote it. The primary key decides between racing writers, in two
    /// processes too: exactly one gets true (on PostgreSQL the loser waits for the winner's
    /// commit, then sees its row).
    ///
    /// # Errors
    /// The store refuses the write.
    pub fn insert_new(&self, kind: Kind, key: &str, value: &[u8]) -> Result<bool, StoreError> {
        match &self.inner {
            BatchInner::Sqlite(tx) => sqlite::insert_new(tx, kind, key, value),
            BatchInner::Postgres(b) => b.insert_new(kind, key, value),
        }
    }

    /// Reads (`kind`, `key`) and holds it until the transaction ends, so a read-modify-write
    /// from another process cannot interleave (PostgreSQL `SELECT … FOR UPDATE`; SQLite's
    /// transactions already hold the write lock from their start). A missing record locks
    /// nothing: claim a new key with [`Batch::insert_new`].
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn get_for_update(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        match &self.inner {
            BatchInner::Sqlite(tx) => sqlite::get(tx, kind, key),
            BatchInner::Postgres(b) => b.get_for_update(kind, key),
        }
    }

    /// Every (key, value) of a kind, in key order, held until the transaction ends (see
    /// [`Batch::get_for_update`]; PostgreSQL `SELECT … ORDER BY key FOR UPDATE`): a second
    /// process doing the same read-modify-write waits, then sees this one's writes.
    ///
    /// # Errors
    /// The store cannot be read.
    pub fn all_for_update(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        match &self.inner {
            BatchInner::Sqlite(tx) => sqlite::all(tx, kind),
            BatchInner::Postgres(b) => b.all_for_update(kind),
        }
    }

    /// Deletes the record (`kind`, `key`), if any.
    ///
    /// # Errors
    /// The store refuses the write.
    pub fn delete(&self, kind: Kind, key: &str) -> Result<(), StoreError> {
        match &self.inner {
            BatchInner::Sqlite(tx) => sqlite::delete(tx, kind, key),
            BatchInner::Postgres(b) => b.delete(kind, key),
        }
    }
}

/// A lock on a name shared by every process on one journal's store
/// ([`Journal::try_lock`]); released when dropped.
pub struct SharedLock<'a> {
    journal: &'a Journal,
    name: String,
    held: Held,
}

enum Held {
    /// SQLite: one process per journal, nothing to hold outside it.
    Local,
    /// PostgreSQL: a session advisory lock on the connection of this generation in this
    /// pool slot.
    Postgres { slot: usize, generation: u64 },
}

impl SharedLock<'_> {
    /// The locked name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for SharedLock<'_> {
    fn drop(&mut self) {
        if let (Held::Postgres { slot, generation }, Store::Postgres(p)) =
            (&self.held, &self.journal.store)
        {
            blocking(|| p.unlock(&self.name, *slot, *generation));
        }
    }
}

/// Journal transactions committed by this process, every journal and backend together.
static COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many journal transactions this process has committed (each [`Journal::atomically`]
/// that returned `Ok`, and the one-write helpers built on it): for benchmarks' commits per
/// purchase.
#[must_use]
pub fn commits_in_this_process() -> u64 {
    COMMITS.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs blocking journal IO so it does not stall the async workers that drive QUIC: on a
/// multi-threaded tokio runtime the worker hands its other tasks away for the duration.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

impl Journal {
    /// Opens (creating it if need be) the SQLite journal at `path`.
    ///
    /// # Errors
    /// The file or its directory cannot be created or opened, or its schema is newer than
    /// this build knows.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        Ok(Self {
            store: Store::Sqlite(sqlite::Sqlite::open(path)?),
        })
    }

    /// Opens a role's journal where the config puts it: a SQLite file, or a PostgreSQL
    /// schema (connecting, and applying the migrations it is missing).
    ///
    /// # Errors
    /// See [`Journal::open`]; for PostgreSQL: the connection string does not parse, the
    /// server cannot be reached or refuses the login, the schema name is unusable, or the
    /// schema is newer than this build knows.
    pub fn open_target(target: &Target) -> Result<Self, JournalError> {
        match target {
            Target::Sqlite(path) => Self::open(path),
            Target::Postgres(pg) => Ok(Self {
                store: Store::Postgres(Box::new(blocking(|| postgres::Pg::open(pg))?)),
            }),
        }
    }

    /// Opens a journal that exists, without creating it: `None` when the SQLite file or the
    /// PostgreSQL schema is not there (for readers: `headend reconcile`, audits).
    ///
    /// # Errors
    /// As [`Journal::open_target`].
    pub fn open_existing(target: &Target) -> Result<Option<Self>, JournalError> {
        match target {
            Target::Sqlite(path) if !path.exists() => Ok(None),
            Target::Sqlite(path) => Self::open(path).map(Some),
            Target::Postgres(pg) => {
                Ok(blocking(|| postgres::Pg::open_existing(pg))?.map(|p| Self {
                    store: Store::Postgres(Box::new(p)),
                }))
            }
        }
    }

    /// Where this journal is, for messages (never a password).
    pub fn at(&self) -> &str {
        match &self.store {
            Store::Sqlite(s) => s.at(),
            Store::Postgres(p) => p.at(),
        }
    }

    /// Runs `f` in one transaction, committed (and durable) before this returns; an error
    /// from `f` rolls every write of it back.
    ///
    /// # Errors
    /// `f`'s error, or the store's: nothing of `f` is then committed (unless the connection
    /// to PostgreSQL broke during the commit itself, when the outcome is unknown — the
    /// transaction id makes the retry safe).
    pub fn atomically<T>(
        &self,
        f: impl FnOnce(&Batch) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        let out = self.atomically_uncounted(f);
        if out.is_ok() {
            COMMITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        out
    }

    /// [`Journal::atomically`], committed only while `lock` is held: on PostgreSQL the
    /// transaction runs on the session that took the lock, or not at all
    /// ([`StoreError::LockLost`]), so a process that lost its lock (its connection broke,
    /// another process took the lock) never overwrites what the new holder wrote.
    ///
    /// # Errors
    /// As [`Journal::atomically`], and [`StoreError::LockLost`].
    pub fn atomically_holding<T>(
        &self,
        lock: &SharedLock<'_>,
        f: impl FnOnce(&Batch) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        let holding = match &lock.held {
            Held::Local => None,
            Held::Postgres { slot, generation } => Some((lock.name.as_str(), *slot, *generation)),
        };
        let out = self.atomically_inner(holding, f);
        if out.is_ok() {
            COMMITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        out
    }

    /// Takes the lock on `name` shared by every process on this journal's store, if no
    /// other holds it (`None`: try again later). On PostgreSQL a session advisory lock
    /// (`pg_try_advisory_lock`) on this journal's connection: a process that dies (SIGKILL
    /// included) loses its locks with its connection at once. A SQLite journal belongs to
    /// one process, so there the lock is always granted; the caller's own in-process lock
    /// serializes its tasks. Within one process the name must be locked in process first
    /// (PostgreSQL's locks are re-entrant per session). Released on drop.
    ///
    /// # Errors
    /// The store cannot be reached.
    pub fn try_lock(&self, name: &str) -> Result<Option<SharedLock<'_>>, JournalError> {
        let held = match &self.store {
            Store::Sqlite(_) => Some(Held::Local),
            Store::Postgres(p) => blocking(|| p.try_lock(name))?
                .map(|(slot, generation)| Held::Postgres { slot, generation }),
        };
        Ok(held.map(|held| SharedLock {
            journal: self,
            name: name.to_string(),
            held,
        }))
    }

    fn atomically_uncounted<T>(
        &self,
        f: impl FnOnce(&Batch) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        self.atomically_inner(None, f)
    }

    fn atomically_inner<T>(
        &self,
        holding: Option<(&str, usize, u64)>,
        f: impl FnOnce(&Batch) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        blocking(|| match &self.store {
            Store::Sqlite(s) => s.atomically(|tx| {
                let batch = Batch {
                    inner: BatchInner::Sqlite(tx),
                };
                let out = f(&batch);
                let BatchInner::Sqlite(tx) = batch.inner else {
                    unreachable!("built as SQLite above")
                };
                (out, tx)
            }),
            Store::Postgres(p) => p.atomically(holding, |b| {
                let batch = Batch {
                    inner: BatchInner::Postgres(b),
                };
                let out = f(&batch);
                let BatchInner::Postgres(b) = batch.inner else {
                    unreachable!("built as PostgreSQL above")
                };
                (out, b)
            }),
        })
    }

    /// Appends one step (its own transaction).
    ///
    /// # Errors
    /// The journal cannot be written.
    pub fn step(&self, txid: &str, step: &impl StepText, detail: &str) -> Result<(), JournalError> {
        self.atomically(|b| b.step(txid, step, detail))
    }

    /// Stores one record (its own transaction).
    ///
    /// # Errors
    /// The journal cannot be written.
    pub fn put(&self, kind: Kind, key: &str, value: &[u8]) -> Result<(), JournalError> {
        self.atomically(|b| b.put(kind, key, value))
    }

    /// A point read. SQLite serves it from its page cache (writers hold the connection only
    /// while writing WAL frames, never across an fsync), so it runs on the caller's thread
    /// rather than paying a `block_in_place` hand-off; PostgreSQL asks the server.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.get(kind, key),
            Store::Postgres(p) => blocking(|| p.get(kind, key)),
        }
    }

    /// Every (key, value) of a kind, in key order.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn all(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.all(kind),
            Store::Postgres(p) => blocking(|| p.all(kind)),
        }
    }

    /// The greatest key of a kind, if any.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn last_key(&self, kind: Kind) -> Result<Option<String>, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.last_key(kind),
            Store::Postgres(p) => blocking(|| p.last_key(kind)),
        }
    }

    /// At most `limit` (key, value) of a kind with keys after `after`, in key order.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn range_after(
        &self,
        kind: Kind,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.range_after(kind, after, limit),
            Store::Postgres(p) => blocking(|| p.range_after(kind, after, limit)),
        }
    }

    /// The steps journaled for one transaction, oldest first.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn steps(&self, txid: &str) -> Result<Vec<String>, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.steps(txid),
            Store::Postgres(p) => blocking(|| p.steps(txid)),
        }
    }

    /// How many records of each kind present (by the kind's on-disk string, so a kind this
    /// build does not know is counted too), in kind order.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn kind_counts(&self) -> Result<std::collections::BTreeMap<String, usize>, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.kind_counts(),
            Store::Postgres(p) => blocking(|| p.kind_counts()),
        }
    }

    /// How many steps are journaled.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn count_steps(&self) -> Result<u64, JournalError> {
        match &self.store {
            Store::Sqlite(s) => s.count_steps(),
            Store::Postgres(p) => blocking(|| p.count_steps()),
        }
    }
}

/// Serializes a journal record.
pub fn encode<T: serde::Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("in-memory serialization")
}

/// Deserializes a journal record; a corrupt record is an error, not a panic.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    postcard::from_bytes(b).map_err(|e| format!("corrupt journal record: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_roles_steps_keep_their_journaled_text() {
        use crate::funds::step::FundsStep;
        use crate::load::step::LoadStep;
        use crate::merchant::step::MerchantStep;
        use crate::payment::step::PayStep;
        assert_eq!(PayStep::DebitCommandIssued.text(), "debit command issued");
        assert_eq!(PayStep::Reversed.text(), "reversed");
        assert_eq!(MerchantStep::GoodsReleased.text(), "goods released");
        assert_eq!(
            LoadStep::S1VerifiedLoadCommandIssued.text(),
            "S1 verified: load command issued"
        );
        assert_eq!(
            FundsStep::HoldCapturedMovedToTheIssuerFloat.text(),
            "hold captured: moved to the issuer float"
        );
        assert_eq!(
            FundsStep::WrongPINAccountLocked.text(),
            "wrong PIN: account locked"
        );
    }

    /// Where a test journal is: a SQLite file in a temp dir, or a fresh database on the
    /// test PostgreSQL (`None`, after saying why, when PostgreSQL is not installed).
    pub(crate) struct Fixture {
        pub target: Target,
        pub url: Option<String>,
        pub rig: Option<std::sync::Arc<crate::pg_rig::PgRig>>,
        _dir: tempfile::TempDir,
    }

    #[derive(Clone, Copy, Debug)]
    pub(crate) enum Backend {
        Sqlite,
        Postgres,
    }

    pub(crate) fn fixture(backend: Backend) -> Option<Fixture> {
        let dir = tempfile::tempdir().unwrap();
        Some(match backend {
            Backend::Sqlite => Fixture {
                target: Target::Sqlite(dir.path().join("j.sqlite")),
                url: None,
                rig: None,
                _dir: dir,
            },
            Backend::Postgres => {
                let rig = crate::pg_rig::shared()?;
                let url = rig.fresh_db();
                Fixture {
                    target: Target::Postgres(PgTarget {
                        url: url.as_str().into(),
                        schema: "purselink_test".into(),
                    }),
                    url: Some(url),
                    rig: Some(rig),
                    _dir: dir,
                }
            }
        })
    }

    impl Fixture {
        fn open(&self) -> Journal {
            Journal::open_target(&self.target).unwrap()
        }
    }

    /// One test body, run on each backend: `both!(name, body)` makes `name::sqlite` and
    /// `name::postgres`.
    macro_rules! both {
        ($name:ident, $body:ident) => {
            mod $name {
                #[test]
                fn sqlite() {
                    super::$body(super::Backend::Sqlite)
                }
                #[test]
                fn postgres() {
                    super::$body(super::Backend::Postgres)
                }
            }
        };
    }

    both!(
        steps_and_state_survive_reopen_and_batches_are_atomic,
        survive_and_atomic
    );
    fn survive_and_atomic(backend: Backend) {
        let Some(fx) = fixture(backend) else { return };
        {
            let j = fx.open();
            use crate::payment::step::PayStep;
            j.step("t1", &PayStep::DrawRequestReceived, "").unwrap();
            j.atomically(|b| {
                b.put(Kind::Txn, "t1", b"cmd")?;
                b.step("t1", &PayStep::DebitCommandIssued, "psam 1")
            })
            .unwrap();
            let failed = j.atomically(|b| {
                b.put(Kind::Txn, "t2", b"x")?;
                b.put(Kind::Txn, "t1", b"overwritten")?;
                b.step("t2", &PayStep::DebitCommandIssued, "")?;
                Err::<(), _>(StoreError::Aborted("the test gives up".into()))
            });
            assert!(
                matches!(&failed, Err(JournalError { source: StoreError::Aborted(r), .. }) if r == "the test gives up"),
                "{failed:?}"
            );
        }
        let j = fx.open();
        assert_eq!(
            j.steps("t1").unwrap(),
            ["draw request received", "debit command issued"]
        );
        assert_eq!(j.get(Kind::Txn, "t1").unwrap().unwrap(), b"cmd");
        assert_eq!(j.get(Kind::Txn, "t2").unwrap(), None, "rolled back");
        assert!(
            j.steps("t2").unwrap().is_empty(),
            "its step rolled back too"
        );
        assert_eq!(j.kind_counts().unwrap(), [("txn".to_string(), 1)].into());
        assert_eq!(j.count_steps().unwrap(), 2);
    }

    /// Two journals on one PostgreSQL schema stand for two processes (each its own
    /// connection): a name locked by one is refused to the other; a lock whose session ended
    /// is free for the other at once, and its old holder can no longer write under it, nor
    /// release the new holder's lock.
    #[test]
    fn a_shared_lock_excludes_other_processes_and_dies_with_its_session() {
        let Some(fx) = fixture(Backend::Postgres) else {
            return;
        };
        let (a, b, c) = (fx.open(), fx.open(), fx.open());
        let held = a.try_lock("tx-1").unwrap().expect("free");
        assert!(b.try_lock("tx-1").unwrap().is_none(), "held by a");
        assert!(
            b.try_lock("tx-2").unwrap().is_some(),
            "another name is free"
        );
        a.atomically_holding(&held, |w| w.put(Kind::Gw, "tx-1", b"a's"))
            .expect("a writes while it holds the lock");
        drop(held);
        let held = b.try_lock("tx-1").unwrap().expect("released on drop");
        drop(held);

        let held = a.try_lock("tx-1").unwrap().expect("free again");
        // a's session ends (its connection dies as when the process is SIGKILLed).
        let url = fx.url.as_deref().unwrap();
        let killed = fx.rig.as_ref().unwrap().psql(
            url,
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND backend_type = 'client backend' \
             AND pid <> pg_backend_pid()",
        );
        // Each journal has a pool of connections: every one of them ended, at least one
        // each of a, b and c.
        assert!(
            killed.parse::<u32>().unwrap() >= 3,
            "{killed} sessions ended"
        );
        // pg_terminate_backend only signals the backends: a's lock goes when its backend
        // has exited, a moment later (a bounded wait, not a timing assertion; a run on two
        // busy cores met the lock still held).
        let taken = (0..100)
            .find_map(|_| {
                let t = b.try_lock("tx-1").unwrap();
                if t.is_none() {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                t
            })
            .expect("free once a's session ended");
        b.atomically_holding(&taken, |w| w.put(Kind::Gw, "tx-1", b"b's"))
            .unwrap();
        let late = a.atomically_holding(&held, |w| w.put(Kind::Gw, "tx-1", b"a's late write"));
        assert!(
            matches!(&late, Err(JournalError { source: StoreError::LockLost(n), .. }) if n == "tx-1"),
            "{late:?}"
        );
        assert_eq!(a.get(Kind::Gw, "tx-1").unwrap().unwrap(), b"b's");
        drop(held); // on a's new session: must not release b's lock
        assert!(c.try_lock("tx-1").unwrap().is_none(), "still b's");
        drop(taken);
        assert!(c.try_lock("tx-1").unwrap().is_some());
    }

    both!(a_reader_never_creates_the_journal_it_reads, open_existing);
    fn open_existing(backend: Backend) {
        let Some(fx) = fixture(backend) else { return };
        assert!(
            Journal::open_existing(&fx.target).unwrap().is_none(),
            "not there yet"
        );
        assert!(
            Journal::open_existing(&fx.target).unwrap().is_none(),
            "and the first look did not create it"
        );
        fx.open().put(Kind::Meta, "k", b"v").unwrap();
        let j = Journal::open_existing(&fx.target)
            .unwrap()
            .expect("there now");
        assert_eq!(j.get(Kind::Meta, "k").unwrap().unwrap(), b"v");
    }

    /// A process that hangs (SIGSTOP, a paused machine) keeps its socket open: the server
    /// ends its idle session after the idle limit, and with it the lock, so another process
    /// takes the transaction; the hung one, woken, can no longer write under its lock. (The
    /// limit is 60 s by default; the test sets 1 s through the connection string's options.)
    #[test]
    fn a_hung_holder_loses_its_shared_lock_when_its_idle_session_ends() {
        let Some(fx) = fixture(Backend::Postgres) else {
            return;
        };
        let Target::Postgres(t) = &fx.target else {
            unreachable!()
        };
        let short = Target::Postgres(PgTarget {
            url: format!("{} options='-c idle_session_timeout=1000'", t.url.expose()).into(),
            schema: t.schema.clone(),
        });
        let hung = Journal::open_target(&short).unwrap();
        let other = fx.open();
        let held = hung.try_lock("tx-9").unwrap().expect("free");
        assert!(
            other.try_lock("tx-9").unwrap().is_none(),
            "held while it lives"
        );
        std::thread::sleep(std::time::Duration::from_millis(2_500));
        let taken = other
            .try_lock("tx-9")
            .unwrap()
            .expect("free once the hung session was ended");
        let late = hung.atomically_holding(&held, |w| w.put(Kind::Gw, "tx-9", b"stale"));
        assert!(
            matches!(
                &late,
                Err(JournalError {
                    source: StoreError::LockLost(_),
                    ..
                })
            ),
            "{late:?}"
        );
        assert_eq!(
            other.get(Kind::Gw, "tx-9").unwrap(),
            None,
            "nothing stale written"
        );
        drop(taken);
    }

    /// A SQLite journal belongs to one process: its shared lock is always granted and
    /// writes under it commit.
    #[test]
    fn a_sqlite_journal_grants_its_shared_lock() {
        let fx = fixture(Backend::Sqlite).unwrap();
        let j = fx.open();
        let l = j.try_lock("tx-1").unwrap().expect("granted");
        j.atomically_holding(&l, |w| w.put(Kind::Gw, "tx-1", b"x"))
            .unwrap();
        assert_eq!(j.get(Kind::Gw, "tx-1").unwrap().unwrap(), b"x");
    }

    both!(records_read_back_in_bytewise_key_order, records_and_order);
    fn records_and_order(backend: Backend) {
        let Some(fx) = fixture(backend) else { return };
        let j = fx.open();
        // Bytewise: upper case before lower, '/' before letters, "a" before "a/1". A
        // language collation (the test server's default is ICU en-US) would mix them.
        let keys = ["b", "a/1", "Z", "a", "B", "_x", "l/9", "p/1"];
        for (i, k) in keys.iter().enumerate() {
            j.put(Kind::Open, k, &[i as u8]).unwrap();
        }
        j.put(Kind::Gw, "a", b"another kind").unwrap();
        let mut sorted: Vec<&str> = keys.to_vec();
        sorted.sort();
        let all = j.all(Kind::Open).unwrap();
        assert_eq!(
            all.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            sorted
        );
        assert_eq!(j.last_key(Kind::Open).unwrap().as_deref(), Some("p/1"));
        assert_eq!(j.last_key(Kind::Hold).unwrap(), None);
        let after: Vec<String> = j
            .range_after(Kind::Open, "B", 3)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(after, ["Z", "_x", "a"]);
        assert!(j.range_after(Kind::Open, "p/1", 10).unwrap().is_empty());
        assert_eq!(j.get(Kind::Open, "Z").unwrap(), Some(vec![2]));
        j.put(Kind::Open, "Z", b"replaced").unwrap();
        assert_eq!(j.get(Kind::Open, "Z").unwrap().unwrap(), b"replaced");
        j.atomically(|b| b.delete(Kind::Open, "Z")).unwrap();
        j.atomically(|b| b.delete(Kind::Open, "never there"))
            .unwrap();
        assert_eq!(j.get(Kind::Open, "Z").unwrap(), None);
        assert_eq!(j.get(Kind::Gw, "a").unwrap().unwrap(), b"another kind");
        assert_eq!(
            j.kind_counts().unwrap(),
            [("gw".to_string(), 1), ("open".to_string(), 7)].into()
        );
        // An empty value and arbitrary bytes come back as written.
        j.put(Kind::Hsm, "0", &[]).unwrap();
        j.put(Kind::Hsm, "1", &[0, 255, 0x27, 0x5c]).unwrap();
        assert_eq!(j.get(Kind::Hsm, "0").unwrap().unwrap(), b"");
        assert_eq!(
            j.get(Kind::Hsm, "1").unwrap().unwrap(),
            [0, 255, 0x27, 0x5c]
        );
    }

    both!(two_handles_on_one_journal_lose_no_write, two_writers);
    /// Two `Journal` handles (two processes' worth: each its own connection) increment one
    /// counter with a locked read-modify-write, and race to claim the same keys: every
    /// increment lands, and each key has exactly one winner.
    fn two_writers(backend: Backend) {
        let Some(fx) = fixture(backend) else { return };
        const N: u64 = 40;
        let handles = [fx.open(), fx.open()];
        handles[0]
            .put(Kind::Meta, "counter", &0u64.to_be_bytes())
            .unwrap();
        let wins: Vec<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = handles
                .iter()
                .map(|j| {
                    s.spawn(move || {
                        let mut won = 0;
                        for i in 0..N {
                            j.atomically(|b| {
                                let v = b.get_for_update(Kind::Meta, "counter")?.unwrap();
                                let n = u64::from_be_bytes(v.try_into().unwrap());
                                std::thread::yield_now();
                                b.put(Kind::Meta, "counter", &(n + 1).to_be_bytes())
                            })
                            .unwrap();
                            if j.atomically(|b| {
                                b.insert_new(Kind::Batch, &format!("{i:04}"), b"me")
                            })
                            .unwrap()
                            {
                                won += 1;
                            }
                        }
                        won
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        let n = handles[1].get(Kind::Meta, "counter").unwrap().unwrap();
        assert_eq!(
            u64::from_be_bytes(n.try_into().unwrap()),
            2 * N,
            "no increment lost"
        );
        assert_eq!(
            wins.iter().sum::<u64>(),
            N,
            "each key claimed exactly once: {wins:?}"
        );
        assert_eq!(handles[0].all(Kind::Batch).unwrap().len() as u64, N);
    }

    both!(
        migrations_are_idempotent_and_a_newer_schema_is_refused,
        migrations
    );
    fn migrations(backend: Backend) {
        let Some(fx) = fixture(backend) else { return };
        // Two processes opening a new journal at once, then again: one migration each.
        std::thread::scope(|s| {
            let a = s.spawn(|| fx.open());
            let b = s.spawn(|| fx.open());
            a.join().unwrap().put(Kind::Meta, "a", b"1").unwrap();
            b.join().unwrap().put(Kind::Meta, "b", b"1").unwrap();
        });
        let j = fx.open();
        assert_eq!(j.all(Kind::Meta).unwrap().len(), 2, "kept across reopen");
        drop(j);
        let set_version = |v: i64| match (&fx.target, &fx.rig, &fx.url) {
            (Target::Sqlite(p), _, _) => {
                rusqlite::Connection::open(p)
                    .unwrap()
                    .pragma_update(None, "user_version", v)
                    .unwrap();
            }
            (Target::Postgres(pg), Some(rig), Some(url)) => {
                rig.psql(
                    url,
                    &format!(
                        "INSERT INTO {}.schema_version (version) VALUES ({v})",
                        pg.schema
                    ),
                );
            }
            _ => unreachable!(),
        };
        let version = || match (&fx.target, &fx.rig, &fx.url) {
            (Target::Sqlite(p), _, _) => rusqlite::Connection::open(p)
                .unwrap()
                .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))
                .unwrap()
                .to_string(),
            (Target::Postgres(pg), Some(rig), Some(url)) => rig.psql(
                url,
                &format!(
                    "SELECT string_agg(version::text, ',') FROM {}.schema_version",
                    pg.schema
                ),
            ),
            _ => unreachable!(),
        };
        assert_eq!(version(), "1", "applied once");
        set_version(SCHEMA_VERSION + 1);
        match Journal::open_target(&fx.target) {
            Err(JournalError {
                source: StoreError::NewerSchema { found: 2, known: 1 },
                ..
            }) => {}
            Err(e) => panic!("refused for another reason: {e}"),
            Ok(_) => panic!("a journal newer than this build was opened"),
        }
    }

    both!(a_multi_thread_runtime_journals_from_its_tasks, on_tokio);
    /// The journal is called from async tasks on a multi-threaded runtime (the head end's
    /// own) and on a current-thread one (`#[tokio::test]`): no runtime-in-runtime panic, no
    /// deadlock, every write there.
    fn on_tokio(backend: Backend) {
        let Some(fx) = fixture(backend) else { return };
        let j = std::sync::Arc::new(fx.open());
        let multi = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        multi.block_on(async {
            let tasks: Vec<_> = (0..8)
                .map(|t| {
                    let j = j.clone();
                    tokio::spawn(async move {
                        for i in 0..10 {
                            j.put(Kind::Txn, &format!("m{t}-{i}"), b"v").unwrap();
                            tokio::task::yield_now().await;
                            assert!(j.get(Kind::Txn, &format!("m{t}-{i}")).unwrap().is_some());
                        }
                    })
                })
                .collect();
            for t in tasks {
                t.await.unwrap();
            }
        });
        let current = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        current.block_on(async {
            j.put(Kind::Txn, "current", b"v").unwrap();
            assert_eq!(j.all(Kind::Txn).unwrap().len(), 81);
        });
    }

    #[test]
    fn a_password_in_the_connection_string_reaches_no_message() {
        let target = Target::Postgres(PgTarget {
            url: "host=/nonexistent-purselink-dir port=5 user=u password=hunter2 dbname=d".into(),
            schema: "purselink_gateway".into(),
        });
        assert!(!format!("{target:?}").contains("hunter2"));
        let e = Journal::open_target(&target)
            .err()
            .expect("nothing listens there");
        let shown = format!("{e} {e:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("postgres schema purselink_gateway on /nonexistent-purselink-dir:5/d"),
            "{shown}"
        );
        let long = Target::Postgres(PgTarget {
            url: "host=/x".into(),
            schema: "s".repeat(64),
        });
        assert!(matches!(
            Journal::open_target(&long),
            Err(JournalError {
                source: StoreError::BadSchema { .. },
                ..
            })
        ));
    }

    /// The kinds are on disk in existing journals and read by these strings in `sim`'s audit
    /// and the tests: renaming a variant must not change them.
    #[test]
    fn every_kind_keeps_its_on_disk_string() {
        let on_disk: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        assert_eq!(
            on_disk,
            [
                "gw",
                "gwload",
                "open",
                "confirming",
                "release",
                "notify",
                "cursor",
                "offer",
                "entitlement",
                "txn",
                "psam",
                "card_init",
                "reversal",
                "batch",
                "meta",
                "account",
                "hold",
                "float",
                "load",
                "hsm",
                "outbox",
                "cleared_batch",
                "cleared_txn",
                "cleared_txid",
                "load_advice",
                "settlement",
                "expected_signature",
                "hotlist",
                "terminal",
                "passbook",
                "refund",
                "refund_due",
                "transfer",
                "transfer_code",
            ]
        );
    }
}
