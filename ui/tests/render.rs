//! Render tests with ratatui's TestBackend at 80×24 (the Linux console): key strings are on
//! screen, PIN digits are not, and the overscan margins stay empty.

mod common;

use common::*;
use ui::model::*;
use ui::{App, RemoteKey, UiEvent, UiUpdate};

fn assert_on(s: &str, needles: &[&str]) {
    for n in needles {
        assert!(s.contains(n), "{n:?} not on screen:\n{s}");
    }
}

fn assert_margins_blank(app: &App) {
    let rows = render(app, 80, 24);
    assert!(rows[0].trim().is_empty(), "top row: {:?}", rows[0]);
    assert!(rows[23].trim().is_empty(), "bottom row: {:?}", rows[23]);
    for r in &rows {
        let left: String = r.chars().take(4).collect();
        let right: String = r.chars().skip(76).collect();
        assert_eq!(left.trim(), "", "left margin in {r:?}");
        assert_eq!(right.trim(), "", "right margin in {r:?}");
    }
}

#[test]
fn home_shows_card_balance_and_menu() {
    let app = ready_app();
    let s = screen(&app);
    assert_on(
        &s,
        &[
            "Kabel Nord",
            "50.00 EUR",
            "Balance",
            "ready",
            "2027-12-31",
            "Pay-per-view & shopping",
            "Load value",
            "Card history",
        ],
    );
    // the big digits are there: block characters on screen
    assert!(s.contains('█'), "{s}");
    assert_margins_blank(&app);
}

/// The points (002) and the bad-signature count (seed 004) show when non-zero, and not
/// otherwise.
#[test]
fn home_shows_points_and_the_bad_signature_count_when_there_are_any() {
    let app = ready_app();
    let s = screen(&app);
    assert!(
        !s.contains("Points") && !s.contains("Bad signatures"),
        "{s}"
    );
    let mut app = ready_app();
    update(
        &mut app,
        UiUpdate::CardInserted(CardSummary {
            points: 30_000,
            bad_keys: (2, 10),
            privacy: false,
            ..card(5000)
        }),
    );
    assert_on(
        &screen(&app),
        &["Points", "30000", "Bad signatures: 2 of 10", "50.00 EUR"],
    );
    assert_margins_blank(&app);
}

/// An authentication (002 FIG. 16) offer: "Claim with your card", no charge, the balance
/// kept.
#[test]
fn an_authentication_offer_says_no_charge() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Ok);
    key(&mut app, RemoteKey::Ok);
    let auth = ui::money::Money::new(0, ui::money::Currency::AUTHENTICATION);
    update(
        &mut app,
        UiUpdate::Offer(Offer {
            price: auth,
            balance_after: eur(5000),
            ..offer("tx-1", 30)
        }),
    );
    let s = screen(&app);
    assert_on(&s, &["Claim with your card", "no charge", "50.00 EUR"]);
    assert!(!s.contains("Confirm purchase"), "{s}");
}

#[test]
fn home_without_card_or_reader_says_so() {
    let mut app = App::default();
    assert_on(&screen(&app), &["Starting"]);
    update(&mut app, UiUpdate::Reader(ReaderState::Missing));
    assert_on(&screen(&app), &["No card reader connected"]);
    update(
        &mut app,
        UiUpdate::Reader(ReaderState::Ready { name: "r".into() }),
    );
    assert_on(&screen(&app), &["Please insert your card"]);
}

#[test]
fn catalog_lists_titles_and_prices() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Ok);
    let s = screen(&app);
    assert_on(
        &s,
        &[
            "Pay-per-view",
            "Shopping channel",
            "Cup Final",
            "12.50 EUR",
            "4.99 EUR",
        ],
    );
    assert!(!s.contains("Spare remote"));
    key(&mut app, RemoteKey::Right);
    assert_on(&screen(&app), &["Spare remote", "19.95 EUR"]);
    assert_margins_blank(&app);
}

#[test]
fn offer_popup_shows_price_balances_and_countdown() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Ok);
    key(&mut app, RemoteKey::Ok);
    update(&mut app, UiUpdate::Offer(offer("tx-1", 30)));
    let s = screen(&app);
    assert_on(
        &s,
        &[
            "Confirm purchase",
            "Cup Final",
            "Kabel Nord PPV",
            "12.50 EUR",
            "Balance now",
            "50.00 EUR",
            "Balance after",
            "37.50 EUR",
            "Cancels itself in 30 s",
            "OK",
            "pay",
            "BACK",
            "cancel",
        ],
    );
    app.handle(UiEvent::Tick);
    app.handle(UiEvent::Tick);
    assert_on(&screen(&app), &["Cancels itself in 28 s"]);
    assert_margins_blank(&app);
}

