//! Builds the roles a config asks for, wires the gateway's routes (in process or over QUIC),
//! serves them, and stops them gracefully. `headend all-in-one` runs every role in one
//! process on SQLite — the embedded default; `headend gateway|payment|merchant` run one.
//!
//! Also [`init_demo`]: a complete dev deployment (CA, certificates, issuer keys, config with
//! a cable catalog and an internet merchant) in one directory, for tests and the demo.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::bank::BankServer;
use crate::clearing::ClearingServer;
use crate::config::{ConfigError, HeadendConfig};
use crate::gateway::Gateway;
use crate::journal::{Journal, JournalError};
use crate::load::LoadServer;
use crate::merchant::MerchantServer;
use crate::outbox::Outbox;
use crate::payment::PaymentServer;
use crate::pki::PkiError;
use crate::quic::{
    ClientTls, QuicError, RevocationConfig, Revocations, Server, ServerTls, TlsIdentity, load_certs,
};
use crate::role::{Access, RemoteRole, Role, serve};

/// Why the head end could not be set up: started ([`start`]) or written ([`init_demo`],
/// [`split_addrs`]).
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The config, or a key file it names.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// This process's certificate, key or operator CA (`[tls]`).
    #[error(transparent)]
    Tls(#[from] QuicError),
    #[error(transparent)]
    Journal(#[from] JournalError),
    /// Making the demo's CA or a role's certificate.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// A role (`payment`, `merchant`, `bank`, `load`, `gateway`) would not open: its
    /// journal, keys or routes.
    #[error("{detail}")]
    Role { role: &'static str, detail: String },
    /// A server (`what`: "payment server", "gateway", …) could not listen on `addr`.
    #[error("{what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: QuicError,
    },
    /// The config asks for the gateway but has no `[gateway]` section.
    #[error("no [gateway] section")]
    NoGatewaySection,
    /// `[hotlist]`: the issuer's verification key is unusable.
    #[error("[hotlist] {0}")]
    Hotlist(String),
    /// A merchant's payment or merchant role is neither served here nor in `[endpoints]`.
    #[error("merchant {merchant} routes to {name}: add [endpoints.{name}] or run that role here")]
    Unrouted { merchant: String, name: String },
    /// A role's `clearing` names a clearing role neither `[endpoints]` nor this process has.
    #[error(
        "[{role}] clearing = \"{name}\": add [endpoints.{name}] or run that clearing role here"
    )]
    NoClearing { role: &'static str, name: String },
    /// A demo file or directory could not be written.
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `init_demo` never overwrites a CA.
    #[error("{0} already holds a CA")]
    CaExists(PathBuf),
    /// `--split-base-port`: a back end's port would be past 65535.
    #[error("--split-base-port {base}: {base} + {offset} is past port 65535")]
    PortPastEnd { base: u16, offset: u16 },
}

impl SetupError {
    fn role(role: &'static str) -> impl FnOnce(String) -> Self {
        move |detail| Self::Role { role, detail }
    }

    fn write(path: &Path) -> impl FnOnce(std::io::Error) -> Self + '_ {
        move |source| Self::Write {
            path: path.into(),
            source,
        }
    }
}

/// Which roles this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Roles {
    pub gateway: bool,
    pub payment: bool,
    pub merchant: bool,
    /// Runs when the config has a `[bank]` section (all-in-one), or demands it (`headend bank`).
    pub bank: bool,
    /// Runs when the config has a `[load]` section (all-in-one), or demands it (`headend load`).
    pub load: bool,
    /// Runs when the config has a `[clearing]` section (all-in-one), or demands it
    /// (`headend clearing`).
    pub clearing: bool,
}

impl Roles {
    pub const ALL: Self = Self {
        gateway: true,
        payment: true,
        merchant: true,
        bank: true,
        load: true,
        clearing: true,
    };
    pub const NONE: Self = Self {
        gateway: false,
        payment: false,
        merchant: false,
        bank: false,
        load: false,
        clearing: false,
    };
}

/// How often an outbox retries what its receiver could not take.
const OUTBOX_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// A running head end.
pub struct Running {
    pub gateway: Option<Arc<Gateway>>,
    pub payment: Option<Arc<PaymentServer>>,
    pub merchant: Option<Arc<MerchantServer>>,
    pub bank: Option<Arc<BankServer>>,
    pub load: Option<Arc<LoadServer>>,
    pub clearing: Option<Arc<ClearingServer>>,
    pub gateway_addr: Option<SocketAddr>,
    pub payment_addr: Option<SocketAddr>,
    pub merchant_addr: Option<SocketAddr>,
    pub bank_addr: Option<SocketAddr>,
    pub load_addr: Option<SocketAddr>,
    pub clearing_addr: Option<SocketAddr>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops accepting, lets in-flight transactions finish, and waits for every task.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
    }
}

