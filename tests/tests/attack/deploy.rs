//! A split head end of real processes: `init-demo` (with split addresses: the CLI has no
//! flag for them, so the library's `headend::assembly::init_demo` writes
//! `D/split/<role>.toml`, exactly what `headend init-demo` writes plus those files), then
//! `headend gateway|payment|merchant|bank|load --config D/split/<role>.toml`, each its own
//! process on its own loopback UDP port, stderr to `logs/<role>.log`. Certificates for
//! honest boxes and attackers come from the `headend pki` command line.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::purse::IssuerKeys;

use super::wire::Identity;
use crate::support::{Proc, bins, poll, tail};

pub const ROLES: [&str; 6] = ["gateway", "payment", "merchant", "bank", "load", "clearing"];

/// Every role's address.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub gateway: SocketAddr,
    pub payment: SocketAddr,
    pub merchant: SocketAddr,
    pub bank: SocketAddr,
    pub load: SocketAddr,
    pub clearing: SocketAddr,
}

impl Addrs {
    pub fn of(&self, role: &str) -> SocketAddr {
        match role {
            "gateway" => self.gateway,
            "payment" => self.payment,
            "merchant" => self.merchant,
            "bank" => self.bank,
            "load" => self.load,
            "clearing" => self.clearing,
            other => panic!("no role {other}"),
        }
    }
}

/// A running split head end. Processes are stopped on drop (SIGTERM, then SIGKILL).
pub struct HeadEnd {
    pub test: &'static str,
    procs: Vec<(&'static str, Proc)>,
    pub root: PathBuf,
    /// The init-demo directory.
    pub d: PathBuf,
    pub logs: PathBuf,
    pub addrs: Addrs,
    pub issuer: IssuerKeys,
    pub pin: String,
    pub voucher: String,
    dir: Option<tempfile::TempDir>,
}

fn free_ports(n: usize) -> Vec<SocketAddr> {
    headend::assembly::free_loopback_ports(n).expect("free UDP ports")
}

/// Reads a split config, lets `edit` change it, writes it back owner-only.
pub fn edit_config(path: &Path, edit: impl FnOnce(&mut toml::Table)) {
    let text = std::fs::read_to_string(path).expect("split config");
    let mut t: toml::Table = text.parse().expect("split config is TOML");
    edit(&mut t);
    proto::secret::write_private(path, toml::to_string(&t).expect("TOML").as_bytes())
        .expect("split config written");
}

/// `t[section][key] = value`, creating the section (dotted: `gateway.limits`).
pub fn set(t: &mut toml::Table, section: &str, key: &str, value: impl Into<toml::Value>) {
    let mut cur = t;
    for part in section.split('.') {
        cur = cur
            .entry(part)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .expect("a table");
    }
    cur.insert(key.into(), value.into());
}

impl HeadEnd {
    /// Writes the deployment, lets `tweak(role, config)` adjust each role's config, and
    /// starts the five processes.
    pub fn start(test: &'static str, tweak: impl Fn(&str, &mut toml::Table)) -> HeadEnd {
        let t0 = Instant::now();
        let _ = bins();
        let dir = tempfile::Builder::new()
            .prefix(&format!("purselink-attack-{test}-"))
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let d = root.join("he");
        let logs = root.join("logs");
        std::fs::create_dir_all(&logs).expect("logs dir");
        let p = free_ports(6);
        let addrs = Addrs {
            gateway: p[0],
            payment: p[1],
            merchant: p[2],
            bank: p[3],
            load: p[4],
            clearing: p[5],
        };
        let files = headend::assembly::init_demo(
            &d,
            &headend::assembly::DemoOptions {
                gateway_listen: addrs.gateway,
                split: Some(headend::assembly::SplitAddrs {
                    payment: addrs.payment,
                    merchant: addrs.merchant,
                    bank: addrs.bank,
                    load: addrs.load,
                    clearing: addrs.clearing,
                }),
                ..Default::default()
            },
        )
        .expect("init-demo");
        let split = files.split.as_ref().expect("split configs");
        for (role, path) in [
            ("gateway", &split.gateway),
            ("payment", &split.payment),
            ("merchant", &split.merchant),
            ("bank", &split.bank),
            ("load", &split.load),
            ("clearing", split.clearing.as_ref().expect("clearing")),
        ] {
            edit_config(path, |t| tweak(role, t));
        }
        let issuer = headend::config::load_issuer_keys(&files.issuer_keys).expect("issuer keys");
        let pin = std::fs::read_to_string(&files.pin_file)
            .expect("PIN file")
            .trim()
            .to_string();
        let mut he = HeadEnd {
            test,
            procs: Vec::new(),
            root,
            d,
            logs,
            addrs,
            issuer,
            pin,
            voucher: files.voucher.clone(),
            dir: Some(dir),
        };
        // Clearing and the back ends first, the gateway (which calls them) last.
        for role in ["clearing", "payment", "merchant", "bank", "load", "gateway"] {
            he.spawn(role);
        }
        eprintln!("{test}: split head end up in {:?}", t0.elapsed());
        he
    }

    pub fn config(&self, role: &str) -> PathBuf {
        self.d.join("split").join(format!("{role}.toml"))
    }

    pub fn log(&self, role: &str) -> PathBuf {
        self.logs.join(format!("{role}.log"))
    }

    pub fn log_text(&self, role: &str) -> String {
        std::fs::read_to_string(self.log(role)).unwrap_or_default()
    }

