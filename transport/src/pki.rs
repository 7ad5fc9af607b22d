//! The development PKI: an operator CA, device certificates for set-top boxes and server/role
//! certificates, all issued with rcgen so a demo needs no manual PKI. Usable from tests (in
//! memory) and from the `headend pki ...` subcommands (PEM files on disk).
//!
//! Files: a CA directory holds `ca.crt.pem` and `ca.key.pem`; an issued certificate is written
//! as `<name>.crt.pem` + `<name>.key.pem` (key files mode 0600), where `<name>` is the box id
//! or the first DNS name.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::BoxId;

/// The CA's subject common name, followed by a short hash of the CA's public key so two dev CAs
/// never share a name (a verifier would otherwise take one for the other's issuer). Issuing
/// re-creates the name from the key; [`OperatorCa::load`] checks the file on disk matches.
pub const CA_COMMON_NAME: &str = "Purselink dev operator CA";
const ORGANIZATION: &str = "Purselink";
const CA_CERT_FILE: &str = "ca.crt.pem";
const CA_KEY_FILE: &str = "ca.key.pem";
const CA_VALIDITY_DAYS: i64 = 3650;
const LEAF_VALIDITY_DAYS: i64 = 825;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM {what} found")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("{path}: the CA certificate does not match its key or was not made by `pki init-ca`")]
    CaMismatch { path: PathBuf },
    #[error("invalid server name {0:?}: not a DNS name or IP address")]
    BadName(String),
    #[error("a server certificate needs at least one name")]
    NoNames,
    #[error("no randomness for the serial number")]
    Rng,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
    move |source| PkiError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    cert_der: CertificateDer<'static>,
    key_der: Vec<u8>,
}

/// Paths written by [`IssuedCert::save`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl IssuedCert {
    pub fn cert_der(&self) -> CertificateDer<'static> {
        self.cert_der.clone()
    }

    pub fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// Writes `<stem>.crt.pem` and `<stem>.key.pem` into `dir` (created if missing).
    /// This certificate and key as a TLS identity for the QUIC transport.
    pub fn tls_identity(&self) -> crate::TlsIdentity {
        crate::TlsIdentity::from_der(vec![self.cert_der()], self.key_der())
    }

    /// The key is written 0600 (replacing any existing file, whatever its mode); the
    /// directory is created 0700 when missing.
    pub fn save(&self, dir: &Path, stem: &str) -> Result<CertFiles, PkiError> {
        if !dir.exists() {
            proto::secret::private_dir(dir).map_err(io_err(dir))?;
        }
        let cert = dir.join(format!("{stem}.crt.pem"));
        let key = dir.join(format!("{stem}.key.pem"));
        std::fs::write(&cert, &self.cert_pem).map_err(io_err(&cert))?;
        write_private(&key, &self.key_pem)?;
        Ok(CertFiles { cert, key })
    }
}

/// Writes a key file readable by its owner only (see [`proto::secret::write_private`]).
fn write_private(path: &Path, contents: &str) -> Result<(), PkiError> {
    proto::secret::write_private(path, contents.as_bytes()).map_err(io_err(path))
}

/// The operator CA: signs device and server certificates.
pub struct OperatorCa {
    // rcgen 0.13 signs with an issuer `Certificate`; only its distinguished name, key usages and
    // key-identifier method are used, so a re-created one signs exactly as the original.
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for OperatorCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OperatorCa").finish_non_exhaustive()
    }
}

fn ca_params(key: &KeyPair) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let key_hash = ring::digest::digest(&ring::digest::SHA256, key.public_key_der().as_slice());
    let tag = hex::encode(&key_hash.as_ref()[..8]);
    dn.push(DnType::CommonName, format!("{CA_COMMON_NAME} {tag}"));
    dn.push(DnType::OrganizationName, ORGANIZATION);
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Rng)?;
    b[0] &= 0x7f; // a positive INTEGER
    b[0] |= 0x01; // and never a shorter encoding
    Ok(SerialNumber::from_slice(&b))
}

fn set_validity(p: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    // An hour of slack for boxes whose clocks run a little behind.
    p.not_before = now - Duration::hours(1);
    p.not_after = now + Duration::days(days);
}

fn pem_cert(pem_text: &str, path: &Path) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem_text.as_bytes())
        .map(|c| c.into_owned())
        .map_err(|_| PkiError::NoPem {
            path: path.to_owned(),
            what: "certificate",
        })
}

