//! The head ends a fleet runs against, each a fresh dev deployment ([`assembly::init_demo`])
//! in a temporary directory:
//! - [`Deployment::in_process`]: every role in this process, boxes on loopback;
//! - [`Deployment::split_wan`]: the payment role served on its own QUIC listener, the gateway
//!   (with the merchant) reaching it through a WAN proxy, boxes reaching the gateway through
//!   another — box → proxy → gateway → proxy → payment;
//! - [`Deployment::child`]: `headend all-in-one` as a separate process, so its memory can be
//!   read from /proc.
//!
//! [`Deployment::conservation`] checks value at the end: what the cards lost, what the
//! security cards counted, what the merchant released.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use crate::wan::{ProxyLimits, WanParams, WanProxy};
use headend::assembly::{self, DemoFiles, DemoOptions, Roles, Running};
use headend::config::{Endpoint, HeadendConfig};
use headend::merchant::MerchantServer;
use headend::payment::PaymentServer;

/// Value counted three ways, minor units (one currency).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Conservation {
    pub card_debits: u64,
    pub security_cards: u64,
    pub merchant_releases: u64,
    pub releases: usize,
}

impl Conservation {
    pub fn holds(&self) -> bool {
        self.card_debits == self.security_cards && self.security_cards == self.merchant_releases
    }
}

impl std::fmt::Display for Conservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: cards debited {} = security-card totals {} = merchant released {} ({} releases)",
            if self.holds() { "HOLDS" } else { "BROKEN" },
            self.card_debits,
            self.security_cards,
            self.merchant_releases,
            self.releases
        )
    }
}

// Few of these exist at a time; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Kind {
    InProcess(Running),
    Split {
        gateway: Running,
        payment: Running,
        to_gateway: WanProxy,
        to_payment: WanProxy,
    },
    Child(Child),
}

pub struct Deployment {
    pub files: DemoFiles,
    pub cfg: HeadendConfig,
    /// Where boxes connect.
    pub box_addr: SocketAddr,
    kind: Kind,
    _dir: TempDir,
}

/// A deployment's knobs.
#[derive(Debug, Clone)]
pub struct Options {
    pub embodiment: String,
    pub max_connections: usize,
    pub security_cards: u32,
    /// Every role journals on this PostgreSQL database (a connection string) instead of
    /// SQLite files, each deployment in schemas of its own.
    pub journal_url: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            embodiment: "security-card".into(),
            max_connections: 1000,
            security_cards: 64,
            journal_url: None,
        }
    }
}

