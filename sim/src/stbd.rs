//! Real `stbd` boxes: each its own process with its own virtual card file (`[reader] kind =
//! "virtual"`), journal, device certificate, PIN key and local app API socket, its TV UI in a
//! pane of a private tmux server (`tmux -L`).
//!
//! A [`StbDriver`] drives one box the way a viewer and an app would:
//! - purchases: the local app API (Unix socket, JSON lines) asks for a payment; when the
//!   offer shows on the TV, the driver presses OK (Enter) and reads the result line;
//! - loads: the remote — MENU, green (F2), the source (1 bank, 2 voucher), the amount in
//!   digits, OK, the PIN digits and OK for the bank — and the result read off the screen.
//!
//! When asked, it SIGKILLs its stbd mid-transaction (just after OK), restarts it in the same
//! pane (stbd resolves its journal at start), and waits for the home screen.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, ErrorKind as IoErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headend::pki::OperatorCa;
use headend::quic::BoxId;
use proto::card::CardSpec;
use proto::purse::{Expiry, LogRecord};
use rand::Rng;
use reader_drivers::vcard::VirtualCard;
use ui::model::ErrorKind;

use crate::deploy::{BoxSpec, Layout, MerchantSpec};
use crate::record::{Event, Outcome, Pacer, Recorder, TxKind, TxRecord};

/// A private tmux server; killed on drop.
pub struct Tmux {
    socket: String,
    conf: PathBuf,
}

impl Tmux {
    pub fn new(tag: &str, dir: &Path) -> Result<Self, String> {
        let conf = dir.join("tmux.conf");
        std::fs::write(
            &conf,
            "set -g remain-on-exit on\nset -sg escape-time 0\nset -g status off\nset -g history-limit 100\n",
        )
        .map_err(|e| format!("{}: {e}", conf.display()))?;
        Ok(Self {
            socket: format!("purselink-chaos-{tag}-{}", std::process::id()),
            conf,
        })
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-f")
            .arg(&self.conf)
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .unwrap_or_else(|e| Output {
                status: std::os::unix::process::ExitStatusExt::from_raw(1),
                stdout: Vec::new(),
                stderr: e.to_string().into_bytes(),
            })
    }

