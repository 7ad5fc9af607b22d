//! Issue 18, card to card end to end against the REAL processes: pcscd with vpcd's two
//! readers, each holding a card served by `vcard attach-vpcd`, `headend all-in-one` on
//! SQLite, and two `stbd`, each with its TV UI in its own 80×24 tmux pane. The viewers
//! drive the remotes: the receiver chooses "Receive from another card", types 5.00 and
//! reads the code off the TV; the sender chooses "Send to another card", types the code,
//! sees the amount and the receiving card, and presses OK.
//!
//! Then the boxes' crashes: the sender's `stbd` is SIGKILLed right after its card was
//! debited (the test hook freezes it after journaling R2, before it posts P4), and started
//! again: it resumes from its journal and its card's STATUS, and the value arrives once.
//!
//! Needs pcscd with vsmartcard-vpcd (started by scripts/start-pcscd.sh if it is not
//! running); `PURSELINK_SKIP_PCSC=1` skips. The tests take turns on the vpcd readers.

mod support;

use proto::purse::LogKind;
use support::*;

/// The receiver's card: 20.00 EUR.
const OTHER_CARD: u64 = 700_002;
const OTHER_BALANCE: u64 = 2_000;
const OTHER_BOX: &str = "box-000002";
/// The amount moved: 5.00 EUR.
const AMOUNT: u64 = 500;
const HOOK_AFTER_COMMIT: &str = "pause-after-transfer-committed";

/// The receiver's TV: 6, the amount, OK; the code it shows, digits only.
fn receive(tv: &Tmux, digits: &[&str]) -> String {
    tv.keys(&["6"]);
    tv.wait_screen("the amount entry", |s| {
        s.contains("Receive from another card") && s.contains("Maximum")
    });
    tv.keys(digits);
    tv.keys(&["Enter"]);
    let screen = tv.wait_screen("the code for the sender", |s| {
        s.contains("Tell the sender this code")
    });
    code_on(&screen).unwrap_or_else(|| panic!("no code on the TV:\n{screen}"))
}

/// The code's plain-text line, "dddd dddd", as digits.
fn code_on(screen: &str) -> Option<String> {
    screen.lines().find_map(|l| {
        let t = l.trim_matches(|c: char| c == '║' || c.is_whitespace());
        let (a, b) = t.split_once(' ')?;
        (a.len() == 4 && b.len() == 4 && a.chars().chain(b.chars()).all(|c| c.is_ascii_digit()))
            .then(|| format!("{a}{b}"))
    })
}

/// The sender's TV: 5, the code, OK: the terms, which are returned.
fn join(tv: &Tmux, code: &str) -> String {
    tv.keys(&["5"]);
    tv.wait_screen("the code entry", |s| {
        s.contains("Type the code the receiver's TV shows")
    });
    let digits: Vec<String> = code.chars().map(String::from).collect();
    let keys: Vec<&str> = digits.iter().map(String::as_str).collect();
    tv.keys(&keys);
    tv.keys(&["Enter"]);
    tv.wait_screen("the terms", |s| s.contains("Send this amount?"))
}

