//! The split head end the chaos run drives: five `headend <role> --config FILE` processes
//! (gateway, payment, merchant, bank, load), each with its own configuration, certificate,
//! state directory and QUIC listener, talking QUIC to each other.
//!
//! [`generate`] starts from [`headend::assembly::init_demo`] (the CA, the issuer keys, the
//! bank's PIN master and confirmation keys) and rewrites the configuration per role:
//! - 8 merchants: the four embodiments (`security-card`, `payment-server`, `gateway`,
//!   `merchant`) × the FIG. 8 message layer on/off, cable and internet, each with items in
//!   EUR and one in GBP;
//! - a bank account (with a PIN, its verification value from
//!   [`headend::bank::pin_verification_value`]) and a pre-funded voucher for every box, and
//!   each box's PIN key ([`headend::bank::box_pin_key`]);
//! - a server certificate per role (`<role>.purselink.test`, `localhost`, `127.0.0.1`);
//! - the gateway reaches the four back ends through `[endpoints.NAME]`.
//!
//! [`RoleProc`] runs one role as a child process, knows when it is ready (it passes a
//! `NOTIFY_SOCKET` and listens for the `READY=1` the role sends, as under systemd), and
//! SIGKILLs and restarts it with the same configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headend::assembly::{DemoOptions, SplitAddrs, init_demo, voucher_code};
use headend::bank::{box_pin_key, pin_verification_value};
use headend::config::{HeadendConfig, load_issuer_keys, read_key_file};
use proto::crypto::DesKey;
use proto::money::Currency;
use proto::purse::IssuerKeys;
use rand::{Rng, RngCore};

/// A head-end role, as the `headend` binary names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RoleName {
    Gateway,
    Payment,
    Merchant,
    Bank,
    Load,
}

impl RoleName {
    pub const ALL: [RoleName; 5] = [
        RoleName::Gateway,
        RoleName::Payment,
        RoleName::Merchant,
        RoleName::Bank,
        RoleName::Load,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RoleName::Gateway => "gateway",
            RoleName::Payment => "payment",
            RoleName::Merchant => "merchant",
            RoleName::Bank => "bank",
            RoleName::Load => "load",
        }
    }

    /// The role's journal file name in its state directory.
    pub fn journal_file(self) -> String {
        format!("{}.sqlite", self.as_str())
    }
}

impl std::fmt::Display for RoleName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One merchant of the deployment.
#[derive(Debug, Clone)]
pub struct MerchantSpec {
    pub id: String,
    pub embodiment: &'static str,
    pub message_layer: bool,
    pub cable: bool,
    pub items: Vec<ItemSpec>,
}

#[derive(Debug, Clone)]
pub struct ItemSpec {
    pub id: String,
    pub title: String,
    pub amount: u64,
    pub currency: Currency,
}

