//! Black-box finding 9: `stbd run` with a configuration that names a voucher code (the
//! voucher's only secret) and that others can read is refused at start, with the reason, as
//! a key file others can read is; the real binary.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn run_stbd(config: &std::path::Path) -> (Option<std::process::ExitStatus>, String) {
    let log = config.with_extension("log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_stbd"))
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status, std::fs::read_to_string(&log).unwrap_or_default())
}

#[test]
fn stbd_refuses_a_config_with_a_voucher_code_that_others_can_read() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for f in ["ca.pem", "box.pem", "box.key.pem", "card.plvc"] {
        proto::secret::write_private(&d.join(f), b"x").unwrap();
    }
    let config = d.join("stbd.toml");
    std::fs::write(
        &config,
        format!(
            r#"[reader]
kind = "virtual"
card_file = "{d}/card.plvc"
[headend]
address = "127.0.0.1:9"
server_name = "gateway.purselink.test"
operator_ca = "{d}/ca.pem"
device_cert = "{d}/box.pem"
device_key = "{d}/box.key.pem"
[state]
dir = "{d}/state"
[ui]
enabled = false
[load]
voucher = "V7KQ-3M9X-T2PD-8HWN"
"#,
            d = d.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    let (status, stderr) = run_stbd(&config);
    assert!(
        status.is_some_and(|s| !s.success()),
        "stbd ran with a world-readable voucher code ({status:?}):\n{stderr}"
    );
    assert!(
        stderr.contains("load.voucher") && stderr.contains("readable by its owner only"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("V7KQ"),
        "the refusal names the code: {stderr}"
    );

    // Owner-only, the same file gets past the check (and on to the next problem: these
    // certificate files are not PEM).
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    let (_, stderr) = run_stbd(&config);
    assert!(!stderr.contains("readable by its owner only"), "{stderr}");
}
