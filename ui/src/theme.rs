//! Look and layout rules for a TV: colours, the overscan-safe area, and big digits.
//!
//! This file owns every style the components use and the block font for amounts. Colours are
//! the 8 basic ANSI ones (bold for bright) so the Linux console renders them exactly; the
//! contrast is white/yellow on black.

use ratatui::buffer::Buffer;
use ratatui::layout::Rect;
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::Widget;

pub const BG: Color = Color::Black;

pub fn base() -> Style {
    Style::default().fg(Color::White).bg(BG)
}

pub fn title() -> Style {
    base().fg(Color::Cyan).add_modifier(Modifier::BOLD)
}

pub fn label() -> Style {
    base().fg(Color::White)
}

pub fn value() -> Style {
    base().fg(Color::White).add_modifier(Modifier::BOLD)
}

/// Amounts: the thing the viewer must read right.
pub fn amount() -> Style {
    base().fg(Color::Yellow).add_modifier(Modifier::BOLD)
}

/// The highlighted row of a list: reverse video reads from across the room.
pub fn selected() -> Style {
    Style::default()
        .fg(Color::Black)
        .bg(Color::Yellow)
        .add_modifier(Modifier::BOLD)
}

pub fn good() -> Style {
    base().fg(Color::Green).add_modifier(Modifier::BOLD)
}

pub fn bad() -> Style {
    base().fg(Color::Red).add_modifier(Modifier::BOLD)
}

pub fn dim() -> Style {
    base().fg(Color::White)
}

pub fn border() -> Style {
    base().fg(Color::White)
}

pub fn popup_border() -> Style {
    base().fg(Color::Yellow).add_modifier(Modifier::BOLD)
}

/// Colour-key hint badges, coloured like the remote's buttons.
pub fn key_badge(c: Color) -> Style {
    Style::default()
        .fg(Color::Black)
        .bg(c)
        .add_modifier(Modifier::BOLD)
}

/// The part of the screen a TV does not crop: 5 % each side, at least 2 columns and 1 row.
/// On 80×24 that is 4 columns and 1 row.
pub fn safe_area(area: Rect) -> Rect {
    let mx = (area.width / 20).max(2);
    let my = (area.height / 20).max(1);
    if area.width <= 2 * mx || area.height <= 2 * my {
        return area; // tiny terminal: use all of it rather than nothing
    }
    Rect::new(
        area.x + mx,
        area.y + my,
        area.width - 2 * mx,
        area.height - 2 * my,
    )
}

/// A centred rectangle of at most `w`×`h` inside `area`.
pub fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

/// Height in rows of [`BigText`].
pub const BIG_HEIGHT: u16 = 3;

/// 3×5 pixel glyphs, drawn with half blocks into 3 text rows.
fn glyph(c: char) -> Option<[&'static str; 5]> {
    Some(match c {
        '0' => ["###", "#.#", "#.#", "#.#", "###"],
        '1' => [".#.", "##.", ".#.", ".#.", "###"],
        '2' => ["###", "..#", "###", "#..", "###"],
        '3' => ["###", "..#", "###", "..#", "###"],
        '4' => ["#.#", "#.#", "###", "..#", "..#"],
        '5' => ["###", "#..", "###", "..#", "###"],
        '6' => ["###", "#..", "###", "#.#", "###"],
        '7' => ["###", "..#", "..#", "..#", "..#"],
        '8' => ["###", "#.#", "###", "#.#", "###"],
        '9' => ["###", "#.#", "###", "..#", "###"],
        '.' | ',' => [".", ".", ".", ".", "#"],
        '-' => ["...", "...", "###", "...", "..."],
        ' ' => ["..", "..", "..", "..", ".."],
        _ => return None,
    })
}

/// Large digits for balances and prices, readable from 3 m. Characters without a glyph
/// (letters) are drawn at normal size on the bottom row, so "12.50 EUR" becomes big "12.50"
/// with a small "EUR".
pub struct BigText<'a> {
    pub text: &'a str,
    pub style: Style,
}

impl BigText<'_> {
    /// Columns needed to draw `text` at the normal (1 column per pixel) width.
    pub fn width(text: &str) -> u16 {
        Self::width_scaled(text, 1)
    }

    fn width_scaled(text: &str, scale: usize) -> u16 {
        let w: usize = text
            .chars()
            .map(|c| glyph(c).map_or(1, |g| (g[0].len() + 1) * scale))
            .sum();
        u16::try_from(w).unwrap_or(u16::MAX)
    }
}

