//! Black-box finding 6, end to end: a merchant's catalog entry carrying terminal escape
//! sequences (clear screen, set the window title, colours, CR LF) travels from the real head
//! end (`headend all-in-one`) over QUIC to the real `stbd`, whose TV UI runs in an 80×24 tmux
//! pane. The payload must not act on the terminal (the pane's title stays, the screen is not
//! cleared) and the confirm dialog keeps its price, balance and balance after, with the
//! hostile text shown harmlessly inside it.
//!
//! Needs pcscd with vsmartcard-vpcd, like the other end-to-end tests; `PURSELINK_SKIP_PCSC=1`
//! skips.

mod support;

use support::*;

/// The title the hostile merchant gives the pay-per-view event, as TOML escapes.
const HOSTILE_TITLE: &str =
    r#""Championship Final \u001B[2J\u001B]0;pwn\u0007\u001B[31mFREE MONEY\r\nPress OK\u001B[0m""#;

fn hostile_catalog(toml: &str) -> String {
    let title = format!("title = \"{PPV_TITLE}\"");
    assert!(toml.contains(&title), "the demo catalog has {title}");
    toml.replace(&title, &format!("title = {HOSTILE_TITLE}"))
        .replace(
            "detail = \"Tonight 20:00, channel 101\"",
            r#"detail = "Tonight \u001B[H\u001B[2KINJECTED\u009B31m""#,
        )
}

#[test]
fn hostile_catalog_strings_stay_inside_the_tv_ui() {
    let Some(mut w) = World::new(
        "hostile_text",
        Options {
            headend_edit: Some(hostile_catalog),
            ..Options::default()
        },
    ) else {
        return;
    };
    w.start_stbd(None);
    let tv = w.tv();
    let title = tv.pane_title();
    tv.keys(&["1"]);
    let catalog = tv.wait_screen("the catalog with the event", |s| {
        s.contains("Catalog") && s.contains("Championship Final") && s.contains("4.99 EUR")
    });
    eprintln!("catalog:\n{catalog}");
    // The detail's cursor-home did not move it: it is on the event's own line.
    for r in catalog.lines().filter(|r| r.contains("INJECTED")) {
        assert!(r.contains("Championship Final"), "moved detail:\n{catalog}");
    }
    tv.keys(&["1", "Enter"]);
    let offer = w.wait_offer();
    eprintln!("offer:\n{offer}");
    assert_ne!(tv.pane_title(), "pwn", "the payload set the window title");
    assert_eq!(tv.pane_title(), title);

    let rows: Vec<&str> = offer.lines().collect();
    let top = rows
        .iter()
        .position(|r| r.contains("Confirm purchase"))
        .expect("the dialog's title");
    let bottom = rows
        .iter()
        .position(|r| r.contains('┗'))
        .unwrap_or_else(|| panic!("the dialog's bottom border is gone:\n{offer}"));
    let inside = |y: usize| top < y && y < bottom;
    for (label, value) in [
        ("Price", "4.99 EUR"),
        ("Balance now", "50.00 EUR"),
        ("Balance after", "45.01 EUR"),
    ] {
        let y = rows
            .iter()
            .position(|r| r.contains(label))
            .unwrap_or_else(|| panic!("{label:?} is not on the screen:\n{offer}"));
        assert!(inside(y), "{label:?} outside the dialog:\n{offer}");
        assert!(
            rows[y].contains(value),
            "{label:?} without {value}:\n{offer}"
        );
    }
    // The payload is text, drawn inside the dialog only; the screen around it is still there.
    for (y, _) in rows
        .iter()
        .enumerate()
        .filter(|(_, r)| r.contains("FREE MONEY"))
    {
        assert!(
            inside(y),
            "the payload on row {y}, outside the dialog:\n{offer}"
        );
    }
    assert!(offer.contains("FREE MONEY"), "{offer}");
    assert!(
        offer.contains("Purselink"),
        "the header was cleared:\n{offer}"
    );

    // BACK cancels; nothing moved.
    tv.keys(&["BSpace"]);
    tv.wait_screen("the catalog again", |s| !s.contains("Confirm purchase"));
    assert_eq!(w.card_state().balance, START_BALANCE);
}
