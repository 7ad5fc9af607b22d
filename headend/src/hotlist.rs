//! The issuer's hotlist on its way to the terminals (seed 002: the security card's
//! blocked-card list; issue 16). The issuer signs each version with an Ed25519 key only it
//! holds (`headend hotlist keygen`, `headend hotlist sign`); every role that keeps a hotlist
//! (payment servers, the load server, clearing) checks the signature with the verification
//! key its config names (`[hotlist] verify_key_file`) before it journals a list (journal kind
//! `hotlist`, [`Kind::Hotlist`]), and never takes a version older than the one it holds.
//!
//! How a list travels:
//! - **through clearing** when there is one: the issuer installs it there (`headend hotlist
//!   install --config clearing.toml --file F`), and each payment server and load server asks
//!   clearing for anything newer (`HotlistRequest` → `HotlistUpdate`) every
//!   `[hotlist] refresh_secs` ([`run_refresh`]) — the "system updates" that come back from
//!   clearing in seed 001 FIG. 1;
//! - **as a signed file** until then: `headend hotlist install --config payment.toml --file F`
//!   on each server (its running process takes it from its journal at its next refresh).
//!
//! The security cards and the HSM refuse a listed card with their own error
//! (`CardHotlisted`), after the card's own MAC has shown the id is genuine.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use proto::hotlist::{Hotlist, SignedHotlist};
use proto::messages::Message;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};

use crate::journal::{self, Journal, JournalError, Kind};
use crate::role::{Caller, Role};

/// The journal key of the hotlist a role holds.
const KEY: &str = "current";

/// What went wrong with a hotlist or its keys.
#[derive(Debug, thiserror::Error)]
pub enum HotlistError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("the hotlist signature does not verify: not signed by the issuer's key, or altered")]
    BadSignature,
    #[error("hotlist version {offered} is not newer than the one held ({held})")]
    NotNewer { offered: u64, held: u64 },
    #[error("the hotlist's card ids are not strictly ascending")]
    Unsorted,
    #[error("the hotlist signing key: {0}")]
    Key(String),
    #[error(transparent)]
    Journal(#[from] JournalError),
    #[error("a stored hotlist does not decode: {0}")]
    Corrupt(String),
}

fn file_err(path: &Path, detail: impl std::fmt::Display) -> HotlistError {
    HotlistError::File {
        path: path.display().to_string(),
        detail: detail.to_string(),
    }
}

/// Makes the issuer's hotlist keys in `dir`: `hotlist-signing.pk8` (PKCS#8, owner-only; it
/// stays with the issuer) and `hotlist-verify.pub` (the public key in hex, for every role's
/// `[hotlist] verify_key_file`). Refuses to replace a signing key.
///
/// # Errors
/// The files cannot be written, or a signing key is already there.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf), HotlistError> {
    let signing = dir.join("hotlist-signing.pk8");
    let verify = dir.join("hotlist-verify.pub");
    if signing.exists() {
        return Err(file_err(
            &signing,
            "exists; refusing to replace a signing key",
        ));
    }
    proto::secret::private_dir(dir).map_err(|e| file_err(dir, e))?;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 =
        Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| HotlistError::Key(e.to_string()))?;
    let pair =
        Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|e| HotlistError::Key(e.to_string()))?;
    proto::secret::write_private(&signing, pkcs8.as_ref()).map_err(|e| file_err(&signing, e))?;
    std::fs::write(
        &verify,
        format!("{}\n", hex::encode(pair.public_key().as_ref())),
    )
    .map_err(|e| file_err(&verify, e))?;
    Ok((signing, verify))
}

/// Signs `list` with the issuer's key file (`keygen`'s `hotlist-signing.pk8`, owner-only).
///
/// # Errors
/// The key file is unreadable, not owner-only, or not an Ed25519 PKCS#8 key.
pub fn sign(key_file: &Path, list: &Hotlist) -> Result<SignedHotlist, HotlistError> {
    proto::secret::check_private(key_file).map_err(|d| file_err(key_file, d))?;
    let pkcs8 = std::fs::read(key_file).map_err(|e| file_err(key_file, e))?;
    let pair = Ed25519KeyPair::from_pkcs8(&pkcs8).map_err(|e| HotlistError::Key(e.to_string()))?;
    let signature = pair.sign(&SignedHotlist::signed_bytes(list));
    Ok(SignedHotlist {
        version: list.version,
        card_ids: list.card_ids.iter().copied().collect(),
        signature: signature.as_ref().to_vec(),
    })
}