fn tls_identity(cfg: &HeadendConfig) -> Result<TlsIdentity, QuicError> {
    TlsIdentity::from_pem_files(&cfg.tls.cert, &cfg.tls.key)
}

/// This process as a server: its `[tls]` certificate and key, and the operator CA its
/// clients must chain to.
///
/// # Errors
/// A `[tls]` file is missing or not PEM of the right kind.
pub fn server_tls(cfg: &HeadendConfig) -> Result<ServerTls, QuicError> {
    Ok(ServerTls {
        operator_ca: load_certs(&cfg.tls.operator_ca)?,
        identity: tls_identity(cfg)?,
    })
}

/// This process as a client of the role `server_role`: the server's certificate must name
/// that role (see `transport::role_verifier`).
///
/// # Errors
/// A `[tls]` file is missing or not PEM of the right kind.
pub fn client_tls(cfg: &HeadendConfig, server_role: &str) -> Result<ClientTls, QuicError> {
    Ok(ClientTls::new(
        load_certs(&cfg.tls.operator_ca)?,
        tls_identity(cfg)?,
        server_role,
    ))
}

/// Starts the requested roles.
///
/// # Errors
/// A role would not open (its keys, journal or routes: [`SetupError::Role`],
/// [`SetupError::Unrouted`]), a `[tls]` file is unusable, or a server cannot listen
/// ([`SetupError::Bind`]).
pub async fn start(cfg: &HeadendConfig, roles: Roles) -> Result<Running, SetupError> {
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };

    let payment = if roles.payment {
        Some(PaymentServer::open(cfg).map_err(SetupError::role("payment"))?)
    } else {
        None
    };
    let merchant = if roles.merchant {
        Some(MerchantServer::open(cfg).map_err(SetupError::role("merchant"))?)
    } else {
        None
    };
    // all-in-one runs the load side only where the config describes it.
    let bank = if roles.bank && cfg.bank.is_some() {
        Some(BankServer::open(cfg).map_err(SetupError::role("bank"))?)
    } else {
        None
    };
    let load = if roles.load && cfg.load.is_some() {
        Some(LoadServer::open(cfg).map_err(SetupError::role("load"))?)
    } else {
        None
    };
    let clearing = if roles.clearing && cfg.clearing.is_some() {
        Some(ClearingServer::open(cfg).map_err(SetupError::role("clearing"))?)
    } else {
        None
    };
    let settings = cfg.transport.clone();
    let mut clearing_addr = None;
    if let (Some(c), Some(s)) = (&clearing, cfg.clearing.as_ref()) {
        if let Some(listen) = s.listen {
            let server = Server::bind(
                listen,
                &server_tls(cfg)?,
                settings.clone(),
                serve(c.clone(), Access::Roles(s.callers.clone())),
                Revocations::new(&RevocationConfig::default()),
            )
            .map_err(|source| SetupError::Bind {
                what: "clearing",
                addr: listen,
                source,
            })?;
            clearing_addr = Some(server.local_addr()?);
            tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
        }
    }
    // Who reaches the clearing role named `name` for `role`: [endpoints] over QUIC, else
    // the one in this process.
    let to_clearing = |role: &'static str, name: &str| -> Result<Arc<dyn Role>, SetupError> {
        if let Some(ep) = cfg.endpoints.get(name) {
            return Ok(Arc::new(RemoteRole::new(
                name,
                ep.addr,
                &ep.server_name,
                client_tls(cfg, ep.role(name))?,
                cfg.transport.clone(),
            )));
        }
        match &clearing {
            Some(c) if c.name() == name => Ok(c.clone() as Arc<dyn Role>),
            _ => Err(SetupError::NoClearing {
                role,
                name: name.into(),
            }),
        }
    };
    // Funders' load advices.
    for (role, funds) in [
        ("bank", bank.as_ref().map(|b| &b.funds)),
        ("load", load.as_ref().map(|l| &l.prefunded)),
    ] {
        if let Some((f, to)) = funds.and_then(|f| Some((f, f.clearing.as_ref()?))) {
            let outbox = Arc::new(Outbox::new(
                f.journal.clone(),
                f.funder,
                to,
                to_clearing(role, to)?,
            ));
            tasks.push(tokio::spawn(outbox.run(OUTBOX_RETRY, rx.clone())));
        }
    }
    // The payment server's collection batches.
    if let (Some(p), Some(s)) = (&payment, cfg.payment.as_ref()) {
        if let Some(to) = &s.clearing {
            let outbox = p
                .clearing_outbox(to_clearing("payment", to)?)
                .expect("[payment] clearing is set");
            tasks.push(tokio::spawn(p.clone().run_collector(
                outbox.clone(),
                std::time::Duration::from_secs(s.collect_every_secs.max(1)),
                rx.clone(),
            )));
            tasks.push(tokio::spawn(outbox.run(OUTBOX_RETRY, rx.clone())));
        }
    }
    // The issuer's hotlist: the payment server's security cards and the load server's HSM
    // keep the newest, from clearing (when it is configured) or installed from a file.
    if let Some(h) = &cfg.hotlist {
        let verifier = crate::hotlist::Verifier::load(&h.verify_key_file)
            .map_err(|e| SetupError::Hotlist(e.to_string()))?;
        let every = std::time::Duration::from_secs(h.refresh_secs.max(1));
        if let (Some(p), Some(s)) = (&payment, cfg.payment.as_ref()) {
            let clearing = match &s.clearing {
                Some(to) => Some((
                    to_clearing("payment", to)?,
                    crate::role::Caller::Role(s.name.clone()),
                )),
                None => None,
            };
            let p2 = p.clone();
            tasks.push(tokio::spawn(crate::hotlist::run_refresh(
                p.journal().clone(),
                verifier.clone(),
                clearing,
                every,
                move |list| {
                    let p = p2.clone();
                    async move { p.apply_hotlist(list).await }
                },
                rx.clone(),
            )));
        }
        if let Some(l) = &load {
            let clearing = match &l.prefunded.clearing {
                Some(to) => Some((
                    to_clearing("load", to)?,
                    crate::role::Caller::Role(l.prefunded.funder.to_string()),
                )),
                None => None,
            };
            let l2 = l.clone();
            tasks.push(tokio::spawn(crate::hotlist::run_refresh(
                l.journal().clone(),
                verifier,
                clearing,
                every,
                move |list| {
                    let l = l2.clone();
                    async move { l.apply_hotlist(list).await }
                },
                rx.clone(),
            )));
        }
    }
    let mut payment_addr = None;
    let mut merchant_addr = None;
    let mut bank_addr = None;
    let mut load_addr = None;
    if let (Some(b), Some(listen)) = (&bank, cfg.bank.as_ref().and_then(|s| s.listen)) {
        let server = Server::bind(
            listen,
            &server_tls(cfg)?,
            settings.clone(),
            serve(
                b.clone(),
                Access::Roles(
                    cfg.bank
                        .as_ref()
                        .map(|s| s.callers.clone())
                        .unwrap_or_default(),
                ),
            ),
            Revocations::new(&RevocationConfig::default()),
        )
        .map_err(|source| SetupError::Bind {
            what: "bank server",
            addr: listen,
            source,
        })?;
        bank_addr = Some(server.local_addr()?);
        tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
    }
    if let (Some(l), Some(listen)) = (&load, cfg.load.as_ref().and_then(|s| s.listen)) {
        let server = Server::bind(
            listen,
            &server_tls(cfg)?,
            settings.clone(),
            serve(
                l.clone(),
                Access::Roles(
                    cfg.load
                        .as_ref()
                        .map(|s| s.callers.clone())
                        .unwrap_or_default(),
                ),
            ),
            Revocations::new(&RevocationConfig::default()),
        )
        .map_err(|source| SetupError::Bind {
            what: "load server",
            addr: listen,
            source,
        })?;
        load_addr = Some(server.local_addr()?);
        tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
    }

    if let Some(p) = &payment {
        tasks.push(tokio::spawn(p.clone().run_sweeper(rx.clone())));
        if let Some(listen) = cfg.payment.as_ref().and_then(|s| s.listen) {
            let server = Server::bind(
                listen,
                &server_tls(cfg)?,
                settings.clone(),
                serve(
                    p.clone(),
                    Access::Roles(
                        cfg.payment
                            .as_ref()
                            .map(|s| s.callers.clone())
                            .unwrap_or_default(),
                    ),
                ),
                Revocations::new(&RevocationConfig::default()),
            )
            .map_err(|source| SetupError::Bind {
                what: "payment server",
                addr: listen,
                source,
            })?;
            payment_addr = Some(server.local_addr()?);
            tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
        }
    }
    if let Some(m) = &merchant {
        tasks.push(tokio::spawn(m.clone().run_sweeper(rx.clone())));
        if let Some(listen) = cfg.merchant.as_ref().and_then(|s| s.listen) {
            let server = Server::bind(
                listen,
                &server_tls(cfg)?,
                settings.clone(),
                serve(
                    m.clone(),
                    Access::Roles(
                        cfg.merchant
                            .as_ref()
                            .map(|s| s.callers.clone())
                            .unwrap_or_default(),
                    ),
                ),
                Revocations::new(&RevocationConfig::default()),
            )
            .map_err(|source| SetupError::Bind {
                what: "merchant server",
                addr: listen,
                source,
            })?;
            merchant_addr = Some(server.local_addr()?);
            tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
        }
    }

    let mut gateway = None;
    let mut gateway_addr = None;
    if roles.gateway {
        let section = cfg.gateway.as_ref().ok_or(SetupError::NoGatewaySection)?;
        let mut table: HashMap<String, Arc<dyn Role>> = HashMap::new();
        for m in &cfg.merchants {
            for name in [&m.payment, &m.merchant] {
                if table.contains_key(name) {
                    continue;
                }
                let role: Arc<dyn Role> = if let Some(ep) = cfg.endpoints.get(name) {
                    Arc::new(RemoteRole::new(
                        name,
                        ep.addr,
                        &ep.server_name,
                        client_tls(cfg, ep.role(name))?,
                        settings.clone(),
                    ))
                } else if payment.is_some() && cfg.payment.as_ref().is_some_and(|p| &p.name == name)
                {
                    payment.clone().expect("checked")
                } else if merchant.is_some()
                    && cfg.merchant.as_ref().is_some_and(|p| &p.name == name)
                {
                    merchant.clone().expect("checked")
                } else {
                    return Err(SetupError::Unrouted {
                        merchant: m.id.clone(),
                        name: name.clone(),
                    });
                };
                table.insert(name.clone(), role);
            }
        }
        // The load side: a remote role if [endpoints] names it, else the local one, else
        // none (load conversations are then refused with the reason).
        let local: [(&str, Option<Arc<dyn Role>>); 2] = [
            (
                crate::gateway::load::BANK,
                bank.clone().map(|b| b as Arc<dyn Role>),
            ),
            (
                crate::gateway::load::LOAD,
                load.clone().map(|l| l as Arc<dyn Role>),
            ),
        ];
        for (name, here) in local {
            let role: Option<Arc<dyn Role>> = if let Some(ep) = cfg.endpoints.get(name) {
                Some(Arc::new(RemoteRole::new(
                    name,
                    ep.addr,
                    &ep.server_name,
                    client_tls(cfg, ep.role(name))?,
                    settings.clone(),
                )))
            } else {
                here
            };
            if let Some(r) = role {
                table.entry(name.to_string()).or_insert(r);
            }
        }
        let journal = Arc::new(Journal::open_target(&cfg.journal_target("gateway")?)?);
        let lifetimes = crate::gateway::Lifetimes {
            offer: std::time::Duration::from_secs(section.offer_lifetime_secs),
            hold: std::time::Duration::from_secs(section.hold_lifetime_secs),
            limits: section.limits,
        };
        let gw = Gateway::new(journal, &cfg.merchants, table, lifetimes)
            .map_err(SetupError::role("gateway"))?;
        tasks.push(tokio::spawn(gw.clone().run_notifier(rx.clone())));
        tasks.push(tokio::spawn(gw.clone().run_releases(rx.clone())));
        tasks.push(tokio::spawn(gw.clone().run_reversal_feed(rx.clone())));
        tasks.push(tokio::spawn(gw.clone().run_sweeper(rx.clone())));
        let revocations = Revocations::new(&RevocationConfig {
            box_ids: section.revoked_boxes.clone(),
            ..Default::default()
        });
        let server = Server::bind(
            section.listen,
            &server_tls(cfg)?,
            settings.clone(),
            serve(gw.clone(), Access::Boxes),
            revocations,
        )
        .map_err(|source| SetupError::Bind {
            what: "gateway",
            addr: section.listen,
            source,
        })?;
        gateway_addr = Some(server.local_addr()?);
        tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
        gateway = Some(gw);
    }
    tracing::info!(gateway = ?gateway_addr, payment = ?payment_addr, merchant = ?merchant_addr, bank = ?bank_addr, load = ?load_addr, clearing = ?clearing_addr, "head end running");
    Ok(Running {
        gateway,
        payment,
        merchant,
        bank,
        load,
        clearing,
        gateway_addr,
        payment_addr,
        merchant_addr,
        bank_addr,
        load_addr,
        clearing_addr,
        shutdown,
        tasks,
    })
}

