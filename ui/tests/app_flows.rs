//! App state machine: every screen transition, through the public daemon-facing API only.

mod common;

use common::*;
use ui::model::*;
use ui::{CancelReason, Intent, RemoteKey, ScreenId, UiEvent, UiUpdate};

fn to_offer(app: &mut ui::App, txid: &str, timeout: u32) {
    assert_eq!(key(app, RemoteKey::Ok), vec![Intent::ShowCatalog]);
    assert_eq!(
        key(app, RemoteKey::Ok),
        vec![Intent::SelectCatalogItem(CatalogId("ppv-1".into()))]
    );
    assert_eq!(app.screen(), ScreenId::Progress);
    assert!(update(app, UiUpdate::Offer(offer(txid, timeout))).is_empty());
    assert_eq!(app.open_offer().map(|(t, _)| t.0.as_str()), Some(txid));
}

#[test]
fn home_menu_opens_each_screen() {
    let mut app = ready_app();
    assert_eq!(app.screen(), ScreenId::Home);
    assert_eq!(
        key(&mut app, RemoteKey::Digit(1)),
        vec![Intent::ShowCatalog]
    );
    assert_eq!(app.screen(), ScreenId::Catalog);
    assert!(key(&mut app, RemoteKey::Back).is_empty());
    assert_eq!(app.screen(), ScreenId::Home);
    assert!(key(&mut app, RemoteKey::Digit(2)).is_empty());
    assert_eq!(app.screen(), ScreenId::LoadSource);
    assert!(key(&mut app, RemoteKey::Back).is_empty());
    assert_eq!(
        key(&mut app, RemoteKey::Digit(3)),
        vec![Intent::ShowHistory]
    );
    assert_eq!(app.screen(), ScreenId::History);
    assert!(key(&mut app, RemoteKey::Menu).is_empty());
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn colour_keys_are_shortcuts() {
    let mut app = ready_app();
    assert_eq!(key(&mut app, RemoteKey::Red), vec![Intent::ShowCatalog]);
    assert_eq!(key(&mut app, RemoteKey::Yellow), vec![Intent::ShowHistory]);
    assert!(key(&mut app, RemoteKey::Green).is_empty());
    assert_eq!(app.screen(), ScreenId::LoadSource);
    assert!(key(&mut app, RemoteKey::Blue).is_empty());
    assert!(
        screen(&app).contains("vpcd 0"),
        "info popup shows the reader"
    );
    // the next key only closes the popup
    assert!(key(&mut app, RemoteKey::Ok).is_empty());
    assert_eq!(app.screen(), ScreenId::LoadSource);
}

#[test]
fn catalog_arrows_and_ok_select_the_item() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Ok);
    key(&mut app, RemoteKey::Down);
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::SelectCatalogItem(CatalogId("ppv-2".into()))]
    );
    // shopping tab
    let mut app = ready_app();
    key(&mut app, RemoteKey::Ok);
    key(&mut app, RemoteKey::Right);
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::SelectCatalogItem(CatalogId("shop-1".into()))]
    );
}

#[test]
fn offer_ok_emits_accept_and_shows_progress() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-1", 30);
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::AcceptOffer(TxId("tx-1".into()))]
    );
    assert_eq!(app.open_offer(), None);
    assert_eq!(app.screen(), ScreenId::Progress);
    // a second OK does not accept again
    assert!(key(&mut app, RemoteKey::Ok).is_empty());
}

#[test]
fn offer_back_emits_cancel_and_touches_nothing() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-2", 30);
    let before = app.card().cloned();
    assert_eq!(
        key(&mut app, RemoteKey::Back),
        vec![Intent::CancelOffer {
            txid: TxId("tx-2".into()),
            reason: CancelReason::Viewer,
        }]
    );
    assert_eq!(app.open_offer(), None);
    assert_eq!(app.card().cloned(), before, "balance untouched");
    assert_eq!(
        app.screen(),
        ScreenId::Catalog,
        "back where the item was chosen"
    );
    assert!(app.notice().is_some_and(|n| n.contains("not charged")));
    assert!(!app.wants_ticks());
    // later ticks do not produce a second cancel
    for _ in 0..40 {
        assert!(app.handle(UiEvent::Tick).is_empty());
    }
}