#[test]
fn pin_is_masked_on_screen() {
    let mut app = ready_app();
    update(
        &mut app,
        UiUpdate::PinRequest(PinRequest {
            min_len: 4,
            max_len: 6,
            attempts_left: Some(3),
        }),
    );
    for d in [9, 7, 3, 1] {
        key(&mut app, RemoteKey::Digit(d));
    }
    let s = screen(&app);
    assert_on(
        &s,
        &[
            "Enter your PIN",
            "*   *   *   *   _   _",
            "Attempts left: 3",
        ],
    );
    for leak in ["9731", "9 7 3 1", "9   7   3   1"] {
        assert!(!s.contains(leak), "PIN visible as {leak:?}:\n{s}");
    }
    // no single typed digit appears inside the PIN box row either
    let row = s.lines().find(|l| l.contains("*   *")).unwrap_or_default();
    assert!(!row.chars().any(|c| c.is_ascii_digit()), "{row}");
}

#[test]
fn load_amount_shows_max_and_refusal() {
    let mut app = ready_app();
    update(&mut app, UiUpdate::LoadMax(eur(2000)));
    assert_on(
        &screen(&app),
        &["Load value", "Maximum", "20.00 EUR", "BACK deletes"],
    );
    for d in [3, 0, 0, 0] {
        key(&mut app, RemoteKey::Digit(d));
    }
    assert_on(&screen(&app), &["more than the maximum of 20.00 EUR"]);
    assert_margins_blank(&app);
}

#[test]
fn progress_names_the_current_step() {
    let mut app = ready_app();
    update(&mut app, UiUpdate::Progress(ProgressStep::ContactingServer));
    let s = screen(&app);
    assert_on(
        &s,
        &[
            "Reading card",
            "Contacting payment server...",
            "Debiting card",
            "Confirming",
            "[x]",
            "Do not remove your card",
        ],
    );
}

#[test]
fn receipt_shows_amount_and_reference() {
    let mut app = ready_app();
    update(&mut app, UiUpdate::Receipt(receipt()));
    assert_on(
        &screen(&app),
        &[
            "Purchase complete",
            "Cup Final",
            "12.50 EUR",
            "New balance",
            "tx-0001",
            "2025-06-14",
        ],
    );
}

#[test]
fn history_table_and_chart() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Yellow);
    update(&mut app, UiUpdate::History(history()));
    let s = screen(&app);
    assert_on(
        &s,
        &[
            "Card history",
            "Date",
            "Balance",
            "2025-06-10",
            "Purchase",
            "-4.99 EUR",
            "+50.00 EUR",
            "Recent spending",
            "06-10",
        ],
    );
    assert_margins_blank(&app);
    update(&mut app, UiUpdate::History(vec![]));
    assert_on(&screen(&app), &["No transactions"]);
}

#[test]
fn every_error_says_what_happened_and_what_to_do() {
    use ErrorKind::*;
    for kind in [
        NoReader,
        NoCard,
        CardBlocked,
        CardExpired,
        OfferExpired,
        InsufficientValue,
        HeadEndUnreachable,
        Timeout,
        AmountMismatch,
        Other,
    ] {
        let mut app = ready_app();
        update(
            &mut app,
            UiUpdate::Error(UiError {
                kind,
                detail: Some("REF-42".into()),
            }),
        );
        let (title, happened, todo) = ui::strings::error_texts(kind);
        assert_on(&screen(&app), &[title, happened, todo, "REF-42"]);
    }
}

/// A points redemption's and an authentication's receipts: the new balance in points, and
/// an authentication headed as one, its money balance kept.
#[test]
fn receipts_for_points_and_authentications() {
    let pts = ui::money::Currency::new(0, 0);
    let mut app = ready_app();
    update(
        &mut app,
        UiUpdate::Receipt(Receipt {
            amount: ui::money::Money::new(20_000, pts),
            balance_after: ui::money::Money::new(10_000, pts),
            ..receipt()
        }),
    );
    let s = screen(&app);
    assert_on(
        &s,
        &["Purchase complete", "20000 PTS", "New balance", "PTS"],
    );
    assert!(!s.contains("#000"), "{s}");
    update(
        &mut app,
        UiUpdate::Receipt(Receipt {
            amount: ui::money::Money::new(0, ui::money::Currency::AUTHENTICATION),
            balance_after: eur(5000),
            ..receipt()
        }),
    );
    let s = screen(&app);
    assert_on(&s, &["Card authenticated", "no charge", "New balance"]);
    assert!(!s.contains("Purchase complete"), "{s}");
}
