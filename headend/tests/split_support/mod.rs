//! A split head end of real processes for the fault tests (issue 11): every role is its own
//! `headend <role> --config FILE` process on its own UDP port, the gateway reaches the others
//! through `[endpoints.NAME]` over QUIC, and the tests SIGKILL, SIGSTOP, SIGCONT and restart
//! them. The boxes are the library's simulated boxes (genuine device certificates, genuine
//! in-process purse cards) speaking the wire protocol to the gateway; outcomes are read from
//! each role's SQLite journal file, never from in-process handles.
//!
//! - the deployment is `init_demo`'s split one (`split/<role>.toml`: each role its own
//!   certificate, keys and callers); [`role_configs`] is the one place a test's variations
//!   are applied to it (embodiments, lifetimes, transport);
//! - [`Split`] owns the processes: readiness is the role's own `READY=1` on a per-role
//!   `NOTIFY_SOCKET` (sd_notify), and dropping it kills every child, stopped or not;
//! - one deployment at a time per test binary ([`Split::start`] holds a lock), so the timing
//!   of one test does not depend on another's processes competing for the two cores.
#![allow(dead_code)]

#[path = "../load_support/mod.rs"]
pub mod load_support;

#[path = "../wire_box/mod.rs"]
pub mod wire_box;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use headend::assembly::{self, DemoOptions, SplitAddrs};
use headend::config::{HeadendConfig, read_key_file};
use headend::funds::{Account, Hold};
use headend::gateway::GwTxn;
use headend::gateway::load::GwLoad;
use headend::journal::{self, Journal, Kind};
use headend::load::LoadRec;
use headend::merchant::OfferRecord;
use headend::payment::PayTxn;
use headend::quic::{ClientTls, QuicClient, TlsIdentity, TransportSettings, load_certs};
use headend::role::to_payload;
use load_support::LoadBox;
use proto::card::PurseCard;
use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::Currency;
use proto::purse::IssuerKeys;
use proto::security_card::SecurityCard;
use wire_box::WireBox;

/// A head-end role: its subcommand, its `[endpoints]` name and its journal's file stem.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum R {
    Gateway,
    Payment,
    Merchant,
    Bank,
    Load,
    /// Takes the payment server's batches and the funders' load advices (issue 15).
    Clearing,
}

impl R {
    pub const ALL: [R; 6] = [
        R::Gateway,
        R::Payment,
        R::Merchant,
        R::Bank,
        R::Load,
        R::Clearing,
    ];
    /// The roles behind the gateway.
    pub const BACKENDS: [R; 4] = [R::Payment, R::Merchant, R::Bank, R::Load];

    pub fn name(self) -> &'static str {
        match self {
            R::Gateway => "gateway",
            R::Payment => "payment",
            R::Merchant => "merchant",
            R::Bank => "bank",
            R::Load => "load",
            R::Clearing => "clearing",
        }
    }
}

/// Short lifetimes for the expiry tests (scenario 8); `None` in [`Options`] writes none of
/// these keys (the defaults apply).
#[derive(Debug, Clone, Copy)]
pub struct Lifetimes {
    /// `[gateway] offer_lifetime_secs`.
    pub gateway_offer_secs: u64,
    /// `[gateway] hold_lifetime_secs`.
    pub gateway_hold_secs: u64,
    /// `[merchant] offer_lifetime_secs`.
    pub merchant_offer_secs: u64,
    /// `[bank]` and `[load] offer_lifetime_secs`.
    pub funder_offer_secs: u64,
}

/// What the deployment looks like.
#[derive(Debug, Clone)]
pub struct Options {
    /// Embodiment of the cable catalog (`CABLE`): security-card, payment-server, gateway or
    /// merchant.
    pub cable: &'static str,
    /// Embodiment of the internet merchant (`M-WEBSHOP`).
    pub webshop: &'static str,
    pub message_layer: bool,
    /// `[payment] transaction_timeout_secs`.
    pub transaction_timeout_secs: u64,
    pub lifetimes: Option<Lifetimes>,
    /// `[transport]` keys written into every role's file; empty: the deployed defaults.
    pub transport: Vec<(&'static str, i64)>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            cable: "security-card",
            webshop: "payment-server",
            message_layer: true,
            transaction_timeout_secs: 30,
            lifetimes: None,
            transport: Vec::new(),
        }
    }
}