/// One box of the deployment (an `stbd` or a simulated box): identity, card, funding.
#[derive(Debug, Clone)]
pub struct BoxSpec {
    pub box_id: String,
    pub card_id: u64,
    pub currency: Currency,
    pub card_balance: u64,
    pub card_max: u64,
    pub pin: String,
    pub pin_key: DesKey,
    pub account: String,
    pub voucher: String,
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct Spec {
    pub stbd_boxes: usize,
    pub sim_boxes: usize,
    /// Every `gbp_every`-th simulated box holds a GBP card (0: none).
    pub gbp_every: usize,
    pub security_cards: u32,
    /// The payment server's `transaction_timeout_secs`.
    pub transaction_timeout_secs: u64,
    /// `offer_lifetime_secs` of the gateway, merchant, bank and load server: short, so
    /// that offers left open expire within a run and the audit can check they did.
    pub offer_lifetime_secs: u64,
    /// The gateway's `hold_lifetime_secs`.
    pub hold_lifetime_secs: u64,
    /// Gateway processes: 1, or several sharing their journal on PostgreSQL
    /// (`gateway_journal_url`), each with its own address, state directory and certificate;
    /// the boxes list them all.
    pub gateways: usize,
    /// A PostgreSQL connection string: the gateways journal there (schema
    /// `purselink_gateway`, shared); required with more than one gateway. The other roles
    /// stay on SQLite.
    pub gateway_journal_url: Option<String>,
}

impl Default for Spec {
    fn default() -> Self {
        Self {
            stbd_boxes: 3,
            sim_boxes: 24,
            gbp_every: 5,
            security_cards: 16,
            transaction_timeout_secs: 30,
            offer_lifetime_secs: 60,
            hold_lifetime_secs: 90,
            gateways: 1,
            gateway_journal_url: None,
        }
    }
}

/// A generated deployment on disk.
#[derive(Debug, Clone)]
pub struct Layout {
    pub dir: PathBuf,
    pub ca_dir: PathBuf,
    pub issuer: IssuerKeys,
    pub merchants: Vec<MerchantSpec>,
    pub stbd_boxes: Vec<BoxSpec>,
    pub sim_boxes: Vec<BoxSpec>,
    /// Per role: its configuration file.
    pub configs: BTreeMap<RoleName, PathBuf>,
    /// Per role: where it listens (UDP).
    pub addrs: BTreeMap<RoleName, SocketAddr>,
    /// Per role: its state directory (journal).
    pub state_dirs: BTreeMap<RoleName, PathBuf>,
    /// The gateways after the first (`configs`/`addrs`/`state_dirs` hold the first).
    pub more_gateways: Vec<GatewayInstance>,
    /// Where the gateways journal when not on SQLite ([`Spec::gateway_journal_url`]).
    pub gateway_journal: Option<headend::journal::PgTarget>,
}

/// A further gateway process of a deployment with several.
#[derive(Debug, Clone)]
pub struct GatewayInstance {
    /// `gateway-2`, `gateway-3`, … (its log and notify socket are named so).
    pub name: String,
    pub config: PathBuf,
    pub addr: SocketAddr,
}

impl Layout {
    pub fn gateway_addr(&self) -> SocketAddr {
        self.addrs[&RoleName::Gateway]
    }

    /// Every gateway's address, the first first: what the boxes list.
    pub fn gateway_addrs(&self) -> Vec<SocketAddr> {
        std::iter::once(self.gateway_addr())
            .chain(self.more_gateways.iter().map(|g| g.addr))
            .collect()
    }

