//! The `stbd` configuration file (TOML), every key documented in
//! `config/stbd.example.toml`.
//!
//! This file owns parsing and validation: [`Config::load`] reads the file, refuses unknown
//! keys, checks that the certificate files exist and that the values make sense, and says
//! which key is wrong. Paths stay as given; the daemon opens them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: cannot read it: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config {path}: {detail}")]
    Syntax { path: PathBuf, detail: String },
    #[error("config {path}: `{key}`: {detail}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        detail: String,
    },
    /// A value the config (or the command line) gives is not what its key takes.
    #[error(transparent)]
    Value(#[from] BadValue),
}

/// A value that is not what its key takes (the value is quoted; the key is named by
/// [`ConfigError::Invalid`] when it comes from the file).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadValue {
    /// `modem_lines` / `--modem-lines`.
    #[error("{0:?}: expected \"port\" or \"socket:PATH\" (the path `vcard serial-pty` prints)")]
    ModemLines(String),
    /// `local_api.mode` is not octal.
    #[error("{0:?} is not an octal mode like \"0660\"")]
    NotOctal(String),
    #[error("{0:?} has bits outside 0777")]
    BitsOutside0777(String),
    /// `local_api.mode` would let every local user connect.
    #[error("{0:?} lets every local user connect; drop the \"other\" bits")]
    OtherBits(String),
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub reader: ReaderConfig,
    pub headend: HeadEndConfig,
    pub state: StateConfig,
    #[serde(default)]
    pub ui: UiConfig,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub local_api: LocalApiConfig,
    /// Loading value onto the card (bank account, pre-funded voucher).
    #[serde(default)]
    pub load: LoadConfig,
    /// Passed through to `ui::keymap`: action name → key name(s).
    #[serde(default)]
    pub keymap: ui::keymap::KeymapConfig,
}

/// Which card reader the daemon watches.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum ReaderConfig {
    /// A PC/SC reader through pcscd: the first reader whose name matches `name` (exact, or a
    /// glob pattern with `*` and `?`).
    Pcsc {
        #[serde(default = "any_reader")]
        name: String,
    },
    /// A Phoenix or Smartmouse reader on a serial port. `profile` sets the wiring; every
    /// other key overrides one part of it (see `config/stbd.example.toml`).
    Serial {
        device: String,
        #[serde(default)]
        profile: SerialProfile,
        /// The clock the reader gives the card, if not the profile's.
        clock_hz: Option<u32>,
        /// The pin that resets the card: "rts" or "dtr".
        reset: Option<reader_drivers::serial::OutputLine>,
        /// The level of that pin that holds the card in reset: "high" or "low".
        reset_asserted: Option<Level>,
        /// The card switch: "cd", "dsr", "cts", "ri", or "none" (assume a card is present).
        card_detect: Option<DetectLine>,
        /// The level of the card-detect pin that means a card is in.
        card_present: Option<Level>,
        /// The reader echoes every byte sent.
        echo: Option<bool>,
        /// The fastest line speed to use.
        max_baud: Option<u32>,
        /// Extra guard time (etu) between our characters, on top of the card's TC1.
        guard_etu: Option<u8>,
        /// "negotiate" (PPS to the fastest speed allowed) or "off".
        pps: Option<reader_drivers::serial::PpsPolicy>,
        /// Where the modem lines are: "port" (the device's own pins), or "socket:PATH" for a
        /// pty served by `vcard serial-pty`, which has none.
        modem_lines: Option<String>,
    },
    /// The in-process virtual card in a file (development and tests).
    Virtual { card_file: PathBuf },
}

fn any_reader() -> String {
    "*".into()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialProfile {
    /// Phoenix: 3.5712 MHz, RTS high holds reset, CD high = card, echoes every byte.
    #[default]
    Phoenix,
    /// Smartmouse: 3.5712 MHz, RTS *low* holds reset, CD high = card, echoes like a Phoenix.
    Smartmouse,
}

/// A pin level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    High,
    Low,
}

/// Which pin reports the card, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectLine {
    Cd,
    Dsr,
    Cts,
    Ri,
    None,
}

