//! The offer confirmation popup: item, merchant, price, balance and balance after, with a
//! visible countdown. OK accepts; BACK (or the red key) cancels; the countdown reaching zero
//! cancels. The countdown moves only on `tick()`, never by reading a clock.

use crate::components::label_value;
use crate::keymap::RemoteKey;
use crate::model::{Offer, TxId};
use crate::strings;
use crate::theme::{self, BIG_HEIGHT, BigText};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OfferAction {
    Accept(TxId),
    Cancel(TxId),
}

#[derive(Debug, Clone)]
pub struct OfferPopup {
    offer: Offer,
    total: u32,
    remaining: u32,
}

impl OfferPopup {
    /// `default_timeout` is used when the offer carries 0.
    pub fn new(offer: Offer, default_timeout: u32) -> Self {
        let total = if offer.timeout_secs == 0 {
            default_timeout
        } else {
            offer.timeout_secs
        }
        .max(1);
        OfferPopup {
            offer,
            total,
            remaining: total,
        }
    }

    pub fn txid(&self) -> &TxId {
        &self.offer.txid
    }

    pub fn remaining(&self) -> u32 {
        self.remaining
    }

    pub fn handle(&self, key: RemoteKey) -> Option<OfferAction> {
        match key {
            RemoteKey::Ok => Some(OfferAction::Accept(self.offer.txid.clone())),
            RemoteKey::Back | RemoteKey::Red => Some(OfferAction::Cancel(self.offer.txid.clone())),
            _ => None,
        }
    }

    /// One second passed; `true` when the time is up.
    pub fn tick(&mut self) -> bool {
        self.remaining = self.remaining.saturating_sub(1);
        self.remaining == 0
    }

    pub fn draw(&self, f: &mut Frame, screen: Rect) {
        let area = theme::centered(screen, 62, 16);
        f.render_widget(Clear, area);
        let block = Block::default()
            .borders(Borders::ALL)
            .border_type(BorderType::Thick)
            .border_style(theme::popup_border())
            .style(theme::base())
            .title(Span::styled(
                format!(
                    " {} ",
                    if self.offer.price.currency == crate::money::Currency::AUTHENTICATION {
                        strings::OFFER_AUTH_TITLE
                    } else {
                        strings::OFFER_TITLE
                    }
                ),
                theme::title(),
            ));
        let inner = block.inner(area).inner(Margin::new(2, 0));
        f.render_widget(block, area);
        let [top, price_label, price, _, bal, _, count, gauge, _, hint] = Layout::vertical([
            Constraint::Length(2),
            Constraint::Length(1),
            Constraint::Length(BIG_HEIGHT),
            Constraint::Length(1),
            Constraint::Length(2),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Length(1),
        ])
        .areas(inner);
        let o = &self.offer;
        f.render_widget(
            Paragraph::new(vec![
                label_value(strings::OFFER_ITEM, o.item.clone(), theme::value()),
                label_value(strings::OFFER_MERCHANT, o.merchant.clone(), theme::value()),
            ]),
            top,
        );
        // The price also in plain text: the big digits carry no currency name of their own
        // on every console font, and screen readers / capture-pane read this line.
        f.render_widget(
            Paragraph::new(label_value(
                strings::OFFER_PRICE,
                o.price.to_string(),
                theme::amount(),
            )),
            price_label,
        );
        let text = o.price.to_string();
        f.render_widget(
            BigText {
                text: &text,
                style: theme::amount(),
            },
            price,
        );
        let after_style = if o.balance_after.minor < 0 {
            theme::bad()
        } else {
            theme::value()
        };
        f.render_widget(
            Paragraph::new(vec![
                label_value(
                    strings::OFFER_BALANCE,
                    o.balance.to_string(),
                    theme::value(),
                ),
                label_value(
                    strings::OFFER_BALANCE_AFTER,
                    o.balance_after.to_string(),
                    after_style,
                ),
            ]),
            bal,
        );
        f.render_widget(
            Paragraph::new(Span::styled(
                strings::offer_countdown(self.remaining),
                theme::amount(),
            )),
            count,
        );
        // A plain bar of blocks rather than Gauge: integer maths, no label gap in the middle.
        let filled =
            usize::from(gauge.width) * self.remaining as usize / self.total.max(1) as usize;
        f.render_widget(
            Paragraph::new(Span::styled("\u{2588}".repeat(filled), theme::amount())),
            gauge,
        );
        f.render_widget(
            Paragraph::new(Line::from(vec![
                Span::styled(
                    format!(" {} ", strings::KEY_OK),
                    theme::key_badge(ratatui::style::Color::Green),
                ),
                Span::styled(format!(" {}     ", strings::HINT_ACCEPT), theme::value()),
                Span::styled(
                    format!(" {} ", strings::KEY_BACK),
                    theme::key_badge(ratatui::style::Color::Red),
                ),
                Span::styled(format!(" {}", strings::HINT_CANCEL), theme::value()),
            ])),
            hint,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{Currency, Money};

    fn offer(timeout: u32) -> Offer {
        let eur = |m| Money::new(m, Currency::EUR);
        Offer {
            txid: TxId("t1".into()),
            item: "Film".into(),
            merchant: "Kabel".into(),
            price: eur(500),
            balance: eur(2000),
            balance_after: eur(1500),
            timeout_secs: timeout,
        }
    }

    #[test]
    fn countdown_reaches_zero_exactly_once() {
        let mut p = OfferPopup::new(offer(3), 30);
        assert!(!p.tick());
        assert!(!p.tick());
        assert!(p.tick());
        assert_eq!(p.remaining(), 0);
    }

    #[test]
    fn zero_timeout_uses_default() {
        let p = OfferPopup::new(offer(0), 45);
        assert_eq!(p.remaining(), 45);
    }

    #[test]
    fn only_ok_accepts() {
        let p = OfferPopup::new(offer(3), 30);
        assert_eq!(
            p.handle(RemoteKey::Ok),
            Some(OfferAction::Accept(TxId("t1".into())))
        );
        assert_eq!(
            p.handle(RemoteKey::Back),
            Some(OfferAction::Cancel(TxId("t1".into())))
        );
        for k in [
            RemoteKey::Green,
            RemoteKey::Digit(1),
            RemoteKey::Menu,
            RemoteKey::Up,
        ] {
            assert_eq!(p.handle(k), None);
        }
    }
}
