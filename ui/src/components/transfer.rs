//! Card to card (seed 004 FIG. 4), both sides on the TV.
//!
//! - Receiving: the daemon reads the card and sends the most it can take
//!   ([`crate::UiUpdate::ReceiveMax`]); the viewer types the amount ([`super::amount`]); the
//!   daemon shows the code to tell the sender, and the screen waits for the sender's card.
//! - Sending: the viewer types the receiver's 8-digit code; the daemon shows the terms
//!   (amount, receiving card), which the viewer confirms with OK.
//!
//! BACK leaves or cancels at every step until a card has answered; after that the daemon
//! shows progress and the remote cannot interrupt it.

use super::amount::{AmountAction, AmountEntry};
use super::{label_value, screen_block};
use crate::keymap::RemoteKey;
use crate::model::TransferTerms;
use crate::money::Money;
use crate::strings;
use crate::theme::{self, BIG_HEIGHT, BigText};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

/// Digits in a transfer code (the gateway's codes).
pub const CODE_LEN: usize = 8;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferAction {
    Receive(i64),
    Join(String),
    Confirm,
    /// BACK before the daemon was asked anything.
    Leave,
    /// BACK after: the daemon must be told.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferView {
    /// Receiving: the daemon reads the card.
    ReceiveWaiting,
    ReceiveAmount(AmountEntry),
    /// Receiving: the code to tell the sender, and the amount.
    Code {
        code: String,
        amount: Money,
    },
    /// Sending: the code typed so far.
    EnterCode {
        digits: String,
        message: Option<&'static str>,
    },
    /// Sending: the daemon looks the code up.
    SendWaiting,
    Confirm(TransferTerms),
}

impl TransferView {
    /// "Send to another card".
    pub fn send() -> Self {
        TransferView::EnterCode {
            digits: String::new(),
            message: None,
        }
    }

    /// Whether this is the sending side (for the progress and the receipt).
    pub fn sending(&self) -> bool {
        matches!(
            self,
            TransferView::EnterCode { .. } | TransferView::SendWaiting | TransferView::Confirm(_)
        )
    }

    /// Whether the daemon holds a transfer the viewer can still cancel.
    pub fn daemon_asked(&self) -> bool {
        !matches!(self, TransferView::EnterCode { .. })
    }

    pub fn handle(&mut self, key: RemoteKey) -> Option<TransferAction> {
        match self {
            TransferView::ReceiveWaiting
            | TransferView::SendWaiting
            | TransferView::Code { .. } => {
                (key == RemoteKey::Back).then_some(TransferAction::Cancel)
            }
            TransferView::ReceiveAmount(entry) => match entry.handle(key)? {
                AmountAction::Submit(minor) => Some(TransferAction::Receive(minor)),
                AmountAction::Cancel => Some(TransferAction::Cancel),
            },
            TransferView::EnterCode { digits, message } => {
                *message = None;
                match key {
                    RemoteKey::Digit(d) if d <= 9 && digits.len() < CODE_LEN => {
                        digits.push(char::from(b'0' + d));
                        None
                    }
                    RemoteKey::Back if digits.is_empty() => Some(TransferAction::Leave),
                    RemoteKey::Back => {
                        digits.pop();
                        None
                    }
                    RemoteKey::Ok if digits.len() == CODE_LEN => {
                        let code = std::mem::take(digits);
                        *self = TransferView::SendWaiting;
                        Some(TransferAction::Join(code))
                    }
                    RemoteKey::Ok => {
                        *message = Some(strings::SEND_CODE_SHORT);
                        None
                    }
                    _ => None,
                }
            }
            TransferView::Confirm(_) => match key {
                RemoteKey::Ok => Some(TransferAction::Confirm),
                RemoteKey::Back => Some(TransferAction::Cancel),
                _ => None,
            },
        }
    }