    /// The role's SQLite journal.
    pub fn journal(&self, role: RoleName) -> PathBuf {
        self.state_dirs[&role].join(role.journal_file())
    }
}

fn free_udp_port() -> Result<SocketAddr, String> {
    headend::assembly::free_loopback_ports(1)
        .map(|p| p[0])
        .map_err(|e| format!("no free UDP port: {e}"))
}

fn des_key_hex(rng: &mut impl RngCore) -> String {
    let mut k = [0u8; 16];
    rng.fill_bytes(&mut k);
    hex::encode_upper(DesKey::new(k).bytes())
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

fn path_str(p: &Path) -> String {
    toml_str(&p.display().to_string())
}

/// The 8 merchants: FIG. 4–7 × message layer on/off; cable and internet alternate so every
/// embodiment has both kinds and both layers.
fn merchant_specs() -> Vec<MerchantSpec> {
    let embodiments = [
        ("F4", "security-card"),
        ("F5", "payment-server"),
        ("F6", "gateway"),
        ("F7", "merchant"),
    ];
    let mut out = Vec::new();
    for (e, (fig, emb)) in embodiments.iter().enumerate() {
        for (l, layer) in [true, false].iter().enumerate() {
            let n = (e * 2 + l) as u64;
            let id = format!("{fig}-{}", if *layer { "L" } else { "N" });
            let cable = (e + l) % 2 == 0;
            let eur = Currency::EUR;
            let items = vec![
                ItemSpec {
                    id: format!("{id}-a"),
                    title: if cable {
                        format!("Match {id}")
                    } else {
                        format!("E-book {id}")
                    },
                    amount: 199 + 100 * n,
                    currency: eur,
                },
                ItemSpec {
                    id: format!("{id}-b"),
                    title: format!("Box set {id}"),
                    amount: 450 + 75 * n,
                    currency: eur,
                },
                ItemSpec {
                    id: format!("{id}-g"),
                    title: format!("Tea {id}"),
                    amount: 300 + 50 * n,
                    currency: Currency::GBP,
                },
            ];
            out.push(MerchantSpec {
                id,
                embodiment: emb,
                message_layer: *layer,
                cable,
                items,
            });
        }
    }
    out
}

fn box_spec(
    box_id: String,
    card_id: u64,
    currency: Currency,
    card_balance: u64,
    card_max: u64,
    pin_master: &DesKey,
    rng: &mut impl Rng,
) -> BoxSpec {
    BoxSpec {
        pin: format!("{:04}", rng.gen_range(0..10_000)),
        pin_key: box_pin_key(pin_master, &box_id),
        account: format!("ACC-{box_id}"),
        voucher: voucher_code(),
        box_id,
        card_id,
        currency,
        card_balance,
        card_max,
    }
}

/// Writes a complete split deployment into `dir` (which must not hold one yet).
pub fn generate(dir: &Path, spec: &Spec) -> Result<Layout, String> {
    if spec.gateways == 0 {
        return Err("a deployment needs a gateway".into());
    }
    if spec.gateways > 1 && spec.gateway_journal_url.is_none() {
        return Err(format!(
            "{} gateways share their state through PostgreSQL: give gateway_journal_url",
            spec.gateways
        ));
    }
    let mut rng = rand::rngs::OsRng;
    let mut addrs = BTreeMap::new();
    for role in RoleName::ALL {
        addrs.insert(role, free_udp_port()?);
    }
    // The CA, the role certificates (urn:purselink:role:NAME; only the gateway's may act as
    // a client), the roles' key files and the issuer's personalisation keys, as
    // `headend init-demo` makes them for a split deployment.
    let demo_dir = dir.join("demo");
    let demo = init_demo(
        &demo_dir,
        &DemoOptions {
            gateway_listen: addrs[&RoleName::Gateway],
            transaction_timeout_secs: spec.transaction_timeout_secs,
            split: Some(SplitAddrs {
                payment: addrs[&RoleName::Payment],
                merchant: addrs[&RoleName::Merchant],
                bank: addrs[&RoleName::Bank],
                load: addrs[&RoleName::Load],
                // Unused: the chaos deployment writes its own configs, without clearing.
                clearing: free_udp_port()?,
            }),
            ..Default::default()
        },
    )
    .map_err(|e| e.to_string())?;
    let keys = demo.keys_dir.clone();
    let pin_master =
        read_key_file("pin master", &keys.join("pin-master.key")).map_err(|e| e.to_string())?;
    let issuer = load_issuer_keys(&demo.issuer_keys).map_err(|e| e.to_string())?;

    let mut state_dirs = BTreeMap::new();
    for role in RoleName::ALL {
        state_dirs.insert(role, dir.join("state").join(role.as_str()));
    }

    let merchants = merchant_specs();
    let mut merchants_toml = String::new();
    for m in &merchants {
        let key_file = keys.join(format!("merchant-{}.key", m.id));
        proto::secret::write_private(&key_file, format!("{}\n", des_key_hex(&mut rng)).as_bytes())
            .map_err(|e| format!("{}: {e}", key_file.display()))?;
        merchants_toml += &format!(
            "\n[[merchants]]\nid = {}\nname = {}\nkind = {}\nshared_key_file = {}\nembodiment = \"{}\"\nmessage_layer = {}\npayment = \"payment\"\nmerchant = \"merchant\"\n",
            toml_str(&m.id),
            toml_str(&format!("Merchant {}", m.id)),
            if m.cable { "\"cable\"" } else { "\"internet\"" },
            path_str(&key_file),
            m.embodiment,
            m.message_layer,
        );
        for (k, it) in m.items.iter().enumerate() {
            let kind = if m.cable && k == 0 { "ppv" } else { "shop" };
            merchants_toml += &format!(
                "\n[[merchants.items]]\nid = {}\ntitle = {}\nkind = \"{kind}\"\ndetail = \"chaos item\"\namount = {}\ncurrency = {}\nexponent = {}\n",
                toml_str(&it.id),
                toml_str(&it.title),
                it.amount,
                it.currency.code,
                it.currency.exponent,
            );
        }
    }

    let stbd_boxes: Vec<BoxSpec> = (0..spec.stbd_boxes)
        .map(|i| {
            box_spec(
                format!("stb-{i:03}"),
                0x57B0_0000 + i as u64,
                Currency::EUR,
                50_000,
                200_000,
                &pin_master,
                &mut rng,
            )
        })
        .collect();
    let sim_boxes: Vec<BoxSpec> = (0..spec.sim_boxes)
        .map(|i| {
            let gbp = spec.gbp_every > 0 && i % spec.gbp_every == spec.gbp_every - 1;
            box_spec(
                format!("sim-{i:06}"),
                0x51A0_0000 + i as u64,
                if gbp { Currency::GBP } else { Currency::EUR },
                100_000,
                1_000_000,
                &pin_master,
                &mut rng,
            )
        })
        .collect();
    let mut accounts_toml = String::new();
    let mut vouchers_toml = String::new();
    for b in stbd_boxes.iter().chain(&sim_boxes) {
        accounts_toml += &format!(
            "\n[[bank_accounts]]\nid = {}\nholder = {}\nbox_id = {}\ncurrency = {}\nexponent = {}\nopening_balance = 100000000\npin_verification_value = \"{}\"\n",
            toml_str(&b.account),
            toml_str(&format!("Viewer of {}", b.box_id)),
            toml_str(&b.box_id),
            b.currency.code,
            b.currency.exponent,
            pin_verification_value(&pin_master, &b.account, &b.pin),
        );
        vouchers_toml += &format!(
            "\n[[vouchers]]\ncode = {}\nbox_id = {}\ncurrency = {}\nexponent = {}\namount = 100000000\n",
            toml_str(&b.voucher),
            toml_str(&b.box_id),
            b.currency.code,
            b.currency.exponent,
        );
    }

    let cfg_dir = dir.join("config");
    proto::secret::private_dir(&cfg_dir).map_err(|e| format!("{}: {e}", cfg_dir.display()))?;
    let head = |role: RoleName| {
        format!(
            "# Generated by the chaos tool (sim::deploy) from `headend init-demo`: the {role} role alone.\nstate_dir = {}\n\n[tls]\noperator_ca = {}\ncert = {}\nkey = {}\n",
            path_str(&state_dirs[&role]),
            path_str(&demo.ca_dir.join("ca.crt.pem")),
            path_str(&demo_dir.join("certs").join(format!("{role}.crt.pem"))),
            path_str(&demo_dir.join("certs").join(format!("{role}.key.pem"))),
        )
    };
    let key = |name: &str| path_str(&keys.join(name));
    let gateway_body = |listen: SocketAddr| {
        let mut t = format!(
            "\n[gateway]\nlisten = \"{listen}\"\nrevoked_boxes = [\"box-revoked\"]\noffer_lifetime_secs = {}\nhold_lifetime_secs = {}\n",
            spec.offer_lifetime_secs, spec.hold_lifetime_secs
        );
        if let Some(url) = &spec.gateway_journal_url {
            t += &format!(
                "\n[journal]\nbackend = \"postgres\"\nurl = {}\n",
                toml_str(url)
            );
        }
        for r in [
            RoleName::Payment,
            RoleName::Merchant,
            RoleName::Bank,
            RoleName::Load,
        ] {
            t += &format!(
                "\n[endpoints.{r}]\naddr = \"{}\"\nserver_name = \"{r}.purselink.test\"\n",
                addrs[&r]
            );
        }
        t + &merchants_toml
    };
    let mut configs = BTreeMap::new();
    for role in RoleName::ALL {
        let listen = addrs[&role];
        let body = match role {
            RoleName::Gateway => gateway_body(listen),
            RoleName::Payment => format!(
                "\n[payment]\nname = \"payment\"\npurchase_keys = {}\nsecurity_cards = {}\ntransaction_timeout_secs = {}\nlisten = \"{listen}\"\ncallers = [\"gateway\"]\n{merchants_toml}",
                key("purchase-keys.toml"),
                spec.security_cards,
                spec.transaction_timeout_secs
            ),
            RoleName::Merchant => format!(
                "\n[merchant]\nname = \"merchant\"\nlisten = \"{listen}\"\noffer_lifetime_secs = {}\ncallers = [\"gateway\"]\n{merchants_toml}",
                spec.offer_lifetime_secs
            ),
            RoleName::Bank => format!(
                "\n[bank]\npin_master_file = {}\nconfirmation_key_file = {}\ndaily_limit = 1000000000\nfloat_account = \"ISSUER-FLOAT\"\npin_tries = 3\noffer_lifetime_secs = {}\nlisten = \"{listen}\"\ncallers = [\"gateway\"]\n{accounts_toml}",
                key("pin-master.key"),
                key("confirmation.key"),
                spec.offer_lifetime_secs
            ),
            RoleName::Load => format!(
                "\n[load]\nload_keys = {}\nconfirmation_key_file = {}\ndaily_limit = 1000000000\nfloat_account = \"ISSUER-FLOAT-PREFUNDED\"\noffer_lifetime_secs = {}\nlisten = \"{listen}\"\ncallers = [\"gateway\"]\n{vouchers_toml}",
                key("load-keys.toml"),
                key("confirmation.key"),
                spec.offer_lifetime_secs
            ),
        };
        let path = cfg_dir.join(format!("{role}.toml"));
        // The load role's file holds voucher codes: owner-only, like every config here.
        proto::secret::write_private(&path, (head(role) + &body).as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // Refuse to hand out a configuration the role would refuse.
        HeadendConfig::load(&path).map_err(|e| e.to_string())?;
        configs.insert(role, path);
    }
    // Further gateways: the first one's configuration with their own address, state
    // directory and certificate (the role `gateway`, under the same DNS name: the boxes
    // check one name whichever they reach).
    let mut more_gateways = Vec::new();
    let ca = headend::pki::OperatorCa::load(&demo.ca_dir).map_err(|e| e.to_string())?;
    for i in 2..=spec.gateways {
        let name = format!("gateway-{i}");
        let addr = free_udp_port()?;
        let names = ["gateway.purselink.test", "localhost", "127.0.0.1"].map(String::from);
        let files = ca
            .issue_role("gateway", &names, true)
            .and_then(|c| c.save(&demo_dir.join("certs"), &name))
            .map_err(|e| e.to_string())?;
        let text = format!(
            "# Generated by the chaos tool (sim::deploy): gateway {i} of {}.\nstate_dir = {}\n\n[tls]\noperator_ca = {}\ncert = {}\nkey = {}\n{}",
            spec.gateways,
            path_str(&dir.join("state").join(&name)),
            path_str(&demo.ca_dir.join("ca.crt.pem")),
            path_str(&files.cert),
            path_str(&files.key),
            gateway_body(addr),
        );
        let path = cfg_dir.join(format!("{name}.toml"));
        proto::secret::write_private(&path, text.as_bytes())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        HeadendConfig::load(&path).map_err(|e| e.to_string())?;
        more_gateways.push(GatewayInstance {
            name,
            config: path,
            addr,
        });
    }
    let gateway_journal = match &spec.gateway_journal_url {
        Some(_) => {
            let cfg =
                HeadendConfig::load(&configs[&RoleName::Gateway]).map_err(|e| e.to_string())?;
            match cfg.journal_target("gateway").map_err(|e| e.to_string())? {
                headend::journal::Target::Postgres(t) => Some(t),
                headend::journal::Target::Sqlite(p) => {
                    return Err(format!("the gateway journals on SQLite ({})", p.display()));
                }
            }
        }
        None => None,
    };
    Ok(Layout {
        dir: dir.to_path_buf(),
        ca_dir: demo.ca_dir,
        issuer,
        merchants,
        stbd_boxes,
        sim_boxes,
        configs,
        addrs,
        state_dirs,
        more_gateways,
        gateway_journal,
    })
}

/// One role as a child process (`headend --log info <role> --config FILE`), its stderr
/// appended to `<dir>/logs/<role>.log`.
pub struct RoleProc {
    pub role: RoleName,
    pub config: PathBuf,
    pub log: PathBuf,
    pub addr: SocketAddr,
    bin: PathBuf,
    notify_path: PathBuf,
    child: Option<Child>,
    /// Every READY=1 the role sent, in order.
    ready: Arc<Mutex<Vec<Instant>>>,
    stop_listener: Arc<AtomicBool>,
    listener: Option<std::thread::JoinHandle<()>>,
    pub starts: u32,
    /// Extra environment for the next starts (a test hook, `HEADEND_TEST_HOOK`).
    pub env: Vec<(String, String)>,
}

impl RoleProc {
    pub fn new(layout: &Layout, role: RoleName, bin: &Path) -> Result<Self, String> {
        Self::instance(
            layout,
            role,
            role.as_str(),
            layout.configs[&role].clone(),
            layout.addrs[&role],
            bin,
        )
    }

    /// A further gateway of the deployment ([`Layout::more_gateways`]).
    pub fn gateway(layout: &Layout, g: &GatewayInstance, bin: &Path) -> Result<Self, String> {
        Self::instance(
            layout,
            RoleName::Gateway,
            &g.name,
            g.config.clone(),
            g.addr,
            bin,
        )
    }

    /// `role` run as `name` (its log and notify socket) from `config`, listening on `addr`.
    fn instance(
        layout: &Layout,
        role: RoleName,
        name: &str,
        config: PathBuf,
        addr: SocketAddr,
        bin: &Path,
    ) -> Result<Self, String> {
        let logs = layout.dir.join("logs");
        let run = layout.dir.join("run");
        for d in [&logs, &run] {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
        }
        let notify_path = run.join(format!("{name}.notify"));
        let _ = std::fs::remove_file(&notify_path);
        let sock = UnixDatagram::bind(&notify_path)
            .map_err(|e| format!("{}: {e}", notify_path.display()))?;
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(|e| e.to_string())?;
        let ready = Arc::new(Mutex::new(Vec::new()));
        let stop_listener = Arc::new(AtomicBool::new(false));
        let listener = {
            let (ready, stop) = (ready.clone(), stop_listener.clone());
            std::thread::Builder::new()
                .name(format!("notify-{name}"))
                .spawn(move || {
                    let mut buf = [0u8; 512];
                    while !stop.load(Ordering::Relaxed) {
                        if let Ok(n) = sock.recv(&mut buf) {
                            let msg = String::from_utf8_lossy(&buf[..n]);
                            if msg.lines().any(|l| l == "READY=1") {
                                ready
                                    .lock()
                                    .unwrap_or_else(|p| p.into_inner())
                                    .push(Instant::now());
                            }
                        }
                    }
                })
                .map_err(|e| e.to_string())?
        };
        Ok(Self {
            role,
            config,
            log: logs.join(format!("{name}.log")),
            addr,
            bin: bin.to_path_buf(),
            notify_path,
            child: None,
            ready,
            stop_listener,
            listener: Some(listener),
            starts: 0,
            env: Vec::new(),
        })
    }

    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    fn ready_count(&self) -> usize {
        self.ready.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Starts the process; returns the number of READY=1 seen before, for [`Self::wait_ready`].
    pub fn start(&mut self) -> Result<usize, String> {
        let before = self.ready_count();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|e| format!("{}: {e}", self.log.display()))?;
        use std::io::Write;
        let mut l2 = log.try_clone().map_err(|e| e.to_string())?;
        let _ = writeln!(l2, "--- chaos: start #{} of {}", self.starts + 1, self.role);
        let child = Command::new(&self.bin)
            .args(["--log", "info", self.role.as_str(), "--config"])
            .arg(&self.config)
            .env_remove("RUST_LOG")
            .env("NOTIFY_SOCKET", &self.notify_path)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.bin.display()))?;
        self.child = Some(child);
        self.starts += 1;
        Ok(before)
    }

    /// Waits until the process has sent READY=1 after the `before`-th; the instant it did.
    pub fn wait_ready(&mut self, before: usize, limit: Duration) -> Result<Instant, String> {
        let end = Instant::now() + limit;
        loop {
            if let Some(t) = self
                .ready
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(before)
            {
                return Ok(*t);
            }
            if let Some(st) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "{} exited at start ({st}); see {}",
                    self.role,
                    self.log.display()
                ));
            }
            if Instant::now() >= end {
                return Err(format!(
                    "{} not ready within {limit:?}; see {}",
                    self.role,
                    self.log.display()
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether the process has exited by itself; its status if so.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        let st = self.child.as_mut()?.try_wait().ok().flatten();
        if st.is_some() {
            self.child = None;
        }
        st
    }

    pub fn running(&self) -> bool {
        self.child.is_some()
    }

    /// SIGKILL, and reap it. The instant of the kill.
    pub fn kill(&mut self) -> Instant {
        let t = Instant::now();
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGKILL);
            }
            let _ = c.wait();
        }
        t
    }

    /// SIGTERM (graceful: in-flight work finishes), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut c) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let end = Instant::now() + grace;
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < end => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    _ => {
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for RoleProc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(3));
        self.stop_listener.store(true, Ordering::Relaxed);
        if let Some(h) = self.listener.take() {
            let _ = h.join();
        }
        let _ = std::fs::remove_file(&self.notify_path);
    }
}