impl OperatorCa {
    /// A fresh self-signed CA (ECDSA P-256), valid ten years.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(&key);
        params.serial_number = Some(random_serial()?);
        set_validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// Loads a CA written by [`Self::save`] (`pki init-ca`).
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let key_pem = std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?;
        let cert_der = pem_cert(&cert_pem, &cert_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|_| PkiError::NoPem {
            path: key_path.clone(),
            what: "private key",
        })?;
        let cert = ca_params(&key).self_signed(&key)?;
        // The re-created issuer must name the same subject and hold the same key as the file,
        // or what we sign would not chain to the CA the verifiers trust.
        let on_disk =
            webpki::EndEntityCert::try_from(&cert_der).map_err(|_| PkiError::CaMismatch {
                path: cert_path.clone(),
            })?;
        let recreated =
            webpki::EndEntityCert::try_from(cert.der()).map_err(|_| PkiError::CaMismatch {
                path: cert_path.clone(),
            })?;
        if on_disk.subject() != recreated.subject()
            || on_disk.subject_public_key_info() != recreated.subject_public_key_info()
        {
            return Err(PkiError::CaMismatch { path: cert_path });
        }
        Ok(Self {
            cert,
            key,
            cert_pem,
        })
    }

    /// Writes `ca.crt.pem` and `ca.key.pem` into `dir` (created if missing).
    pub fn save(&self, dir: &Path) -> Result<CertFiles, PkiError> {
        if !dir.exists() {
            proto::secret::private_dir(dir).map_err(io_err(dir))?;
        }
        let cert = dir.join(CA_CERT_FILE);
        let key = dir.join(CA_KEY_FILE);
        std::fs::write(&cert, &self.cert_pem).map_err(io_err(&cert))?;
        write_private(&key, &self.key.serialize_pem())?;
        Ok(CertFiles { cert, key })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA certificate as it was issued (the one verifiers trust).
    pub fn cert_der(&self) -> CertificateDer<'static> {
        use rustls_pki_types::pem::PemObject;
        // The PEM came from rcgen or was validated in `load`, so it parses.
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes())
            .map(|c| c.into_owned())
            .unwrap_or_else(|_| self.cert.der().clone())
    }

    /// A device certificate for a set-top box: CN and DNS SAN = the box id, URI SAN
    /// `urn:purselink:box:<id>`, client authentication only.
    pub fn issue_device(&self, box_id: &BoxId) -> Result<IssuedCert, PkiError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, box_id.as_str());
        dn.push(DnType::OrganizationName, ORGANIZATION);
        p.distinguished_name = dn;
        p.subject_alt_names = vec![
            SanType::DnsName(box_id.as_str().try_into()?),
            SanType::URI(box_id.uri().try_into()?),
        ];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(p)
    }

    /// A server certificate: DNS or IP SANs, server authentication only — it can never act as
    /// a client toward a role (an internet merchant's server, say).
    pub fn issue_server(&self, names: &[String]) -> Result<IssuedCert, PkiError> {
        self.issue_named(names, None, false)
    }

    /// A head-end role's certificate: the URI SAN `urn:purselink:role:<role>` (what the
    /// other roles' `callers` lists name) plus DNS or IP SANs, for server authentication,
    /// and for client authentication too only with `client` (the gateway, which calls the
    /// other roles). A role that calls nobody gets a certificate that cannot be a client.
    pub fn issue_role(
        &self,
        role: &str,
        names: &[String],
        client: bool,
    ) -> Result<IssuedCert, PkiError> {
        let role = BoxId::new(role).map_err(|e| PkiError::BadName(e.to_string()))?;
        self.issue_named(names, Some(role.as_str()), client)
    }

    fn issue_named(
        &self,
        names: &[String],
        role: Option<&str>,
        client: bool,
    ) -> Result<IssuedCert, PkiError> {
        let first = names.first().ok_or(PkiError::NoNames)?;
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, first.as_str());
        dn.push(DnType::OrganizationName, ORGANIZATION);
        p.distinguished_name = dn;
        for name in names {
            let san = match name.parse::<IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => {
                    // rcgen takes any IA5 string; a verifier would never match a malformed name.
                    rustls_pki_types::DnsName::try_from(name.as_str())
                        .map_err(|_| PkiError::BadName(name.clone()))?;
                    SanType::DnsName(
                        name.as_str()
                            .try_into()
                            .map_err(|_| PkiError::BadName(name.clone()))?,
                    )
                }
            };
            p.subject_alt_names.push(san);
        }
        if let Some(role) = role {
            p.subject_alt_names.push(SanType::URI(
                format!("{}{role}", crate::ROLE_URI_PREFIX).try_into()?,
            ));
        }
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        if client {
            p.extended_key_usages
                .push(ExtendedKeyUsagePurpose::ClientAuth);
        }
        self.sign(p)
    }

    fn sign(&self, mut p: CertificateParams) -> Result<IssuedCert, PkiError> {
        p.serial_number = Some(random_serial()?);
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.use_authority_key_identifier_extension = true;
        set_validity(&mut p, LEAF_VALIDITY_DAYS);
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &self.cert, &self.key)?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loaded_ca_issues_certs_that_chain_to_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = OperatorCa::generate().unwrap();
        ca.save(dir.path()).unwrap();
        let loaded = OperatorCa::load(dir.path()).unwrap();
        let dev = loaded
            .issue_device(&BoxId::new("box-000123").unwrap())
            .unwrap();
        let roots = {
            let mut r = rustls::RootCertStore::empty();
            r.add(ca.cert_der()).unwrap();
            r
        };
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            roots.into(),
            rustls::crypto::ring::default_provider().into(),
        )
        .build()
        .unwrap();
        verifier
            .verify_client_cert(&dev.cert_der(), &[], rustls_pki_types::UnixTime::now())
            .unwrap();
    }

    #[test]
    fn load_refuses_a_ca_from_elsewhere() {
        let dir = tempfile::tempdir().unwrap();
        OperatorCa::generate().unwrap().save(dir.path()).unwrap();
        // Swap in another CA's key: the certificate on disk no longer matches it.
        let other = tempfile::tempdir().unwrap();
        OperatorCa::generate().unwrap().save(other.path()).unwrap();
        std::fs::copy(other.path().join(CA_KEY_FILE), dir.path().join(CA_KEY_FILE)).unwrap();
        assert!(matches!(
            OperatorCa::load(dir.path()),
            Err(PkiError::CaMismatch { .. })
        ));
    }
}
