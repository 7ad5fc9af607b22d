//! Privacy (seed 004 PASSBOOK and privacy; 002's "anonymous payment solution on request"):
//! a card whose holder chose privacy says so in its INITIALIZE FOR PURCHASE, under its MAC
//! ([`proto::purse::PurchaseInit::privacy`]), and the payment server then keeps no card id
//! in its journal or its collection batches.
//!
//! - **A per-transaction pseudonym** names the card in the transaction's records, its
//!   batch record and its refund: [`PrivacyKeys::pseudonym`], a MAC of card id and
//!   transaction id under the privacy key. Two transactions of one card have unrelated
//!   pseudonyms; the same card and transaction always have the same one, so a retry, a
//!   cancel's proof or a refund to "the same card" is checked by computing the pseudonym
//!   of the card id the message names.
//! - **Card messages a record keeps** to compare a repeat with (the debit response, FIG.
//!   5's debit command, a refund's credit response) name the card by its pseudonym and
//!   leave out the card's counter and balance, which would chain its transactions
//!   ([`NamesCard::kept`]).
//! - **Answers kept whole** for a retry (the routed debit command, the confirmation, a
//!   refund's credit command) are sealed under the privacy key ([`AtRest`]), as is the
//!   card id itself ([`CardNaming::Pseudonym`]), for the one step that must find the card
//!   again: the refund a merchant authorizes later is filed under the card's tag
//!   ([`PrivacyKeys::card_tag`]), where the card's next refunds-due request looks.
//! - **Per-card indexes** — the newest INITIALIZE a draw used (replay check; it keeps a
//!   digest of the transaction id, not the id) and the refunds due — are keyed by the
//!   card's tag, a MAC of the card id alone: stable per card, as the index needs, and no
//!   card id. The tag links one card's refunds due to each other (until credited).
//!
//! The privacy key is derived from the purchase master ([`proto::purse::MasterKey::
//! privacy_key`]): it lives where that master lives (the security cards and the payment
//! server's key file), never in a journal. Whoever holds the master can name the card of a
//! private transaction — the issuer, for a dispute — and nobody who reads only the payment
//! server's journal or the batches (the acquirer, clearing, an operator with that
//! database) can. Other roles' journals are not covered: the gateway keeps the box's
//! messages (they name the card) for its own retries, and a FIG. 7 merchant compares the
//! card's debit response itself. An authentication (002 FIG. 16) names the card to its
//! merchant — it exists to tell the merchant which member is there — sealed for that
//! merchant alone.
//!
//! A purchase key version must stay in the key file (retired, if need be) while the
//! journal holds private records sealed under it: the payment server does not start
//! without it, and a refund of such a sale cannot be filed.

use proto::crypto::{self, DesKey};
use proto::purse::{CreditResponse, DebitCommand, DebitResponse, MasterKeys};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::journal;

/// The privacy keys of every purchase key version the payment server holds.
#[derive(Clone)]
pub struct PrivacyKeys {
    keys: std::collections::BTreeMap<u8, DesKey>,
    newest: u8,
}

impl std::fmt::Debug for PrivacyKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivacyKeys")
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// How a transaction's records name its card.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CardNaming {
    /// By its card id (the cardholder did not choose privacy).
    Clear,
    /// By [`PrivacyKeys::pseudonym`] under the privacy key of purchase key version
    /// `key_version`; `card` is the card id sealed under that key ([`AtRest`]).
    Pseudonym { key_version: u8, card: Vec<u8> },
}

impl CardNaming {
    /// Whether the cardholder chose privacy.
    pub fn is_private(&self) -> bool {
        matches!(self, CardNaming::Pseudonym { .. })
    }
}

impl PrivacyKeys {
    /// From the purchase masters the payment server holds.
    pub fn new(master: &MasterKeys) -> Self {
        Self {
            keys: master
                .all()
                .map(|k| (k.key_version, k.privacy_key()))
                .collect(),
            newest: master.newest().key_version,
        }
    }

    fn key(&self, version: u8) -> Result<&DesKey, String> {
        self.keys.get(&version).ok_or_else(|| {
            format!("purchase key version {version} is no longer held: its private records cannot be opened")
        })
    }

    /// How a new transaction of `card_id` is named: by pseudonym under the newest key when
    /// `privacy`.
    pub fn naming(&self, privacy: bool, card_id: u64) -> CardNaming {
        if !privacy {
            return CardNaming::Clear;
        }
        let key = &self.keys[&self.newest];
        CardNaming::Pseudonym {
            key_version: self.newest,
            card: crypto::seal(key, &card_id.to_be_bytes(), &mut rand::rngs::OsRng),
        }
    }

    /// The card's name in transaction `txid`'s records: its card id, or a 64-bit MAC of
    /// card id and transaction id under the privacy key.
    ///
    /// # Errors
    /// The naming's key version is no longer held.
    pub fn name(&self, naming: &CardNaming, card_id: u64, txid: &str) -> Result<u64, String> {
        match naming {
            CardNaming::Clear => Ok(card_id),
            CardNaming::Pseudonym { key_version, .. } => {
                Ok(Self::pseudonym(self.key(*key_version)?, card_id, txid))
            }
        }
    }