    /// A role's state directory and journal.
    pub fn state_dir(&self, role: &str) -> PathBuf {
        self.d.join("state").join(role)
    }

    pub fn journal(&self, role: &str) -> PathBuf {
        self.state_dir(role).join(format!("{role}.sqlite"))
    }

    pub fn pid(&self, role: &str) -> i32 {
        self.procs
            .iter()
            .find(|(r, _)| *r == role)
            .map(|(_, p)| p.pid())
            .unwrap_or_else(|| panic!("{role} is not running"))
    }

    /// Starts `headend <role>` and waits until it holds its UDP port.
    pub fn spawn(&mut self, role: &'static str) {
        let addr = self.addrs.of(role);
        let mut p = Proc::spawn(
            role,
            Command::new(&bins().headend)
                .arg(role)
                .arg("--config")
                .arg(self.config(role))
                .env("RUST_LOG", "info"),
            &self.log(role),
        );
        let up = poll(Duration::from_secs(20), || {
            if let Some(st) = p.exited() {
                panic!(
                    "headend {role} exited ({st}) at start:\n{}",
                    tail(&self.log(role), 30)
                );
            }
            std::net::UdpSocket::bind(addr).is_err().then_some(())
        });
        assert!(up.is_some(), "headend {role} did not bind {addr}");
        self.procs.push((role, p));
    }

    /// Stops one role's process.
    pub fn stop(&mut self, role: &str) {
        if let Some(i) = self.procs.iter().position(|(r, _)| *r == role) {
            let (_, mut p) = self.procs.remove(i);
            p.stop();
        }
    }

    /// Runs `headend ARGS`, panics on failure; stdout.
    pub fn headend(&self, args: &[&str]) -> String {
        let out = Command::new(&bins().headend)
            .args(args)
            .output()
            .expect("headend runs");
        assert!(
            out.status.success(),
            "headend {args:?}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn certs_dir(&self) -> PathBuf {
        self.root.join("issued")
    }

    fn ca(&self) -> String {
        self.d.join("ca").display().to_string()
    }

    pub fn ca_pem(&self) -> PathBuf {
        self.d.join("ca/ca.crt.pem")
    }

    /// `headend pki issue-device` for `box_id`.
    pub fn device(&self, box_id: &str) -> Identity {
        let out = self.certs_dir().join(box_id);
        self.headend(&[
            "pki",
            "issue-device",
            "--ca",
            &self.ca(),
            "--box-id",
            box_id,
            "--out",
            &out.display().to_string(),
        ]);
        Identity::from_pem(
            &format!("device certificate {box_id}"),
            &out.join(format!("{box_id}.crt.pem")),
            &out.join(format!("{box_id}.key.pem")),
        )
    }

    /// `headend pki issue-role --role ROLE [--client]`.
    pub fn role_cert(&self, role: &str, client: bool) -> Identity {
        let out = self.certs_dir().join(format!(
            "role-{role}-{}",
            if client { "client" } else { "server" }
        ));
        let mut args = vec![
            "pki".to_string(),
            "issue-role".into(),
            "--ca".into(),
            self.ca(),
            "--role".into(),
            role.into(),
            "--name".into(),
            format!("{role}.attacker.test"),
            "--out".into(),
            out.display().to_string(),
        ];
        if client {
            args.push("--client".into());
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.headend(&args);
        Identity::from_pem(
            &format!(
                "role certificate {role}{}",
                if client {
                    " --client"
                } else {
                    " (server only)"
                }
            ),
            &out.join(format!("{role}.crt.pem")),
            &out.join(format!("{role}.key.pem")),
        )
    }

    /// `headend pki issue-server --name NAME` (an internet merchant's server certificate).
    pub fn server_cert(&self, name: &str) -> Identity {
        let out = self.certs_dir().join(format!("server-{name}"));
        self.headend(&[
            "pki",
            "issue-server",
            "--ca",
            &self.ca(),
            "--name",
            name,
            "--out",
            &out.display().to_string(),
        ]);
        Identity::from_pem(
            &format!("server certificate {name}"),
            &out.join(format!("{name}.crt.pem")),
            &out.join(format!("{name}.key.pem")),
        )
    }

    /// The deployment's own certificate of a role (as `init-demo` wrote it).
    pub fn own_role_cert(&self, role: &str) -> Identity {
        Identity::from_pem(
            &format!("{role}'s own certificate"),
            &self.d.join(format!("certs/{role}.crt.pem")),
            &self.d.join(format!("certs/{role}.key.pem")),
        )
    }

    /// Resident set size of a role's process, KiB.
    pub fn rss_kib(&self, role: &str) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid(role))).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    }

    /// Every role still running (a crash is a finding).
    pub fn assert_alive(&mut self) {
        for (role, p) in &mut self.procs {
            if let Some(st) = p.exited() {
                panic!(
                    "headend {role} died ({st}):\n{}",
                    tail(&self.logs.join(format!("{role}.log")), 30)
                );
            }
        }
    }
}

impl Drop for HeadEnd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "===== {}: FAILED; logs in {}",
                self.test,
                self.logs.display()
            );
            for role in ROLES {
                eprintln!(
                    "----- {role}.log (tail):\n{}",
                    tail(&self.logs.join(format!("{role}.log")), 15)
                );
            }
        }
        for (_, p) in &mut self.procs {
            p.stop();
        }
        if std::env::var("PURSELINK_E2E_KEEP").as_deref() == Ok("1") {
            if let Some(d) = self.dir.take() {
                eprintln!("{}: kept {}", self.test, d.keep().display());
            }
        }
    }
}