/// Every role's configuration, from the demo's split deployment (`init_demo` with
/// [`DemoOptions::split`]: `split/<role>.toml`, each naming only its role's sections,
/// certificate, keys and callers) with this test's variations: the embodiment and FIG. 8
/// layer per merchant (the gateway, payment server and merchant must agree), the payment
/// server's deadline, short lifetimes, `[transport]` keys. The one function to change when
/// the deployment's shape changes.
pub fn role_configs(demo: &BTreeMap<R, toml::Table>, opts: &Options) -> BTreeMap<R, toml::Table> {
    use toml::Value;
    let set = |t: &mut toml::Table, section: &str, key: &str, v: Value| {
        t.get_mut(section)
            .and_then(Value::as_table_mut)
            .unwrap_or_else(|| panic!("the demo config has [{section}]"))
            .insert(key.into(), v);
    };
    let secs = |s: u64| Value::Integer(s as i64);
    let mut out = BTreeMap::new();
    for (r, demo) in demo {
        let mut t = demo.clone();
        if !opts.transport.is_empty() {
            let transport: toml::Table = opts
                .transport
                .iter()
                .map(|(k, v)| ((*k).to_string(), Value::Integer(*v)))
                .collect();
            t.insert("transport".into(), Value::Table(transport));
        }
        if let Some(Value::Array(merchants)) = t.get_mut("merchants") {
            for m in merchants.iter_mut().filter_map(Value::as_table_mut) {
                let embodiment = match m.get("id").and_then(Value::as_str) {
                    Some("CABLE") => opts.cable,
                    _ => opts.webshop,
                };
                m.insert("embodiment".into(), Value::String(embodiment.into()));
                m.insert("message_layer".into(), Value::Boolean(opts.message_layer));
            }
        }
        let lt = opts.lifetimes;
        match r {
            R::Gateway => {
                if let Some(l) = lt {
                    set(
                        &mut t,
                        "gateway",
                        "offer_lifetime_secs",
                        secs(l.gateway_offer_secs),
                    );
                    set(
                        &mut t,
                        "gateway",
                        "hold_lifetime_secs",
                        secs(l.gateway_hold_secs),
                    );
                }
            }
            R::Payment => set(
                &mut t,
                "payment",
                "transaction_timeout_secs",
                secs(opts.transaction_timeout_secs),
            ),
            R::Merchant => {
                if let Some(l) = lt {
                    set(
                        &mut t,
                        "merchant",
                        "offer_lifetime_secs",
                        secs(l.merchant_offer_secs),
                    );
                }
            }
            R::Clearing => {}
            R::Bank | R::Load => {
                if let Some(l) = lt {
                    set(
                        &mut t,
                        r.name(),
                        "offer_lifetime_secs",
                        secs(l.funder_offer_secs),
                    );
                }
            }
        }
        out.insert(*r, t);
    }
    out
}

/// One deployment at a time per test binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// How long a role may take from spawn to `READY=1`.
const READY_WITHIN: Duration = Duration::from_secs(30);

