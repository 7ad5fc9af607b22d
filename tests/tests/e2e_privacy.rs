//! Issue 17, the privacy switch end to end against the REAL processes: pcscd + vpcd with
//! the card (which has a PIN) served by `vcard attach-vpcd`, `headend all-in-one` on
//! SQLite, `stbd` with its TV UI in an 80×24 tmux pane. The viewer chooses "Privacy" on
//! the home menu; the card asks for its PIN, a wrong one is refused and counted, the right
//! one turns privacy on; the next purchase goes through, and the payment server's journal
//! files (database and WAL) hold the card's id in no encoding — while a purchase before the
//! switch left it there, so the search can fail.
//!
//! Needs pcscd with vsmartcard-vpcd (started by scripts/start-pcscd.sh if it is not
//! running); `PURSELINK_SKIP_PCSC=1` skips. The tests take turns on the vpcd reader.

mod support;

use support::*;

/// Whether any of the payment server's journal files holds `card_id` as 8 bytes either
/// way round, as postcard's varint, or as decimal or hex text.
fn payment_files_hold(w: &World, card_id: u64) -> Vec<String> {
    let needles = headend::payment::privacy::card_id_encodings(card_id);
    let mut found = Vec::new();
    for e in std::fs::read_dir(w.he.join("state")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("payment.sqlite") {
            continue;
        }
        let bytes = std::fs::read(e.path()).unwrap();
        for (i, n) in needles.iter().enumerate() {
            if bytes.windows(n.len()).any(|x| x == n.as_slice()) {
                found.push(format!("{name} (encoding {i})"));
            }
        }
    }
    found
}

#[test]
fn a_viewer_turns_privacy_on_with_the_remote_and_the_card_is_named_nowhere_in_payment_records() {
    let Some(mut w) = World::new(
        "privacy",
        Options {
            local_api: false,
            card_pin: Some("4711"),
            ..Options::default()
        },
    ) else {
        return;
    };
    let home = w.start_stbd(None);
    assert!(
        home.contains("Privacy: off"),
        "the switch is shown:\n{home}"
    );

    // The switch: the card asks for its PIN; a wrong one is refused.
    w.tv().keys(&["4"]);
    w.tv()
        .wait_screen("the PIN entry", |s| s.contains("Enter your PIN"));
    w.tv().keys(&["1", "1", "1", "1", "Enter"]);
    let wrong = w.tv().wait_screen("wrong PIN", |s| s.contains("Wrong PIN"));
    assert!(
        !w.card_state().privacy,
        "not without the right PIN:\n{wrong}"
    );
    w.tv().keys(&["Enter"]);
    w.tv().wait_screen("home", |s| s.contains("Privacy: off"));
    switch(&w, "4711");
    let on = w
        .tv()
        .wait_screen("privacy on", |s| s.contains("Privacy: ON"));
    assert!(on.contains("payments no longer name your card"), "{on}");
    assert!(w.card_state().privacy, "the card took it");

    // A purchase with privacy on: done as any other, named by pseudonym, and the card id
    // is in none of the payment journal's files.
    buy(&w);
    assert_eq!(w.card_state().balance, START_BALANCE - PPV_PRICE);
    let txns = w.payment_txns();
    assert_eq!(txns.len(), 1);
    assert_ne!(txns[0].card_id, CARD_ID, "named by pseudonym");
    assert_eq!(txns[0].state, headend::payment::PayState::Completed);
    let held = payment_files_hold(&w, CARD_ID);
    assert!(
        held.is_empty(),
        "with privacy on the card's id reached the payment journal: {held:?}"
    );

    // The control: privacy off again (the PIN again), and the next purchase names the card
    // where the search finds it.
    w.tv().wait_screen("home", |s| s.contains("Privacy: ON"));
    switch(&w, "4711");
    w.tv()
        .wait_screen("privacy off", |s| s.contains("Privacy: off"));
    assert!(!w.card_state().privacy);
    buy(&w);
    assert!(w.payment_txns().iter().any(|t| t.card_id == CARD_ID));
    assert!(
        !payment_files_hold(&w, CARD_ID).is_empty(),
        "the search finds a card that did not choose privacy"
    );
}

/// Home: "4  Privacy", the card's PIN, OK.
fn switch(w: &World, pin: &str) {
    w.tv().keys(&["4"]);
    w.tv()
        .wait_screen("the PIN entry", |s| s.contains("Enter your PIN"));
    let digits: Vec<String> = pin.chars().map(String::from).collect();
    let mut keys: Vec<&str> = digits.iter().map(String::as_str).collect();
    keys.push("Enter");
    w.tv().keys(&keys);
}

/// The pay-per-view event, OK, the receipt, back home.
fn buy(w: &World) {
    w.open_ppv_offer();
    w.tv().keys(&["Enter"]);
    w.tv()
        .wait_screen("the receipt", |s| s.contains("Purchase complete"));
    w.tv().keys(&["Enter"]);
}
