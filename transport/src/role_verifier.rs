//! The client's check of the server: a certificate from the operator CA is not enough, it must
//! name the head-end role the client means to reach.
//!
//! Every certificate the operator CA issues chains to the same root: a box's, an internet
//! merchant's (`headend pki issue-server`) and each role's. WebPKI verification alone (chain,
//! validity, serverAuth, the DNS name) would let any server certificate of the operator CA
//! stand in for the gateway or for a back-end role, so a holder of one could be the man in the
//! middle between a box and its gateway, or feed the gateway a forged reversal feed. The
//! [`RoleServerVerifier`] runs the WebPKI verification first and then requires the URI SAN
//! `urn:purselink:role:<expected role>` (what `headend pki issue-role --role NAME` writes), and
//! no box id (a device certificate is never a server).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::QuicError;
use super::identity::{BOX_URI_PREFIX, BoxId, ROLE_URI_PREFIX};

/// Why a server certificate that chains to the operator CA is still not the expected role.
/// Its `Debug` is its message: rustls shows a verifier's own error through `Debug`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WrongRole(pub String);

impl std::fmt::Debug for WrongRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks that `leaf` names head-end role `role` (URI SAN `urn:purselink:role:<role>`) and
/// carries no box id.
///
/// # Errors
/// What the certificate names instead, or why it can't be read.
pub fn check_server_role(leaf: &CertificateDer<'_>, role: &str) -> Result<(), WrongRole> {
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| WrongRole(format!("the server's certificate can't be parsed: {e}")))?;
    let uris: Vec<&str> = cert.valid_uri_names().collect();
    if uris.iter().any(|u| u.starts_with(BOX_URI_PREFIX)) {
        return Err(WrongRole(format!(
            "the server's certificate is a box's: this server is not the {role} role"
        )));
    }
    let roles: Vec<&str> = uris
        .iter()
        .filter_map(|u| u.strip_prefix(ROLE_URI_PREFIX))
        .collect();
    if roles.contains(&role) {
        return Ok(());
    }
    let named = if roles.is_empty() {
        "no role".to_string()
    } else {
        format!("role {}", roles.join(", "))
    };
    Err(WrongRole(format!(
        "the server's certificate names {named}, not {ROLE_URI_PREFIX}{role}: this server is not \
         the {role} role (its certificate must come from `headend pki issue-role --role {role}`)"
    )))
}

/// WebPKI server verification against the operator CA, then the role check
/// ([`check_server_role`]).
#[derive(Debug)]
pub struct RoleServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    role: String,
}

impl RoleServerVerifier {
    /// A verifier for servers of role `role` chaining to `roots`.
    ///
    /// # Errors
    /// `role` is not a valid role name (a DNS label), or the roots are unusable.
    pub fn new(
        roots: Arc<RootCertStore>,
        role: &str,
        provider: Arc<CryptoProvider>,
    ) -> Result<Arc<Self>, QuicError> {
        BoxId::new(role)
            .map_err(|e| QuicError::QuicConfig(format!("expected server role: {e}")))?;
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider)
            .build()
            .map_err(|e| QuicError::QuicConfig(format!("server verifier: {e}")))?;
        Ok(Arc::new(Self {
            inner,
            role: role.to_owned(),
        }))
    }
}

impl ServerCertVerifier for RoleServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        check_server_role(end_entity, &self.role).map_err(|e| {
            rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
        })?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