    /// A MAC of the card id and transaction id under `key`, as a u64.
    fn pseudonym(key: &DesKey, card_id: u64, txid: &str) -> u64 {
        let mut msg = b"PSEUDONYM\0".to_vec();
        msg.extend_from_slice(&card_id.to_be_bytes());
        msg.extend_from_slice(txid.as_bytes());
        u64::from_be_bytes(crypto::mac3(key, &msg))
    }

    /// The key of a card in a per-card index: its card id (16 hex digits) in the clear, or
    /// `P` and a MAC of the card id alone under the privacy key of `key_version`.
    ///
    /// # Errors
    /// The key version is no longer held.
    pub fn card_tag(&self, naming: Option<u8>, card_id: u64) -> Result<String, String> {
        match naming {
            None => Ok(format!("{card_id:016X}")),
            Some(v) => {
                let mut msg = b"CARD TAG\0".to_vec();
                msg.extend_from_slice(&card_id.to_be_bytes());
                let m = crypto::mac3(self.key(v)?, &msg);
                Ok(format!("P{}", hex::encode_upper(m)))
            }
        }
    }

    /// Every tag `card_id` may be filed under: in the clear, and under each key version.
    pub fn card_tags(&self, card_id: u64) -> Vec<String> {
        std::iter::once(None)
            .chain(self.keys.keys().map(|v| Some(*v)))
            .filter_map(|v| self.card_tag(v, card_id).ok())
            .collect()
    }

    /// The tag a new private transaction's per-card index uses (the newest key's).
    pub fn current_tag(&self, privacy: bool, card_id: u64) -> String {
        self.card_tag(privacy.then_some(self.newest), card_id)
            .expect("the newest key is held")
    }

    /// The card id a [`CardNaming::Pseudonym`] sealed.
    ///
    /// # Errors
    /// The key is no longer held, or the seal does not open (the record was altered).
    pub fn card_of(&self, naming: &CardNaming) -> Result<Option<u64>, String> {
        match naming {
            CardNaming::Clear => Ok(None),
            CardNaming::Pseudonym { key_version, card } => {
                let plain = crypto::open(self.key(*key_version)?, card)
                    .map_err(|e| format!("the sealed card id does not open: {e}"))?;
                let b: [u8; 8] = plain
                    .try_into()
                    .map_err(|_| "the sealed card id is not 8 bytes".to_string())?;
                Ok(Some(u64::from_be_bytes(b)))
            }
        }
    }

    /// `value` as a record keeps it: whole, or sealed under the naming's key.
    pub fn keep<T: Serialize>(&self, naming: &CardNaming, value: T) -> AtRest<T> {
        match naming {
            CardNaming::Clear => AtRest::Clear(value),
            CardNaming::Pseudonym { key_version, .. } => AtRest::Sealed {
                key_version: *key_version,
                sealed: crypto::seal(
                    &self.keys[key_version],
                    &journal::encode(&value),
                    &mut rand::rngs::OsRng,
                ),
            },
        }
    }

    /// What [`Self::keep`] kept.
    ///
    /// # Errors
    /// The key version is no longer held, or the seal does not open (altered).
    pub fn open<T: DeserializeOwned + Clone>(&self, kept: &AtRest<T>) -> Result<T, String> {
        match kept {
            AtRest::Clear(v) => Ok(v.clone()),
            AtRest::Sealed {
                key_version,
                sealed,
            } => {
                let plain = crypto::open(self.key(*key_version)?, sealed)
                    .map_err(|e| format!("a sealed record does not open: {e}"))?;
                journal::decode(&plain)
            }
        }
    }
}

/// A record part kept whole for a retry that names the card: in the clear, or sealed under
/// the privacy key (a private transaction's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AtRest<T> {
    Clear(T),
    Sealed { key_version: u8, sealed: Vec<u8> },
}

impl<T> AtRest<T> {
    /// The value, when it is kept in the clear.
    pub fn clear(&self) -> Option<&T> {
        match self {
            AtRest::Clear(v) => Some(v),
            AtRest::Sealed { .. } => None,
        }
    }
}

/// A card message a record keeps ([`NamesCard::kept`]).
pub trait NamesCard: Clone {
    /// A copy as a record keeps it: the card named `name` (its card id, or its pseudonym)
    /// and, for a `private` transaction, the card's counter and balance left out (zero):
    /// they would chain one card's transactions (one's balance after, less the next price,
    /// is the next one's; the counter steps by one). What is left out stays covered by the
    /// card's signature, kept beside it.
    #[must_use]
    fn kept(&self, name: u64, private: bool) -> Self;
}

impl NamesCard for DebitCommand {
    fn kept(&self, name: u64, private: bool) -> Self {
        let mut v = self.clone();
        v.card_id = name;
        if private {
            v.atc = 0;
        }
        v
    }
}

