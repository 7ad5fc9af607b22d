//! Building quinn server and client configurations: TLS 1.3 only, ALPN `purselink/1`, mutual
//! TLS against the operator CA, and the transport limits and timers for boxes that stay
//! connected for days.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{IdleTimeout, TransportConfig, VarInt};
use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

use super::{ALPN, QuicError};

/// Transport limits and timers; every field has a default, so a config may name only some.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TransportSettings {
    /// Keep-alive PING interval: keeps NAT bindings and the idle timer alive on quiet boxes.
    pub keep_alive_secs: u64,
    /// A connection silent this long is dead (must exceed the keep-alive interval).
    pub idle_timeout_secs: u64,
    /// Established, authenticated connections held at once; more are refused. A handshake in
    /// progress does not count here (see the pending-handshake limits below).
    pub max_connections: usize,
    /// Established connections from one IP address; 0 means no per-source limit. Off by
    /// default: boxes behind one NAT share an address, and an established connection has
    /// already shown a device certificate.
    pub max_connections_per_source: usize,
    /// Handshakes in progress at once (from a client's first packet until its certificate has
    /// verified). When all are taken, a client with a validated address takes the place of
    /// the oldest handshake (running for over a quarter of `handshake_timeout_ms`) of the
    /// busiest source that has more in progress than the client's own source; otherwise its
    /// attempt is dropped unanswered, and the client's retransmission tries again.
    pub max_pending_handshakes: usize,
    /// Handshakes in progress at once from one IP address (dropped unanswered beyond it).
    pub max_pending_per_source: usize,
    /// A handshake not finished this long after the client's first packet is dropped and its
    /// slot freed.
    pub handshake_timeout_ms: u64,
    /// Once this many handshakes are in progress, a client whose address is not yet validated
    /// is first sent a QUIC Retry (one more round trip, no state kept on the server); a source
    /// that already has a handshake in progress always is. 0 sends a Retry to every client.
    pub retry_threshold: usize,
    /// Bidirectional streams (transactions) a peer may have open at once on one connection;
    /// more wait for credit at the opener (back-pressure).
    pub max_streams_per_connection: u32,
    /// Maximum frame size (length field value), see `proto::frame`.
    pub max_frame: usize,
    /// Time a request has to arrive whole once its stream is open.
    pub request_timeout_ms: u64,
    /// On shutdown, how long in-flight transactions get to finish.
    pub shutdown_grace_ms: u64,
    /// How long a caller (the gateway calling a role, a role calling another) waits to
    /// connect and for an answer before it drops the connection and reports the peer
    /// unreachable; the next call reconnects at once.
    pub call_timeout_ms: u64,
}

impl Default for TransportSettings {
    fn default() -> Self {
        Self {
            keep_alive_secs: 15,
            idle_timeout_secs: 60,
            max_connections: 10_000,
            max_connections_per_source: 0,
            max_pending_handshakes: 256,
            max_pending_per_source: 16,
            handshake_timeout_ms: 5_000,
            retry_threshold: 64,
            max_streams_per_connection: 16,
            max_frame: proto::frame::DEFAULT_MAX_FRAME,
            request_timeout_ms: 10_000,
            shutdown_grace_ms: 5_000,
            call_timeout_ms: 8_000,
        }
    }
}