#[test]
fn offer_ignores_every_other_key() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-3", 30);
    for k in [
        RemoteKey::Digit(1),
        RemoteKey::Up,
        RemoteKey::Down,
        RemoteKey::Left,
        RemoteKey::Menu,
        RemoteKey::Info,
        RemoteKey::Green,
        RemoteKey::Yellow,
        RemoteKey::Blue,
    ] {
        assert!(key(&mut app, k).is_empty(), "{k:?}");
    }
    assert!(app.open_offer().is_some());
    // the red key is a cancel, like BACK
    assert!(matches!(
        key(&mut app, RemoteKey::Red).as_slice(),
        [Intent::CancelOffer {
            reason: CancelReason::Viewer,
            ..
        }]
    ));
}

#[test]
fn offer_times_out_after_its_ticks() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-4", 3);
    assert!(app.wants_ticks());
    assert!(app.handle(UiEvent::Tick).is_empty());
    assert!(app.handle(UiEvent::Tick).is_empty());
    assert_eq!(app.open_offer().map(|(_, s)| s), Some(1));
    // Back on the catalog, its cursor is said again (the daemon may prefetch it anew).
    assert_eq!(
        app.handle(UiEvent::Tick),
        vec![
            Intent::CancelOffer {
                txid: TxId("tx-4".into()),
                reason: CancelReason::Timeout,
            },
            Intent::HighlightCatalogItem(CatalogId("ppv-1".into())),
        ]
    );
    assert_eq!(app.open_offer(), None);
    assert!(app.handle(UiEvent::Tick).is_empty());
    assert_eq!(app.screen(), ScreenId::Catalog);
    assert!(app.notice().is_some_and(|n| n.contains("No answer")));
}

#[test]
fn offer_without_timeout_uses_the_configured_default() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-5", 0);
    assert_eq!(app.open_offer().map(|(_, s)| s), Some(30));
}

#[test]
fn a_new_offer_cancels_the_open_one() {
    let mut app = ready_app();
    to_offer(&mut app, "old", 30);
    assert_eq!(
        update(&mut app, UiUpdate::Offer(offer("new", 30))),
        vec![Intent::CancelOffer {
            txid: TxId("old".into()),
            reason: CancelReason::Superseded,
        }]
    );
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::AcceptOffer(TxId("new".into()))]
    );
}

#[test]
fn withdrawn_offer_closes_without_intent() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-6", 30);
    assert!(update(&mut app, UiUpdate::OfferWithdrawn(TxId("other".into()))).is_empty());
    assert!(app.open_offer().is_some(), "another txid leaves it open");
    assert!(update(&mut app, UiUpdate::OfferWithdrawn(TxId("tx-6".into()))).is_empty());
    assert_eq!(app.open_offer(), None);
}

