//! The progress screen: the steps of a purchase or load, the current one named. Keys are
//! ignored here on purpose: a debit in flight is not something the remote can interrupt.

use super::screen_block;
use crate::model::{ProgressStep, TxKind};
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Margin, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Progress {
    pub kind: TxKind,
    /// `None` until the daemon names a step (right after the viewer's OK).
    pub step: Option<ProgressStep>,
}

fn steps(kind: TxKind) -> [ProgressStep; 4] {
    let card = match kind {
        TxKind::Purchase | TxKind::TransferOut => ProgressStep::DebitingCard,
        TxKind::Load
        | TxKind::Refund
        | TxKind::Unload
        | TxKind::TransferIn
        | TxKind::TransferBack => ProgressStep::LoadingCard,
    };
    [
        ProgressStep::ReadingCard,
        ProgressStep::ContactingServer,
        card,
        ProgressStep::Confirming,
    ]
}

const SPINNER: [&str; 4] = ["|", "/", "-", "\\"];

impl Progress {
    pub fn draw(&self, f: &mut Frame, area: Rect, ticks: u64) {
        let block = screen_block(strings::PROGRESS_TITLE);
        let inner = block.inner(area).inner(Margin::new(2, 1));
        f.render_widget(block, area);
        let all = steps(self.kind);
        let current = self.step.and_then(|s| all.iter().position(|x| *x == s));
        let spin = SPINNER[(ticks % 4) as usize];
        let mut lines = vec![Line::from("")];
        for (i, s) in all.iter().enumerate() {
            let (mark, style) = match current {
                Some(c) if i < c => ("[x]".to_string(), theme::good()),
                Some(c) if i == c => (format!("[{spin}]"), theme::amount()),
                _ => ("[ ]".to_string(), theme::dim()),
            };
            lines.push(Line::from(vec![
                Span::styled(format!("{mark}  "), style),
                Span::styled(strings::progress_step(*s), style),
            ]));
            lines.push(Line::from(""));
        }
        let now = match self.step {
            Some(s) => format!("{}...", strings::progress_step(s)),
            None => strings::PROGRESS_WAITING.to_string(),
        };
        lines.push(Line::from(Span::styled(now, theme::amount())));
        lines.push(Line::from(""));
        lines.push(Line::from(Span::styled(
            strings::PROGRESS_DO_NOT_REMOVE,
            theme::value(),
        )));
        f.render_widget(Paragraph::new(lines), inner);
    }
}
