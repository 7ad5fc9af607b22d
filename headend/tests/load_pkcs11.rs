//! The load server's HSM with its load masters in a PKCS#11 token: SoftHSM2 from Debian, a
//! token made in a temporary directory (`SOFTHSM2_CONF` of this test process), the masters
//! imported with `headend hsm import`'s code as sensitive and not extractable. The bank and
//! voucher loads, a forged S1, the negative-result procedure and a key update run through
//! the same head end as the software HSM's tests; and a token that is missing, or a wrong
//! PIN, stops the load server at start with a specific message.
//!
//! Needs SoftHSM2 (`scripts/system-setup.sh` installs it).

mod load_support;

use headend::config::HeadendConfig;
use headend::load::token::{self, TokenDef};
use load_support::token::{PIN, new_token, token_alone, use_token};
use load_support::*;
use proto::card::CardFault;
use proto::messages::*;
use proto::purse::AnyMasterKeyFile;

/// The demo head end with its load masters imported into a new token `label`.
async fn start_with_token(label: &str) -> (HeadEnd, TokenDef) {
    let def = new_token(label);
    let d2 = def.clone();
    let (dir, config_path, pin) = demo(move |t| use_token(&t, &d2));
    let keys = dir.path().join("keys/load-keys.toml");
    let file: AnyMasterKeyFile = toml::from_str(&std::fs::read_to_string(&keys).unwrap()).unwrap();
    assert_eq!(
        token::import(&def, &file.clone().into_generations()).unwrap(),
        vec![1]
    );
    assert_eq!(
        token::import(&def, &file.into_generations()).unwrap(),
        Vec::<u8>::new(),
        "a version already in the token is left"
    );
    assert!(
        !token::key_value_readable(&def, 1).unwrap(),
        "the master cannot be read out of the token"
    );
    let cfg = HeadendConfig::load(&config_path).unwrap();
    assert!(cfg.load.as_ref().unwrap().load_keys.is_none());
    let running = headend::assembly::start(&cfg, headend::assembly::Roles::ALL)
        .await
        .unwrap();
    (
        HeadEnd {
            dir,
            cfg,
            config_path,
            running,
            pin,
            pg: None,
            token: Some(def.clone()),
        },
        def,
    )
}

#[tokio::test]
async fn bank_and_voucher_loads_and_refusals_with_the_masters_in_softhsm2() {
    let (he, _def) = start_with_token("loads").await;
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (_, answer) = b.load(bank_source(), 2_000, Some(&he.pin.clone())).await;
    assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
    assert_eq!(b.balance(), 3_000);
    let mut b2 = LoadBox::new(&he, BOX2, 0, 100_000).await;
    let (_, answer) = b2.load(voucher_source("VOUCHER-0002"), 5_000, None).await;
    assert!(matches!(answer, Message::LoadConfirmation(_)), "{answer:?}");
    assert_eq!(b2.balance(), 5_000);

    // A forged S1: refused by the token-derived key, nothing loaded.
    let offer = b.offer(bank_source()).await;
    let mut init = b.init_load(&offer, 100).unwrap();
    init.s1[0] ^= 1;
    let req = b.load_request(&offer, init, 100, Some(&he.pin.clone()));
    let answer = b.call(&Message::LoadRequest(req)).await;
    assert_eq!(error_code(&answer), ErrorCode::BadSignature, "{answer:?}");

    // The negative-result procedure ([0129]–[0132]): the card answers LOAD with a true
    // negative; its zero-value S1 (checked under the token's key) shows it was not loaded.
    b.card.state.fault = Some(CardFault::TrueNegative);
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, 300).unwrap();
    let req = b.load_request(&offer, init, 300, Some(&he.pin.clone()));
    let answer = b.call(&Message::LoadRequest(req)).await;
    let resp = b.run_load(&LoadBox::command(&answer)).unwrap();
    assert!(!resp.is_loaded());
    let zero = b.zero_value(&offer);
    let answer = b
        .call(&LoadBox::response_msg(&offer, Some(resp), Some(zero)))
        .await;
    let Message::LoadConfirmation(c) = &answer else {
        panic!("{answer:?}")
    };
    assert!(!c.loaded, "proved not loaded");
    assert_eq!(b.balance(), 3_000);
    conservation(&he, &mut [&mut b, &mut b2]).await;
    he.running.stop().await;
}

