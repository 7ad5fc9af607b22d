//! The durable journal every role writes before it acts: SQLite (rusqlite, bundled) in WAL
//! mode, each commit fsynced before it returns (group commit, below), so a committed step
//! survives SIGKILL and power loss. The file is owner-only (0600, its -wal and -shm too) in
//! a 0700 directory when the journal creates it; it never holds a master key (snapshots
//! hold state only) but does hold transaction session keys and account records.
//!
//! Two tables serve every role:
//! - `steps`: an append-only log of (transaction id, step, detail) — what happened, in order;
//! - `state`: keyed blobs (`kind`, `key`) — the stored answer for a transaction id (the
//!   idempotency key: a retried message gets the same answer), a role's transaction record,
//!   a security card's snapshot.
//!
//! Each `state` record has a [`Kind`], named once in that enum: the string it is stored
//! under (the `kind` column) is [`Kind::as_str`], and no role passes a kind as a bare string.
//!
//! [`Journal::atomically`] groups several writes in one SQLite transaction, so a role's
//! "after" state (security card snapshot + transaction record + answer) lands all or nothing.
//!
//! Group commit: SQLite commits with `synchronous=NORMAL` (the WAL frames are written, not yet
//! synced), then [`Journal::atomically`] fsyncs the WAL file itself before it returns — one
//! fsync covers every commit written before it started, so concurrent transactions share one
//! instead of queueing one each. A commit is durable when `atomically` returns, exactly as
//! with `synchronous=FULL` (which fsyncs the WAL on every commit); checkpoints still sync the
//! WAL and the database as SQLite does.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension, params};

#[derive(Debug, thiserror::Error)]
#[error("journal {path}: {source}")]
pub struct JournalError {
    pub path: String,
    #[source]
    pub source: rusqlite::Error,
}

pub struct Journal {
    conn: Mutex<Connection>,
    path: String,
    wal_path: PathBuf,
    /// Commits written to the WAL (counted under the connection lock).
    written: AtomicU64,
    /// The group commit: the WAL file, once opened, and how many commits are synced. Held
    /// by the one thread that fsyncs; the others wait here and find their commit covered.
    synced: Mutex<(Option<std::fs::File>, u64)>,
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
    /// Clearing: a received load advice ([`crate::clearing::AdviceRec`]), by
    /// `<funder>/<transaction id>`.
    Advice,
    /// Clearing: a settlement report ([`crate::clearing::settle::Report`]), by its id.
    Settlement,
}

impl Kind {
    /// Every kind, in declaration order.
    pub const ALL: [Kind; 25] = [
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
        Kind::Advice,
        Kind::Settlement,
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
            Kind::Advice => "load_advice",
            Kind::Settlement => "settlement",
        }
    }
}

