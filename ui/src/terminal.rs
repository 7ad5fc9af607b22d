//! The thin crossterm shell: raw mode + alternate screen in and out, terminal restore on exit
//! and on panic, and a key reader that feeds a tokio channel.
//!
//! This file owns every crossterm call that touches the real terminal; nothing else in the
//! crate does IO.

use crate::app::App;
use crate::event::UiEvent;
use crate::keymap::Keymap;
use crossterm::event::{self, Event};
use crossterm::execute;
use crossterm::terminal::{
    EnterAlternateScreen, LeaveAlternateScreen, disable_raw_mode, enable_raw_mode,
};
use ratatui::Terminal;
use ratatui::backend::CrosstermBackend;
use std::io::{self, Stdout};
use std::sync::Once;
use tokio::sync::mpsc;

/// The terminal while the UI owns it. Dropping it gives the terminal back.
pub struct Tui {
    terminal: Terminal<CrosstermBackend<Stdout>>,
}

static PANIC_HOOK: Once = Once::new();

/// Leaves raw mode and the alternate screen and shows the cursor. Safe to call twice.
pub fn restore() -> io::Result<()> {
    let raw = disable_raw_mode();
    execute!(io::stdout(), LeaveAlternateScreen, crossterm::cursor::Show)?;
    raw
}

impl Tui {
    /// Takes over the terminal. A panic anywhere afterwards restores it before the message is
    /// printed, so the panic is readable and the console usable.
    pub fn enter() -> io::Result<Tui> {
        PANIC_HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                let _ = restore();
                previous(info);
            }));
        });
        enable_raw_mode()?;
        if let Err(e) = execute!(io::stdout(), EnterAlternateScreen, crossterm::cursor::Hide) {
            let _ = restore();
            return Err(e);
        }
        let mut terminal = Terminal::new(CrosstermBackend::new(io::stdout()))?;
        terminal.clear()?;
        Ok(Tui { terminal })
    }

    pub fn draw(&mut self, app: &App) -> io::Result<()> {
        self.terminal.draw(|f| app.draw(f)).map(|_| ())
    }
}

impl Drop for Tui {
    fn drop(&mut self) {
        let _ = restore();
    }
}

/// Starts a thread that reads terminal events and sends the mapped ones as `UiEvent`s.
///
/// A plain blocking thread rather than crossterm's polling: `event::read` sleeps in the kernel
/// until a byte arrives, so an idle box has no wakeups. The thread ends when the receiver is
/// dropped (at the next key) or the terminal read fails (e.g. the tty is gone), which closes
/// the channel.
pub fn spawn_key_reader(keymap: Keymap) -> mpsc::Receiver<UiEvent> {
    let (tx, rx) = mpsc::channel(64);
    std::thread::Builder::new()
        .name("ui-keys".into())
        .spawn(move || {
            loop {
                let ev = match event::read() {
                    Ok(Event::Key(k)) => match keymap.map(&k) {
                        Some(rk) => UiEvent::Key(rk),
                        None => continue,
                    },
                    Ok(Event::Resize(..)) => UiEvent::Resize,
                    Ok(_) => continue,
                    Err(_) => break,
                };
                if tx.blocking_send(ev).is_err() {
                    break;
                }
            }
        })
        .ok(); // no thread → the channel closes at once and the caller sees `None`
    rx
}