/// Files of a dev deployment made by [`init_demo`].
pub struct DemoFiles {
    pub dir: PathBuf,
    /// `headend.toml`: every role in one process (`headend all-in-one`).
    pub config: PathBuf,
    pub ca_dir: PathBuf,
    /// The issuer's personalisation keys (both masters, `issuer-keys.toml`): for making cards
    /// (`vcard create`), never given to a role.
    pub issuer_keys: PathBuf,
    /// The roles' key files (`keys/`, 0700; each file 0600).
    pub keys_dir: PathBuf,
    /// The demo bank account's PIN (`demo-pin.txt`), for the viewer to type.
    pub pin_file: PathBuf,
    /// Per-box PIN keys (`pin-keys/<box id>.key`, hex), given to boxes at provisioning.
    pub pin_keys_dir: PathBuf,
    /// The demo voucher's code: random, 80 bits (see [`voucher_code`]); also in
    /// `demo-voucher.txt`.
    pub voucher: String,
    /// A split deployment's per-role configs (`split/<role>.toml`), when asked for.
    pub split: Option<SplitConfigs>,
}

/// The per-role configuration files of a split deployment, each naming only its role's
/// sections, certificate and key files.
#[derive(Debug, Clone)]
pub struct SplitConfigs {
    pub gateway: PathBuf,
    pub payment: PathBuf,
    pub merchant: PathBuf,
    pub bank: PathBuf,
    pub load: PathBuf,
    /// With [`DemoOptions::clearing`]: the clearing role (the payment server, bank and load
    /// server name it in their sections and reach it through `[endpoints.clearing]`).
    pub clearing: Option<PathBuf>,
}

