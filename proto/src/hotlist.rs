//! The card hotlist (seed 002: the security card's blocked-card list): the ids of cards the
//! issuer has blocked (reported lost, stolen or misused), with a version that only grows.
//! Security cards refuse a draw from a listed card ([`crate::security_card`]) and the HSM a
//! load to one ([`crate::hsm`]), each with its own error, after the card's own MAC has
//! shown the id is genuine. How a hotlist travels signed between the issuer and the
//! terminals is the head end's business (`headend::hotlist`).

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// A version of the issuer's hotlist.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hotlist {
    /// Grows with every list the issuer signs; a terminal never takes an older one.
    pub version: u64,
    /// The blocked card ids.
    pub card_ids: BTreeSet<u64>,
}

impl Hotlist {
    /// Whether `card_id` is blocked.
    #[must_use]
    pub fn blocks(&self, card_id: u64) -> bool {
        self.card_ids.contains(&card_id)
    }

    /// Takes `newer` in place of this list unless it is older (what a security card or an
    /// HSM does when it is given a list).
    pub fn update(&mut self, newer: &Hotlist) {
        if newer.version >= self.version {
            *self = newer.clone();
        }
    }
}

/// A hotlist as the issuer signed it (Ed25519 over [`SignedHotlist::signed_bytes`]): what
/// travels from the issuer to clearing and on to the payment and load servers, and what a
/// signed file holds. Checking the signature is the head end's (`headend::hotlist`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedHotlist {
    pub version: u64,
    /// The blocked card ids, ascending.
    pub card_ids: Vec<u64>,
    /// Ed25519, 64 bytes.
    pub signature: Vec<u8>,
}

impl SignedHotlist {
    /// What the issuer signs: a label that no other signed thing starts with, the version,
    /// the number of ids and the ids ascending, all big-endian.
    #[must_use]
    pub fn signed_bytes(list: &Hotlist) -> Vec<u8> {
        let mut out = b"purselink hotlist v1\0".to_vec();
        out.extend_from_slice(&list.version.to_be_bytes());
        out.extend_from_slice(&(list.card_ids.len() as u64).to_be_bytes());
        for id in &list.card_ids {
            out.extend_from_slice(&id.to_be_bytes());
        }
        out
    }

    /// The list it carries (not yet checked).
    #[must_use]
    pub fn list(&self) -> Hotlist {
        Hotlist {
            version: self.version,
            card_ids: self.card_ids.iter().copied().collect(),
        }
    }
}
