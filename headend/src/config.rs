//! The head end's TOML configuration: one format for every role, so a split deployment and
//! the all-in-one read the same file; each role uses only its own sections. Every key is
//! documented in `config/headend.example.toml`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use proto::crypto::DesKey;
use proto::messages::Embodiment;
use proto::money::{Currency, Money};
use proto::purse::{IssuerKeyFile, IssuerKeys};
use proto::secret::Secret;
use serde::Deserialize;

use crate::quic::TransportSettings;

/// What is wrong with the head end's configuration or a file it names (key files, the
/// issuer key file, the vouchers file). Each names the file, or the key in the file, and
/// what is wrong with it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The config file is not TOML of the expected shape (unknown key, wrong type, …).
    #[error("config {path}: {source}")]
    Syntax {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// The config file parses but breaks a rule (see [`ConfigInvalid`]).
    #[error("config {path}: {source}")]
    Invalid {
        path: PathBuf,
        #[source]
        source: ConfigInvalid,
    },
    /// A rule broken across the config and the files it names (e.g. a voucher code in both
    /// the config and `[load] vouchers_file`).
    #[error(transparent)]
    Rule(#[from] ConfigInvalid),
    /// A secret file (`what`: which one) is missing or readable by others; `detail` names
    /// the file and its mode.
    #[error("{what}: {detail}")]
    NotPrivate { what: String, detail: String },
    /// A file the config names (`what`) cannot be read.
    #[error("{what}: {path}: {source}")]
    ReadFile {
        what: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A TOML file the config names (`what`: a master key file, the issuer key file, the
    /// vouchers file) is malformed.
    #[error("{what}: {path}: {source}")]
    FileSyntax {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    /// A master or issuer key file parses but its keys do not (wrong length, not hex, …).
    #[error("{what}: {path}: {detail}")]
    BadKeyFile {
        what: String,
        path: PathBuf,
        detail: String,
    },
    /// A key (`what`, with its file if it came from one) is not hex.
    #[error("{what}: not hex ({source})")]
    NotHex {
        what: String,
        #[source]
        source: hex::FromHexError,
    },
    /// A key (`what`) is hex but not a 2-key triple-DES key.
    #[error("{what}: {source}")]
    BadKey {
        what: String,
        #[source]
        source: proto::crypto::CryptoError,
    },
}

/// A rule the head end's configuration breaks, naming the section, entry and key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigInvalid {
    #[error(
        "[endpoints.{name}]: the role its certificate must name is not a role name ({why}); set `role`"
    )]
    EndpointRole { name: String, why: String },
    #[error("unknown embodiment {0:?}: use security-card, payment-server, gateway or merchant")]
    UnknownEmbodiment(String),
    #[error("merchant id {0} appears twice")]
    DuplicateMerchant(String),
    /// `[payment] security_cards` names no terminal, an id twice, or an empty reader.
    #[error("[payment] security_cards: {0}")]
    Terminals(String),
    #[error("merchant {merchant}: item {item} appears twice")]
    DuplicateItem { merchant: String, item: String },
    #[error(
        "merchant {merchant}: item {item} has a zero price (only an authentication item, \
         currency 999, is free)"
    )]
    ZeroPrice { merchant: String, item: String },
    #[error(
        "merchant {merchant}: item {item} is in currency 999, an authentication (002 FIG. 16), \
         which carries no value: give it amount 0 and exponent 0"
    )]
    AuthenticationWithValue { merchant: String, item: String },
    #[error(
        "merchant {merchant}: item {item} is an authentication (currency 999); only a \
         kind = \"loyalty\" merchant (a benefits server) offers them"
    )]
    AuthenticationNotLoyalty { merchant: String, item: String },
    #[error("[bank] pin_tries must be at least 1")]
    NoPinTries,
    #[error("bank account {0} appears twice")]
    DuplicateAccount(String),
    #[error("bank account {0} has the float account's id")]
    AccountIsFloat(String),
    #[error("bank account {account}: pin_verification_value is not hex ({why})")]
    PinVerificationNotHex { account: String, why: String },
    /// Never names the code: it is the voucher's secret.
    #[error("a voucher code appears twice")]
    DuplicateVoucher,
    /// `[journal]` (or `[journal.roles.ROLE]`) chooses PostgreSQL but names no server.
    #[error("{section}: backend = \"postgres\" needs `url` or `url_file`")]
    JournalNoUrl { section: String },
    /// Both `url` and `url_file` in one section: which one is meant is unclear.
    #[error("{section}: give `url` or `url_file`, not both")]
    JournalUrlTwice { section: String },
    /// The connection string does not parse (`why` is the driver's reason; the string
    /// itself is never repeated: it may hold a password).
    #[error("{section}: the PostgreSQL connection string does not parse ({why})")]
    JournalUrl { section: String, why: String },
    /// A role's schema name PostgreSQL cannot take as given.
    #[error("[journal] role {role}: schema name {schema:?} {why}")]
    JournalSchema {
        role: String,
        schema: String,
        why: &'static str,
    },
    /// `[journal.roles.NAME]` names no role this config runs.
    #[error(
        "[journal.roles.{0}]: no such role here (gateway, bank, load, the [payment] or [merchant] name)"
    )]
    JournalUnknownRole(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadendConfig {
    /// Where journals and collection files go (`/var/lib/purselink` in deployment).
    pub state_dir: PathBuf,
    pub tls: TlsFiles,
    #[serde(default)]
    pub transport: TransportSettings,
    pub gateway: Option<GatewaySection>,
    pub payment: Option<PaymentSection>,
    pub merchant: Option<MerchantSection>,
    /// Remote roles by name; a route naming an endpoint not listed here is served in process
    /// (all-in-one).
    #[serde(default)]
    pub endpoints: BTreeMap<String, Endpoint>,
    #[serde(default)]
    pub merchants: Vec<MerchantDef>,
    /// The bank server (001 bank server 860): accounts, PIN, holds, transfer to the float.
    pub bank: Option<BankSection>,
    /// The load server with its host security module (001 load server 862, HSM 864).
    pub load: Option<LoadSection>,
    /// The clearing role (see [`ClearingSection`]).
    pub clearing: Option<ClearingSection>,
    /// Bank accounts, linked to a box (and optionally a card).
    #[serde(default)]
    pub bank_accounts: Vec<BankAccountDef>,
    /// Pre-funded accounts the load server holds itself (001 [0141]–[0160]).
    #[serde(default)]
    pub vouchers: Vec<VoucherDef>,
    /// Where each role journals (see [`JournalSection`]); default: SQLite files in
    /// `state_dir`.
    #[serde(default)]
    pub journal: JournalSection,
    /// The issuer's card hotlist (see [`HotlistSection`]); none without it.
    pub hotlist: Option<HotlistSection>,
}

/// `[hotlist]`: the payment servers, the load server and clearing keep the issuer's signed
/// card hotlist ([`crate::hotlist`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HotlistSection {
    /// The issuer's verification key (hex; `headend hotlist keygen` writes it): only lists it
    /// signed are taken.
    pub verify_key_file: PathBuf,
    /// Seconds between asking clearing for a newer list (and looking in the journal for one
    /// installed from a file).
    #[serde(default = "default_hotlist_refresh")]
    pub refresh_secs: u64,
}

