//! The box's load settings (`[load]`): which sources this box may load from, and its PIN
//! key. The load flow itself runs in the runner's load slot ([`super::exec::Slot`]); in-doubt
//! loads are recovered with the purchases by [`super::recover`] (at start, on reconnect, on
//! every card insertion, on the recovery timer, and before a new load or purchase on the same
//! card: 001's negative-result procedure needs an in-doubt load resolved before the card
//! loads again).

use proto::crypto::DesKey;
use proto::messages::LoadSource;

use crate::config::LoadConfig;

/// What the config says about loads, with the PIN key read.
#[derive(Clone, Default)]
pub struct LoadSettings {
    pub bank_account: Option<String>,
    pub voucher: Option<String>,
    pub pin_key: Option<DesKey>,
}

impl std::fmt::Debug for LoadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSettings")
            .field("bank_account", &self.bank_account)
            .field("voucher", &self.voucher)
            .field("pin_key", &self.pin_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl LoadSettings {
    /// The configured source the viewer chose, if this box has one.
    pub fn source(&self, choice: ui::model::LoadSource) -> Option<LoadSource> {
        match choice {
            ui::model::LoadSource::Bank => self
                .bank_account
                .clone()
                .map(|account| LoadSource::Bank { account }),
            ui::model::LoadSource::Voucher => self.voucher.clone().map(LoadSource::voucher),
            // Unloads go back to the box's bank account (issue 17).
            ui::model::LoadSource::Unload => self
                .bank_account
                .clone()
                .map(|account| LoadSource::Unload { account }),
        }
    }

    /// Reads the PIN key file (hex, as provisioning writes it).
    pub fn from_config(c: &LoadConfig) -> Result<Self, String> {
        let pin_key = match &c.pin_key {
            None => None,
            Some(p) => {
                proto::secret::check_private(p).map_err(|e| format!("load.pin_key: {e}"))?;
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("load.pin_key {}: {e}", p.display()))?;
                let raw = hex::decode(text.trim())
                    .map_err(|e| format!("load.pin_key {}: not a hex key ({e})", p.display()))?;
                Some(
                    DesKey::from_slice(&raw)
                        .map_err(|e| format!("load.pin_key {}: {e}", p.display()))?,
                )
            }
        };
        Ok(Self {
            bank_account: c.bank_account.clone(),
            voucher: c.voucher.clone(),
            pin_key,
        })
    }
}
