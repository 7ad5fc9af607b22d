//! The remote-control keymap: crossterm key events → `RemoteKey`.
//!
//! This file owns the remote's key set, the default bindings, the key-name syntax and the
//! TOML `[keymap]` table that overrides them, e.g.
//!
//! ```toml
//! [keymap]
//! ok = ["Enter", "Space"]
//! back = ["Esc", "Backspace"]
//! menu = "m"
//! red = "F1"
//! ```
//!
//! Action names: `0`…`9`, `ok`, `back`, `up`, `down`, `left`, `right`, `menu`, `info`, `red`,
//! `green`, `yellow`, `blue`, `quit`. An action listed in the table replaces its defaults; the
//! others keep theirs. Key names: a single character (`m`, `5`), `Enter`, `Esc`, `Backspace`,
//! `Tab`, `Space`, `Up`, `Down`, `Left`, `Right`, `Home`, `End`, `PageUp`, `PageDown`, `Insert`,
//! `Delete`, `F1`…`F12`, with optional `Ctrl+` / `Alt+` prefixes.
//!
//! The Linux console sends F1–F5 as `ESC [ [ A`…`E` and BACKSPACE as DEL; crossterm decodes
//! both to the same key codes as a terminal emulator does, so one keymap serves both.

use crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

/// A key of the set-top box remote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RemoteKey {
    /// 0–9. Values above 9 are never produced by the keymap.
    Digit(u8),
    Ok,
    Back,
    Up,
    Down,
    Left,
    Right,
    Menu,
    Info,
    Red,
    Green,
    Yellow,
    Blue,
    /// Not on a remote: lets a developer leave the demo. The daemon decides what it means.
    Quit,
}

impl RemoteKey {
    /// The action name used in the `[keymap]` table.
    pub fn action_name(self) -> String {
        match self {
            RemoteKey::Digit(d) => d.to_string(),
            other => ACTIONS
                .iter()
                .find(|(_, k)| *k == other)
                .map(|(n, _)| (*n).to_string())
                .unwrap_or_default(),
        }
    }

    fn from_action_name(name: &str) -> Option<RemoteKey> {
        if let [b @ b'0'..=b'9'] = name.as_bytes() {
            return Some(RemoteKey::Digit(b - b'0'));
        }
        let lower = name.to_ascii_lowercase();
        ACTIONS.iter().find(|(n, _)| *n == lower).map(|(_, k)| *k)
    }
}

const ACTIONS: &[(&str, RemoteKey)] = &[
    ("ok", RemoteKey::Ok),
    ("back", RemoteKey::Back),
    ("up", RemoteKey::Up),
    ("down", RemoteKey::Down),
    ("left", RemoteKey::Left),
    ("right", RemoteKey::Right),
    ("menu", RemoteKey::Menu),
    ("info", RemoteKey::Info),
    ("red", RemoteKey::Red),
    ("green", RemoteKey::Green),
    ("yellow", RemoteKey::Yellow),
    ("blue", RemoteKey::Blue),
    ("quit", RemoteKey::Quit),
];

/// One key name or a list of them, as written in TOML.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum KeyNames {
    One(String),
    Many(Vec<String>),
}

impl KeyNames {
    fn as_slice(&self) -> &[String] {
        match self {
            KeyNames::One(s) => std::slice::from_ref(s),
            KeyNames::Many(v) => v,
        }
    }
}

/// The `[keymap]` table: action name → key name(s). Embed it in a bigger config with
/// `#[serde(default)] keymap: KeymapConfig`.
pub type KeymapConfig = BTreeMap<String, KeyNames>;

/// A whole config file of which only the `[keymap]` table matters here.
#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    keymap: KeymapConfig,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeymapError {
    #[error("keymap TOML: {0}")]
    Toml(String),
    #[error(
        "unknown keymap action {0:?} (expected 0-9, ok, back, up, down, left, right, menu, info, red, green, yellow, blue, quit)"
    )]
    UnknownAction(String),
    #[error("unknown key name {0:?} for action {1:?}")]
    UnknownKey(String, String),
    #[error("key {key:?} is bound to both {first:?} and {second:?}")]
    Conflict {
        key: String,
        first: String,
        second: String,
    },
}

/// A key as the keymap compares it: code plus the modifiers that matter (Ctrl, Alt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Chord {
    code: KeyCode,
    ctrl: bool,
    alt: bool,
}

impl Chord {
    fn from_event(ev: &KeyEvent) -> Chord {
        // Shift is dropped: it is already folded into the character ('M' vs 'm'), and terminals
        // disagree on whether they report it.
        Chord {
            code: ev.code,
            ctrl: ev.modifiers.contains(KeyModifiers::CONTROL),
            alt: ev.modifiers.contains(KeyModifiers::ALT),
        }
    }

