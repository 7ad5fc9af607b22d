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
use crate::config::HeadendConfig;
use crate::gateway::Gateway;
use crate::journal::Journal;
use crate::load::LoadServer;
use crate::merchant::MerchantServer;
use crate::payment::PaymentServer;
use crate::quic::{
    ClientTls, RevocationConfig, Revocations, Server, ServerTls, TlsIdentity, load_certs,
};
use crate::role::{RemoteRole, Role, serve};

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
}

impl Roles {
    pub const ALL: Self = Self {
        gateway: true,
        payment: true,
        merchant: true,
        bank: true,
        load: true,
    };
    pub const NONE: Self = Self {
        gateway: false,
        payment: false,
        merchant: false,
        bank: false,
        load: false,
    };
}

/// A running head end.
pub struct Running {
    pub gateway: Option<Arc<Gateway>>,
    pub payment: Option<Arc<PaymentServer>>,
    pub merchant: Option<Arc<MerchantServer>>,
    pub bank: Option<Arc<BankServer>>,
    pub load: Option<Arc<LoadServer>>,
    pub gateway_addr: Option<SocketAddr>,
    pub payment_addr: Option<SocketAddr>,
    pub merchant_addr: Option<SocketAddr>,
    pub bank_addr: Option<SocketAddr>,
    pub load_addr: Option<SocketAddr>,
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

fn tls_identity(cfg: &HeadendConfig) -> Result<TlsIdentity, String> {
    TlsIdentity::from_pem_files(&cfg.tls.cert, &cfg.tls.key).map_err(|e| e.to_string())
}

pub fn server_tls(cfg: &HeadendConfig) -> Result<ServerTls, String> {
    Ok(ServerTls {
        operator_ca: load_certs(&cfg.tls.operator_ca).map_err(|e| e.to_string())?,
        identity: tls_identity(cfg)?,
    })
}

pub fn client_tls(cfg: &HeadendConfig) -> Result<ClientTls, String> {
    Ok(ClientTls::new(
        load_certs(&cfg.tls.operator_ca).map_err(|e| e.to_string())?,
        tls_identity(cfg)?,
    ))
}

/// Starts the requested roles.
pub async fn start(cfg: &HeadendConfig, roles: Roles) -> Result<Running, String> {
    let (shutdown, rx) = watch::channel(false);
    let mut tasks = Vec::new();
    let stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.changed().await;
    };