impl Widget for BigText<'_> {
    fn render(self, area: Rect, buf: &mut Buffer) {
        if area.height < BIG_HEIGHT {
            // Not enough room: fall back to plain text rather than a clipped glyph.
            Line::from(Span::styled(self.text, self.style)).render(area, buf);
            return;
        }
        // Twice as wide when it fits: the console's cells are tall, so doubled pixels look
        // square and read better from the sofa.
        let scale: u16 = if Self::width_scaled(self.text, 2) <= area.width {
            2
        } else {
            1
        };
        let mut x = area.x;
        let right = area.x.saturating_add(area.width);
        for c in self.text.chars() {
            match glyph(c) {
                Some(g) => {
                    let w = g[0].len() as u16;
                    for row in 0..BIG_HEIGHT {
                        for col in 0..w * scale {
                            if x + col >= right {
                                break;
                            }
                            let px = |r: usize| {
                                g.get(r)
                                    .and_then(|s| s.as_bytes().get(usize::from(col / scale)))
                                    .is_some_and(|b| *b == b'#')
                            };
                            let top = px(2 * row as usize);
                            let bottom = px(2 * row as usize + 1);
                            let ch = match (top, bottom) {
                                (true, true) => "█",
                                (true, false) => "▀",
                                (false, true) => "▄",
                                (false, false) => " ",
                            };
                            buf[(x + col, area.y + row)]
                                .set_symbol(ch)
                                .set_style(self.style);
                        }
                    }
                    x = x.saturating_add((w + 1) * scale);
                }
                None => {
                    if x < right {
                        let mut s = [0u8; 4];
                        buf[(x, area.y + BIG_HEIGHT - 1)]
                            .set_symbol(c.encode_utf8(&mut s))
                            .set_style(self.style);
                    }
                    x = x.saturating_add(1);
                }
            }
            if x >= right {
                break;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safe_area_on_80x24() {
        let a = safe_area(Rect::new(0, 0, 80, 24));
        assert_eq!(a, Rect::new(4, 1, 72, 22));
        let small = safe_area(Rect::new(0, 0, 30, 10));
        assert_eq!(small, Rect::new(2, 1, 26, 8));
        // degenerate sizes do not underflow
        assert_eq!(safe_area(Rect::new(0, 0, 3, 1)), Rect::new(0, 0, 3, 1));
    }

    #[test]
    fn big_text_draws_blocks() {
        let area = Rect::new(0, 0, 30, 3);
        let mut buf = Buffer::empty(area);
        BigText {
            text: "1.5 E",
            style: Style::default(),
        }
        .render(area, &mut buf);
        let rows: Vec<String> = (0..3)
            .map(|y| (0..30).map(|x| buf[(x, y)].symbol().to_string()).collect())
            .collect();
        // "1.5 E" needs 27 columns doubled, which fits in 30, so pixels are doubled.
        // '1' top row: pixel rows 0 (.#.) and 1 (##.) → "▄▄██  "
        assert!(rows[0].starts_with("▄▄██  "), "{rows:?}");
        assert!(rows[2].contains('E'), "{rows:?}");
        assert_eq!(BigText::width("1.5 E"), 4 + 2 + 4 + 3 + 1);
        // narrower area: single width
        let area = Rect::new(0, 0, 15, 3);
        let mut buf = Buffer::empty(area);
        BigText {
            text: "1.5 E",
            style: Style::default(),
        }
        .render(area, &mut buf);
        let top: String = (0..15).map(|x| buf[(x, 0)].symbol().to_string()).collect();
        assert!(top.starts_with("▄█ "), "{top:?}");
    }

    #[test]
    fn big_text_clips_instead_of_panicking() {
        let area = Rect::new(0, 0, 5, 3);
        let mut buf = Buffer::empty(area);
        BigText {
            text: "88888888 EUR",
            style: Style::default(),
        }
        .render(area, &mut buf);
        let area = Rect::new(0, 0, 5, 1);
        let mut buf = Buffer::empty(area);
        BigText {
            text: "123",
            style: Style::default(),
        }
        .render(area, &mut buf);
        assert_eq!(buf[(0, 0)].symbol(), "1");
    }
}