impl NamesCard for DebitResponse {
    fn kept(&self, name: u64, private: bool) -> Self {
        let mut v = self.clone();
        v.card_id = name;
        if private {
            v.atc = 0;
            v.new_balance = 0;
        }
        v
    }
}

impl NamesCard for CreditResponse {
    fn kept(&self, name: u64, private: bool) -> Self {
        CreditResponse(self.0.kept(name, private))
    }
}

/// Every way a record or a file could hold `card_id`, for an audit that a private card is
/// named nowhere (the tests' search of the journal files and batches): its 8 bytes either
/// way round, postcard's varint (LEB128, how journal records hold a u64), and as text in
/// decimal and hex.
pub fn card_id_encodings(card_id: u64) -> Vec<Vec<u8>> {
    let mut varint = Vec::new();
    let mut v = card_id;
    loop {
        let b = (v & 0x7F) as u8;
        v >>= 7;
        if v == 0 {
            varint.push(b);
            break;
        }
        varint.push(b | 0x80);
    }
    vec![
        card_id.to_be_bytes().to_vec(),
        card_id.to_le_bytes().to_vec(),
        varint,
        card_id.to_string().into_bytes(),
        format!("{card_id:X}").into_bytes(),
        format!("{card_id:x}").into_bytes(),
    ]
}

/// SHA-256 of a request as received: a retry is compared with it, and the request (which
/// names the card) is not kept.
pub fn digest(raw: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(raw).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::purse::MasterKey;

    fn keys() -> PrivacyKeys {
        let m = MasterKeys::new(
            [
                MasterKey::new(1, DesKey::new([0x11; 16])),
                MasterKey::new(2, DesKey::new([0x22; 16])),
            ],
            [],
        )
        .unwrap();
        PrivacyKeys::new(&m)
    }

    #[test]
    fn a_pseudonym_is_per_card_and_transaction_and_the_card_id_comes_back_sealed() {
        let k = keys();
        let clear = k.naming(false, 0xC0FFEE);
        assert_eq!(clear, CardNaming::Clear);
        assert_eq!(k.name(&clear, 0xC0FFEE, "T1").unwrap(), 0xC0FFEE);
        let private = k.naming(true, 0xC0FFEE);
        let a = k.name(&private, 0xC0FFEE, "T1").unwrap();
        assert_ne!(a, 0xC0FFEE);
        assert_eq!(a, k.name(&private, 0xC0FFEE, "T1").unwrap(), "stable");
        assert_ne!(
            a,
            k.name(&private, 0xC0FFEE, "T2").unwrap(),
            "per transaction"
        );
        assert_ne!(a, k.name(&private, 0xC0FFEF, "T1").unwrap(), "per card");
        assert_eq!(k.card_of(&private).unwrap(), Some(0xC0FFEE));
        let CardNaming::Pseudonym { key_version, card } = &private else {
            unreachable!()
        };
        assert_eq!(*key_version, 2, "the newest key");
        assert!(
            !card
                .windows(8)
                .any(|w| w == 0xC0FFEE_u64.to_be_bytes().as_slice()),
            "sealed, not in the clear"
        );
        let mut bent = card.clone();
        bent[9] ^= 1;
        assert!(
            k.card_of(&CardNaming::Pseudonym {
                key_version: 2,
                card: bent
            })
            .is_err()
        );
        // Another key's holder names the card differently.
        let other = PrivacyKeys::new(&MasterKey::new(2, DesKey::new([0x33; 16])).into());
        assert_ne!(other.name(&private, 0xC0FFEE, "T1").unwrap(), a);
    }

    #[test]
    fn a_tag_is_stable_per_card_and_names_no_card_id() {
        let k = keys();
        assert_eq!(k.card_tag(None, 0xAB).unwrap(), "00000000000000AB");
        let t = k.current_tag(true, 0xAB);
        assert!(
            t.starts_with('P') && !t.contains("AB00") && t.len() == 17,
            "{t}"
        );
        assert_eq!(t, k.current_tag(true, 0xAB));
        assert_ne!(t, k.current_tag(true, 0xAC));
        assert_eq!(k.card_tags(0xAB).len(), 3);
        assert!(k.card_tags(0xAB).contains(&t));
        assert!(k.card_tag(Some(9), 0xAB).is_err(), "a key not held");
    }

    #[test]
    fn what_is_kept_sealed_opens_only_unaltered() {
        let k = keys();
        let private = k.naming(true, 7);
        let kept = k.keep(&private, "the routed debit command".to_string());
        assert!(kept.clear().is_none());
        assert_eq!(k.open(&kept).unwrap(), "the routed debit command");
        let AtRest::Sealed {
            key_version,
            mut sealed,
        } = kept
        else {
            unreachable!()
        };
        sealed[8] ^= 1;
        assert!(
            k.open(&AtRest::<String>::Sealed {
                key_version,
                sealed
            })
            .is_err()
        );
        let clear = k.keep(&CardNaming::Clear, 5u32);
        assert_eq!(clear.clear(), Some(&5));
    }
}
