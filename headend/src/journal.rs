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

/// Writes inside one SQLite transaction.
pub struct Batch<'a> {
    tx: rusqlite::Transaction<'a>,
}

impl Batch<'_> {
    pub fn step(&self, txid: &str, step: &str, detail: &str) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO steps (txid, step, detail, at) VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%f','now'))",
            )?
            .execute(params![txid, step, detail])?;
        Ok(())
    }

    pub fn put(&self, kind: &str, key: &str, value: &[u8]) -> rusqlite::Result<()> {
        self.tx
            .prepare_cached(
                "INSERT INTO state (kind, key, value) VALUES (?1, ?2, ?3)
                 ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
            )?
            .execute(params![kind, key, value])?;
        Ok(())
    }

    pub fn delete(&self, kind: &str, key: &str) -> rusqlite::Result<()> {
        self.tx.execute(
            "DELETE FROM state WHERE kind = ?1 AND key = ?2",
            params![kind, key],
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
                let tx = conn.transaction().map_err(|e| self.err(e))?;
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
    pub fn step(&self, txid: &str, step: &str, detail: &str) -> Result<(), JournalError> {
        self.atomically(|b| b.step(txid, step, detail))
    }

    pub fn put(&self, kind: &str, key: &str, value: &[u8]) -> Result<(), JournalError> {
        self.atomically(|b| b.put(kind, key, value))
    }

    /// A point read: served from SQLite's page cache (writers hold the connection only while
    /// writing WAL frames, never across an fsync), so it runs on the caller's thread rather
    /// than paying a `block_in_place` hand-off.
    pub fn get(&self, kind: &str, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.prepare_cached("SELECT value FROM state WHERE kind = ?1 AND key = ?2")
            .and_then(|mut st| st.query_row(params![kind, key], |r| r.get(0)).optional())
            .map_err(|e| self.err(e))
    }

    /// Every (key, value) of a kind, in key order.
    pub fn all(&self, kind: &str) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![kind], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    /// The greatest key of a kind, if any.
    ///
    /// # Errors
    /// The journal cannot be read.
    pub fn last_key(&self, kind: &str) -> Result<Option<String>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        conn.query_row(
            "SELECT key FROM state WHERE kind = ?1 ORDER BY key DESC LIMIT 1",
            params![kind],
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
        kind: &str,
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
            .query_map(params![kind, after, limit as i64], |r| {
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

    /// The record kinds present.
    pub fn kinds(&self) -> Result<Vec<String>, JournalError> {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = conn
            .prepare("SELECT DISTINCT kind FROM state ORDER BY kind")
            .map_err(|e| self.err(e))?;
        let rows = st.query_map([], |r| r.get(0)).map_err(|e| self.err(e))?;
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
    fn steps_and_state_survive_reopen_and_batches_are_atomic() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j.sqlite");
        {
            let j = Journal::open(&p).unwrap();
            j.step("t1", "draw received", "").unwrap();
            j.atomically(|b| {
                b.put("answer", "t1", b"cmd")?;
                b.step("t1", "debit command issued", "psam 1")
            })
            .unwrap();
            let failed = j.atomically(|b| {
                b.put("answer", "t2", b"x")?;
                Err::<(), _>(rusqlite::Error::InvalidQuery)
            });
            assert!(failed.is_err());
        }
        let j = Journal::open(&p).unwrap();
        assert_eq!(
            j.steps("t1").unwrap(),
            ["draw received", "debit command issued"]
        );
        assert_eq!(j.get("answer", "t1").unwrap().unwrap(), b"cmd");
        assert_eq!(j.get("answer", "t2").unwrap(), None, "rolled back");
    }
}
