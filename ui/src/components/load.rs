//! Loading value: choose the source, wait for the maximum, then type the amount.
//!
//! Amount entry works like a cash machine: each digit shifts in from the right in minor units
//! (2, 5, 0, 0 → 25.00), so any amount can be typed with the ten digits alone. A digit that
//! would go over the maximum is refused and the maximum is pointed out.

use super::{label_value, screen_block};
use crate::keymap::RemoteKey;
use crate::model::LoadSource;
use crate::money::Money;
use crate::strings;
use crate::theme::{self, BIG_HEIGHT, BigText};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

const SOURCES: [LoadSource; 3] = [LoadSource::Bank, LoadSource::Voucher, LoadSource::Unload];

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadAction {
    Start(LoadSource),
    Submit(i64),
    /// BACK before anything was asked of the daemon: nothing to cancel there.
    Leave,
    /// BACK after `StartLoad`: the daemon must be told.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadView {
    Source {
        sel: usize,
    },
    Waiting,
    Amount {
        max: Money,
        minor: i64,
        message: Option<String>,
    },
}

impl LoadView {
    pub fn new() -> Self {
        LoadView::Source { sel: 0 }
    }

    pub fn amount(max: Money) -> Self {
        LoadView::Amount {
            max,
            minor: 0,
            message: None,
        }
    }

    pub fn handle(&mut self, key: RemoteKey) -> Option<LoadAction> {
        match self {
            LoadView::Source { sel } => match key {
                RemoteKey::Up => *sel = (*sel + SOURCES.len() - 1) % SOURCES.len(),
                RemoteKey::Down => *sel = (*sel + 1) % SOURCES.len(),
                RemoteKey::Digit(d @ 1..=3) => {
                    let s = SOURCES[usize::from(d) - 1];
                    *self = LoadView::Waiting;
                    return Some(LoadAction::Start(s));
                }
                RemoteKey::Ok => {
                    let s = SOURCES[(*sel).min(SOURCES.len() - 1)];
                    *self = LoadView::Waiting;
                    return Some(LoadAction::Start(s));
                }
                RemoteKey::Back => return Some(LoadAction::Leave),
                _ => {}
            },
            LoadView::Waiting => {
                if key == RemoteKey::Back {
                    return Some(LoadAction::Cancel);
                }
            }
            LoadView::Amount {
                max,
                minor,
                message,
            } => {
                *message = None;
                match key {
                    RemoteKey::Digit(d) if d <= 9 => {
                        let next = minor
                            .checked_mul(10)
                            .and_then(|v| v.checked_add(i64::from(d)));
                        match next {
                            Some(v) if v <= max.minor => *minor = v,
                            _ => *message = Some(strings::load_over_max(&max.to_string())),
                        }
                    }
                    RemoteKey::Back => {
                        if *minor == 0 {
                            return Some(LoadAction::Cancel);
                        }
                        *minor /= 10;
                    }
                    RemoteKey::Ok => {
                        if *minor <= 0 {
                            *message = Some(strings::LOAD_ZERO.to_string());
                        } else if *minor > max.minor {
                            // Cannot happen through digits; kept so OK can never submit > max.
                            *message = Some(strings::load_over_max(&max.to_string()));
                        } else {
                            return Some(LoadAction::Submit(*minor));
                        }
                    }
                    _ => {}
                }
            }
        }
        None
    }