/// `modem_lines`: "port" or "socket:PATH".
///
/// # Errors
/// [`BadValue::ModemLines`].
pub fn parse_modem_lines(s: &str) -> Result<reader_drivers::serial::ModemLines, BadValue> {
    match s {
        "port" => Ok(reader_drivers::serial::ModemLines::Port),
        _ => match s.strip_prefix("socket:") {
            Some(p) if !p.is_empty() => Ok(reader_drivers::serial::ModemLines::Socket(p.into())),
            _ => Err(BadValue::ModemLines(s.into())),
        },
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadEndConfig {
    /// The gateway: `"host:port"` (or `"ip:port"`), or a list of them — several gateway
    /// processes sharing one PostgreSQL database (see the README, "Several gateways"). The
    /// box connects to one at a time, beginning with the one that last worked, and moves to
    /// the next when a connection attempt or a request's deadline fails; every request is
    /// idempotent by transaction id, so a purchase begun on one gateway completes on another.
    pub address: Addresses,
    /// The DNS name in the gateway's certificate.
    pub server_name: String,
    /// The head-end role the gateway's certificate must name (URI SAN
    /// `urn:purselink:role:<server_role>`, as `headend pki issue-role` writes it). A server
    /// certificate of the operator CA without it is refused: it is not the gateway.
    #[serde(default = "default_server_role")]
    pub server_role: String,
    /// PEM file with the operator CA the gateway's certificate chains to.
    pub operator_ca: PathBuf,
    /// PEM files: this box's device certificate (issued by the operator CA) and its key.
    pub device_cert: PathBuf,
    pub device_key: PathBuf,
    /// Keep-alive PING interval and idle timeout of the QUIC connection.
    #[serde(default = "default_keep_alive")]
    pub keep_alive_secs: u64,
    #[serde(default = "default_idle")]
    pub idle_timeout_secs: u64,
}

/// One gateway address or several (`headend.address`), in the config's order; never empty
/// once the config is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addresses(pub Vec<String>);

impl<'de> Deserialize<'de> for Addresses {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        match OneOrMany::deserialize(d) {
            Ok(OneOrMany::One(a)) => Ok(Self(vec![a])),
            Ok(OneOrMany::Many(v)) => Ok(Self(v)),
            Err(_) => Err(serde::de::Error::custom(
                "expected \"host:port\" or a list of them",
            )),
        }
    }
}

impl std::fmt::Display for Addresses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.join(", "))
    }
}

impl From<&str> for Addresses {
    fn from(a: &str) -> Self {
        Self(vec![a.to_string()])
    }
}

fn default_server_role() -> String {
    "gateway".into()
}

fn default_keep_alive() -> u64 {
    15
}
fn default_idle() -> u64 {
    60
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Where the journal (`journal.sqlite`) lives. Created if missing.
    pub dir: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UiConfig {
    /// Draw the TV UI on the controlling terminal (tty1 under systemd).
    pub enabled: bool,
    /// The card provider's name on the home screen.
    pub provider_name: String,
    /// Ask for an item's offer when the catalog's cursor rests on it, ahead of OK (see
    /// `stb::daemon::prefetch`: at most 10 a minute; an unused offer expires at the gateway).
    pub prefetch_offers: bool,
}

impl Default for UiConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            provider_name: "Purselink".into(),
            prefetch_offers: true,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Timeouts {
    /// Seconds the viewer has to accept an offer; then it is cancelled.
    pub offer_secs: u32,
    /// Seconds one request to the gateway may take (connect + answer).
    pub network_secs: u64,
    /// Seconds one card command may take.
    pub card_secs: u64,
    /// Reconnect backoff: first delay and cap, in milliseconds (doubling, with jitter).
    pub reconnect_initial_ms: u64,
    pub reconnect_max_ms: u64,
    /// Recovery timer for in-doubt purchases and loads: first delay and cap, in
    /// milliseconds (doubling, with jitter; back to the first delay on progress, reconnect or
    /// card insertion).
    pub recovery_initial_ms: u64,
    pub recovery_max_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            offer_secs: 30,
            network_secs: 10,
            card_secs: 5,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 60_000,
            recovery_initial_ms: 2_000,
            recovery_max_ms: 60_000,
        }
    }
}

