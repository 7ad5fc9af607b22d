//! The `App` state machine: one `UiEvent` in, zero or more `Intent`s out; `draw` renders the
//! current state. Sans-IO: no terminal, clock, card or socket in here.
//!
//! This file owns screen transitions and the rules that cut across screens (modal popups,
//! MENU/colour shortcuts, what a daemon update does to the current screen). Each screen's own
//! keys and layout live in `components/` and `popups/`.

use crate::components::catalog::{CatalogAction, CatalogView};
use crate::components::history::HistoryView;
use crate::components::home::{Home, MenuEntry};
use crate::components::load::{LoadAction, LoadView};
use crate::components::pin::{PinAction, PinEntry};
use crate::components::progress::Progress;
use crate::components::transfer::{TransferAction, TransferView};
use crate::components::{self, COLOUR_HINTS, Hint};
use crate::event::{CancelReason, Intent, UiEvent, UiUpdate};
use crate::keymap::RemoteKey;
use crate::model::*;
use crate::popups::info;
use crate::popups::offer::{OfferAction, OfferPopup};
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, Paragraph};

/// Settings the daemon passes from its config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppConfig {
    /// Offer timeout when the offer itself says 0.
    pub offer_timeout_secs: u32,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            offer_timeout_secs: 30,
        }
    }
}

/// Which screen is showing, for the daemon's logs and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScreenId {
    Home,
    Catalog,
    LoadSource,
    LoadWaiting,
    LoadAmount,
    Pin,
    Progress,
    Receipt,
    History,
    Error,
    /// Card to card: either side, until the progress screen.
    Transfer,
}

#[derive(Debug)]
enum Screen {
    Home,
    Catalog,
    Load(LoadView),
    Pin(PinEntry),
    Progress(Progress),
    Receipt(Receipt),
    History,
    Error(UiError),
    Transfer(TransferView),
}

/// The TV UI. Feed it every event with [`App::handle`]; draw it after each with [`App::draw`].
#[derive(Debug)]
pub struct App {
    cfg: AppConfig,
    card: Option<CardSummary>,
    reader: ReaderState,
    catalog: Option<Catalog>,
    history: Option<Vec<HistoryEntry>>,
    screen: Screen,
    home: Home,
    catalog_view: CatalogView,
    history_view: HistoryView,
    offer: Option<OfferPopup>,
    info_open: bool,
    /// A one-line message under the screen (e.g. "purchase cancelled"); cleared by the next key.
    notice: Option<&'static str>,
    ticks: u64,
    /// The catalog item last said in [`Intent::HighlightCatalogItem`].
    highlight_said: Option<CatalogId>,
    /// What the PIN entry is for: a load's bank PIN, or the card's PIN for a purchase
    /// above its threshold (seed 004); the progress after it says so.
    pin_for: TxKind,
    /// The privacy switch was chosen and the daemon has not answered yet: a PIN asked now
    /// is the card's, for the switch, and no transaction follows it.
    privacy_asked: bool,
}

impl Default for App {
    fn default() -> Self {
        Self::new(AppConfig::default())
    }
}

impl App {
    pub fn new(cfg: AppConfig) -> Self {
        App {
            cfg,
            card: None,
            reader: ReaderState::Unknown,
            catalog: None,
            history: None,
            screen: Screen::Home,
            pin_for: TxKind::Load,
            privacy_asked: false,
            home: Home::default(),
            catalog_view: CatalogView::default(),
            highlight_said: None,
            history_view: HistoryView::default(),
            offer: None,
            info_open: false,
            notice: None,
            ticks: 0,
        }
    }

    pub fn screen(&self) -> ScreenId {
        match &self.screen {
            Screen::Home => ScreenId::Home,
            Screen::Catalog => ScreenId::Catalog,
            Screen::Load(LoadView::Source { .. }) => ScreenId::LoadSource,
            Screen::Load(LoadView::Waiting) => ScreenId::LoadWaiting,
            Screen::Load(LoadView::Amount { .. }) => ScreenId::LoadAmount,
            Screen::Pin(_) => ScreenId::Pin,
            Screen::Progress(_) => ScreenId::Progress,
            Screen::Receipt(_) => ScreenId::Receipt,
            Screen::History => ScreenId::History,
            Screen::Error(_) => ScreenId::Error,
            Screen::Transfer(_) => ScreenId::Transfer,
        }
    }

    /// The offer waiting for OK/BACK, and its seconds left.
    pub fn open_offer(&self) -> Option<(&TxId, u32)> {
        self.offer.as_ref().map(|o| (o.txid(), o.remaining()))
    }

