//! Issue 12, case 11: the virtual card through pcscd. Another PC/SC program on the box sends
//! 1- to 4-byte command APDUs to the card `stbd` is using (real pcscd, vsmartcard's vpcd,
//! `vcard attach-vpcd`): each gets `6700`, the reader is not wedged, and `stbd` (its TV UI
//! in tmux, a split head end of real `headend` processes) buys while the program keeps at it
//! and right after. The ISO answers themselves (6700 for every short APDU, 6Cxx for a short
//! Le on READ PURSE) are asserted by
//! `reader-drivers/tests/pcsc_vpcd.rs::short_apdus_and_wrong_le_get_iso_answers_through_pcscd`;
//! this test does not repeat them beyond what it needs.

mod attack;
mod support;

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use attack::deploy::HeadEnd;
use attack::ledger::Ledger;
use reader_drivers::emulator::vpcd::VpcdPortLock;
use support::*;

#[test]
fn short_apdus_from_another_program_do_not_wedge_the_reader_or_stop_a_purchase() {
    if !require_pcscd("card") {
        return;
    }
    let _lock = VpcdPortLock::acquire(VPCD_PORT).expect("vpcd port lock");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let he = HeadEnd::start("card", |_, _| {});
    let bins = bins();
    let card = he.root.join("card.plvc");
    let out = Command::new(&bins.vcard)
        .arg("create")
        .arg("--card")
        .arg(&card)
        .args(["--card-id", "700140", "--balance", "5000"])
        .args(["--currency", "EUR", "--expiry", "2035-12", "--issuer-keys"])
        .arg(he.d.join("issuer-keys.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let _box_cert = he.device("box-000140");
    let box_dir = he.root.join("issued/box-000140");
    wait_reader("card", false);
    let vcard_log = he.logs.join("vcard.log");
    let mut vcard = Proc::spawn(
        "vcard attach-vpcd",
        Command::new(&bins.vcard)
            .arg("attach-vpcd")
            .arg("--card")
            .arg(&card)
            .args(["--port", &VPCD_PORT.to_string()]),
        &vcard_log,
    );
    assert!(
        poll(STEP, || std::fs::read_to_string(&vcard_log)
            .ok()
            .filter(|l| l.contains("card attached")))
        .is_some(),
        "vcard attach-vpcd did not attach"
    );
    wait_reader("card", true);
    let stbd_toml = he.root.join("stbd.toml");
    let stbd_log = he.logs.join("stbd.log");
    proto::secret::write_private(
        &stbd_toml,
        format!(
            "[reader]\nkind = \"pcsc\"\nname = \"{READER}\"\n[headend]\naddress = \"{}\"\n\
             server_name = \"gateway.purselink.test\"\noperator_ca = \"{}\"\ndevice_cert = \"{}\"\n\
             device_key = \"{}\"\n[state]\ndir = \"{}\"\n[ui]\nenabled = true\n\
             provider_name = \"Purselink\"\n[local_api]\nenabled = false\nsocket = \"{}\"\n",
            he.addrs.gateway,
            he.ca_pem().display(),
            box_dir.join("box-000140.crt.pem").display(),
            box_dir.join("box-000140.key.pem").display(),
            he.root.join("stb-state").display(),
            he.root.join("stbd.sock").display(),
        )
        .as_bytes(),
    )
    .unwrap();
    let script = he.root.join("run-stbd.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec env STBD_LOG=info '{}' run --config '{}' 2>>'{}'\n",
            bins.stbd.display(),
            stbd_toml.display(),
            stbd_log.display()
        ),
    )
    .unwrap();
    let tv = Tmux::start("card", &he.root, &format!("sh '{}'", script.display()));
    tv.wait_screen("the home screen with the card", |s| {
        s.contains("Balance") && s.contains("50.00 EUR")
    });
    let cards = [("stbd", card.as_path())];
    let before = Ledger::read(&he, &cards);

    // The other program: short APDUs through pcscd, in a loop, while stbd buys.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let other = std::thread::spawn(move || {
        let ctx = pcsc::Context::establish(pcsc::Scope::User).expect("pcscd");
        let name = std::ffi::CString::new(READER).unwrap();
        let mut card = ctx
            .connect(&name, pcsc::ShareMode::Shared, pcsc::Protocols::ANY)
            .expect("the other program connects (shared)");
        let mut buf = [0u8; 300];
        let mut answers = std::collections::BTreeMap::<String, usize>::new();
        let mut n = 0usize;
        while !s.load(Ordering::Relaxed) {
            for apdu in [
                &[0x09u8][..],
                &[0x80],
                &[0x00, 0xA4],
                &[0x80, 0xB0, 0x00, 0x00],
            ] {
                match card.transmit(apdu, &mut buf) {
                    Ok(r) => {
                        *answers.entry(hex::encode_upper(r)).or_default() += 1;
                        n += 1;
                    }
                    // stbd reset the card (as a PC/SC program may): reconnect, as every
                    // PC/SC program must, and go on.
                    Err(pcsc::Error::ResetCard) => {
                        *answers.entry("reset by stbd".into()).or_default() += 1;
                        card.reconnect(
                            pcsc::ShareMode::Shared,
                            pcsc::Protocols::ANY,
                            pcsc::Disposition::LeaveCard,
                        )
                        .expect("reconnect");
                    }
                    Err(e) => panic!("the reader failed the other program: {e}"),
                }
            }
            std::thread::sleep(Duration::from_millis(40));
        }
        (n, answers)
    });
    std::thread::sleep(Duration::from_millis(300));
    let buy = |what: &str| {
        tv.keys(&["F1"]);
        tv.wait_screen("the catalog", |s| s.contains("Pay-per-view"));
        tv.keys(&["Enter"]);
        tv.wait_screen("the offer", |s| s.contains("Confirm purchase"));
        tv.keys(&["Enter"]);
        let r = tv.wait_screen(what, |s| s.contains("New balance"));
        tv.keys(&["Enter"]);
        tv.wait_screen("home", |s| s.contains("Balance"));
        r
    };
    buy("the receipt of the purchase during the attack");
    stop.store(true, Ordering::Relaxed);
    let (n, answers) = other.join().expect("the other program");
    eprintln!("card: the other program sent {n} short APDUs during the purchase: {answers:?}");
    assert_eq!(
        answers.get("6700"),
        Some(&n),
        "every 1- to 4-byte APDU gets 6700: {answers:?}"
    );
    // The reader still works for every program: a SELECT from another program, then stbd
    // buys again.
    let ctx = pcsc::Context::establish(pcsc::Scope::User).unwrap();
    let c = ctx
        .connect(
            &std::ffi::CString::new(READER).unwrap(),
            pcsc::ShareMode::Shared,
            pcsc::Protocols::ANY,
        )
        .unwrap();
    let mut buf = [0u8; 300];
    let sel = c
        .transmit(&proto::card::commands::select(), &mut buf)
        .unwrap()
        .to_vec();
    assert_eq!(
        &sel[sel.len() - 2..],
        &[0x90, 0x00],
        "SELECT after the attack"
    );
    drop(c);
    buy("the receipt of the purchase right after");
    eprintln!("card: stbd bought during the attack and right after; SELECT still answers 9000");
    drop(tv);
    vcard.stop();
    let after = Ledger::read(&he, &cards);
    assert_eq!(
        after.cards["stbd"].0,
        5_000 - 2 * 499,
        "two purchases on the card"
    );
    assert_eq!(after.security_card.0 - before.security_card.0, 2);
    assert_eq!(after.security_card.1 - before.security_card.1, 2 * 499);
    assert_eq!(after.releases.len() - before.releases.len(), 2);
    drop(rt);
}
