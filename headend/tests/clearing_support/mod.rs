//! The clearing tests' deployment: `init_demo`'s split one, rewired so that M-WEBSHOP's
//! payment server is a second payment role (`payment-web`, its own certificate, journal and
//! security-card ids), both payment servers send their batches to the clearing role over
//! QUIC, and each role can run in this process or as a real `headend` process.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

use headend::assembly::{self, DemoOptions, Roles, Running, SplitAddrs};
use headend::config::HeadendConfig;
use headend::journal::Kind;
use headend::payment::{PayState, PayTxn};

pub fn free_udp_ports(n: usize) -> Vec<SocketAddr> {
    headend::assembly::free_loopback_ports(n).unwrap()
}

/// `init_demo`'s split deployment, rewired: M-WEBSHOP's payment server is `payment-web`
/// (a second payment role with its own certificate and journal), and both payment servers
/// send their batches to `clearing` over QUIC.
pub struct Deployment {
    pub dir: tempfile::TempDir,
    pub configs: BTreeMap<&'static str, PathBuf>,
    pub clearing_addr: SocketAddr,
    /// The test PostgreSQL every role journals on, when the deployment is on it.
    pub pg: Option<crate::purchase_support::pg_rig::PgDb>,
}

pub fn set_merchant_payment(t: &mut toml::Table) {
    for m in t
        .get_mut("merchants")
        .and_then(|m| m.as_array_mut())
        .into_iter()
        .flatten()
    {
        if m.get("id").and_then(|v| v.as_str()) == Some("M-WEBSHOP") {
            m.as_table_mut()
                .unwrap()
                .insert("payment".into(), "payment-web".into());
        }
    }
}

pub fn endpoint(addr: SocketAddr, name: &str) -> toml::Value {
    let mut e = toml::Table::new();
    e.insert("addr".into(), addr.to_string().into());
    e.insert(
        "server_name".into(),
        format!("{name}.purselink.test").into(),
    );
    e.into()
}

pub fn deployment() -> Deployment {
    deployment_on(crate::purchase_support::pg_rig::Backend::Sqlite).expect("SQLite is always there")
}

/// [`deployment`] with every role journaling on `backend` (each in its own schema of one
/// fresh database on PostgreSQL): `None` (said why) when that is PostgreSQL and it is not
/// installed.
pub fn deployment_on(backend: crate::purchase_support::pg_rig::Backend) -> Option<Deployment> {
    deployment_with(backend, "security-card")
}

