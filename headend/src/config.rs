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
use serde::Deserialize;

use crate::quic::TransportSettings;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {detail}")]
    Read { path: PathBuf, detail: String },
    #[error("config {path}: {detail}")]
    Invalid { path: PathBuf, detail: String },
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PaymentSection {
    /// This payment server's name in routes.
    #[serde(default = "default_payment_name")]
    pub name: String,
    /// Issuer master keys (TOML: key_version, purchase_master, load_master in hex).
    pub issuer_keys: PathBuf,
    /// Software security cards in the pool (the terminals of 001 [0091]).
    #[serde(default = "default_security_cards")]
    pub security_cards: u32,
    /// Seconds after which an incomplete transaction is reversed in its security card.
    #[serde(default = "default_txn_timeout")]
    pub transaction_timeout_secs: u64,
    /// Where the gateway reaches this role when it runs alone.
    pub listen: Option<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantSection {
    #[serde(default = "default_merchant_name")]
    pub name: String,
    pub listen: Option<SocketAddr>,
}

/// A remote role.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The name its certificate carries.
    pub server_name: String,
}

/// What kind of merchant: the cable operator's own catalog, or an internet merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MerchantKind {
    Cable,
    Internet,
}

/// A merchant, as every role sees it (routing, keys, comparison embodiment, catalog).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MerchantDef {
    pub id: String,
    pub name: String,
    pub kind: MerchantKind,
    /// The key this merchant shares with its payment server (001 [0107]), hex, 16 bytes.
    pub shared_key: String,
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
    pub fn key(&self) -> Result<DesKey, String> {
        let raw = hex::decode(self.shared_key.trim())
            .map_err(|e| format!("merchant {}: shared_key is not hex ({e})", self.id))?;
        DesKey::from_slice(&raw).map_err(|e| format!("merchant {}: shared_key: {e}", self.id))
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

pub fn parse_embodiment(s: &str) -> Result<Embodiment, String> {
    Ok(match s {
        "security-card" | "fig4" => Embodiment::SecurityCard,
        "payment-server" | "fig5" => Embodiment::PaymentServer,
        "gateway" | "fig6" => Embodiment::Gateway,
        "merchant" | "fig7" => Embodiment::Merchant,
        other => {
            return Err(format!(
                "unknown embodiment {other:?}: use security-card, payment-server, gateway or merchant"
            ));
        }
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
fn default_security_cards() -> u32 {
    4
}
fn default_txn_timeout() -> u64 {
    30
}

impl HeadendConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.into(),
            detail: e.to_string(),
        })?;
        let cfg: Self = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.into(),
            detail: e.to_string(),
        })?;
        cfg.validate().map_err(|detail| ConfigError::Invalid {
            path: path.into(),
            detail,
        })?;
        Ok(cfg.resolve_relative(path.parent().unwrap_or(Path::new("."))))
    }

    /// Relative paths in the file are relative to the file's directory.
    fn resolve_relative(mut self, base: &Path) -> Self {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        fix(&mut self.state_dir);
        fix(&mut self.tls.operator_ca);
        fix(&mut self.tls.cert);
        fix(&mut self.tls.key);
        if let Some(p) = &mut self.payment {
            fix(&mut p.issuer_keys);
        }
        self
    }

    pub fn validate(&self) -> Result<(), String> {
        let mut seen = std::collections::BTreeSet::new();
        for m in &self.merchants {
            if !seen.insert(&m.id) {
                return Err(format!("merchant id {} appears twice", m.id));
            }
            m.key()?;
            let mut items = std::collections::BTreeSet::new();
            for i in &m.items {
                if !items.insert(&i.id) {
                    return Err(format!("merchant {}: item {} appears twice", m.id, i.id));
                }
                if i.amount == 0 {
                    return Err(format!("merchant {}: item {} has a zero price", m.id, i.id));
                }
            }
        }
        Ok(())
    }

    pub fn merchant(&self, id: &str) -> Option<&MerchantDef> {
        self.merchants.iter().find(|m| m.id == id)
    }

    pub fn issuer_keys(&self) -> Result<IssuerKeys, String> {
        let p = self
            .payment
            .as_ref()
            .ok_or("no [payment] section")?
            .issuer_keys
            .clone();
        load_issuer_keys(&p)
    }
}

pub fn load_issuer_keys(path: &Path) -> Result<IssuerKeys, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("issuer keys {}: {e}", path.display()))?;
    let file: IssuerKeyFile =
        toml::from_str(&text).map_err(|e| format!("issuer keys {}: {e}", path.display()))?;
    file.to_keys()
        .map_err(|e| format!("issuer keys {}: {e}", path.display()))
}
