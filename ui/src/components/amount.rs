//! Amount entry, as a cash machine takes it: each digit shifts in from the right in minor
//! units (2, 5, 0, 0 → 25.00), so any amount can be typed with the ten digits alone. A digit
//! that would go over the maximum is refused and the maximum is pointed out. Loads and the
//! payee's side of a card-to-card transfer type their amounts here.

use super::label_value;
use crate::keymap::RemoteKey;
use crate::money::Money;
use crate::strings;
use crate::theme::{self, BIG_HEIGHT, BigText};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::Span;
use ratatui::widgets::Paragraph;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AmountAction {
    /// OK on an amount in (0, max], in minor units of the maximum's currency.
    Submit(i64),
    /// BACK on an empty amount.
    Cancel,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AmountEntry {
    pub max: Money,
    /// Typed so far, in minor units.
    pub minor: i64,
    /// Why the last key was refused, until the next key.
    pub message: Option<String>,
}

impl AmountEntry {
    pub fn new(max: Money) -> Self {
        AmountEntry {
            max,
            minor: 0,
            message: None,
        }
    }

    pub fn handle(&mut self, key: RemoteKey) -> Option<AmountAction> {
        self.message = None;
        match key {
            RemoteKey::Digit(d) if d <= 9 => {
                let next = self
                    .minor
                    .checked_mul(10)
                    .and_then(|v| v.checked_add(i64::from(d)));
                match next {
                    Some(v) if v <= self.max.minor => self.minor = v,
                    _ => self.message = Some(strings::load_over_max(&self.max.to_string())),
                }
            }
            RemoteKey::Back => {
                if self.minor == 0 {
                    return Some(AmountAction::Cancel);
                }
                self.minor /= 10;
            }
            RemoteKey::Ok => {
                if self.minor <= 0 {
                    self.message = Some(strings::LOAD_ZERO.to_string());
                } else if self.minor > self.max.minor {
                    // Cannot happen through digits; kept so OK can never submit > max.
                    self.message = Some(strings::load_over_max(&self.max.to_string()));
                } else {
                    return Some(AmountAction::Submit(self.minor));
                }
            }
            _ => {}
        }
        None
    }

    pub fn draw(&self, f: &mut Frame, inner: Rect) {
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
                self.max.to_string(),
                theme::amount(),
            )),
            max_line,
        );
        f.render_widget(
            Paragraph::new(Span::styled(strings::LOAD_AMOUNT, theme::label())),
            label,
        );
        let text = Money::new(self.minor, self.max.currency).to_string();
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
        if let Some(m) = &self.message {
            f.render_widget(Paragraph::new(Span::styled(m.clone(), theme::bad())), msg);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;

    #[test]
    fn amount_shifts_in_and_refuses_over_max() {
        let mut v = AmountEntry::new(Money::new(5000, Currency::EUR));
        for d in [2, 5, 0, 0] {
            assert_eq!(v.handle(RemoteKey::Digit(d)), None);
        }
        // 25000 > 5000: refused, amount unchanged, message shown
        assert_eq!(v.handle(RemoteKey::Digit(0)), None);
        assert_eq!(v.minor, 2500);
        assert!(v.message.as_deref().unwrap_or("").contains("50.00 EUR"));
        v.handle(RemoteKey::Back);
        assert_eq!(v.handle(RemoteKey::Ok), Some(AmountAction::Submit(250)));
    }

    #[test]
    fn zero_is_not_submitted_and_back_on_zero_cancels() {
        let mut v = AmountEntry::new(Money::new(5000, Currency::EUR));
        assert_eq!(v.handle(RemoteKey::Ok), None);
        assert_eq!(v.handle(RemoteKey::Back), Some(AmountAction::Cancel));
    }

    #[test]
    fn huge_digit_runs_do_not_overflow() {
        let mut v = AmountEntry::new(Money::new(i64::MAX, Currency::EUR));
        for _ in 0..40 {
            v.handle(RemoteKey::Digit(9));
        }
        assert!(v.minor > 0);
    }
}
