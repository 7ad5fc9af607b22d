//! The attacker's own QUIC client: rustls + quinn configured here (not `transport`'s
//! `client_config`/`QuicClient`), TLS 1.3, the ALPN the README names, and the frame format
//! of `proto::frame` written and read by hand (a 4-byte big-endian length, the version byte
//! 1, the postcard payload). Messages are `proto::messages::Message` values where they are
//! well-formed, and raw bytes where they are not.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use proto::messages::{ErrorCode, ErrorMsg, Message};
use quinn::crypto::rustls::QuicClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The application protocol the README names.
pub const ALPN: &[u8] = b"purselink/1";
/// Every name the demo's role certificates carry.
pub const SERVER_NAME: &str = "localhost";
/// How long one call may take before the test calls it hung.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

/// A certificate chain and its key, and what the test calls it.
pub struct Identity {
    pub label: String,
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            label: self.label.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Identity({})", self.label)
    }
}

impl Identity {
    /// From the PEM files `headend pki` wrote.
    pub fn from_pem(label: &str, cert: &Path, key: &Path) -> Self {
        let chain = CertificateDer::pem_file_iter(cert)
            .unwrap_or_else(|e| panic!("{}: {e}", cert.display()))
            .collect::<Result<Vec<_>, _>>()
            .unwrap_or_else(|e| panic!("{}: {e}", cert.display()));
        let key =
            PrivateKeyDer::from_pem_file(key).unwrap_or_else(|e| panic!("{}: {e}", key.display()));
        Self {
            label: label.into(),
            chain,
            key,
        }
    }

    /// SHA-256 of the leaf certificate, lowercase hex (what `callers` lists as `sha256:`).
    pub fn fingerprint(&self) -> String {
        hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            self.chain[0].as_ref(),
        ))
    }
}

/// The operator CA as the only trust anchor.
pub fn roots(ca_pem: &Path) -> Arc<rustls::RootCertStore> {
    let mut r = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca_pem).expect("CA PEM") {
        r.add(c.expect("CA certificate"))
            .expect("CA certificate usable");
    }
    Arc::new(r)
}

/// A quinn client configuration built from scratch: TLS 1.3 only, `roots` as trust
/// anchors, `identity` as the client certificate (none: anonymous), `alpn` offered.
pub fn client_config(
    roots: Arc<rustls::RootCertStore>,
    identity: Option<&Identity>,
    alpn: &[&[u8]],
) -> quinn::ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain.clone(), id.key.clone_key())
            .expect("client certificate usable"),
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    let quic = QuicClientConfig::try_from(tls).expect("TLS 1.3 config usable for QUIC");
    let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
    let mut t = quinn::TransportConfig::default();
    t.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().expect("idle timeout"),
    ))
    .keep_alive_interval(Some(Duration::from_secs(5)));
    cfg.transport_config(Arc::new(t));
    cfg
}

/// One frame around `payload`: length (1 + payload) big-endian, version 1, payload.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 5);
    out.extend_from_slice(&(payload.len() as u32 + 1).to_be_bytes());
    out.push(1);
    out.extend_from_slice(payload);
    out
}

/// A message's postcard encoding (the frame payload).
pub fn payload(msg: &Message) -> Vec<u8> {
    postcard::to_allocvec(msg).expect("a message encodes")
}

/// What came back for a request.
// One per request, matched at once: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Outcome {
    /// A frame with exactly one message in it.
    Answer(Message),
    /// Bytes that are not one frame holding one message.
    Garbled(String),
    /// The stream was reset (or our sending side stopped) with this application code.
    Reset(u64),
    /// The connection was closed; `tls_alert` when the close is a TLS alert (QUIC crypto
    /// error 0x100 + alert).
    Closed {
        code: u64,
        reason: String,
        tls_alert: Option<u8>,
    },
    /// No answer within [`CALL_TIMEOUT`].
    Timeout,
    /// Anything else.
    Failed(String),
}

impl Outcome {
    /// The error message, if the answer is one.
    pub fn error(&self) -> Option<&ErrorMsg> {
        match self {
            Outcome::Answer(Message::Error(e)) => Some(e),
            _ => None,
        }
    }

    /// Whether the answer is an `Error` with `code`.
    pub fn is_error(&self, code: ErrorCode) -> bool {
        self.error().is_some_and(|e| e.code == code)
    }

    /// Whether the connection was refused at TLS (an alert).
    pub fn is_tls_refusal(&self) -> bool {
        matches!(
            self,
            Outcome::Closed {
                tls_alert: Some(_),
                ..
            }
        )
    }
}

fn classify_conn(e: &quinn::ConnectionError) -> Outcome {
    use quinn::ConnectionError as C;
    match e {
        C::ConnectionClosed(c) => {
            let code = u64::from(c.error_code);
            Outcome::Closed {
                code,
                reason: String::from_utf8_lossy(&c.reason).into_owned(),
                tls_alert: (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8),
            }
        }
        C::TransportError(t) => {
            let code = u64::from(t.code);
            Outcome::Closed {
                code,
                reason: t.reason.clone(),
                tls_alert: (0x100..0x200).contains(&code).then(|| (code - 0x100) as u8),
            }
        }
        C::ApplicationClosed(c) => Outcome::Closed {
            code: c.error_code.into_inner(),
            reason: String::from_utf8_lossy(&c.reason).into_owned(),
            tls_alert: None,
        },
        other => Outcome::Failed(other.to_string()),
    }
}

fn classify_read(e: &quinn::ReadError) -> Outcome {
    match e {
        quinn::ReadError::Reset(code) => Outcome::Reset(code.into_inner()),
        quinn::ReadError::ConnectionLost(c) => classify_conn(c),
        other => Outcome::Failed(other.to_string()),
    }
}

