//! Text from outside the UI — the network (offer titles, merchant names, catalog entries,
//! refusal reasons), the card and the reader — made safe to draw on a terminal.
//!
//! A string that reaches the terminal with an escape sequence in it is a command to the
//! terminal, not text: `\x1b[2J` clears the screen, `\x1b]0;…\x07` sets the window title,
//! `\r\n` moves the cursor, and text drawn after that lands outside the dialog the viewer is
//! reading. So:
//!
//! - [`clean`] is the one sanitising function: it drops every control character (C0, DEL,
//!   C1 — ESC and CSI among them) and the invisible format characters that reorder or hide
//!   text (bidi overrides and isolates, zero-width characters), turns line breaks and tabs into
//!   spaces, and caps the length so a long title can't crowd out the price. The App applies it
//!   to every string of every model update as it arrives ([`crate::UiUpdate::sanitized`]), so
//!   the screens only ever hold clean text.
//! - [`scrub`] is the last line: after every frame is drawn, any cell that still holds such a
//!   character (from a caller that built a screen by hand) is blanked before the frame goes to
//!   the terminal.

use ratatui::buffer::Buffer;

/// An item or offer title.
pub const MAX_TITLE: usize = 60;
/// A merchant's or provider's name.
pub const MAX_NAME: usize = 40;
/// A catalog item's second line.
pub const MAX_DETAIL: usize = 80;
/// A refusal reason or other technical detail (the error screen wraps it).
pub const MAX_REASON: usize = 200;
/// A reference (transaction id) or a reader's name.
pub const MAX_REF: usize = 64;
/// The card provider's name in the header line.
pub const MAX_PROVIDER: usize = 24;

/// Characters that must never reach the terminal: control characters (C0 `U+0000–U+001F`,
/// DEL `U+007F`, C1 `U+0080–U+009F`) and invisible format characters that reorder or hide
/// text (`U+200B–U+200F`, `U+202A–U+202E`, `U+2060–U+2064`, `U+2066–U+2069`, `U+FEFF`) or break
/// lines (`U+2028`, `U+2029`).
pub fn is_unsafe(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{2064}'
                | '\u{2066}'..='\u{2069}'
                | '\u{feff}'
        )
}

/// `s` as terminal-safe text of at most `max_chars` characters: unsafe characters
/// ([`is_unsafe`]) dropped, except line breaks and tabs, which become one space; runs of
/// spaces collapsed, the ends trimmed; cut with `…` when longer.
pub fn clean(s: &str, max_chars: usize) -> String {
    let mut chars: Vec<char> = Vec::with_capacity(s.len().min(max_chars + 1));
    for c in s.chars() {
        let c = match c {
            '\t' | '\n' | '\r' | '\u{0b}' | '\u{0c}' | '\u{85}' | '\u{2028}' | '\u{2029}' => ' ',
            c if is_unsafe(c) => continue,
            c => c,
        };
        if c == ' ' && chars.last().is_none_or(|l| *l == ' ') {
            continue;
        }
        chars.push(c);
        if chars.len() > max_chars {
            break;
        }
    }
    while chars.last() == Some(&' ') {
        chars.pop();
    }
    if chars.len() > max_chars {
        chars.truncate(max_chars.saturating_sub(1));
        while chars.last() == Some(&' ') {
            chars.pop();
        }
        if max_chars > 0 {
            chars.push('…');
        }
    }
    chars.into_iter().collect()
}

/// Blanks every cell of a drawn frame whose symbol holds an unsafe character ([`is_unsafe`]).
pub fn scrub(buf: &mut Buffer) {
    for cell in buf.content.iter_mut() {
        if cell.symbol().chars().any(is_unsafe) {
            cell.set_symbol(" ");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_sequences_lose_their_escape() {
        assert_eq!(
            clean("\x1b[2J\x1b]0;pwn\x07\x1b[31mHi\r\nthere\x1b[0m", 60),
            "[2J]0;pwn[31mHi there[0m"
        );
        assert_eq!(clean("a\u{9b}31mb\u{7f}c\u{0}d", 60), "a31mbcd");
        assert_eq!(clean("\u{202e}evil\u{200b}\u{feff}", 60), "evil");
        assert!(!clean("\u{85}x\u{2028}y\t\tz", 60).chars().any(is_unsafe));
    }

    #[test]
    fn long_text_is_cut_with_an_ellipsis() {
        assert_eq!(clean("Cup Final", 60), "Cup Final");
        assert_eq!(clean(&"A".repeat(100), 10), format!("{}…", "A".repeat(9)));
        assert_eq!(clean("abcd efgh", 6), "abcd…");
        assert_eq!(clean("  spaced   out  ", 60), "spaced out");
        assert_eq!(clean("x", 0), "");
        // Multi-byte characters are counted as characters, never split.
        assert_eq!(clean(&"é".repeat(20), 5), "éééé…");
    }

    #[test]
    fn scrub_blanks_cells_with_unsafe_symbols() {
        let mut buf = Buffer::empty(ratatui::layout::Rect::new(0, 0, 4, 1));
        buf[(0, 0)].set_symbol("\x1b");
        buf[(1, 0)].set_symbol("a");
        buf[(2, 0)].set_symbol("e\u{202e}");
        scrub(&mut buf);
        let row: String = (0..4).map(|x| buf[(x, 0)].symbol()).collect();
        assert_eq!(row, " a  ");
    }
}
