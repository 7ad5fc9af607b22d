//! The purse's data: what the card says about itself and the command/response bodies that
//! travel between the card, the security card (purchase) and the HSM (load), with their
//! fixed APDU layouts and the exact fields each signature covers.
//!
//! The same structs ride inside the wire messages (serde), so the box, the gateway and the
//! back ends all share one definition (001 [0077]: the draw request carries every card
//! response the security card needs).

use serde::{Deserialize, Serialize};

use crate::codec::{LayoutError, Reader, Writer};
use crate::crypto::{DesKey, Mac};
use crate::money::{Currency, Money};

/// The purse application's AID (proprietary RID A000000999, PIX "PURSE").
pub const PURSE_AID: [u8; 10] = [0xA0, 0x00, 0x00, 0x09, 0x99, 0x50, 0x55, 0x52, 0x53, 0x45];
/// Algorithm identifier: 2-key triple DES, ISO 9797-1 MAC algorithm 3.
pub const ALG_TDES_MAC3: u8 = 0x01;
/// Authentication mode: symmetric (DES) card and security card.
pub const AUTH_MODE_DES: u8 = 0x01;

/// Card status flags (the lock of seed 004).
pub const STATUS_BLOCKED: u8 = 0x01;

/// Load result codes in the LOAD response (001 [0126]).
pub const LOAD_OK: u8 = 0x00;
/// The card reports it was not loaded (a "negative result", 001 [0129]).
pub const LOAD_NEGATIVE: u8 = 0x01;

/// A calendar date (no time zone: the purse works in days).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

impl Date {
    pub const fn new(year: u16, month: u8, day: u8) -> Self {
        Self { year, month, day }
    }
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u16(self.year).u8(self.month).u8(self.day);
    }
    pub(crate) fn read(r: &mut Reader) -> Result<Self, LayoutError> {
        Ok(Self::new(r.u16()?, r.u8()?, r.u8()?))
    }
}

/// Card expiry: valid through the last day of this month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Expiry {
    pub year: u16,
    pub month: u8,
}

impl Expiry {
    pub fn is_expired_on(&self, date: Date) -> bool {
        (date.year, date.month) > (self.year, self.month)
    }
    pub(crate) fn write(&self, w: &mut Writer) {
        w.u16(self.year).u8(self.month);
    }
    pub(crate) fn read(r: &mut Reader) -> Result<Self, LayoutError> {
        Ok(Self {
            year: r.u16()?,
            month: r.u8()?,
        })
    }
}

pub(crate) fn write_currency(w: &mut Writer, c: Currency) {
    w.u16(c.code).u8(c.exponent);
}
pub(crate) fn read_currency(r: &mut Reader) -> Result<Currency, LayoutError> {
    Ok(Currency::new(r.u16()?, r.u8()?))
}

/// Issuer master keys, from which every card's keys are diversified by card id. The
/// security card holds the purchase master key, the HSM the load master key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerKeys {
    pub key_version: u8,
    pub purchase_master: DesKey,
    pub load_master: DesKey,
}

impl IssuerKeys {
    pub fn card_keys(&self, card_id: u64) -> CardKeys {
        CardKeys::derive(self, card_id)
    }

    /// The purchase master alone: what a security card holds.
    pub fn purchase(&self) -> MasterKey {
        MasterKey::new(self.key_version, self.purchase_master.clone())
    }

    /// The load master alone: what the HSM holds.
    pub fn load(&self) -> MasterKey {
        MasterKey::new(self.key_version, self.load_master.clone())
    }
}

/// One issuer master key for one purpose — the purchase master a security card holds, or
/// the load master the HSM holds (001 [0091], [0137]) — with its key version. A role is
/// given only the master it uses; neither is ever serialized into a journal or shown by
/// `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct MasterKey {
    pub key_version: u8,
    key: DesKey,
}

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MasterKey")
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    pub fn new(key_version: u8, key: DesKey) -> Self {
        Self { key_version, key }
    }

    /// The card's own key for this purpose, diversified by card id.
    pub fn card_key(&self, card_id: u64) -> DesKey {
        self.key.diversify(card_id.to_be_bytes())
    }

    /// A card's purchase session key for one transaction counter (with the purchase
    /// master).
    pub fn purchase_session(&self, card_id: u64, atc: u32) -> DesKey {
        self.purse_purchase_session(Purse::Money, card_id, atc)
    }

    /// [`Self::purchase_session`] of `purse`.
    pub fn purse_purchase_session(&self, purse: Purse, card_id: u64, atc: u32) -> DesKey {
        purchase_session(&purse.key(&self.card_key(card_id)), atc)
    }

    /// The key under which a payment server keeps a privacy card's transactions (seed 004;
    /// 002's anonymous payment): it names them by pseudonym and seals what names the card
    /// (`headend::payment::privacy`). Derived from the purchase master, so it lives where
    /// that master lives — the security cards and the payment server's key file — and
    /// nowhere else.
    pub fn privacy_key(&self) -> DesKey {
        self.key.derive(b"PRIVACY", &[])
    }

    /// The key's bytes, for the one place that must write them (the issuer's key files).
    pub fn expose(&self) -> &DesKey {
        &self.key
    }
}