    pub fn card(&self) -> Option<&CardSummary> {
        self.card.as_ref()
    }

    pub fn notice(&self) -> Option<&'static str> {
        self.notice
    }

    /// Whether `Tick`s change anything now (a countdown or a spinner is showing). A daemon can
    /// run its one-second timer only while this is true, so an idle box has no wakeups.
    pub fn wants_ticks(&self) -> bool {
        self.offer.is_some() || matches!(self.screen, Screen::Progress(_))
    }

    pub fn handle(&mut self, ev: UiEvent) -> Vec<Intent> {
        let mut out = match ev {
            UiEvent::Key(k) => self.on_key(k),
            UiEvent::Update(u) => self.on_update(u),
            UiEvent::Tick => self.on_tick(),
            UiEvent::Resize => Vec::new(),
        };
        self.report_highlight(&mut out);
        out
    }

    /// Says [`Intent::HighlightCatalogItem`] when the catalog shows and its cursor is on an
    /// item other than the one last said; leaving the catalog forgets it.
    fn report_highlight(&mut self, out: &mut Vec<Intent>) {
        let now = match self.screen {
            Screen::Catalog if self.offer.is_none() => self
                .catalog_view
                .highlighted(self.catalog.as_ref())
                .cloned(),
            _ => None,
        };
        if now != self.highlight_said {
            if let Some(id) = &now {
                out.push(Intent::HighlightCatalogItem(id.clone()));
            }
            self.highlight_said = now;
        }
    }

    fn on_tick(&mut self) -> Vec<Intent> {
        self.ticks = self.ticks.wrapping_add(1);
        if let Some(popup) = self.offer.as_mut() {
            if popup.tick() {
                let txid = popup.txid().clone();
                self.close_offer_cancelled();
                self.notice = Some(strings::OFFER_TIMED_OUT);
                return vec![Intent::CancelOffer {
                    txid,
                    reason: CancelReason::Timeout,
                }];
            }
        }
        Vec::new()
    }

    /// After a cancelled or withdrawn offer: back to where the viewer chose it.
    fn close_offer_cancelled(&mut self) {
        self.offer = None;
        if matches!(self.screen, Screen::Progress(_)) {
            self.screen = if self.catalog.is_some() {
                Screen::Catalog
            } else {
                Screen::Home
            };
        }
    }

    /// Screens from which MENU and the colour keys may leave without telling the daemon.
    fn is_browsing(&self) -> bool {
        matches!(
            self.screen,
            Screen::Home
                | Screen::Catalog
                | Screen::History
                | Screen::Receipt(_)
                | Screen::Error(_)
                | Screen::Load(LoadView::Source { .. })
        )
    }

    fn on_key(&mut self, key: RemoteKey) -> Vec<Intent> {
        if key == RemoteKey::Quit {
            return vec![Intent::Quit];
        }
        self.notice = None;
        if self.info_open {
            self.info_open = false;
            return Vec::new();
        }
        if let Some(popup) = &self.offer {
            return match popup.handle(key) {
                Some(OfferAction::Accept(txid)) => {
                    self.offer = None;
                    let step = match &self.screen {
                        Screen::Progress(p) => p.step,
                        _ => None,
                    };
                    self.screen = Screen::Progress(Progress {
                        kind: TxKind::Purchase,
                        step,
                    });
                    vec![Intent::AcceptOffer(txid)]
                }
                Some(OfferAction::Cancel(txid)) => {
                    self.close_offer_cancelled();
                    self.notice = Some(strings::OFFER_CANCELLED);
                    vec![Intent::CancelOffer {
                        txid,
                        reason: CancelReason::Viewer,
                    }]
                }
                None => Vec::new(),
            };
        }
        if key == RemoteKey::Info || (key == RemoteKey::Blue && self.is_browsing()) {
            self.info_open = true;
            return Vec::new();
        }
        if key == RemoteKey::Menu {
            return self.go_home_from_anywhere();
        }
        if self.is_browsing() {
            match key {
                RemoteKey::Red => return self.open(MenuEntry::Catalog),
                RemoteKey::Green => return self.open(MenuEntry::Load),
                RemoteKey::Yellow => return self.open(MenuEntry::History),
                _ => {}
            }
        }
        match &mut self.screen {
            Screen::Home => match self.home.handle(key) {
                Some(entry) => self.open(entry),
                None => Vec::new(),
            },
            Screen::Catalog => match self.catalog_view.handle(key, self.catalog.as_ref()) {
                Some(CatalogAction::Select(id)) => {
                    self.screen = Screen::Progress(Progress {
                        kind: TxKind::Purchase,
                        step: None,
                    });
                    vec![Intent::SelectCatalogItem(id)]
                }
                Some(CatalogAction::Back) => {
                    self.screen = Screen::Home;
                    Vec::new()
                }
                None => Vec::new(),
            },
            Screen::Load(view) => match view.handle(key) {
                Some(LoadAction::Start(source)) => vec![Intent::StartLoad { source }],
                Some(LoadAction::Submit(minor)) => {
                    self.screen = Screen::Progress(Progress {
                        kind: TxKind::Load,
                        step: None,
                    });
                    vec![Intent::SubmitLoadAmount(minor)]
                }
                Some(LoadAction::Leave) => {
                    self.screen = Screen::Home;
                    Vec::new()
                }
                Some(LoadAction::Cancel) => {
                    self.screen = Screen::Home;
                    vec![Intent::CancelLoad]
                }
                None => Vec::new(),
            },
            Screen::Pin(entry) => match entry.handle(key) {
                // The switch's PIN: the card answers at once, no transaction follows.
                Some(PinAction::Submit(pin)) if self.privacy_asked => {
                    self.screen = Screen::Home;
                    vec![Intent::SubmitPin(pin)]
                }
                Some(PinAction::Submit(pin)) => {
                    self.screen = Screen::Progress(Progress {
                        kind: self.pin_for,
                        step: None,
                    });
                    vec![Intent::SubmitPin(pin)]
                }
                Some(PinAction::Cancel) => {
                    self.screen = Screen::Home;
                    self.privacy_asked = false;
                    vec![Intent::CancelPin]
                }
                None => Vec::new(),
            },
            // A transfer waiting on the other box: BACK asks the daemon to cancel what can
            // still be cancelled (before the sender's card is debited, or the receiver's
            // card cancels); the daemon ends the screen.
            Screen::Progress(p)
                if key == RemoteKey::Back
                    && matches!(p.kind, TxKind::TransferOut | TxKind::TransferIn) =>
            {
                self.notice = Some(strings::TRANSFER_CANCELLING);
                vec![Intent::CancelTransfer]
            }
            // A transaction in flight: the daemon ends this screen, not the remote.
            Screen::Progress(_) => Vec::new(),
            Screen::Receipt(_) | Screen::Error(_) => {
                if matches!(key, RemoteKey::Ok | RemoteKey::Back) {
                    self.screen = Screen::Home;
                }
                Vec::new()
            }
            Screen::Transfer(view) => match view.handle(key) {
                Some(TransferAction::Receive(minor)) => {
                    *view = TransferView::ReceiveWaiting;
                    vec![Intent::ReceiveAmount(minor)]
                }
                Some(TransferAction::Join(code)) => vec![Intent::JoinTransfer(code)],
                Some(TransferAction::Confirm) => {
                    self.screen = Screen::Progress(Progress {
                        kind: TxKind::TransferOut,
                        step: None,
                    });
                    vec![Intent::ConfirmTransfer]
                }
                Some(TransferAction::Leave) => {
                    self.screen = Screen::Home;
                    Vec::new()
                }
                Some(TransferAction::Cancel) => {
                    self.screen = Screen::Home;
                    self.notice = Some(strings::TRANSFER_CANCELLED);
                    vec![Intent::CancelTransfer]
                }
                None => Vec::new(),
            },
            Screen::History => {
                let len = self.history.as_ref().map_or(0, Vec::len);
                if self.history_view.handle(key, len) {
                    self.screen = Screen::Home;
                }
                Vec::new()
            }
        }
    }

    /// MENU: home, telling the daemon when that abandons something it started.
    fn go_home_from_anywhere(&mut self) -> Vec<Intent> {
        let intents = match &self.screen {
            Screen::Progress(_) => return Vec::new(),
            Screen::Pin(_) => vec![Intent::CancelPin],
            Screen::Load(LoadView::Waiting | LoadView::Amount { .. }) => vec![Intent::CancelLoad],
            Screen::Transfer(v) if v.daemon_asked() => vec![Intent::CancelTransfer],
            _ => Vec::new(),
        };
        self.screen = Screen::Home;
        self.privacy_asked = false;
        intents
    }

    fn open(&mut self, entry: MenuEntry) -> Vec<Intent> {
        match entry {
            MenuEntry::Catalog => {
                self.screen = Screen::Catalog;
                vec![Intent::ShowCatalog]
            }
            MenuEntry::Load => {
                self.screen = Screen::Load(LoadView::new());
                Vec::new()
            }
            MenuEntry::History => {
                self.screen = Screen::History;
                self.history_view = HistoryView::default();
                vec![Intent::ShowHistory]
            }
            MenuEntry::Send => {
                self.screen = Screen::Transfer(TransferView::send());
                Vec::new()
            }
            MenuEntry::Receive => {
                self.screen = Screen::Transfer(TransferView::ReceiveWaiting);
                vec![Intent::StartReceive]
            }
            MenuEntry::Privacy => match &self.card {
                Some(c) => {
                    self.privacy_asked = true;
                    vec![Intent::SetPrivacy { on: !c.privacy }]
                }
                None => Vec::new(),
            },
        }
    }

    fn on_update(&mut self, u: UiUpdate) -> Vec<Intent> {
        let mut out = Vec::new();
        // The one way model data comes in: every string made terminal-safe here.
        match u.sanitized() {
            UiUpdate::CardInserted(c) => {
                self.card = Some(c);
                if matches!(
                    self.screen,
                    Screen::Error(UiError {
                        kind: ErrorKind::NoCard,
                        ..
                    })
                ) {
                    self.screen = Screen::Home;
                }
            }
            UiUpdate::CardRemoved => {
                self.card = None;
                // The log belonged to that card.
                self.history = None;
                if matches!(self.screen, Screen::History) {
                    self.screen = Screen::Home;
                }
            }
            UiUpdate::Reader(r) => self.reader = r,
            UiUpdate::CatalogLoaded(c) => {
                self.catalog_view.clamp(&c);
                self.catalog = Some(c);
            }
            UiUpdate::Offer(o) => {
                if let Some(old) = self.offer.take() {
                    // Never two open offers: the older one is cancelled explicitly.
                    out.push(Intent::CancelOffer {
                        txid: old.txid().clone(),
                        reason: CancelReason::Superseded,
                    });
                }
                self.info_open = false;
                self.offer = Some(OfferPopup::new(o, self.cfg.offer_timeout_secs));
            }
            UiUpdate::OfferWithdrawn(txid) => {
                if self.offer.as_ref().is_some_and(|o| *o.txid() == txid) {
                    self.close_offer_cancelled();
                }
            }
            UiUpdate::Progress(step) => {
                let kind = match &self.screen {
                    Screen::Progress(p) => p.kind,
                    Screen::Load(_) => TxKind::Load,
                    Screen::Pin(_) => self.pin_for,
                    Screen::Transfer(v) if v.sending() => TxKind::TransferOut,
                    Screen::Transfer(_) => TxKind::TransferIn,
                    _ => TxKind::Purchase,
                };
                self.screen = Screen::Progress(Progress {
                    kind,
                    step: Some(step),
                });
            }
            UiUpdate::Receipt(r) => {
                if let Some(card) = self.card.as_mut() {
                    if card.balance.currency == r.balance_after.currency {
                        card.balance = r.balance_after;
                    }
                }
                // The log changed; the next ShowHistory fetches it again.
                self.history = None;
                self.offer = None;
                self.screen = Screen::Receipt(r);
            }
            UiUpdate::History(entries) => self.history = Some(entries),
            UiUpdate::Error(e) => {
                // The daemon has ended whatever was in flight; no intent is owed.
                self.offer = None;
                self.privacy_asked = false;
                self.screen = Screen::Error(e);
            }
            UiUpdate::PrivacyChanged(on) => {
                if let Some(card) = self.card.as_mut() {
                    card.privacy = on;
                }
                self.privacy_asked = false;
                if matches!(self.screen, Screen::Home | Screen::Pin(_)) {
                    self.screen = Screen::Home;
                }
                self.notice = Some(strings::privacy_changed(on));
            }
            UiUpdate::LoadMax(max) => self.screen = Screen::Load(LoadView::amount(max)),
            // A transfer's answers land only on the screen that asked (MENU or BACK in
            // between cancelled the transfer).
            UiUpdate::ReceiveMax(max) => {
                if let Screen::Transfer(v @ TransferView::ReceiveWaiting) = &mut self.screen {
                    *v = TransferView::ReceiveAmount(crate::components::amount::AmountEntry::new(
                        max,
                    ));
                }
            }
            UiUpdate::TransferCode { code, amount } => {
                if let Screen::Transfer(v @ TransferView::ReceiveWaiting) = &mut self.screen {
                    *v = TransferView::Code { code, amount };
                }
            }
            UiUpdate::TransferCancelled => {
                let transfer_progress = matches!(
                    &self.screen,
                    Screen::Progress(p) if matches!(p.kind, TxKind::TransferOut | TxKind::TransferIn)
                );
                if transfer_progress || matches!(self.screen, Screen::Transfer(_)) {
                    self.screen = Screen::Home;
                    self.notice = Some(strings::TRANSFER_CANCELLED);
                }
            }
            UiUpdate::TransferTerms(t) => {
                if let Screen::Transfer(v @ TransferView::SendWaiting) = &mut self.screen {
                    *v = TransferView::Confirm(t);
                }
            }
            UiUpdate::Settled => {
                if matches!(&self.screen, Screen::Error(e) if e.kind == ErrorKind::Pending) {
                    self.screen = Screen::Home;
                    self.notice = Some(strings::SETTLED);
                }
                // The log changed; the next ShowHistory fetches it again.
                self.history = None;
            }
            UiUpdate::PinRequest(req) => {
                // A PIN asked while a purchase is under way is the card's.
                self.pin_for = match &self.screen {
                    Screen::Progress(p) => p.kind,
                    _ => TxKind::Load,
                };
                self.screen = Screen::Pin(PinEntry::new(req));
            }
        }
        out
    }

    fn hints(&self) -> Vec<Hint> {
        if self.offer.is_some() {
            return vec![
                Hint::ok(strings::HINT_ACCEPT),
                Hint::back(strings::HINT_CANCEL),
            ];
        }
        match &self.screen {
            Screen::Home => {
                let mut v = vec![Hint::ok(strings::HINT_SELECT)];
                v.extend(COLOUR_HINTS);
                v
            }
            Screen::Catalog => {
                let mut v = vec![
                    Hint::ok(strings::HINT_SELECT),
                    Hint::back(strings::HINT_BACK),
                ];
                v.extend(&COLOUR_HINTS[1..3]);
                v
            }
            Screen::Load(LoadView::Source { .. }) => {
                vec![
                    Hint::ok(strings::HINT_SELECT),
                    Hint::back(strings::HINT_BACK),
                ]
            }
            Screen::Load(_) | Screen::Pin(_) | Screen::Transfer(TransferView::EnterCode { .. }) => {
                vec![
                    Hint::ok(strings::HINT_CONFIRM),
                    Hint::back(strings::HINT_DELETE),
                ]
            }
            Screen::Transfer(_) => {
                vec![
                    Hint::ok(strings::HINT_CONFIRM),
                    Hint::back(strings::HINT_CANCEL),
                ]
            }
            Screen::Progress(_) => Vec::new(),
            Screen::Receipt(_) | Screen::Error(_) | Screen::History => {
                vec![Hint::ok(strings::HINT_HOME), Hint::back(strings::HINT_BACK)]
            }
        }
    }

    pub fn draw(&self, f: &mut Frame) {
        let full = f.area();
        f.render_widget(Block::default().style(theme::base()), full);
        let safe = theme::safe_area(full);
        let [header, body, notice, footer] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Min(0),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(safe);

        let right = match &self.card {
            Some(c) => format!("{}  {}", c.provider, c.balance),
            None => strings::HOME_INSERT_CARD.to_string(),
        };
        let [h_left, h_right] = Layout::horizontal([
            Constraint::Min(0),
            Constraint::Length(right.chars().count() as u16 + 1),
        ])
        .areas(header);
        f.render_widget(
            Paragraph::new(Span::styled(strings::APP_TITLE, theme::title())),
            h_left,
        );
        f.render_widget(
            Paragraph::new(Line::from(Span::styled(right, theme::amount())).right_aligned()),
            h_right,
        );

        match &self.screen {
            Screen::Home => self.home.draw(f, body, self.card.as_ref(), &self.reader),
            Screen::Catalog => self.catalog_view.draw(f, body, self.catalog.as_ref()),
            Screen::Load(v) => v.draw(f, body),
            Screen::Pin(p) => p.draw(f, body),
            Screen::Progress(p) => p.draw(f, body, self.ticks),
            Screen::Receipt(r) => components::receipt::draw(f, body, r),
            Screen::History => self.history_view.draw(f, body, self.history.as_deref()),
            Screen::Error(e) => components::error::draw(f, body, e),
            Screen::Transfer(v) => v.draw(f, body),
        }
        if let Some(n) = self.notice {
            f.render_widget(Paragraph::new(Span::styled(n, theme::amount())), notice);
        }
        components::draw_footer(f, footer, &self.hints());
        if let Some(popup) = &self.offer {
            popup.draw(f, safe);
        } else if self.info_open {
            info::draw(f, safe, &self.reader, self.card.as_ref());
        }
        // The last line of defence: nothing unsafe reaches the terminal, whatever drew it.
        crate::text::scrub(f.buffer_mut());
    }
}