#[test]
fn two_boxes_move_5_00_card_to_card_with_their_remotes() {
    let Some(mut w) = World::new("transfer", Options::default()) else {
        return;
    };
    w.start_stbd(None);
    let other = w.other_box(OTHER_BOX, OTHER_CARD, OTHER_BALANCE);

    // The receiver asks for 5.00 and reads the code off its TV.
    let code = receive(&other.tmux, &["5", "0", "0"]);
    // The sender types it and sees what it is about to send, and to which card.
    let terms = join(w.tv(), &code);
    assert!(
        terms.contains("5.00 EUR") && terms.contains(&OTHER_CARD.to_string()),
        "the terms name the amount and the receiving card:\n{terms}"
    );
    w.tv().keys(&["Enter"]);
    let sent = w
        .tv()
        .wait_screen("the sender's receipt", |s| s.contains("Value sent"));
    let received = other
        .tmux
        .wait_screen("the receiver's receipt", |s| s.contains("Value received"));
    assert!(
        sent.contains("5.00 EUR") && sent.contains("45.00 EUR"),
        "{sent}"
    );
    assert!(
        received.contains("5.00 EUR") && received.contains("25.00 EUR"),
        "{received}"
    );

    // Exactly 5.00 moved, and each passbook names the other card.
    let (a, b) = (w.card_state(), other.card_state());
    assert_eq!(a.balance, START_BALANCE - AMOUNT);
    assert_eq!(b.balance, OTHER_BALANCE + AMOUNT);
    let out = a.log.back().expect("the sender's passbook");
    let inn = b.log.back().expect("the receiver's passbook");
    assert_eq!(
        (out.kind, out.amount, out.counterparty),
        (LogKind::TransferOut, AMOUNT, OTHER_CARD)
    );
    assert_eq!(
        (inn.kind, inn.amount, inn.counterparty),
        (LogKind::TransferIn, AMOUNT, CARD_ID)
    );
    assert_eq!(out.signature, inn.signature, "the same R2 on both cards");
    // Both boxes' journals closed the transfer.
    for state in [&w.stbd_state, &other.state] {
        assert_eq!(
            transfer_states(state),
            vec!["transfer_over".to_string()],
            "{}",
            state.display()
        );
    }

    // The receiver cancels with BACK while its code shows: the code is dead, nothing moves.
    other.tmux.keys(&["Enter"]);
    w.tv().keys(&["Enter"]);
    let code = receive(&other.tmux, &["1", "0", "0"]);
    other.tmux.keys(&["BSpace"]);
    other
        .tmux
        .wait_screen("home, cancelled", |s| s.contains("nothing moved"));
    w.tv()
        .wait_screen("the sender's home", |s| s.contains("Send to another card"));
    w.tv().keys(&["5"]);
    w.tv()
        .wait_screen("the code entry", |s| s.contains("Type the code"));
    let digits: Vec<String> = code.chars().map(String::from).collect();
    let keys: Vec<&str> = digits.iter().map(String::as_str).collect();
    w.tv().keys(&keys);
    w.tv().keys(&["Enter"]);
    let refused = w.tv().wait_screen("the dead code refused", |s| {
        s.contains("Something went wrong") || s.contains("not") && !s.contains("Type the code")
    });
    assert!(
        !refused.contains("Send this amount?"),
        "a cancelled transfer's code gives no terms:\n{refused}"
    );
    assert_eq!(w.card_state().balance, START_BALANCE - AMOUNT);
    assert_eq!(other.card_state().balance, OTHER_BALANCE + AMOUNT);
}

#[test]
fn a_sender_box_killed_after_its_card_was_debited_resumes_and_the_value_arrives_once() {
    let Some(mut w) = World::new("transfer-kill", Options::default()) else {
        return;
    };
    w.start_stbd(Some(HOOK_AFTER_COMMIT));
    let other = w.other_box(OTHER_BOX, OTHER_CARD, OTHER_BALANCE);

    let code = receive(&other.tmux, &["5", "0", "0"]);
    join(w.tv(), &code);
    w.tv().keys(&["Enter"]);
    wait_hook(&w, HOOK_AFTER_COMMIT);
    // Debited, R2 journaled, P4 not posted: the box dies.
    assert_eq!(w.card_state().balance, START_BALANCE - AMOUNT);
    assert_eq!(
        transfer_states(&w.stbd_state),
        vec!["transfer_committed".to_string()]
    );
    sigkill_stbd(&w);
    assert_eq!(
        other.card_state().balance,
        OTHER_BALANCE,
        "nothing arrived while the sender was down"
    );

    // Started again (no hook): it finds the debited card's transfer in its journal, posts
    // the P4 the card kept, and the receiver's box, still waiting, is credited.
    w.start_stbd(None);
    other
        .tmux
        .wait_screen("the receiver's receipt", |s| s.contains("Value received"));
    let settled = poll(STEP, || {
        (transfer_states(&w.stbd_state) == vec!["transfer_over".to_string()]).then_some(())
    });
    assert!(
        settled.is_some(),
        "the sender's journal closes the transfer: {:?}\n{}",
        transfer_states(&w.stbd_state),
        tail(&w.stbd_log, 30)
    );
    let (a, b) = (w.card_state(), other.card_state());
    assert_eq!(
        (a.balance, b.balance),
        (START_BALANCE - AMOUNT, OTHER_BALANCE + AMOUNT),
        "moved exactly once"
    );
    assert_eq!(a.sent, None, "the sender's card is settled");
    assert_eq!(b.receiving, None);
}

