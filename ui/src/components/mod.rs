//! Screens: one file per screen, each with its own state, key handling and drawing.
//!
//! This file owns what they share: the framed screen block, label/value lines and the footer
//! of key hints. A component never emits an `Intent` itself; it returns its own small action
//! enum and `App` decides what that means, so screens stay unaware of one another.

pub mod amount;
pub mod catalog;
pub mod error;
pub mod history;
pub mod home;
pub mod load;
pub mod pin;
pub mod progress;
pub mod receipt;
pub mod transfer;

use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::{Color, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Paragraph};

/// The bordered frame every screen is drawn in.
pub fn screen_block(title: &str) -> Block<'_> {
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Double)
        .border_style(theme::border())
        .style(theme::base())
        .title(Span::styled(format!(" {title} "), theme::title()))
}

/// "Label:  value" with the label padded so a column of them lines up.
pub fn label_value<'a>(label: &str, value: impl Into<String>, style: Style) -> Line<'a> {
    Line::from(vec![
        Span::styled(format!("{label:<14}"), theme::label()),
        Span::styled(value.into(), style),
    ])
}

/// One entry of the footer: a key badge and what it does.
#[derive(Debug, Clone, Copy)]
pub struct Hint {
    pub key: &'static str,
    pub badge: Color,
    pub text: &'static str,
}

impl Hint {
    pub const fn new(key: &'static str, badge: Color, text: &'static str) -> Self {
        Hint { key, badge, text }
    }
    pub const fn ok(text: &'static str) -> Self {
        Hint::new(strings::KEY_OK, Color::White, text)
    }
    pub const fn back(text: &'static str) -> Self {
        Hint::new(strings::KEY_BACK, Color::White, text)
    }
}

/// The colour-key shortcuts shown on the browsing screens.
pub const COLOUR_HINTS: [Hint; 4] = [
    Hint::new("F1", Color::Red, strings::HINT_RED),
    Hint::new("F2", Color::Green, strings::HINT_GREEN),
    Hint::new("F3", Color::Yellow, strings::HINT_YELLOW),
    Hint::new("F4", Color::Blue, strings::HINT_BLUE),
];

pub fn draw_footer(f: &mut Frame, area: Rect, hints: &[Hint]) {
    let mut spans = Vec::new();
    for h in hints {
        spans.push(Span::styled(
            format!(" {} ", h.key),
            theme::key_badge(h.badge),
        ));
        spans.push(Span::styled(format!(" {}  ", h.text), theme::label()));
    }
    f.render_widget(Paragraph::new(Line::from(spans)).style(theme::base()), area);
}
