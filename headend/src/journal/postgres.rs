//! The PostgreSQL backend of [`super::Journal`], on `tokio-postgres`.
//!
//! Sync over async: the journal's API is synchronous and is called from async code on a
//! multi-threaded tokio runtime (inside `block_in_place`), from a current-thread runtime
//! (tests), or from no runtime at all (`headend status`). So nothing here may need the
//! caller's runtime, nor start one on the caller's thread (tokio refuses a `block_on`
//! inside a runtime). Each connection therefore gets its own thread running a small
//! current-thread runtime that drives the socket (`tokio_postgres::Connection`); the
//! caller's thread only sends requests through the `Client` (channels, no IO, no runtime)
//! and waits for the answers with a plain executor (`futures_executor::block_on`), which
//! works in every one of those contexts. Dropping the journal drops the client, which ends
//! the connection and its thread.
//!
//! One connection per journal, under a mutex, as with SQLite: the writes of one process
//! stay in the order they were made (a reader following a feed by key, like the gateway's
//! reversal cursor, never sees a later key commit before an earlier one). A connection that
//! broke is replaced at the next call; the call that saw it break fails (`journal
//! unavailable`, nothing was done — or, for a commit, the outcome is unknown and the
//! transaction id makes the retry safe).
//!
//! Schema: each role journals in its own PostgreSQL schema (`[journal] schema_prefix` +
//! role name), so several roles, and several head-end machines, share one database. The
//! schema holds `schema_version` (one row per migration applied) and version 1's `steps`
//! (`id BIGSERIAL`) and `state` (`PRIMARY KEY (kind, key)`, keys `COLLATE "C"` so they
//! sort bytewise as in SQLite). Migrations run at open, in one transaction under an
//! advisory lock per schema (two processes opening at once apply them once), and a schema
//! newer than this build is refused.

use std::sync::{Mutex, MutexGuard};

use tokio_postgres::{Client, NoTls, Statement};

use super::{JournalError, Kind, PgTarget, SCHEMA_VERSION, StoreError};

/// PostgreSQL cuts identifiers to 63 bytes (NAMEDATALEN - 1).
const MAX_IDENT: usize = 63;

