//! The hotlist tests' helpers: the real `headend hotlist` commands, and waiting.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Runs `headend ARGS…`, which must succeed; its stdout.
pub fn headend(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "headend {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The issuer's keys in `dir/issuer`, and a signed list of `cards` at `version`: (the
/// verification key, the list's file).
pub fn issuer_signs(dir: &Path, version: u64, cards: &[u64]) -> (PathBuf, PathBuf) {
    let issuer = dir.join("issuer");
    if !issuer.join("hotlist-signing.pk8").exists() {
        headend(&["hotlist", "keygen", "--out", s(&issuer)]);
    }
    let file = dir.join(format!("hotlist-{version}.json"));
    let mut args = vec![
        "hotlist".to_string(),
        "sign".into(),
        "--key".into(),
        issuer.join("hotlist-signing.pk8").display().to_string(),
        "--version".into(),
        version.to_string(),
        "--out".into(),
        file.display().to_string(),
    ];
    for c in cards {
        args.extend(["--card".into(), format!("{c:#x}")]);
    }
    let out = headend(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(out.contains(&format!("version {version}")), "{out}");
    (issuer.join("hotlist-verify.pub"), file)
}

/// `[hotlist]` naming `verify`, refreshed every second, appended to the config at `path`.
pub fn with_hotlist(path: &Path, verify: &Path) {
    let text = std::fs::read_to_string(path).unwrap()
        + &format!(
            "\n[hotlist]\nverify_key_file = \"{}\"\nrefresh_secs = 1\n",
            verify.display()
        );
    proto::secret::write_private(path, text.as_bytes()).unwrap();
}

/// Waits until `f` holds, at most `bound`.
pub async fn within(bound: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = tokio::time::Instant::now() + bound;
    while tokio::time::Instant::now() < end {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}

/// The hotlist version `journal` holds (0: none).
pub fn held_version(journal: &headend::journal::Journal) -> u64 {
    headend::hotlist::held_signed(journal)
        .unwrap()
        .map_or(0, |s| s.version)
}
