//! The load masters in a PKCS#11 token: the load server's host security module as real
//! hardware (001 [0137]); SoftHSM2 from Debian in the tests. Driven through `cryptoki`.
//!
//! - **The masters stay in the token.** Each key version is a two-key triple-DES secret key
//!   labelled `KEY_LABEL-vN` (`[load] token.key_label`), imported once by `headend hsm
//!   import` as sensitive and not extractable: no call can read it back.
//! - **Card keys are derived in the token**: a card's load key is the master encrypting
//!   `d ‖ ¬d` with `CKM_DES3_ECB` (the same diversification as [`proto::crypto::DesKey::
//!   diversify`], so cards personalised by the issuer work with either module). The derived
//!   card key comes back to the load server, which runs the purse's MACs (S1, S2, S3) with
//!   it. Deriving inside the token and keeping the card key there too needs
//!   `CKM_DES3_ECB_ENCRYPT_DATA` with `C_DeriveKey`, which `cryptoki` does not offer
//!   (0.10–0.12: vendor-defined mechanisms only above `CKM_VENDOR_DEFINED`); until it does,
//!   the per-card keys pass through the load server's memory, never a journal or a log.
//! - **Start-up errors are specific**: the module cannot be loaded, no token with the label,
//!   the PIN is wrong or locked, a key version is missing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
use cryptoki::error::{Error as P11Error, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, AttributeType, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use cryptoki::types::AuthPin;
use proto::crypto::DesKey;
use proto::hsm::{HsmError, LoadKeyStore};
use proto::purse::MasterKeysFile;
use serde::Deserialize;

/// `[load] token`: where the load masters are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenDef {
    /// The PKCS#11 module (SoftHSM2: `/usr/lib/softhsm/libsofthsm2.so`).
    pub module: PathBuf,
    /// The token's label.
    pub token_label: String,
    /// A file holding the user PIN (0600).
    pub pin_file: PathBuf,
    /// The keys' label stem: version N is `KEY_LABEL-vN`.
    #[serde(default = "default_key_label")]
    pub key_label: String,
    /// The token's slot id, instead of finding it by `token_label` (for a token whose
    /// information cannot be read, e.g. openCryptoki's software token).
    #[serde(default)]
    pub slot: Option<u64>,
}

fn default_key_label() -> String {
    "purselink-load".into()
}

/// The most key versions looked for in the token.
const MAX_VERSION: u8 = 32;

/// The load masters in a token (see the module docs).
pub struct TokenLoadKeys {
    session: Mutex<Session>,
    keys: BTreeMap<u8, ObjectHandle>,
    label: String,
    /// Kept for the session's lifetime (the library is finalized when it drops).
    _ctx: Pkcs11,
}

impl std::fmt::Debug for TokenLoadKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenLoadKeys")
            .field("token", &self.label)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The process's context for `module`: a PKCS#11 library is initialised once per process
/// and finalised when its last context drops, so every user in the process shares one.
fn context(module: &Path) -> Result<Pkcs11, String> {
    static CONTEXTS: Mutex<BTreeMap<PathBuf, Pkcs11>> = Mutex::new(BTreeMap::new());
    let mut all = CONTEXTS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(c) = all.get(module) {
        return Ok(c.clone());
    }
    let ctx = Pkcs11::new(module).map_err(|e| {
        format!(
            "[load] token: the PKCS#11 module {} cannot be loaded ({e}) — install it (SoftHSM2: apt-get install softhsm2) or fix `module`",
            module.display()
        )
    })?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))
        .map_err(|e| {
            format!(
                "[load] token: {} does not initialise: {e}",
                module.display()
            )
        })?;
    all.insert(module.to_path_buf(), ctx.clone());
    Ok(ctx)
}

/// Opens the token, logs in, and returns the session (read-write: `headend hsm import`).
fn login(def: &TokenDef) -> Result<(Pkcs11, Session), String> {
    let ctx = context(&def.module)?;
    let mut labels = Vec::new();
    let mut slot = None;
    for s in ctx.get_slots_with_token().map_err(|e| e.to_string())? {
        if def.slot == Some(s.id()) {
            slot = Some(s);
        }
        match ctx.get_token_info(s) {
            Ok(info) => {
                let label = info.label().trim().to_string();
                if label == def.token_label && def.slot.is_none() {
                    slot = Some(s);
                }
                labels.push(label);
            }
            // cryptoki refuses the token information of some tokens (openCryptoki's clock
            // field is not the standard's): said, and `slot` names such a token.
            Err(e) => labels.push(format!(
                "slot {}: its token information is unreadable ({e}); name it by `slot`",
                s.id()
            )),
        }
    }
    let slot = slot.ok_or_else(|| {
        format!(
            "[load] token: no token labelled {:?} in {} (tokens: {labels:?}) — create it (softhsm2-util --init-token) or fix `token_label`",
            def.token_label,
            def.module.display()
        )
    })?;
    let pin = read_pin(&def.pin_file)?;
    let session = ctx.open_rw_session(slot).map_err(|e| {
        format!(
            "[load] token {:?}: cannot open a session: {e}",
            def.token_label
        )
    })?;
    let logged_in = match session.login(UserType::User, Some(&AuthPin::new(pin.into()))) {
        // Another session of this process logged in to the token already.
        Err(P11Error::Pkcs11(RvError::UserAlreadyLoggedIn, _)) => Ok(()),
        other => other,
    };
    logged_in.map_err(|e| login_error(def, e))?;
    Ok((ctx, session))
}

