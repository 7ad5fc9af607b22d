//! The catalog screen: pay-per-view events and the shopping channel as two tabs.
//! LEFT/RIGHT switch tabs, UP/DOWN move, a digit jumps to that line, OK chooses.

use super::screen_block;
use crate::keymap::RemoteKey;
use crate::model::{Catalog, CatalogId, CatalogItem};
use crate::strings;
use crate::theme;
use ratatui::Frame;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Cell, Paragraph, Row, Table, TableState, Tabs};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CatalogAction {
    Select(CatalogId),
    Back,
}

#[derive(Debug, Default, Clone)]
pub struct CatalogView {
    tab: usize,
    sel: usize,
}

fn section(catalog: &Catalog, tab: usize) -> &[CatalogItem] {
    if tab == 0 {
        &catalog.pay_per_view
    } else {
        &catalog.shopping
    }
}

impl CatalogView {
    pub fn handle(&mut self, key: RemoteKey, catalog: Option<&Catalog>) -> Option<CatalogAction> {
        let empty = Catalog::default();
        let catalog = catalog.unwrap_or(&empty);
        let len = section(catalog, self.tab).len();
        match key {
            RemoteKey::Back => return Some(CatalogAction::Back),
            RemoteKey::Left | RemoteKey::Right => {
                self.tab = 1 - self.tab.min(1);
                self.sel = 0;
            }
            RemoteKey::Up if len > 0 => self.sel = (self.sel + len - 1) % len,
            RemoteKey::Down if len > 0 => self.sel = (self.sel + 1) % len,
            RemoteKey::Digit(d) if (1..=len).contains(&usize::from(d)) => {
                self.sel = usize::from(d) - 1;
            }
            RemoteKey::Ok => {
                return section(catalog, self.tab)
                    .get(self.sel)
                    .map(|i| CatalogAction::Select(i.id.clone()));
            }
            _ => {}
        }
        None
    }

    /// The item the cursor is on, if the shown tab has any.
    #[must_use]
    pub fn highlighted<'a>(&self, catalog: Option<&'a Catalog>) -> Option<&'a CatalogId> {
        section(catalog?, self.tab).get(self.sel).map(|i| &i.id)
    }

    /// Keeps the selection inside the list after the catalog changed.
    pub fn clamp(&mut self, catalog: &Catalog) {
        let len = section(catalog, self.tab).len();
        if self.sel >= len {
            self.sel = len.saturating_sub(1);
        }
    }

    pub fn draw(&self, f: &mut Frame, area: Rect, catalog: Option<&Catalog>) {
        let block = screen_block(strings::CATALOG_TITLE);
        let inner = block.inner(area);
        f.render_widget(block, area);
        let [tabs_area, _, list_area] = Layout::vertical([
            Constraint::Length(1),
            Constraint::Length(1),
            Constraint::Min(0),
        ])
        .areas(inner.inner(ratatui::layout::Margin::new(1, 0)));

        let tabs = Tabs::new(vec![strings::CATALOG_PPV, strings::CATALOG_SHOPPING])
            .select(self.tab)
            .style(theme::value())
            .highlight_style(theme::selected())
            .divider(" | ");
        f.render_widget(tabs, tabs_area);

        let Some(catalog) = catalog else {
            f.render_widget(
                Paragraph::new(Span::styled(strings::CATALOG_LOADING, theme::label())),
                list_area,
            );
            return;
        };
        let items = section(catalog, self.tab);
        if items.is_empty() {
            f.render_widget(
                Paragraph::new(Span::styled(strings::CATALOG_EMPTY, theme::label())),
                list_area,
            );
            return;
        }
        let rows: Vec<Row> = items
            .iter()
            .enumerate()
            .map(|(i, it)| {
                Row::new(vec![
                    Cell::from(format!("{}", i + 1)),
                    Cell::from(Line::from(vec![Span::raw(it.title.clone())])),
                    Cell::from(Span::raw(it.detail.clone())),
                    Cell::from(Line::from(it.price.to_string()).right_aligned()),
                ])
                .style(theme::value())
                .height(2)
            })
            .collect();
        let table = Table::new(
            rows,
            [
                Constraint::Length(2),
                Constraint::Fill(3),
                Constraint::Fill(2),
                Constraint::Length(14),
            ],
        )
        .row_highlight_style(theme::selected())
        .style(theme::base());
        let mut state = TableState::default().with_selected(Some(self.sel));
        f.render_stateful_widget(table, list_area, &mut state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::{Currency, Money};

    fn cat() -> Catalog {
        let item = |id: &str| CatalogItem {
            id: CatalogId(id.into()),
            title: id.into(),
            price: Money::new(100, Currency::EUR),
            detail: String::new(),
        };
        Catalog {
            pay_per_view: vec![item("a"), item("b")],
            shopping: vec![item("s")],
        }
    }

    #[test]
    fn navigation_and_selection() {
        let c = cat();
        let mut v = CatalogView::default();
        assert_eq!(v.handle(RemoteKey::Down, Some(&c)), None);
        assert_eq!(
            v.handle(RemoteKey::Ok, Some(&c)),
            Some(CatalogAction::Select(CatalogId("b".into())))
        );
        v.handle(RemoteKey::Right, Some(&c));
        assert_eq!(
            v.handle(RemoteKey::Ok, Some(&c)),
            Some(CatalogAction::Select(CatalogId("s".into())))
        );
        v.handle(RemoteKey::Left, Some(&c));
        v.handle(RemoteKey::Digit(2), Some(&c));
        v.handle(RemoteKey::Digit(7), Some(&c)); // out of range: ignored
        assert_eq!(
            v.handle(RemoteKey::Ok, Some(&c)),
            Some(CatalogAction::Select(CatalogId("b".into())))
        );
        assert_eq!(
            v.handle(RemoteKey::Back, Some(&c)),
            Some(CatalogAction::Back)
        );
    }

    #[test]
    fn empty_catalog_selects_nothing() {
        let mut v = CatalogView::default();
        assert_eq!(v.handle(RemoteKey::Down, None), None);
        assert_eq!(v.handle(RemoteKey::Ok, None), None);
        assert_eq!(v.handle(RemoteKey::Ok, Some(&Catalog::default())), None);
    }
}