impl TransportSettings {
    pub fn keep_alive(&self) -> Duration {
        Duration::from_secs(self.keep_alive_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Refuses settings that would make a useless or unbounded transport.
    pub fn validate(&self) -> Result<(), QuicError> {
        let bad = |why: &str| Err(QuicError::QuicConfig(why.to_owned()));
        if self.keep_alive_secs == 0 || self.keep_alive_secs >= self.idle_timeout_secs {
            return bad("keep_alive_secs must be at least 1 and below idle_timeout_secs");
        }
        if self.max_connections == 0 || self.max_streams_per_connection == 0 {
            return bad("max_connections and max_streams_per_connection must be at least 1");
        }
        if self.max_frame < 2 || self.max_frame > u32::MAX as usize {
            return bad("max_frame must be between 2 and 2^32-1");
        }
        if self.request_timeout_ms == 0 || self.call_timeout_ms == 0 {
            return bad("request_timeout_ms and call_timeout_ms must be at least 1");
        }
        if self.max_pending_handshakes == 0 || self.max_pending_per_source == 0 {
            return bad("max_pending_handshakes and max_pending_per_source must be at least 1");
        }
        // Each pending handshake holds TLS state; a full pool is scanned for a stalled one.
        if self.max_pending_handshakes > 65_536 {
            return bad("max_pending_handshakes must be at most 65536");
        }
        if self.handshake_timeout_ms == 0 {
            return bad("handshake_timeout_ms must be at least 1");
        }
        Ok(())
    }

    /// The quinn transport both sides use. Flow-control windows are sized to one frame per
    /// stream, so a peer can't make us buffer more than `streams x max_frame`.
    pub fn transport(&self) -> Result<TransportConfig, QuicError> {
        self.validate()?;
        let idle = IdleTimeout::try_from(self.idle_timeout())
            .map_err(|e| QuicError::QuicConfig(format!("idle_timeout_secs: {e}")))?;
        let frame_window = (self.max_frame as u64).saturating_add(4);
        let streams = u64::from(self.max_streams_per_connection);
        let conn_window = frame_window.saturating_mul(streams);
        let mut t = TransportConfig::default();
        t.keep_alive_interval(Some(self.keep_alive()))
            .max_idle_timeout(Some(idle))
            .max_concurrent_bidi_streams(VarInt::from_u32(self.max_streams_per_connection))
            // Transactions are bidirectional; nothing opens unidirectional streams.
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(varint(frame_window)?)
            .receive_window(varint(conn_window)?)
            .send_window(conn_window);
        Ok(t)
    }
}

fn varint(v: u64) -> Result<VarInt, QuicError> {
    VarInt::from_u64(v).map_err(|_| QuicError::QuicConfig(format!("{v} exceeds a QUIC varint")))
}

/// A certificate chain and its private key.
#[derive(Debug)]
pub struct TlsIdentity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for TlsIdentity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

fn file_err(path: &Path, reason: impl std::fmt::Display) -> QuicError {
    QuicError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

impl TlsIdentity {
    /// Reads the certificate chain and its private key; the key file must be readable by
    /// its owner only (or it is refused, naming the file and its mode).
    pub fn from_pem_files(cert: &Path, key: &Path) -> Result<Self, QuicError> {
        proto::secret::check_private(key).map_err(|e| file_err(key, e))?;
        let chain = load_certs(cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        Ok(Self { chain, key })
    }

    /// From a certificate chain and its key already in memory (e.g. just issued by the dev CA).
    pub fn from_der(chain: Vec<CertificateDer<'static>>, key: PrivateKeyDer<'static>) -> Self {
        Self { chain, key }
    }
}

/// Every certificate in a PEM file (e.g. the operator CA).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, QuicError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// What the server needs: the operator CA its clients must chain to, and its own identity.
#[derive(Debug, Clone)]
pub struct ServerTls {
    pub operator_ca: Vec<CertificateDer<'static>>,
    pub identity: TlsIdentity,
}

/// What a client (a box, or the gateway calling a role) needs.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The CA the server's certificate must chain to.
    pub operator_ca: Vec<CertificateDer<'static>>,
    /// The device or role certificate; `None` only to show the server refuses anonymous clients.
    pub identity: Option<TlsIdentity>,
    /// Protocols offered; [`ALPN`] unless a test needs a wrong one.
    pub alpn: Vec<Vec<u8>>,
    /// Allow 0-RTT on resumed sessions, for the requests the caller knows are safe to
    /// replay (the box's catalog request). The head end accepts none today.
    pub early_data: bool,
}

impl ClientTls {
    pub fn new(operator_ca: Vec<CertificateDer<'static>>, identity: TlsIdentity) -> Self {
        Self {
            operator_ca,
            identity: Some(identity),
            alpn: vec![ALPN.to_vec()],
            early_data: false,
        }
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, QuicError> {
    let mut roots = RootCertStore::empty();
    for c in ca {
        roots.add(c.clone())?;
    }
    Ok(Arc::new(roots))
}

/// Connection attempts quinn holds for the accept loop at once.
const MAX_INCOMING: usize = 1024;
/// Bytes buffered per waiting connection attempt, beyond its first datagram.
const INCOMING_BUFFER: u64 = 16 * 1024;
/// Bytes buffered for all waiting connection attempts together.
const INCOMING_BUFFER_TOTAL: u64 = 2 * 1024 * 1024;

/// The server side: TLS 1.3 only, ALPN `purselink/1`, a client certificate chaining to the
/// operator CA required (none, or one from another CA, fails the handshake).
pub fn server_config(
    tls: &ServerTls,
    settings: &TransportSettings,
) -> Result<quinn::ServerConfig, QuicError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(roots(&tls.operator_ca)?, provider())
            .build()?;
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(tls.identity.chain.clone(), tls.identity.key.clone_key())?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    // Each box is its own client; session tickets buy little and 0-RTT would allow replays.
    crypto.max_early_data_size = 0;
    let quic = QuicServerConfig::try_from(crypto)
        .map_err(|e| QuicError::QuicConfig(format!("TLS config unusable for QUIC: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(quic));
    config
        .transport_config(Arc::new(settings.transport()?))
        // Boxes behind NAT change address; keep their connection.
        .migration(true)
        // Connection attempts waiting for the accept loop, which decides on each at once (see
        // `admission`): a backlog only builds while the loop is starved of CPU, and past this
        // bound quinn drops new Initials unanswered (clients retransmit).
        .max_incoming(MAX_INCOMING)
        // Datagrams buffered for an attempt before that decision (beyond its first packet):
        // a ClientHello fits in a few; quinn's defaults (10 MiB each, 100 MiB in all) are
        // sized for 0-RTT uploads, which this head end refuses anyway.
        .incoming_buffer_size(INCOMING_BUFFER)
        .incoming_buffer_size_total(INCOMING_BUFFER_TOTAL);
    Ok(config)
}

/// The client side: TLS 1.3 only, the operator CA as the only root, the device certificate.
pub fn client_config(
    tls: &ClientTls,
    settings: &TransportSettings,
) -> Result<quinn::ClientConfig, QuicError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&tls.operator_ca)?);
    let mut crypto = match &tls.identity {
        Some(id) => builder.with_client_auth_cert(id.chain.clone(), id.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    crypto.alpn_protocols = tls.alpn.clone();
    crypto.enable_early_data = tls.early_data;
    let quic = QuicClientConfig::try_from(crypto)
        .map_err(|e| QuicError::QuicConfig(format!("TLS config unusable for QUIC: {e}")))?;
    let mut config = quinn::ClientConfig::new(Arc::new(quic));
    config.transport_config(Arc::new(settings.transport()?));
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_limits_have_defaults_and_are_validated() {
        let d = TransportSettings::default();
        assert!(d.validate().is_ok());
        assert_eq!(
            (
                d.max_pending_handshakes,
                d.max_pending_per_source,
                d.handshake_timeout_ms,
                d.retry_threshold,
                d.max_connections_per_source
            ),
            (256, 16, 5_000, 64, 0)
        );
        assert_eq!(d.handshake_timeout(), Duration::from_secs(5));
        for bad in [
            TransportSettings {
                max_pending_handshakes: 0,
                ..d.clone()
            },
            TransportSettings {
                max_pending_per_source: 0,
                ..d.clone()
            },
            TransportSettings {
                handshake_timeout_ms: 0,
                ..d.clone()
            },
            TransportSettings {
                max_pending_handshakes: 100_000,
                ..d.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // Retry for everyone, and no pending handshake beyond one per source, are valid choices.
        assert!(
            TransportSettings {
                retry_threshold: 0,
                max_pending_per_source: 1,
                ..d
            }
            .validate()
            .is_ok()
        );
    }
}
