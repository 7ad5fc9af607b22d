//! The TV UI: screens, keymap, rendering. No network or card code.
//!
//! The daemon drives it through one explicit interface:
//!
//! - in: [`UiEvent`]s — remote keys (mapped by [`keymap::Keymap`]), model updates
//!   ([`UiUpdate`]) and one-second [`UiEvent::Tick`]s;
//! - out: [`Intent`]s returned by [`App::handle`], which the daemon acts on;
//! - [`App::draw`] renders the state into any ratatui `Frame` (a real terminal through
//!   [`terminal::Tui`], or a `TestBackend` in tests).
//!
//! ```no_run
//! # async fn run(mut updates: tokio::sync::mpsc::Receiver<ui::UiUpdate>) -> std::io::Result<()> {
//! use ui::{App, UiEvent, terminal};
//! let mut tui = terminal::Tui::enter()?;
//! let mut keys = terminal::spawn_key_reader(ui::keymap::Keymap::default());
//! let mut app = App::default();
//! loop {
//!     tui.draw(&app)?;
//!     let ev = tokio::select! {
//!         Some(k) = keys.recv() => k,
//!         Some(u) = updates.recv() => UiEvent::Update(u),
//!     };
//!     for intent in app.handle(ev) {
//!         // act on it: purchase flow, load flow, ...
//!         if intent == ui::Intent::Quit { return Ok(()); }
//!     }
//! }
//! # }
//! ```

pub mod app;
pub mod components;
pub mod event;
pub mod keymap;
pub mod model;
pub mod money;
pub mod popups;
pub mod strings;
pub mod terminal;
pub mod text;
pub mod theme;

pub use app::{App, AppConfig, ScreenId};
pub use event::{CancelReason, Intent, Pin, UiEvent, UiUpdate};
pub use keymap::{Keymap, RemoteKey};
pub use money::{Currency, Money};