impl Timeouts {
    pub fn network(&self) -> Duration {
        Duration::from_secs(self.network_secs)
    }
    pub fn card(&self) -> Duration {
        Duration::from_secs(self.card_secs)
    }
    /// The recovery timer's first delay and cap.
    pub fn recovery(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.recovery_initial_ms),
            Duration::from_millis(self.recovery_max_ms),
        )
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocalApiConfig {
    pub enabled: bool,
    /// The Unix socket path; its directory must exist.
    pub socket: PathBuf,
    /// Socket mode (octal in the file as a string, e.g. "0660").
    pub mode: String,
    /// Group that owns the socket (so its members can connect); none keeps the daemon's.
    pub group: Option<String>,
    /// Peer uids allowed to ask for payments, checked with SO_PEERCRED. The daemon's own uid
    /// is always allowed. Empty: only the daemon's uid.
    pub allowed_uids: Vec<u32>,
}

impl Default for LocalApiConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            socket: PathBuf::from("/run/purselink/stbd.sock"),
            mode: "0660".into(),
            group: None,
            allowed_uids: Vec::new(),
        }
    }
}

impl LocalApiConfig {
    /// The socket's mode (`mode`, octal, e.g. "0660").
    ///
    /// # Errors
    /// Not octal, bits outside 0777, or any "other" bit ([`BadValue`]).
    pub fn mode_bits(&self) -> Result<u32, BadValue> {
        let m = u32::from_str_radix(self.mode.trim_start_matches("0o"), 8)
            .map_err(|_| BadValue::NotOctal(self.mode.clone()))?;
        if m & !0o777 != 0 {
            return Err(BadValue::BitsOutside0777(self.mode.clone()));
        }
        if m & 0o007 != 0 {
            return Err(BadValue::OtherBits(self.mode.clone()));
        }
        Ok(m)
    }
}

/// `[load]`: where the value loaded onto the card comes from. Without it, "Load card" says
/// that no source is set up on this box.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoadConfig {
    /// The viewer's bank account id at the bank (loads need the PIN).
    pub bank_account: Option<String>,
    /// A pre-funded voucher code held by the load server (no PIN).
    pub voucher: Option<String>,
    /// The box's per-box PIN key file (hex, from provisioning: `headend init-demo` writes
    /// `pin-keys/<box>.key`). The PIN is sealed under it end to end for the bank.
    pub pin_key: Option<PathBuf>,
}

