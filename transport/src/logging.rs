//! Log hygiene for every daemon (the head end's roles, `stbd`): every field of every log
//! line and span — the message included — is written with control characters escaped
//! (`\n`, `\r`, `\0`, ESC…) and cut at [`MAX_FIELD_CHARS`], so a value that came from the
//! network (an item id, a transaction id, a reason) can never start a forged line of its own
//! or flood the journal. Secrets never get this far: they are [`proto::secret::Secret`]s,
//! which print a mask.

use std::fmt::{self, Write};

use tracing_subscriber::field::MakeExt;

/// The longest a field's value may be in a log line, in characters.
pub const MAX_FIELD_CHARS: usize = 256;

/// `s` with control characters escaped and cut at `max` characters (the cut says how many
/// characters were left out).
pub fn escape(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max + 16));
    for (n, c) in s.chars().enumerate() {
        if n == max {
            let left = s.chars().count() - n;
            let _ = write!(out, "…(+{left} chars)");
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// Initialises `tracing` for a daemon: `filter`, to stderr (the journal under systemd),
/// colour only on a terminal, and every field escaped ([`escape`]).
pub fn init(filter: tracing_subscriber::EnvFilter) {
    use std::io::IsTerminal;
    let fields = tracing_subscriber::fmt::format::debug_fn(
        |w: &mut tracing_subscriber::fmt::format::Writer<'_>,
         field: &tracing::field::Field,
         value: &dyn fmt::Debug| {
            let v = escape(&format!("{value:?}"), MAX_FIELD_CHARS);
            if field.name() == "message" {
                w.write_str(&v)
            } else {
                write!(w, "{}={v}", field.name())
            }
        },
    )
    .delimited(" ");
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .fmt_fields(fields)
        .init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_values_cut() {
        let forged = "ppv-1\n2026-11-30T00:00:00Z  INFO merchant: goods released\0\u{1b}[31m";
        let e = escape(forged, MAX_FIELD_CHARS);
        assert!(!e.chars().any(char::is_control), "{e}");
        assert!(e.contains("\\n2026") && e.contains("\\u{0}") && e.contains("\\u{1b}"));
        let long = "x".repeat(1000);
        let e = escape(&long, 10);
        assert_eq!(e, format!("{}…(+990 chars)", "x".repeat(10)));
        assert_eq!(escape("plain", 10), "plain");
    }
}