/// The five role processes, and the further gateways of a deployment with several.
pub struct HeadEnd {
    pub roles: BTreeMap<RoleName, RoleProc>,
    pub more_gateways: Vec<RoleProc>,
}

impl HeadEnd {
    /// Starts every role (back ends first, the gateway last) and waits until each is ready.
    pub fn start(layout: &Layout, bin: &Path) -> Result<Self, String> {
        let mut roles = BTreeMap::new();
        for role in [
            RoleName::Payment,
            RoleName::Merchant,
            RoleName::Bank,
            RoleName::Load,
            RoleName::Gateway,
        ] {
            let mut p = RoleProc::new(layout, role, bin)?;
            let before = p.start()?;
            p.wait_ready(before, Duration::from_secs(30))?;
            roles.insert(role, p);
        }
        let mut more_gateways = Vec::new();
        for g in &layout.more_gateways {
            let mut p = RoleProc::gateway(layout, g, bin)?;
            let before = p.start()?;
            p.wait_ready(before, Duration::from_secs(30))?;
            more_gateways.push(p);
        }
        Ok(Self {
            roles,
            more_gateways,
        })
    }

    pub fn role(&mut self, r: RoleName) -> &mut RoleProc {
        self.roles.get_mut(&r).expect("every role is started")
    }

    /// SIGTERMs every role (gateways first).
    pub fn stop(&mut self) {
        for g in &mut self.more_gateways {
            g.stop(Duration::from_secs(10));
        }
        for r in [
            RoleName::Gateway,
            RoleName::Payment,
            RoleName::Merchant,
            RoleName::Bank,
            RoleName::Load,
        ] {
            if let Some(p) = self.roles.get_mut(&r) {
                p.stop(Duration::from_secs(10));
            }
        }
    }
}
