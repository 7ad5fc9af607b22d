//! The transport's typed errors and the application error codes it puts on the wire.
//!
//! A refusal reaches the box as a QUIC close or stream reset carrying a code; this module turns
//! those codes (and the TLS alerts rustls sends) back into errors that say why.

use quinn::{ConnectionError, ReadError, TransportErrorCode, VarInt, WriteError};

use proto::frame::FrameError;

/// Application error codes: connection closes (0x1_) and stream resets (0x2_).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub enum AppCode {
    /// Orderly close.
    Closed = 0x00,
    /// The box's certificate is on the revocation list.
    BoxRevoked = 0x10,
    /// The certificate verified but carries no usable identity.
    NoIdentity = 0x11,
    /// The handshake finished, but the server holds its maximum of connections.
    ConnectionLimit = 0x12,
    /// The head end is shutting down.
    ShuttingDown = 0x13,
    /// A request frame exceeded the server's maximum frame size.
    FrameTooLarge = 0x20,
    /// A request was not one well-formed frame (bad version, truncated, trailing bytes).
    BadFrame = 0x21,
    /// The request did not arrive in time.
    RequestTimeout = 0x22,
    /// The service could not answer.
    ServiceFailed = 0x23,
}

impl AppCode {
    pub fn varint(self) -> VarInt {
        VarInt::from_u32(self as u32)
    }

    pub fn from_varint(v: VarInt) -> Option<Self> {
        Some(match v.into_inner() {
            0x00 => Self::Closed,
            0x10 => Self::BoxRevoked,
            0x11 => Self::NoIdentity,
            0x12 => Self::ConnectionLimit,
            0x13 => Self::ShuttingDown,
            0x20 => Self::FrameTooLarge,
            0x21 => Self::BadFrame,
            0x22 => Self::RequestTimeout,
            0x23 => Self::ServiceFailed,
            _ => return None,
        })
    }
}