impl Config {
    /// Reads and validates `path`. A file that names a voucher code (`[load] voucher`, the
    /// voucher's only secret) must be readable by its owner only, like a key file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let cfg = Self::parse(path, &text)?;
        if cfg.load.voucher.is_some() {
            proto::secret::check_private(path).map_err(|e| ConfigError::Invalid {
                path: path.into(),
                key: "load.voucher",
                detail: format!("the file names a voucher code (its only secret): {e}"),
            })?;
        }
        Ok(cfg)
    }

    /// Parses and validates `text` (read from `path`, which only names it in errors).
    /// Key paths may name systemd credentials (`credential:NAME`, see
    /// [`proto::secret::credential_path`]).
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: path.into(),
            detail: e.to_string(),
        })?;
        cfg.headend.device_key = proto::secret::credential_path(&cfg.headend.device_key);
        if let Some(k) = &mut cfg.load.pin_key {
            *k = proto::secret::credential_path(k);
        }
        cfg.validate(path)?;
        Ok(cfg)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let bad = |key: &'static str, detail: String| ConfigError::Invalid {
            path: path.into(),
            key,
            detail,
        };
        let must_exist = |key: &'static str, p: &Path| {
            if p.is_file() {
                Ok(())
            } else {
                Err(bad(
                    key,
                    format!("{} does not exist or is not a file", p.display()),
                ))
            }
        };
        must_exist("headend.operator_ca", &self.headend.operator_ca)?;
        must_exist("headend.device_cert", &self.headend.device_cert)?;
        must_exist("headend.device_key", &self.headend.device_key)?;
        if self.headend.address.0.is_empty() {
            return Err(bad(
                "headend.address",
                "the list is empty (expected \"host:port\" or a list of them)".into(),
            ));
        }
        for a in &self.headend.address.0 {
            let Some((host, port)) = a.rsplit_once(':') else {
                return Err(bad(
                    "headend.address",
                    format!("{a:?} has no port (expected host:port)"),
                ));
            };
            if host.is_empty() || a.contains(|c: char| c.is_whitespace() || c == ',') {
                return Err(bad(
                    "headend.address",
                    format!(
                        "{a:?} is not one host:port (several gateways are a list: [\"a:4433\", \"b:4433\"])"
                    ),
                ));
            }
            if !matches!(port.parse::<u16>(), Ok(p) if p > 0) {
                return Err(bad(
                    "headend.address",
                    format!("{a:?}: the port is not a number from 1 to 65535"),
                ));
            }
        }
        if self.headend.server_name.is_empty() {
            return Err(bad("headend.server_name", "is empty".into()));
        }
        if let Err(e) = transport::BoxId::new(&self.headend.server_role) {
            return Err(bad(
                "headend.server_role",
                format!("not a role name: {}", e.why),
            ));
        }
        if self.headend.keep_alive_secs == 0
            || self.headend.keep_alive_secs >= self.headend.idle_timeout_secs
        {
            return Err(bad(
                "headend.keep_alive_secs",
                "must be at least 1 and below headend.idle_timeout_secs".into(),
            ));
        }
        match &self.reader {
            ReaderConfig::Pcsc { name } if name.is_empty() => {
                return Err(bad(
                    "reader.name",
                    "is empty (use \"*\" for any reader)".into(),
                ));
            }
            ReaderConfig::Serial { device, .. } if device.is_empty() => {
                return Err(bad("reader.device", "is empty".into()));
            }
            ReaderConfig::Serial {
                modem_lines,
                max_baud,
                guard_etu,
                clock_hz,
                ..
            } => {
                if let Some(m) = modem_lines {
                    parse_modem_lines(m).map_err(|e| bad("reader.modem_lines", e.to_string()))?;
                }
                if max_baud.is_some_and(|b| b < 9600) {
                    return Err(bad("reader.max_baud", "must be at least 9600".into()));
                }
                if guard_etu.is_some_and(|g| g == 255) {
                    return Err(bad("reader.guard_etu", "must be 0 to 254".into()));
                }
                if clock_hz.is_some_and(|c| !(1_000_000..=20_000_000).contains(&c)) {
                    return Err(bad(
                        "reader.clock_hz",
                        "must be 1000000 to 20000000 (ISO 7816-3 clocks)".into(),
                    ));
                }
            }
            ReaderConfig::Virtual { card_file } => must_exist("reader.card_file", card_file)?,
            _ => {}
        }
        let t = &self.timeouts;
        for (key, v) in [
            ("timeouts.offer_secs", u64::from(t.offer_secs)),
            ("timeouts.network_secs", t.network_secs),
            ("timeouts.card_secs", t.card_secs),
            ("timeouts.reconnect_initial_ms", t.reconnect_initial_ms),
            ("timeouts.recovery_initial_ms", t.recovery_initial_ms),
        ] {
            if v == 0 {
                return Err(bad(key, "must be at least 1".into()));
            }
        }
        if t.reconnect_max_ms < t.reconnect_initial_ms {
            return Err(bad(
                "timeouts.reconnect_max_ms",
                "must not be below timeouts.reconnect_initial_ms".into(),
            ));
        }
        if t.recovery_max_ms < t.recovery_initial_ms {
            return Err(bad(
                "timeouts.recovery_max_ms",
                "must not be below timeouts.recovery_initial_ms".into(),
            ));
        }
        let l = &self.load;
        for (key, v) in [
            ("load.bank_account", &l.bank_account),
            ("load.voucher", &l.voucher),
        ] {
            if v.as_deref().is_some_and(|v| v.trim().is_empty()) {
                return Err(bad(key, "is empty (leave the key out instead)".into()));
            }
        }
        match &l.pin_key {
            Some(p) => must_exist("load.pin_key", p)?,
            None if l.bank_account.is_some() => {
                return Err(bad(
                    "load.pin_key",
                    "is missing: load.bank_account needs the box's PIN key file".into(),
                ));
            }
            None => {}
        }
        if self.local_api.enabled {
            self.local_api
                .mode_bits()
                .map_err(|e| bad("local_api.mode", e.to_string()))?;
        }
        ui::keymap::Keymap::from_config(&self.keymap).map_err(|e| bad("keymap", e.to_string()))?;
        Ok(())
    }

    pub fn journal_path(&self) -> PathBuf {
        self.state.dir.join("journal.sqlite")
    }
}