/// Where each role of a split deployment listens (the gateway: [`DemoOptions::gateway_listen`]).
#[derive(Debug, Clone, Copy)]
pub struct SplitAddrs {
    pub payment: SocketAddr,
    pub merchant: SocketAddr,
    pub bank: SocketAddr,
    pub load: SocketAddr,
    /// Clearing (used with [`DemoOptions::clearing`]).
    pub clearing: SocketAddr,
}

/// The addresses of a split deployment's back ends on `ip`: payment, merchant, bank, load and
/// clearing at `base + 1` … `base + 5` (`headend init-demo --split-base-port`); `None`
/// without a base.
///
/// # Errors
/// A port past 65535.
pub fn split_addrs(
    ip: std::net::IpAddr,
    base: Option<u16>,
) -> Result<Option<SplitAddrs>, SetupError> {
    let Some(base) = base else {
        return Ok(None);
    };
    let at = |n: u16| {
        base.checked_add(n)
            .map(|port| SocketAddr::new(ip, port))
            .ok_or(SetupError::PortPastEnd { base, offset: n })
    };
    Ok(Some(SplitAddrs {
        payment: at(1)?,
        merchant: at(2)?,
        bank: at(3)?,
        load: at(4)?,
        clearing: at(5)?,
    }))
}

/// `n` distinct loopback UDP addresses for a deployment's roles to listen on, each free when
/// picked, taken below the kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`;
/// 32768 when it cannot be read) so that no socket bound to port 0 — a client's, another
/// test's — can take one between this pick and the role binding it. A pick that is free
/// now may still be taken by another deployment picking at the same time; the ports are
/// random over the range, so that is rare.
///
/// # Errors
/// No free port found in the range after many tries.
pub fn free_loopback_ports(n: usize) -> std::io::Result<Vec<SocketAddr>> {
    use rand::Rng;
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768)
        .max(2048);
    let mut rng = rand::thread_rng();
    let mut held = Vec::with_capacity(n);
    let mut tries = 0;
    while held.len() < n {
        tries += 1;
        if tries > 1000 + 100 * n {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!("no free loopback UDP port below {ephemeral_from}"),
            ));
        }
        let port = rng.gen_range(1024..ephemeral_from);
        // Held until all are picked, so the ports differ; released on return.
        if let Ok(s) = std::net::UdpSocket::bind(("127.0.0.1", port)) {
            held.push(s);
        }
    }
    held.iter().map(std::net::UdpSocket::local_addr).collect()
}

