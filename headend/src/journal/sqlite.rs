//! The SQLite backend of [`super::Journal`]: one connection under a mutex, WAL, and the
//! group-committed fsync the module docs of [`super`] describe.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::{JournalError, Kind, SCHEMA_VERSION, StoreError};

pub(super) struct Sqlite {
    conn: Mutex<Connection>,
    path: String,
    wal_path: PathBuf,
    /// Commits written to the WAL (counted under the connection lock).
    written: AtomicU64,
    /// The group commit: the WAL file, once opened, and how many commits are synced. Held
    /// by the one thread that fsyncs; the others wait here and find their commit covered.
    synced: Mutex<(Option<std::fs::File>, u64)>,
}

/// The migrations, in order: entry `n` takes a journal from version `n` to `n + 1`. Every
/// statement is idempotent, so a journal written before versions were recorded (version 0
/// with the tables already there) is brought to version 1 unchanged.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = ["
    CREATE TABLE IF NOT EXISTS steps (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        txid TEXT NOT NULL, step TEXT NOT NULL, detail TEXT NOT NULL, at TEXT NOT NULL);
    CREATE INDEX IF NOT EXISTS steps_txid ON steps (txid);
    CREATE TABLE IF NOT EXISTS state (
        kind TEXT NOT NULL, key TEXT NOT NULL, value BLOB NOT NULL,
        PRIMARY KEY (kind, key));"];

impl Sqlite {
    pub(super) fn open(path: &Path) -> Result<Self, JournalError> {
        let p = path.display().to_string();
        let err = |source| JournalError {
            at: p.clone(),
            source,
        };
        let io = |what: &str, source: std::io::Error| {
            err(StoreError::Io {
                what: what.into(),
                source,
            })
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if !dir.exists() {
                proto::secret::private_dir(dir).map_err(|e| io("create its directory", e))?;
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
                .map_err(|e| io("open", e))?;
        }
        let mut conn = Connection::open(path).map_err(|e| err(e.into()))?;
        // The busy timeout first: switching to WAL waits for another opener's lock too.
        conn.execute_batch(
            "PRAGMA busy_timeout = 5000;
             PRAGMA journal_mode = WAL;
             PRAGMA synchronous = NORMAL;",
        )
        .map_err(|e| err(e.into()))?;
        migrate(&mut conn).map_err(err)?;
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

    pub(super) fn at(&self) -> &str {
        &self.path
    }

    /// Makes commit number `mine` durable: fsyncs the WAL unless an fsync that started after
    /// that commit was written has already done it. The first sync also syncs the directory,
    /// so the WAL file's own entry is durable.
    fn sync_wal(&self, mine: u64) -> Result<(), JournalError> {
        let io = |e: std::io::Error| {
            self.err(StoreError::Io {
                what: format!("fsync {}", self.wal_path.display()),
                source: e,
            })
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

    fn err(&self, source: impl Into<StoreError>) -> JournalError {
        JournalError {
            at: self.path.clone(),
            source: source.into(),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One `IMMEDIATE` transaction (the write lock from its start, so a read in it holds
    /// against another process's writer); `f` hands the transaction back with its result,
    /// committed when that is `Ok`, rolled back (dropped) otherwise.
    pub(super) fn atomically<T>(
        &self,
        f: impl FnOnce(rusqlite::Transaction<'_>) -> (Result<T, StoreError>, rusqlite::Transaction<'_>),
    ) -> Result<T, JournalError> {
        let (out, mine) = {
            let mut conn = self.conn();
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(|e| self.err(e))?;
            let (out, tx) = f(tx);
            let out = out.map_err(|e| self.err(e))?;
            tx.commit().map_err(|e| self.err(e))?;
            (out, self.written.fetch_add(1, Ordering::AcqRel) + 1)
        };
        // Outside the connection lock, so others commit while this one syncs.
        self.sync_wal(mine)?;
        Ok(out)
    }

    pub(super) fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        get(&self.conn(), kind, key).map_err(|e| self.err(e))
    }

    pub(super) fn all(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    pub(super) fn last_key(&self, kind: Kind) -> Result<Option<String>, JournalError> {
        self.conn()
            .query_row(
                "SELECT key FROM state WHERE kind = ?1 ORDER BY key DESC LIMIT 1",
                params![kind.as_str()],
                |r| r.get(0),
            )
            .optional()
            .map_err(|e| self.err(e))
    }

    pub(super) fn range_after(
        &self,
        kind: Kind,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let conn = self.conn();
        let mut st = conn
            .prepare_cached(
                "SELECT key, value FROM state WHERE kind = ?1 AND key > ?2 ORDER BY key LIMIT ?3",
            )
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(
                params![
                    kind.as_str(),
                    after,
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    pub(super) fn steps(&self, txid: &str) -> Result<Vec<String>, JournalError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT step FROM steps WHERE txid = ?1 ORDER BY id")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map(params![txid], |r| r.get(0))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    pub(super) fn kind_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, usize>, JournalError> {
        let conn = self.conn();
        let mut st = conn
            .prepare("SELECT kind, COUNT(*) FROM state GROUP BY kind")
            .map_err(|e| self.err(e))?;
        let rows = st
            .query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))
            .map_err(|e| self.err(e))?;
        rows.collect::<rusqlite::Result<_>>()
            .map_err(|e| self.err(e))
    }

    pub(super) fn count_steps(&self) -> Result<u64, JournalError> {
        self.conn()
            .query_row("SELECT COUNT(*) FROM steps", [], |r| r.get(0))
            .map_err(|e| self.err(e))
    }
}

/// Brings the journal to [`SCHEMA_VERSION`] (`PRAGMA user_version`) in one transaction, or
/// refuses one that is newer.
fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let found: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", from as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

pub(super) fn step(
    tx: &rusqlite::Transaction<'_>,
    txid: &str,
    step: &str,
    detail: &str,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO steps (txid, step, detail, at) VALUES (?1, ?2, ?3, strftime('%Y-%m-%dT%H:%M:%f','now'))",
    )?
    .execute(params![txid, step, detail])?;
    Ok(())
}

pub(super) fn put(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
    value: &[u8],
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO state (kind, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT (kind, key) DO UPDATE SET value = excluded.value",
    )?
    .execute(params![kind.as_str(), key, value])?;
    Ok(())
}

pub(super) fn insert_new(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
    value: &[u8],
) -> Result<bool, StoreError> {
    let n = tx
        .prepare_cached(
            "INSERT INTO state (kind, key, value) VALUES (?1, ?2, ?3)
             ON CONFLICT (kind, key) DO NOTHING",
        )?
        .execute(params![kind.as_str(), key, value])?;
    Ok(n == 1)
}

pub(super) fn delete(
    tx: &rusqlite::Transaction<'_>,
    kind: Kind,
    key: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM state WHERE kind = ?1 AND key = ?2",
        params![kind.as_str(), key],
    )?;
    Ok(())
}

/// Every (key, value) of a kind, in key order, on a connection or in a transaction.
pub(super) fn all(conn: &Connection, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
    let mut st =
        conn.prepare_cached("SELECT key, value FROM state WHERE kind = ?1 ORDER BY key")?;
    let rows = st.query_map(params![kind.as_str()], |r| Ok((r.get(0)?, r.get(1)?)))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A point read on a connection or in a transaction.
pub(super) fn get(conn: &Connection, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT value FROM state WHERE kind = ?1 AND key = ?2")?
        .query_row(params![kind.as_str(), key], |r| r.get(0))
        .optional()?)
}
