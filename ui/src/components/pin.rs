//! PIN entry: digits only, masked on screen, bounded length. BACK deletes a digit, or cancels
//! when there is none; OK submits once the minimum length is reached.

use super::screen_block;
use crate::event::Pin;
use crate::keymap::RemoteKey;
use crate::model::PinRequest;
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};

/// Hard bounds whatever the daemon asks for, so a bad request cannot make an unusable screen.
const MAX_LEN_CAP: u8 = 12;

#[derive(Debug, PartialEq, Eq)]
pub enum PinAction {
    Submit(Pin),
    Cancel,
}

#[derive(Debug)]
pub struct PinEntry {
    min_len: u8,
    max_len: u8,
    attempts_left: Option<u8>,
    pin: Pin,
    message: Option<String>,
}

impl PinEntry {
    pub fn new(req: PinRequest) -> Self {
        let max_len = req.max_len.clamp(1, MAX_LEN_CAP);
        PinEntry {
            max_len,
            min_len: req.min_len.clamp(1, max_len),
            attempts_left: req.attempts_left,
            pin: Pin::new(),
            message: None,
        }
    }

    pub fn len(&self) -> usize {
        self.pin.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pin.is_empty()
    }

    pub fn handle(&mut self, key: RemoteKey) -> Option<PinAction> {
        self.message = None;
        match key {
            RemoteKey::Digit(d) if d <= 9 => {
                self.pin
                    .push(char::from(b'0' + d), usize::from(self.max_len));
            }
            RemoteKey::Back if self.pin.is_empty() => return Some(PinAction::Cancel),
            RemoteKey::Back => {
                self.pin.pop();
            }
            RemoteKey::Ok => {
                if self.pin.len() >= usize::from(self.min_len) {
                    return Some(PinAction::Submit(std::mem::take(&mut self.pin)));
                }
                self.message = Some(strings::pin_too_short(self.min_len));
            }
            _ => {}
        }
        None
    }

    pub fn draw(&self, f: &mut Frame, area: Rect) {
        let block = screen_block(strings::PIN_TITLE);
        let inner = block.inner(area);
        f.render_widget(block, area);
        // One '*' per typed digit, '_' for the rest: the length is visible, the digits never.
        let boxes: Vec<&str> = (0..usize::from(self.max_len))
            .map(|i| if i < self.pin.len() { "*" } else { "_" })
            .collect();
        let mut lines = vec![
            Line::from(""),
            Line::from(Span::styled(strings::PIN_HELP, theme::label())),
            Line::from(""),
            Line::from(""),
            Line::from(Span::styled(boxes.join("   "), theme::amount())).centered(),
            Line::from(""),
            Line::from(""),
        ];
        if let Some(n) = self.attempts_left {
            lines.push(Line::from(Span::styled(
                strings::pin_attempts(n),
                theme::label(),
            )));
        }
        if let Some(m) = &self.message {
            lines.push(Line::from(Span::styled(m.clone(), theme::bad())));
        }
        f.render_widget(
            Paragraph::new(lines).wrap(Wrap { trim: true }),
            inner.inner(ratatui::layout::Margin::new(2, 0)),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req() -> PinRequest {
        PinRequest {
            min_len: 4,
            max_len: 6,
            attempts_left: Some(3),
        }
    }

    #[test]
    fn digits_only_bounded_and_back_deletes() {
        let mut p = PinEntry::new(req());
        for d in [1, 2, 3, 4, 5, 6, 7, 8] {
            assert_eq!(p.handle(RemoteKey::Digit(d)), None);
        }
        assert_eq!(p.len(), 6, "max length");
        for k in [
            RemoteKey::Up,
            RemoteKey::Menu,
            RemoteKey::Red,
            RemoteKey::Digit(42),
        ] {
            p.handle(k);
        }
        assert_eq!(p.len(), 6, "non-digits change nothing");
        p.handle(RemoteKey::Back);
        assert_eq!(p.len(), 5);
        match p.handle(RemoteKey::Ok) {
            Some(PinAction::Submit(pin)) => assert_eq!(pin.expose(), "12345"),
            other => panic!("expected submit, got {other:?}"),
        }
        assert!(p.is_empty(), "the entry forgets the PIN once handed over");
    }

    #[test]
    fn too_short_is_refused_and_back_on_empty_cancels() {
        let mut p = PinEntry::new(req());
        p.handle(RemoteKey::Digit(1));
        assert_eq!(p.handle(RemoteKey::Ok), None);
        assert!(p.message.is_some());
        p.handle(RemoteKey::Back);
        assert_eq!(p.handle(RemoteKey::Back), Some(PinAction::Cancel));
    }

    #[test]
    fn silly_requests_are_clamped() {
        let p = PinEntry::new(PinRequest {
            min_len: 200,
            max_len: 0,
            attempts_left: None,
        });
        assert_eq!((p.min_len, p.max_len), (1, 1));
    }
}