/// A running split head end; dropping it kills every role process.
pub struct Split {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    /// The demo bank account's PIN.
    pub pin: String,
    pub addr: BTreeMap<R, SocketAddr>,
    pub config: BTreeMap<R, PathBuf>,
    pub cfg: BTreeMap<R, HeadendConfig>,
    /// The issuer's personalisation keys (for making cards; no role reads them).
    pub issuer: IssuerKeys,
    procs: BTreeMap<R, Child>,
    notify: BTreeMap<R, tokio::net::UnixDatagram>,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

fn free_udp_ports(n: usize) -> Vec<SocketAddr> {
    headend::assembly::free_loopback_ports(n).unwrap()
}

fn signal(child: &Child, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits");
    // SAFETY: kill(2) with a pid we spawned and own (not yet reaped).
    let rc = unsafe { libc::kill(pid, sig) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {sig}): {}",
        std::io::Error::last_os_error()
    );
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Split {
    /// Writes the deployment into a fresh directory and starts every role; returns once each
    /// has told its readiness.
    pub async fn start(opts: Options) -> Split {
        let serial = SERIAL.lock().await;
        let dir = tempfile::tempdir().unwrap();
        let ports = free_udp_ports(R::ALL.len());
        let addr: BTreeMap<R, SocketAddr> = R::ALL.iter().copied().zip(ports).collect();
        let files = assembly::init_demo(
            dir.path(),
            &DemoOptions {
                gateway_listen: addr[&R::Gateway],
                embodiment: opts.cable.into(),
                message_layer: opts.message_layer,
                transaction_timeout_secs: opts.transaction_timeout_secs,
                split: Some(SplitAddrs {
                    payment: addr[&R::Payment],
                    merchant: addr[&R::Merchant],
                    bank: addr[&R::Bank],
                    load: addr[&R::Load],
                    clearing: addr[&R::Clearing],
                }),
                clearing: true,
            },
        )
        .unwrap();
        let pin = std::fs::read_to_string(&files.pin_file)
            .unwrap()
            .trim()
            .to_string();
        let issuer = headend::config::load_issuer_keys(&files.issuer_keys).unwrap();
        let split = files.split.expect("split configs");
        let config: BTreeMap<R, PathBuf> = [
            (R::Gateway, split.gateway),
            (R::Payment, split.payment),
            (R::Merchant, split.merchant),
            (R::Bank, split.bank),
            (R::Load, split.load),
            (R::Clearing, split.clearing.expect("clearing")),
        ]
        .into_iter()
        .collect();
        let demo: BTreeMap<R, toml::Table> = config
            .iter()
            .map(|(r, p)| (*r, std::fs::read_to_string(p).unwrap().parse().unwrap()))
            .collect();
        let mut cfg = BTreeMap::new();
        for (r, table) in role_configs(&demo, &opts) {
            // In place: the files' relative paths stay right.
            std::fs::write(&config[&r], toml::to_string(&table).unwrap()).unwrap();
            cfg.insert(r, HeadendConfig::load(&config[&r]).unwrap());
        }
        std::fs::create_dir_all(dir.path().join("logs")).unwrap();
        let mut notify = BTreeMap::new();
        for r in R::ALL {
            let sock = dir.path().join(format!("notify-{}.sock", r.name()));
            notify.insert(r, tokio::net::UnixDatagram::bind(&sock).unwrap());
        }
        let mut split = Split {
            ca: dir.path().join("ca"),
            dir,
            pin,
            addr,
            config,
            cfg,
            issuer,
            procs: BTreeMap::new(),
            notify,
            _serial: serial,
        };
        // Clearing and the back ends first, then the gateway (which connects to them on
        // first use).
        for r in [
            R::Clearing,
            R::Payment,
            R::Merchant,
            R::Bank,
            R::Load,
            R::Gateway,
        ] {
            split.spawn(r).await;
        }
        split
    }

    pub fn log(&self, r: R) -> PathBuf {
        self.dir.path().join(format!("logs/{}.log", r.name()))
    }

    pub fn state_dir(&self, r: R) -> PathBuf {
        self.cfg[&r].state_dir.clone()
    }

    /// Starts `r` and waits for its `READY=1`; returns when it came.
    pub async fn spawn(&mut self, r: R) -> Instant {
        assert!(
            !self.procs.contains_key(&r),
            "{} is already running",
            r.name()
        );
        let sock = &self.notify[&r];
        let mut buf = [0u8; 512];
        while sock.try_recv(&mut buf).is_ok() {} // stale notifications
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log(r))
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_headend"))
            .arg(r.name())
            .arg("--config")
            .arg(&self.config[&r])
            .env(
                "NOTIFY_SOCKET",
                self.dir.path().join(format!("notify-{}.sock", r.name())),
            )
            .env_remove("WATCHDOG_USEC")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.procs.insert(r, child);
        let started = Instant::now();
        loop {
            match tokio::time::timeout(Duration::from_millis(200), sock.recv(&mut buf)).await {
                Ok(Ok(n)) if String::from_utf8_lossy(&buf[..n]).contains("READY=1") => {
                    return Instant::now();
                }
                Ok(_) => {}
                Err(_) => {
                    let exited = self
                        .procs
                        .get_mut(&r)
                        .and_then(|c| c.try_wait().ok().flatten());
                    if let Some(status) = exited {
                        self.procs.remove(&r);
                        panic!(
                            "{} exited before it was ready ({status}):\n{}",
                            r.name(),
                            tail(&self.log(r), 30)
                        );
                    }
                    assert!(
                        started.elapsed() < READY_WITHIN,
                        "{} not ready within {READY_WITHIN:?}:\n{}",
                        r.name(),
                        tail(&self.log(r), 30)
                    );
                }
            }
        }
    }

