//! Card history: the card's own log as a table, with a bar chart of recent spending.
//! UP/DOWN scroll, BACK returns home.

use super::screen_block;
use crate::keymap::RemoteKey;
use crate::model::{HistoryEntry, TxKind};
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Bar, BarChart, BarGroup, Block, Cell, Paragraph, Row, Table, TableState};

/// How many recent purchases the chart shows (fits 72 columns at 5+1 per bar).
const CHART_BARS: usize = 10;

#[derive(Debug, Default, Clone)]
pub struct HistoryView {
    sel: usize,
}

impl HistoryView {
    /// `true` when the viewer wants to leave.
    pub fn handle(&mut self, key: RemoteKey, len: usize) -> bool {
        match key {
            RemoteKey::Back | RemoteKey::Ok => return true,
            RemoteKey::Up => self.sel = self.sel.saturating_sub(1),
            RemoteKey::Down if len > 0 => self.sel = (self.sel + 1).min(len - 1),
            _ => {}
        }
        false
    }

    pub fn draw(&self, f: &mut Frame, area: Rect, entries: Option<&[HistoryEntry]>) {
        let block = screen_block(strings::HISTORY_TITLE);
        let inner = block.inner(area).inner(Margin::new(1, 0));
        f.render_widget(block, area);
        let Some(entries) = entries else {
            f.render_widget(
                Paragraph::new(Span::styled(strings::HISTORY_LOADING, theme::label())),
                inner,
            );
            return;
        };
        if entries.is_empty() {
            f.render_widget(
                Paragraph::new(Span::styled(strings::HISTORY_EMPTY, theme::label())),
                inner,
            );
            return;
        }
        let [table_area, chart_area] =
            Layout::vertical([Constraint::Min(4), Constraint::Length(7)]).areas(inner);

        let header = Row::new(strings::HISTORY_COLUMNS.map(Cell::from)).style(theme::title());
        let rows: Vec<Row> = entries
            .iter()
            .map(|e| {
                let outgoing = matches!(
                    e.kind,
                    TxKind::Purchase | TxKind::Unload | TxKind::TransferOut
                );
                let (sign, style) = if outgoing {
                    ("-", theme::value())
                } else {
                    ("+", theme::good())
                };
                Row::new(vec![
                    Cell::from(e.date.to_string()),
                    Cell::from(strings::history_kind(e.kind)),
                    Cell::from(Line::from(format!("{sign}{}", e.amount)).right_aligned()),
                    Cell::from(Line::from(e.balance_after.to_string()).right_aligned()),
                ])
                .style(style)
            })
            .collect();
        let table = Table::new(
            rows,
            [
                Constraint::Length(11),
                Constraint::Length(9),
                Constraint::Length(16),
                Constraint::Length(16),
            ],
        )
        .header(header)
        .column_spacing(2)
        .row_highlight_style(theme::selected())
        .style(theme::base());
        let mut state = TableState::default().with_selected(Some(self.sel.min(entries.len() - 1)));
        f.render_stateful_widget(table, table_area, &mut state);

        // Most recent purchases, oldest on the left. The log is assumed newest first, as the
        // card returns it.
        let bars: Vec<Bar> = entries
            .iter()
            .filter(|e| e.kind == TxKind::Purchase)
            .take(CHART_BARS)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .map(|e| {
                Bar::default()
                    .value(e.amount.minor.max(0).unsigned_abs())
                    .text_value(e.amount.amount_text())
                    .label(Line::from(format!("{:02}-{:02}", e.date.month, e.date.day)))
            })
            .collect();
        let chart = BarChart::default()
            .block(
                Block::default()
                    .title(Span::styled(strings::HISTORY_CHART, theme::title()))
                    .style(theme::base()),
            )
            .data(BarGroup::default().bars(&bars))
            .bar_width(5)
            .bar_gap(1)
            .bar_style(theme::amount())
            .value_style(theme::selected())
            .label_style(theme::label());
        f.render_widget(chart, chart_area);
    }
}