/// The purchase session key for one transaction counter, from a card's purchase key: a
/// fresh key per transaction.
fn purchase_session(card_purchase_key: &DesKey, atc: u32) -> DesKey {
    let mut d = [0u8; 8];
    d[..4].copy_from_slice(b"PUR\0");
    d[4..].copy_from_slice(&atc.to_be_bytes());
    card_purchase_key.diversify(d)
}

/// The generations of one issuer master (seed 002: a security card holds several key
/// generations; 004's monthly key change): every version a role accepts, and which of them
/// are retired — a retired version is refused for purchases (the card must be re-keyed by a
/// load) and still accepted for loads. At least one version is active.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MasterKeys {
    keys: std::collections::BTreeMap<u8, MasterKey>,
    retired: std::collections::BTreeSet<u8>,
}

impl MasterKeys {
    /// # Errors
    /// No key, a version twice, a retired version that is not among the keys, or every
    /// version retired.
    pub fn new(
        keys: impl IntoIterator<Item = MasterKey>,
        retired: impl IntoIterator<Item = u8>,
    ) -> Result<Self, String> {
        let mut map = std::collections::BTreeMap::new();
        for k in keys {
            let v = k.key_version;
            if map.insert(v, k).is_some() {
                return Err(format!("key version {v} appears twice"));
            }
        }
        let retired: std::collections::BTreeSet<u8> = retired.into_iter().collect();
        if let Some(v) = retired.iter().find(|v| !map.contains_key(v)) {
            return Err(format!("retired key version {v} is not among the keys"));
        }
        if map.keys().all(|v| retired.contains(v)) {
            return Err("no active key version (every one is retired, or there is none)".into());
        }
        Ok(Self { keys: map, retired })
    }

    /// The master of `version`, if held.
    pub fn get(&self, version: u8) -> Option<&MasterKey> {
        self.keys.get(&version)
    }

    /// Every version held, oldest first.
    pub fn all(&self) -> impl Iterator<Item = &MasterKey> {
        self.keys.values()
    }

    /// Whether `version` is retired.
    pub fn is_retired(&self, version: u8) -> bool {
        self.retired.contains(&version)
    }

    /// The newest active version: the one new cards and key updates get.
    pub fn newest(&self) -> &MasterKey {
        self.keys
            .values()
            .rev()
            .find(|k| !self.retired.contains(&k.key_version))
            .expect("checked at construction: one version is active")
    }
}

impl From<MasterKey> for MasterKeys {
    fn from(k: MasterKey) -> Self {
        Self::new([k], []).expect("one active key")
    }
}

/// The on-disk form of one [`MasterKey`] (a role's key file: `purchase-keys.toml` for the
/// payment server, `load-keys.toml` for the load server): hex key and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyFile {
    pub key_version: u8,
    pub master: String,
}

/// A role's key file with several generations: `[[keys]]` tables, each a [`MasterKeyFile`]
/// with `retired = true|false` (default false).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterKeysFile {
    pub keys: Vec<MasterKeyEntry>,
}

/// One generation of a [`MasterKeysFile`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterKeyEntry {
    pub key_version: u8,
    pub master: String,
    #[serde(default)]
    pub retired: bool,
}

impl MasterKeysFile {
    /// # Errors
    /// A key is not 16 bytes of hex, or the set is not valid ([`MasterKeys::new`]).
    pub fn to_keys(&self) -> Result<MasterKeys, String> {
        let mut keys = Vec::new();
        for e in &self.keys {
            keys.push(
                MasterKeyFile {
                    key_version: e.key_version,
                    master: e.master.clone(),
                }
                .to_key()
                .map_err(|m| format!("version {}: {m}", e.key_version))?,
            );
        }
        MasterKeys::new(
            keys,
            self.keys
                .iter()
                .filter(|e| e.retired)
                .map(|e| e.key_version),
        )
    }
}

/// A role's key file in either form: one key ([`MasterKeyFile`]) or several generations
/// ([`MasterKeysFile`]). What the payment server's `purchase_keys` and a security card's
/// personalisation read.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum AnyMasterKeyFile {
    One(MasterKeyFile),
    Several(MasterKeysFile),
}

impl AnyMasterKeyFile {
    /// The generations form (one key is one active generation).
    pub fn into_generations(self) -> MasterKeysFile {
        match self {
            Self::Several(f) => f,
            Self::One(f) => MasterKeysFile {
                keys: vec![MasterKeyEntry {
                    key_version: f.key_version,
                    master: f.master,
                    retired: false,
                }],
            },
        }
    }
}

impl MasterKeyFile {
    /// # Errors
    /// The key is not 16 bytes of hex.
    pub fn to_key(&self) -> Result<MasterKey, String> {
        let raw = hex::decode(self.master.trim()).map_err(|e| format!("master: not hex ({e})"))?;
        let key = DesKey::from_slice(&raw).map_err(|e| format!("master: {e}"))?;
        Ok(MasterKey::new(self.key_version, key))
    }

    pub fn from_key(k: &MasterKey) -> Self {
        Self {
            key_version: k.key_version,
            master: hex::encode_upper(k.key.bytes()),
        }
    }
}

/// The on-disk form of [`IssuerKeys`] (a TOML file in deployment): keys as hex strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuerKeyFile {
    pub key_version: u8,
    pub purchase_master: String,
    pub load_master: String,
    /// The scheme's application master (seed 004 card to card, [`crate::transfer`]): cards
    /// personalised from this file get the application keys of four epochs. Absent: cards
    /// without them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_master: Option<String>,
}

