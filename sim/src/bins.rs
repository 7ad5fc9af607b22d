//! The `headend` and `stbd` binaries the run starts, from the same build as the caller.
//!
//! Next to the running executable (`target/<profile>/chaos`, or a test's
//! `target/<profile>/deps/chaos-HASH`): when one is missing or older than its sources, it is
//! built first (`cargo build --bins -p headend -p stb`, same profile and target directory).
//! `PURSELINK_HEADEND` / `PURSELINK_STBD` name other binaries; `PURSELINK_NO_BUILD=1` never
//! builds.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

#[derive(Debug, Clone)]
pub struct Bins {
    pub headend: PathBuf,
    pub stbd: PathBuf,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("sim/ sits in the workspace")
        .to_path_buf()
}

fn newest_source() -> SystemTime {
    fn walk(p: &Path, newest: &mut SystemTime) {
        let Ok(meta) = std::fs::metadata(p) else {
            return;
        };
        if meta.is_dir() {
            for e in std::fs::read_dir(p).into_iter().flatten().flatten() {
                walk(&e.path(), newest);
            }
        } else if let Ok(m) = meta.modified() {
            *newest = (*newest).max(m);
        }
    }
    let root = workspace_root();
    let mut newest = SystemTime::UNIX_EPOCH;
    walk(&root.join("Cargo.lock"), &mut newest);
    for krate in [
        "proto",
        "transport",
        "reader-drivers",
        "ui",
        "stb",
        "headend",
    ] {
        walk(&root.join(krate).join("Cargo.toml"), &mut newest);
        walk(&root.join(krate).join("src"), &mut newest);
    }
    newest
}

fn stale(p: &Path, newest: SystemTime) -> bool {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .map_or(true, |m| m < newest)
}

impl Bins {
    /// Finds (building if needed) the binaries of this build.
    pub fn locate() -> Result<Self, String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut dir = exe
            .parent()
            .ok_or("executable has no directory")?
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir = dir.parent().ok_or("deps has no parent")?.to_path_buf();
        }
        let env_or = |var: &str, name: &str| {
            std::env::var_os(var)
                .map(PathBuf::from)
                .unwrap_or_else(|| dir.join(name))
        };
        let bins = Bins {
            headend: env_or("PURSELINK_HEADEND", "headend"),
            stbd: env_or("PURSELINK_STBD", "stbd"),
        };
        let overridden = std::env::var_os("PURSELINK_HEADEND").is_some()
            || std::env::var_os("PURSELINK_STBD").is_some();
        let no_build = std::env::var("PURSELINK_NO_BUILD").as_deref() == Ok("1") || overridden;
        let newest = newest_source();
        if !no_build && (stale(&bins.headend, newest) || stale(&bins.stbd, newest)) {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "--bins", "-p", "headend", "-p", "stb"])
                .arg("--target-dir")
                .arg(dir.parent().ok_or("no target directory")?)
                .current_dir(workspace_root());
            if dir.file_name().is_some_and(|n| n == "release") {
                cmd.arg("--release");
            }
            let t = std::time::Instant::now();
            let out = cmd.output().map_err(|e| format!("cargo: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "cargo build of headend and stbd failed:\n{}",
                    String::from_utf8_lossy(&out.stderr)
                ));
            }
            eprintln!("chaos: headend and stbd built in {:?}", t.elapsed());
        }
        for b in [&bins.headend, &bins.stbd] {
            if !b.is_file() {
                return Err(format!(
                    "{} is missing: cargo build --bins -p headend -p stb",
                    b.display()
                ));
            }
        }
        Ok(bins)
    }
}