/// What a failed login tells the operator: a wrong PIN, a locked one, or the token's own
/// error.
fn login_error(def: &TokenDef, e: P11Error) -> String {
    match e {
        P11Error::Pkcs11(RvError::PinIncorrect, _) => format!(
            "[load] token {:?}: the PIN in {} is wrong (the token counts the failure)",
            def.token_label,
            def.pin_file.display()
        ),
        P11Error::Pkcs11(RvError::PinLocked, _) => format!(
            "[load] token {:?}: the user PIN is locked — the token's security officer must unlock it",
            def.token_label
        ),
        other => format!("[load] token {:?}: login failed: {other}", def.token_label),
    }
}

fn read_pin(path: &Path) -> Result<String, String> {
    proto::secret::check_private(path).map_err(|e| format!("[load] token pin_file: {e}"))?;
    let pin = std::fs::read_to_string(path)
        .map_err(|e| format!("[load] token pin_file {}: {e}", path.display()))?;
    Ok(pin.trim().to_string())
}

fn key_label(def: &TokenDef, version: u8) -> String {
    format!("{}-v{version}", def.key_label)
}

impl TokenLoadKeys {
    /// Opens the token and finds every load master version in it.
    ///
    /// # Errors
    /// The module, token, PIN or keys (see the module docs), each said specifically.
    pub fn open(def: &TokenDef) -> Result<Self, String> {
        let (ctx, session) = login(def)?;
        let mut keys = BTreeMap::new();
        for v in 1..=MAX_VERSION {
            let found = session
                .find_objects(&[
                    Attribute::Class(ObjectClass::SECRET_KEY),
                    Attribute::Label(key_label(def, v).into_bytes()),
                ])
                .map_err(|e| format!("[load] token: cannot search for keys: {e}"))?;
            if let Some(h) = found.first() {
                keys.insert(v, *h);
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "[load] token {:?} holds no load master ({}-v1, -v2, …) — import them with `headend hsm import`",
                def.token_label, def.key_label
            ));
        }
        Ok(Self {
            session: Mutex::new(session),
            keys,
            label: def.token_label.clone(),
            _ctx: ctx,
        })
    }
}

impl LoadKeyStore for TokenLoadKeys {
    fn card_key(&self, version: u8, card_id: u64) -> Result<DesKey, HsmError> {
        let handle = self.keys.get(&version).ok_or(HsmError::UnknownKeyVersion {
            card: version,
            ours: self.newest_version(),
        })?;
        let d = card_id.to_be_bytes();
        let mut data = d.to_vec();
        data.extend(d.map(|b| !b));
        let session = self.session.lock().unwrap_or_else(|p| p.into_inner());
        let out = session
            .encrypt(&Mechanism::Des3Ecb, *handle, &data)
            .map_err(|e| HsmError::KeyStore(format!("token {:?}: {e}", self.label)))?;
        DesKey::from_slice(&out).map_err(|e| HsmError::KeyStore(e.to_string()))
    }

    fn newest_version(&self) -> u8 {
        self.keys.keys().next_back().copied().unwrap_or(0)
    }
}

/// `headend hsm import`: puts the load masters of `keys` into the token, each sensitive and
/// not extractable, labelled by version; a version already there is left as it is. Returns
/// the versions imported.
///
/// # Errors
/// The token (as [`TokenLoadKeys::open`]), or a key the token refuses.
pub fn import(def: &TokenDef, keys: &MasterKeysFile) -> Result<Vec<u8>, String> {
    let (_ctx, session) = login(def)?;
    let mut done = Vec::new();
    for k in &keys.keys {
        let label = key_label(def, k.key_version);
        let exists = !session
            .find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::Label(label.clone().into_bytes()),
            ])
            .map_err(|e| e.to_string())?
            .is_empty();
        if exists {
            continue;
        }
        let raw = hex::decode(k.master.trim())
            .map_err(|e| format!("version {}: not hex ({e})", k.key_version))?;
        let key =
            DesKey::from_slice(&raw).map_err(|e| format!("version {}: {e}", k.key_version))?;
        session
            .create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::DES2),
                Attribute::Token(true),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Encrypt(true),
                Attribute::Decrypt(false),
                Attribute::Label(label.into_bytes()),
                Attribute::Value(key.bytes().to_vec()),
            ])
            .map_err(|e| format!("version {}: the token refused the key: {e}", k.key_version))?;
        done.push(k.key_version);
    }
    Ok(done)
}

/// Whether the key of `version` can be read out of the token (it must not).
///
/// # Errors
/// The token cannot be opened.
pub fn key_value_readable(def: &TokenDef, version: u8) -> Result<bool, String> {
    let (_ctx, session) = login(def)?;
    let found = session
        .find_objects(&[Attribute::Label(key_label(def, version).into_bytes())])
        .map_err(|e| e.to_string())?;
    let Some(h) = found.first() else {
        return Err(format!("no key version {version}"));
    };
    Ok(session
        .get_attributes(*h, &[AttributeType::Value])
        .map(|a| !a.is_empty())
        .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cryptoki::context::Function;

    /// SoftHSM2 never locks a PIN, so the locked token is shown by its error alone: the
    /// operator is told who can unlock it, not "login failed".
    #[test]
    fn a_locked_pin_is_said_so() {
        let def = TokenDef {
            module: "/usr/lib/softhsm/libsofthsm2.so".into(),
            token_label: "hsm-1".into(),
            pin_file: "/etc/purselink/token.pin".into(),
            key_label: default_key_label(),
            slot: None,
        };
        let e = login_error(&def, P11Error::Pkcs11(RvError::PinLocked, Function::Login));
        assert!(
            e.contains("\"hsm-1\"")
                && e.contains("PIN is locked")
                && e.contains("security officer"),
            "{e}"
        );
        let e = login_error(
            &def,
            P11Error::Pkcs11(RvError::PinIncorrect, Function::Login),
        );
        assert!(e.contains("is wrong") && e.contains("token.pin"), "{e}");
    }
}