/// Checks the issuer's signature on hotlists ([`Verifier::check`]).
#[derive(Debug, Clone)]
pub struct Verifier {
    public: Vec<u8>,
}

impl Verifier {
    /// The verification key from its file (hex, as `keygen` writes it).
    ///
    /// # Errors
    /// The file is unreadable or not a 32-byte key in hex.
    pub fn load(path: &Path) -> Result<Self, HotlistError> {
        let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
        let public = hex::decode(text.trim()).map_err(|e| file_err(path, e))?;
        if public.len() != 32 {
            return Err(file_err(path, "not a 32-byte Ed25519 public key"));
        }
        Ok(Self { public })
    }

    /// The list `s` carries, once its signature is the issuer's.
    ///
    /// # Errors
    /// [`HotlistError::Unsorted`] (ids not strictly ascending: not what `sign` makes),
    /// [`HotlistError::BadSignature`].
    pub fn check(&self, s: &SignedHotlist) -> Result<Hotlist, HotlistError> {
        if s.card_ids.windows(2).any(|w| w[0] >= w[1]) {
            return Err(HotlistError::Unsorted);
        }
        let list = s.list();
        UnparsedPublicKey::new(&ED25519, &self.public)
            .verify(&SignedHotlist::signed_bytes(&list), &s.signature)
            .map_err(|_| HotlistError::BadSignature)?;
        Ok(list)
    }
}

/// The signed hotlist `journal` holds, as stored (clearing hands it on as it is).
///
/// # Errors
/// The journal cannot be read or the record does not decode.
pub fn held_signed(journal: &Journal) -> Result<Option<SignedHotlist>, HotlistError> {
    journal
        .get(Kind::Hotlist, KEY)?
        .map(|b| journal::decode(&b).map_err(HotlistError::Corrupt))
        .transpose()
}

/// The hotlist `journal` holds, checked again (a record altered on disk is refused).
///
/// # Errors
/// As [`held_signed`], and the signature.
pub fn held(journal: &Journal, verifier: &Verifier) -> Result<Option<Hotlist>, HotlistError> {
    held_signed(journal)?
        .map(|s| verifier.check(&s))
        .transpose()
}

/// Journals `s` if its signature is the issuer's and it is newer than the one held (one
/// transaction, the held one read under a row lock: two takers never go backwards).
///
/// # Errors
/// The signature, [`HotlistError::NotNewer`], or the journal.
pub fn take(
    journal: &Journal,
    verifier: &Verifier,
    s: &SignedHotlist,
) -> Result<Hotlist, HotlistError> {
    let list = verifier.check(s)?;
    let encoded = journal::encode(s);
    let held = journal.atomically(|b| {
        let held = b
            .get_for_update(Kind::Hotlist, KEY)?
            .and_then(|v| journal::decode::<SignedHotlist>(&v).ok())
            .map_or(0, |h| h.version);
        if s.version > held {
            b.put(Kind::Hotlist, KEY, &encoded)?;
        }
        Ok(held)
    })?;
    if s.version <= held {
        return Err(HotlistError::NotNewer {
            offered: s.version,
            held,
        });
    }
    Ok(list)
}

/// The hotlist a role holds when it starts, checked with its config's verification key
/// (`None` without `[hotlist]` or without a list yet).
///
/// # Errors
/// The verification key or the journal's list is unusable: the role does not start with a
/// hotlist it cannot trust.
pub fn held_at_start(
    cfg: &crate::config::HeadendConfig,
    journal: &Journal,
) -> Result<Option<Hotlist>, String> {
    let Some(h) = &cfg.hotlist else {
        return Ok(None);
    };
    let v = Verifier::load(&h.verify_key_file).map_err(|e| format!("[hotlist] {e}"))?;
    held(journal, &v).map_err(|e| format!("hotlist: {e}"))
}

/// Clearing's answer to a hotlist request: the held list when it is newer than `have`.
///
/// # Errors
/// The journal cannot be read.
pub fn update_for(journal: &Journal, have: u64) -> Result<Message, HotlistError> {
    Ok(Message::HotlistUpdate(
        held_signed(journal)?.filter(|s| s.version > have),
    ))
}