fn default_hotlist_refresh() -> u64 {
    60
}

/// Which store a journal is on.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JournalBackend {
    /// A file `state_dir/<role>.sqlite` (the embedded default).
    #[default]
    Sqlite,
    /// A schema `<schema_prefix><role>` in a PostgreSQL database.
    Postgres,
}

/// `[journal]`: the backend every role of this config journals on, with
/// `[journal.roles.ROLE]` for a role that differs. A role's name is `gateway`, `bank`,
/// `load`, or the `[payment]` / `[merchant]` section's `name`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JournalSection {
    #[serde(default)]
    pub backend: JournalBackend,
    /// The PostgreSQL connection string (libpq `key=value` or a `postgresql://` URL). It may
    /// hold a password: masked in `Debug` and logs; prefer `url_file`.
    pub url: Option<Secret<String>>,
    /// A file (owner-only, like a key file; `credential:NAME` for a systemd credential)
    /// holding the connection string.
    pub url_file: Option<PathBuf>,
    /// Each role journals in the PostgreSQL schema `<schema_prefix><role>`; two processes of
    /// one role (two gateways) share it, different roles never do.
    #[serde(default = "default_schema_prefix")]
    pub schema_prefix: String,
    /// Per-role choices, by role name.
    #[serde(default)]
    pub roles: BTreeMap<String, RoleJournal>,
}

impl Default for JournalSection {
    fn default() -> Self {
        Self {
            backend: JournalBackend::Sqlite,
            url: None,
            url_file: None,
            schema_prefix: default_schema_prefix(),
            roles: BTreeMap::new(),
        }
    }
}

/// `[journal.roles.ROLE]`: one role's journal, where it differs from `[journal]`; a key not
/// given is taken from `[journal]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleJournal {
    pub backend: Option<JournalBackend>,
    pub url: Option<Secret<String>>,
    pub url_file: Option<PathBuf>,
    /// The whole schema name (no prefix added).
    pub schema: Option<String>,
}

fn default_schema_prefix() -> String {
    "purselink_".into()
}