/// The demo's bank account and its box.
pub const DEMO_ACCOUNT: &str = "ACC-0001";
pub const DEMO_BOX: &str = "box-000001";

/// Options for [`init_demo`].
pub struct DemoOptions {
    pub gateway_listen: SocketAddr,
    /// Per-merchant overrides of the embodiment ("security-card", "payment-server",
    /// "gateway", "merchant") and the FIG. 8 layer.
    pub embodiment: String,
    pub message_layer: bool,
    pub transaction_timeout_secs: u64,
    /// Also write `split/<role>.toml` for one process per role at these addresses.
    pub split: Option<SplitAddrs>,
    /// The all-in-one config runs the clearing role, and its payment server, bank and load
    /// server send it their batches and load advices.
    pub clearing: bool,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            gateway_listen: ([127, 0, 0, 1], 4433).into(),
            embodiment: "security-card".into(),
            message_layer: true,
            transaction_timeout_secs: 30,
            split: None,
            clearing: true,
        }
    }
}

/// A new voucher code: 16 characters of Crockford base32 from the OS RNG (80 bits), in
/// groups of four, e.g. `V7KQ-3M9X-T2PD-8HWN`. At the head end's limits (failed attempts
/// counted per box and in all, with back-off) guessing one is hopeless.
pub fn voucher_code() -> String {
    use rand::RngCore;
    const ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
    let mut raw = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let chars: Vec<char> = raw
        .iter()
        .map(|b| ALPHABET[(b & 31) as usize] as char)
        .collect();
    chars
        .chunks(4)
        .map(|c| c.iter().collect::<String>())
        .collect::<Vec<_>>()
        .join("-")
}

fn write_secret(path: &Path, text: &str) -> Result<(), SetupError> {
    proto::secret::write_private(path, text.as_bytes()).map_err(SetupError::write(path))
}