fn classify_write(e: &quinn::WriteError) -> Outcome {
    match e {
        quinn::WriteError::Stopped(code) => Outcome::Reset(code.into_inner()),
        quinn::WriteError::ConnectionLost(c) => classify_conn(c),
        other => Outcome::Failed(other.to_string()),
    }
}

/// Parses a whole response stream: exactly one frame, exactly one message.
pub fn parse_response(data: &[u8]) -> Outcome {
    if data.len() < 5 {
        return Outcome::Garbled(format!("{} bytes: no frame", data.len()));
    }
    let len = u32::from_be_bytes(data[..4].try_into().expect("4 bytes")) as usize;
    if len + 4 != data.len() {
        return Outcome::Garbled(format!(
            "frame length {len} but {} bytes follow",
            data.len() - 4
        ));
    }
    if data[4] != 1 {
        return Outcome::Garbled(format!("frame version {}", data[4]));
    }
    match postcard::take_from_bytes::<Message>(&data[5..]) {
        Ok((m, [])) => Outcome::Answer(m),
        Ok((_, rest)) => Outcome::Garbled(format!("{} trailing bytes", rest.len())),
        Err(e) => Outcome::Garbled(e.to_string()),
    }
}

/// One QUIC connection of the attacker (or of an honest client built the same way).
pub struct Conn {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// Why a connection could not be made at all.
pub type ConnectRefusal = Outcome;

/// Connects to `addr` with `cfg`; the handshake outcome as the client sees it.
pub async fn connect(addr: SocketAddr, cfg: quinn::ClientConfig) -> Result<Conn, ConnectRefusal> {
    let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr"))
        .map_err(|e| Outcome::Failed(format!("client socket: {e}")))?;
    let connecting = endpoint
        .connect_with(cfg, addr, SERVER_NAME)
        .map_err(|e| Outcome::Failed(format!("connect: {e}")))?;
    match tokio::time::timeout(CALL_TIMEOUT, connecting).await {
        Err(_) => Err(Outcome::Timeout),
        Ok(Err(e)) => Err(classify_conn(&e)),
        Ok(Ok(conn)) => Ok(Conn { endpoint, conn }),
    }
}

impl Conn {
    /// Sends `bytes` as the whole request stream and reads the whole answer.
    pub async fn call_raw(&self, bytes: &[u8]) -> Outcome {
        let work = async {
            let (mut send, mut recv) = match self.conn.open_bi().await {
                Ok(s) => s,
                Err(e) => return classify_conn(&e),
            };
            if let Err(e) = send.write_all(bytes).await {
                return classify_write(&e);
            }
            let _ = send.finish();
            match recv.read_to_end(1 << 20).await {
                Ok(data) => parse_response(&data),
                Err(quinn::ReadToEndError::Read(e)) => classify_read(&e),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .unwrap_or(Outcome::Timeout)
    }

    /// One message in one frame, one answer.
    pub async fn call(&self, msg: &Message) -> Outcome {
        self.call_raw(&frame(&payload(msg))).await
    }

    /// A stream for the steps of one transaction (draw request, then debit response).
    pub async fn txn(&self) -> Result<Txn, Outcome> {
        self.conn
            .open_bi()
            .await
            .map(|(send, recv)| Txn { send, recv })
            .map_err(|e| classify_conn(&e))
    }

    pub fn close(&self) {
        self.conn.close(0u32.into(), b"done");
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.conn.close(0u32.into(), b"done");
    }
}

/// The steps of one transaction on one stream.
pub struct Txn {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
}

impl Txn {
    /// Sends one frame and reads exactly one frame back (the stream stays open).
    pub async fn step(&mut self, msg: &Message) -> Outcome {
        let work = async {
            if let Err(e) = self.send.write_all(&frame(&payload(msg))).await {
                return classify_write(&e);
            }
            let mut head = [0u8; 4];
            if let Err(e) = self.recv.read_exact(&mut head).await {
                return match e {
                    quinn::ReadExactError::ReadError(r) => classify_read(&r),
                    quinn::ReadExactError::FinishedEarly(n) => {
                        Outcome::Garbled(format!("stream ended after {n} bytes"))
                    }
                };
            }
            let len = u32::from_be_bytes(head) as usize;
            if len > 1 << 20 {
                return Outcome::Garbled(format!("frame length {len}"));
            }
            let mut body = vec![0u8; len];
            if let Err(e) = self.recv.read_exact(&mut body).await {
                return match e {
                    quinn::ReadExactError::ReadError(r) => classify_read(&r),
                    quinn::ReadExactError::FinishedEarly(n) => {
                        Outcome::Garbled(format!("frame cut after {n} bytes"))
                    }
                };
            }
            let mut whole = head.to_vec();
            whole.extend_from_slice(&body);
            parse_response(&whole)
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .unwrap_or(Outcome::Timeout)
    }

    /// Sends the last frame, finishes the stream and reads the rest.
    pub async fn last(mut self, msg: &Message) -> Outcome {
        let work = async {
            if let Err(e) = self.send.write_all(&frame(&payload(msg))).await {
                return classify_write(&e);
            }
            let _ = self.send.finish();
            match self.recv.read_to_end(1 << 20).await {
                Ok(data) => parse_response(&data),
                Err(quinn::ReadToEndError::Read(e)) => classify_read(&e),
                Err(e) => Outcome::Failed(e.to_string()),
            }
        };
        tokio::time::timeout(CALL_TIMEOUT, work)
            .await
            .unwrap_or(Outcome::Timeout)
    }

    /// Walks away from the transaction: the stream is reset, nothing more is sent.
    pub fn abandon(mut self) {
        let _ = self.send.reset(0u32.into());
        let _ = self.recv.stop(0u32.into());
    }
}