/// The states of the transfers in a box's journal.
fn transfer_states(state_dir: &std::path::Path) -> Vec<String> {
    let conn = rusqlite::Connection::open(state_dir.join("journal.sqlite")).expect("journal");
    let mut st = conn
        .prepare("SELECT state FROM transfers ORDER BY created_at, rowid")
        .expect("transfers table");
    st.query_map([], |r| r.get(0))
        .expect("query")
        .map(|r| r.expect("row"))
        .collect()
}

/// The sender's `stbd` SIGKILLed after journaling `transfer_committing`, before P2 P3
/// reached its card: nothing was debited. Restarted, it asks its card, finds no transfer
/// to settle and closes its journal; neither card moved.
#[test]
fn a_sender_box_killed_before_its_card_was_debited_closes_the_transfer_with_nothing_moved() {
    let hook = "pause-before-transfer-commit";
    let Some(mut w) = World::new("transfer-kill-early", Options::default()) else {
        return;
    };
    w.start_stbd(Some(hook));
    let other = w.other_box(OTHER_BOX, OTHER_CARD, OTHER_BALANCE);

    let code = receive(&other.tmux, &["5", "0", "0"]);
    join(w.tv(), &code);
    w.tv().keys(&["Enter"]);
    wait_hook(&w, hook);
    assert_eq!(
        transfer_states(&w.stbd_state),
        vec!["transfer_committing".to_string()]
    );
    sigkill_stbd(&w);
    assert_eq!(w.card_state().balance, START_BALANCE, "not debited");

    w.start_stbd(None);
    let closed = poll(STEP, || {
        (transfer_states(&w.stbd_state) == vec!["transfer_over".to_string()]).then_some(())
    });
    assert!(
        closed.is_some(),
        "the sender's journal closes the transfer: {:?}\n{}",
        transfer_states(&w.stbd_state),
        tail(&w.stbd_log, 30)
    );
    let (a, b) = (w.card_state(), other.card_state());
    assert_eq!((a.balance, b.balance), (START_BALANCE, OTHER_BALANCE));
    assert_eq!(a.sent, None);
    // The receiver's card answered P1 and waits for a P4 that will not come: it cancels
    // after ten minutes (stb-flow's MAX_POLLS); it was not credited meanwhile.
    assert!(b.receiving.is_some());
}

/// The third outside attack's F4: the receiver's box dies while its code shows; the sender
/// types the code and confirms, and its box waits for P2 P3 that will not come. BACK on
/// the progress cancels (its card was not debited): home, the journal closed, nothing
/// moved — not ten minutes of "Please wait".
#[test]
fn a_sender_waiting_on_a_vanished_receiver_cancels_with_back() {
    let Some(mut w) = World::new("transfer-back", Options::default()) else {
        return;
    };
    w.start_stbd(None);
    let other = w.other_box(OTHER_BOX, OTHER_CARD, OTHER_BALANCE);
    let code = receive(&other.tmux, &["5", "0", "0"]);
    let pid = other.tmux.pane_pid();
    // SAFETY: kill(2) on the stbd this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(poll(STEP, || other.tmux.pane_dead().then_some(())).is_some());
    join(w.tv(), &code);
    w.tv().keys(&["Enter"]);
    w.tv()
        .wait_screen("the sender's progress", |s| s.contains("Please wait"));
    w.tv().keys(&["BSpace"]);
    let home = w.tv().wait_screen("home, cancelled", |s| {
        s.contains("Send to another card") && s.contains("nothing moved")
    });
    assert!(!home.contains("Please wait"), "{home}");
    let closed = poll(STEP, || {
        (transfer_states(&w.stbd_state) == vec!["transfer_over".to_string()]).then_some(())
    });
    assert!(closed.is_some(), "{:?}", transfer_states(&w.stbd_state));
    assert_eq!(w.card_state().balance, START_BALANCE, "nothing moved");
    assert_eq!(w.card_state().sent, None);
    // The box is free again: the catalog opens and an offer comes.
    w.tv().keys(&["Enter"]);
    w.open_ppv_offer();
}