impl IssuerKeyFile {
    pub fn to_keys(&self) -> Result<IssuerKeys, String> {
        let key = |name: &str, hex_str: &str| {
            let raw = hex::decode(hex_str.trim()).map_err(|e| format!("{name}: not hex ({e})"))?;
            DesKey::from_slice(&raw).map_err(|e| format!("{name}: {e}"))
        };
        Ok(IssuerKeys {
            key_version: self.key_version,
            purchase_master: key("purchase_master", &self.purchase_master)?,
            load_master: key("load_master", &self.load_master)?,
        })
    }

    pub fn from_keys(k: &IssuerKeys) -> Self {
        Self {
            key_version: k.key_version,
            purchase_master: hex::encode_upper(k.purchase_master.bytes()),
            load_master: hex::encode_upper(k.load_master.bytes()),
            app_master: None,
        }
    }

    /// The application master, if the file has one.
    ///
    /// # Errors
    /// Not a hex 16-byte key.
    pub fn app_master(&self) -> Result<Option<DesKey>, String> {
        self.app_master
            .as_deref()
            .map(|h| {
                let raw =
                    hex::decode(h.trim()).map_err(|e| format!("app_master: not hex ({e})"))?;
                DesKey::from_slice(&raw).map_err(|e| format!("app_master: {e}"))
            })
            .transpose()
    }
}

/// A card's own keys, diversified from the issuer master keys by its card id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardKeys {
    pub purchase: DesKey,
    pub load: DesKey,
}

impl CardKeys {
    pub fn derive(issuer: &IssuerKeys, card_id: u64) -> Self {
        Self {
            purchase: issuer.purchase_master.diversify(card_id.to_be_bytes()),
            load: issuer.load_master.diversify(card_id.to_be_bytes()),
        }
    }

    /// The purchase session key for one transaction number (a fresh key per transaction).
    pub fn purchase_session(&self, atc: u32) -> DesKey {
        self.purse_purchase_session(Purse::Money, atc)
    }

    /// [`Self::purchase_session`] of `purse`.
    pub fn purse_purchase_session(&self, purse: Purse, atc: u32) -> DesKey {
        purchase_session(&purse.key(&self.purchase), atc)
    }

    /// The load key of `purse` (S1, S2, S3 of its loads).
    pub fn purse_load(&self, purse: Purse) -> DesKey {
        purse.key(&self.load)
    }
}

/// The card's two purses (002 [0160]: a card that "in addition to storing monetary value,
/// also stores a quantity of ... points"): money in the card's currency, and loyalty points
/// ([`Currency::POINTS`]). Each has its own keys: the points purse's purchase and load keys
/// are the card's money keys diversified by [`Purse::POINTS_LABEL`], so a session key of
/// one purse never verifies a command for the other. A purse is chosen by the currency
/// that names it: INITIALIZE FOR PURCHASE's P2 bit [`crate::card::P2_POINTS`], INITIALIZE
/// FOR LOAD's currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Purse {
    Money,
    Points,
}

impl Purse {
    /// The diversification data of the points purse's keys.
    pub const POINTS_LABEL: [u8; 8] = *b"POINTS\0\0";

    /// The purse a currency names: points, or money (any other currency; the card checks
    /// it is its own).
    pub fn of(currency: Currency) -> Self {
        if currency == Currency::POINTS {
            Purse::Points
        } else {
            Purse::Money
        }
    }

    /// This purse's key from the card's money key of the same purpose (purchase or load).
    pub fn key(self, card_key: &DesKey) -> DesKey {
        match self {
            Purse::Money => card_key.clone(),
            Purse::Points => card_key.diversify(Self::POINTS_LABEL),
        }
    }
}

/// READ PURSE response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurseInfo {
    pub card_id: u64,
    pub provider_id: u32,
    pub balance: u64,
    pub max_balance: u64,
    pub currency: Currency,
    pub expiry: Expiry,
    pub key_version: u8,
    /// Application transaction counter: advances on every completed debit or load.
    pub atc: u32,
    /// Completed loads (the load counter S1 covers).
    pub load_count: u32,
    pub algorithm: u8,
    pub auth_mode: u8,
    pub status: u8,
    /// Second value type: loyalty points (seed 002, authentication/points embodiment).
    pub points: u64,
    /// Bad signatures in a row (seed 004's BAD_KEY); the card blocks at `bad_key_limit`.
    pub bad_key_count: u8,
    pub bad_key_limit: u8,
    /// The cardholder chose privacy (seed 004): the passbook is never uploaded.
    pub privacy: bool,
    /// The passbook was uploaded to the bank and cleared through this transaction number
    /// (seed 004's PASSBOOK): the log records after it are the passbook.
    pub passbook_through: u32,
}

impl PurseInfo {
    pub fn balance_money(&self) -> Money {
        Money::new(self.balance, self.currency)
    }

