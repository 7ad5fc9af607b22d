//! Issue 13, "Must show" 1: the real `stbd` on a serial reader. The card is served over a pty
//! by `vcard serial-pty` (a Phoenix or Smartmouse reader emulated on the pty's master, its
//! modem lines on a Unix socket because ptys have none); `headend all-in-one` from `headend
//! init-demo` on a loopback QUIC port; `stbd run` with `[reader] kind = "serial"` and its TV UI
//! in a tmux pane. Each test buys the pay-per-view event with OK and loads 5.00 EUR from the
//! bank account with the PIN, all on the remote, and checks the card file, the head end's
//! journals and the box's journal.
//!
//! | test | convention | wiring | protocol |
//! |---|---|---|---|
//! | `serial_phoenix_direct_t0_purchase_and_load` | direct | Phoenix | T=0, PPS to 115200 |
//! | `serial_smartmouse_inverse_t0_purchase_and_load` | inverse | Smartmouse | T=0, PPS |
//! | `serial_phoenix_inverse_t1_purchase_and_load` | inverse | Phoenix | T=1, PPS |
//! | `serial_smartmouse_direct_t1_purchase_and_load` | direct | Smartmouse | T=1, PPS |
//!
//! The wiring is real to the emulated reader: a Smartmouse holds the card in reset while RTS is
//! low (a stbd configured with Phoenix polarity gets no ATR), and opening the port (RTS up)
//! lets the card run and send an ATR the driver must flush.
//!
//! No pcscd is needed. Every process is killed when the test ends.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use proto::card::CardState;
use proto::purse::LogKind;
use reader_drivers::vcard::VirtualCard;
use support::{BOX_ID, PPV_PRICE, PPV_TITLE, Proc, STEP, Tmux, bins, poll, query, tail};

const START_BALANCE: u64 = 5_000;
const LOAD_AMOUNT: u64 = 500;

struct SerialWorld {
    tmux: Option<Tmux>,
    vcard: Option<Proc>,
    headend: Option<Proc>,
    test: &'static str,
    root: PathBuf,
    he: PathBuf,
    card: PathBuf,
    stbd_config: PathBuf,
    stbd_state: PathBuf,
    stbd_log: PathBuf,
    _dir: tempfile::TempDir,
}