    /// SIGKILL: no shutdown path runs. Waits for the process to be gone.
    pub fn kill(&mut self, r: R) {
        let mut child = self.procs.remove(&r).expect("running");
        signal(&child, libc::SIGKILL);
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{} SIGKILLed",
            r.name()
        );
    }

    /// SIGKILL, then start again on the same address and state; returns the readiness time.
    pub async fn restart(&mut self, r: R) -> Instant {
        self.kill(r);
        self.spawn(r).await
    }

    /// SIGSTOP: the process stays, its sockets keep queueing, nothing runs.
    pub fn stop(&self, r: R) {
        signal(&self.procs[&r], libc::SIGSTOP);
    }

    /// SIGCONT.
    pub fn cont(&self, r: R) {
        signal(&self.procs[&r], libc::SIGCONT);
    }

    // ---- journals, read from the files the roles write ----

    pub fn journal(&self, r: R) -> Journal {
        Journal::open(&self.state_dir(r).join(format!("{}.sqlite", r.name()))).unwrap()
    }

    fn record<T: serde::de::DeserializeOwned>(&self, r: R, kind: Kind, key: &str) -> Option<T> {
        self.journal(r)
            .get(kind, key)
            .unwrap()
            .map(|b| journal::decode(&b).unwrap())
    }

    /// (step, detail) journaled by `r` for `txid`, oldest first.
    pub fn steps(&self, r: R, txid: &str) -> Vec<(String, String)> {
        let path = self.state_dir(r).join(format!("{}.sqlite", r.name()));
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.busy_timeout(Duration::from_secs(5)).unwrap();
        let mut st = conn
            .prepare("SELECT step, detail FROM steps WHERE txid = ?1 ORDER BY id")
            .unwrap();
        st.query_map([txid], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    pub fn count(&self, r: R, kind: Kind) -> usize {
        self.journal(r).all(kind).unwrap().len()
    }

    pub fn gw_txn(&self, txid: &str) -> Option<GwTxn> {
        self.record(R::Gateway, Kind::Gw, txid)
    }

    pub fn gw_load(&self, txid: &str) -> Option<GwLoad> {
        self.record(R::Gateway, Kind::GwLoad, txid)
    }

    pub fn pay_txn(&self, txid: &str) -> Option<PayTxn> {
        self.record(R::Payment, Kind::Txn, txid)
    }

    /// The security cards' totals (count, minor units) for `currency`, summed over the pool.
    pub fn security_card_totals(&self, currency: Currency) -> (u64, u64) {
        self.journal(R::Payment)
            .all(Kind::SecurityCard)
            .unwrap()
            .iter()
            .map(|(_, b)| journal::decode::<SecurityCard>(b).unwrap().total(currency))
            .fold((0, 0), |(n, a), t| (n + t.count, a + t.amount))
    }

    pub fn offer(&self, txid: &str) -> Option<OfferRecord> {
        self.record(R::Merchant, Kind::Offer, txid)
    }

    /// Goods released by the merchant for `txid` (its `release` record: 0 or 1).
    pub fn releases(&self, txid: &str) -> usize {
        usize::from(
            self.journal(R::Merchant)
                .get(Kind::Release, txid)
                .unwrap()
                .is_some(),
        )
    }

    /// Entitlements recorded for `txid` (the merchant keys them `box/item/txid`).
    pub fn entitlements(&self, txid: &str) -> usize {
        self.journal(R::Merchant)
            .all(Kind::Entitlement)
            .unwrap()
            .iter()
            .filter(|(k, _)| k.ends_with(&format!("/{txid}")))
            .count()
    }

    pub fn hold(&self, txid: &str) -> Option<Hold> {
        self.record(R::Bank, Kind::Hold, txid)
    }

    pub fn account(&self, id: &str) -> Account {
        self.record(R::Bank, Kind::Account, id).expect("account")
    }

    pub fn load_rec(&self, txid: &str) -> Option<LoadRec> {
        self.record(R::Load, Kind::Load, txid)
    }

    // ---- boxes ----

    /// A purse card personalised under the deployment's issuer keys (EUR).
    pub fn card(&self, card_id: u64, balance: u64, max_balance: u64) -> PurseCard {
        wire_box::new_card(&self.issuer, card_id, balance, max_balance)
    }

    /// A purse card with the scheme's application keys of epochs `oldest`..`oldest + 3`
    /// (card to card, seed 004), from the application master `init-demo` wrote.
    pub fn app_card(&self, card_id: u64, balance: u64, oldest: u8) -> PurseCard {
        let text = std::fs::read_to_string(self.dir.path().join("issuer-keys.toml")).unwrap();
        let file: proto::purse::IssuerKeyFile = toml::from_str(&text).unwrap();
        let master = file.app_master().unwrap().expect("an application master");
        let mut card = self.card(card_id, balance, 1_000_000);
        card.state = card.state.with_app_keys(&master, oldest).unwrap();
        card
    }

    /// A box with a fresh device certificate, connected to the gateway, with its own card.
    pub async fn purchase_box(&self, box_id: &str, card_id: u64, balance: u64) -> WireBox {
        WireBox {
            id: box_id.into(),
            client: self.connect_box(box_id).await,
            card: self.card(card_id, balance, 1_000_000),
        }
    }

    /// A new connection to the gateway for `box_id` (a box reconnecting).
    pub async fn connect_box(&self, box_id: &str) -> QuicClient {
        tokio::time::timeout(
            Duration::from_secs(10),
            wire_box::connect(&self.ca, box_id, self.addr[&R::Gateway]),
        )
        .await
        .expect("connected within 10 s")
        .unwrap()
    }

    /// A key file of the deployment (`keys/<name>`), e.g. `confirmation.key`.
    pub fn key(&self, name: &str) -> DesKey {
        read_key_file(name, &self.dir.path().join("keys").join(name)).unwrap()
    }

    /// The load-side box (`load_support`) with the box's PIN key from its provisioning file
    /// (`pin-keys/<box id>.key`) or derived as provisioning does.
    pub async fn load_box(&self, box_id: &str, card_id: u64, balance: u64, max: u64) -> LoadBox {
        let file = self.dir.path().join(format!("pin-keys/{box_id}.key"));
        let pin_key = if file.exists() {
            read_key_file("pin key", &file).unwrap()
        } else {
            headend::bank::box_pin_key(&self.key("pin-master.key"), box_id)
        };
        LoadBox {
            id: box_id.into(),
            client: self.connect_box(box_id).await,
            card: self.card(card_id, balance, max),
            pin_key,
            start_balance: balance,
        }
    }

    /// A certificate of the operator CA issued by `headend pki issue-server` for `name`:
    /// (cert, key) paths.
    pub fn issue_server_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        let out = self.dir.path().join("outsider");
        let status = Command::new(env!("CARGO_BIN_EXE_headend"))
            .args(["pki", "issue-server", "--ca"])
            .arg(&self.ca)
            .args(["--name", name, "--out"])
            .arg(&out)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "headend pki issue-server");
        (
            out.join(format!("{name}.crt.pem")),
            out.join(format!("{name}.key.pem")),
        )
    }

    /// The certificate and key a role runs with (`certs/<role>.crt.pem`, `.key.pem`).
    pub fn role_cert(&self, r: R) -> (PathBuf, PathBuf) {
        let certs = self.dir.path().join("certs");
        (
            certs.join(format!("{}.crt.pem", r.name())),
            certs.join(format!("{}.key.pem", r.name())),
        )
    }

    /// A QUIC client to role `r` presenting `cert` (an outsider, or a stolen role
    /// certificate); the connection error if the handshake is refused.
    pub async fn client_with(
        &self,
        r: R,
        (cert, key): &(PathBuf, PathBuf),
    ) -> Result<QuicClient, String> {
        let identity = TlsIdentity::from_pem_files(cert, key).map_err(|e| e.to_string())?;
        let tls = ClientTls::new(
            load_certs(&self.ca.join("ca.crt.pem")).unwrap(),
            identity,
            r.name(),
        );
        let settings = TransportSettings::default();
        let server_name = format!("{}.purselink.test", r.name());
        let connect = QuicClient::connect(&tls, &settings, self.addr[&r], &server_name);
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Err(_) => Err("no handshake within 10 s".into()),
            Ok(r) => r.map_err(|e| e.to_string()),
        }
    }
}

