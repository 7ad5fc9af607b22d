//! Issue 17, a refund end to end against the REAL processes: pcscd + vpcd with the card
//! served by `vcard attach-vpcd`, `headend all-in-one` on SQLite, `stbd` with its TV UI in
//! an 80×24 tmux pane. The viewer buys an event; the merchant refunds it with `headend
//! refund` (the real binary, on the running head end's journal); at the card's next
//! insertion the box finds the refund due, runs INITIALIZE FOR CREDIT and CREDIT, and the TV
//! shows the refund's receipt. The card is back at its opening balance, credited once (a
//! further insertion credits nothing), and the payment journal holds the refund credited.
//!
//! Needs pcscd with vsmartcard-vpcd (started by scripts/start-pcscd.sh if it is not
//! running); `PURSELINK_SKIP_PCSC=1` skips. The tests take turns on the vpcd reader.

mod support;

use std::process::Command;

use proto::purse::LogKind;
use support::*;

#[test]
fn a_refunded_purchase_is_credited_to_the_card_at_its_next_insertion() {
    let Some(mut w) = World::new(
        "refund",
        Options {
            local_api: false,
            ..Options::default()
        },
    ) else {
        return;
    };
    let home = w.start_stbd(None);
    assert!(home.contains("50.00 EUR"), "opening balance shown:\n{home}");
    w.open_ppv_offer();
    w.tv().keys(&["Enter"]);
    w.tv()
        .wait_screen("the receipt", |s| s.contains("Purchase complete"));
    assert_eq!(w.card_state().balance, START_BALANCE - PPV_PRICE);
    let txns = w.payment_txns();
    assert_eq!(txns.len(), 1);
    let txid = txns[0].transaction_id.clone();
    w.tv().keys(&["Enter"]);

    // The merchant refunds it: the real binary on the running head end's journal.
    let out = Command::new(&bins().headend)
        .arg("refund")
        .arg("--config")
        .arg(w.he.join("headend.toml"))
        .args(["--txid", &txid])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // The card's next insertion credits it, and the TV says so.
    w.remove_card();
    w.insert_card();
    let receipt = w
        .tv()
        .wait_screen("the refund's receipt", |s| s.contains("Refund credited"));
    assert!(receipt.contains("4.99 EUR"), "{receipt}");
    assert!(receipt.contains("50.00 EUR"), "new balance:\n{receipt}");
    assert!(receipt.contains("CABLE"), "{receipt}");
    let card = w.card_state();
    assert_eq!(card.balance, START_BALANCE, "credited back");
    let credits = card
        .log
        .iter()
        .filter(|r| r.kind == LogKind::Credit)
        .count();
    assert_eq!(credits, 1, "{:?}", card.log);
    assert_eq!(w.count_steps("payment", &txid, "credited"), 1);
    w.tv().keys(&["Enter"]);

    // Another insertion: nothing more is due, nothing more is credited.
    w.remove_card();
    w.insert_card();
    w.tv().wait_screen("home", |s| {
        s.contains("Smart card") && s.contains("50.00 EUR")
    });
    std::thread::sleep(std::time::Duration::from_secs(2));
    assert_eq!(w.card_state().balance, START_BALANCE);
    assert_eq!(w.count_steps("payment", &txid, "credited"), 1);
    let log = w.stbd_log();
    assert_eq!(
        log.matches(&format!("credited: [\"{txid}\"]")).count(),
        1,
        "one check credited it; the others found nothing due:\n{}",
        tail(&w.stbd_log, 40)
    );
    assert!(
        log.matches("credited: [] }").count() >= 2,
        "{}",
        tail(&w.stbd_log, 40)
    );
}
