//! A private PostgreSQL for tests: `initdb` and `pg_ctl` in a temp directory, listening on a
//! Unix socket in that directory only (no TCP), trust authentication, stopped and removed
//! when the last test holding it drops it.
//!
//! initdb refuses to run as root: as root (CI), the server's files belong to the
//! unprivileged `postgres` user (created as `purselink-pgtest` when there is no such user)
//! and initdb, pg_ctl and the server run as that user; otherwise they run as the caller.
//!
//! Binaries: `$PG_BIN`, else the newest `/usr/lib/postgresql/*/bin`, else `initdb` on the
//! `PATH`. When none is found, [`shared`] prints why and returns `None`, and the test skips
//! loudly (under CI, where `scripts/system-setup.sh` installs them, it fails); when they are
//! found but the server will not start, the test fails.
//!
//! Used by the journal's unit tests (`headend/src/lib.rs` includes it) and by the
//! integration tests (`#[path = "../pg_rig/mod.rs"]`); only std, libc and tempfile.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

/// The login the tests connect as (the server's superuser, trust).
pub const USER: &str = "purselink";
const PORT: u16 = 5432;

pub struct PgRig {
    dir: tempfile::TempDir,
    bin: PathBuf,
    /// (uid, gid) the server runs as when we are root.
    run_as: Option<(u32, u32)>,
    next_db: AtomicU64,
}

/// One server shared by the tests of this process while any of them holds it: started by
/// the first, stopped when the last drops its handle (a later test starts another).
///
/// `None` (after printing why) when PostgreSQL's binaries are not installed.
///
/// # Panics
/// The binaries are there but the server does not start.
pub fn shared() -> Option<Arc<PgRig>> {
    static SHARED: Mutex<Weak<PgRig>> = Mutex::new(Weak::new());
    let Some(bin) = find_bin() else {
        // CI installs PostgreSQL (scripts/system-setup.sh): there a missing server is a
        // broken setup, not a reason to skip.
        assert!(
            std::env::var_os("CI").is_none(),
            "PostgreSQL's initdb and pg_ctl not found under CI: scripts/system-setup.sh installs them"
        );
        eprintln!(
            "SKIPPED: PostgreSQL's initdb and pg_ctl not found ($PG_BIN, /usr/lib/postgresql/*/bin, PATH); install the postgresql package to run this test on PostgreSQL"
        );
        return None;
    };
    let mut g = SHARED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(rig) = g.upgrade() {
        return Some(rig);
    }
    let rig = Arc::new(PgRig::start(bin).unwrap_or_else(|e| panic!("test PostgreSQL: {e}")));
    *g = Arc::downgrade(&rig);
    Some(rig)
}

fn find_bin() -> Option<PathBuf> {
    let has = |d: &Path| d.join("initdb").is_file() && d.join("pg_ctl").is_file();
    if let Some(d) = std::env::var_os("PG_BIN").map(PathBuf::from) {
        return has(&d).then_some(d);
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has(d))
        .collect();
    versions.sort();
    if let Some((_, d)) = versions.pop() {
        return Some(d);
    }
    std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).find(|d| has(d)))
}

/// The unprivileged user the server runs as when we are root.
fn server_user() -> Result<(u32, u32), String> {
    let lookup = |name: &str| {
        let c = std::ffi::CString::new(name).expect("no NUL");
        // SAFETY: getpwnam returns a pointer into static storage or NULL; read at once.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        // SAFETY: checked non-null; the fields are plain integers.
        (!pw.is_null()).then(|| unsafe { ((*pw).pw_uid, (*pw).pw_gid) })
    };
    if let Some(ids) = lookup("postgres") {
        return Ok(ids);
    }
    const OURS: &str = "purselink-pgtest";
    if lookup(OURS).is_none() {
        let st = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                OURS,
            ])
            .status()
            .map_err(|e| format!("useradd {OURS}: {e}"))?;
        if !st.success() && lookup(OURS).is_none() {
            return Err(format!("useradd {OURS}: {st}"));
        }
    }
    lookup(OURS).ok_or_else(|| format!("user {OURS} not found after useradd"))
}