    fn parse(name: &str) -> Option<Chord> {
        let mut ctrl = false;
        let mut alt = false;
        let mut rest = name.trim();
        loop {
            let lower = rest.to_ascii_lowercase();
            if lower.starts_with("ctrl+") && rest.len() > 5 {
                ctrl = true;
                rest = &rest[5..];
            } else if lower.starts_with("alt+") && rest.len() > 4 {
                alt = true;
                rest = &rest[4..];
            } else {
                break;
            }
        }
        let mut chars = rest.chars();
        let code = match (chars.next(), chars.next()) {
            (Some(c), None) => KeyCode::Char(if ctrl { c.to_ascii_lowercase() } else { c }),
            _ => match rest.to_ascii_lowercase().as_str() {
                "enter" | "return" => KeyCode::Enter,
                "esc" | "escape" => KeyCode::Esc,
                "backspace" => KeyCode::Backspace,
                "tab" => KeyCode::Tab,
                "space" => KeyCode::Char(' '),
                "up" => KeyCode::Up,
                "down" => KeyCode::Down,
                "left" => KeyCode::Left,
                "right" => KeyCode::Right,
                "home" => KeyCode::Home,
                "end" => KeyCode::End,
                "pageup" => KeyCode::PageUp,
                "pagedown" => KeyCode::PageDown,
                "insert" => KeyCode::Insert,
                "delete" | "del" => KeyCode::Delete,
                f if f.starts_with('f') => {
                    let n: u8 = f[1..].parse().ok()?;
                    if !(1..=12).contains(&n) {
                        return None;
                    }
                    KeyCode::F(n)
                }
                _ => return None,
            },
        };
        Some(Chord { code, ctrl, alt })
    }
}

/// The compiled keymap.
#[derive(Debug, Clone)]
pub struct Keymap {
    keys: HashMap<Chord, RemoteKey>,
}

impl Default for Keymap {
    fn default() -> Self {
        Self::from_config(&KeymapConfig::new()).expect("default keymap is consistent")
    }
}

/// The default bindings, as key names, so they go through the same parser as the TOML.
fn defaults() -> Vec<(RemoteKey, Vec<&'static str>)> {
    let mut v: Vec<(RemoteKey, Vec<&'static str>)> = vec![
        (RemoteKey::Ok, vec!["Enter"]),
        (RemoteKey::Back, vec!["Esc", "Backspace"]),
        (RemoteKey::Up, vec!["Up"]),
        (RemoteKey::Down, vec!["Down"]),
        (RemoteKey::Left, vec!["Left"]),
        (RemoteKey::Right, vec!["Right"]),
        (RemoteKey::Menu, vec!["m"]),
        (RemoteKey::Info, vec!["i"]),
        (RemoteKey::Red, vec!["F1"]),
        (RemoteKey::Green, vec!["F2"]),
        (RemoteKey::Yellow, vec!["F3"]),
        (RemoteKey::Blue, vec!["F4"]),
        (RemoteKey::Quit, vec!["Ctrl+c"]),
    ];
    const DIGITS: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];
    for (d, name) in (0u8..).zip(DIGITS) {
        v.push((RemoteKey::Digit(d), vec![name]));
    }
    v
}

impl Keymap {
    /// Parses a TOML document and uses its `[keymap]` table (other tables are ignored, so the
    /// daemon's whole config file can be passed).
    pub fn from_toml_str(text: &str) -> Result<Keymap, KeymapError> {
        let file: ConfigFile =
            toml::from_str(text).map_err(|e| KeymapError::Toml(e.to_string()))?;
        Self::from_config(&file.keymap)
    }

    /// Defaults overridden per action by `overrides`.
    pub fn from_config(overrides: &KeymapConfig) -> Result<Keymap, KeymapError> {
        let mut bindings: BTreeMap<RemoteKey, Vec<String>> = defaults()
            .into_iter()
            .map(|(k, names)| (k, names.into_iter().map(String::from).collect()))
            .collect();
        for (action, names) in overrides {
            let key = RemoteKey::from_action_name(action)
                .ok_or_else(|| KeymapError::UnknownAction(action.clone()))?;
            bindings.insert(key, names.as_slice().to_vec());
        }
        let mut keys: HashMap<Chord, RemoteKey> = HashMap::new();
        let mut names_by_chord: HashMap<Chord, String> = HashMap::new();
        for (key, names) in bindings {
            for name in names {
                let chord = Chord::parse(&name)
                    .ok_or_else(|| KeymapError::UnknownKey(name.clone(), key.action_name()))?;
                if let Some(prev) = keys.insert(chord, key) {
                    if prev != key {
                        return Err(KeymapError::Conflict {
                            key: names_by_chord.remove(&chord).unwrap_or(name),
                            first: prev.action_name(),
                            second: key.action_name(),
                        });
                    }
                }
                names_by_chord.insert(chord, name);
            }
        }
        Ok(Keymap { keys })
    }