impl Drop for Split {
    fn drop(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.procs) {
            // A stopped process dies of SIGKILL too; SIGCONT first anyway.
            let pid = libc::pid_t::try_from(child.id()).unwrap_or(0);
            // SAFETY: kill(2) on our own children, not yet reaped.
            unsafe {
                libc::kill(pid, libc::SIGCONT);
                libc::kill(pid, libc::SIGKILL);
            }
            let _ = child.wait();
        }
        if std::env::var_os("PURSELINK_KEEP_SPLIT").is_some() {
            // For a look at the logs and journals afterwards.
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            eprintln!("split head end kept in {}", kept.keep().display());
        }
        if std::thread::panicking() {
            for r in R::ALL {
                eprintln!(
                    "---- {} log (last lines) ----\n{}",
                    r.name(),
                    tail(&self.log(r), 25)
                );
            }
        }
    }
}

/// One call from a box (or an outsider) with a bound on the wait.
pub async fn ask(client: &QuicClient, msg: &Message, within: Duration) -> Result<Message, String> {
    match tokio::time::timeout(within, client.call(&to_payload(msg))).await {
        Err(_) => Err(format!("no answer within {within:?}")),
        Ok(Err(e)) => Err(e.to_string()),
        Ok(Ok(bytes)) => Message::from_payload(&bytes).map_err(|e| e.to_string()),
    }
}