    let payment = if roles.payment {
        Some(PaymentServer::open(cfg)?)
    } else {
        None
    };
    let merchant = if roles.merchant {
        Some(MerchantServer::open(cfg)?)
    } else {
        None
    };
    // all-in-one runs the load side only where the config describes it.
    let bank = if roles.bank && cfg.bank.is_some() {
        Some(BankServer::open(cfg)?)
    } else {
        None
    };
    let load = if roles.load && cfg.load.is_some() {
        Some(LoadServer::open(cfg)?)
    } else {
        None
    };
    let settings = cfg.transport.clone();
    let mut payment_addr = None;
    let mut merchant_addr = None;
    let mut bank_addr = None;
    let mut load_addr = None;
    if let (Some(b), Some(listen)) = (&bank, cfg.bank.as_ref().and_then(|s| s.listen)) {
        let server = Server::bind(
            listen,
            &server_tls(cfg)?,
            settings.clone(),
            serve(b.clone()),
            Revocations::new(&RevocationConfig::default()),
        )
        .map_err(|e| format!("bank server on {listen}: {e}"))?;
        bank_addr = Some(server.local_addr().map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
    }
    if let (Some(l), Some(listen)) = (&load, cfg.load.as_ref().and_then(|s| s.listen)) {
        let server = Server::bind(
            listen,
            &server_tls(cfg)?,
            settings.clone(),
            serve(l.clone()),
            Revocations::new(&RevocationConfig::default()),
        )
        .map_err(|e| format!("load server on {listen}: {e}"))?;
        load_addr = Some(server.local_addr().map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
    }

    if let Some(p) = &payment {
        tasks.push(tokio::spawn(p.clone().run_sweeper(rx.clone())));
        if let Some(listen) = cfg.payment.as_ref().and_then(|s| s.listen) {
            let server = Server::bind(
                listen,
                &server_tls(cfg)?,
                settings.clone(),
                serve(p.clone()),
                Revocations::new(&RevocationConfig::default()),
            )
            .map_err(|e| format!("payment server on {listen}: {e}"))?;
            payment_addr = Some(server.local_addr().map_err(|e| e.to_string())?);
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
                serve(m.clone()),
                Revocations::new(&RevocationConfig::default()),
            )
            .map_err(|e| format!("merchant server on {listen}: {e}"))?;
            merchant_addr = Some(server.local_addr().map_err(|e| e.to_string())?);
            tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
        }
    }

    let mut gateway = None;
    let mut gateway_addr = None;
    if roles.gateway {
        let section = cfg.gateway.as_ref().ok_or("no [gateway] section")?;
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
                        client_tls(cfg)?,
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
                    return Err(format!(
                        "merchant {} routes to {name}: add [endpoints.{name}] or run that role here",
                        m.id
                    ));
                };
                table.insert(name.clone(), role);
            }
        }
        // The load side: a remote role if [endpoints] names it, else the local one, else
        // none (load conversations are then refused with the reason).
        let local: [(&str, Option<Arc<dyn Role>>); 2] = [
            (
                crate::gateway_load::BANK,
                bank.clone().map(|b| b as Arc<dyn Role>),
            ),
            (
                crate::gateway_load::LOAD,
                load.clone().map(|l| l as Arc<dyn Role>),
            ),
        ];
        for (name, here) in local {
            let role: Option<Arc<dyn Role>> = if let Some(ep) = cfg.endpoints.get(name) {
                Some(Arc::new(RemoteRole::new(
                    name,
                    ep.addr,
                    &ep.server_name,
                    client_tls(cfg)?,
                    settings.clone(),
                )))
            } else {
                here
            };
            if let Some(r) = role {
                table.entry(name.to_string()).or_insert(r);
            }
        }
        let journal = Arc::new(
            Journal::open(&cfg.state_dir.join("gateway.sqlite")).map_err(|e| e.to_string())?,
        );
        let lifetimes = crate::gateway::Lifetimes {
            offer: std::time::Duration::from_secs(section.offer_lifetime_secs),
            hold: std::time::Duration::from_secs(section.hold_lifetime_secs),
        };
        let gw = Gateway::new(journal, &cfg.merchants, table, lifetimes)?;
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
            serve(gw.clone()),
            revocations,
        )
        .map_err(|e| format!("gateway on {}: {e}", section.listen))?;
        gateway_addr = Some(server.local_addr().map_err(|e| e.to_string())?);
        tasks.push(tokio::spawn(server.run(stop(rx.clone()))));
        gateway = Some(gw);
    }
    tracing::info!(gateway = ?gateway_addr, payment = ?payment_addr, merchant = ?merchant_addr, bank = ?bank_addr, load = ?load_addr, "head end running");
    Ok(Running {
        gateway,
        payment,
        merchant,
        bank,
        load,
        gateway_addr,
        payment_addr,
        merchant_addr,
        bank_addr,
        load_addr,
        shutdown,
        tasks,
    })
}

/// Files of a dev deployment made by [`init_demo`].
pub struct DemoFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub ca_dir: PathBuf,
    pub issuer_keys: PathBuf,
    /// The demo bank account's PIN (`demo-pin.txt`), for the viewer to type.
    pub pin_file: PathBuf,
    /// Per-box PIN keys (`pin-keys/<box id>.key`, hex), given to boxes at provisioning.
    pub pin_keys_dir: PathBuf,
}

/// The demo's bank account, its box, and its pre-funded voucher.
pub const DEMO_ACCOUNT: &str = "ACC-0001";
pub const DEMO_BOX: &str = "box-000001";
pub const DEMO_VOUCHER: &str = "VOUCHER-0001";

/// Options for [`init_demo`].
pub struct DemoOptions {
    pub gateway_listen: SocketAddr,
    /// Per-merchant overrides of the embodiment ("security-card", "payment-server",
    /// "gateway", "merchant") and the FIG. 8 layer.
    pub embodiment: String,
    pub message_layer: bool,
    pub transaction_timeout_secs: u64,
}

impl Default for DemoOptions {
    fn default() -> Self {
        Self {
            gateway_listen: ([127, 0, 0, 1], 4433).into(),
            embodiment: "security-card".into(),
            message_layer: true,
            transaction_timeout_secs: 30,
        }
    }
}