/// The roles' certificate names: localhost, 127.0.0.1 and `<role>.purselink.test` (the
/// gateway also `gateway.purselink.test`, the name boxes use).
fn role_names(role: &str) -> Vec<String> {
    vec![
        "localhost".into(),
        format!("{role}.purselink.test"),
        "127.0.0.1".into(),
    ]
}

/// Writes a complete dev deployment into `dir`:
/// - an operator CA (`ca/`) and a certificate per role (`certs/<role>.crt.pem`, URI SAN
///   `urn:purselink:role:<role>`; the gateway's, the payment server's, the bank's and the
///   load server's may authenticate as a client, since they call other roles: the gateway
///   the back ends, the others clearing);
/// - the roles' key files in `keys/` (0700, files 0600): `purchase-keys.toml` (payment
///   only), `load-keys.toml` (load only), `pin-master.key` (bank), `confirmation.key` (bank
///   and load), `merchant-<id>.key` (payment and merchant); and `issuer-keys.toml` with
///   both masters for personalising cards, which no role reads;
/// - `headend.toml` (all-in-one) with a cable catalog (pay-per-view and shopping), an
///   internet merchant, a bank account whose PIN is in `demo-pin.txt`, a pre-funded voucher
///   with a random code (`demo-voucher.txt`; the load server reads it from
///   `keys/vouchers.toml`), the issuer float accounts and per-box PIN keys in `pin-keys/`;
/// - with [`DemoOptions::split`], `split/<role>.toml`: one process per role, each config
///   naming only its own sections, certificate and keys.
///
/// Every secret file is 0600 and its directory 0700, whatever the umask. Refuses to
/// overwrite an existing CA.
///
/// # Errors
/// A file cannot be written, or `dir` already holds a CA.
pub fn init_demo(dir: &Path, opts: &DemoOptions) -> Result<DemoFiles, SetupError> {
    use rand::RngCore;
    // It holds the issuer keys, the demo PIN and voucher code and the configs directly:
    // owner-only, whatever the umask (a group- or world-writable directory would let
    // another user replace them).
    proto::secret::private_dir(dir).map_err(SetupError::write(dir))?;
    let ca_dir = dir.join("ca");
    if ca_dir.join("ca.key.pem").exists() {
        return Err(SetupError::CaExists(ca_dir));
    }
    let ca = crate::pki::OperatorCa::generate()?;
    ca.save(&ca_dir)?;
    let certs = dir.join("certs");
    let mut gateway_names = role_names("gateway");
    gateway_names.insert(1, "gateway.purselink.test".into());
    gateway_names.dedup();
    ca.issue_role("gateway", &gateway_names, true)
        .and_then(|c| c.save(&certs, "gateway"))?;
    // Payment server, bank and load server call clearing: client authentication too.
    for (role, client) in [
        ("payment", true),
        ("merchant", false),
        ("bank", true),
        ("load", true),
        ("clearing", false),
    ] {
        ca.issue_role(role, &role_names(role), client)
            .and_then(|c| c.save(&certs, role))?;
    }
    let mut rng = rand::rngs::OsRng;
    let mut new_key = || {
        let mut k = [0u8; 16];
        rng.fill_bytes(&mut k);
        proto::crypto::DesKey::new(k)
    };
    let hex_of = |k: &proto::crypto::DesKey| format!("{}\n", hex::encode_upper(k.bytes()));
    let issuer = proto::purse::IssuerKeys {
        key_version: 1,
        purchase_master: new_key(),
        load_master: new_key(),
    };
    let issuer_keys = dir.join("issuer-keys.toml");
    let issuer_file = proto::purse::IssuerKeyFile {
        app_master: Some(hex::encode_upper(new_key().bytes())),
        ..proto::purse::IssuerKeyFile::from_keys(&issuer)
    };
    write_secret(&issuer_keys, &toml_of(&issuer_file))?;
    let keys_dir = dir.join("keys");
    proto::secret::private_dir(&keys_dir).map_err(SetupError::write(&keys_dir))?;
    write_secret(
        &keys_dir.join("purchase-keys.toml"),
        &toml_of(&proto::purse::MasterKeyFile::from_key(&issuer.purchase())),
    )?;
    write_secret(
        &keys_dir.join("load-keys.toml"),
        &toml_of(&proto::purse::MasterKeyFile::from_key(&issuer.load())),
    )?;
    let pin_master = new_key();
    write_secret(&keys_dir.join("pin-master.key"), &hex_of(&pin_master))?;
    write_secret(&keys_dir.join("confirmation.key"), &hex_of(&new_key()))?;
    for m in ["CABLE", "M-WEBSHOP"] {
        write_secret(
            &keys_dir.join(format!("merchant-{m}.key")),
            &hex_of(&new_key()),
        )?;
    }
    let pin = format!("{:04}", rand::rngs::OsRng.next_u32() % 10_000);
    let pvv = crate::bank::pin_verification_value(&pin_master, DEMO_ACCOUNT, &pin);
    let pin_file = dir.join("demo-pin.txt");
    write_secret(&pin_file, &format!("{pin}\n"))?;
    let voucher = voucher_code();
    write_secret(&dir.join("demo-voucher.txt"), &format!("{voucher}\n"))?;
    write_secret(
        &keys_dir.join("vouchers.toml"),
        &format!(
            "# Pre-funded accounts held by the load server; the codes are their secrets.\n[[vouchers]]\ncode = \"{voucher}\"\nbox_id = \"{DEMO_BOX}\"\ncurrency = 978\nexponent = 2\namount = 10000\n"
        ),
    )?;
    let pin_keys_dir = dir.join("pin-keys");
    proto::secret::private_dir(&pin_keys_dir).map_err(SetupError::write(&pin_keys_dir))?;
    write_secret(
        &pin_keys_dir.join(format!("{DEMO_BOX}.key")),
        &hex_of(&crate::bank::box_pin_key(&pin_master, DEMO_BOX)),
    )?;

    let parts = DemoParts { opts, pvv: &pvv };
    let config = dir.join("headend.toml");
    write_secret(&config, &parts.all_in_one())?;
    let split = match &opts.split {
        None => None,
        Some(addrs) => {
            let split_dir = dir.join("split");
            let w = |role: &str, text: String| -> Result<PathBuf, SetupError> {
                let p = split_dir.join(format!("{role}.toml"));
                write_secret(&p, &text)?;
                Ok(p)
            };
            Some(SplitConfigs {
                gateway: w("gateway", parts.split_gateway(addrs))?,
                payment: w("payment", parts.split_role("payment", addrs))?,
                merchant: w("merchant", parts.split_role("merchant", addrs))?,
                bank: w("bank", parts.split_role("bank", addrs))?,
                load: w("load", parts.split_role("load", addrs))?,
                clearing: opts
                    .clearing
                    .then(|| w("clearing", parts.split_role("clearing", addrs)))
                    .transpose()?,
            })
        }
    };
    Ok(DemoFiles {
        dir: dir.into(),
        config,
        ca_dir,
        issuer_keys,
        keys_dir,
        pin_file,
        pin_keys_dir,
        voucher,
        split,
    })
}