    /// The purse a load or purchase in `currency` uses: its balance and the most it holds
    /// (the money purse in the card's currency; the points purse, at most
    /// [`crate::card::POINTS_MAX`]), or `None` when the card has no purse in `currency`.
    pub fn purse_for(&self, currency: Currency) -> Option<(u64, u64)> {
        match Purse::of(currency) {
            Purse::Points => Some((self.points, crate::card::POINTS_MAX)),
            Purse::Money => (currency == self.currency).then_some((self.balance, self.max_balance)),
        }
    }
    pub fn is_blocked(&self) -> bool {
        self.status & STATUS_BLOCKED != 0
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.card_id)
            .u32(self.provider_id)
            .u64(self.balance)
            .u64(self.max_balance);
        write_currency(&mut w, self.currency);
        self.expiry.write(&mut w);
        w.u8(self.key_version)
            .u32(self.atc)
            .u32(self.load_count)
            .u8(self.algorithm)
            .u8(self.auth_mode)
            .u8(self.status)
            .u64(self.points)
            .u8(self.bad_key_count)
            .u8(self.bad_key_limit)
            .u8(u8::from(self.privacy))
            .u32(self.passbook_through);
        w.finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            card_id: r.u64()?,
            provider_id: r.u32()?,
            balance: r.u64()?,
            max_balance: r.u64()?,
            currency: read_currency(&mut r)?,
            expiry: Expiry::read(&mut r)?,
            key_version: r.u8()?,
            atc: r.u32()?,
            load_count: r.u32()?,
            algorithm: r.u8()?,
            auth_mode: r.u8()?,
            status: r.u8()?,
            points: r.u64()?,
            bad_key_count: r.u8()?,
            bad_key_limit: r.u8()?,
            privacy: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(LayoutError(b.len())),
            },
            passbook_through: r.u32()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// INITIALIZE FOR PURCHASE response (001 [0077]): everything the security card needs,
/// authenticated by the card's MAC under the purchase session key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PurchaseInit {
    pub provider_id: u32,
    pub card_id: u64,
    pub algorithm: u8,
    pub expiry: Expiry,
    pub balance: u64,
    pub currency: Currency,
    pub auth_mode: u8,
    /// The transaction number this purchase will use.
    pub atc: u32,
    /// How many INITIALIZE FOR PURCHASE the card has answered, this one included: a counter
    /// the card persists and raises on every one. A cancel's proof that the card did not
    /// debit must come from an INITIALIZE later than the draw's (a higher count), so it was
    /// made after the draw's session — which it ended, so that DEBIT can never run again —
    /// and not before it (a stale proof).
    pub init_count: u32,
    pub key_version: u8,
    /// The last [`RECENT_RUNS`] credit (refund) sessions whose CREDIT the card carried out,
    /// oldest first (0: none yet): each the INITIALIZE count of the session and the
    /// security card whose credit command ran in it. Under the card's MAC: a later
    /// INITIALIZE is the card's own statement of whether one particular refund session
    /// ran — whatever the card did since (its counter moves with any transaction, and its
    /// log keeps only the newest records). Issue 17; the refunds' counterpart of
    /// [`LoadInit::runs`].
    pub credits: [Run; RECENT_RUNS],
    /// The cardholder chose privacy (seed 004; 002's anonymous payment), under the card's
    /// MAC: the payment server then keeps no card id in its records or collection batches,
    /// only a per-transaction pseudonym (`headend::payment::privacy`).
    pub privacy: bool,
    pub card_random: [u8; 8],
    pub card_mac: Mac,
}

impl PurchaseInit {
    pub fn signed_fields(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.provider_id).u64(self.card_id).u8(self.algorithm);
        self.expiry.write(&mut w);
        w.u64(self.balance);
        write_currency(&mut w, self.currency);
        w.u8(self.auth_mode)
            .u32(self.atc)
            .u32(self.init_count)
            .u8(self.key_version);
        for (n, sc) in self.credits {
            w.u32(n).u64(sc);
        }
        w.u8(u8::from(self.privacy)).bytes(&self.card_random);
        w.finish()
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut v = self.signed_fields();
        v.extend_from_slice(&self.card_mac);
        v
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            provider_id: r.u32()?,
            card_id: r.u64()?,
            algorithm: r.u8()?,
            expiry: Expiry::read(&mut r)?,
            balance: r.u64()?,
            currency: read_currency(&mut r)?,
            auth_mode: r.u8()?,
            atc: r.u32()?,
            init_count: r.u32()?,
            key_version: r.u8()?,
            credits: [
                (r.u32()?, r.u64()?),
                (r.u32()?, r.u64()?),
                (r.u32()?, r.u64()?),
                (r.u32()?, r.u64()?),
            ],
            privacy: match r.u8()? {
                0 => false,
                1 => true,
                _ => return Err(LayoutError(b.len())),
            },
            card_random: r.take()?,
            card_mac: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// A key update (001 [0044]; seed 004's monthly key change): the card's keys of a newer
/// key version, issued by the load server's HSM with a load and carried after the load
/// command in the LOAD APDU. Sealed ([`crate::crypto::seal`]: encrypted, then MACed) under
/// [`KeyUpdate::session`] — the card's current load key and this load's S1 — so only this
/// card, in this very load session, can open it, and a tampered one is refused with the
/// whole LOAD. The card takes the new keys in the same atomic state change as the credit.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyUpdate {
    pub key_version: u8,
    pub keys: CardKeys,
}