    pub fn draw(&self, f: &mut Frame, area: Rect) {
        let title = if self.sending() {
            strings::SEND_TITLE
        } else {
            strings::RECEIVE_TITLE
        };
        let block = screen_block(title);
        let inner = block.inner(area).inner(Margin::new(2, 1));
        f.render_widget(block, area);
        let [label, _, big, _, rest] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(BIG_HEIGHT),
            Constraint::Length(1),
            Constraint::Min(0),
        ])
        .areas(inner);
        let big_text = |f: &mut Frame, text: &str| {
            f.render_widget(
                BigText {
                    text,
                    style: theme::amount(),
                },
                big,
            )
        };
        let line = |f: &mut Frame, text: &str, area: Rect| {
            f.render_widget(
                Paragraph::new(Span::styled(text.to_string(), theme::label())),
                area,
            )
        };
        match self {
            TransferView::ReceiveWaiting => line(f, strings::RECEIVE_WAITING, label),
            TransferView::SendWaiting => line(f, strings::SEND_WAITING, label),
            TransferView::ReceiveAmount(entry) => entry.draw(f, inner),
            TransferView::Code { code, amount } => {
                line(f, strings::RECEIVE_CODE, label);
                big_text(f, &spaced(code));
                f.render_widget(
                    Paragraph::new(vec![
                        // The code as plain text too: a BigText glyph can be misread.
                        Line::from(Span::styled(spaced(code), theme::value())),
                        label_value(strings::RECEIVE_AMOUNT, amount.to_string(), theme::amount()),
                        Line::from(""),
                        Line::from(Span::styled(
                            strings::RECEIVE_WAITING_SENDER,
                            theme::label(),
                        )),
                    ]),
                    rest,
                );
            }
            TransferView::EnterCode { digits, message } => {
                line(f, strings::SEND_ENTER_CODE, label);
                let shown: String = (0..CODE_LEN)
                    .map(|i| digits.chars().nth(i).unwrap_or('-'))
                    .collect();
                big_text(f, &spaced(&shown));
                let mut lines = vec![
                    Line::from(Span::styled(spaced(&shown), theme::value())),
                    Line::from(Span::styled(strings::SEND_CODE_HELP, theme::label())),
                ];
                if let Some(m) = message {
                    lines.push(Line::from(Span::styled(*m, theme::bad())));
                }
                f.render_widget(Paragraph::new(lines), rest);
            }
            TransferView::Confirm(t) => {
                line(f, strings::SEND_CONFIRM, label);
                big_text(f, &t.amount.to_string());
                f.render_widget(
                    Paragraph::new(vec![
                        label_value(
                            strings::RECEIVE_AMOUNT,
                            t.amount.to_string(),
                            theme::amount(),
                        ),
                        label_value(strings::SEND_TO, t.to_card.clone(), theme::value()),
                        Line::from(""),
                        Line::from(Span::styled(strings::SEND_CONFIRM_HELP, theme::label())),
                    ]),
                    rest,
                );
            }
        }
    }
}

/// "12345678" → "1234 5678".
fn spaced(code: &str) -> String {
    let mut s = String::with_capacity(code.len() + 1);
    for (i, c) in code.chars().enumerate() {
        if i == CODE_LEN / 2 {
            s.push(' ');
        }
        s.push(c);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_code_is_eight_digits_and_back_deletes_then_leaves() {
        let mut v = TransferView::send();
        assert_eq!(v.handle(RemoteKey::Back), Some(TransferAction::Leave));
        for d in [1, 2, 3, 4, 5, 6, 7] {
            assert_eq!(v.handle(RemoteKey::Digit(d)), None);
        }
        assert_eq!(v.handle(RemoteKey::Ok), None, "seven digits are not a code");
        assert!(matches!(
            &v,
            TransferView::EnterCode {
                message: Some(_),
                ..
            }
        ));
        v.handle(RemoteKey::Digit(8));
        v.handle(RemoteKey::Digit(9)); // a ninth digit is not taken
        v.handle(RemoteKey::Back);
        v.handle(RemoteKey::Digit(0));
        assert_eq!(
            v.handle(RemoteKey::Ok),
            Some(TransferAction::Join("12345670".into()))
        );
        assert_eq!(v, TransferView::SendWaiting);
        assert_eq!(v.handle(RemoteKey::Back), Some(TransferAction::Cancel));
    }

    #[test]
    fn codes_are_shown_in_two_halves() {
        assert_eq!(spaced("12345678"), "1234 5678");
        assert_eq!(spaced("12-"), "12-");
    }
}