/// A key file's TOML.
fn toml_of<T: serde::Serialize>(v: &T) -> String {
    toml::to_string(v).expect("key files serialize")
}

/// The sections of the demo's configuration, composed into the all-in-one file or one file
/// per role. Paths are relative to the file (the split files sit one directory down).
struct DemoParts<'a> {
    opts: &'a DemoOptions,
    pvv: &'a str,
}

impl DemoParts<'_> {
    fn tls(up: &str, role: &str) -> String {
        format!(
            "[tls]\noperator_ca = \"{up}ca/ca.crt.pem\"\ncert = \"{up}certs/{role}.crt.pem\"\nkey = \"{up}certs/{role}.key.pem\"\n"
        )
    }

    fn gateway(&self) -> String {
        format!(
            "[gateway]\nlisten = \"{}\"\nrevoked_boxes = [\"box-revoked\"]\n",
            self.opts.gateway_listen
        )
    }

    fn payment(&self, up: &str, listen: Option<SocketAddr>) -> String {
        format!(
            "[payment]\npurchase_keys = \"{up}keys/purchase-keys.toml\"\nsecurity_cards = 4\ntransaction_timeout_secs = {}\n{}",
            self.opts.transaction_timeout_secs,
            listen_line(listen)
        )
    }

    fn merchant(listen: Option<SocketAddr>) -> String {
        format!("[merchant]\n{}", listen_line(listen))
    }

    fn merchants(&self, up: &str) -> String {
        let (emb, layer) = (&self.opts.embodiment, self.opts.message_layer);
        format!(
            r#"
[[merchants]]
id = "CABLE"
name = "Cable operator"
kind = "cable"
shared_key_file = "{up}keys/merchant-CABLE.key"
embodiment = "{emb}"
message_layer = {layer}
payment = "payment"
merchant = "merchant"

[[merchants.items]]
id = "ppv-1001"
title = "Championship Final (live)"
kind = "ppv"
detail = "Tonight 20:00, channel 101"
amount = 499
currency = 978
exponent = 2

[[merchants.items]]
id = "ppv-1002"
title = "New release: The Long Road"
kind = "ppv"
detail = "Tonight 21:30, channel 102"
amount = 399
currency = 978
exponent = 2

[[merchants.items]]
id = "shop-2001"
title = "Kitchen knife set"
kind = "shop"
detail = "Shopping channel, delivered in 3 days"
amount = 2995
currency = 978
exponent = 2

[[merchants]]
id = "M-WEBSHOP"
name = "Webshop Ltd"
kind = "internet"
shared_key_file = "{up}keys/merchant-M-WEBSHOP.key"
embodiment = "{emb}"
message_layer = {layer}
payment = "payment"
merchant = "merchant"

[[merchants.items]]
id = "ebook-1"
title = "E-book: Smart cards explained"
kind = "shop"
amount = 1250
currency = 978
exponent = 2
"#
        )
    }

    fn bank(&self, up: &str, listen: Option<SocketAddr>) -> String {
        format!(
            r#"
[bank]
pin_master_file = "{up}keys/pin-master.key"
confirmation_key_file = "{up}keys/confirmation.key"
daily_limit = 30000
float_account = "ISSUER-FLOAT"
pin_tries = 3
{}
[[bank_accounts]]
id = "{DEMO_ACCOUNT}"
holder = "Demo viewer"
box_id = "{DEMO_BOX}"
currency = 978
exponent = 2
opening_balance = 50000
pin_verification_value = "{}"
"#,
            listen_line(listen),
            self.pvv
        )
    }

    fn load(&self, up: &str, listen: Option<SocketAddr>) -> String {
        format!(
            r#"
[load]
load_keys = "{up}keys/load-keys.toml"
confirmation_key_file = "{up}keys/confirmation.key"
vouchers_file = "{up}keys/vouchers.toml"
daily_limit = 30000
float_account = "ISSUER-FLOAT-PREFUNDED"
{}"#,
            listen_line(listen),
        )
    }

    fn all_in_one(&self) -> String {
        let roles = format!(
            "# Generated by `headend init-demo`: a dev deployment on one machine (all-in-one).\nstate_dir = \"state\"\n\n{}\n{}\n{}\n{}\n{}{}{}",
            Self::tls("", "gateway"),
            self.gateway(),
            self.payment("", None),
            Self::merchant(None),
            self.merchants(""),
            self.bank("", None),
            self.load("", None),
        );
        if !self.opts.clearing {
            return roles;
        }
        // The clearing role in process: the payment server's batches and the funders'
        // load advices go to it.
        Self::to_clearing(&roles) + &Self::clearing(None)
    }

    /// `text`'s payment, bank and load sections naming clearing as where their batches and
    /// load advices go.
    fn to_clearing(text: &str) -> String {
        let to = "clearing = \"clearing\"\n";
        text.replacen("[payment]\n", &format!("[payment]\n{to}"), 1)
            .replacen("[bank]\n", &format!("[bank]\n{to}"), 1)
            .replacen("[load]\n", &format!("[load]\n{to}"), 1)
    }

    /// The clearing section: the demo's payment server and both funders; over QUIC (with
    /// `listen`) it takes their messages from their role certificates.
    fn clearing(listen: Option<SocketAddr>) -> String {
        let callers = if listen.is_some() {
            "callers = [\"payment\", \"bank\", \"load\"]\n"
        } else {
            ""
        };
        format!(
            "\n[clearing]\npayment_servers = [\"payment\"]\nfunders = [\"bank\", \"load\"]\n{callers}{}",
            listen_line(listen)
        )
    }

    fn head(role: &str) -> String {
        format!(
            "# Generated by `headend init-demo`: the {role} of a split dev deployment.\nstate_dir = \"../state/{role}\"\n\n{}\n",
            Self::tls("../", role)
        )
    }

    fn split_gateway(&self, a: &SplitAddrs) -> String {
        let ep = |name: &str, addr: SocketAddr| {
            format!(
                "[endpoints.{name}]\naddr = \"{addr}\"\nserver_name = \"{name}.purselink.test\"\n"
            )
        };
        format!(
            "{}{}\n{}\n{}\n{}\n{}{}",
            Self::head("gateway"),
            self.gateway(),
            ep("payment", a.payment),
            ep("merchant", a.merchant),
            ep("bank", a.bank),
            ep("load", a.load),
            self.merchants("../"),
        )
    }

    fn split_role(&self, role: &str, a: &SplitAddrs) -> String {
        let body = match role {
            "payment" => self.payment("../", Some(a.payment)) + &self.merchants("../"),
            "merchant" => Self::merchant(Some(a.merchant)) + &self.merchants("../"),
            "bank" => self.bank("../", Some(a.bank)),
            "load" => self.load("../", Some(a.load)),
            _ => return Self::head(role) + &Self::clearing(Some(a.clearing)),
        };
        if !self.opts.clearing || role == "merchant" {
            return Self::head(role) + &body;
        }
        format!(
            "{}{}\n[endpoints.clearing]\naddr = \"{}\"\nserver_name = \"clearing.purselink.test\"\n",
            Self::head(role),
            Self::to_clearing(&body),
            a.clearing
        )
    }
}

fn listen_line(listen: Option<SocketAddr>) -> String {
    listen.map_or_else(String::new, |l| format!("listen = \"{l}\"\n"))
}