/// Where a connection string comes from.
enum UrlSource<'a> {
    Inline(&'a Secret<String>),
    File(&'a Path),
}

/// The connection string one section gives, if it gives one (`section` names it).
fn pick_url<'a>(
    url: &'a Option<Secret<String>>,
    file: &'a Option<PathBuf>,
    section: String,
) -> Result<Option<(UrlSource<'a>, String)>, ConfigInvalid> {
    match (url, file) {
        (Some(_), Some(_)) => Err(ConfigInvalid::JournalUrlTwice { section }),
        (Some(u), None) => Ok(Some((UrlSource::Inline(u), section))),
        (None, Some(f)) => Ok(Some((UrlSource::File(f), section))),
        (None, None) => Ok(None),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BankSection {
    /// Key file (see [`read_key_file`]) of the bank PIN master key: each box's PIN key is
    /// derived from it by box id, and PIN verification values are MACs under a key derived
    /// from it.
    pub pin_master_file: PathBuf,
    /// Key file of the key shared with the load server: load confirmations are sealed, and
    /// holds MACed, under per-transaction keys derived from it.
    pub confirmation_key_file: PathBuf,
    /// Most an account may load per calendar day (UTC), in the account's minor units.
    pub daily_limit: u64,
    /// The card issuer's float account captured loads move to (001 [0135]).
    #[serde(default = "default_float_account")]
    pub float_account: String,
    /// Wrong PINs in a row that lock an account until `headend bank-unlock`.
    #[serde(default = "default_pin_tries")]
    pub pin_tries: u8,
    /// Seconds a load offer may wait for its hold request; then it is refused as expired.
    #[serde(default = "default_offer_lifetime")]
    pub offer_lifetime_secs: u64,
    /// Where the gateway reaches this role when it runs alone.
    pub listen: Option<SocketAddr>,
    /// Who may call this role over QUIC (see [`Callers`]).
    #[serde(default)]
    pub callers: Callers,
    /// The clearing role to send load advices of captured loads to: an `[endpoints]` key, or the local `[clearing]`
    /// role's name. None: nothing is sent.
    pub clearing: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadSection {
    /// The load master key file (`key_version`, `master`; see
    /// [`proto::purse::MasterKeyFile`]): the HSM's key, and only the HSM's.
    /// The load master keys file (one key or `[[keys]]` generations): the software HSM.
    /// Give this or `token`, not both.
    pub load_keys: Option<PathBuf>,
    /// The load masters in a PKCS#11 token instead ([`crate::load::token::TokenDef`]):
    /// `token = { module = "/usr/lib/softhsm/libsofthsm2.so", token_label = "purselink",
    /// pin_file = "keys/token.pin" }`.
    pub token: Option<crate::load::token::TokenDef>,
    /// The issuer's purchase master keys (a purchase-keys file: one key or `[[keys]]`),
    /// given to the HSM only to re-key cards (001 [0044]): a card loaded on an older key
    /// version than the newest `load_keys` version gets its keys of that version with the
    /// load, if this file holds it too. Absent: no key updates.
    pub rekey_purchase_keys: Option<PathBuf>,
    /// The scheme's application master (a hex key file, 0600; seed 004 card to card,
    /// [`proto::transfer`]) and the current epoch, `app_epoch`: every bank load pushes that
    /// epoch's key to its card, which takes it in place of its oldest if it is newer.
    /// Both or neither.
    pub app_key_file: Option<PathBuf>,
    pub app_epoch: Option<u8>,
    /// Whether bank loads carry the issuer's UNBLOCK (seed 004): a card locked by bad
    /// signatures opens, and its PIN's tries are restored, with a bank load (the
    /// cardholder proved the account's PIN). Off by default: then a locked card is only
    /// refused.
    #[serde(default)]
    pub unblock_with_bank_loads: bool,
    /// The HSM's id in load commands.
    #[serde(default = "default_hsm_id")]
    pub hsm_id: u64,
    /// Key file of the key shared with the bank (see [`BankSection::confirmation_key_file`]).
    pub confirmation_key_file: PathBuf,
    /// Most a pre-funded account may load per calendar day (UTC), in minor units.
    pub daily_limit: u64,
    /// The issuer's float account for value loaded from pre-funded accounts.
    #[serde(default = "default_float_account")]
    pub float_account: String,
    /// Seconds a voucher load offer may wait for its hold request.
    #[serde(default = "default_offer_lifetime")]
    pub offer_lifetime_secs: u64,
    /// A file of `[[vouchers]]` (owner-only, like a key file: the codes are the vouchers'
    /// secrets), added to any in this config.
    pub vouchers_file: Option<PathBuf>,
    pub listen: Option<SocketAddr>,
    /// Who may call this role over QUIC (see [`Callers`]).
    #[serde(default)]
    pub callers: Callers,
    /// The clearing role to send load advices of captured loads to: an `[endpoints]` key, or the local `[clearing]`
    /// role's name. None: nothing is sent.
    pub clearing: Option<String>,
}

/// The peers a role serves over QUIC: role names (the `urn:purselink:role:NAME` the peer's
/// certificate carries, see `headend pki issue-role`) or certificate fingerprints
/// (`sha256:HEX`). Anyone else — a set-top box, a role not listed, a certificate without a
/// role name — is refused with `Forbidden` before the message is looked at. Default: the
/// gateway only.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(transparent)]
pub struct Callers(pub Vec<String>);

impl Default for Callers {
    fn default() -> Self {
        Self(vec!["gateway".into()])
    }
}

impl Callers {
    /// Whether a role peer named `role` with certificate `fingerprint` (hex) is listed.
    pub fn allows(&self, role: &str, fingerprint: &str) -> bool {
        self.0.iter().any(|c| match c.strip_prefix("sha256:") {
            Some(f) => f.replace(':', "").eq_ignore_ascii_case(fingerprint),
            None => c == role,
        })
    }
}

/// Reads a key file: one 2-key triple-DES key (16 bytes) as hex, readable by its owner only
/// (a group- or world-readable key file is refused, naming the file and its mode). `what`
/// names the key in errors.
///
/// # Errors
/// The file is missing, readable by others, or not a key.
pub fn read_key_file(what: &str, path: &Path) -> Result<DesKey, ConfigError> {
    let text = read_private(what, path)?;
    hex_key(&format!("{what} ({})", path.display()), text.trim())
}

/// A secret file's text, once it is known to be readable by its owner only.
fn read_private(what: &str, path: &Path) -> Result<String, ConfigError> {
    proto::secret::check_private(path).map_err(|detail| ConfigError::NotPrivate {
        what: what.into(),
        detail,
    })?;
    std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
        what: what.into(),
        path: path.into(),
        source,
    })
}

/// A secret TOML file (see [`read_private`]), parsed.
fn read_private_toml<T: serde::de::DeserializeOwned>(
    what: &str,
    path: &Path,
) -> Result<T, ConfigError> {
    let text = read_private(what, path)?;
    toml::from_str(&text).map_err(|source| ConfigError::FileSyntax {
        what: what.into(),
        path: path.into(),
        source: Box::new(source),
    })
}

/// Reads a master key file, owner-only like every key file: one generation
/// ([`proto::purse::MasterKeyFile`]: `key_version`, `master`) or several
/// ([`proto::purse::MasterKeysFile`]: `[[keys]]` with `key_version`, `master`, `retired`).
///
/// # Errors
/// The file is missing, readable by others, or neither form of a master key file.
pub fn read_master_key(what: &str, path: &Path) -> Result<proto::purse::MasterKeys, ConfigError> {
    read_private_toml::<proto::purse::AnyMasterKeyFile>(what, path)?
        .into_generations()
        .to_keys()
        .map_err(|detail| ConfigError::BadKeyFile {
            what: what.into(),
            path: path.into(),
            detail,
        })
}

/// A path from the config: `credential:NAME` names a systemd credential
/// (`$CREDENTIALS_DIRECTORY/NAME`, see `LoadCredential=`); a relative path is relative to
/// the config file's directory.
pub fn resolve_path(p: &mut PathBuf, base: &Path) {
    let resolved = proto::secret::credential_path(p);
    *p = if resolved != *p || p.is_absolute() {
        resolved
    } else {
        base.join(&*p)
    };
}

/// A bank account. Its balance lives in the bank journal once opened; this is the opening
/// balance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BankAccountDef {
    pub id: String,
    pub holder: String,
    /// The set-top box whose viewer owns the account: load requests from another box are
    /// refused.
    pub box_id: String,
    /// If set, only this card may be loaded from the account.
    pub card_id: Option<u64>,
    pub currency: u16,
    pub exponent: u8,
    pub opening_balance: u64,
    /// The PIN verification value (hex MAC); never the PIN.
    pub pin_verification_value: String,
}

/// A pre-funded account: a voucher or subscription paid in advance.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VoucherDef {
    pub code: String,
    /// If set, only this box may redeem it.
    pub box_id: Option<String>,
    pub currency: u16,
    pub exponent: u8,
    /// The prepaid amount, minor units.
    pub amount: u64,
}

impl BankAccountDef {
    pub fn currency(&self) -> Currency {
        Currency::new(self.currency, self.exponent)
    }
}