impl std::fmt::Display for Kind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Writes inside one SQLite transaction.
pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
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
    pub fn step(&self, txid: &str, step: &impl StepText, detail: &str) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO steps (txid, step, detail, at) VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%f','now'))",
            )?
            .execute(params![txid, step.text().as_ref(), detail])?;
        Ok(())
    }

    /// Stores `value` under (`kind`, `key`), replacing what was there.
    pub fn put(&self, kind: Kind, key: &str, value: &[u8]) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO state (kind, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![kind.as_str(), key, value])?;
        Ok(())
    }

    /// The record (`kind`, `key`) as this transaction sees it: reads inside
    /// [`Journal::atomically`] decide on data no other writer can change before the commit
    /// (the transaction holds the write lock from its start).
    pub fn get(&self, kind: Kind, key: &str) -> rusqlite::Result<Option<Vec<u8>>> {
        self.tx
            .prepare_cached("SELECT value FROM state WHERE kind = ?1 AND key = ?2")?
            .query_row(params![kind.as_str(), key], |r| r.get(0))
            .optional()
    }

    /// Every (key, value) of a kind as this transaction sees it, in key order.
    pub fn all(&self, kind: Kind) -> rusqlite::Result<Vec<(String, Vec<u8>)>> {
        let mut st = self
            .tx
            .prepare_cached("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key")?;
        let rows = st.query_map(params![kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Deletes the record (`kind`, `key`), if any.
    pub fn delete(&self, kind: Kind, key: &str) -> rusqlite::Result<()> {
        self.tx.execute(
            "DELETE FROM state WHERE kind = ?1 AND key = ?2",
            params![kind.as_str(), key],
        )?;
        Ok(())
    }
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
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let p = path.display().to_string();
        let err = |source| JournalError {
            path: p.clone(),
            source,
        };
        let io = |e: std::io::Error| {
            err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
                Some(e.to_string()),
            ))
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                proto::secret::private_dir(dir).map_err(io)?;
            }
        }
        // The journal holds transaction session keys and account data: owner-only. SQLite
        // creates the -wal and -shm files with the database file's mode.
        {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .and_then(|f| f.set_permissions(std::fs::Permissions::from_mode(0o600)))
                .map_err(io)?;
        }
        let conn = Connection::open(path).map_err(err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;
             PRAGMA busy_timeout = 5000;
             CREATE TABLE IF NOT EXISTS steps (
                 id INTEGER PRIMARY KEY AUTOINCREMENT,
                 txid TEXT NOT NULL, step TEXT NOT NULL, detail TEXT NOT NULL, at TEXT NOT NULL);
             CREATE INDEX IF NOT EXISTS steps_txid ON steps (txid);
             CREATE TABLE IF NOT EXISTS state (
                 kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
                 PRIMARY KEY (kind, key));",
        )
        .map_err(err)?;
        let mut wal_path = path.as_os_str().to_owned();
        wal_path.push("-wal");
        Ok(Self {
            conn: Mutex::new(conn),
            path: p,
            wal_path: wal_path.into(),
            written: AtomicU64::new(0),
            synced: Mutex::new((None, 0)),
        })
    }

    /// Makes commit number `mine` durable: fsyncs the WAL unless an fsync that started after
    /// that commit was written has already done it. The first sync also syncs the directory,
    /// so the WAL file's own entry is durable.
    fn sync_wal(&self, mine: u64) -> Result<(), JournalError> {
        let io = |e: std::io::Error| {
            self.err(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
                Some(format!("fsync {}: {e}", self.wal_path.display())),
            ))
        };
        let mut g = self.synced.lock().unwrap_or_else(|p| p.into_inner());
        if g.1 >= mine {
            return Ok(());
        }
        let upto = self.written.load(Ordering::Acquire);
        if g.0.is_none() {
            g.0 = Some(std::fs::File::open(&self.wal_path).map_err(io)?);
            if let Some(dir) = self.wal_path.parent() {
                let dir = if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                };
                std::fs::File::open(dir)
                    .and_then(|d| d.sync_all())
                    .map_err(io)?;
            }
        }
        g.0.as_ref()
            .expect("opened above")
            .sync_data()
            .map_err(io)?;
        g.1 = upto;
        Ok(())
    }

    fn err(&self, source: rusqlite::Error) -> JournalError {
        JournalError {
            path: self.path.clone(),
            source,
        }
    }

    /// Runs `f` in one SQLite transaction, committed before this returns.
    pub fn atomically<T>(
        &self,
        f: impl FnOnce(&Batch) -> rusqlite::Result<T>,
    ) -> Result<T, JournalError> {
        blocking(|| {
            let (out, mine) = {
                let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
                // IMMEDIATE: the write lock from the start, so what the batch reads
                // ([`Batch::get`]) no other process can change before the commit.
                let tx = conn
                    .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
                    .map_err(|e| self.err(e))?;
                let batch = Batch { tx };
                let out = f(&batch).map_err(|e| self.err(e))?;
                batch.tx.commit().map_err(|e| self.err(e))?;
                (out, self.written.fetch_add(1, Ordering::AcqRel) + 1)
            };
            // Outside the connection lock, so others commit while this one syncs.
            self.sync_wal(mine)?;
            Ok(out)
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

    /// A point read: served from SQLite's page cache (writers hold the connection only while
    /// writing WAL frames, never across an fsync), so it runs on the caller's thread rather
    /// than paying a `block_in_place` hand-off.
    pub fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.prepare_cached("SELECT value FROM state WHERE kind = ?1 AND key = ?2")
            .and_then(|mut st| {
                st.query_row(params![kind.as_str(), key], |r| r.get(0))
                    .optional()
            })
            .map_err(|e| self.err(e))
    }

    /// Every (key, value) of a kind, in key order.
    pub fn all(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// The greatest key of a kind, if any.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn last_key(&self, kind: Kind) -> Result<Option<String>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "SELECT key FROM state WHERE kind = ?1 ORDER BY key DESC LIMIT 1",
            params![kind.as_str()],
            |r| r.get(0),
        )
        .optional()
        .map_err(|e| self.err(e))
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
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare_cached(
                "SELECT key, value FROM state WHERE kind = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![kind.as_str(), after, limit as i64], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// The steps journaled for one transaction, oldest first.
    pub fn steps(&self, txid: &str) -> Result<Vec<String>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare("SELECT step FROM steps WHERE txid = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![txid], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// How many records of each kind present (by the kind's on-disk string, so a kind this
    /// build does not know is counted too), in kind order.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn kind_counts(&self) -> Result<std::collections::BTreeMap<String, usize>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare("SELECT kind, COUNT(*) FROM state GROUP BY kind")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    pub fn count_steps(&self) -> Result<u64, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row("SELECT COUNT(*) FROM steps", [], |r| r.get(0))
            .map_err(|e| self.err(e))
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

    #[test]
    fn steps_and_state_survive_reopen_and_batches_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.sqlite");
        {
            let j = Journal::open(&p).unwrap();
            use crate::payment::step::PayStep;
            j.step("t1", &PayStep::DrawRequestReceived, "").unwrap();
            j.atomically(|b| {
                b.put(Kind::Txn, "t1", b"cmd")?;
                b.step("t1", &PayStep::DebitCommandIssued, "psam 1")
            })
            .unwrap();
            let failed = j.atomically(|b| {
                b.put(Kind::Txn, "t2", b"x")?;
                Err::<(), _>(rusqlite::Error::InvalidQuery)
            });
            assert!(failed.is_err());
        }
        let j = Journal::open(&p).unwrap();
        assert_eq!(
            j.steps("t1").unwrap(),
            ["draw request received", "debit command issued"]
        );
        assert_eq!(j.get(Kind::Txn, "t1").unwrap().unwrap(), b"cmd");
        assert_eq!(j.get(Kind::Txn, "t2").unwrap(), None, "rolled back");
        assert_eq!(j.kind_counts().unwrap(), [("txn".to_string(), 1)].into());
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
                "load_advice",
                "settlement",
            ]
        );
    }
}