impl std::fmt::Debug for KeyUpdate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyUpdate")
            .field("key_version", &self.key_version)
            .finish_non_exhaustive()
    }
}

impl KeyUpdate {
    /// The plaintext layout: version, purchase key, load key (33 bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.key_version)
            .bytes(self.keys.purchase.bytes())
            .bytes(self.keys.load.bytes());
        w.finish()
    }

    /// # Errors
    /// Not 33 bytes, or a key that is not a 2-key triple-DES key.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let key_version = r.u8()?;
        let purchase: [u8; 16] = r.take()?;
        let load: [u8; 16] = r.take()?;
        r.end()?;
        Ok(Self {
            key_version,
            keys: CardKeys {
                purchase: DesKey::new(purchase),
                load: DesKey::new(load),
            },
        })
    }

    /// The key an update for one load is sealed under: the card's current load key
    /// diversified by that load's S1 — fresh for every INITIALIZE FOR LOAD (its card random),
    /// so an update is good for the LOAD of that very session only: not for another load at
    /// the same transaction number after this one failed (the second outside attack on
    /// issue 17 moved an UNBLOCK from a failed bank load into a voucher load that way).
    pub fn session(card_load_key: &DesKey, s1: &Mac) -> DesKey {
        load_session(card_load_key, b"KUP", s1)
    }
}

impl KeyUpdate {
    /// The length of a sealed key update in the LOAD APDU (IV, 40 bytes of ciphertext, MAC).
    pub const SEALED_LEN: usize = 56;
}

/// The issuer's UNBLOCK (seed 004): clears the card's lock after too many bad signatures
/// ([`Unblock::LOCK`]) and restores the PIN's tries ([`Unblock::PIN`]). The HSM issues it
/// only with a bank load, sealed like a [`KeyUpdate`] under [`Unblock::session`] (the card's
/// current load key and this load's S1), and the card takes it only inside that load
/// session's LOAD, after the key update if there is one: a blocked card is loaded and opened in
/// one state change, or neither. One that does not open counts as a bad signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unblock {
    pub flags: u8,
}

impl Unblock {
    /// Clear the bad-signature lock (and its count).
    pub const LOCK: u8 = 0x01;
    /// Restore the PIN's tries.
    pub const PIN: u8 = 0x02;
    /// The length of a sealed UNBLOCK in the LOAD APDU (IV, 8 bytes of ciphertext, MAC).
    pub const SEALED_LEN: usize = 24;

    /// The plaintext: `UNBL`, then the flags.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = b"UNBL".to_vec();
        v.push(self.flags);
        v
    }

    /// # Errors
    /// Not `UNBL` and one byte of flags.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let magic: [u8; 4] = r.take()?;
        let flags = r.u8()?;
        r.end()?;
        if &magic != b"UNBL" {
            return Err(LayoutError(0));
        }
        Ok(Self { flags })
    }

    /// The key an UNBLOCK for one load is sealed under: as [`KeyUpdate::session`], under
    /// its own label.
    pub fn session(card_load_key: &DesKey, s1: &Mac) -> DesKey {
        load_session(card_load_key, b"UBK", s1)
    }
}

/// The card's load key diversified by `label` and one load's S1 (the issuer's sealed items
/// ride in that load's LOAD only).
pub(crate) fn load_session(card_load_key: &DesKey, label: &[u8; 3], s1: &Mac) -> DesKey {
    let mut d = *s1;
    for (b, l) in d.iter_mut().zip(label) {
        *b ^= l;
    }
    card_load_key.diversify(d)
}

/// The debit command ("debit IEP", 001 [0094]) the security card issues, with its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitCommand {
    pub security_card_id: u64,
    pub security_card_txn: u32,
    pub card_id: u64,
    pub atc: u32,
    pub amount: u64,
    pub currency: Currency,
    pub date: Date,
    pub security_card_signature: Mac,
}

impl DebitCommand {
    fn fields(&self) -> Writer {
        let mut w = Writer::default();
        w.u64(self.security_card_id)
            .u32(self.security_card_txn)
            .u64(self.card_id)
            .u32(self.atc)
            .u64(self.amount);
        write_currency(&mut w, self.currency);
        self.date.write(&mut w);
        w
    }
    /// What the security-card signature covers; the card random binds it to this session.
    pub fn signed_fields(&self, card_random: &[u8; 8]) -> Vec<u8> {
        self.fields().bytes(card_random).finish()
    }
    pub fn amount_money(&self) -> Money {
        Money::new(self.amount, self.currency)
    }
    pub fn encode(&self) -> Vec<u8> {
        self.fields().bytes(&self.security_card_signature).finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            security_card_id: r.u64()?,
            security_card_txn: r.u32()?,
            card_id: r.u64()?,
            atc: r.u32()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            date: Date::read(&mut r)?,
            security_card_signature: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// The card's debit response ("success", 001 [0082]–[0083]) with the card signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitResponse {
    pub card_id: u64,
    pub atc: u32,
    pub amount: u64,
    pub currency: Currency,
    pub new_balance: u64,
    pub security_card_id: u64,
    pub security_card_txn: u32,
    pub card_signature: Mac,
}

impl DebitResponse {
    /// Whether this response answers `command`: the same security card and its transaction,
    /// the same card and counter, amount and currency (the card's signature is checked
    /// apart, in constant time: [`crate::security_card::SecurityCard::signatures_match`]).
    pub fn answers(&self, command: &DebitCommand) -> bool {
        self.security_card_id == command.security_card_id
            && self.security_card_txn == command.security_card_txn
            && self.card_id == command.card_id
            && self.atc == command.atc
            && self.amount == command.amount
            && self.currency == command.currency
    }

