//! Loading value: choose the source, wait for the maximum, then type the amount
//! ([`super::amount`]).

use super::amount::{AmountAction, AmountEntry};
use super::screen_block;
use crate::keymap::RemoteKey;
use crate::model::LoadSource;
use crate::money::Money;
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Margin, Rect};
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
    Source { sel: usize },
    Waiting,
    Amount(AmountEntry),
}

impl LoadView {
    pub fn new() -> Self {
        LoadView::Source { sel: 0 }
    }

    pub fn amount(max: Money) -> Self {
        LoadView::Amount(AmountEntry::new(max))
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
            LoadView::Amount(entry) => match entry.handle(key) {
                Some(AmountAction::Submit(minor)) => return Some(LoadAction::Submit(minor)),
                Some(AmountAction::Cancel) => return Some(LoadAction::Cancel),
                None => {}
            },
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
            LoadView::Amount(entry) => entry.draw(f, inner),
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
}