impl PgRig {
    /// initdb + pg_ctl start in a new temp directory.
    ///
    /// # Errors
    /// A step failed: its output.
    pub fn start(bin: PathBuf) -> Result<Self, String> {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let run_as = if root { Some(server_user()?) } else { None };
        let dir = tempfile::Builder::new()
            .prefix("pgrig")
            .tempdir()
            .map_err(|e| format!("temp dir: {e}"))?;
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", dir.path().display()))?;
        }
        let rig = Self {
            dir,
            bin,
            run_as,
            next_db: AtomicU64::new(0),
        };
        let data = rig.data_dir();
        let data = data.to_str().ok_or("temp dir not UTF-8")?;
        // An ICU default collation, as production servers often have: keys must still sort
        // bytewise (the journal's columns are COLLATE "C"). Plain C.UTF-8 if ICU is missing.
        let icu = rig.run(
            "initdb",
            &[
                "-D",
                data,
                "-U",
                USER,
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--locale-provider=icu",
                "--icu-locale=en-US",
            ],
        );
        if let Err(e) = icu {
            eprintln!("test PostgreSQL: initdb with ICU failed, using C.UTF-8 ({e})");
            let _ = std::fs::remove_dir_all(rig.data_dir());
            rig.run(
                "initdb",
                &[
                    "-D",
                    data,
                    "-U",
                    USER,
                    "--auth=trust",
                    "--no-sync",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                ],
            )?;
        }
        let sock = rig.socket_dir();
        let opts = format!(
            "-k {} -c listen_addresses='' -p {PORT} -c max_connections=300 -c shared_buffers=16MB",
            sock.display()
        );
        let log = rig.dir.path().join("server.log");
        rig.run(
            "pg_ctl",
            &[
                "-D",
                data,
                "-l",
                log.to_str().ok_or("not UTF-8")?,
                "-w",
                "-t",
                "60",
                "-o",
                &opts,
                "start",
            ],
        )
        .map_err(|e| {
            format!(
                "{e}\nserver log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        })?;
        eprintln!("test PostgreSQL up: socket in {}", sock.display());
        Ok(rig)
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The directory holding the server's socket (`.s.PGSQL.5432`).
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Runs a server binary (as the server's user when we are root), in the rig's directory.
    fn run(&self, tool: &str, args: &[&str]) -> Result<String, String> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(self.bin.join(tool));
        cmd.args(args)
            .current_dir(self.dir.path())
            .env_remove("PGDATA");
        if let Some((uid, gid)) = self.run_as {
            cmd.uid(uid).gid(gid).env("HOME", self.dir.path());
        }
        let out = cmd.output().map_err(|e| format!("{tool}: {e}"))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{tool} {}: {}\n{text}", args.join(" "), out.status))
        }
    }

    /// A libpq connection string for database `db` on this server.
    pub fn url(&self, db: &str) -> String {
        format!(
            "host={} port={PORT} user={USER} dbname={db}",
            self.socket_dir().display()
        )
    }

    /// A new, empty database on this server; its connection string.
    ///
    /// # Panics
    /// createdb fails.
    pub fn fresh_db(&self) -> String {
        let name = format!(
            "t{}_{}",
            std::process::id(),
            self.next_db.fetch_add(1, Ordering::Relaxed)
        );
        let sock = self.socket_dir();
        let out = Command::new(self.bin.join("createdb"))
            .args([
                "-h",
                sock.to_str().expect("UTF-8"),
                "-p",
                &PORT.to_string(),
                "-U",
                USER,
                &name,
            ])
            .output()
            .expect("createdb runs");
        assert!(
            out.status.success(),
            "createdb {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        self.url(&name)
    }

    /// Runs SQL through `psql` on database `db` (for tests that look under the journal);
    /// its output, unaligned, tuples only.
    ///
    /// # Panics
    /// psql fails.
    pub fn psql(&self, url: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                url,
                "-c",
                sql,
            ])
            .output()
            .expect("psql runs");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for PgRig {
    fn drop(&mut self) {
        let data = self.data_dir();
        if let Err(e) = self.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap_or_default(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ],
        ) {
            eprintln!("test PostgreSQL did not stop: {e}");
        }
    }
}

/// Which journal backend a head-end test runs its roles on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A test head end's PostgreSQL: the server (held while the head end runs) and its
/// database.
pub struct PgDb {
    pub rig: Arc<PgRig>,
    pub url: String,
}

impl PgDb {
    /// A fresh database on the shared test server; `None` (said why) without PostgreSQL.
    pub fn fresh() -> Option<Self> {
        let rig = shared()?;
        let url = rig.fresh_db();
        Some(Self { rig, url })
    }

    /// The `[journal]` section putting every role of a config on this database.
    pub fn journal_section(&self) -> String {
        format!(
            "\n[journal]\nbackend = \"postgres\"\nurl = \"{}\"\n",
            self.url
        )
    }

    /// Rows in `table` (`steps` or `state`) of `role`'s schema (default prefix).
    pub fn rows(&self, role: &str, table: &str) -> u64 {
        self.rig
            .psql(
                &self.url,
                &format!("SELECT COUNT(*) FROM purselink_{role}.{table}"),
            )
            .parse()
            .expect("a count")
    }

    /// Checks that every role of a head end journaled on this database and none on SQLite:
    /// no `*.sqlite` in `state_dir`, and steps in each role's schema.
    ///
    /// # Panics
    /// A role's journal is elsewhere.
    pub fn assert_every_role_here(&self, state_dir: &Path, roles: &[&str]) {
        let files: Vec<_> = std::fs::read_dir(state_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "sqlite"))
                    .collect()
            })
            .unwrap_or_default();
        assert!(
            files.is_empty(),
            "SQLite journals on a PostgreSQL run: {files:?}"
        );
        for role in roles {
            assert!(
                self.rows(role, "steps") > 0,
                "no steps in schema purselink_{role}"
            );
        }
    }
}