    /// The remote key for a terminal key event; `None` for unbound keys and key releases.
    pub fn map(&self, ev: &KeyEvent) -> Option<RemoteKey> {
        // Terminals with the kitty protocol report releases too; a remote button is one press.
        if ev.kind == KeyEventKind::Release {
            return None;
        }
        self.keys.get(&Chord::from_event(ev)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(code: KeyCode) -> KeyEvent {
        KeyEvent::new(code, KeyModifiers::NONE)
    }

    #[test]
    fn defaults_cover_the_remote() {
        let km = Keymap::default();
        assert_eq!(km.map(&key(KeyCode::Enter)), Some(RemoteKey::Ok));
        assert_eq!(km.map(&key(KeyCode::Esc)), Some(RemoteKey::Back));
        assert_eq!(km.map(&key(KeyCode::Backspace)), Some(RemoteKey::Back));
        assert_eq!(km.map(&key(KeyCode::Char('7'))), Some(RemoteKey::Digit(7)));
        assert_eq!(km.map(&key(KeyCode::Char('m'))), Some(RemoteKey::Menu));
        assert_eq!(km.map(&key(KeyCode::Char('i'))), Some(RemoteKey::Info));
        assert_eq!(km.map(&key(KeyCode::F(1))), Some(RemoteKey::Red));
        assert_eq!(km.map(&key(KeyCode::F(4))), Some(RemoteKey::Blue));
        assert_eq!(km.map(&key(KeyCode::Up)), Some(RemoteKey::Up));
        assert_eq!(
            km.map(&KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)),
            Some(RemoteKey::Quit)
        );
        // plain 'c' is not quit
        assert_eq!(km.map(&key(KeyCode::Char('c'))), None);
        assert_eq!(km.map(&key(KeyCode::F(9))), None);
    }

    #[test]
    fn releases_are_ignored_and_shift_is_folded() {
        let km = Keymap::default();
        let mut ev = key(KeyCode::Enter);
        ev.kind = KeyEventKind::Release;
        assert_eq!(km.map(&ev), None);
        let shifted = KeyEvent::new(KeyCode::Char('m'), KeyModifiers::SHIFT);
        assert_eq!(km.map(&shifted), Some(RemoteKey::Menu));
    }

    #[test]
    fn toml_overrides_one_action_and_keeps_the_rest() {
        let km = Keymap::from_toml_str(
            r#"
            [other]
            ignored = true
            [keymap]
            ok = ["Enter", "Space"]
            menu = "Home"
            red = "r"
            "5" = "F5"
            "#,
        )
        .expect("valid");
        assert_eq!(km.map(&key(KeyCode::Char(' '))), Some(RemoteKey::Ok));
        assert_eq!(km.map(&key(KeyCode::Home)), Some(RemoteKey::Menu));
        assert_eq!(
            km.map(&key(KeyCode::Char('m'))),
            None,
            "menu default replaced"
        );
        assert_eq!(km.map(&key(KeyCode::Char('r'))), Some(RemoteKey::Red));
        assert_eq!(km.map(&key(KeyCode::F(1))), None);
        assert_eq!(km.map(&key(KeyCode::F(5))), Some(RemoteKey::Digit(5)));
        assert_eq!(
            km.map(&key(KeyCode::Esc)),
            Some(RemoteKey::Back),
            "default kept"
        );
    }

    #[test]
    fn bad_configs_are_rejected_with_a_reason() {
        assert!(matches!(
            Keymap::from_toml_str("[keymap]\nselect = \"x\""),
            Err(KeymapError::UnknownAction(a)) if a == "select"
        ));
        assert!(matches!(
            Keymap::from_toml_str("[keymap]\nok = \"Hyper+Q\""),
            Err(KeymapError::UnknownKey(..))
        ));
        assert!(matches!(
            Keymap::from_toml_str("[keymap]\nok = \"F13\""),
            Err(KeymapError::UnknownKey(..))
        ));
        // 'm' is MENU by default: binding it to INFO too is a conflict
        assert!(matches!(
            Keymap::from_toml_str("[keymap]\ninfo = \"m\""),
            Err(KeymapError::Conflict { .. })
        ));
        assert!(matches!(
            Keymap::from_toml_str("[keymap\n"),
            Err(KeymapError::Toml(_))
        ));
        assert!(Keymap::from_toml_str("").is_ok());
    }

    #[test]
    fn example_file_is_the_defaults() {
        let example = Keymap::from_toml_str(include_str!("../keymap.example.toml"))
            .expect("example keymap parses");
        let defaults = Keymap::default();
        assert_eq!(example.keys, defaults.keys);
    }

    #[test]
    fn modifiers_parse() {
        let km = Keymap::from_toml_str("[keymap]\ninfo = \"Alt+i\"\nquit = \"Ctrl+Q\"").unwrap();
        assert_eq!(
            km.map(&KeyEvent::new(KeyCode::Char('i'), KeyModifiers::ALT)),
            Some(RemoteKey::Info)
        );
        assert_eq!(
            km.map(&KeyEvent::new(KeyCode::Char('q'), KeyModifiers::CONTROL)),
            Some(RemoteKey::Quit)
        );
        assert_eq!(km.map(&key(KeyCode::Char('i'))), None);
    }
}