    fn fields(&self) -> Writer {
        let mut w = Writer::default();
        w.u64(self.card_id).u32(self.atc).u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u64(self.new_balance)
            .u64(self.security_card_id)
            .u32(self.security_card_txn);
        w
    }
    pub fn signed_fields(&self, card_random: &[u8; 8]) -> Vec<u8> {
        self.fields().bytes(card_random).finish()
    }
    pub fn encode(&self) -> Vec<u8> {
        self.fields().bytes(&self.card_signature).finish()
    }

    /// The response's check value: its card signature bound to every field the card
    /// signed (SHA-256 over a label, the encoded response, first 8 bytes). What the
    /// security card hands out as the expected signature (001 [0097]–[0105]) and keeps for
    /// its own comparison is the check value of the response it expects, so whoever
    /// compares — the security card, the payment server, the gateway, the merchant — takes
    /// only that very response: the card's signature with any field changed (a forged new
    /// balance) no longer matches, though none of them holds the card's key.
    #[must_use]
    pub fn check_value(&self) -> Mac {
        use sha2::Digest;
        let mut h = sha2::Sha256::new();
        h.update(b"PURSELINK RESPONSE CHECK v1\0");
        h.update(self.encode());
        let d = h.finalize();
        let mut out = [0u8; 8];
        out.copy_from_slice(&d[..8]);
        out
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            card_id: r.u64()?,
            atc: r.u32()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            new_balance: r.u64()?,
            security_card_id: r.u64()?,
            security_card_txn: r.u32()?,
            card_signature: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// A merchant's refund to the card ("credit", issue 17's CREDIT; the reverse of 001 [0094]'s
/// debit command): issued and signed by the security card that counted the sale, under the
/// card's purchase session key of an INITIALIZE FOR CREDIT. The same fields and layout as a
/// [`DebitCommand`] (whose `amount` is then the amount credited), signed under its own label
/// ([`CreditCommand::LABEL`]) so neither is ever taken for the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditCommand(pub DebitCommand);

impl CreditCommand {
    /// The signature label of a credit command.
    pub const LABEL: &'static [u8; 4] = b"CCMD";
    /// The label of the card's MAC on an INITIALIZE FOR CREDIT answer ([`PurchaseInit`]).
    pub const INIT_LABEL: &'static [u8; 4] = b"ICRD";

    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }
    /// # Errors
    /// As [`DebitCommand::decode`].
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        DebitCommand::decode(b).map(Self)
    }
}

/// The card's answer to CREDIT: what it credited and its balance after, with the card's
/// signature under [`CreditResponse::LABEL`]. The layout of a [`DebitResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditResponse(pub DebitResponse);

impl CreditResponse {
    /// The signature label of a credit response.
    pub const LABEL: &'static [u8; 4] = b"CRSP";

    pub fn encode(&self) -> Vec<u8> {
        self.0.encode()
    }
    /// # Errors
    /// As [`DebitResponse::decode`].
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        DebitResponse::decode(b).map(Self)
    }
}

/// Which way value moves between the card and the issuer's HSM (001 [0119]–[0132] loads;
/// issue 17's unload, 004 card-to-bank, the same exchange in reverse): INITIALIZE (S1), the
/// HSM's command (S2), the card's answer (S3), and the negative-result procedure, each
/// MACed under its direction's own label so that no load's S1, S2 or S3 stands for an
/// unload's, nor the reverse. The layouts are the same ([`LoadInit`], [`LoadCommand`],
/// [`LoadResponse`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// Value to the card.
    Load,
    /// Value from the card back to the issuer: its balance goes down by the amount.
    Unload,
}

impl Direction {
    /// The labels of S1, S2 and S3.
    pub const fn labels(self) -> (&'static [u8; 4], &'static [u8; 4], &'static [u8; 4]) {
        match self {
            Direction::Load => (b"S1LD", b"S2LD", b"S3LD"),
            Direction::Unload => (b"S1UL", b"S2UL", b"S3UL"),
        }
    }
}

/// INITIALIZE FOR LOAD command data: what the load is for, and the server's time stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadInitRequest {
    pub amount: u64,
    pub currency: Currency,
    pub timestamp: u64,
    pub date: Date,
}

impl LoadInitRequest {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u64(self.timestamp);
        self.date.write(&mut w);
        w.finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            timestamp: r.u64()?,
            date: Date::read(&mut r)?,
        };
        r.end()?;
        Ok(v)
    }
}

