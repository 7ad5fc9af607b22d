//! Benchmark (not a test): stbd's resident memory idle and during a purchase, and its idle
//! wakeups, next to a `sleep` process as the do-nothing baseline.
//!
//! Runs the release `stbd run` as its own process with the TV UI on a pseudo-terminal
//! (`script`), a virtual card, the local API, and an in-process `FakeHeadEnd` (which lives in
//! this bench process, not in stbd's numbers). A purchase is requested over the local API and
//! confirmed by typing Enter (OK) into the UI's terminal.
//!
//! `cargo bench -p stb --bench idle` (builds the release stbd first).

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::*;

fn status_field(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Voluntary + involuntary context switches of every thread: each is a wakeup.
fn switches(pid: u32) -> u64 {
    let mut n = 0;
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let s = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            for l in s.lines() {
                if l.starts_with("voluntary_ctxt_switches")
                    || l.starts_with("nonvoluntary_ctxt_switches")
                {
                    n += l
                        .split_whitespace()
                        .nth(1)
                        .and_then(|v| v.parse::<u64>().ok())
                        .unwrap_or(0);
                }
            }
        }
    }
    n
}

fn child_of(pid: u32) -> Option<u32> {
    for _ in 0..50 {
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let c = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
                if let Some(p) = c.split_whitespace().next().and_then(|p| p.parse().ok()) {
                    return Some(p);
                }
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    None
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let ok = Command::new("cargo")
        .args(["build", "--release", "-q", "-p", "stb", "--bin", "stbd"])
        .current_dir(&root)
        .status()
        .expect("cargo");
    assert!(ok.success(), "building the release stbd failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or(root.join("target"));
    let stbd = target.join("release/stbd");

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = rt.block_on(FakeHeadEnd::start(&pki, Quirks::default()));
    let card = card_file(dir.path());
    let sock = dir.path().join("stbd.sock");
    let cfg_text = format!(
        "[reader]\nkind = \"virtual\"\ncard_file = \"{}\"\n[headend]\naddress = \"{}\"\nserver_name = \"gateway.test\"\noperator_ca = \"{}\"\ndevice_cert = \"{}\"\ndevice_key = \"{}\"\n[state]\ndir = \"{}\"\n[ui]\nenabled = true\n[local_api]\nenabled = true\nsocket = \"{}\"\n",
        card.display(),
        fake.addr,
        pki.ca_pem.display(),
        pki.dev_cert.display(),
        pki.dev_key.display(),
        dir.path().join("state").display(),
        sock.display()
    );
    let cfg = dir.path().join("stbd.toml");
    std::fs::write(&cfg, cfg_text).unwrap();

    let mut script = Command::new("script")
        .args([
            "-q",
            "-e",
            "-c",
            &format!(
                "stty rows 24 cols 80; exec {} run --config {}",
                stbd.display(),
                cfg.display()
            ),
            "/dev/null",
        ])
        .env("STBD_LOG", "warn")
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("script(1)");
    let sh = child_of(script.id()).expect("stbd started");
    // `script` runs a shell that execs stbd: the shell's pid becomes stbd's.
    std::thread::sleep(Duration::from_secs(2));
    let pid = child_of(sh).unwrap_or(sh);
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert_eq!(comm.trim(), "stbd", "found {comm:?} at {pid}");

    let mut baseline = Command::new("sleep").arg("30").spawn().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let idle_rss = status_field(pid, "VmRSS:");
    let (w0, b0) = (switches(pid), switches(baseline.id()));
    std::thread::sleep(Duration::from_secs(10));
    let (w1, b1) = (switches(pid), switches(baseline.id()));
    let sleep_rss = status_field(baseline.id(), "VmRSS:");
    let _ = baseline.kill();
    let _ = baseline.wait();

    // A purchase: the local API asks, Enter on the TV confirms.
    let sock2 = sock.clone();
    let reply = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader};
        let mut s = std::os::unix::net::UnixStream::connect(&sock2).unwrap();
        s.write_all(b"{\"op\":\"pay\",\"merchant_id\":\"cable\",\"item_id\":\"ppv-7\"}\n")
            .unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line
    });
    std::thread::sleep(Duration::from_millis(800));
    let offer_rss = status_field(pid, "VmRSS:");
    script.stdin.as_mut().unwrap().write_all(b"\r").unwrap();
    let line = reply.join().unwrap();
    let after_rss = status_field(pid, "VmRSS:");
    let hwm = status_field(pid, "VmHWM:");
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    let _ = script.wait();

    println!(
        "stbd idle benchmark (release build, UI on a pty, virtual card, fake head end over QUIC)"
    );
    println!(
        "  resident memory idle:              {:>6} KiB ({:.1} MiB)",
        idle_rss,
        idle_rss as f64 / 1024.0
    );
    println!("  resident memory, offer on screen:  {:>6} KiB", offer_rss);
    println!("  resident memory after the purchase:{:>6} KiB", after_rss);
    println!(
        "  peak resident (VmHWM):             {:>6} KiB ({:.1} MiB)",
        hwm,
        hwm as f64 / 1024.0
    );
    println!("  baseline `sleep` resident:         {:>6} KiB", sleep_rss);
    println!(
        "  context switches in 10 s idle:     stbd {} (all threads), sleep {}",
        w1 - w0,
        b1 - b0
    );
    println!("  purchase result: {}", line.trim());
    println!("  card balance after: {} (was 1000)", balance(&card));
}
