//! The file-backed virtual purse card: [`proto::card::PurseCard`] with its state in a file.
//!
//! Persistence is atomic: every state change is written to a temporary file (0600: the file
//! holds the card's keys), fsync'd, and renamed over the card file (then the directory is
//! fsync'd), before the card answers.
//! A process killed at any instant leaves the old state or the new one, never half a
//! debit; and a card that answered a debit has persisted it.
//!
//! File layout: magic `PLVC`, a format version byte, then the postcard-encoded
//! [`CardState`].

use std::fs;
use std::path::{Path, PathBuf};

use proto::apdu::{CardApplication, Response, StatusWord};
use proto::card::{CardSpec, CardState, PurseCard};
use proto::purse::IssuerKeys;

const MAGIC: &[u8; 4] = b"PLVC";
/// 2: the card counts its INITIALIZE commands (`purchase_inits`, `load_inits`); 3: the
/// cardholder PIN and its threshold (`pin`); 4: service-provider records and the cardholder
/// data (seed 003); 5: the credit sessions the card carried out (`recent_credits`, issue 17);
/// 6: application keys and card-to-card transfers (`app_keys`, `sent`, `receiving`,
/// `remembered`, issue 18).
const FORMAT: u8 = 6;
/// ISO 7816-4 "memory failure": the card could not persist, so nothing happened.
pub const SW_MEMORY_FAILURE: StatusWord = StatusWord(0x6581);

#[derive(Debug, thiserror::Error)]
pub enum VcardError {
    #[error("card file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("card file {path} is not a Purselink virtual card ({detail})")]
    Format { path: PathBuf, detail: String },
    #[error("card file {0} already exists; refusing to overwrite a card")]
    Exists(PathBuf),
}

/// A purse card whose state lives in `path`.
pub struct VirtualCard {
    path: PathBuf,
    card: PurseCard,
}

impl VirtualCard {
    /// Personalises a new card and writes its file. Refuses to overwrite an existing card.
    pub fn create(path: &Path, spec: &CardSpec, issuer: &IssuerKeys) -> Result<Self, VcardError> {
        if path.exists() {
            return Err(VcardError::Exists(path.into()));
        }
        Self::create_with(path, CardState::personalise(spec, issuer))
    }

    /// Creates a new card file holding `state` (a personalised card, e.g. with its PIN:
    /// [`CardState::with_pin`]). Refuses to overwrite.
    pub fn create_with(path: &Path, state: CardState) -> Result<Self, VcardError> {
        if path.exists() {
            return Err(VcardError::Exists(path.into()));
        }
        write_atomically(path, &encode(&state))?;
        Ok(Self::with_state(path, state))
    }

    /// Opens an existing card file.
    pub fn open(path: &Path) -> Result<Self, VcardError> {
        let bytes = fs::read(path).map_err(|source| VcardError::Io {
            path: path.into(),
            source,
        })?;
        let state = decode(&bytes).map_err(|detail| VcardError::Format {
            path: path.into(),
            detail,
        })?;
        Ok(Self::with_state(path, state))
    }

    fn with_state(path: &Path, state: CardState) -> Self {
        Self {
            path: path.into(),
            card: PurseCard::new(state, rand::random()),
        }
    }

