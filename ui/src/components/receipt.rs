//! The receipt after a completed purchase or load. OK or BACK returns home.

use super::{label_value, screen_block};
use crate::model::Receipt;
use crate::strings;
use crate::theme::{self, BIG_HEIGHT, BigText};
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Margin, Rect};
use ratatui::text::Span;
use ratatui::widgets::Paragraph;

pub fn draw(f: &mut Frame, area: Rect, r: &Receipt) {
    let title_text = if r.amount.currency == crate::money::Currency::AUTHENTICATION {
        strings::RECEIPT_AUTHENTICATED
    } else {
        strings::receipt_title(r.kind)
    };
    let block = screen_block(title_text);
    let inner = block.inner(area).inner(Margin::new(2, 1));
    f.render_widget(block, area);
    let [title, _, lines_area, _, bal_label, big, _, refs] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(3),
        Constraint::Length(1),
        Constraint::Length(1),
        Constraint::Length(BIG_HEIGHT),
        Constraint::Length(1),
        Constraint::Min(0),
    ])
    .areas(inner);
    f.render_widget(
        Paragraph::new(Span::styled(title_text, theme::good())),
        title,
    );
    f.render_widget(
        Paragraph::new(vec![
            label_value(strings::OFFER_ITEM, r.item.clone(), theme::value()),
            label_value(strings::OFFER_MERCHANT, r.merchant.clone(), theme::value()),
            label_value(
                strings::RECEIPT_AMOUNT,
                r.amount.to_string(),
                theme::amount(),
            ),
        ]),
        lines_area,
    );
    f.render_widget(
        Paragraph::new(Span::styled(strings::RECEIPT_NEW_BALANCE, theme::label())),
        bal_label,
    );
    let text = r.balance_after.to_string();
    f.render_widget(
        BigText {
            text: &text,
            style: theme::amount(),
        },
        big,
    );
    f.render_widget(
        Paragraph::new(vec![
            label_value(strings::RECEIPT_DATE, r.date.to_string(), theme::value()),
            label_value(strings::RECEIPT_REF, r.txid.to_string(), theme::value()),
        ]),
        refs,
    );
}