impl VoucherDef {
    pub fn currency(&self) -> Currency {
        Currency::new(self.currency, self.exponent)
    }
}

/// Parses a 16-byte hex key; `what` names it in the error.
///
/// # Errors
/// [`ConfigError::NotHex`], or [`ConfigError::BadKey`] when it is not 16 bytes.
pub fn hex_key(what: &str, hex_str: &str) -> Result<DesKey, ConfigError> {
    let raw = hex::decode(hex_str.trim()).map_err(|source| ConfigError::NotHex {
        what: what.into(),
        source,
    })?;
    DesKey::from_slice(&raw).map_err(|source| ConfigError::BadKey {
        what: what.into(),
        source,
    })
}

/// 15 minutes.
pub fn default_offer_lifetime() -> u64 {
    900
}
/// 30 minutes.
pub fn default_hold_lifetime() -> u64 {
    1800
}

fn default_float_account() -> String {
    "ISSUER-FLOAT".into()
}
fn default_pin_tries() -> u8 {
    3
}
fn default_hsm_id() -> u64 {
    0x4853_4D01
}

/// This process's certificate and the operator CA its peers must chain to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub operator_ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySection {
    /// UDP address the set-top boxes connect to.
    pub listen: SocketAddr,
    /// Box ids refused at connection time.
    #[serde(default)]
    pub revoked_boxes: Vec<String>,
    /// Seconds a purchase or load offer may wait for its draw / load request; after that
    /// it expires and is refused.
    #[serde(default = "default_offer_lifetime")]
    pub offer_lifetime_secs: u64,
    /// Seconds a load may stay between its load request and its load response. Past it, a
    /// hold the load server never authorised is released (journaled with the reason); a
    /// hold whose load may have reached the card is never released blindly — it waits for
    /// the box's proof and is listed by `headend status` for an operator.
    #[serde(default = "default_hold_lifetime")]
    pub hold_lifetime_secs: u64,
    /// What one box may ask: `[gateway.limits]` (see [`crate::limits::LimitSettings`]).
    #[serde(default)]
    pub limits: crate::limits::LimitSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSection {
    /// This payment server's name in routes.
    #[serde(default = "default_payment_name")]
    pub name: String,
    /// The purchase master key file (`key_version`, `master`; see
    /// [`proto::purse::MasterKeyFile`]): the security cards' key, and only theirs.
    pub purchase_keys: PathBuf,
    /// The terminals of 001 [0091], each with its security card: a number of software
    /// security cards (ids from `security_card_ids_from`), or a list of terminals, each
    /// named by its security card id ([`TerminalDef`]): `[{ kind = "software", id = … },
    /// { kind = "pcsc", id = …, reader = "Purselink PSAM 00 00" }]`. A terminal's place in
    /// the list is its slot: keep the order.
    #[serde(default = "default_security_cards")]
    pub security_cards: SecurityCards,
    /// The first security card's id; the pool's cards are numbered from it. Security card
    /// ids are unique across every payment server clearing hears from (a transaction is
    /// cleared under its security card id and transaction number): give each payment
    /// server its own range.
    #[serde(default = "default_security_card_ids_from")]
    pub security_card_ids_from: u64,
    /// Seconds after which an incomplete transaction is reversed in its security card.
    #[serde(default = "default_txn_timeout")]
    pub transaction_timeout_secs: u64,
    /// FIG. 4: seconds a security card waits for one box's debit response before it goes
    /// back to the pool (the transaction stays open until its own timeout).
    #[serde(default = "default_lease_timeout")]
    pub lease_timeout_secs: u64,
    /// Where the gateway reaches this role when it runs alone.
    pub listen: Option<SocketAddr>,
    /// Who may call this role over QUIC (see [`Callers`]).
    #[serde(default)]
    pub callers: Callers,
    /// The clearing role to send collection batches to: an `[endpoints]` key, or the local `[clearing]`
    /// role's name. None: nothing is sent (`headend collect` still closes and exports batches).
    pub clearing: Option<String>,
    /// Seconds between two collection batches the running payment server closes and sends
    /// (with `clearing` set).
    #[serde(default = "default_collect_every")]
    pub collect_every_secs: u64,
}

/// The clearing role (001 FIG. 1: concentration point 68, clearing and administration 110,
/// the acquirer's and the issuer's ledgers): it receives collection batches and load
/// advices, and settles them (`headend settle`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClearingSection {
    #[serde(default = "default_clearing_name")]
    pub name: String,
    /// Where payment servers, banks and load servers reach this role when it runs alone.
    pub listen: Option<SocketAddr>,
    /// Who may call this role over QUIC (see [`Callers`]); list the payment servers and
    /// funders below.
    #[serde(default)]
    pub callers: Callers,
    /// Payment servers (role names) whose collection batches are accepted.
    pub payment_servers: Vec<String>,
    /// Funders (role names: `bank`, `load`) whose load advices are accepted.
    #[serde(default)]
    pub funders: Vec<String>,
}

/// `[payment] security_cards`: a count of software security cards, or the terminals.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum SecurityCards {
    Count(u32),
    Terminals(Vec<TerminalDef>),
}

/// One terminal of the pool and its security card (001 [0041]–[0042]: a terminal is
/// identified by its security card's id, checked at start).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase", deny_unknown_fields)]
pub enum TerminalDef {
    /// The software security card, keyed from `purchase_keys`, its state journaled.
    Software { id: u64 },
    /// A security card (PSAM, [`proto::psam`]) in a PC/SC reader: the card answers GET
    /// STATUS with `id`, or the payment server does not start. `timeout_ms`: how long one
    /// command script may take before the terminal is taken out of the pool (default 5000).
    Pcsc {
        id: u64,
        reader: String,
        #[serde(default = "default_terminal_timeout_ms")]
        timeout_ms: u64,
    },
}

impl TerminalDef {
    /// The security card id the terminal is named by.
    pub fn id(&self) -> u64 {
        match self {
            Self::Software { id } | Self::Pcsc { id, .. } => *id,
        }
    }
}

fn default_terminal_timeout_ms() -> u64 {
    5_000
}