    pub fn new_session(&self, name: &str, command: &str) -> Result<(), String> {
        let out = self.run(&[
            "new-session",
            "-d",
            "-s",
            name,
            "-x",
            "80",
            "-y",
            "24",
            command,
        ]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tmux new-session {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn respawn(&self, name: &str, command: &str) -> Result<(), String> {
        let out = self.run(&["respawn-pane", "-k", "-t", name, command]);
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "tmux respawn-pane {name}: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Remote keys, one at a time, as a remote sends them (tmux key names).
    pub fn keys(&self, name: &str, keys: &[&str]) {
        for k in keys {
            let _ = self.run(&["send-keys", "-t", name, k]);
            std::thread::sleep(Duration::from_millis(60));
        }
    }

    pub fn screen(&self, name: &str) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", name]).stdout).into_owned()
    }

    fn format(&self, name: &str, f: &str) -> String {
        String::from_utf8_lossy(&self.run(&["display-message", "-p", "-t", name, f]).stdout)
            .trim()
            .to_string()
    }

    pub fn pane_pid(&self, name: &str) -> Option<i32> {
        self.format(name, "#{pane_pid}").parse().ok()
    }

    pub fn pane_dead(&self, name: &str) -> bool {
        self.format(name, "#{pane_dead}") == "1"
    }

    /// Polls the screen until `pred` holds; the screen, or `None` after `limit`.
    pub fn wait(&self, name: &str, limit: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let end = Instant::now() + limit;
        loop {
            let s = self.screen(name);
            if pred(&s) {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// One `stbd` box's files.
#[derive(Debug, Clone)]
pub struct StbBox {
    pub spec: BoxSpec,
    pub dir: PathBuf,
    pub card: PathBuf,
    pub config: PathBuf,
    pub state_dir: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    script: PathBuf,
}

impl StbBox {
    /// Writes the box's card, certificate, PIN key, configuration and start script.
    pub fn prepare(layout: &Layout, spec: &BoxSpec, stbd: &Path) -> Result<Self, String> {
        let dir = layout.dir.join("boxes").join(&spec.box_id);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let card = dir.join("card.plvc");
        VirtualCard::create(
            &card,
            &CardSpec {
                card_id: spec.card_id,
                provider_id: 7,
                currency: spec.currency,
                balance: spec.card_balance,
                max_balance: spec.card_max,
                expiry: Expiry {
                    year: 2035,
                    month: 12,
                },
            },
            &layout.issuer,
        )
        .map_err(|e| e.to_string())?;
        let ca = OperatorCa::load(&layout.ca_dir).map_err(|e| e.to_string())?;
        let certs = ca
            .issue_device(&BoxId::new(&spec.box_id).map_err(|e| e.to_string())?)
            .and_then(|c| c.save(&dir, &spec.box_id))
            .map_err(|e| e.to_string())?;
        let pin_key = dir.join("pin.key");
        proto::secret::write_private(
            &pin_key,
            format!("{}\n", hex::encode_upper(spec.pin_key.bytes())).as_bytes(),
        )
        .map_err(|e| format!("{}: {e}", pin_key.display()))?;
        let state_dir = dir.join("state");
        let socket = dir.join("stbd.sock");
        let config = dir.join("stbd.toml");
        let q = |p: &Path| toml::Value::String(p.display().to_string()).to_string();
        let text = format!(
            r#"# Generated by the chaos tool (sim::stbd).
[reader]
kind = "virtual"
card_file = {card}

[headend]
address = {addrs}
server_name = "gateway.purselink.test"
operator_ca = {ca}
device_cert = {cert}
device_key = {key}

[state]
dir = {state}

[ui]
enabled = true
provider_name = "Purselink"

[timeouts]
offer_secs = 60

[local_api]
enabled = true
socket = {socket}
mode = "0600"

[load]
bank_account = "{account}"
voucher = "{voucher}"
pin_key = {pin_key}
"#,
            card = q(&card),
            // Every gateway of the deployment, the first first: the box fails over in order.
            addrs = toml::Value::Array(
                layout
                    .gateway_addrs()
                    .iter()
                    .map(|a| toml::Value::String(a.to_string()))
                    .collect()
            ),
            ca = q(&layout.ca_dir.join("ca.crt.pem")),
            cert = q(&certs.cert),
            key = q(&certs.key),
            state = q(&state_dir),
            socket = q(&socket),
            account = spec.account,
            voucher = spec.voucher,
            pin_key = q(&pin_key),
        );
        // It names the voucher code: owner-only.
        proto::secret::write_private(&config, text.as_bytes())
            .map_err(|e| format!("{}: {e}", config.display()))?;
        let log = dir.join("stbd.log");
        let script = dir.join("run-stbd.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\necho \"--- stbd start $(date +%T.%N)\" >>'{log}'\nexec env STBD_LOG=info '{bin}' run --config '{cfg}' 2>>'{log}'\n",
                log = log.display(),
                bin = stbd.display(),
                cfg = config.display(),
            ),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            spec: spec.clone(),
            dir,
            card,
            config,
            state_dir,
            socket,
            log,
            script,
        })
    }

    pub fn session(&self) -> &str {
        &self.spec.box_id
    }

    /// The command the box's pane runs: its start script.
    pub fn command(&self) -> String {
        format!("sh '{}'", self.script.display())
    }

    /// [`Self::command`] with extra environment for stbd (e.g. a test hook).
    pub fn command_with_env(&self, env: &[(&str, &str)]) -> String {
        let vars: Vec<String> = env.iter().map(|(k, v)| format!("{k}='{v}'")).collect();
        format!("env {} sh '{}'", vars.join(" "), self.script.display())
    }

    pub fn journal(&self) -> PathBuf {
        self.state_dir.join("journal.sqlite")
    }

    /// Starts stbd in a new pane and waits for the home screen with the card.
    pub fn start(&self, tmux: &Tmux) -> Result<(), String> {
        self.start_with(tmux, &self.command())
    }

    /// [`Self::start`] with another pane command (e.g. [`Self::command_with_env`]).
    pub fn start_with(&self, tmux: &Tmux, command: &str) -> Result<(), String> {
        tmux.new_session(self.session(), command)?;
        self.wait_home(tmux, Duration::from_secs(60))
    }

    pub fn wait_home(&self, tmux: &Tmux, limit: Duration) -> Result<(), String> {
        tmux.wait(self.session(), limit, home)
            .map(|_| ())
            .ok_or_else(|| {
                format!(
                    "{}: no home screen within {limit:?}; screen:\n{}",
                    self.spec.box_id,
                    tmux.screen(self.session())
                )
            })
    }
}

/// The home screen with a card, and no transaction in progress.
pub fn home(s: &str) -> bool {
    s.contains(ui::strings::HOME_TITLE)
        && s.contains(ui::strings::HOME_BALANCE)
        && !s.contains(ui::strings::PROGRESS_TITLE)
}

fn error_titles() -> Vec<&'static str> {
    ErrorKind::ALL
        .into_iter()
        .map(|k| ui::strings::error_texts(k).0)
        .collect()
}

fn shown_error(s: &str) -> Option<&'static str> {
    error_titles().into_iter().find(|t| s.contains(t))
}

/// The value after "Reference" on the screen.
fn reference(screen: &str) -> Option<String> {
    screen.lines().find_map(|l| {
        let i = l.find(ui::strings::RECEIPT_REF)?;
        l[i + ui::strings::RECEIPT_REF.len()..]
            .split_whitespace()
            .next()
            .map(|s| {
                s.trim_matches(|c: char| !c.is_ascii_alphanumeric() && c != '-')
                    .to_string()
            })
            .filter(|s| !s.is_empty())
    })
}

/// One card's opening balance and the log records seen, by counter.
type Seen = (Option<u64>, BTreeMap<u32, LogRecord>);

/// The card histories of the stbd boxes, sampled from their card files during the run.
#[derive(Default)]
pub struct Histories {
    cards: Mutex<BTreeMap<PathBuf, Seen>>,
}

impl Histories {
    /// Notes a card's balance when personalised.
    pub fn opening(&self, card: &Path, balance: u64) {
        let mut g = self.cards.lock().unwrap_or_else(|p| p.into_inner());
        g.entry(card.to_path_buf()).or_default().0 = Some(balance);
    }

    /// Reads each card file once and merges its log.
    pub fn sample(&self, cards: &[PathBuf]) {
        for c in cards {
            if let Ok(vc) = VirtualCard::open(c) {
                let mut g = self.cards.lock().unwrap_or_else(|p| p.into_inner());
                let h = &mut g.entry(c.clone()).or_default().1;
                for r in &vc.state().log {
                    h.insert(r.atc, r.clone());
                }
            }
        }
    }

    /// Writes each card's history sidecar.
    pub fn write(&self) -> Result<(), String> {
        let g = self.cards.lock().unwrap_or_else(|p| p.into_inner());
        for (card, (opening, h)) in g.iter() {
            crate::audit::write_history(
                card,
                &crate::audit::History {
                    opening_balance: *opening,
                    records: h.values().cloned().collect(),
                },
            )?;
        }
        Ok(())
    }
}

/// Drives one stbd box.
pub struct StbDriver {
    pub b: StbBox,
    pub tmux: Arc<Tmux>,
    pub rec: Arc<Recorder>,
    /// EUR items: (merchant, item, title).
    items: Vec<(String, String, String)>,
    /// Set to have the box SIGKILLed during its next transaction.
    pub kill_next: Arc<AtomicBool>,
    pub load_share: f64,
    /// Share of purchases the viewer declines with BACK instead of OK.
    pub back_share: f64,
    next_id: u64,
}

enum Api {
    Line(serde_json::Value),
    Closed,
    Nothing,
}

impl StbDriver {
    pub fn new(
        b: StbBox,
        tmux: Arc<Tmux>,
        rec: Arc<Recorder>,
        merchants: &[MerchantSpec],
        load_share: f64,
    ) -> Self {
        let items = merchants
            .iter()
            .flat_map(|m| {
                m.items
                    .iter()
                    .filter(|i| i.currency == b.spec.currency)
                    .map(move |i| (m.id.clone(), i.id.clone(), i.title.clone()))
            })
            .collect();
        Self {
            b,
            tmux,
            rec,
            items,
            kill_next: Arc::new(AtomicBool::new(false)),
            load_share,
            back_share: 0.0,
            next_id: 0,
        }
    }

    fn session(&self) -> String {
        self.b.session().to_string()
    }

    /// Takes slots from `pacer` until it runs dry; a short pause between transactions. A
    /// kill still pending then gets one more purchase to happen in.
    pub fn run(mut self, pacer: Arc<Pacer>) {
        let mut extra = 0;
        loop {
            let slot = match pacer.next() {
                Some(s) => s,
                None if self.kill_next.load(Ordering::SeqCst) && extra < 5 => {
                    extra += 1;
                    Instant::now()
                }
                None => break,
            };
            let now = Instant::now();
            if slot > now {
                std::thread::sleep(slot - now);
            }
            let (load, bank, amount, pick) = {
                let mut rng = rand::thread_rng();
                (
                    rng.gen_bool(self.load_share.clamp(0.0, 1.0)),
                    rng.gen_bool(0.5),
                    rng.gen_range(2..=30) * 100,
                    self.items[rng.gen_range(0..self.items.len())].clone(),
                )
            };
            let started = Instant::now();
            let (kind, (txid, outcome)) = if load {
                (
                    if bank {
                        TxKind::BankLoad
                    } else {
                        TxKind::VoucherLoad
                    },
                    self.load(bank, amount),
                )
            } else {
                (TxKind::Purchase, self.purchase(&pick.0, &pick.1, &pick.2))
            };
            self.rec.tx(TxRecord {
                source: "stbd",
                box_id: self.b.spec.box_id.clone(),
                kind,
                txid,
                started,
                ended: Instant::now(),
                outcome,
            });
            std::thread::sleep(Duration::from_millis(
                rand::thread_rng().gen_range(100..600),
            ));
        }
    }

    /// SIGKILLs stbd, restarts it in its pane, waits for the home screen; records it.
    pub fn kill_and_restart(&self, during: &str) {
        let s = self.session();
        let at = Instant::now();
        if let Some(pid) = self.tmux.pane_pid(&s) {
            // SAFETY: kill(2) on the stbd this run started (the pane's script execs it).
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let end = Instant::now() + Duration::from_secs(5);
        while !self.tmux.pane_dead(&s) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let up = self
            .tmux
            .respawn(&s, &self.b.command())
            .and_then(|()| self.b.wait_home(&self.tmux, Duration::from_secs(90)))
            .map(|()| Instant::now());
        if let Err(e) = &up {
            self.rec
                .event(Event::Note(format!("{}: restart: {e}", self.b.spec.box_id)));
        }
        self.rec.event(Event::BoxKilled {
            box_id: self.b.spec.box_id.clone(),
            at,
            up: up.ok(),
            during: during.to_string(),
        });
    }

    /// Kills the box mid-transaction if asked to; true if it did.
    fn maybe_kill(&self, during: &str, window_ms: u64) -> bool {
        if !self.kill_next.swap(false, Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(
            rand::thread_rng().gen_range(0..window_ms.max(1)),
        ));
        self.kill_and_restart(during);
        true
    }

    /// Makes sure the pane is alive and at home (after a crash of its own, restarts it).
    fn ensure_up(&self) {
        let s = self.session();
        if self.tmux.pane_dead(&s) {
            self.rec.event(Event::Note(format!(
                "{}: stbd had exited by itself; restarted",
                self.b.spec.box_id
            )));
            let _ = self.tmux.respawn(&s, &self.b.command());
            let _ = self.b.wait_home(&self.tmux, Duration::from_secs(60));
        }
    }

    fn connect_api(&self) -> Option<(BufReader<UnixStream>, UnixStream)> {
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = UnixStream::connect(&self.b.socket) {
                let rd = s.try_clone().ok()?;
                rd.set_read_timeout(Some(Duration::from_millis(100))).ok()?;
                return Some((BufReader::new(rd), s));
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn read_api(rd: &mut BufReader<UnixStream>, buf: &mut String) -> Api {
        match rd.read_line(buf) {
            Ok(0) => Api::Closed,
            Ok(_) if buf.ends_with('\n') => {
                let v = serde_json::from_str(buf.trim()).unwrap_or(serde_json::Value::Null);
                buf.clear();
                Api::Line(v)
            }
            Ok(_) => Api::Nothing,
            Err(e) if matches!(e.kind(), IoErrorKind::WouldBlock | IoErrorKind::TimedOut) => {
                Api::Nothing
            }
            Err(_) => Api::Closed,
        }
    }

    fn api_outcome(v: &serde_json::Value) -> (Option<String>, Outcome) {
        let txid = v["transaction_id"].as_str().map(str::to_string);
        let reason = v["reason"]
            .as_str()
            .unwrap_or("")
            .chars()
            .take(100)
            .collect::<String>();
        let outcome = match v["result"].as_str() {
            Some("paid") if v["released"] == true => Outcome::Completed,
            Some("paid") => Outcome::Refused("paid, not released".into()),
            Some("cancelled") => Outcome::Refused(format!("cancelled: {reason}")),
            Some("failed") => Outcome::Refused(format!("failed: {reason}")),
            Some("pending") => Outcome::InDoubt(format!("pending: {reason}")),
            _ => Outcome::Failed(format!("local API: {v}")),
        };
        (txid, outcome)
    }

    /// A purchase the local app API asks for; OK pressed on the TV when the offer shows.
    pub fn purchase(
        &mut self,
        merchant: &str,
        item: &str,
        title: &str,
    ) -> (Option<String>, Outcome) {
        self.ensure_up();
        let s = self.session();
        let Some((mut rd, mut wr)) = self.connect_api() else {
            return (
                None,
                Outcome::Failed("local API socket not accepting".into()),
            );
        };
        self.next_id += 1;
        let req = serde_json::json!({"op": "pay", "merchant_id": merchant, "item_id": item, "id": self.next_id});
        if wr.write_all(format!("{req}\n").as_bytes()).is_err() {
            return (None, Outcome::Failed("local API write failed".into()));
        }
        let mut buf = String::new();
        // The offer on the TV, or an early answer (no offer: refused or failed).
        let end = Instant::now() + Duration::from_secs(40);
        let mut offered = false;
        while Instant::now() < end {
            match Self::read_api(&mut rd, &mut buf) {
                Api::Line(v) => return Self::api_outcome(&v),
                Api::Closed => {
                    return (
                        None,
                        Outcome::Failed("stbd closed the local API connection".into()),
                    );
                }
                Api::Nothing => {}
            }
            let screen = self.tmux.screen(&s);
            if screen.contains(ui::strings::OFFER_TITLE) && screen.contains(title) {
                offered = true;
                break;
            }
        }
        if !offered {
            // Leave the box clean for the next one.
            self.tmux.keys(&s, &["BSpace"]);
            return (
                None,
                Outcome::Failed("no offer on the TV within 40 s".into()),
            );
        }
        let back = rand::thread_rng().gen_bool(self.back_share.clamp(0.0, 1.0));
        self.tmux.keys(&s, &[if back { "BSpace" } else { "Enter" }]);
        if !back && self.maybe_kill("purchase, just after OK", 400) {
            return (None, Outcome::Interrupted);
        }
        let end = Instant::now() + Duration::from_secs(90);
        while Instant::now() < end {
            match Self::read_api(&mut rd, &mut buf) {
                Api::Line(v) => return Self::api_outcome(&v),
                Api::Closed => {
                    return (
                        None,
                        Outcome::Failed("stbd closed the local API connection".into()),
                    );
                }
                Api::Nothing => {}
            }
        }
        (
            None,
            Outcome::InDoubt("no result line within 90 s of OK".into()),
        )
    }

    /// A load with the remote: F2, source, amount, OK (PIN, OK); the result off the screen.
    pub fn load(&mut self, bank: bool, amount: u64) -> (Option<String>, Outcome) {
        self.ensure_up();
        let s = self.session();
        let tv = self.tmux.clone();
        tv.keys(&s, &["m"]);
        if tv.wait(&s, Duration::from_secs(10), home).is_none() {
            tv.keys(&s, &["Enter"]);
            if tv.wait(&s, Duration::from_secs(10), home).is_none() {
                return (
                    None,
                    Outcome::Failed("no home screen to start a load from".into()),
                );
            }
        }
        tv.keys(&s, &["F2"]);
        if tv
            .wait(&s, Duration::from_secs(10), |x| {
                x.contains(ui::strings::LOAD_CHOOSE_SOURCE)
            })
            .is_none()
        {
            return (None, Outcome::Failed("no load screen".into()));
        }
        tv.keys(&s, &[if bank { "1" } else { "2" }]);
        let Some(screen) = tv.wait(&s, Duration::from_secs(40), |x| {
            x.contains(ui::strings::LOAD_MAX) || shown_error(x).is_some()
        }) else {
            tv.keys(&s, &["m"]);
            return (None, Outcome::Failed("no load offer within 40 s".into()));
        };
        if let Some(e) = shown_error(&screen) {
            tv.keys(&s, &["Enter"]);
            return (None, Outcome::Refused(format!("load offer: {e}")));
        }
        let digits = amount.to_string();
        let keys: Vec<&str> = digits
            .char_indices()
            .map(|(i, _)| &digits[i..i + 1])
            .collect();
        tv.keys(&s, &keys);
        tv.keys(&s, &["Enter"]);
        if bank {
            let Some(screen) = tv.wait(&s, Duration::from_secs(15), |x| {
                x.contains(ui::strings::PIN_TITLE) || shown_error(x).is_some()
            }) else {
                tv.keys(&s, &["m"]);
                return (None, Outcome::Failed("no PIN screen within 15 s".into()));
            };
            if let Some(e) = shown_error(&screen) {
                tv.keys(&s, &["Enter"]);
                return (reference(&screen), Outcome::Refused(format!("load: {e}")));
            }
            let pin = self.b.spec.pin.clone();
            let keys: Vec<&str> = pin.char_indices().map(|(i, _)| &pin[i..i + 1]).collect();
            tv.keys(&s, &keys);
            tv.keys(&s, &["Enter"]);
        }
        if self.maybe_kill("load, just after the last OK", 600) {
            return (None, Outcome::Interrupted);
        }
        let loaded = ui::strings::receipt_title(ui::model::TxKind::Load);
        // An in-doubt load the box settles quickly may leave "Being settled" for home
        // with the settled note before this reads the screen.
        let Some(screen) = tv.wait(&s, Duration::from_secs(90), |x| {
            x.contains(loaded) || shown_error(x).is_some() || x.contains(ui::strings::SETTLED)
        }) else {
            return (
                None,
                Outcome::InDoubt("no load result on the TV within 90 s".into()),
            );
        };
        let txid = reference(&screen);
        if !screen.contains(loaded) && shown_error(&screen).is_none() {
            return (
                txid,
                Outcome::InDoubt("load: in doubt, settled by the box".into()),
            );
        }
        tv.keys(&s, &["Enter"]);
        match shown_error(&screen) {
            None => (txid, Outcome::Completed),
            Some(e)
                if e == ui::strings::error_texts(ErrorKind::Timeout).0
                    || e == ui::strings::error_texts(ErrorKind::HeadEndUnreachable).0
                    || e == ui::strings::error_texts(ErrorKind::Pending).0 =>
            {
                (txid, Outcome::InDoubt(format!("load: {e}")))
            }
            Some(e) => (txid, Outcome::Refused(format!("load: {e}"))),
        }
    }
}
