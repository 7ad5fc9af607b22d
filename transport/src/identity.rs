//! Who is on the other end of a connection: the box id (or role name) carried by the peer's
//! certificate, its serial and fingerprint, and the operator's revocation list.
//!
//! A device certificate carries the box id three times: as the subject CN, as a DNS SAN and as
//! the URI SAN `urn:purselink:box:<id>`. Only the URI SAN is trusted for identity, because it
//! can't be confused with a role certificate's DNS names. A head-end role's certificate
//! carries its role name as the URI SAN `urn:purselink:role:<name>`; roles decide who may
//! call them by that name (or by certificate fingerprint), never by DNS name.

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, RwLock};

use rustls_pki_types::CertificateDer;
use serde::Deserialize;

/// The URI SAN prefix that marks a device (set-top box) certificate.
pub const BOX_URI_PREFIX: &str = "urn:purselink:box:";
/// The URI SAN prefix that names a head-end role in its certificate.
pub const ROLE_URI_PREFIX: &str = "urn:purselink:role:";

/// A set-top box's identity, e.g. `box-000123`: a DNS label (1–63 of `a-z0-9-`, no leading or
/// trailing `-`), so it fits the certificate's DNS SAN as well as the URI SAN.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BoxId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid box id {id:?}: {why}")]
pub struct InvalidBoxId {
    pub id: String,
    pub why: &'static str,
}

impl BoxId {
    pub fn new(id: impl Into<String>) -> Result<Self, InvalidBoxId> {
        let id = id.into();
        let why = if id.is_empty() || id.len() > 63 {
            Some("must be 1 to 63 characters")
        } else if !id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            Some("only lowercase letters, digits and '-' are allowed")
        } else if id.starts_with('-') || id.ends_with('-') {
            Some("must not start or end with '-'")
        } else {
            None
        };
        match why {
            Some(why) => Err(InvalidBoxId { id, why }),
            None => Ok(Self(id)),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URI SAN a device certificate for this box carries.
    pub fn uri(&self) -> String {
        format!("{BOX_URI_PREFIX}{}", self.0)
    }
}

impl fmt::Display for BoxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for BoxId {
    type Err = InvalidBoxId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// What the peer's certificate says it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// A set-top box (device certificate).
    Box(BoxId),
    /// A head-end role, named by its certificate's `urn:purselink:role:` URI SAN.
    Role(String),
    /// A certificate from the operator CA with neither a box id nor a role name (e.g. a
    /// server certificate), known by its first DNS SAN: it may be let in only by
    /// fingerprint.
    Other(String),
}

/// The authenticated peer of a connection, handed to the [`Service`](super::Service) with every
/// request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub identity: PeerIdentity,
    /// Certificate serial number, lowercase hex.
    pub serial: String,
    /// SHA-256 of the certificate DER, lowercase hex.
    pub fingerprint: String,
    pub remote: std::net::SocketAddr,
}

impl Peer {
    /// The box id, when the peer is a set-top box.
    pub fn box_id(&self) -> Option<&BoxId> {
        match &self.identity {
            PeerIdentity::Box(id) => Some(id),
            PeerIdentity::Role(_) | PeerIdentity::Other(_) => None,
        }
    }
}

/// Why a verified certificate still gives no usable identity.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("no client certificate")]
    NoCertificate,
    #[error("peer certificate can't be parsed: {0}")]
    Unparsable(String),
    #[error("peer certificate carries an invalid box id or role name: {0}")]
    BadBoxId(#[from] InvalidBoxId),
    #[error("peer certificate carries neither a box id nor a role name")]
    NoIdentity,
}