impl PaymentSection {
    /// The terminals, slot by slot.
    ///
    /// # Errors
    /// None at all, an id twice, or a PC/SC reader with no name.
    pub fn terminals(&self) -> Result<Vec<TerminalDef>, ConfigError> {
        let bad = |detail: String| ConfigError::Rule(ConfigInvalid::Terminals(detail));
        let list = match &self.security_cards {
            SecurityCards::Count(n) => (0..u64::from(*n))
                .map(|i| TerminalDef::Software {
                    id: self.security_card_ids_from + i,
                })
                .collect(),
            SecurityCards::Terminals(t) => t.clone(),
        };
        if list.is_empty() {
            return Err(bad("no terminal: give at least one security card".into()));
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &list {
            if !seen.insert(t.id()) {
                return Err(bad(format!(
                    "security card id {:#X} names two terminals",
                    t.id()
                )));
            }
            if let TerminalDef::Pcsc {
                reader, timeout_ms, ..
            } = t
            {
                if !(100..=30_000).contains(timeout_ms) {
                    return Err(bad(format!(
                        "terminal {:#X}: timeout_ms {timeout_ms} is outside 100–30000 (how long one command to its security card may take before the terminal leaves the pool)",
                        t.id()
                    )));
                }
                if reader.trim().is_empty() {
                    return Err(bad(format!(
                        "terminal {:#X}: reader is empty (name the PC/SC reader, e.g. \"Purselink PSAM 00 00\")",
                        t.id()
                    )));
                }
            }
        }
        Ok(list)
    }
}

fn default_security_card_ids_from() -> u64 {
    0x5A00_0000
}

fn default_clearing_name() -> String {
    "clearing".into()
}

fn default_collect_every() -> u64 {
    300
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSection {
    #[serde(default = "default_merchant_name")]
    pub name: String,
    pub listen: Option<SocketAddr>,
    /// Seconds an offer stays open without a confirmation; then it is marked expired (a
    /// valid confirmation that comes later — a debit the card proved — still releases).
    #[serde(default = "default_offer_lifetime")]
    pub offer_lifetime_secs: u64,
    /// Who may call this role over QUIC (see [`Callers`]).
    #[serde(default)]
    pub callers: Callers,
}

/// A remote role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The name its certificate carries.
    pub server_name: String,
    /// The role its certificate must name (URI SAN `urn:purselink:role:<role>`, as `headend
    /// pki issue-role --role <role>` writes it); default: the endpoint's own name. A server
    /// whose certificate names another role, or none (an `issue-server` certificate), fails
    /// the handshake: nothing is sent to it.
    pub role: Option<String>,
}

impl Endpoint {
    /// The role the server at this endpoint (named `name` in `[endpoints]`) must be.
    pub fn role<'a>(&'a self, name: &'a str) -> &'a str {
        self.role.as_deref().unwrap_or(name)
    }
}

/// What kind of merchant: the cable operator's own catalog, or an internet merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MerchantKind {
    Cable,
    Internet,
    /// A benefits server (002 FIG. 16, web server 208′): its items are benefits claimed by
    /// an authentication draw (price 0 in currency 999), released to the member account its
    /// `members` map the authenticated card to.
    Loyalty,
}

/// A loyalty programme's member (002 [0160]: "a card number that is associated with the
/// consumer's name in a database on the Web server").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberDef {
    pub card_id: u64,
    /// The consumer account the benefit goes to.
    pub account: String,
}

/// A merchant, as every role sees it (routing, keys, comparison embodiment, catalog).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantDef {
    pub id: String,
    pub name: String,
    pub kind: MerchantKind,
    /// Key file of the key this merchant shares with its payment server (001 [0107]); read
    /// only by the payment and merchant roles.
    pub shared_key_file: PathBuf,
    /// Who compares the card signature: security-card (FIG. 4), payment-server (FIG. 5),
    /// gateway (FIG. 6) or merchant (FIG. 7).
    #[serde(default = "default_embodiment", with = "embodiment_name")]
    pub embodiment: Embodiment,
    /// The FIG. 8 message layer (TSK/ETSK); on by default.
    #[serde(default = "yes")]
    pub message_layer: bool,
    /// The payment server's name (an `endpoints` key, or the local payment role's name).
    pub payment: String,
    /// The merchant server's name (an `endpoints` key, or the local merchant role's name).
    pub merchant: String,
    #[serde(default)]
    pub items: Vec<ItemDef>,
    /// `loyalty` merchants: the cards that are members, and their accounts.
    #[serde(default)]
    pub members: Vec<MemberDef>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemDef {
    pub id: String,
    pub title: String,
    /// "ppv" (pay-per-view event) or "shop" (shopping-channel item), or the merchant's own.
    pub kind: String,
    #[serde(default)]
    pub detail: String,
    /// Price in minor units.
    pub amount: u64,
    /// ISO 4217 numeric currency code.
    pub currency: u16,
    pub exponent: u8,
}

impl ItemDef {
    pub fn price(&self) -> Money {
        Money::new(self.amount, Currency::new(self.currency, self.exponent))
    }
}

impl MerchantDef {
    /// The key shared with the payment server, from its key file.
    ///
    /// # Errors
    /// See [`read_key_file`].
    pub fn key(&self) -> Result<DesKey, ConfigError> {
        read_key_file(
            &format!("merchant {} shared_key_file", self.id),
            &self.shared_key_file,
        )
    }
}

mod embodiment_name {
    use proto::messages::Embodiment;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Embodiment, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_embodiment(&s).map_err(serde::de::Error::custom)
    }
}

/// An embodiment by name (`security-card`, `payment-server`, `gateway`, `merchant`) or
/// figure (`fig4` … `fig7`).
///
/// # Errors
/// [`ConfigInvalid::UnknownEmbodiment`].
pub fn parse_embodiment(s: &str) -> Result<Embodiment, ConfigInvalid> {
    Ok(match s {
        "security-card" | "fig4" => Embodiment::SecurityCard,
        "payment-server" | "fig5" => Embodiment::PaymentServer,
        "gateway" | "fig6" => Embodiment::Gateway,
        "merchant" | "fig7" => Embodiment::Merchant,
        other => return Err(ConfigInvalid::UnknownEmbodiment(other.into())),
    })
}