#[test]
fn progress_ignores_the_remote_then_receipt_updates_balance() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-7", 30);
    key(&mut app, RemoteKey::Ok);
    update(&mut app, UiUpdate::Progress(ProgressStep::DebitingCard));
    for k in [
        RemoteKey::Back,
        RemoteKey::Menu,
        RemoteKey::Red,
        RemoteKey::Ok,
    ] {
        assert!(key(&mut app, k).is_empty());
        assert_eq!(app.screen(), ScreenId::Progress, "{k:?}");
    }
    update(&mut app, UiUpdate::Receipt(receipt()));
    assert_eq!(app.screen(), ScreenId::Receipt);
    assert_eq!(app.card().map(|c| c.balance.minor), Some(3750));
    assert!(key(&mut app, RemoteKey::Ok).is_empty());
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn error_ends_the_offer_without_intent_and_ok_goes_home() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-8", 30);
    let err = UiError {
        kind: ErrorKind::HeadEndUnreachable,
        detail: None,
    };
    assert!(update(&mut app, UiUpdate::Error(err)).is_empty());
    assert_eq!(app.open_offer(), None);
    assert_eq!(app.screen(), ScreenId::Error);
    assert!(key(&mut app, RemoteKey::Ok).is_empty());
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn no_card_error_clears_when_a_card_arrives() {
    let mut app = ready_app();
    update(&mut app, UiUpdate::CardRemoved);
    assert!(app.card().is_none());
    update(
        &mut app,
        UiUpdate::Error(UiError {
            kind: ErrorKind::NoCard,
            detail: None,
        }),
    );
    assert_eq!(app.screen(), ScreenId::Error);
    update(&mut app, UiUpdate::CardInserted(card(100)));
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn load_flow_amount_max_and_pin() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Digit(2));
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::StartLoad {
            source: LoadSource::Bank
        }]
    );
    assert_eq!(app.screen(), ScreenId::LoadWaiting);
    update(&mut app, UiUpdate::LoadMax(eur(5000)));
    assert_eq!(app.screen(), ScreenId::LoadAmount);
    for d in [6, 0, 0] {
        assert!(key(&mut app, RemoteKey::Digit(d)).is_empty());
    }
    // 600 → 6000 minor is over the 5000 maximum: refused
    assert!(key(&mut app, RemoteKey::Digit(0)).is_empty());
    assert!(screen(&app).contains("more than the maximum"));
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::SubmitLoadAmount(600)]
    );
    assert_eq!(app.screen(), ScreenId::Progress);

    let req = PinRequest {
        min_len: 4,
        max_len: 6,
        attempts_left: None,
    };
    update(&mut app, UiUpdate::PinRequest(req));
    assert_eq!(app.screen(), ScreenId::Pin);
    for k in [
        RemoteKey::Digit(2),
        RemoteKey::Up,
        RemoteKey::Digit(4),
        RemoteKey::Red,
        RemoteKey::Digit(6),
        RemoteKey::Digit(8),
    ] {
        assert!(key(&mut app, k).is_empty());
    }
    let out = key(&mut app, RemoteKey::Ok);
    match out.as_slice() {
        [Intent::SubmitPin(pin)] => {
            assert_eq!(pin.expose(), "2468", "only the digits went in");
            assert!(!format!("{out:?}").contains("2468"), "Debug hides the PIN");
        }
        other => panic!("expected SubmitPin, got {other:?}"),
    }
    assert_eq!(app.screen(), ScreenId::Progress);
}