/// INITIALIZE FOR LOAD response, carrying S1 (001 [0123]).
///
/// S1 covers the card's balance and load count but not its transaction counter: the
/// negative-result procedure ([0131]–[0132]) must tell "the card was loaded" (balance or
/// load count moved) from "the counter moved by accident" (only the ATC moved).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadInit {
    pub card_id: u64,
    pub expiry: Expiry,
    pub balance: u64,
    pub max_balance: u64,
    pub currency: Currency,
    pub atc: u32,
    pub load_count: u32,
    /// How many INITIALIZE FOR LOAD the card has answered, this one included (persisted,
    /// raised on every one). A zero-value proof of [0130]–[0132] must come from an
    /// INITIALIZE later than the load's own (a higher count): made after the load's session,
    /// which it ended, so the load command can never run afterwards — a proof made before
    /// the load (a stale one) would otherwise show the counters of a card that then loads.
    pub init_count: u32,
    pub key_version: u8,
    pub amount: u64,
    pub timestamp: u64,
    /// The digest of the card's passbook ([`passbook_digest`] of its log records after
    /// the last upload; zeros when there are none or the cardholder chose privacy), under
    /// S1: what a bank load uploads must be exactly these records (seed 004 PASSBOOK).
    pub passbook: Mac,
    /// The INITIALIZE counts (`init_count`) of the last [`RECENT_RUNS`] load and unload
    /// sessions whose LOAD or UNLOAD the card carried out, oldest first (0: none yet), under
    /// S1: the negative-result procedure's proof of whether one particular session ran —
    /// whatever other loads or unloads (at any HSM) happened since.
    pub runs: [Run; RECENT_RUNS],
    pub card_random: [u8; 8],
    pub s1: Mac,
}

/// One load or unload session a card carried out: its INITIALIZE count and the id of the
/// HSM whose command ran in it (another HSM's command for the same session never ran).
/// Also a credit session ([`PurchaseInit::credits`]), with the security card's id.
pub type Run = (u32, u64);

/// How many executed load/unload sessions a card names in its S1 ([`LoadInit::runs`]), and
/// credit sessions in its INITIALIZE FOR PURCHASE answers ([`PurchaseInit::credits`]).
pub const RECENT_RUNS: usize = 4;

impl LoadInit {
    /// The fields S1 covers.
    pub fn signed_fields(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.card_id);
        self.expiry.write(&mut w);
        w.u64(self.balance)
            .u32(self.load_count)
            .u32(self.init_count)
            .u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u64(self.timestamp).bytes(&self.passbook);
        for (n, hsm) in self.runs {
            w.u32(n).u64(hsm);
        }
        w.bytes(&self.card_random);
        w.finish()
    }
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.card_id);
        self.expiry.write(&mut w);
        w.u64(self.balance).u64(self.max_balance);
        write_currency(&mut w, self.currency);
        w.u32(self.atc)
            .u32(self.load_count)
            .u32(self.init_count)
            .u8(self.key_version)
            .u64(self.amount)
            .u64(self.timestamp)
            .bytes(&self.passbook);
        for (n, hsm) in self.runs {
            w.u32(n).u64(hsm);
        }
        w.bytes(&self.card_random).bytes(&self.s1);
        w.finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            card_id: r.u64()?,
            expiry: Expiry::read(&mut r)?,
            balance: r.u64()?,
            max_balance: r.u64()?,
            currency: read_currency(&mut r)?,
            atc: r.u32()?,
            load_count: r.u32()?,
            init_count: r.u32()?,
            key_version: r.u8()?,
            amount: r.u64()?,
            timestamp: r.u64()?,
            passbook: r.take()?,
            runs: [
                (r.u32()?, r.u64()?),
                (r.u32()?, r.u64()?),
                (r.u32()?, r.u64()?),
                (r.u32()?, r.u64()?),
            ],
            card_random: r.take()?,
            s1: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// The load command with S2 (001 [0125]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadCommand {
    pub hsm_id: u64,
    pub card_id: u64,
    pub atc: u32,
    pub amount: u64,
    pub currency: Currency,
    /// The passbook reached the bank through this transaction number: the card clears it
    /// (does not upload it again) with the credit. 0: nothing uploaded (seed 004 PASSBOOK).
    pub passbook_through: u32,
    pub s2: Mac,
}

impl LoadCommand {
    /// The encoded length: a LOAD APDU's data longer than this carries a sealed
    /// [`KeyUpdate`] after it.
    pub const LEN: usize = 43;