#[tokio::test]
async fn a_missing_token_or_a_wrong_pin_stops_the_load_server_at_start() {
    let def = token_alone("startup");
    let (dir, config_path, _pin) = demo({
        let d = def.clone();
        move |t| use_token(&t, &d)
    });
    let _keep = dir;
    let cfg = HeadendConfig::load(&config_path).unwrap();
    // No key imported yet: said so.
    let e = headend::load::LoadServer::open(&cfg).err().unwrap();
    assert!(
        e.contains("holds no load master") && e.contains("headend hsm import"),
        "{e}"
    );
    // A wrong PIN.
    proto::secret::write_private(&def.pin_file, b"000000").unwrap();
    let e = headend::load::LoadServer::open(&cfg).err().unwrap();
    assert!(e.contains("PIN") && e.contains("wrong"), "{e}");
    proto::secret::write_private(&def.pin_file, PIN.as_bytes()).unwrap();
    // A token label that is not there.
    let mut other = cfg.clone();
    other
        .load
        .as_mut()
        .unwrap()
        .token
        .as_mut()
        .unwrap()
        .token_label = "nowhere".into();
    let e = headend::load::LoadServer::open(&other).err().unwrap();
    assert!(e.contains("no token labelled \"nowhere\""), "{e}");
    // A module that is not there.
    let mut other = cfg.clone();
    other.load.as_mut().unwrap().token.as_mut().unwrap().module = "/nonexistent/libp11.so".into();
    let e = headend::load::LoadServer::open(&other).err().unwrap();
    assert!(e.contains("cannot be loaded"), "{e}");
}

/// openCryptoki's software token, from Debian's `opencryptoki`: unlike SoftHSM2 it locks
/// the user PIN after three wrong logins, so the locked token is a real one here.
mod opencryptoki {
    use std::path::PathBuf;
    use std::process::{Command, Stdio};

    pub const LABEL: &str = "purselink-lock";
    /// The security officer's PIN this test gives the token (the factory one is 87654321).
    const SO_PIN: &str = "13579246";
    const FACTORY_SO_PIN: &str = "87654321";
    pub const PIN: &str = "24681357";

    /// The openCryptoki PKCS#11 library, if installed.
    pub fn module() -> Option<PathBuf> {
        [
            "x86_64-linux-gnu",
            "aarch64-linux-gnu",
            "arm-linux-gnueabihf",
        ]
        .iter()
        .map(|a| PathBuf::from(format!("/usr/lib/{a}/opencryptoki/libopencryptoki.so.0")))
        .find(|p| p.exists())
    }

