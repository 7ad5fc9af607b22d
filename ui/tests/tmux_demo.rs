//! Runs the real `ui-demo` binary in a tmux pane of 80×24, drives it with `tmux send-keys`,
//! reads the screen with `tmux capture-pane -p`, and checks the intent log.
//!
//! Each test uses its own tmux server socket (`-L`), so it never touches anyone's sessions.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

struct Tmux {
    socket: String,
    log: PathBuf,
}

impl Tmux {
    fn start(name: &str, extra: &[&str]) -> Tmux {
        Self::start_cmd(name, extra, false)
    }

    /// Like `start`, and the pane's shell appends `exit status N` to the log when the demo
    /// ends (tmux's own `pane_dead_status` is not always filled in).
    fn start_recording_exit(name: &str, extra: &[&str]) -> Tmux {
        Self::start_cmd(name, extra, true)
    }

    fn start_cmd(name: &str, extra: &[&str], record_exit: bool) -> Tmux {
        let socket = format!("purselink-ui-{name}-{}", std::process::id());
        let log = std::env::temp_dir().join(format!("{socket}.log"));
        let _ = std::fs::remove_file(&log);
        let bin = env!("CARGO_BIN_EXE_ui-demo");
        let mut cmd = format!("{bin} --log {}", log.display());
        for a in extra {
            cmd.push(' ');
            cmd.push_str(a);
        }
        if record_exit {
            cmd = format!("{cmd}; echo \"exit status $?\" >> {}", log.display());
        }
        let t = Tmux { socket, log };
        let out = t.tmux(&[
            "new-session",
            "-d",
            "-s",
            "demo",
            "-x",
            "80",
            "-y",
            "24",
            &cmd,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        t
    }

    fn tmux(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .arg("-L")
            .arg(&self.socket)
            .args(args)
            .env_remove("TMUX")
            .output()
            .expect("tmux runs")
    }

    fn keys(&self, keys: &[&str]) {
        for k in keys {
            let out = self.tmux(&["send-keys", "-t", "demo", k]);
            assert!(out.status.success(), "send-keys {k}: {out:?}");
            // one key per frame, as a remote would; lets the UI redraw between keys
            std::thread::sleep(Duration::from_millis(60));
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.tmux(&["capture-pane", "-p", "-t", "demo"]).stdout)
            .into_owned()
    }

    /// Waits until the screen shows `text`; panics with the last screen after 10 s.
    fn wait_for(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let s = self.screen();
            if s.contains(text) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_for_log(&self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let l = read(&self.log);
            if l.contains(text) {
                return l;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never logged; log:\n{l}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.tmux(&["kill-server"]);
        let _ = std::fs::remove_file(&self.log);
    }
}

fn tmux_available() -> bool {
    Command::new("tmux")
        .arg("-V")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn select_ppv_event_see_offer_press_ok_intent_logged() {
    assert!(tmux_available(), "tmux is required for this test");
    let t = Tmux::start("ok", &["--offer-timeout", "60", "--tick-ms", "200"]);
    let home = t.wait_for("Pay-per-view & shopping");
    assert!(
        home.contains("Kabel Nord") && home.contains("50.00 EUR"),
        "{home}"
    );

    t.keys(&["Enter"]); // home → catalog
    t.wait_for("Cup Final: Nord vs Sued");
    t.keys(&["Enter"]); // choose the first pay-per-view event
    let offer = t.wait_for("Confirm purchase");
    for want in [
        "Price",
        "12.50 EUR",
        "Balance after",
        "37.50 EUR",
        "Cancels itself in",
    ] {
        assert!(
            offer.contains(want),
            "{want:?} missing from the offer popup:\n{offer}"
        );
    }
    t.keys(&["Enter"]); // OK: accept
    let log = t.wait_for_log("AcceptOffer(TxId(\"tx-0001\"))");
    assert!(
        log.contains("SelectCatalogItem(CatalogId(\"ppv-1\"))"),
        "{log}"
    );
    assert!(!log.contains("CancelOffer"), "{log}");
    let receipt = t.wait_for("Purchase complete");
    assert!(receipt.contains("tx-0001"), "{receipt}");
    t.wait_for("37.50 EUR");
}

#[test]
fn back_on_the_offer_cancels_and_leaves_the_balance() {
    assert!(tmux_available(), "tmux is required for this test");
    let t = Tmux::start("back", &["--offer-timeout", "60", "--tick-ms", "200"]);
    t.wait_for("Pay-per-view & shopping");
    t.keys(&["F1"]); // red: catalog
    t.wait_for("Metropolis");
    t.keys(&["Down", "Enter"]);
    t.wait_for("Confirm purchase");
    t.keys(&["Escape"]); // BACK
    let log = t.wait_for_log("CancelOffer");
    assert!(log.contains("reason: Viewer"), "{log}");
    assert!(!log.contains("AcceptOffer"), "{log}");
    let s = t.wait_for("not charged");
    assert!(
        s.contains("50.00 EUR") && !s.contains("Confirm purchase"),
        "{s}"
    );
}

#[test]
fn offer_counts_down_and_cancels_itself() {
    assert!(tmux_available(), "tmux is required for this test");
    // 3 "seconds" of 100 ms each
    let t = Tmux::start("timeout", &["--offer-timeout", "3", "--tick-ms", "100"]);
    t.wait_for("Pay-per-view & shopping");
    t.keys(&["Enter", "Enter"]);
    let log = t.wait_for_log("CancelOffer");
    assert!(log.contains("reason: Timeout"), "{log}");
    t.wait_for("No answer");
}

#[test]
fn pin_is_masked_in_the_real_terminal() {
    assert!(tmux_available(), "tmux is required for this test");
    let t = Tmux::start("pin", &["--tick-ms", "100"]);
    t.wait_for("Pay-per-view & shopping");
    t.keys(&["F2"]); // green: load
    t.wait_for("Bank account");
    t.keys(&["Enter"]);
    t.wait_for("Maximum");
    t.keys(&["2", "0", "0", "0", "Enter"]);
    t.wait_for("Enter your PIN");
    t.keys(&["8", "6", "4", "2"]);
    let s = t.wait_for("*   *   *   *");
    assert!(!s.contains("8642"), "{s}");
    t.keys(&["Enter"]);
    let log = t.wait_for_log("SubmitPin");
    assert!(log.contains("SubmitLoadAmount(2000)"), "{log}");
    assert!(!log.contains("8642"), "PIN leaked into the log:\n{log}");
    t.wait_for("Value loaded");
}

#[test]
fn custom_keymap_and_quit_restore_the_terminal() {
    assert!(tmux_available(), "tmux is required for this test");
    let km = std::env::temp_dir().join(format!("purselink-ui-km-{}.toml", std::process::id()));
    std::fs::write(&km, "[keymap]\nok = \"o\"\nquit = \"q\"\n").expect("write keymap");
    let km_arg = km.display().to_string();
    let t = Tmux::start_recording_exit("keymap", &["--keymap", &km_arg]);
    // keep the pane after the program exits, to see what it left on the terminal
    t.tmux(&["set-option", "-t", "demo", "remain-on-exit", "on"]);
    t.wait_for("Pay-per-view & shopping");
    t.keys(&["Enter"]); // no longer OK: nothing happens
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !t.screen().contains("Shopping channel"),
        "Enter still acted as OK"
    );
    t.keys(&["o"]);
    t.wait_for("Shopping channel");
    t.keys(&["q"]);
    let log = t.wait_for_log("Quit");
    assert!(log.contains("ShowCatalog"), "{log}");
    // the program left the alternate screen: the UI is gone from the pane
    // The demo exits with 0, and has left the alternate screen: the UI is gone from the pane.
    let log = t.wait_for_log("exit status");
    assert!(log.contains("exit status 0"), "{log}");
    let s = t.screen();
    assert!(
        !s.contains("Purselink"),
        "the UI is still on the terminal:\n{s}"
    );
    let _ = std::fs::remove_file(&km);
}