/// The error code of an answer, if it is an error.
pub fn code(m: &Message) -> Option<ErrorCode> {
    match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    }
}

/// Waits until `f` holds, polling every 50 ms, at most `bound`. Only bounds the wait for an
/// effect that lands asynchronously (in another process); the caller asserts the result.
pub async fn eventually(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + bound;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `msg` again while the answer is `Busy` (an honest box's retry: the identical
/// message), each wait bounded by what is left until `until`. The first other answer, or
/// an error saying what was last seen when `until` passes.
pub async fn until_not_busy(
    client: &QuicClient,
    msg: &Message,
    until: Instant,
) -> Result<Message, String> {
    let mut last = String::from("nothing");
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("still no definite answer; last: {last}"));
        }
        match ask(client, msg, left).await {
            Ok(Message::Error(e)) if e.code == ErrorCode::Busy => {
                last = format!("Busy: {}", e.reason);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(other) => return Ok(other),
            Err(e) => last = e,
        }
    }
}

/// A whole honest purchase (offer, card read, draw request, DEBIT, debit response), each
/// step re-sent unchanged while the head end answers `Busy`, all before `until`. Returns
/// the offer and the receipt.
pub async fn purchase(
    b: &mut WireBox,
    merchant: &str,
    item: &str,
    until: Instant,
) -> Result<(Offer, Receipt), String> {
    let ask_offer = Message::OfferRequest {
        merchant_id: merchant.into(),
        item_id: item.into(),
    };
    let offer = match until_not_busy(&b.client, &ask_offer, until).await? {
        Message::Offer(o) => o,
        other => return Err(format!("offer request answered {other:?}")),
    };
    let draw = Message::DrawRequest(b.draw_request(&offer)?);
    let answer = until_not_busy(&b.client, &draw, until).await?;
    let cmd = WireBox::open_debit_command(&offer, &answer)?;
    let resp = Message::DebitResponse(b.debit(&offer, &cmd)?);
    match until_not_busy(&b.client, &resp, until).await? {
        Message::Receipt(r) if r.released => Ok((offer, r)),
        other => Err(format!("debit response answered {other:?}")),
    }
}

/// A whole honest bank load of `amount` (offer, S1, load request with the PIN, LOAD, load
/// response), each step re-sent unchanged while the head end answers `Busy`, all before
/// `until`. Returns the offer and the confirmation.
pub async fn bank_load(
    b: &mut LoadBox,
    pin: &str,
    amount: u64,
    until: Instant,
) -> Result<(LoadOffer, LoadConfirmation), String> {
    let card = b.purse();
    let ask_offer = Message::LoadOfferRequest(LoadOfferRequest {
        source: load_support::bank_source(),
        card,
    });
    let offer = match until_not_busy(&b.client, &ask_offer, until).await? {
        Message::LoadOffer(o) => o,
        other => return Err(format!("load offer request answered {other:?}")),
    };
    let init = b
        .init_load(&offer, amount)
        .map_err(|sw| format!("INITIALIZE FOR LOAD: {sw}"))?;
    let req = Message::LoadRequest(b.load_request(&offer, init, amount, Some(pin)));
    let cmd = match until_not_busy(&b.client, &req, until).await? {
        Message::LoadCommand(c) => c.command,
        other => return Err(format!("load request answered {other:?}")),
    };
    let resp = b.run_load(&cmd).map_err(|sw| format!("LOAD: {sw}"))?;
    let msg = LoadBox::response_msg(&offer, Some(resp), None);
    match until_not_busy(&b.client, &msg, until).await? {
        Message::LoadConfirmation(c) if c.loaded => Ok((offer, c)),
        other => Err(format!("load response answered {other:?}")),
    }
}
