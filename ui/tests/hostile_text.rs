//! Black-box finding 6: strings that come from the network (offer title, merchant name, item
//! detail, a refusal reason, catalog entries) and the card or reader never reach the terminal
//! with control characters, and a long title cannot push the price or "Balance after" off the
//! confirm dialog. Rendered with ratatui's TestBackend at 80×24, every cell checked.

mod common;

use common::*;
use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ratatui::buffer::Buffer;
use ui::model::*;
use ui::{App, RemoteKey, UiEvent, UiUpdate};

/// The attacker's payload: clear the screen, set the window title, red text, a new line.
const HOSTILE: &str = "\x1b[2J\x1b]0;pwn\x07\x1b[31mFREE MONEY\r\nPress OK\x1b[0m";

fn hostile(prefix: &str) -> String {
    format!("{prefix}{HOSTILE}\u{9b}31m\u{7f}\u{0}\u{202e}evil\u{200b}")
}

fn draw(app: &App) -> Buffer {
    let mut term = Terminal::new(TestBackend::new(80, 24)).unwrap();
    term.draw(|f| app.draw(f)).unwrap();
    term.backend().buffer().clone()
}

/// No cell of the frame holds a control character (C0, DEL, C1 — ESC and CSI among them) or
/// an invisible format character that reorders or hides text.
fn assert_clean(buf: &Buffer, what: &str) {
    for (i, cell) in buf.content.iter().enumerate() {
        let sym = cell.symbol();
        let bad: Vec<char> = sym
            .chars()
            .filter(|&c| {
                c.is_control()
                    || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
            })
            .collect();
        assert!(
            bad.is_empty(),
            "{what}: cell ({}, {}) holds {bad:?} (symbol {sym:?})",
            i % 80,
            i / 80
        );
    }
}

fn text(buf: &Buffer) -> String {
    (0..24)
        .map(|y| (0..80).map(|x| buf[(x, y)].symbol()).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

fn hostile_app() -> App {
    let mut app = App::default();
    let long = "A".repeat(500);
    for u in [
        UiUpdate::Reader(ReaderState::Ready {
            name: hostile("reader "),
        }),
        UiUpdate::CardInserted(CardSummary {
            provider: hostile("Prov ") + &long,
            ..card(5000)
        }),
        UiUpdate::CatalogLoaded(Catalog {
            pay_per_view: vec![CatalogItem {
                id: CatalogId("ppv-1".into()),
                title: hostile("Cup ") + &long,
                price: eur(1250),
                detail: hostile("Sat "),
            }],
            shopping: vec![item("shop-1", &hostile("Remote "), 1995)],
        }),
    ] {
        update(&mut app, u);
    }
    app
}

#[test]
fn hostile_strings_never_reach_the_terminal_raw() {
    let mut app = hostile_app();
    let buf = draw(&app);
    assert_clean(&buf, "home");

    key(&mut app, RemoteKey::Red);
    let buf = draw(&app);
    assert_clean(&buf, "catalog");
    assert!(text(&buf).contains("Cup"), "{}", text(&buf));

    // The offer: a hostile, very long title and merchant; the dialog keeps its price,
    // balance and balance after, and the hostile text stays inside the dialog.
    update(
        &mut app,
        UiUpdate::Offer(Offer {
            item: hostile("OFFERED ") + &"B".repeat(2000),
            merchant: hostile("Kabel ") + &"\n".repeat(50) + &"C".repeat(2000),
            ..offer("t1", 30)
        }),
    );
    let buf = draw(&app);
    assert_clean(&buf, "offer");
    let s = text(&buf);
    let rows: Vec<&str> = s.lines().collect();
    let top = rows
        .iter()
        .position(|r| r.contains("Confirm purchase"))
        .unwrap_or_else(|| panic!("no dialog:\n{s}"));
    let bottom = rows
        .iter()
        .position(|r| r.contains('┗'))
        .unwrap_or_else(|| panic!("the dialog has no bottom border:\n{s}"));
    let inside = |y: usize| top < y && y < bottom;
    // Price, balance and balance after are on the dialog, each on its own line, intact.
    for (label, value) in [
        ("Price", "12.50 EUR"),
        ("Balance now", "50.00 EUR"),
        ("Balance after", "37.50 EUR"),
    ] {
        let y = rows
            .iter()
            .position(|r| r.contains(label))
            .unwrap_or_else(|| panic!("{label:?} is not on the screen:\n{s}"));
        assert!(inside(y), "{label:?} on row {y}, outside the dialog:\n{s}");
        assert!(rows[y].contains(value), "{label:?} without {value}:\n{s}");
    }
    // The offer's hostile text is drawn inside the dialog only.
    for marker in ["OFFERED", "BBBB", "Kabel", "CCCC"] {
        for (y, _) in rows.iter().enumerate().filter(|(_, r)| r.contains(marker)) {
            assert!(inside(y), "{marker:?} on row {y} outside the dialog:\n{s}");
        }
    }
    assert!(s.contains("OFFERED"), "{s}");

    // A refusal reason from the head end on the error screen, and a receipt.
    update(
        &mut app,
        UiUpdate::Error(UiError {
            kind: ErrorKind::Other,
            detail: Some(hostile("refused: ") + &"D".repeat(3000)),
        }),
    );
    assert_clean(&draw(&app), "error");
    key(&mut app, RemoteKey::Ok);
    update(
        &mut app,
        UiUpdate::Receipt(Receipt {
            txid: TxId(hostile("tx ")),
            item: hostile("Cup "),
            merchant: hostile("Kabel "),
            ..receipt()
        }),
    );
    let buf = draw(&app);
    assert_clean(&buf, "receipt");
    assert!(text(&buf).contains("37.50"), "{}", text(&buf));

    // The INFO popup shows the reader's name and the provider.
    key(&mut app, RemoteKey::Ok);
    app.handle(UiEvent::Key(RemoteKey::Info));
    assert_clean(&draw(&app), "info");
}
