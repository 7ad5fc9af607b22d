//! SoftHSM2 tokens for the load server's HSM (`[load] token`), made in a temporary
//! directory named by this test process's `SOFTHSM2_CONF`.
//!
//! With `PURSELINK_LOAD_HSM=softhsm2` in the environment, every head end the load support
//! starts ([`super::start_prepared`]) imports its load masters into a new token and runs
//! the load server on it instead of the software HSM: `./dev test` runs the load suites a
//! second time so.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};

use headend::load::token::{self, TokenDef};
use proto::purse::AnyMasterKeyFile;

pub const MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
pub const PIN: &str = "246810";
/// The switch: `softhsm2`, or unset for the software HSM.
pub const ENV: &str = "PURSELINK_LOAD_HSM";

/// Whether the load server runs on a token in this process ([`ENV`]); any other value
/// than `softhsm2` is a mistake, said so.
pub fn wanted() -> bool {
    match std::env::var(ENV) {
        Err(_) => false,
        Ok(v) if v == "softhsm2" => true,
        Ok(v) => panic!("{ENV}={v:?}: the only HSM the tests know is \"softhsm2\""),
    }
}

/// The token every head end of this process uses, made once per test binary before the
/// process first loads SoftHSM2: SoftHSM2 reads `SOFTHSM2_CONF`, and the tokens on disk,
/// once per process, so a token made later by `softhsm2-util` would not be seen. Each head
/// end keeps its masters apart under its own key label ([`new_token`]).
pub const TOKEN: &str = "purselink-test";
/// A second token, for a test that logs in with a wrong PIN: PKCS#11 logs in per token and
/// per process, so it must be one no head end of the process is logged in to.
pub const TOKEN_ALONE: &str = "purselink-alone";

/// This process's SoftHSM2 configuration and token directory, with [`TOKEN`] in it.
pub fn softhsm() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        assert!(
            Path::new(MODULE).exists(),
            "{MODULE} is missing: install SoftHSM2 (scripts/system-setup.sh, or apt-get install softhsm2)"
        );
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::create_dir(dir.join("tokens")).unwrap();
        let conf = dir.join("softhsm2.conf");
        std::fs::write(
            &conf,
            format!(
                "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
                dir.join("tokens").display()
            ),
        )
        .unwrap();
        for label in [TOKEN, TOKEN_ALONE] {
            let out = std::process::Command::new("softhsm2-util")
                .env("SOFTHSM2_CONF", &conf)
                .args([
                    "--init-token",
                    "--free",
                    "--label",
                    label,
                    "--pin",
                    PIN,
                    "--so-pin",
                    "13579",
                ])
                .output()
                .expect("softhsm2-util runs");
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // SAFETY: set once, before this process loads SoftHSM2 (the OnceLock runs it
        // before any token is opened); nothing else in the process reads it concurrently.
        unsafe { std::env::set_var("SOFTHSM2_CONF", &conf) };
        dir
    })
}

/// A label no other head end of this process has.
pub fn fresh_label() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("load-{}", N.fetch_add(1, Ordering::Relaxed))
}

/// The [load] token definition of a head end whose masters go under key label `label` in
/// [`TOKEN`], its PIN in its own 0600 file.
pub fn new_token(label: &str) -> TokenDef {
    token_def(TOKEN, label)
}

/// [`new_token`] in [`TOKEN_ALONE`].
pub fn token_alone(label: &str) -> TokenDef {
    token_def(TOKEN_ALONE, label)
}

fn token_def(token: &str, label: &str) -> TokenDef {
    let dir = softhsm();
    let pin_file = dir.join(format!("{label}.pin"));
    proto::secret::write_private(&pin_file, PIN.as_bytes()).unwrap();
    TokenDef {
        module: MODULE.into(),
        token_label: token.into(),
        pin_file,
        key_label: label.into(),
        slot: None,
    }
}

/// The demo's `[load] load_keys` line replaced by `token = …`.
pub fn use_token(config: &str, def: &TokenDef) -> String {
    let line = config
        .lines()
        .find(|l| l.starts_with("load_keys = "))
        .expect("the demo's load_keys")
        .to_string();
    config.replace(
        &line,
        &format!(
            "token = {{ module = {:?}, token_label = {:?}, pin_file = {:?}, key_label = {:?}{} }}",
            def.module.display().to_string(),
            def.token_label,
            def.pin_file.display().to_string(),
            def.key_label,
            def.slot
                .map(|s| format!(", slot = {s}"))
                .unwrap_or_default()
        ),
    )
}

/// Imports the demo's load masters (`keys/load-keys.toml` under `demo_dir`, as the test
/// left it) into the token; the versions imported.
pub fn import_demo_keys(def: &TokenDef, demo_dir: &Path) -> Vec<u8> {
    // One import at a time in the process: SoftHSM2's file store failed a CreateObject
    // (CKR_GENERAL_ERROR) when the tests' head ends wrote to the shared token at once.
    static IMPORTING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = IMPORTING.lock().unwrap_or_else(|p| p.into_inner());
    let keys = demo_dir.join("keys/load-keys.toml");
    let file: AnyMasterKeyFile = toml::from_str(&std::fs::read_to_string(&keys).unwrap()).unwrap();
    token::import(def, &file.into_generations()).unwrap()
}
