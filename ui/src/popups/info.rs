//! The INFO popup: reader and card details and the key legend. Any key closes it.

use crate::components::label_value;
use crate::model::{CardSummary, ReaderState};
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph, Wrap};

pub fn draw(f: &mut Frame, screen: Rect, reader: &ReaderState, card: Option<&CardSummary>) {
    let area = theme::centered(screen, 60, 10);
    f.render_widget(Clear, area);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Thick)
        .border_style(theme::popup_border())
        .style(theme::base())
        .title(Span::styled(
            format!(" {} ", strings::INFO_TITLE),
            theme::title(),
        ));
    let inner = block.inner(area).inner(Margin::new(2, 1));
    f.render_widget(block, area);
    let reader_name = match reader {
        ReaderState::Ready { name } => name.clone(),
        _ => strings::INFO_NO_READER.to_string(),
    };
    let mut lines = vec![label_value(
        strings::INFO_READER,
        reader_name,
        theme::value(),
    )];
    if let Some(c) = card {
        lines.push(label_value(
            strings::HOME_PROVIDER,
            c.provider.clone(),
            theme::value(),
        ));
        lines.push(label_value(
            strings::HOME_BALANCE,
            c.balance.to_string(),
            theme::amount(),
        ));
    }
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(strings::INFO_KEYS, theme::label())));
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), inner);
}