/// Keeps a role's security cards or HSM on the newest hotlist until `shutdown`: every
/// `every`, asks `clearing` (as `me`) for a newer list and journals it, then hands the
/// journal's list to `apply` whenever its version moved (a list installed from a file by
/// `headend hotlist install` is picked up the same way).
pub async fn run_refresh<F, Fut>(
    journal: Arc<Journal>,
    verifier: Verifier,
    clearing: Option<(Arc<dyn Role>, Caller)>,
    every: Duration,
    mut apply: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    F: FnMut(Hotlist) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut applied = held(&journal, &verifier)
        .ok()
        .flatten()
        .map_or(0, |h| h.version);
    loop {
        if let Some((c, me)) = &clearing {
            let have = held_signed(&journal)
                .ok()
                .flatten()
                .map_or(0, |s| s.version);
            match c.handle(me.clone(), Message::HotlistRequest { have }).await {
                Message::HotlistUpdate(Some(s)) => match take(&journal, &verifier, &s) {
                    Ok(l) => {
                        tracing::info!(
                            version = l.version,
                            cards = l.card_ids.len(),
                            "hotlist received from clearing"
                        );
                    }
                    Err(e) => tracing::warn!(error = %e, "hotlist from clearing refused"),
                },
                Message::HotlistUpdate(None) => {}
                other => {
                    tracing::debug!(answer = other.kind(), "hotlist request: no update");
                }
            }
        }
        match held(&journal, &verifier) {
            Ok(Some(list)) if list.version > applied => {
                applied = list.version;
                let cards = list.card_ids.len();
                apply(list).await;
                tracing::info!(version = applied, cards, "hotlist applied");
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "the journal's hotlist is unusable"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(version: u64, ids: &[u64]) -> Hotlist {
        Hotlist {
            version,
            card_ids: ids.iter().copied().collect(),
        }
    }

    #[test]
    fn only_the_issuers_untouched_newer_list_is_taken() {
        let d = tempfile::tempdir().unwrap();
        let (signing, verify) = keygen(&d.path().join("issuer")).unwrap();
        assert!(keygen(&d.path().join("issuer")).is_err(), "never replaced");
        let v = Verifier::load(&verify).unwrap();
        let j = Journal::open(&d.path().join("j.sqlite")).unwrap();
        assert!(held(&j, &v).unwrap().is_none());

        let s2 = sign(&signing, &list(2, &[7, 9])).unwrap();
        assert_eq!(take(&j, &v, &s2).unwrap(), list(2, &[7, 9]));
        assert_eq!(held(&j, &v).unwrap(), Some(list(2, &[7, 9])));

        // Tampered: an id dropped, the version raised, the signature flipped.
        let mut dropped = sign(&signing, &list(3, &[7, 9])).unwrap();
        dropped.card_ids.pop();
        assert!(matches!(
            take(&j, &v, &dropped),
            Err(HotlistError::BadSignature)
        ));
        let mut raised = s2.clone();
        raised.version = 5;
        assert!(matches!(
            take(&j, &v, &raised),
            Err(HotlistError::BadSignature)
        ));
        let mut flipped = sign(&signing, &list(3, &[7])).unwrap();
        flipped.signature[0] ^= 1;
        assert!(matches!(
            take(&j, &v, &flipped),
            Err(HotlistError::BadSignature)
        ));
        let mut unsorted = s2.clone();
        unsorted.card_ids = vec![9, 7];
        assert!(matches!(
            take(&j, &v, &unsorted),
            Err(HotlistError::Unsorted)
        ));
        // Another issuer's key.
        let (other, _) = keygen(&d.path().join("other")).unwrap();
        let forged = sign(&other, &list(4, &[])).unwrap();
        assert!(matches!(
            take(&j, &v, &forged),
            Err(HotlistError::BadSignature)
        ));
        // Older or the same: refused, the held one stays.
        let old = sign(&signing, &list(1, &[])).unwrap();
        assert!(matches!(
            take(&j, &v, &old),
            Err(HotlistError::NotNewer {
                offered: 1,
                held: 2
            })
        ));
        assert!(matches!(
            take(&j, &v, &s2),
            Err(HotlistError::NotNewer { .. })
        ));
        assert_eq!(held(&j, &v).unwrap(), Some(list(2, &[7, 9])));
        // Clearing hands on only what is newer than the asker's.
        assert_eq!(update_for(&j, 1).unwrap(), Message::HotlistUpdate(Some(s2)));
        assert_eq!(update_for(&j, 2).unwrap(), Message::HotlistUpdate(None));
    }

    #[test]
    fn a_signing_key_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (signing, _) = keygen(d.path()).unwrap();
        std::fs::set_permissions(&signing, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = sign(&signing, &list(1, &[])).unwrap_err().to_string();
        assert!(e.contains("hotlist-signing.pk8"), "{e}");
    }
}