    fn pkcsconf(args: &[&str], stdin: &str) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new("pkcsconf")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("pkcsconf: {e}"))?;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .map_err(|e| e.to_string())?;
        let out = child.wait_with_output().map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("pkcsconf {args:?}: {text}"))
        }
    }

    /// The software token's slot and its label, from `pkcsconf -t`.
    fn soft_token() -> Result<(String, String), String> {
        let text = pkcsconf(&["-t"], "")?;
        let mut slot = None;
        let mut label = String::new();
        for line in text.lines() {
            if let Some(n) = line
                .strip_prefix("Token #")
                .and_then(|r| r.strip_suffix(" Info:"))
            {
                slot = Some(n.to_string());
            } else if let Some(l) = line.trim().strip_prefix("Label:") {
                label = l.trim().to_string();
            } else if line.contains("IBM SoftTok") {
                return slot
                    .clone()
                    .map(|s| (s, label.clone()))
                    .ok_or_else(|| "a token without a slot number".into());
            }
        }
        Err(format!("no openCryptoki software token in: {text}"))
    }

    fn start_slot_daemon() -> Result<(), String> {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/start-pkcsslotd.sh");
        let out = Command::new("sh")
            .arg(script)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "pkcsslotd: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Puts the software token back to its factory state: openCryptoki 3.8 cannot
    /// re-initialise a token whose SO PIN was changed (`CKR_FUNCTION_FAILED`), so its files
    /// and the slot daemon's shared memory go, and the daemon starts again.
    fn factory_reset() -> Result<(), String> {
        let _ = Command::new("pkill").args(["-x", "pkcsslotd"]).status();
        for _ in 0..40 {
            let running = Command::new("pgrep")
                .args(["-x", "pkcsslotd"])
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !running {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        let tok = std::path::Path::new("/var/lib/opencryptoki/swtok");
        for f in ["NVTOK.DAT", "MK_SO", "MK_USER"] {
            let _ = std::fs::remove_file(tok.join(f));
        }
        if let Ok(objects) = std::fs::read_dir(tok.join("TOK_OBJ")) {
            for o in objects.flatten() {
                let _ = std::fs::remove_file(o.path());
            }
        }
        let _ = std::fs::remove_file("/dev/shm/var.lib.opencryptoki.swtok");
        start_slot_daemon()
    }

    /// The software token, initialised afresh as [`LABEL`] with user PIN [`PIN`] and
    /// nothing in it: its slot id. `Ok(None)`: the token is someone else's (another label):
    /// left alone.
    pub fn fresh_token() -> Result<Option<u64>, String> {
        start_slot_daemon()?;
        let (_, label) = soft_token()?;
        match label.as_str() {
            "IBM OS PKCS#11" => {}
            LABEL => factory_reset()?,
            _ => return Ok(None),
        }
        let (slot, _) = soft_token()?;
        pkcsconf(
            &["-I", "-c", &slot, "-S", FACTORY_SO_PIN],
            &format!("{LABEL}\n"),
        )?;
        pkcsconf(&["-P", "-c", &slot, "-S", FACTORY_SO_PIN, "-n", SO_PIN], "")?;
        pkcsconf(&["-u", "-c", &slot, "-S", SO_PIN, "-n", PIN], "")?;
        slot.parse()
            .map(Some)
            .map_err(|e| format!("slot {slot}: {e}"))
    }
}

/// A PKCS#11 token whose user PIN is locked stops the load server at start, saying so and
/// who can unlock it — shown on openCryptoki's software token, which locks after three
/// wrong PINs (each wrong one is said to be wrong first).
#[test]
fn a_locked_token_pin_stops_the_load_server_at_start() {
    let Some(module) = opencryptoki::module() else {
        panic!(
            "openCryptoki is not installed: run scripts/system-setup.sh (it installs opencryptoki)"
        );
    };
    let slot = match opencryptoki::fresh_token() {
        Ok(Some(slot)) => slot,
        Ok(None) => {
            eprintln!(
                "a_locked_token_pin_stops_the_load_server_at_start: SKIPPED because the openCryptoki software token has another label (someone else's token is left alone)"
            );
            return;
        }
        Err(e) => panic!("openCryptoki's software token: {e}"),
    };
    let pin_file = tempfile::tempdir().unwrap().keep().join("token.pin");
    let def = headend::load::token::TokenDef {
        module,
        token_label: opencryptoki::LABEL.into(),
        pin_file: pin_file.clone(),
        key_label: "purselink-load".into(),
        // cryptoki cannot read openCryptoki 3.8's token information (its clock field):
        // named by slot.
        slot: Some(slot),
    };
    let (dir, config_path, _pin) = demo({
        let d = def.clone();
        move |t| use_token(&t, &d)
    });
    let _keep = dir;
    let cfg = HeadendConfig::load(&config_path).unwrap();
    proto::secret::write_private(&pin_file, b"11112222").unwrap();
    for attempt in 1..=3 {
        let e = headend::load::LoadServer::open(&cfg).err().unwrap();
        assert!(e.contains("is wrong"), "attempt {attempt}: {e}");
    }
    let e = headend::load::LoadServer::open(&cfg).err().unwrap();
    assert!(
        e.contains("PIN is locked") && e.contains("security officer"),
        "{e}"
    );
    // The right PIN no longer opens it.
    proto::secret::write_private(&pin_file, opencryptoki::PIN.as_bytes()).unwrap();
    let e = headend::load::LoadServer::open(&cfg).err().unwrap();
    assert!(e.contains("PIN is locked"), "{e}");
}