fn run_ok(what: &str, cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl SerialWorld {
    /// Head end, card, `vcard serial-pty` with `profile`, `protocol` and convention, and the
    /// stbd config for that reader.
    fn new(test: &'static str, profile: &str, protocol: &str, inverse: bool) -> SerialWorld {
        let bins = bins();
        let t0 = Instant::now();
        let dir = tempfile::Builder::new()
            .prefix(&format!("purselink-e2e-{test}-"))
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let he = root.join("headend");
        let addr = headend::assembly::free_loopback_ports(1).expect("a free UDP port")[0];
        run_ok(
            "headend init-demo",
            Command::new(&bins.headend)
                .arg("init-demo")
                .arg("--dir")
                .arg(&he)
                .arg("--listen")
                .arg(addr.to_string()),
        );
        let box_dir = root.join("box");
        run_ok(
            "headend pki issue-device",
            Command::new(&bins.headend)
                .args(["pki", "issue-device", "--ca"])
                .arg(he.join("ca"))
                .args(["--box-id", BOX_ID, "--out"])
                .arg(&box_dir),
        );
        let card = root.join("card.vcard");
        run_ok(
            "vcard create",
            Command::new(&bins.vcard)
                .arg("create")
                .arg("--card")
                .arg(&card)
                .args(["--card-id", "700002", "--balance"])
                .arg(START_BALANCE.to_string())
                .args(["--currency", "EUR", "--expiry", "2035-12", "--issuer-keys"])
                .arg(he.join("issuer-keys.toml")),
        );
        let mut headend = Proc::spawn(
            "headend all-in-one",
            Command::new(&bins.headend)
                .arg("all-in-one")
                .arg("--config")
                .arg(he.join("headend.toml"))
                .env("RUST_LOG", "info"),
            &root.join("headend.log"),
        );
        let up = poll(STEP, || {
            if let Some(st) = headend.exited() {
                panic!(
                    "headend exited ({st}):\n{}",
                    tail(&root.join("headend.log"), 30)
                );
            }
            std::net::UdpSocket::bind(addr).is_err().then_some(())
        });
        assert!(up.is_some(), "the head end did not bind {addr}");

        // The reader: the card on a pty, the modem lines on a socket.
        let lines = root.join("reader.lines");
        let tty = root.join("ttyVCARD");
        let mut cmd = Command::new(&bins.vcard);
        cmd.arg("serial-pty")
            .arg("--card")
            .arg(&card)
            .args(["--profile", profile, "--protocol", protocol])
            .arg("--lines-socket")
            .arg(&lines)
            .arg("--link")
            .arg(&tty);
        if inverse {
            cmd.arg("--inverse");
        }
        let vcard = Proc::spawn("vcard serial-pty", &mut cmd, &root.join("vcard.log"));
        let ready = poll(STEP, || {
            std::fs::read_to_string(root.join("vcard.log"))
                .ok()
                .filter(|l| l.contains("lines "))
        });
        assert!(
            ready.is_some(),
            "vcard serial-pty did not start:\n{}",
            tail(&root.join("vcard.log"), 20)
        );

        let stbd_state = root.join("stb-state");
        let stbd_config = root.join("stbd.toml");
        let toml = format!(
            r#"[reader]
kind = "serial"
device = "{tty}"
profile = "{profile}"
modem_lines = "socket:{lines}"

[headend]
address = "{addr}"
server_name = "gateway.purselink.test"
operator_ca = "{ca}"
device_cert = "{cert}"
device_key = "{key}"

[state]
dir = "{state}"

[ui]
enabled = true
provider_name = "Purselink"

[timeouts]
offer_secs = 60
network_secs = 10
card_secs = 10
reconnect_initial_ms = 200
reconnect_max_ms = 2000

[load]
bank_account = "ACC-0001"
pin_key = "{pin_key}"
"#,
            tty = tty.display(),
            lines = lines.display(),
            ca = he.join("ca/ca.crt.pem").display(),
            cert = box_dir.join(format!("{BOX_ID}.crt.pem")).display(),
            key = box_dir.join(format!("{BOX_ID}.key.pem")).display(),
            state = stbd_state.display(),
            pin_key = he.join("pin-keys").join(format!("{BOX_ID}.key")).display(),
        );
        std::fs::write(&stbd_config, toml).expect("stbd.toml");
        eprintln!(
            "{test}: head end and serial reader up in {:?}",
            t0.elapsed()
        );
        SerialWorld {
            tmux: None,
            vcard: Some(vcard),
            headend: Some(headend),
            test,
            stbd_log: root.join("stbd.log"),
            root,
            he,
            card,
            stbd_config,
            stbd_state,
            _dir: dir,
        }
    }

    fn start_stbd(&mut self) -> String {
        let script = self.root.join("run-stbd.sh");
        std::fs::write(
            &script,
            format!(
                "#!/bin/sh\nexec env STBD_LOG=info,reader_drivers=debug '{bin}' run --config '{cfg}' 2>>'{log}'\n",
                bin = bins().stbd.display(),
                cfg = self.stbd_config.display(),
                log = self.stbd_log.display(),
            ),
        )
        .expect("run-stbd.sh");
        self.tmux = Some(Tmux::start(
            self.test,
            &self.root,
            &format!("sh '{}'", script.display()),
        ));
        self.tv().wait_screen("the home screen with the card", |s| {
            s.contains("Smart card") && s.contains("Balance") && s.contains(" EUR")
        })
    }

    fn tv(&self) -> &Tmux {
        self.tmux.as_ref().expect("stbd started")
    }

    fn card_state(&self) -> CardState {
        VirtualCard::open(&self.card)
            .expect("the card file reads")
            .state()
            .clone()
    }

    fn db(&self, name: &str) -> PathBuf {
        match name {
            "stb" => self.stbd_state.join("journal.sqlite"),
            n => self.he.join("state").join(format!("{n}.sqlite")),
        }
    }

    fn headend_state(&self, journal: &str, kind: &str) -> Vec<(String, Vec<u8>)> {
        query(
            &self.db(journal),
            &format!("SELECT key, value FROM state WHERE kind = '{kind}' ORDER BY key"),
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    fn stb_txns(&self) -> Vec<(String, String)> {
        query(
            &self.db("stb"),
            "SELECT transaction_id, state FROM txns ORDER BY created_at, rowid",
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
    }

    /// Home → catalog → the event → OK → receipt; checks card and head end.
    fn purchase(&self) {
        let tv = self.tv();
        tv.keys(&["1"]);
        tv.wait_screen("the catalog", |s| {
            s.contains("Catalog") && s.contains(PPV_TITLE)
        });
        tv.keys(&["1", "Enter"]);
        let offer = tv.wait_screen("the offer", |s| {
            s.contains("Confirm purchase") && s.contains("Balance after")
        });
        assert!(offer.contains("4.99 EUR"), "{offer}");
        assert!(offer.contains("45.01 EUR"), "balance after:\n{offer}");
        tv.keys(&["Enter"]);
        let receipt = tv.wait_screen("the receipt", |s| s.contains("Purchase complete"));
        assert!(receipt.contains("45.01 EUR"), "{receipt}");
        let card = self.card_state();
        assert_eq!(card.balance, START_BALANCE - PPV_PRICE, "card debited");
        assert_eq!(
            card.log.iter().filter(|r| r.kind == LogKind::Debit).count(),
            1
        );
        let releases = self.headend_state("merchant", "release");
        assert_eq!(releases.len(), 1, "the merchant released the event once");
        tv.keys(&["Enter"]);
        tv.wait_screen("home after the purchase", |s| {
            s.contains("Smart card") && s.contains("45.01 EUR")
        });
    }

    /// Green → bank account → 5.00 EUR → PIN → loaded; checks the card.
    fn load(&self) {
        let pin = std::fs::read_to_string(self.he.join("demo-pin.txt")).expect("the demo PIN");
        let tv = self.tv();
        tv.keys(&["F2"]);
        tv.wait_screen("the load sources", |s| s.contains("Load from:"));
        tv.keys(&["Enter"]);
        tv.wait_screen("the amount entry", |s| s.contains("Maximum"));
        tv.keys(&["5", "0", "0", "Enter"]);
        tv.wait_screen("the PIN entry", |s| s.contains("Enter your PIN"));
        let digits: Vec<String> = pin.trim().chars().map(|c| c.to_string()).collect();
        let digits: Vec<&str> = digits.iter().map(String::as_str).collect();
        tv.keys(&digits);
        tv.keys(&["Enter"]);
        let done = tv.wait_screen("the load result", |s| {
            s.contains("Value loaded") && s.contains("New balance")
        });
        assert!(done.contains("50.01 EUR"), "new balance on the TV:\n{done}");
        let card = self.card_state();
        assert_eq!(
            card.balance,
            START_BALANCE - PPV_PRICE + LOAD_AMOUNT,
            "card loaded"
        );
        assert_eq!(
            card.log.iter().filter(|r| r.kind == LogKind::Load).count(),
            1,
            "{:?}",
            card.log
        );
    }

    fn check_stbd_used_the_serial_reader(&self, protocol: u8, inverse: bool) {
        let log = std::fs::read_to_string(&self.stbd_log).unwrap_or_default();
        let line = log
            .lines()
            .find(|l| l.contains("card reset"))
            .unwrap_or_else(|| panic!("stbd never reset a card on the serial line:\n{log}"));
        assert!(
            line.contains(&format!("protocol={protocol}")),
            "protocol T={protocol}: {line}"
        );
        assert!(line.contains("baud=115200"), "PPS to TA1's speed: {line}");
        assert!(
            line.contains(if inverse { "atr=3F" } else { "atr=3B" }),
            "convention: {line}"
        );
        // Everything the box journaled has completed.
        assert!(
            self.stb_txns().iter().all(|(_, s)| s == "completed"),
            "{:?}",
            self.stb_txns()
        );
    }
}

impl Drop for SerialWorld {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("===== {}: FAILED in {}", self.test, self.root.display());
            if let Some(t) = &self.tmux {
                eprintln!("----- last screen:\n{}", t.screen());
            }
            for f in ["stbd.log", "headend.log", "vcard.log"] {
                eprintln!("----- {f} (tail):\n{}", tail(&self.root.join(f), 25));
            }
        }
        self.tmux.take();
        if let Some(mut v) = self.vcard.take() {
            v.stop();
        }
        if let Some(mut h) = self.headend.take() {
            h.stop();
        }
    }
}

fn purchase_and_load(test: &'static str, profile: &str, protocol: &str, inverse: bool) {
    let t0 = Instant::now();
    let mut w = SerialWorld::new(test, profile, protocol, inverse);
    let home = w.start_stbd();
    assert!(home.contains("50.00 EUR"), "opening balance:\n{home}");
    w.purchase();
    w.load();
    w.check_stbd_used_the_serial_reader(u8::from(protocol == "t1"), inverse);
    eprintln!("{test}: passed in {:?}", t0.elapsed());
}

#[test]
fn serial_phoenix_direct_t0_purchase_and_load() {
    purchase_and_load("serial_phoenix_direct_t0", "phoenix", "t0", false);
}

#[test]
fn serial_smartmouse_inverse_t0_purchase_and_load() {
    purchase_and_load("serial_smartmouse_inverse_t0", "smartmouse", "t0", true);
}

#[test]
fn serial_phoenix_inverse_t1_purchase_and_load() {
    purchase_and_load("serial_phoenix_inverse_t1", "phoenix", "t1", true);
}

#[test]
fn serial_smartmouse_direct_t1_purchase_and_load() {
    purchase_and_load("serial_smartmouse_direct_t1", "smartmouse", "t1", false);
}

/// A stbd whose config says Phoenix on a Smartmouse reader holds the card in reset the wrong
/// way round: no ATR, and the TV never shows a balance (the old `smartmouse` profile had
/// exactly this polarity). With the right profile the same reader works (tests above).
#[test]
fn serial_wrong_reset_polarity_gets_no_atr() {
    let mut w = SerialWorld::new("serial_wrong_polarity", "smartmouse", "t0", false);
    let cfg = std::fs::read_to_string(&w.stbd_config).unwrap();
    std::fs::write(
        &w.stbd_config,
        cfg.replace("profile = \"smartmouse\"", "profile = \"phoenix\""),
    )
    .unwrap();
    let script = w.root.join("run-stbd.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec env STBD_LOG=info '{}' run --config '{}' 2>>'{}'\n",
            bins().stbd.display(),
            w.stbd_config.display(),
            w.stbd_log.display()
        ),
    )
    .unwrap();
    w.tmux = Some(Tmux::start(
        w.test,
        &w.root,
        &format!("sh '{}'", script.display()),
    ));
    let warned = poll(STEP, || {
        let log = std::fs::read_to_string(&w.stbd_log).unwrap_or_default();
        log.contains("no usable ATR").then_some(log)
    });
    assert!(
        warned.is_some(),
        "stbd should say at the default log level that the card gave no ATR:\n{}",
        tail(&w.stbd_log, 20)
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(!w.tv().screen().contains("Balance"), "{}", w.tv().screen());
    let _ = Path::new(&w.root);
}