fn default_embodiment() -> Embodiment {
    Embodiment::SecurityCard
}
fn yes() -> bool {
    true
}
fn default_payment_name() -> String {
    "payment".into()
}
fn default_merchant_name() -> String {
    "merchant".into()
}
fn default_security_cards() -> SecurityCards {
    SecurityCards::Count(default_security_card_count())
}

fn default_security_card_count() -> u32 {
    4
}
fn default_txn_timeout() -> u64 {
    30
}
fn default_lease_timeout() -> u64 {
    10
}

impl HeadendConfig {
    /// Reads, parses and validates the config file; relative paths in it are resolved
    /// against its directory.
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Syntax`] or [`ConfigError::Invalid`], naming
    /// the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|source| ConfigError::Syntax {
            path: path.into(),
            source: Box::new(source),
        })?;
        cfg.validate().map_err(|source| ConfigError::Invalid {
            path: path.into(),
            source,
        })?;
        Ok(cfg.resolve_relative(path.parent().unwrap_or(Path::new("."))))
    }

    /// Relative paths in the file are relative to the file's directory.
    fn resolve_relative(mut self, base: &Path) -> Self {
        let fix = |p: &mut PathBuf| resolve_path(p, base);
        fix(&mut self.state_dir);
        fix(&mut self.tls.operator_ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(p) = &mut self.payment {
            fix(&mut p.purchase_keys);
        }
        if let Some(l) = &mut self.load {
            if let Some(p) = &mut l.load_keys {
                fix(p);
            }
            if let Some(t) = &mut l.token {
                fix(&mut t.pin_file);
            }
            if let Some(p) = &mut l.rekey_purchase_keys {
                fix(p);
            }
            if let Some(p) = &mut l.app_key_file {
                fix(p);
            }
            fix(&mut l.confirmation_key_file);
            if let Some(v) = &mut l.vouchers_file {
                fix(v);
            }
        }
        if let Some(b) = &mut self.bank {
            fix(&mut b.pin_master_file);
            fix(&mut b.confirmation_key_file);
        }
        for m in &mut self.merchants {
            fix(&mut m.shared_key_file);
        }
        if let Some(f) = &mut self.journal.url_file {
            fix(f);
        }
        for r in self.journal.roles.values_mut() {
            if let Some(f) = &mut r.url_file {
                fix(f);
            }
        }
        self
    }

    /// Checks the rules the file's shape cannot: names unique, prices non-zero, role names
    /// valid, PIN verification values hex.
    ///
    /// # Errors
    /// The first rule broken.
    pub fn validate(&self) -> Result<(), ConfigInvalid> {
        for (name, ep) in &self.endpoints {
            crate::quic::BoxId::new(ep.role(name)).map_err(|e| ConfigInvalid::EndpointRole {
                name: name.clone(),
                why: e.why.to_string(),
            })?;
        }
        if let Some(p) = &self.payment {
            p.terminals().map_err(|e| match e {
                ConfigError::Rule(r) => r,
                other => ConfigInvalid::Terminals(other.to_string()),
            })?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.merchants {
            if !seen.insert(&m.id) {
                return Err(ConfigInvalid::DuplicateMerchant(m.id.clone()));
            }
            let mut items = std::collections::BTreeSet::new();
            for i in &m.items {
                if !items.insert(&i.id) {
                    return Err(ConfigInvalid::DuplicateItem {
                        merchant: m.id.clone(),
                        item: i.id.clone(),
                    });
                }
                let authentication = i.currency == Currency::AUTHENTICATION.code;
                let at = || (m.id.clone(), i.id.clone());
                if i.amount == 0 && !authentication {
                    let (merchant, item) = at();
                    return Err(ConfigInvalid::ZeroPrice { merchant, item });
                }
                if authentication && (i.amount != 0 || i.exponent != 0) {
                    let (merchant, item) = at();
                    return Err(ConfigInvalid::AuthenticationWithValue { merchant, item });
                }
                if authentication && m.kind != MerchantKind::Loyalty {
                    let (merchant, item) = at();
                    return Err(ConfigInvalid::AuthenticationNotLoyalty { merchant, item });
                }
            }
        }
        self.validate_load_side()?;
        self.validate_journal()
    }

    /// The names of the roles this config can run, as their journals are named.
    pub fn role_names(&self) -> Vec<String> {
        let mut names = vec!["gateway".to_string(), "bank".into(), "load".into()];
        names.push(
            self.payment
                .as_ref()
                .map_or_else(default_payment_name, |p| p.name.clone()),
        );
        names.push(
            self.merchant
                .as_ref()
                .map_or_else(default_merchant_name, |m| m.name.clone()),
        );
        names
    }

    fn validate_journal(&self) -> Result<(), ConfigInvalid> {
        let names = self.role_names();
        if let Some(unknown) = self.journal.roles.keys().find(|r| !names.contains(r)) {
            return Err(ConfigInvalid::JournalUnknownRole(unknown.clone()));
        }
        for role in &names {
            if self.journal_backend(role) == JournalBackend::Postgres {
                if let (UrlSource::Inline(url), section) = self.journal_url(role)? {
                    url.expose()
                        .parse::<tokio_postgres::Config>()
                        .map_err(|e| ConfigInvalid::JournalUrl {
                            section,
                            why: e.to_string(),
                        })?;
                }
                self.journal_schema(role)?;
            }
        }
        Ok(())
    }

    fn journal_backend(&self, role: &str) -> JournalBackend {
        self.journal
            .roles
            .get(role)
            .and_then(|r| r.backend)
            .unwrap_or(self.journal.backend)
    }

    /// The connection string's source for `role`, and the section it comes from.
    fn journal_url(&self, role: &str) -> Result<(UrlSource<'_>, String), ConfigInvalid> {
        if let Some(r) = self.journal.roles.get(role) {
            if let Some(found) = pick_url(&r.url, &r.url_file, format!("[journal.roles.{role}]"))? {
                return Ok(found);
            }
        }
        pick_url(
            &self.journal.url,
            &self.journal.url_file,
            "[journal]".into(),
        )?
        .ok_or_else(|| ConfigInvalid::JournalNoUrl {
            section: if self
                .journal
                .roles
                .get(role)
                .is_some_and(|r| r.backend.is_some())
            {
                format!("[journal.roles.{role}]")
            } else {
                "[journal]".into()
            },
        })
    }

    fn journal_schema(&self, role: &str) -> Result<String, ConfigInvalid> {
        let schema = match self.journal.roles.get(role).and_then(|r| r.schema.clone()) {
            Some(s) => s,
            None => format!("{}{role}", self.journal.schema_prefix),
        };
        let why = if schema.is_empty() {
            Some("is empty")
        } else if schema.len() > 63 {
            Some("is longer than PostgreSQL's 63 bytes (it would be cut, and two roles could meet)")
        } else if schema.contains('\0') {
            Some("holds a NUL")
        } else if schema.starts_with("pg_") {
            Some("starts with pg_, which PostgreSQL reserves")
        } else {
            None
        };
        match why {
            Some(why) => Err(ConfigInvalid::JournalSchema {
                role: role.into(),
                schema,
                why,
            }),
            None => Ok(schema),
        }
    }

    /// Where `role`'s journal is: its SQLite file in `state_dir`, or its PostgreSQL schema
    /// with the connection string (read from `url_file` when given).
    ///
    /// # Errors
    /// A rule of `[journal]` broken ([`ConfigError::Rule`]), or the `url_file` missing or
    /// readable by others.
    pub fn journal_target(&self, role: &str) -> Result<crate::journal::Target, ConfigError> {
        use crate::journal::{PgTarget, Target};
        Ok(match self.journal_backend(role) {
            JournalBackend::Sqlite => Target::Sqlite(self.state_dir.join(format!("{role}.sqlite"))),
            JournalBackend::Postgres => {
                let (source, section) = self.journal_url(role)?;
                let url = match source {
                    UrlSource::Inline(u) => u.clone(),
                    UrlSource::File(f) => {
                        let what = format!("{section} url_file");
                        Secret::new(read_private(&what, f)?.trim().to_string())
                    }
                };
                if let Err(e) = url.expose().parse::<tokio_postgres::Config>() {
                    return Err(ConfigInvalid::JournalUrl {
                        section,
                        why: e.to_string(),
                    }
                    .into());
                }
                Target::Postgres(PgTarget {
                    url,
                    schema: self.journal_schema(role)?,
                })
            }
        })
    }

    fn validate_load_side(&self) -> Result<(), ConfigInvalid> {
        if let Some(b) = &self.bank {
            if b.pin_tries == 0 {
                return Err(ConfigInvalid::NoPinTries);
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for a in &self.bank_accounts {
            if !seen.insert(&a.id) {
                return Err(ConfigInvalid::DuplicateAccount(a.id.clone()));
            }
            if self.bank.as_ref().is_some_and(|b| b.float_account == a.id) {
                return Err(ConfigInvalid::AccountIsFloat(a.id.clone()));
            }
            hex::decode(&a.pin_verification_value).map_err(|e| {
                ConfigInvalid::PinVerificationNotHex {
                    account: a.id.clone(),
                    why: e.to_string(),
                }
            })?;
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &self.vouchers {
            if !seen.insert(&v.code) {
                // Never name the code: it is the voucher's secret.
                return Err(ConfigInvalid::DuplicateVoucher);
            }
        }
        Ok(())
    }

    /// Every voucher: those in this config and those in `[load] vouchers_file`.
    ///
    /// # Errors
    /// The vouchers file is missing, readable by others, or malformed.
    pub fn all_vouchers(&self) -> Result<Vec<VoucherDef>, ConfigError> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            #[serde(default)]
            vouchers: Vec<VoucherDef>,
        }
        let mut out = self.vouchers.clone();
        if let Some(p) = self.load.as_ref().and_then(|l| l.vouchers_file.as_ref()) {
            let f: File = read_private_toml("[load] vouchers_file", p)?;
            out.extend(f.vouchers);
        }
        let mut seen = std::collections::BTreeSet::new();
        for v in &out {
            if !seen.insert(v.code.clone()) {
                return Err(ConfigInvalid::DuplicateVoucher.into());
            }
        }
        Ok(out)
    }

    pub fn merchant(&self, id: &str) -> Option<&MerchantDef> {
        self.merchants.iter().find(|m| m.id == id)
    }
}

/// Reads the issuer's personalisation key file (both masters, [`IssuerKeyFile`]): for the
/// issuer's card personalisation and the simulators' cards — never given to a role.
///
/// # Errors
/// The file is missing, readable by others, or not an issuer key file.
pub fn load_issuer_keys(path: &Path) -> Result<IssuerKeys, ConfigError> {
    const WHAT: &str = "issuer keys";
    let file: IssuerKeyFile = read_private_toml(WHAT, path)?;
    file.to_keys().map_err(|detail| ConfigError::BadKeyFile {
        what: WHAT.into(),
        path: path.into(),
        detail,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key file with one generation (the old form) or several (`[[keys]]`, some retired).
    #[test]
    fn master_key_files_take_one_generation_or_several() {
        let d = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = d.path().join(name);
            proto::secret::write_private(&p, text.as_bytes()).unwrap();
            p
        };
        let k = "00112233445566778899AABBCCDDEEFF";
        let one = write("one.toml", &format!("key_version = 3\nmaster = \"{k}\"\n"));
        let keys = read_master_key("one", &one).unwrap();
        assert_eq!(keys.newest().key_version, 3);
        let several = write(
            "several.toml",
            &format!(
                "[[keys]]\nkey_version = 1\nmaster = \"{k}\"\nretired = true\n\n[[keys]]\nkey_version = 2\nmaster = \"{k}\"\n"
            ),
        );
        let keys = read_master_key("several", &several).unwrap();
        assert!(keys.is_retired(1) && !keys.is_retired(2));
        assert_eq!(keys.newest().key_version, 2);
        let all_retired = write(
            "retired.toml",
            &format!("[[keys]]\nkey_version = 1\nmaster = \"{k}\"\nretired = true\n"),
        );
        let e = read_master_key("retired", &all_retired)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no active key version"), "{e}");
    }

    #[test]
    fn errors_name_what_is_wrong() {
        assert_eq!(
            hex_key("pin key file", "zz").unwrap_err().to_string(),
            "pin key file: not hex (Invalid character 'z' at position 0)"
        );
        assert!(matches!(
            hex_key("k", "00112233"),
            Err(ConfigError::BadKey { .. })
        ));
        assert_eq!(
            parse_embodiment("fig9").unwrap_err().to_string(),
            "unknown embodiment \"fig9\": use security-card, payment-server, gateway or merchant"
        );
        let e = ConfigError::Invalid {
            path: "/etc/purselink/headend.toml".into(),
            source: ConfigInvalid::ZeroPrice {
                merchant: "CABLE".into(),
                item: "ppv-1".into(),
            },
        };
        assert_eq!(
            e.to_string(),
            "config /etc/purselink/headend.toml: merchant CABLE: item ppv-1 has a zero price \
             (only an authentication item, currency 999, is free)"
        );
    }

    /// 002 FIG. 16's items: zero in currency 999 only, at a `loyalty` merchant only.
    #[test]
    fn authentication_items_are_free_and_only_at_a_benefits_server() {
        let item = |kind: &str, amount: u64, currency: u16| {
            with_journal(&format!(
                "[[merchants]]\nid = \"M\"\nname = \"M\"\nkind = \"{kind}\"\n\
                 shared_key_file = \"m.key\"\npayment = \"payment\"\nmerchant = \"shop\"\n\
                 [[merchants.items]]\nid = \"i\"\ntitle = \"t\"\nkind = \"benefit\"\n\
                 amount = {amount}\ncurrency = {currency}\nexponent = 0\n\
                 [[merchants.members]]\ncard_id = 7\naccount = \"FF-1\"\n"
            ))
            .map(|_| ())
        };
        assert_eq!(item("loyalty", 0, 999), Ok(()));
        assert!(matches!(
            item("loyalty", 0, 978),
            Err(ConfigInvalid::ZeroPrice { .. })
        ));
        assert!(matches!(
            item("loyalty", 100, 999),
            Err(ConfigInvalid::AuthenticationWithValue { .. })
        ));
        assert!(matches!(
            item("cable", 0, 999),
            Err(ConfigInvalid::AuthenticationNotLoyalty { .. })
        ));
        assert_eq!(item("internet", 250, 978), Ok(()));
    }

    fn with_journal(journal: &str) -> Result<HeadendConfig, ConfigInvalid> {
        let text = format!(
            "state_dir = \"/var/lib/purselink\"\n[tls]\noperator_ca = \"ca.pem\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[merchant]\nname = \"shop\"\n{journal}"
        );
        let cfg: HeadendConfig = toml::from_str(&text).unwrap();
        cfg.validate().map(|()| cfg)
    }

    #[test]
    fn the_journal_defaults_to_sqlite_files_in_the_state_dir() {
        use crate::journal::Target;
        let cfg = with_journal("").unwrap();
        assert_eq!(
            cfg.journal_target("gateway").unwrap(),
            Target::Sqlite("/var/lib/purselink/gateway.sqlite".into())
        );
        assert_eq!(
            cfg.journal_target("shop").unwrap(),
            Target::Sqlite("/var/lib/purselink/shop.sqlite".into())
        );
    }

    #[test]
    fn postgres_per_role_with_schema_prefix_and_overrides() {
        use crate::journal::{PgTarget, Target};
        let cfg = with_journal(
            r#"
[journal]
backend = "postgres"
url = "host=db.example user=purselink password=hunter2 dbname=purselink"
schema_prefix = "site1_"
[journal.roles.bank]
backend = "sqlite"
[journal.roles.shop]
schema = "merchant_shop"
url = "host=other dbname=m"
"#,
        )
        .unwrap();
        assert!(
            !format!("{cfg:?}").contains("hunter2"),
            "Debug masks the url"
        );
        let pg = |role| match cfg.journal_target(role).unwrap() {
            Target::Postgres(PgTarget { url, schema }) => (url.expose().clone(), schema),
            other => panic!("{role}: {other:?}"),
        };
        assert_eq!(pg("gateway").1, "site1_gateway");
        assert_eq!(pg("load").1, "site1_load");
        assert_eq!(
            pg("shop"),
            ("host=other dbname=m".into(), "merchant_shop".into())
        );
        assert_eq!(
            cfg.journal_target("bank").unwrap(),
            Target::Sqlite("/var/lib/purselink/bank.sqlite".into())
        );
    }

    #[test]
    fn journal_config_errors_are_typed_and_name_the_section() {
        let err = |j: &str| with_journal(j).unwrap_err();
        assert_eq!(
            err("[journal]\nbackend = \"postgres\"\n"),
            ConfigInvalid::JournalNoUrl {
                section: "[journal]".into()
            }
        );
        assert_eq!(
            err("[journal.roles.gateway]\nbackend = \"postgres\"\n"),
            ConfigInvalid::JournalNoUrl {
                section: "[journal.roles.gateway]".into()
            }
        );
        assert_eq!(
            err("[journal]\nbackend = \"postgres\"\nurl = \"host=x\"\nurl_file = \"u\"\n"),
            ConfigInvalid::JournalUrlTwice {
                section: "[journal]".into()
            }
        );
        assert_eq!(
            err("[journal.roles.gatway]\nbackend = \"sqlite\"\n"),
            ConfigInvalid::JournalUnknownRole("gatway".into())
        );
        let bad =
            err("[journal]\nbackend = \"postgres\"\nurl = \"password=hunter2 port=notaport\"\n");
        assert!(matches!(bad, ConfigInvalid::JournalUrl { .. }), "{bad:?}");
        assert!(!bad.to_string().contains("hunter2"), "{bad}");
        let long = err(&format!(
            "[journal]\nbackend = \"postgres\"\nurl = \"host=x\"\nschema_prefix = \"{}\"\n",
            "p".repeat(60)
        ));
        assert!(
            matches!(&long, ConfigInvalid::JournalSchema { role, .. } if role == "gateway"),
            "{long:?}"
        );
        assert!(toml::from_str::<JournalSection>("backend = \"mysql\"").is_err());
    }
}