/// [`deployment_on`] with every merchant in `embodiment` (001 FIG. 4–7: "security-card",
/// "payment-server", "gateway", "merchant").
pub fn deployment_with(
    backend: crate::purchase_support::pg_rig::Backend,
    embodiment: &str,
) -> Option<Deployment> {
    let pg = match backend {
        crate::purchase_support::pg_rig::Backend::Sqlite => None,
        crate::purchase_support::pg_rig::Backend::Postgres => {
            Some(crate::purchase_support::pg_rig::PgDb::fresh()?)
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let ports = free_udp_ports(7);
    let split = SplitAddrs {
        payment: ports[1],
        merchant: ports[2],
        bank: ports[3],
        load: ports[4],
        clearing: ports[6],
    };
    let (web_addr, clearing_addr) = (ports[5], ports[6]);
    let files = assembly::init_demo(
        dir.path(),
        &DemoOptions {
            gateway_listen: ports[0],
            split: Some(split),
            embodiment: embodiment.into(),
            ..DemoOptions::default()
        },
    )
    .unwrap();
    // The second payment server's and clearing's certificates, from the operator CA.
    let ca = headend::pki::OperatorCa::load(&files.ca_dir).unwrap();
    let certs = dir.path().join("certs");
    let names = |r: &str| vec!["localhost".to_string(), format!("{r}.purselink.test")];
    ca.issue_role("payment-web", &names("payment-web"), true)
        .and_then(|c| c.save(&certs, "payment-web"))
        .unwrap();
    let split_dir = dir.path().join("split");
    let read = |role: &str| -> toml::Table {
        toml::from_str(&std::fs::read_to_string(split_dir.join(format!("{role}.toml"))).unwrap())
            .unwrap()
    };
    let mut gateway = read("gateway");
    set_merchant_payment(&mut gateway);
    // Twenty purchases a box in a few seconds: above the default per-box offer rate.
    let mut limits = toml::Table::new();
    limits.insert("offers_per_minute".into(), 60_000.into());
    limits.insert("burst".into(), 100.into());
    gateway["gateway"]
        .as_table_mut()
        .unwrap()
        .insert("limits".into(), limits.into());
    gateway["endpoints"]
        .as_table_mut()
        .unwrap()
        .insert("payment-web".into(), endpoint(web_addr, "payment-web"));
    let mut merchant = read("merchant");
    set_merchant_payment(&mut merchant);
    let mut payment = read("payment");
    set_merchant_payment(&mut payment);
    let mut clearing_ep = toml::Table::new();
    clearing_ep.insert("clearing".into(), endpoint(clearing_addr, "clearing"));
    payment.insert("endpoints".into(), clearing_ep.into());
    {
        let p = payment["payment"].as_table_mut().unwrap();
        p.insert("clearing".into(), "clearing".into());
        // Batches are closed by the test (and the outbox retries every few seconds).
        p.insert("collect_every_secs".into(), 3600.into());
    }
    let mut web = payment.clone();
    web.insert("state_dir".into(), "../state/payment-web".into());
    {
        let tls = web["tls"].as_table_mut().unwrap();
        tls.insert("cert".into(), "../certs/payment-web.crt.pem".into());
        tls.insert("key".into(), "../certs/payment-web.key.pem".into());
        let p = web["payment"].as_table_mut().unwrap();
        p.insert("name".into(), "payment-web".into());
        // Security card ids are unique across the payment servers clearing hears from.
        p.insert("security_card_ids_from".into(), 0x5B00_0000.into());
        p.insert("listen".into(), web_addr.to_string().into());
    }
    let clearing: toml::Table = toml::from_str(&format!(
        r#"state_dir = "../state/clearing"
[tls]
operator_ca = "../ca/ca.crt.pem"
cert = "../certs/clearing.crt.pem"
key = "../certs/clearing.key.pem"

[clearing]
listen = "{clearing_addr}"
callers = ["payment", "payment-web"]
payment_servers = ["payment", "payment-web"]
"#
    ))
    .unwrap();
    let mut configs = BTreeMap::new();
    for (role, mut t) in [
        ("gateway", gateway),
        ("merchant", merchant),
        ("payment", payment),
        ("payment-web", web),
        ("clearing", clearing),
    ] {
        if let Some(db) = &pg {
            let j: toml::Table = toml::from_str(&db.journal_section()).unwrap();
            t.insert("journal".into(), j["journal"].clone());
        }
        let path = split_dir.join(format!("{role}.toml"));
        std::fs::write(&path, toml::to_string(&t).unwrap()).unwrap();
        configs.insert(role, path);
    }
    Some(Deployment {
        dir,
        configs,
        clearing_addr,
        pg,
    })
}

impl Deployment {
    pub fn cfg(&self, role: &str) -> HeadendConfig {
        HeadendConfig::load(&self.configs[role]).unwrap()
    }

    pub fn state(&self, role: &str) -> PathBuf {
        self.dir.path().join("state").join(role)
    }

    pub async fn start(&self, role: &str, roles: Roles) -> Running {
        assembly::start(&self.cfg(role), roles).await.unwrap()
    }

    /// `headend reconcile` over the clearing, payment and payment-web journals: its exit
    /// status and stdout.
    pub fn reconcile(&self) -> (bool, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_headend"))
            .arg("reconcile")
            .arg("--config")
            .arg(&self.configs["clearing"])
            .args(["--state-dir"])
            .arg(self.state("clearing"))
            .args(["--state-dir"])
            .arg(self.state("payment"))
            .args(["--state-dir"])
            .arg(self.state("payment-web"))
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }
}

pub fn completed(p: &headend::payment::PaymentServer) -> Vec<PayTxn> {
    p.journal()
        .all(Kind::Txn)
        .unwrap()
        .iter()
        .map(|(_, v)| headend::journal::decode::<PayTxn>(v).unwrap())
        .filter(|t| t.state == PayState::Completed)
        .collect()
}

impl Deployment {
    /// `role` as a real `headend <subcommand>` process on its split config, with the test
    /// hook `hook` if any; its stderr goes to `<dir>/<role>.log`. Returns once it says it
    /// runs.
    pub fn spawn(&self, role: &str, subcommand: &str, hook: Option<&str>) -> Child {
        let log = self.log(role);
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_headend"));
        cmd.arg(subcommand)
            .arg("--config")
            .arg(&self.configs[role])
            .stdout(Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .unwrap(),
            );
        cmd.env_remove(headend::test_hook::ENV);
        if let Some(h) = hook {
            cmd.env(headend::test_hook::ENV, h);
        }
        let marks = |l: &str| l.matches("head end running").count();
        let before = std::fs::read_to_string(&log).map_or(0, |l| marks(&l));
        let mut child = cmd.spawn().unwrap();
        let t0 = std::time::Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if marks(&text) > before {
                return child;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("{role} exited ({status}) before running:\n{text}");
            }
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(30),
                "{role} did not start:\n{text}"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// The role's process log (stderr).
    pub fn log(&self, role: &str) -> PathBuf {
        self.dir.path().join(format!("{role}.log"))
    }
}