// TLS alert numbers (RFC 8446 §6) that rustls sends for the refusals we care about; QUIC
// carries them as transport error 0x100 + alert.
const ALERT_BAD_CERTIFICATE: u8 = 42;
const ALERT_UNSUPPORTED_CERTIFICATE: u8 = 43;
const ALERT_CERTIFICATE_REVOKED: u8 = 44;
const ALERT_CERTIFICATE_EXPIRED: u8 = 45;
const ALERT_UNKNOWN_CA: u8 = 48;
/// Also sent for a certificate whose signature does not verify against the named issuer.
const ALERT_DECRYPT_ERROR: u8 = 51;
const ALERT_CERTIFICATE_REQUIRED: u8 = 116;
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// Everything the transport can fail with, each variant a reason an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum QuicError {
    #[error(
        "no client certificate: the head end requires a device certificate from the operator CA"
    )]
    NoClientCertificate,
    #[error("certificate not signed by the operator CA")]
    UnknownCa,
    #[error("certificate rejected: {0}")]
    BadCertificate(String),
    #[error(
        "ALPN mismatch: the peer does not speak {}",
        String::from_utf8_lossy(super::ALPN)
    )]
    AlpnMismatch,
    #[error("{0}")]
    BoxRevoked(String),
    #[error("certificate carries no usable identity: {0}")]
    NoIdentity(String),
    #[error("frame too large: {len} bytes, the maximum is {max}")]
    FrameTooLarge { len: usize, max: usize },
    #[error("frame too large: the peer refused a frame above its maximum size")]
    PeerFrameTooLarge,
    #[error("bad frame: {0}")]
    BadFrame(FrameError),
    #[error("bad frame: {0}")]
    Protocol(&'static str),
    #[error("bad frame: the peer refused the request as malformed")]
    PeerBadFrame,
    #[error("request timed out at the peer")]
    PeerTimeout,
    #[error("the service failed to answer the request")]
    ServiceFailed,
    #[error("the head end is shutting down")]
    ShuttingDown,
    #[error("connection refused by the head end (at its connection limit or not accepting)")]
    Refused,
    #[error("stream reset by the peer with unknown code {0}")]
    StreamReset(u64),
    #[error("connection closed by the peer (code {code}): {reason}")]
    ApplicationClosed { code: u64, reason: String },
    #[error("TLS handshake failed: alert {alert}: {reason}")]
    Tls { alert: u8, reason: String },
    #[error("connection lost: {0}")]
    Connection(ConnectionError),
    #[error("can't start the connection: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("TLS configuration: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error("TLS configuration: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("stream error: {0}")]
    Stream(String),
    #[error("QUIC configuration: {0}")]
    QuicConfig(String),
    #[error("{path}: {reason}")]
    File {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

impl From<ConnectionError> for QuicError {
    fn from(e: ConnectionError) -> Self {
        classify_connection(e)
    }
}

fn alert_error(alert: u8, reason: String) -> QuicError {
    match alert {
        ALERT_CERTIFICATE_REQUIRED => QuicError::NoClientCertificate,
        ALERT_UNKNOWN_CA => QuicError::UnknownCa,
        ALERT_NO_APPLICATION_PROTOCOL => QuicError::AlpnMismatch,
        ALERT_BAD_CERTIFICATE
        | ALERT_UNSUPPORTED_CERTIFICATE
        | ALERT_CERTIFICATE_REVOKED
        | ALERT_CERTIFICATE_EXPIRED
        | ALERT_DECRYPT_ERROR => QuicError::BadCertificate(reason),
        _ => QuicError::Tls { alert, reason },
    }
}

fn crypto_alert(code: TransportErrorCode) -> Option<u8> {
    let raw = u64::from(code);
    // Lazy: `then_some` would compute `raw - 0x100` for every code and underflow.
    (0x100..0x200).contains(&raw).then(|| (raw - 0x100) as u8)
}

/// Names the reason behind a lost connection: a TLS alert, one of our close codes, or quinn's.
pub fn classify_connection(e: ConnectionError) -> QuicError {
    match &e {
        ConnectionError::ConnectionClosed(close) => {
            if let Some(alert) = crypto_alert(close.error_code) {
                return alert_error(alert, String::from_utf8_lossy(&close.reason).into_owned());
            }
            if close.error_code == TransportErrorCode::CONNECTION_REFUSED {
                return QuicError::Refused;
            }
        }
        // We detected the problem ourselves (e.g. the server's certificate failed our check).
        ConnectionError::TransportError(t) => {
            if let Some(alert) = crypto_alert(t.code) {
                return alert_error(alert, t.reason.clone());
            }
        }
        ConnectionError::ApplicationClosed(close) => {
            let reason = String::from_utf8_lossy(&close.reason).into_owned();
            return match AppCode::from_varint(close.error_code) {
                Some(AppCode::BoxRevoked) => QuicError::BoxRevoked(reason),
                Some(AppCode::NoIdentity) => QuicError::NoIdentity(reason),
                Some(AppCode::ConnectionLimit) => QuicError::Refused,
                Some(AppCode::ShuttingDown) => QuicError::ShuttingDown,
                _ => QuicError::ApplicationClosed {
                    code: close.error_code.into_inner(),
                    reason,
                },
            };
        }
        _ => {}
    }
    QuicError::Connection(e)
}

/// The error a stream reset (or stop) code stands for.
pub fn classify_stream_code(code: VarInt) -> QuicError {
    match AppCode::from_varint(code) {
        Some(AppCode::FrameTooLarge) => QuicError::PeerFrameTooLarge,
        Some(AppCode::BadFrame) => QuicError::PeerBadFrame,
        Some(AppCode::RequestTimeout) => QuicError::PeerTimeout,
        Some(AppCode::ServiceFailed) => QuicError::ServiceFailed,
        Some(AppCode::ShuttingDown) => QuicError::ShuttingDown,
        _ => QuicError::StreamReset(code.into_inner()),
    }
}

impl From<ReadError> for QuicError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Reset(code) => classify_stream_code(code),
            ReadError::ConnectionLost(c) => classify_connection(c),
            other => QuicError::Stream(other.to_string()),
        }
    }
}

impl From<WriteError> for QuicError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Stopped(code) => classify_stream_code(code),
            WriteError::ConnectionLost(c) => classify_connection(c),
            other => QuicError::Stream(other.to_string()),
        }
    }
}

impl From<FrameError> for QuicError {
    fn from(e: FrameError) -> Self {
        match e {
            FrameError::Oversize { len, max } => QuicError::FrameTooLarge { len, max },
            other => QuicError::BadFrame(other),
        }
    }
}