/// A directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self, String> {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("loadgen-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        Ok(Self(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn demo(opts: &Options, listen: SocketAddr) -> Result<(TempDir, DemoFiles), String> {
    let dir = TempDir::new()?;
    let files = assembly::init_demo(
        dir.path(),
        &DemoOptions {
            gateway_listen: listen,
            embodiment: opts.embodiment.clone(),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    // The demo has 4 security cards and no [transport]; a fleet needs more of both. FIG. 4
    // holds a security card across the box's round trip, so they bound purchases in flight.
    let text = std::fs::read_to_string(&files.config).map_err(|e| e.to_string())?;
    let text = text.replacen(
        "security_cards = 4",
        &format!("security_cards = {}", opts.security_cards),
        1,
    );
    // A simulated box buys far faster than a viewer: lift the per-box limits.
    let text = format!(
        "{text}\n[transport]\nmax_connections = {}\n\n[gateway.limits]\noffers_per_minute = 1000000\nload_offers_per_minute = 1000000\ncatalog_per_minute = 1000000\nburst = 1000000\n",
        opts.max_connections
    );
    let text = match &opts.journal_url {
        // Schemas of this deployment's own: the directory's name is unique per run.
        Some(url) => format!(
            "{text}\n[journal]\nbackend = \"postgres\"\nurl = \"{url}\"\nschema_prefix = \"{}_\"\n",
            dir.path()
                .file_name()
                .map(|n| n.to_string_lossy().replace('-', "_"))
                .unwrap_or_default()
        ),
        None => text,
    };
    std::fs::write(&files.config, text).map_err(|e| e.to_string())?;
    Ok((dir, files))
}

/// `headend all-in-one` on `files`' configuration, its log appended to `headend.log`.
fn spawn_child(headend_bin: &Path, log: &str, files: &DemoFiles) -> Result<Child, String> {
    let logfile = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(files.dir.join("headend.log"))
        .map_err(|e| e.to_string())?;
    Command::new(headend_bin)
        .arg("--log")
        .arg(log)
        .arg("all-in-one")
        .arg("--config")
        .arg(&files.config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(logfile)
        .spawn()
        .map_err(|e| format!("{}: {e}", headend_bin.display()))
}

fn load(files: &DemoFiles) -> Result<HeadendConfig, String> {
    HeadendConfig::load(&files.config).map_err(|e| e.to_string())
}

impl Deployment {
    pub async fn in_process(opts: &Options) -> Result<Self, String> {
        let (dir, files) = demo(opts, ([127, 0, 0, 1], 0).into())?;
        let cfg = load(&files)?;
        let running = assembly::start(&cfg, Roles::ALL)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            box_addr: running.gateway_addr.ok_or("no gateway")?,
            files,
            cfg,
            kind: Kind::InProcess(running),
            _dir: dir,
        })
    }

    /// box → WAN (`to_gateway`) → gateway + merchant → WAN (`to_payment`) → payment role.
    pub async fn split_wan(
        opts: &Options,
        to_gateway: WanParams,
        to_payment: WanParams,
        limits: ProxyLimits,
    ) -> Result<Self, String> {
        let (dir, files) = demo(opts, ([127, 0, 0, 1], 0).into())?;
        let cfg = load(&files)?;
        let mut pay_cfg = cfg.clone();
        pay_cfg
            .payment
            .as_mut()
            .ok_or("no [payment] section")?
            .listen = Some(([127, 0, 0, 1], 0).into());
        // The payment role with its own certificate (role `payment`), which the gateway
        // requires of the server at its payment endpoint.
        pay_cfg.tls.cert = files.dir.join("certs/payment.crt.pem");
        pay_cfg.tls.key = files.dir.join("certs/payment.key.pem");
        let payment = assembly::start(
            &pay_cfg,
            Roles {
                payment: true,
                ..Roles::NONE
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let payment_addr = payment.payment_addr.ok_or("payment role not listening")?;
        let local: SocketAddr = ([127, 0, 0, 1], 0).into();
        let to_payment = WanProxy::start(local, payment_addr, to_payment, limits)
            .await
            .map_err(|e| e.to_string())?;
        let mut gw_cfg = cfg.clone();
        let name = cfg
            .payment
            .as_ref()
            .map(|p| p.name.clone())
            .unwrap_or_default();
        gw_cfg.endpoints.insert(
            name,
            Endpoint {
                addr: to_payment.addr(),
                server_name: "localhost".into(),
                role: None,
            },
        );
        let gateway = assembly::start(
            &gw_cfg,
            Roles {
                gateway: true,
                merchant: true,
                ..Roles::NONE
            },
        )
        .await
        .map_err(|e| e.to_string())?;
        let gateway_addr = gateway.gateway_addr.ok_or("no gateway")?;
        let to_gateway = WanProxy::start(local, gateway_addr, to_gateway, limits)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Self {
            box_addr: to_gateway.addr(),
            files,
            cfg,
            kind: Kind::Split {
                gateway,
                payment,
                to_gateway,
                to_payment,
            },
            _dir: dir,
        })
    }

    /// `headend all-in-one` from `headend_bin` as a child process (its log in the
    /// deployment's directory, `headend.log`); ready once `probe` connects.
    pub async fn child(opts: &Options, headend_bin: &Path, log: &str) -> Result<Self, String> {
        // A free port for the child: bind, note, release.
        let listen = headend::assembly::free_loopback_ports(1).map_err(|e| e.to_string())?[0];
        let (dir, files) = demo(opts, listen)?;
        let cfg = load(&files)?;
        let child = spawn_child(headend_bin, log, &files)?;
        Ok(Self {
            box_addr: listen,
            files,
            cfg,
            kind: Kind::Child(child),
            _dir: dir,
        })
    }

    /// SIGKILLs a child head end and starts it again on the same configuration and
    /// journals (its log goes on in the same file). Not for in-process deployments.
    ///
    /// # Errors
    ///
    /// The deployment is not a child process, or the new one could not be started.
    pub fn kill_and_restart(&mut self, headend_bin: &Path, log: &str) -> Result<(), String> {
        let Kind::Child(child) = &mut self.kind else {
            return Err("only a child head end can be killed".into());
        };
        let _ = child.kill();
        let _ = child.wait();
        *child = spawn_child(headend_bin, log, &self.files)?;
        Ok(())
    }

    /// The process serving the gateway (this one, unless it is a child).
    pub fn gateway_pid(&self) -> u32 {
        match &self.kind {
            Kind::Child(c) => c.id(),
            _ => std::process::id(),
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.files.dir.join("headend.log")
    }

    /// Sets every WAN proxy's parameters (split deployments only).
    pub fn set_wan(&self, to_gateway: WanParams, to_payment: WanParams) {
        if let Kind::Split {
            to_gateway: g,
            to_payment: p,
            ..
        } = &self.kind
        {
            g.set_params(to_gateway);
            p.set_params(to_payment);
        }
    }

    /// Packets (forwarded, lost, dropped at a full queue) over both proxies.
    pub fn wan_stats(&self) -> Option<(u64, u64, u64)> {
        match &self.kind {
            Kind::Split {
                to_gateway,
                to_payment,
                ..
            } => {
                let (a, b) = (to_gateway.stats().snapshot(), to_payment.stats().snapshot());
                Some((a.0 + b.0, a.1 + b.1, a.2 + b.2))
            }
            _ => None,
        }
    }

    /// Waits (bounded) until the gateway has handed every FIG. 6/7 debit response to the
    /// payment server; the number still pending.
    pub async fn settle(&self, limit: Duration) -> usize {
        let gw = match &self.kind {
            Kind::InProcess(r) => r.gateway.clone(),
            Kind::Split { gateway, .. } => gateway.gateway.clone(),
            Kind::Child(_) => None,
        };
        let Some(gw) = gw else { return 0 };
        let end = tokio::time::Instant::now() + limit;
        loop {
            let left = gw.pending_notifications();
            if left == 0 || tokio::time::Instant::now() >= end {
                return left;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the head end (SIGTERM for a child, bounded wait) and counts value from the
    /// journals: security-card totals from the payment server's snapshots, releases from the
    /// merchant's, against `card_debits` from the boxes' cards.
    pub async fn stop_and_check(self, card_debits: u64) -> Result<Conservation, String> {
        let (payment, merchant): (Arc<PaymentServer>, Arc<MerchantServer>) = match self.kind {
            Kind::InProcess(r) => {
                let p = r.payment.clone().ok_or("no payment role")?;
                let m = r.merchant.clone().ok_or("no merchant role")?;
                r.stop().await;
                (p, m)
            }
            Kind::Split {
                gateway,
                payment,
                to_gateway,
                to_payment,
            } => {
                let p = payment.payment.clone().ok_or("no payment role")?;
                let m = gateway.merchant.clone().ok_or("no merchant role")?;
                gateway.stop().await;
                payment.stop().await;
                to_gateway.stop().await;
                to_payment.stop().await;
                (p, m)
            }
            Kind::Child(mut child) => {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(child.id().to_string())
                    .status();
                let end = std::time::Instant::now() + Duration::from_secs(30);
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) => break,
                        Ok(None) if std::time::Instant::now() < end => {
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
                        _ => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                    }
                }
                (
                    PaymentServer::open(&self.cfg)?,
                    MerchantServer::open(&self.cfg)?,
                )
            }
        };
        let security_cards: u64 = payment.totals().await.values().sum();
        let mut merchant_releases = 0;
        let released = merchant
            .journal()
            .all(headend::journal::Kind::Release)
            .map_err(|e| e.to_string())?;
        for (txid, _) in &released {
            let rec = merchant
                .offer_record(txid)
                .ok_or_else(|| format!("release {txid} without an offer record"))?;
            merchant_releases += rec.offer.amount.minor;
        }
        Ok(Conservation {
            card_debits,
            security_cards,
            merchant_releases,
            releases: released.len(),
        })
    }
}