#[test]
fn load_back_and_menu_tell_the_daemon() {
    let mut app = ready_app();
    key(&mut app, RemoteKey::Green);
    key(&mut app, RemoteKey::Digit(2)); // voucher
    update(&mut app, UiUpdate::LoadMax(eur(1000)));
    key(&mut app, RemoteKey::Digit(5));
    assert!(
        key(&mut app, RemoteKey::Back).is_empty(),
        "deletes the digit"
    );
    assert_eq!(key(&mut app, RemoteKey::Back), vec![Intent::CancelLoad]);
    assert_eq!(app.screen(), ScreenId::Home);

    update(&mut app, UiUpdate::LoadMax(eur(1000)));
    assert_eq!(key(&mut app, RemoteKey::Menu), vec![Intent::CancelLoad]);
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn pin_back_on_empty_and_menu_cancel() {
    let mut app = ready_app();
    let req = PinRequest {
        min_len: 4,
        max_len: 4,
        attempts_left: Some(2),
    };
    update(&mut app, UiUpdate::PinRequest(req));
    key(&mut app, RemoteKey::Digit(1));
    assert!(key(&mut app, RemoteKey::Ok).is_empty(), "too short");
    assert!(key(&mut app, RemoteKey::Back).is_empty());
    assert_eq!(key(&mut app, RemoteKey::Back), vec![Intent::CancelPin]);
    update(&mut app, UiUpdate::PinRequest(req));
    assert_eq!(key(&mut app, RemoteKey::Menu), vec![Intent::CancelPin]);
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn history_shows_and_goes_when_the_card_goes() {
    let mut app = ready_app();
    assert_eq!(key(&mut app, RemoteKey::Yellow), vec![Intent::ShowHistory]);
    assert!(screen(&app).contains("Reading the card log"));
    update(&mut app, UiUpdate::History(history()));
    assert!(screen(&app).contains("2025-06-10"));
    key(&mut app, RemoteKey::Down);
    update(&mut app, UiUpdate::CardRemoved);
    assert_eq!(app.screen(), ScreenId::Home);
}

#[test]
fn quit_from_anywhere() {
    let mut app = ready_app();
    to_offer(&mut app, "tx-9", 30);
    assert_eq!(key(&mut app, RemoteKey::Quit), vec![Intent::Quit]);
}

#[test]
fn idle_home_wants_no_ticks() {
    let mut app = ready_app();
    assert!(!app.wants_ticks());
    assert!(app.handle(UiEvent::Tick).is_empty());
    assert!(app.handle(UiEvent::Resize).is_empty());
}

/// A long deterministic stream of arbitrary keys, updates and ticks: nothing panics, and
/// every rendered frame keeps the overscan margin blank.
#[test]
fn arbitrary_event_streams_never_panic() {
    let mut seed: u64 = 0x5eed_1234_abcd_0001;
    let mut next = move |n: u64| {
        // xorshift64*: a fixed sequence, so a failure is reproducible.
        seed ^= seed >> 12;
        seed ^= seed << 25;
        seed ^= seed >> 27;
        seed.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    let keys = [
        RemoteKey::Ok,
        RemoteKey::Back,
        RemoteKey::Up,
        RemoteKey::Down,
        RemoteKey::Left,
        RemoteKey::Right,
        RemoteKey::Menu,
        RemoteKey::Info,
        RemoteKey::Red,
        RemoteKey::Green,
        RemoteKey::Yellow,
        RemoteKey::Blue,
        RemoteKey::Digit(0),
        RemoteKey::Digit(5),
        RemoteKey::Digit(9),
        RemoteKey::Digit(200),
    ];
    let mut app = ready_app();
    let mut accepted = 0;
    for i in 0..4000 {
        let ev = match next(10) {
            0..=5 => UiEvent::Key(keys[next(keys.len() as u64) as usize]),
            6 => UiEvent::Tick,
            _ => UiEvent::Update(match next(12) {
                0 => UiUpdate::Offer(offer(&format!("t{i}"), next(4) as u32)),
                1 => UiUpdate::CardRemoved,
                2 => UiUpdate::CardInserted(card(next(100_000) as i64 - 50)),
                3 => UiUpdate::LoadMax(eur(next(3) as i64 * 5000 - 1)),
                4 => UiUpdate::PinRequest(PinRequest {
                    min_len: next(20) as u8,
                    max_len: next(20) as u8,
                    attempts_left: Some(0),
                }),
                5 => UiUpdate::Progress(ProgressStep::Confirming),
                6 => UiUpdate::Receipt(receipt()),
                7 => UiUpdate::History(if next(2) == 0 { vec![] } else { history() }),
                8 => UiUpdate::CatalogLoaded(if next(2) == 0 {
                    Catalog::default()
                } else {
                    catalog()
                }),
                9 => UiUpdate::Error(UiError {
                    kind: ErrorKind::Other,
                    detail: Some("x".repeat(next(300) as usize)),
                }),
                10 => UiUpdate::OfferWithdrawn(TxId(format!("t{}", i - 1))),
                _ => UiUpdate::Reader(ReaderState::Missing),
            }),
        };
        for intent in app.handle(ev) {
            if let Intent::SubmitLoadAmount(m) = intent {
                assert!(m > 0, "never a zero or negative load");
            }
            if matches!(intent, Intent::AcceptOffer(_)) {
                accepted += 1;
            }
        }
        if i % 7 == 0 {
            let rows = render(&app, 80, 24);
            assert!(
                rows[0].trim().is_empty(),
                "top overscan row blank: {:?}",
                rows[0]
            );
            assert!(
                rows.iter().all(|r| r.chars().take(4).all(|c| c == ' ')),
                "left overscan margin blank at step {i}"
            );
            let _ = render(&app, 20, 6); // tiny terminals draw, clipped, without panicking
        }
    }
    assert!(accepted > 0, "the stream did exercise the offer popup");
}

fn highlight(id: &str) -> Intent {
    Intent::HighlightCatalogItem(CatalogId(id.into()))
}

#[test]
fn highlight_is_said_once_per_item_the_cursor_rests_on() {
    let mut app = ready_app();
    // Opening a loaded catalog: the cursor is on the first item.
    assert_eq!(
        key_all(&mut app, RemoteKey::Red),
        vec![Intent::ShowCatalog, highlight("ppv-1")]
    );
    assert_eq!(key_all(&mut app, RemoteKey::Down), vec![highlight("ppv-2")]);
    // The same item again (a reload of the same catalog): nothing new.
    assert!(update_all(&mut app, UiUpdate::CatalogLoaded(catalog())).is_empty());
    assert_eq!(
        key_all(&mut app, RemoteKey::Right),
        vec![highlight("shop-1")]
    );
    // Down on a one-item tab stays on it: not said again.
    assert!(key_all(&mut app, RemoteKey::Down).is_empty());
    assert_eq!(key_all(&mut app, RemoteKey::Left), vec![highlight("ppv-1")]);
    // Leaving and coming back says it again (the daemon may have dropped its prefetch).
    assert!(key_all(&mut app, RemoteKey::Back).is_empty());
    assert_eq!(
        key_all(&mut app, RemoteKey::Red),
        vec![Intent::ShowCatalog, highlight("ppv-1")]
    );
    // OK chooses the highlighted item; the progress screen says no highlight.
    assert_eq!(
        key_all(&mut app, RemoteKey::Ok),
        vec![Intent::SelectCatalogItem(CatalogId("ppv-1".into()))]
    );
}

#[test]
fn highlight_waits_for_a_catalog_with_items() {
    let mut app = ui::App::new(ui::AppConfig::default());
    assert_eq!(key_all(&mut app, RemoteKey::Red), vec![Intent::ShowCatalog]);
    assert!(update_all(&mut app, UiUpdate::CatalogLoaded(Catalog::default())).is_empty());
    assert_eq!(
        update_all(&mut app, UiUpdate::CatalogLoaded(catalog())),
        vec![highlight("ppv-1")]
    );
}

/// The "Being settled" screen closes when the daemon settles what was in doubt; other
/// error screens stay for the viewer to read.
#[test]
fn a_being_settled_screen_closes_when_recovery_settles() {
    let mut app = ready_app();
    for (kind, closes) in [(ErrorKind::Pending, true), (ErrorKind::WrongPin, false)] {
        update(&mut app, UiUpdate::Error(UiError { kind, detail: None }));
        assert_eq!(app.screen(), ScreenId::Error);
        assert!(update(&mut app, UiUpdate::Settled).is_empty());
        if closes {
            assert_eq!(app.screen(), ScreenId::Home, "{kind:?}");
            assert_eq!(app.notice(), Some(ui::strings::SETTLED));
        } else {
            assert_eq!(app.screen(), ScreenId::Error, "{kind:?}");
        }
    }
}

/// Seed 004's privacy switch: the home menu's fourth entry shows where it stands; choosing
/// it asks the daemon to turn it the other way; a PIN the card asks for goes back home,
/// not to a transaction's progress; the card's answer shows on the home screen.
#[test]
fn the_privacy_switch_turns_privacy_on_with_the_card_s_pin() {
    let mut app = ready_app();
    assert!(
        screen(&app).contains("Privacy: off (turn on)"),
        "{}",
        screen(&app)
    );
    assert_eq!(
        key(&mut app, RemoteKey::Digit(4)),
        vec![Intent::SetPrivacy { on: true }]
    );
    let req = PinRequest {
        min_len: 4,
        max_len: 12,
        attempts_left: None,
    };
    update(&mut app, UiUpdate::PinRequest(req));
    assert_eq!(app.screen(), ScreenId::Pin);
    for d in [4, 7, 1, 1] {
        key(&mut app, RemoteKey::Digit(d));
    }
    let sent = key(&mut app, RemoteKey::Ok);
    assert!(
        matches!(&sent[..], [Intent::SubmitPin(p)] if p.expose() == "4711"),
        "{sent:?}"
    );
    assert_eq!(app.screen(), ScreenId::Home, "no transaction follows");
    update(&mut app, UiUpdate::PrivacyChanged(true));
    let s = screen(&app);
    assert!(s.contains("Privacy: ON (turn off)"), "{s}");
    assert!(s.contains("payments no longer name your card"), "{s}");
    // Chosen again, it turns it off.
    assert_eq!(
        key(&mut app, RemoteKey::Digit(4)),
        vec![Intent::SetPrivacy { on: false }]
    );
    // A wrong PIN on the way ends on the error screen, and the next PIN is a load's again.
    update(&mut app, UiUpdate::PinRequest(req));
    key(&mut app, RemoteKey::Menu);
    update(
        &mut app,
        UiUpdate::Error(UiError {
            kind: ErrorKind::WrongPin,
            detail: None,
        }),
    );
    assert_eq!(app.screen(), ScreenId::Error);
}

#[test]
fn the_privacy_switch_needs_a_card() {
    let mut app = ready_app();
    update(&mut app, UiUpdate::CardRemoved);
    assert!(key(&mut app, RemoteKey::Digit(4)).is_empty());
}

/// Seed 004 card to card, the sender's side: 5 on the home menu, the receiver's code, the
/// terms confirmed with OK; BACK on the terms cancels and the daemon is told.
#[test]
fn sending_to_another_card_takes_the_code_and_confirms_the_terms() {
    let mut app = ready_app();
    assert!(
        screen(&app).contains("Send to another card")
            && screen(&app).contains("Receive from another card"),
        "the home menu offers both sides:\n{}",
        screen(&app)
    );
    assert!(key(&mut app, RemoteKey::Digit(5)).is_empty());
    assert_eq!(app.screen(), ScreenId::Transfer);
    for d in [1, 2, 3, 4, 5, 6, 7] {
        assert!(key(&mut app, RemoteKey::Digit(d)).is_empty());
    }
    assert!(key(&mut app, RemoteKey::Ok).is_empty(), "seven digits");
    assert!(
        screen(&app).contains("The code has 8 digits"),
        "{}",
        screen(&app)
    );
    key(&mut app, RemoteKey::Digit(8));
    assert!(screen(&app).contains("1234 5678"), "{}", screen(&app));
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::JoinTransfer("12345678".into())]
    );
    let terms = TransferTerms {
        amount: eur(500),
        to_card: "700002".into(),
    };
    assert!(update(&mut app, UiUpdate::TransferTerms(terms.clone())).is_empty());
    let s = screen(&app);
    assert!(
        s.contains("Send this amount?") && s.contains("700002"),
        "{s}"
    );
    assert_eq!(key(&mut app, RemoteKey::Ok), vec![Intent::ConfirmTransfer]);
    assert_eq!(app.screen(), ScreenId::Progress);
    assert!(update(&mut app, UiUpdate::Progress(ProgressStep::DebitingCard)).is_empty());
    assert!(screen(&app).contains("Debiting card"), "{}", screen(&app));
    // BACK on a transfer's progress asks the daemon to cancel; the screen stays until the
    // daemon says how it ended.
    assert_eq!(key(&mut app, RemoteKey::Back), vec![Intent::CancelTransfer]);
    assert_eq!(app.screen(), ScreenId::Progress);
    assert!(update(&mut app, UiUpdate::TransferCancelled).is_empty());
    assert_eq!(app.screen(), ScreenId::Home);
    assert!(screen(&app).contains("nothing moved"), "{}", screen(&app));

    // BACK on the terms: cancelled, and said.
    let mut app = ready_app();
    key(&mut app, RemoteKey::Digit(5));
    for _ in 0..8 {
        key(&mut app, RemoteKey::Digit(9));
    }
    key(&mut app, RemoteKey::Ok);
    update(&mut app, UiUpdate::TransferTerms(terms));
    assert_eq!(key(&mut app, RemoteKey::Back), vec![Intent::CancelTransfer]);
    assert_eq!(app.screen(), ScreenId::Home);
    assert!(screen(&app).contains("nothing moved"), "{}", screen(&app));
}

/// The receiver's side: 6, the most the card can take, the amount, the code shown until the
/// sender's card answers; BACK there cancels; a code that comes after MENU is not shown.
#[test]
fn receiving_from_another_card_shows_the_code_until_the_sender_answers() {
    let mut app = ready_app();
    assert_eq!(
        key(&mut app, RemoteKey::Digit(6)),
        vec![Intent::StartReceive]
    );
    assert_eq!(app.screen(), ScreenId::Transfer);
    update(&mut app, UiUpdate::ReceiveMax(eur(2_000)));
    for d in [5, 0, 0] {
        key(&mut app, RemoteKey::Digit(d));
    }
    assert_eq!(
        key(&mut app, RemoteKey::Ok),
        vec![Intent::ReceiveAmount(500)]
    );
    update(
        &mut app,
        UiUpdate::TransferCode {
            code: "48213907".into(),
            amount: eur(500),
        },
    );
    let s = screen(&app);
    assert!(
        s.contains("Tell the sender this code")
            && s.contains("4821 3907")
            && s.contains("5.00 EUR"),
        "{s}"
    );
    // The sender's card answered: progress; BACK asks the daemon to cancel (the card
    // cancels, so a debited sender is credited back), OK does nothing.
    update(&mut app, UiUpdate::Progress(ProgressStep::LoadingCard));
    assert_eq!(app.screen(), ScreenId::Progress);
    assert!(key(&mut app, RemoteKey::Ok).is_empty());
    assert_eq!(key(&mut app, RemoteKey::Back), vec![Intent::CancelTransfer]);
    assert!(screen(&app).contains("Loading card"), "{}", screen(&app));

    // BACK while the code shows cancels; MENU while the card is read cancels too, and the
    // code that comes after is not shown.
    let mut app = ready_app();
    key(&mut app, RemoteKey::Digit(6));
    update(&mut app, UiUpdate::ReceiveMax(eur(2_000)));
    key(&mut app, RemoteKey::Digit(1));
    key(&mut app, RemoteKey::Ok);
    update(
        &mut app,
        UiUpdate::TransferCode {
            code: "11112222".into(),
            amount: eur(1),
        },
    );
    assert_eq!(key(&mut app, RemoteKey::Back), vec![Intent::CancelTransfer]);
    assert_eq!(app.screen(), ScreenId::Home);
    key(&mut app, RemoteKey::Digit(6));
    assert_eq!(key(&mut app, RemoteKey::Menu), vec![Intent::CancelTransfer]);
    update(
        &mut app,
        UiUpdate::TransferCode {
            code: "33334444".into(),
            amount: eur(1),
        },
    );
    assert_eq!(app.screen(), ScreenId::Home);
    assert!(!screen(&app).contains("3333"), "{}", screen(&app));
}
