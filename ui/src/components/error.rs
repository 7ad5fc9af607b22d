//! Error screens: what happened and what to do, per `ErrorKind`. OK or BACK returns home.

use super::screen_block;
use crate::model::UiError;
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Paragraph, Wrap};

pub fn draw(f: &mut Frame, area: Rect, e: &UiError) {
    let (title, happened, todo) = strings::error_texts(e.kind);
    let block = screen_block(title).border_style(theme::bad());
    let inner = block.inner(area).inner(Margin::new(2, 1));
    f.render_widget(block, area);
    let mut lines = vec![
        Line::from(Span::styled(title, theme::bad())),
        Line::from(""),
        Line::from(Span::styled(happened, theme::value())),
        Line::from(""),
        Line::from(Span::styled(todo, theme::amount())),
        Line::from(""),
    ];
    if let Some(d) = &e.detail {
        lines.push(Line::from(vec![
            Span::styled(format!("{}: ", strings::ERROR_DETAIL), theme::label()),
            Span::styled(d.clone(), theme::label()),
        ]));
    }
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: true }), inner);
}