    pub fn state(&self) -> &CardState {
        &self.card.state
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Changes persistent state outside the APDU interface (test fault injection, issuer
    /// tools) and persists it.
    pub fn update(&mut self, f: impl FnOnce(&mut CardState)) -> Result<(), VcardError> {
        let mut next = self.card.state.clone();
        f(&mut next);
        write_atomically(&self.path, &encode(&next))?;
        self.card.state = next;
        Ok(())
    }
}

impl CardApplication for VirtualCard {
    fn atr(&self) -> Vec<u8> {
        self.card.atr()
    }

    fn reset(&mut self) {
        self.card.reset();
    }

    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        let before = self.card.state.clone();
        let out = self.card.process(apdu);
        if out.state_changed {
            if let Err(e) = write_atomically(&self.path, &encode(&self.card.state)) {
                // Not persisted means not done: roll back and say so.
                tracing::error!(path = %self.path.display(), error = %e, "card state not persisted; command undone");
                self.card.state = before;
                self.card.reset();
                return Response::status(SW_MEMORY_FAILURE).to_bytes();
            }
        }
        out.response
    }
}

fn encode(state: &CardState) -> Vec<u8> {
    encode_file(MAGIC, FORMAT, state)
}

fn decode(bytes: &[u8]) -> Result<CardState, String> {
    decode_file(bytes, MAGIC, FORMAT, "vcard create")
}

/// A virtual card's file: `magic`, a `format` byte, then the postcard-encoded `state`
/// (the purse card's, [`crate::vpsam`]'s security card).
pub(crate) fn encode_file<T: serde::Serialize>(magic: &[u8; 4], format: u8, state: &T) -> Vec<u8> {
    let mut out = magic.to_vec();
    out.push(format);
    out.extend(postcard::to_allocvec(state).expect("in-memory serialization"));
    out
}

/// Reads [`encode_file`]'s layout; another magic or format is refused, naming the command
/// (`remake`) that makes the card again.
pub(crate) fn decode_file<T: serde::de::DeserializeOwned>(
    bytes: &[u8],
    magic: &[u8; 4],
    format: u8,
    remake: &str,
) -> Result<T, String> {
    let name = String::from_utf8_lossy(magic);
    let rest = bytes
        .strip_prefix(magic.as_slice())
        .ok_or_else(|| format!("missing {name} magic"))?;
    let (&found, body) = rest.split_first().ok_or("no format byte")?;
    if found != format {
        return Err(format!(
            "format {found}, this build reads {format}: make the card again with `{remake}`"
        ));
    }
    postcard::from_bytes(body).map_err(|e| e.to_string())
}

/// Write-temp, fsync, rename, fsync-directory; the file holds the card's keys, so it is
/// owner-only (0600) whatever the umask ([`proto::secret::write_private`]).
pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), VcardError> {
    proto::secret::write_private(path, bytes).map_err(|source| VcardError::Io {
        path: path.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::card::commands;
    use proto::crypto::DesKey;
    use proto::money::Currency;
    use proto::purse::{Expiry, PurseInfo};

    fn spec() -> CardSpec {
        CardSpec {
            card_id: 77,
            provider_id: 1,
            currency: Currency::EUR,
            balance: 1_000,
            max_balance: 10_000,
            expiry: Expiry {
                year: 2030,
                month: 1,
            },
        }
    }

    fn issuer() -> IssuerKeys {
        IssuerKeys {
            key_version: 1,
            purchase_master: DesKey::new([1; 16]),
            load_master: DesKey::new([2; 16]),
        }
    }

    /// A card pulled in the middle of a LOAD that re-keys it (001 [0044]): the card could
    /// not persist (its directory replaced, as when the power goes before the write), so it
    /// answers 6581 and keeps its old state — balance and keys of version 1 — and still
    /// loads under version 1; the LOAD that persists moves balance and keys together.
    #[test]
    fn a_load_that_re_keys_is_all_or_nothing_on_the_card_file() {
        use proto::hsm::Hsm;
        use proto::money::Money;
        use proto::purse::{CardKeys, LoadInit, LoadInitRequest, MasterKeys};
        let v2 = IssuerKeys {
            key_version: 2,
            purchase_master: DesKey::new([3; 16]),
            load_master: DesKey::new([4; 16]),
        };
        let both = |f: fn(&IssuerKeys) -> proto::purse::MasterKey| {
            MasterKeys::new([f(&issuer()), f(&v2)], []).unwrap()
        };
        let hsm = |h| Hsm::new(h, both(IssuerKeys::load)).with_rekey(both(IssuerKeys::purchase));
        let today = proto::purse::Date::new(2026, 11, 30);
        let outer = tempfile::tempdir().unwrap();
        let dir = outer.path().join("cards");
        fs::create_dir(&dir).unwrap();
        let p = dir.join("card.plvc");
        let mut c = VirtualCard::create(&p, &spec(), &issuer()).unwrap();
        let init_load = |c: &mut VirtualCard, ts| {
            c.process_apdu(&commands::select());
            let r = c.process_apdu(&commands::init_load(&LoadInitRequest {
                amount: 500,
                currency: Currency::EUR,
                timestamp: ts,
                date: today,
            }));
            LoadInit::decode(&r[..r.len() - 2]).unwrap()
        };
        let mut h = hsm(9);
        let init = init_load(&mut c, 1);
        let cmd = h
            .authorize("l1", &init, Money::new(500, Currency::EUR), today)
            .unwrap();
        let update = h.key_update(&init).unwrap();
        // Pulled: the write cannot happen.
        let away = outer.path().join("away");
        fs::rename(&dir, &away).unwrap();
        fs::write(&dir, b"not a directory").unwrap();
        let r = c.process_apdu(&commands::load_with_update(&cmd, Some(&update)));
        fs::remove_file(&dir).unwrap();
        fs::rename(&away, &dir).unwrap();
        assert!(r.ends_with(&SW_MEMORY_FAILURE.0.to_be_bytes()), "{r:02X?}");
        let mut again = VirtualCard::open(&p).unwrap();
        assert_eq!(
            (again.state().balance, again.state().key_version),
            (1_000, 1)
        );
        // Usable under version 1: a new load verifies (S1) and re-keys this time.
        let mut h = hsm(10);
        let init = init_load(&mut again, 2);
        assert_eq!(init.key_version, 1);
        let cmd = h
            .authorize("l2", &init, Money::new(500, Currency::EUR), today)
            .unwrap();
        let update = h.key_update(&init).unwrap();
        let r = again.process_apdu(&commands::load_with_update(&cmd, Some(&update)));
        assert!(r.ends_with(&[0x90, 0x00]), "{r:02X?}");
        let after = VirtualCard::open(&p).unwrap();
        assert_eq!(
            (after.state().balance, after.state().key_version),
            (1_500, 2)
        );
        assert_eq!(after.state().keys, CardKeys::derive(&v2, 77));
    }

    #[test]
    fn create_open_and_refuse_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("card.plvc");
        let mut c = VirtualCard::create(&p, &spec(), &issuer()).unwrap();
        assert!(matches!(
            VirtualCard::create(&p, &spec(), &issuer()),
            Err(VcardError::Exists(_))
        ));
        c.update(|s| s.balance = 1_234).unwrap();
        let mut again = VirtualCard::open(&p).unwrap();
        assert!(
            again
                .process_apdu(&commands::select())
                .ends_with(&[0x90, 0])
        );
        let r = again.process_apdu(&commands::read_purse());
        assert_eq!(PurseInfo::decode(&r[..r.len() - 2]).unwrap().balance, 1_234);
        fs::write(&p, b"not a card").unwrap();
        assert!(matches!(
            VirtualCard::open(&p),
            Err(VcardError::Format { .. })
        ));
    }
}