/// The migrations, in order: entry `n` takes a schema from version `n` to `n + 1`. `{s}`
/// stands for the quoted schema name.
const MIGRATIONS: [&str; SCHEMA_VERSION as usize] = ["
    CREATE TABLE {s}.steps (
        id BIGSERIAL PRIMARY KEY,
        txid TEXT NOT NULL,
        step TEXT NOT NULL,
        detail TEXT NOT NULL,
        at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp());
    CREATE INDEX steps_txid ON {s}.steps (txid);
    CREATE TABLE {s}.state (
        kind TEXT COLLATE \"C\" NOT NULL,
        key TEXT COLLATE \"C\" NOT NULL,
        value BYTEA NOT NULL,
        PRIMARY KEY (kind, key));"];

pub(super) struct Pg {
    config: tokio_postgres::Config,
    /// The schema, quoted for SQL.
    schema: String,
    at: String,
    /// The pool: up to [`POOL`] connections, each used by one caller at a time and made on
    /// first use (or again after it broke).
    conns: Vec<Mutex<Option<Conn>>>,
    /// Where the next caller starts looking for a free connection.
    next: std::sync::atomic::AtomicUsize,
    /// Connections made so far: the next one's [`Conn::generation`].
    connections: std::sync::atomic::AtomicU64,
}

/// How long the server lets a session sit idle before it ends it (and its locks): see
/// [`Pg::connect`].
pub(super) const SESSION_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(60);

/// Connections per journal: callers in several threads (a multi-threaded runtime's
/// workers) run their statements side by side instead of queueing on one.
const POOL: usize = 4;

/// One connection: the client, its prepared statements, and the thread driving its socket.
struct Conn {
    client: Option<Client>,
    st: Statements,
    thread: Option<std::thread::JoinHandle<()>>,
    /// Which connection of this journal it is (unique among all its connections, old and
    /// new): session advisory locks live and die with their connection, so a lock taken on
    /// generation `g` is held while `g` is the one in its slot.
    generation: u64,
    /// Its place in the pool.
    slot: usize,
}

impl Drop for Conn {
    fn drop(&mut self) {
        // The client first: the connection then ends, and so does its thread.
        drop(self.client.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Conn {
    fn client(&self) -> &Client {
        self.client.as_ref().expect("until dropped")
    }
}

struct Statements {
    step: Statement,
    put: Statement,
    insert_new: Statement,
    delete: Statement,
    get: Statement,
    get_for_update: Statement,
    all_for_update: Statement,
    all: Statement,
    last_key: Statement,
    range_after: Statement,
    steps: Statement,
    kind_counts: Statement,
    count_steps: Statement,
    try_lock: Statement,
    unlock: Statement,
}

/// Waits for a `tokio-postgres` future on the caller's thread (see the module docs).
fn wait<F: std::future::Future>(f: F) -> F::Output {
    futures_executor::block_on(f)
}

/// `name` quoted as a PostgreSQL identifier.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl Pg {
    pub(super) fn open(target: &PgTarget) -> Result<Self, JournalError> {
        Ok(Self::open_inner(target, false)?.expect("created when missing"))
    }

    /// [`Pg::open`], but `None` when the schema does not exist (a reader, such as
    /// `headend reconcile`, must not create what it reads).
    pub(super) fn open_existing(target: &PgTarget) -> Result<Option<Self>, JournalError> {
        Self::open_inner(target, true)
    }

    fn open_inner(target: &PgTarget, existing_only: bool) -> Result<Option<Self>, JournalError> {
        let schema_err = |why| JournalError {
            at: format!("postgres schema {}", target.schema),
            source: StoreError::BadSchema {
                name: target.schema.clone(),
                why,
            },
        };
        if target.schema.is_empty() {
            return Err(schema_err("empty"));
        }
        if target.schema.len() > MAX_IDENT {
            return Err(schema_err("longer than PostgreSQL's 63 bytes"));
        }
        if target.schema.contains('\0') {
            return Err(schema_err("holds a NUL"));
        }
        let config: tokio_postgres::Config =
            target.url.expose().parse().map_err(|e| JournalError {
                at: format!("postgres schema {}", target.schema),
                source: StoreError::Postgres(e),
            })?;
        let pg = Self {
            at: describe(&config, &target.schema),
            schema: quote_ident(&target.schema),
            config,
            conns: (0..POOL).map(|_| Mutex::new(None)).collect(),
            next: Default::default(),
            connections: Default::default(),
        };
        let conn = pg.connect().map_err(|e| pg.err(e))?;
        if existing_only {
            let found = wait(conn.0.query_opt(
                "SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = $1",
                &[&target.schema],
            ))
            .map_err(|e| pg.err(e))?;
            if found.is_none() {
                return Ok(None);
            }
        }
        pg.migrate(&conn, &target.schema).map_err(|e| pg.err(e))?;
        *pg.lock_slot(0) = Some(pg.prepare(conn, 0).map_err(|e| pg.err(e))?);
        tracing::info!(journal = %pg.at, version = SCHEMA_VERSION, "journal: PostgreSQL schema ready");
        Ok(Some(pg))
    }

    pub(super) fn at(&self) -> &str {
        &self.at
    }

    fn err(&self, source: impl Into<StoreError>) -> JournalError {
        JournalError {
            at: self.at.clone(),
            source: source.into(),
        }
    }

    /// A slot's mutex. A caller that panicked while holding it may have left a transaction
    /// open: its connection is dropped (the server rolls the transaction back) and the next
    /// call connects anew.
    fn lock_slot(&self, slot: usize) -> MutexGuard<'_, Option<Conn>> {
        let m = &self.conns[slot];
        match m.lock() {
            Ok(g) => g,
            Err(poisoned) => {
                let mut g = poisoned.into_inner();
                *g = None;
                m.clear_poison();
                g
            }
        }
    }

    /// A free slot (looking from the next in turn), or the one in turn once all are busy.
    fn any_slot(&self) -> (usize, MutexGuard<'_, Option<Conn>>) {
        let start = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % POOL;
        for k in 0..POOL {
            let i = (start + k) % POOL;
            match self.conns[i].try_lock() {
                Ok(g) => return (i, g),
                Err(std::sync::TryLockError::Poisoned(_)) => return (i, self.lock_slot(i)),
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
        }
        (start, self.lock_slot(start))
    }

    /// Connects: a thread of its own drives the socket; the client comes back here. The
    /// session commits synchronously whatever the server's default.
    fn connect(&self) -> Result<(Client, std::thread::JoinHandle<()>), StoreError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let config = self.config.clone();
        let at = self.at.clone();
        let thread = std::thread::Builder::new()
            .name("journal-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(source) => {
                        let _ = tx.send(Err(StoreError::Io {
                            what: "the connection's runtime".into(),
                            source,
                        }));
                        return;
                    }
                };
                rt.block_on(async move {
                    match config.connect(NoTls).await {
                        Ok((client, connection)) => {
                            let _ = tx.send(Ok(client));
                            if let Err(e) = connection.await {
                                tracing::warn!(journal = %at, error = %e, "journal: PostgreSQL connection lost");
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e.into()));
                        }
                    }
                });
            })
            .map_err(|source| StoreError::Io {
                what: "the connection's thread".into(),
                source,
            })?;
        let client = match rx.recv() {
            Ok(r) => r?,
            Err(_) => {
                let _ = thread.join();
                return Err(StoreError::Io {
                    what: "the connection's thread".into(),
                    source: std::io::Error::other("ended before connecting"),
                });
            }
        };
        // Committed before a role answers; the server's notices (an `IF NOT EXISTS` that
        // skipped) are not for the log.
        let mut setup =
            String::from("SET synchronous_commit = on; SET client_min_messages = warning;");
        // A session's advisory locks (a gateway's hold on a transaction) end with it. A
        // process that hangs, or a machine that is paused, cut off or powered off, keeps its
        // socket open: the server ends such a session after SESSION_IDLE_LIMIT idle (more than
        // any hold lasts: a few role calls) and, over TCP, finds a silent peer by keepalives
        // in about 25 s. The connection string's `options` may set these itself.
        let given = self.config.get_options().unwrap_or_default();
        if !given.contains("idle_session_timeout") {
            setup += &format!(
                " SET idle_session_timeout = '{}s';",
                SESSION_IDLE_LIMIT.as_secs()
            );
        }
        if !given.contains("tcp_keepalives") {
            setup += " SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3;";
        }
        wait(client.batch_execute(&setup))?;
        Ok((client, thread))
    }

    /// Applies the migrations the schema is missing, in one transaction under an advisory
    /// lock on the schema's name, or refuses a schema newer than this build.
    fn migrate(
        &self,
        (client, _): &(Client, std::thread::JoinHandle<()>),
        name: &str,
    ) -> Result<(), StoreError> {
        let s = &self.schema;
        wait(async {
            client.batch_execute("BEGIN").await?;
            let r = async {
                client
                    .execute(
                        "SELECT pg_advisory_xact_lock(hashtextextended('purselink journal ' || $1::text, 0))",
                        &[&name],
                    )
                    .await?;
                // Created only when missing: a deployment may create it beforehand for a
                // login that may not create schemas in the database.
                let exists = client
                    .query_opt("SELECT 1 FROM pg_namespace WHERE nspname = $1", &[&name])
                    .await?
                    .is_some();
                if !exists {
                    client.batch_execute(&format!("CREATE SCHEMA {s}")).await?;
                }
                client
                    .batch_execute(&format!(
                        "CREATE TABLE IF NOT EXISTS {s}.schema_version (
                             version BIGINT PRIMARY KEY,
                             applied_at TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp())"
                    ))
                    .await?;
                let found: i64 = client
                    .query_one(
                        &format!("SELECT COALESCE(MAX(version), 0) FROM {s}.schema_version"),
                        &[],
                    )
                    .await?
                    .get(0);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        found,
                        known: SCHEMA_VERSION,
                    });
                }
                for (from, sql) in MIGRATIONS.iter().enumerate().skip(found.max(0) as usize) {
                    client.batch_execute(&sql.replace("{s}", s)).await?;
                    let version = from as i64 + 1;
                    client
                        .execute(
                            &format!("INSERT INTO {s}.schema_version (version) VALUES ($1)"),
                            &[&version],
                        )
                        .await?;
                    tracing::info!(journal = %self.at, version, "journal: migration applied");
                }
                Ok(())
            }
            .await;
            match r {
                Ok(()) => {
                    client.batch_execute("COMMIT").await?;
                    Ok(())
                }
                Err(e) => {
                    let _ = client.batch_execute("ROLLBACK").await;
                    Err(e)
                }
            }
        })
    }

    /// Prepares the statements on a new connection for pool slot `slot`.
    fn prepare(
        &self,
        (client, thread): (Client, std::thread::JoinHandle<()>),
        slot: usize,
    ) -> Result<Conn, StoreError> {
        let s = &self.schema;
        let st = wait(async {
            let p = |sql: String| {
                let client = &client;
                async move { client.prepare(&sql).await }
            };
            Ok::<_, tokio_postgres::Error>(Statements {
                step: p(format!(
                    "INSERT INTO {s}.steps (txid, step, detail) VALUES ($1, $2, $3)"
                ))
                .await?,
                put: p(format!(
                    "INSERT INTO {s}.state (kind, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (kind, key) DO UPDATE SET value = EXCLUDED.value"
                ))
                .await?,
                insert_new: p(format!(
                    "INSERT INTO {s}.state (kind, key, value) VALUES ($1, $2, $3)
                     ON CONFLICT (kind, key) DO NOTHING"
                ))
                .await?,
                delete: p(format!(
                    "DELETE FROM {s}.state WHERE kind = $1 AND key = $2"
                ))
                .await?,
                get: p(format!(
                    "SELECT value FROM {s}.state WHERE kind = $1 AND key = $2"
                ))
                .await?,
                get_for_update: p(format!(
                    "SELECT value FROM {s}.state WHERE kind = $1 AND key = $2 FOR UPDATE"
                ))
                .await?,
                all_for_update: p(format!(
                    "SELECT key, value FROM {s}.state WHERE kind = $1 ORDER BY key FOR UPDATE"
                ))
                .await?,
                all: p(format!(
                    "SELECT key, value FROM {s}.state WHERE kind = $1 ORDER BY key"
                ))
                .await?,
                last_key: p(format!(
                    "SELECT key FROM {s}.state WHERE kind = $1 ORDER BY key DESC LIMIT 1"
                ))
                .await?,
                range_after: p(format!(
                    "SELECT key, value FROM {s}.state WHERE kind = $1 AND key > $2
                     ORDER BY key LIMIT $3"
                ))
                .await?,
                steps: p(format!(
                    "SELECT step FROM {s}.steps WHERE txid = $1 ORDER BY id"
                ))
                .await?,
                kind_counts: p(format!(
                    "SELECT kind, COUNT(*) FROM {s}.state GROUP BY kind"
                ))
                .await?,
                count_steps: p(format!("SELECT COUNT(*) FROM {s}.steps")).await?,
                // Session advisory locks, keyed by a 64-bit hash of the schema and the name:
                // every process on the database shares the key space, the schema keeps
                // roles apart. A collision only makes two names wait for each other.
                try_lock: p("SELECT pg_try_advisory_lock(hashtextextended($1, 0))".into()).await?,
                unlock: p("SELECT pg_advisory_unlock(hashtextextended($1, 0))".into()).await?,
            })
        })?;
        Ok(Conn {
            client: Some(client),
            st,
            thread: Some(thread),
            generation: self
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            slot,
        })
    }

    /// Runs `f` with a free connection of the pool (see [`Pg::with_slot`]).
    fn with<T>(
        &self,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        let (slot, g) = self.any_slot();
        self.run(slot, g, f)
    }

    /// Runs `f` with the connection in `slot` (a session advisory lock's), connecting first
    /// if there is none (or it broke); a connection that breaks during `f` is dropped.
    fn with_slot<T>(
        &self,
        slot: usize,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        self.run(slot, self.lock_slot(slot), f)
    }

    fn run<T>(
        &self,
        slot: usize,
        mut g: MutexGuard<'_, Option<Conn>>,
        f: impl FnOnce(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        if g.as_ref().is_none_or(|c| c.client().is_closed()) {
            let replaced = g.take().is_some();
            let conn = self.connect().map_err(|e| self.err(e))?;
            *g = Some(self.prepare(conn, slot).map_err(|e| self.err(e))?);
            if replaced {
                tracing::info!(journal = %self.at, slot, "journal: reconnected to PostgreSQL");
            }
        }
        let conn = g.as_mut().expect("connected above");
        let out = f(conn);
        if conn.client().is_closed() {
            *g = None;
        }
        out.map_err(|e| self.err(e))
    }

    /// [`Pg::with`] for a read (or a lock attempt): when it failed because the connection
    /// had died unseen (the server ended the session), it runs once more on a new one —
    /// nothing of it took effect on the dead one.
    fn with_retry<T>(
        &self,
        f: impl Fn(&mut Conn) -> Result<T, StoreError>,
    ) -> Result<T, JournalError> {
        match self.with(&f) {
            Err(JournalError {
                source: StoreError::Postgres(e),
                ..
            }) if e.is_closed() => {
                tracing::info!(journal = %self.at, "journal: connection had closed; reading again on a new one");
                self.with(&f)
            }
            other => other,
        }
    }

    /// One transaction: `f` hands the batch back with its result; committed when that is
    /// `Ok`, rolled back otherwise.
    /// With `holding` (a lock's name, slot and connection generation), on the session
    /// that holds the lock, and only while it still does: on a newer connection (the lock's
    /// session ended, so another process may hold it now) nothing is written and the answer
    /// is [`StoreError::LockLost`].
    pub(super) fn atomically<T>(
        &self,
        holding: Option<(&str, usize, u64)>,
        f: impl FnOnce(PgBatch<'_>) -> (Result<T, StoreError>, PgBatch<'_>),
    ) -> Result<T, JournalError> {
        let body = |conn: &mut Conn| {
            if let Some((name, _, generation)) = holding {
                if conn.generation != generation {
                    return Err(StoreError::LockLost(name.to_string()));
                }
            }
            let Conn { client, st, .. } = conn;
            let client = client.as_mut().expect("until dropped");
            let tx = match wait(client.transaction()) {
                Ok(tx) => tx,
                // The session died unseen: with it the lock, and nothing was begun.
                Err(e) if e.is_closed() && holding.is_some() => {
                    let name = holding.map_or("", |(n, _, _)| n);
                    return Err(StoreError::LockLost(name.to_string()));
                }
                Err(e) => return Err(e.into()),
            };
            let (out, batch) = f(PgBatch { tx, st });
            match out {
                Ok(v) => {
                    wait(batch.tx.commit())?;
                    Ok(v)
                }
                Err(e) => {
                    // The closure's error is the answer; a rollback that fails on a broken
                    // connection ends the transaction anyway (the connection is replaced).
                    let _ = wait(batch.tx.rollback());
                    Err(e)
                }
            }
        };
        match holding {
            Some((_, slot, _)) => self.with_slot(slot, body),
            None => self.with(body),
        }
    }

    /// Takes the session advisory lock on `name` if no other session holds it: the pool
    /// slot and connection generation it was taken on, or `None` (held elsewhere).
    pub(super) fn try_lock(&self, name: &str) -> Result<Option<(usize, u64)>, JournalError> {
        let key = self.lock_key(name);
        self.with_retry(|c| {
            let got: bool = wait(c.client().query_one(&c.st.try_lock, &[&key]))?.get(0);
            Ok(got.then_some((c.slot, c.generation)))
        })
    }

    /// Releases the lock on `name` taken in `slot` on connection `generation`; nothing to
    /// do when that connection is gone (its session's locks went with it).
    pub(super) fn unlock(&self, name: &str, slot: usize, generation: u64) {
        let key = self.lock_key(name);
        let g = self.lock_slot(slot);
        if let Some(c) = g.as_ref().filter(|c| c.generation == generation) {
            if let Err(e) = wait(c.client().query_one(&c.st.unlock, &[&key])) {
                tracing::warn!(journal = %self.at, name, error = %e, "journal: advisory unlock failed");
            }
        }
    }

    fn lock_key(&self, name: &str) -> String {
        format!("{}/{name}", self.schema)
    }

    pub(super) fn get(&self, kind: Kind, key: &str) -> Result<Option<Vec<u8>>, JournalError> {
        self.with_retry(|c| {
            Ok(wait(c.client().query_opt(&c.st.get, &[&kind.as_str(), &key]))?.map(|r| r.get(0)))
        })
    }

    pub(super) fn all(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        self.with_retry(|c| {
            Ok(wait(c.client().query(&c.st.all, &[&kind.as_str()]))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
    }

    pub(super) fn last_key(&self, kind: Kind) -> Result<Option<String>, JournalError> {
        self.with_retry(|c| {
            Ok(wait(c.client().query_opt(&c.st.last_key, &[&kind.as_str()]))?.map(|r| r.get(0)))
        })
    }

    pub(super) fn range_after(
        &self,
        kind: Kind,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, JournalError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.with_retry(|c| {
            Ok(wait(
                c.client()
                    .query(&c.st.range_after, &[&kind.as_str(), &after, &limit]),
            )?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
    }

    pub(super) fn steps(&self, txid: &str) -> Result<Vec<String>, JournalError> {
        self.with_retry(|c| {
            Ok(wait(c.client().query(&c.st.steps, &[&txid]))?
                .iter()
                .map(|r| r.get(0))
                .collect())
        })
    }

    pub(super) fn kind_counts(
        &self,
    ) -> Result<std::collections::BTreeMap<String, usize>, JournalError> {
        self.with_retry(|c| {
            Ok(wait(c.client().query(&c.st.kind_counts, &[]))?
                .iter()
                .map(|r| (r.get(0), r.get::<_, i64>(1) as usize))
                .collect())
        })
    }

    pub(super) fn count_steps(&self) -> Result<u64, JournalError> {
        self.with_retry(|c| {
            let n: i64 = wait(c.client().query_one(&c.st.count_steps, &[]))?.get(0);
            Ok(n as u64)
        })
    }
}

/// Where a PostgreSQL journal is, for messages: schema, hosts, port, database — never the
/// password.
fn describe(config: &tokio_postgres::Config, schema: &str) -> String {
    use tokio_postgres::config::Host;
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            Host::Tcp(name) => name.clone(),
            Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let port = config
        .get_ports()
        .first()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    format!(
        "postgres schema {schema} on {}{port}/{}",
        if hosts.is_empty() {
            "localhost".to_string()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("-")
    )
}

/// One open transaction of [`Pg::atomically`].
pub(super) struct PgBatch<'a> {
    tx: tokio_postgres::Transaction<'a>,
    st: &'a Statements,
}

impl PgBatch<'_> {
    pub(super) fn step(&self, txid: &str, step: &str, detail: &str) -> Result<(), StoreError> {
        wait(self.tx.execute(&self.st.step, &[&txid, &step, &detail]))?;
        Ok(())
    }

    pub(super) fn put(&self, kind: Kind, key: &str, value: &[u8]) -> Result<(), StoreError> {
        wait(
            self.tx
                .execute(&self.st.put, &[&kind.as_str(), &key, &value]),
        )?;
        Ok(())
    }

    pub(super) fn insert_new(
        &self,
        kind: Kind,
        key: &str,
        value: &[u8],
    ) -> Result<bool, StoreError> {
        let n = wait(
            self.tx
                .execute(&self.st.insert_new, &[&kind.as_str(), &key, &value]),
        )?;
        Ok(n == 1)
    }

    pub(super) fn get_for_update(
        &self,
        kind: Kind,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(wait(
            self.tx
                .query_opt(&self.st.get_for_update, &[&kind.as_str(), &key]),
        )?
        .map(|r| r.get(0)))
    }

    pub(super) fn all_for_update(&self, kind: Kind) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        Ok(
            wait(self.tx.query(&self.st.all_for_update, &[&kind.as_str()]))?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect(),
        )
    }

    pub(super) fn delete(&self, kind: Kind, key: &str) -> Result<(), StoreError> {
        wait(self.tx.execute(&self.st.delete, &[&kind.as_str(), &key]))?;
        Ok(())
    }
}