    pub fn draw(&self, f: &mut Frame, area: Rect) {
        let block = screen_block(strings::LOAD_TITLE);
        let inner = block.inner(area).inner(Margin::new(2, 1));
        f.render_widget(block, area);
        match self {
            LoadView::Source { sel } => {
                let mut lines = vec![
                    Line::from(Span::styled(strings::LOAD_CHOOSE_SOURCE, theme::label())),
                    Line::from(""),
                ];
                for (i, s) in SOURCES.iter().enumerate() {
                    let style = if i == *sel {
                        theme::selected()
                    } else {
                        theme::value()
                    };
                    lines.push(Line::from(Span::styled(
                        format!(" {}  {:<30}", i + 1, strings::load_source(*s)),
                        style,
                    )));
                }
                f.render_widget(Paragraph::new(lines), inner);
            }
            LoadView::Waiting => {
                f.render_widget(
                    Paragraph::new(Span::styled(strings::LOAD_WAITING, theme::label())),
                    inner,
                );
            }
            LoadView::Amount {
                max,
                minor,
                message,
            } => {
                let [max_line, _, label, big, _, help, msg] = Layout::vertical([
                    Constraint::Length(1),
                    Constraint::Length(1),
                    Constraint::Length(1),
                    Constraint::Length(BIG_HEIGHT),
                    Constraint::Length(1),
                    Constraint::Length(1),
                    Constraint::Length(2),
                ])
                .areas(inner);
                f.render_widget(
                    Paragraph::new(label_value(
                        strings::LOAD_MAX,
                        max.to_string(),
                        theme::amount(),
                    )),
                    max_line,
                );
                f.render_widget(
                    Paragraph::new(Span::styled(strings::LOAD_AMOUNT, theme::label())),
                    label,
                );
                let text = Money::new(*minor, max.currency).to_string();
                f.render_widget(
                    BigText {
                        text: &text,
                        style: theme::amount(),
                    },
                    big,
                );
                f.render_widget(
                    Paragraph::new(Span::styled(strings::LOAD_HELP, theme::label())),
                    help,
                );
                if let Some(m) = message {
                    f.render_widget(Paragraph::new(Span::styled(m.clone(), theme::bad())), msg);
                }
            }
        }
    }
}

impl Default for LoadView {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;

    #[test]
    fn source_choice_starts_the_load() {
        let mut v = LoadView::new();
        v.handle(RemoteKey::Down);
        assert_eq!(
            v.handle(RemoteKey::Ok),
            Some(LoadAction::Start(LoadSource::Voucher))
        );
        assert_eq!(v, LoadView::Waiting);
        assert_eq!(v.handle(RemoteKey::Back), Some(LoadAction::Cancel));
        let mut v = LoadView::new();
        assert_eq!(
            v.handle(RemoteKey::Digit(1)),
            Some(LoadAction::Start(LoadSource::Bank))
        );
        let mut v = LoadView::new();
        assert_eq!(v.handle(RemoteKey::Back), Some(LoadAction::Leave));
    }

    #[test]
    fn amount_shifts_in_and_refuses_over_max() {
        let mut v = LoadView::amount(Money::new(5000, Currency::EUR));
        for d in [2, 5, 0, 0] {
            assert_eq!(v.handle(RemoteKey::Digit(d)), None);
        }
        // 25000 > 5000: refused, amount unchanged, message shown
        assert_eq!(v.handle(RemoteKey::Digit(0)), None);
        match &v {
            LoadView::Amount { minor, message, .. } => {
                assert_eq!(*minor, 2500);
                assert!(message.as_deref().unwrap_or("").contains("50.00 EUR"));
            }
            other => panic!("{other:?}"),
        }
        v.handle(RemoteKey::Back);
        assert_eq!(v.handle(RemoteKey::Ok), Some(LoadAction::Submit(250)));
    }

    #[test]
    fn zero_is_not_submitted_and_back_on_zero_cancels() {
        let mut v = LoadView::amount(Money::new(5000, Currency::EUR));
        assert_eq!(v.handle(RemoteKey::Ok), None);
        assert_eq!(v.handle(RemoteKey::Back), Some(LoadAction::Cancel));
    }

    #[test]
    fn huge_digit_runs_do_not_overflow() {
        let mut v = LoadView::amount(Money::new(i64::MAX, Currency::EUR));
        for _ in 0..40 {
            v.handle(RemoteKey::Digit(9));
        }
        assert!(matches!(v, LoadView::Amount { minor, .. } if minor > 0));
    }
}