/// Writes a complete dev deployment into `dir`: an operator CA, the head end's certificate
/// (names `localhost`, `gateway.purselink.test`, 127.0.0.1), random issuer master keys and
/// merchant keys, and `headend.toml` with a cable catalog (pay-per-view and shopping) and an
/// internet merchant, plus the load side (a bank account with a PIN in `demo-pin.txt`, a
/// per-day limit, a pre-funded voucher, issuer float accounts, per-box PIN keys in
/// `pin-keys/`). Refuses to overwrite an existing CA.
pub fn init_demo(dir: &Path, opts: &DemoOptions) -> Result<DemoFiles, String> {
    use rand::RngCore;
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let ca_dir = dir.join("ca");
    if ca_dir.join("ca.key.pem").exists() {
        return Err(format!("{} already holds a CA", ca_dir.display()));
    }
    let ca = crate::pki::OperatorCa::generate().map_err(|e| e.to_string())?;
    ca.save(&ca_dir).map_err(|e| e.to_string())?;
    let names = vec![
        "localhost".into(),
        "gateway.purselink.test".into(),
        "127.0.0.1".into(),
    ];
    ca.issue_server(&names)
        .map_err(|e| e.to_string())?
        .save(dir, "headend")
        .map_err(|e| e.to_string())?;
    let mut rng = rand::rngs::OsRng;
    let mut key = || {
        let mut k = [0u8; 16];
        rng.fill_bytes(&mut k);
        hex::encode_upper(proto::crypto::DesKey::new(k).0)
    };
    let issuer_keys = dir.join("issuer-keys.toml");
    std::fs::write(
        &issuer_keys,
        format!(
            "key_version = 1\npurchase_master = \"{}\"\nload_master = \"{}\"\n",
            key(),
            key()
        ),
    )
    .map_err(|e| e.to_string())?;
    let (cable_key, shop_key) = (key(), key());
    let config = dir.join("headend.toml");
    let text = format!(
        r#"# Generated by `headend init-demo`: a dev deployment on one machine.
state_dir = "state"

[tls]
operator_ca = "ca/ca.crt.pem"
cert = "headend.crt.pem"
key = "headend.key.pem"

[gateway]
listen = "{listen}"
revoked_boxes = ["box-revoked"]

[payment]
issuer_keys = "issuer-keys.toml"
security_cards = 4
transaction_timeout_secs = {timeout}

[merchant]

[[merchants]]
id = "CABLE"
name = "Cable operator"
kind = "cable"
shared_key = "{cable_key}"
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
shared_key = "{shop_key}"
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
"#,
        listen = opts.gateway_listen,
        timeout = opts.transaction_timeout_secs,
        emb = opts.embodiment,
        layer = opts.message_layer,
    );
    // The load side: a bank account with a PIN for the demo box, a per-day limit, a
    // pre-funded voucher, and the issuer float accounts.
    let (pin_master_hex, confirmation_hex) = (key(), key());
    let pin_master = crate::config::hex_key("pin_master", &pin_master_hex)?;
    let pin = format!("{:04}", rand::rngs::OsRng.next_u32() % 10_000);
    let pvv = crate::bank::pin_verification_value(&pin_master, DEMO_ACCOUNT, &pin);
    let pin_file = dir.join("demo-pin.txt");
    std::fs::write(&pin_file, format!("{pin}\n")).map_err(|e| e.to_string())?;
    let pin_keys_dir = dir.join("pin-keys");
    std::fs::create_dir_all(&pin_keys_dir).map_err(|e| e.to_string())?;
    std::fs::write(
        pin_keys_dir.join(format!("{DEMO_BOX}.key")),
        format!(
            "{}\n",
            hex::encode_upper(crate::bank::box_pin_key(&pin_master, DEMO_BOX).0)
        ),
    )
    .map_err(|e| e.to_string())?;
    let load_side = format!(
        r#"
[bank]
pin_master = "{pin_master_hex}"
confirmation_key = "{confirmation_hex}"
daily_limit = 30000
float_account = "ISSUER-FLOAT"
pin_tries = 3

[load]
issuer_keys = "issuer-keys.toml"
confirmation_key = "{confirmation_hex}"
daily_limit = 30000
float_account = "ISSUER-FLOAT-PREFUNDED"

[[bank_accounts]]
id = "{DEMO_ACCOUNT}"
holder = "Demo viewer"
box_id = "{DEMO_BOX}"
currency = 978
exponent = 2
opening_balance = 50000
pin_verification_value = "{pvv}"

[[vouchers]]
code = "{DEMO_VOUCHER}"
box_id = "{DEMO_BOX}"
currency = 978
exponent = 2
amount = 10000
"#
    );
    std::fs::write(&config, text + &load_side).map_err(|e| e.to_string())?;
    Ok(DemoFiles {
        dir: dir.into(),
        config,
        ca_dir,
        issuer_keys,
        pin_file,
        pin_keys_dir,
    })
}
