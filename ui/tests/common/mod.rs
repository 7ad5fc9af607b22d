//! Fixtures shared by the App flow and render tests: a card, a catalog, offers, and helpers
//! to feed events and read the rendered screen.
#![allow(dead_code)] // each test binary uses a different subset

use ratatui::Terminal;
use ratatui::backend::TestBackend;
use ui::model::*;
use ui::{App, AppConfig, Currency, Intent, Money, RemoteKey, UiEvent, UiUpdate};

pub fn eur(minor: i64) -> Money {
    Money::new(minor, Currency::EUR)
}

pub fn card(balance: i64) -> CardSummary {
    CardSummary {
        provider: "Kabel Nord".into(),
        balance: eur(balance),
        expiry: Date::new(2027, 12, 31),
        status: CardStatus::Active,
        points: 0,
        bad_keys: (0, 10),
        privacy: false,
    }
}

pub fn item(id: &str, title: &str, minor: i64) -> CatalogItem {
    CatalogItem {
        id: CatalogId(id.into()),
        title: title.into(),
        price: eur(minor),
        detail: "Sat 20:30".into(),
    }
}

pub fn catalog() -> Catalog {
    Catalog {
        pay_per_view: vec![
            item("ppv-1", "Cup Final", 1250),
            item("ppv-2", "Metropolis", 499),
        ],
        shopping: vec![item("shop-1", "Spare remote", 1995)],
    }
}

pub fn offer(txid: &str, timeout: u32) -> Offer {
    Offer {
        txid: TxId(txid.into()),
        item: "Cup Final".into(),
        merchant: "Kabel Nord PPV".into(),
        price: eur(1250),
        balance: eur(5000),
        balance_after: eur(3750),
        timeout_secs: timeout,
    }
}

pub fn receipt() -> Receipt {
    Receipt {
        txid: TxId("tx-0001".into()),
        kind: TxKind::Purchase,
        item: "Cup Final".into(),
        merchant: "Kabel Nord PPV".into(),
        amount: eur(1250),
        balance_after: eur(3750),
        date: Date::new(2025, 6, 14),
    }
}

pub fn history() -> Vec<HistoryEntry> {
    vec![
        HistoryEntry {
            date: Date::new(2025, 6, 10),
            kind: TxKind::Purchase,
            amount: eur(499),
            balance_after: eur(5000),
        },
        HistoryEntry {
            date: Date::new(2025, 6, 1),
            kind: TxKind::Load,
            amount: eur(5000),
            balance_after: eur(5499),
        },
    ]
}

/// An app with a reader, a card of 50.00 EUR and the catalog, on the home screen.
pub fn ready_app() -> App {
    let mut app = App::new(AppConfig {
        offer_timeout_secs: 30,
    });
    for u in [
        UiUpdate::Reader(ReaderState::Ready {
            name: "vpcd 0".into(),
        }),
        UiUpdate::CardInserted(card(5000)),
        UiUpdate::CatalogLoaded(catalog()),
    ] {
        assert!(app.handle(UiEvent::Update(u)).is_empty());
    }
    app
}

/// The intents a key gives, apart from the catalog's highlight reports
/// ([`Intent::HighlightCatalogItem`], which `app_flows::highlight_*` check with [`key_all`]).
pub fn key(app: &mut App, k: RemoteKey) -> Vec<Intent> {
    without_highlights(key_all(app, k))
}

/// Every intent a key gives.
pub fn key_all(app: &mut App, k: RemoteKey) -> Vec<Intent> {
    app.handle(UiEvent::Key(k))
}

/// The intents an update gives, apart from highlight reports (see [`key`]).
pub fn update(app: &mut App, u: UiUpdate) -> Vec<Intent> {
    without_highlights(update_all(app, u))
}

/// Every intent an update gives.
pub fn update_all(app: &mut App, u: UiUpdate) -> Vec<Intent> {
    app.handle(UiEvent::Update(u))
}

fn without_highlights(intents: Vec<Intent>) -> Vec<Intent> {
    intents
        .into_iter()
        .filter(|i| !matches!(i, Intent::HighlightCatalogItem(_)))
        .collect()
}

/// Renders at `w`×`h` and returns the screen as lines of text.
pub fn render(app: &App, w: u16, h: u16) -> Vec<String> {
    let mut term = Terminal::new(TestBackend::new(w, h)).expect("test backend");
    term.draw(|f| app.draw(f)).expect("draw");
    let buf = term.backend().buffer();
    (0..h)
        .map(|y| (0..w).map(|x| buf[(x, y)].symbol()).collect::<String>())
        .collect()
}

pub fn screen(app: &App) -> String {
    render(app, 80, 24).join("\n")
}