    fn fields(&self) -> Writer {
        let mut w = Writer::default();
        w.u64(self.hsm_id)
            .u64(self.card_id)
            .u32(self.atc)
            .u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u32(self.passbook_through);
        w
    }
    pub fn signed_fields(&self, s1: &Mac) -> Vec<u8> {
        self.fields().bytes(s1).finish()
    }
    pub fn encode(&self) -> Vec<u8> {
        self.fields().bytes(&self.s2).finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            hsm_id: r.u64()?,
            card_id: r.u64()?,
            atc: r.u32()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            passbook_through: r.u32()?,
            s2: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// The digest of a passbook (seed 004 PASSBOOK: the card's log records since its last
/// upload, oldest first): the first 8 bytes of SHA-256 over their encodings, each prefixed
/// by its length; all zeros for none (nothing to upload, or the cardholder chose privacy).
/// Under S1 ([`LoadInit::passbook`]), it binds what a bank load uploads to the card.
pub fn passbook_digest(records: &[LogRecord]) -> Mac {
    use sha2::{Digest, Sha256};
    if records.is_empty() {
        return [0; 8];
    }
    let mut h = Sha256::new();
    for r in records {
        let e = r.encode();
        h.update([e.len() as u8]);
        h.update(&e);
    }
    let d = h.finalize();
    let mut out = [0u8; 8];
    out.copy_from_slice(&d[..8]);
    out
}

/// LOAD response: result code and S3 (001 [0126]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadResponse {
    pub card_id: u64,
    /// The transaction number the load used.
    pub atc: u32,
    pub amount: u64,
    pub currency: Currency,
    pub result: u8,
    pub new_balance: u64,
    pub s3: Mac,
}

impl LoadResponse {
    pub fn is_loaded(&self) -> bool {
        self.result == LOAD_OK
    }
    fn fields(&self) -> Writer {
        let mut w = Writer::default();
        w.u64(self.card_id).u32(self.atc).u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u8(self.result).u64(self.new_balance);
        w
    }
    pub fn signed_fields(&self, s2: &Mac) -> Vec<u8> {
        self.fields().bytes(s2).finish()
    }
    pub fn encode(&self) -> Vec<u8> {
        self.fields().bytes(&self.s3).finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            card_id: r.u64()?,
            atc: r.u32()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            result: r.u8()?,
            new_balance: r.u64()?,
            s3: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// What a log record is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogKind {
    Debit = 1,
    Load = 2,
    /// A refund credited by a merchant's security card ([`CreditCommand`]).
    Credit = 3,
    /// Value unloaded back to the issuer (004 card-to-bank; [`Direction::Unload`]).
    Unload = 4,
    /// Value sent to another card (seed 004 FIG. 4; [`crate::transfer`]): the counterparty
    /// is the payee card, the signature field the transfer's random R2.
    TransferOut = 5,
    /// Value received from another card: the counterparty is the payer card.
    TransferIn = 6,
    /// A transfer the payee cancelled, credited back to the payer.
    TransferBack = 7,
}

impl LogKind {
    /// Whether the record's value left the card (a debit, unload or transfer sent), rather
    /// than came onto it.
    pub fn takes_value(self) -> bool {
        matches!(self, Self::Debit | Self::Unload | Self::TransferOut)
    }
}

/// One record of the card's transaction log (001 [0016]). A debit record keeps the card
/// signature so a box recovering from a crash can re-send the debit response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogRecord {
    pub kind: LogKind,
    pub atc: u32,
    pub amount: u64,
    pub currency: Currency,
    pub balance_after: u64,
    pub date: Date,
    /// The security card or HSM on the other side.
    pub counterparty: u64,
    /// The security card's transaction number (debits), 0 for loads.
    pub counterparty_txn: u32,
    /// The card signature (debits) or S3 (loads) the card returned.
    pub signature: Mac,
}

impl LogRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.kind as u8).u32(self.atc).u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u64(self.balance_after);
        self.date.write(&mut w);
        w.u64(self.counterparty)
            .u32(self.counterparty_txn)
            .bytes(&self.signature);
        w.finish()
    }
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let kind = match r.u8()? {
            1 => LogKind::Debit,
            2 => LogKind::Load,
            3 => LogKind::Credit,
            4 => LogKind::Unload,
            5 => LogKind::TransferOut,
            6 => LogKind::TransferIn,
            7 => LogKind::TransferBack,
            _ => return Err(LayoutError(b.len())),
        };
        let v = Self {
            kind,
            atc: r.u32()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            balance_after: r.u64()?,
            date: Date::read(&mut r)?,
            counterparty: r.u64()?,
            counterparty_txn: r.u32()?,
            signature: r.take()?,
        };
        r.end()?;
        Ok(v)
    }

    /// Rebuilds the debit response this record proves (for recovery), if it is a debit.
    pub fn debit_response(&self, card_id: u64) -> Option<DebitResponse> {
        (self.kind == LogKind::Debit).then(|| self.response(card_id))
    }

    /// Rebuilds the credit response this record proves (for recovery), if it is a credit.
    pub fn credit_response(&self, card_id: u64) -> Option<CreditResponse> {
        (self.kind == LogKind::Credit).then(|| CreditResponse(self.response(card_id)))
    }

    fn response(&self, card_id: u64) -> DebitResponse {
        DebitResponse {
            card_id,
            atc: self.atc,
            amount: self.amount,
            currency: self.currency,
            new_balance: self.balance_after,
            security_card_id: self.counterparty,
            security_card_txn: self.counterparty_txn,
            card_signature: self.signature,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_is_through_end_of_month() {
        let e = Expiry {
            year: 2027,
            month: 6,
        };
        assert!(!e.is_expired_on(Date::new(2027, 6, 30)));
        assert!(e.is_expired_on(Date::new(2027, 7, 1)));
        assert!(e.is_expired_on(Date::new(2028, 1, 1)));
    }

    #[test]
    fn layouts_round_trip_and_refuse_trailing_bytes() {
        let c = DebitCommand {
            security_card_id: 7,
            security_card_txn: 9,
            card_id: 1,
            atc: 3,
            amount: 250,
            currency: Currency::EUR,
            date: Date::new(2026, 11, 21),
            security_card_signature: [1; 8],
        };
        let b = c.encode();
        assert_eq!(DebitCommand::decode(&b).unwrap(), c);
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(DebitCommand::decode(&longer), Err(LayoutError(1)));
        assert!(DebitCommand::decode(&b[..b.len() - 1]).is_err());
    }
}