/// Reads the identity from a peer's leaf certificate (already verified by rustls).
pub fn identity_of(
    leaf: &CertificateDer<'_>,
    remote: std::net::SocketAddr,
) -> Result<Peer, IdentityError> {
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| IdentityError::Unparsable(e.to_string()))?;
    let boxed = cert
        .valid_uri_names()
        .find_map(|uri| uri.strip_prefix(BOX_URI_PREFIX));
    let role = cert
        .valid_uri_names()
        .find_map(|uri| uri.strip_prefix(ROLE_URI_PREFIX).map(str::to_owned));
    let identity = match (boxed, role) {
        (Some(id), _) => PeerIdentity::Box(BoxId::new(id)?),
        (None, Some(role)) => PeerIdentity::Role(BoxId::new(role)?.as_str().to_owned()),
        (None, None) => match cert.valid_dns_names().next() {
            Some(name) => PeerIdentity::Other(name.to_owned()),
            None => return Err(IdentityError::NoIdentity),
        },
    };
    Ok(Peer {
        identity,
        serial: hex::encode(cert.serial()),
        fingerprint: fingerprint(leaf),
        remote,
    })
}

/// SHA-256 of a certificate's DER, lowercase hex: the form revocation lists use.
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, cert.as_ref()))
}

/// The identity of a connection's peer, from the chain rustls verified during the handshake.
pub fn peer_of(conn: &quinn::Connection) -> Result<Peer, IdentityError> {
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .ok_or(IdentityError::NoCertificate)?;
    let leaf = chain.first().ok_or(IdentityError::NoCertificate)?;
    identity_of(leaf, conn.remote_address())
}

/// The operator's revocation list as it appears in config: any match refuses the connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RevocationConfig {
    /// Box ids, e.g. `box-000123`.
    pub box_ids: Vec<String>,
    /// Certificate serials, hex (case and `:` separators ignored).
    pub serials: Vec<String>,
    /// SHA-256 certificate fingerprints, hex (case and `:` separators ignored).
    pub fingerprints: Vec<String>,
}

#[derive(Debug, Default)]
struct RevokedSets {
    box_ids: HashSet<String>,
    serials: HashSet<String>,
    fingerprints: HashSet<String>,
}

/// The live revocation list, shared by the server and whoever updates it (a config reload);
/// checked on every new connection after the handshake.
#[derive(Debug, Clone, Default)]
pub struct Revocations(Arc<RwLock<RevokedSets>>);

fn norm_hex(s: &str) -> String {
    s.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

impl Revocations {
    pub fn new(config: &RevocationConfig) -> Self {
        let r = Self::default();
        r.replace(config);
        r
    }

    /// Swaps in a new list (e.g. after the operator edited the config).
    pub fn replace(&self, config: &RevocationConfig) {
        let sets = RevokedSets {
            box_ids: config.box_ids.iter().cloned().collect(),
            serials: config.serials.iter().map(|s| norm_hex(s)).collect(),
            fingerprints: config.fingerprints.iter().map(|s| norm_hex(s)).collect(),
        };
        // A poisoned lock only means a writer panicked mid-swap of a plain value; the data is whole.
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = sets;
    }

    /// Revokes one box at run time.
    pub fn revoke_box(&self, id: &BoxId) {
        self.0
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .box_ids
            .insert(id.to_string());
    }

    /// `Some(why)` when the peer is revoked.
    pub fn check(&self, peer: &Peer) -> Option<String> {
        let sets = self.0.read().unwrap_or_else(|p| p.into_inner());
        // No let-chains: the workspace MSRV is 1.85.
        if let PeerIdentity::Box(id) = &peer.identity {
            if sets.box_ids.contains(id.as_str()) {
                return Some(format!("box revoked: {id}"));
            }
        }
        if sets.serials.contains(&peer.serial) {
            return Some(format!("box revoked: certificate serial {}", peer.serial));
        }
        if sets.fingerprints.contains(&peer.fingerprint) {
            return Some(format!(
                "box revoked: certificate fingerprint {}",
                peer.fingerprint
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn box_ids_are_dns_labels() {
        assert!(BoxId::new("box-000123").is_ok());
        assert!(BoxId::new("").is_err());
        assert!(BoxId::new("Box-1").is_err());
        assert!(BoxId::new("-box").is_err());
        assert!(BoxId::new("box/1").is_err());
        assert!(BoxId::new("a".repeat(64)).is_err());
    }
}