/// `*` and `?` glob match, for PC/SC reader names.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.split_first() {
            None => n.is_empty(),
            Some(('*', rest)) => (0..=n.len()).any(|i| go(rest, &n[i..])),
            Some(('?', rest)) => !n.is_empty() && go(rest, &n[1..]),
            Some((c, rest)) => n.first() == Some(c) && go(rest, &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> (tempfile::TempDir, String) {
        let d = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "dev.pem", "dev.key", "card.plvc"] {
            std::fs::write(d.path().join(f), "x").unwrap();
        }
        let p = d.path().display().to_string();
        let text = format!(
            r#"
[reader]
kind = "virtual"
card_file = "{p}/card.plvc"
[headend]
address = "127.0.0.1:4433"
server_name = "gateway.test"
operator_ca = "{p}/ca.pem"
device_cert = "{p}/dev.pem"
device_key = "{p}/dev.key"
[state]
dir = "{p}"
"#
        );
        (d, text)
    }

    #[test]
    fn example_config_parses_apart_from_its_files() {
        let text = include_str!("../../config/stbd.example.toml");
        // The example points at /etc files a build machine lacks: the only complaint allowed
        // is a missing file.
        match Config::parse(Path::new("stbd.example.toml"), text) {
            Ok(_) => {}
            Err(ConfigError::Invalid { detail, .. }) => {
                assert!(detail.contains("does not exist"), "{detail}")
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let (_d, text) = files();
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert!(c.ui.enabled);
        assert_eq!(c.headend.server_role, "gateway");
        assert_eq!(c.timeouts.offer_secs, 30);
        assert!(!c.local_api.enabled);
    }

    #[test]
    fn bad_configs_name_the_key() {
        let (d, text) = files();
        let cases = [
            (
                text.replace("dev.pem", "missing.pem"),
                "headend.device_cert",
            ),
            (
                text.replace("127.0.0.1:4433", "127.0.0.1"),
                "headend.address",
            ),
            (
                format!("{text}\n[timeouts]\nnetwork_secs = 0\n"),
                "timeouts.network_secs",
            ),
            (
                format!("{text}\n[local_api]\nenabled = true\nmode = \"0666\"\n"),
                "local_api.mode",
            ),
            (format!("{text}\n[keymap]\nfly = \"x\"\n"), "keymap"),
            (
                format!("{text}\n[load]\nbank_account = \"ACC-1\"\n"),
                "load.pin_key",
            ),
            (
                format!("{text}\n[load]\nvoucher = \"V\"\npin_key = \"/nope.key\"\n"),
                "load.pin_key",
            ),
            (format!("{text}\n[load]\nvoucher = \" \"\n"), "load.voucher"),
            (
                text.replace("[state]", "server_role = \"Gate Way\"\n[state]"),
                "headend.server_role",
            ),
            (
                text.replace("\"127.0.0.1:4433\"", "[\"127.0.0.1:4433\", \"gw2\"]"),
                "headend.address",
            ),
            (text.replace("\"127.0.0.1:4433\"", "[]"), "headend.address"),
            (text.replace("\"127.0.0.1:4433\"", "4433"), "host:port"),
            (
                text.replace("127.0.0.1:4433", "127.0.0.1:99999"),
                "from 1 to 65535",
            ),
            (
                text.replace("127.0.0.1:4433", "127.0.0.1:4433, 127.0.0.1:4434"),
                "are a list",
            ),
        ];
        for (t, key) in cases {
            let e = Config::parse(Path::new("t.toml"), &t)
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
        let e = Config::parse(Path::new("t.toml"), &format!("{text}\nbogus = 1\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("bogus"), "{e}");
        let e = Config::load(&d.path().join("nope.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read"), "{e}");
    }

    /// Several gateways: a list, kept in its order; one address is a list of one.
    #[test]
    fn the_gateway_address_is_one_or_a_list() {
        let (_d, text) = files();
        let c = Config::parse(Path::new("t.toml"), &text).unwrap();
        assert_eq!(c.headend.address.0, ["127.0.0.1:4433"]);
        let two = text.replace(
            "\"127.0.0.1:4433\"",
            "[\"gw-a.example:4433\", \"127.0.0.1:4434\"]",
        );
        let c = Config::parse(Path::new("t.toml"), &two).unwrap();
        assert_eq!(c.headend.address.0, ["gw-a.example:4433", "127.0.0.1:4434"]);
        assert_eq!(
            c.headend.address.to_string(),
            "gw-a.example:4433, 127.0.0.1:4434"
        );
    }

    #[test]
    fn a_config_naming_a_voucher_must_be_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (d, text) = files();
        let path = d.path().join("stbd.toml");
        let mode = |m| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(m));
        // Without a voucher the file holds no secret: any mode.
        std::fs::write(&path, &text).unwrap();
        mode(0o644).unwrap();
        Config::load(&path).unwrap();
        std::fs::write(&path, format!("{text}\n[load]\nvoucher = \"V7KQ-3M9X\"\n")).unwrap();
        for m in [0o644, 0o640, 0o604] {
            mode(m).unwrap();
            let e = Config::load(&path).unwrap_err().to_string();
            assert!(
                e.contains("load.voucher") && e.contains("readable by its owner only"),
                "{m:o}: {e}"
            );
            assert!(!e.contains("V7KQ"), "the error names the code: {e}");
        }
        mode(0o600).unwrap();
        assert_eq!(
            Config::load(&path).unwrap().load.voucher.as_deref(),
            Some("V7KQ-3M9X")
        );
    }

    #[test]
    fn serial_reader_keys() {
        let (_d, text) = files();
        let serial = |extra: &str| {
            text.replace(
                "kind = \"virtual\"",
                &format!("kind = \"serial\"\ndevice = \"/dev/ttyUSB0\"\n{extra}"),
            )
            .lines()
            .filter(|l| !l.starts_with("card_file"))
            .collect::<Vec<_>>()
            .join("\n")
        };
        let c = Config::parse(
            Path::new("t.toml"),
            &serial(
                "profile = \"smartmouse\"\nreset = \"dtr\"\nreset_asserted = \"high\"\n\
                 card_detect = \"none\"\nmax_baud = 153600\nguard_etu = 2\npps = \"off\"\n\
                 modem_lines = \"socket:/run/vcard.lines\"",
            ),
        )
        .unwrap();
        let ReaderConfig::Serial {
            profile,
            reset,
            card_detect,
            pps,
            ..
        } = c.reader
        else {
            panic!()
        };
        assert_eq!(profile, SerialProfile::Smartmouse);
        assert_eq!(reset, Some(reader_drivers::serial::OutputLine::Dtr));
        assert_eq!(card_detect, Some(DetectLine::None));
        assert_eq!(pps, Some(reader_drivers::serial::PpsPolicy::Off));
        for (extra, key) in [
            ("modem_lines = \"tcp:x\"", "reader.modem_lines"),
            ("max_baud = 1200", "reader.max_baud"),
            ("guard_etu = 255", "reader.guard_etu"),
            ("reset = \"cd\"", "[reader]"),
        ] {
            let e = Config::parse(Path::new("t.toml"), &serial(extra))
                .unwrap_err()
                .to_string();
            assert!(e.contains(key), "{key}: {e}");
        }
    }

    #[test]
    fn glob() {
        assert!(glob_match("*", "ACS ACR38U 00 00"));
        assert!(glob_match("ACS*", "ACS ACR38U 00 00"));
        assert!(glob_match("Virtual PCD 00 0?", "Virtual PCD 00 01"));
        assert!(!glob_match("ACS*", "Gemalto"));
    }
}
