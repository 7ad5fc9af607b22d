//! The home screen: card state, provider, balance in big digits, and the main menu.

use super::{label_value, screen_block};
use crate::keymap::RemoteKey;
use crate::model::{CardStatus, CardSummary, ReaderState};
use crate::strings;
use crate::theme::{self, BIG_HEIGHT, BigText};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

/// Main menu entries, in `strings::HOME_MENU` order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MenuEntry {
    Catalog,
    Load,
    History,
    /// The cardholder's privacy switch (seed 004).
    Privacy,
    /// Card to card (seed 004): send value to another card.
    Send,
    /// Card to card: receive value from another card.
    Receive,
}

const ENTRIES: [MenuEntry; 6] = [
    MenuEntry::Catalog,
    MenuEntry::Load,
    MenuEntry::History,
    MenuEntry::Privacy,
    MenuEntry::Send,
    MenuEntry::Receive,
];

#[derive(Debug, Default, Clone)]
pub struct Home {
    sel: usize,
}

impl Home {
    pub fn handle(&mut self, key: RemoteKey) -> Option<MenuEntry> {
        match key {
            RemoteKey::Up => self.sel = (self.sel + ENTRIES.len() - 1) % ENTRIES.len(),
            RemoteKey::Down => self.sel = (self.sel + 1) % ENTRIES.len(),
            RemoteKey::Ok => return ENTRIES.get(self.sel).copied(),
            RemoteKey::Digit(d @ 1..=6) => return ENTRIES.get(usize::from(d) - 1).copied(),
            _ => {}
        }
        None
    }

    pub fn draw(
        &self,
        f: &mut Frame,
        area: Rect,
        card: Option<&CardSummary>,
        reader: &ReaderState,
    ) {
        let block = screen_block(strings::HOME_TITLE);
        let inner = block.inner(area);
        f.render_widget(block, area);

        let Some(card) = card else {
            let msg = match reader {
                ReaderState::Missing => strings::HOME_NO_READER,
                ReaderState::Unknown => strings::HOME_STARTING,
                ReaderState::Ready { .. } => strings::HOME_INSERT_CARD,
            };
            let mid = theme::centered(inner, inner.width, 1);
            f.render_widget(
                Paragraph::new(Span::styled(msg, theme::amount())).centered(),
                mid,
            );
            return;
        };

        let [info, _, bal_label, bal, _, menu] = Layout::vertical([
            Constraint::Length(3),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(BIG_HEIGHT),
            Constraint::Length(1),
            Constraint::Min(0),
        ])
        .areas(inner.inner(ratatui::layout::Margin::new(2, 1)));

        let status_style = match card.status {
            CardStatus::Active => theme::good(),
            _ => theme::bad(),
        };
        f.render_widget(
            Paragraph::new(vec![
                label_value(
                    strings::HOME_PROVIDER,
                    card.provider.clone(),
                    theme::value(),
                ),
                Line::from(vec![
                    Span::styled(format!("{:<14}", strings::HOME_STATUS), theme::label()),
                    Span::styled(strings::card_status(card.status), status_style),
                    Span::styled(format!("   {} ", strings::HOME_EXPIRES), theme::label()),
                    Span::styled(card.expiry.to_string(), theme::value()),
                ]),
                extras_line(card),
            ]),
            info,
        );
        f.render_widget(
            Paragraph::new(Span::styled(strings::HOME_BALANCE, theme::label())),
            bal_label,
        );
        let text = card.balance.to_string();
        f.render_widget(
            BigText {
                text: &text,
                style: theme::amount(),
            },
            bal,
        );

        let lines: Vec<Line> = strings::HOME_MENU
            .iter()
            .copied()
            .chain([strings::home_privacy(card.privacy)])
            .chain(strings::HOME_MENU_TRANSFER)
            .enumerate()
            .map(|(i, label)| {
                let style = if i == self.sel {
                    theme::selected()
                } else {
                    theme::value()
                };
                Line::from(Span::styled(format!(" {}  {:<30}", i + 1, label), style))
            })
            .collect();
        f.render_widget(Paragraph::new(lines), menu);
    }
}

/// The points and the bad-signature count, each only when non-zero (an empty line
/// otherwise).
fn extras_line(card: &crate::model::CardSummary) -> Line<'static> {
    let mut spans = Vec::new();
    if card.points != 0 {
        spans.push(Span::styled(
            format!("{:<14}", strings::HOME_POINTS),
            theme::label(),
        ));
        spans.push(Span::styled(card.points.to_string(), theme::value()));
    }
    let (bad, limit) = card.bad_keys;
    if bad != 0 {
        if !spans.is_empty() {
            spans.push(Span::raw("   "));
        }
        spans.push(Span::styled(
            strings::home_bad_keys(bad, limit),
            theme::bad(),
        ));
    }
    Line::from(spans)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrows_wrap_and_digits_jump() {
        let mut h = Home::default();
        assert_eq!(h.handle(RemoteKey::Up), None);
        assert_eq!(h.handle(RemoteKey::Ok), Some(MenuEntry::Receive));
        assert_eq!(h.handle(RemoteKey::Down), None);
        assert_eq!(h.handle(RemoteKey::Ok), Some(MenuEntry::Catalog));
        assert_eq!(h.handle(RemoteKey::Digit(2)), Some(MenuEntry::Load));
        assert_eq!(h.handle(RemoteKey::Digit(4)), Some(MenuEntry::Privacy));
        assert_eq!(h.handle(RemoteKey::Digit(5)), Some(MenuEntry::Send));
        assert_eq!(h.handle(RemoteKey::Digit(6)), Some(MenuEntry::Receive));
        assert_eq!(h.handle(RemoteKey::Digit(7)), None);
        assert_eq!(h.handle(RemoteKey::Digit(9)), None);
        assert_eq!(h.handle(RemoteKey::Digit(0)), None);
    }
}
