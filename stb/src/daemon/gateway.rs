//! The one QUIC connection to the head-end gateway: mutual TLS with the device certificate
//! (TLS 1.3, ALPN `purselink/1`, the operator CA as the only root), keep-alive, reconnect
//! with capped exponential backoff and jitter, and one bidirectional stream per request
//! carrying one `proto::frame` each way.
//!
//! 0-RTT: only a `CatalogRequest` may ride in early data (it changes nothing, so a replay
//! is harmless); every other request waits for the full handshake. When the server takes no
//! early data, the catalog request simply goes after the handshake too.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::messages::Message;
use quinn::{Connection, Endpoint};
use rand::Rng;
use stb_flow::NetworkFailure;
use tokio::sync::Notify;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("{path}: {detail}")]
    File { path: String, detail: String },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("head end unreachable: {0}")]
    Connect(String),
    #[error("request to the head end failed: {0}")]
    Request(String),
    #[error("the head end did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the head end's answer is malformed: {0}")]
    Malformed(String),
}

/// A failed request as the flows take it ([`NetworkFailure`]): the one place a gateway
/// error becomes a flow's. Same texts. `File` and `Tls` come from setup, never from
/// [`Gateway::call`]; should one reach a flow, the head end is unreachable.
impl From<&GatewayError> for NetworkFailure {
    fn from(e: &GatewayError) -> Self {
        match e {
            GatewayError::Connect(detail) => NetworkFailure::Unreachable(detail.clone()),
            GatewayError::File { .. } | GatewayError::Tls(_) => {
                NetworkFailure::Unreachable(e.to_string())
            }
            GatewayError::Request(detail) => NetworkFailure::Failed(detail.clone()),
            GatewayError::Timeout(t) => NetworkFailure::Timeout(*t),
            GatewayError::Malformed(detail) => NetworkFailure::Malformed(detail.clone()),
        }
    }
}

impl From<GatewayError> for NetworkFailure {
    fn from(e: GatewayError) -> Self {
        NetworkFailure::from(&e)
    }
}

/// What the client needs, loaded from the config's files.
pub struct GatewaySettings {
    /// The gateways, `host:port` each (`[headend] address`): one at a time, failing over in
    /// order ([`Gateway`]). Never empty.
    pub addrs: Vec<String>,
    pub server_name: String,
    /// The role the gateway's certificate must name (`[headend] server_role`).
    pub server_role: String,
    pub keep_alive: Duration,
    pub idle_timeout: Duration,
    pub request_timeout: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

/// Loads the operator CA and the device identity and builds the quinn client config with
/// the shared transport's settings (TLS 1.3 only, ALPN purselink/1, mutual TLS), plus 0-RTT
/// for replay-safe requests.
pub fn client_config(
    operator_ca: &Path,
    device_cert: &Path,
    device_key: &Path,
    s: &GatewaySettings,
) -> Result<quinn::ClientConfig, GatewayError> {
    let file = |p: &Path, e: &dyn std::fmt::Display| GatewayError::File {
        path: p.display().to_string(),
        detail: e.to_string(),
    };
    let ca = transport::load_certs(operator_ca).map_err(|e| file(operator_ca, &e))?;
    let identity = transport::TlsIdentity::from_pem_files(device_cert, device_key)
        .map_err(|e| file(device_cert, &e))?;
    let mut tls = transport::ClientTls::new(ca, identity, s.server_role.clone());
    tls.early_data = true;
    let settings = transport::TransportSettings {
        keep_alive_secs: s.keep_alive.as_secs().max(1),
        idle_timeout_secs: s.idle_timeout.as_secs().max(2),
        ..Default::default()
    };
    transport::client_config(&tls, &settings).map_err(|e| GatewayError::Tls(e.to_string()))
}

/// The next reconnect delay: see [`stb_flow::backoff`] (`initial · 2^attempt`, capped at
/// `max`, jittered in its upper half).
pub fn backoff(attempt: u32, initial: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    stb_flow::backoff(attempt, initial, max, rng)
}

/// Whether a gateway's answer says it could do nothing for the request (its journal out
/// of reach: `Internal`): with several gateways, the request is sent to the next.
pub fn gateway_cannot_act(m: &Message) -> bool {
    matches!(m, Message::Error(e) if e.code == proto::messages::ErrorCode::Internal)
}

/// Whether a request may be sent as 0-RTT early data (safe to replay).
pub fn replay_safe(m: &Message) -> bool {
    matches!(m, Message::CatalogRequest)
}

/// Whether a transport error means the connection itself is gone (closed, reset, lost,
/// refused, the head end shutting down), as opposed to one request failing on a live
/// connection.
pub fn connection_level(e: &transport::QuicError) -> bool {
    use transport::QuicError as Q;
    matches!(
        e,
        Q::Connection(_)
            | Q::ApplicationClosed { .. }
            | Q::ShuttingDown
            | Q::Superseded(_)
            | Q::Refused
            | Q::BoxRevoked(_)
            | Q::NoIdentity(_)
    )
}

/// How one exchange on a connection failed.
#[derive(Debug)]
enum Failure {
    /// No stream could be opened: the connection was dead before any byte of the request
    /// was written, so the request certainly did not reach the head end.
    NotSent(transport::QuicError),
    /// The request may have reached the head end.
    Failed(transport::QuicError),
}

/// One request on a new bidirectional stream of `conn`: one frame out, one frame back.
async fn exchange(conn: &Connection, payload: &[u8]) -> Result<Vec<u8>, Failure> {
    let max = proto::frame::DEFAULT_MAX_FRAME;
    let request = proto::frame::encode(payload, max)
        .map_err(|e| Failure::NotSent(transport::QuicError::from(e)))?;
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| Failure::NotSent(e.into()))?;
    let written = async {
        send.write_all(&request).await?;
        send.finish()
            .map_err(|e| transport::QuicError::Stream(e.to_string()))
    }
    .await;
    let read = transport::frame_io::read_frame(&mut recv, max).await;
    match (written, read) {
        (_, Ok(answer)) => Ok(answer),
        // A refusal mid-write: the reset on our receive side says why more precisely.
        (Err(w), Err(r)) => Err(Failure::Failed(match transport::QuicError::from(r) {
            e @ transport::QuicError::StreamReset(_) => e,
            e if connection_level(&e) => e,
            _ => w,
        })),
        (Ok(()), Err(r)) => Err(Failure::Failed(r.into())),
    }
}

/// The box's client of the head-end gateway: one QUIC connection, kept up and re-made on
/// demand, and one bidirectional stream per request ([`Gateway::call`]). `stbd` has one; the
/// simulated boxes in `sim` have one each, sharing a few UDP sockets
/// ([`Gateway::on_endpoint`]).
///
/// Several gateway addresses: a connection attempt begins with the address that last worked
/// and tries the others in order, each within an equal share of the request timeout; a
/// connection dropped for a missed deadline or a failure of the connection itself moves the
/// next attempt on to the next address first (a gateway that died silently — SIGKILL, a
/// lost machine — is only found out by deadlines: its port does not answer a handshake).
/// The gateways share their state through PostgreSQL, so a request re-sent to another one
/// continues the transaction by its id.
pub struct Gateway {
    endpoint: Endpoint,
    /// This box's TLS client configuration (device certificate, operator CA, ALPN).
    config: quinn::ClientConfig,
    settings: GatewaySettings,
    conn: Mutex<Option<Connection>>,
    /// One connection attempt at a time (the keeper's or a request's).
    connecting: tokio::sync::Mutex<()>,
    /// Wakes the keeper when a request found no connection.
    wanted: Notify,
    /// The index in `settings.addrs` the next connection attempt begins with.
    preferred: std::sync::atomic::AtomicUsize,
}

impl Gateway {
    /// A client on its own UDP socket (what `stbd` runs).
    ///
    /// # Errors
    ///
    /// [`GatewayError::Connect`] when no UDP socket can be bound.
    pub fn new(
        config: quinn::ClientConfig,
        settings: GatewaySettings,
    ) -> Result<Arc<Self>, GatewayError> {
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let endpoint = Endpoint::client(bind)
            .map_err(|e| GatewayError::Connect(format!("UDP socket: {e}")))?;
        Ok(Self::on_endpoint(endpoint, config, settings))
    }

    /// A client on a UDP socket it shares with other boxes' clients (the simulated fleet:
    /// thousands of boxes on a few sockets). Each connection still carries this box's own
    /// TLS configuration.
    pub fn on_endpoint(
        endpoint: Endpoint,
        config: quinn::ClientConfig,
        settings: GatewaySettings,
    ) -> Arc<Self> {
        Arc::new(Self {
            endpoint,
            config,
            settings,
            conn: Mutex::new(None),
            connecting: tokio::sync::Mutex::new(()),
            wanted: Notify::new(),
            preferred: Default::default(),
        })
    }

    /// Connects now (within the request timeout) unless a connection is up.
    ///
    /// # Errors
    ///
    /// [`GatewayError::Connect`] when the handshake failed or did not finish in time.
    pub async fn connect_now(&self) -> Result<(), GatewayError> {
        self.connection(false).await.map(|_| ())
    }

    /// Closes the connection (if any) with `reason`; the next request connects again.
    pub fn close(&self, reason: &str) {
        let conn = self.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(c) = conn {
            c.close(0u32.into(), reason.as_bytes());
        }
    }

    /// The UDP socket this client sends from.
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn current(&self) -> Option<Connection> {
        let g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    /// Whether a connection to the gateway is up (as far as the box knows: a head end that
    /// died silently is found out by the next request's deadline).
    pub fn is_connected(&self) -> bool {
        self.current().is_some()
    }

    /// Drops `conn` (if it is still the current one): closes it locally, so the keeper,
    /// waiting on it, reconnects at once — beginning with the next gateway address when
    /// there are several.
    fn drop_connection(&self, conn: &Connection, why: &str) {
        let mut g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if g.as_ref()
            .is_some_and(|c| c.stable_id() == conn.stable_id())
        {
            *g = None;
            let n = self.settings.addrs.len().max(1);
            let _ = self.preferred.fetch_update(
                std::sync::atomic::Ordering::Relaxed,
                std::sync::atomic::Ordering::Relaxed,
                |p| Some((p + 1) % n),
            );
        }
        drop(g);
        if conn.close_reason().is_none() {
            tracing::warn!(reason = why, "gateway connection dropped; reconnecting");
            conn.close(0u32.into(), why.as_bytes());
        }
        self.wanted.notify_one();
    }

    fn resolve(addr: &str) -> Result<SocketAddr, GatewayError> {
        use std::net::ToSocketAddrs;
        addr.to_socket_addrs()
            .map_err(|e| GatewayError::Connect(format!("{addr}: {e}")))?
            .next()
            .ok_or_else(|| GatewayError::Connect(format!("{addr}: no address")))
    }

    /// The current connection, or a new one (one attempt at a time, bounded by the request
    /// timeout); with `early` a resumed session may use 0-RTT.
    async fn connection(&self, early: bool) -> Result<Connection, GatewayError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let addrs = &self.settings.addrs;
        let n = addrs.len().max(1);
        // Each address its share of the request timeout, so that all are tried within it.
        let t = self.settings.request_timeout / n as u32;
        let first = self.preferred.load(std::sync::atomic::Ordering::Relaxed);
        let mut failures = Vec::new();
        for i in 0..addrs.len() {
            let at = (first + i) % n;
            let addr = &addrs[at];
            let attempt = match tokio::time::timeout(t, self.connect(addr, early)).await {
                Ok(r) => r,
                Err(_) => Err(GatewayError::Connect(format!(
                    "{addr}: no handshake within {t:?}"
                ))),
            };
            match attempt {
                Ok(c) => {
                    self.preferred
                        .store(at, std::sync::atomic::Ordering::Relaxed);
                    return Ok(c);
                }
                Err(e) => {
                    if addrs.len() > 1 {
                        tracing::warn!(gateway = %addr, error = %e, "gateway unreachable; trying the next");
                    }
                    failures.push(match e {
                        GatewayError::Connect(detail) => detail,
                        other => other.to_string(),
                    });
                }
            }
        }
        Err(GatewayError::Connect(if failures.is_empty() {
            "no gateway address configured".into()
        } else {
            failures.join("; ")
        }))
    }

    async fn connect(&self, addr: &str, early: bool) -> Result<Connection, GatewayError> {
        let addr = Self::resolve(addr)?;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, &self.settings.server_name)
            .map_err(|e| GatewayError::Connect(e.to_string()))?;
        let conn = if early {
            match connecting.into_0rtt() {
                Ok((conn, _accepted)) => {
                    tracing::debug!(%addr, "gateway connection in 0-RTT");
                    conn
                }
                Err(connecting) => connecting
                    .await
                    .map_err(|e| GatewayError::Connect(e.to_string()))?,
            }
        } else {
            connecting
                .await
                .map_err(|e| GatewayError::Connect(e.to_string()))?
        };
        tracing::info!(%addr, server = %self.settings.server_name, "gateway connected");
        *self.conn.lock().unwrap_or_else(|p| p.into_inner()) = Some(conn.clone());
        Ok(conn)
    }

    /// One request, one answer, within the request timeout (connecting if needed).
    ///
    /// A request that finds the connection already dead before any byte is written is sent
    /// once more on a fresh connection (every box request is idempotent by transaction id).
    /// A deadline, or a failure of the connection itself, drops the connection so the
    /// keeper reconnects at once instead of waiting for the idle timeout: a head end that
    /// restarted does not know the old connection, and its stateless resets may not reach
    /// or convince the box.
    ///
    /// # Errors
    ///
    /// [`GatewayError::Connect`] (no connection), [`GatewayError::Request`] (the exchange
    /// failed), [`GatewayError::Timeout`] (no answer by the deadline),
    /// [`GatewayError::Malformed`] (the answer does not decode). The flows take these as a
    /// [`NetworkFailure`].
    pub async fn call(&self, msg: &Message) -> Result<Message, GatewayError> {
        let t = self.settings.request_timeout;
        let deadline = tokio::time::Instant::now() + t;
        let payload = msg.to_payload();
        let mut fresh_tried = false;
        // Several gateways: each attempt gets its share of the deadline, and a gateway that
        // does not answer in it, or answers that it can do nothing (its journal is out of
        // reach), is left for the next one — the same request, idempotent by its id.
        let gateways = self.settings.addrs.len().max(1);
        let share = t / gateways as u32;
        let mut moved = 0;
        loop {
            let attempt_deadline = if gateways > 1 {
                deadline.min(tokio::time::Instant::now() + share)
            } else {
                deadline
            };
            let may_move = gateways > 1 && moved + 1 < gateways;
            let conn =
                match tokio::time::timeout_at(deadline, self.connection(replay_safe(msg))).await {
                    Ok(Ok(c)) => c,
                    Ok(Err(e)) => {
                        self.wanted.notify_one();
                        return Err(e);
                    }
                    Err(_) => {
                        self.wanted.notify_one();
                        return Err(GatewayError::Timeout(t));
                    }
                };
            match tokio::time::timeout_at(attempt_deadline, exchange(&conn, &payload)).await {
                Ok(Ok(bytes)) => {
                    let answer = Message::from_payload(&bytes)
                        .map_err(|e| GatewayError::Malformed(e.to_string()))?;
                    if may_move && gateway_cannot_act(&answer) {
                        tracing::warn!(answer = ?answer, "gateway cannot act; the request goes to the next");
                        self.drop_connection(&conn, "the gateway cannot act");
                        moved += 1;
                        continue;
                    }
                    return Ok(answer);
                }
                Ok(Err(Failure::NotSent(e))) if !fresh_tried => {
                    tracing::info!(error = %e, "gateway connection was dead; request sent on a fresh one");
                    self.drop_connection(&conn, "connection dead before the request");
                    fresh_tried = true;
                }
                Ok(Err(Failure::NotSent(e) | Failure::Failed(e))) => {
                    if connection_level(&e) || conn.close_reason().is_some() {
                        self.drop_connection(&conn, "connection failed");
                        if may_move && tokio::time::Instant::now() < deadline {
                            tracing::warn!(error = %e, "gateway connection failed; the request goes to the next");
                            moved += 1;
                            continue;
                        }
                    }
                    return Err(GatewayError::Request(e.to_string()));
                }
                Err(_) => {
                    self.drop_connection(&conn, "no answer within the request deadline");
                    if may_move && tokio::time::Instant::now() < deadline {
                        tracing::warn!(
                            "gateway did not answer in its share of the deadline; the request goes to the next"
                        );
                        moved += 1;
                        continue;
                    }
                    return Err(GatewayError::Timeout(t));
                }
            }
        }
    }

    /// Keeps the connection up until `shutdown`: connects, waits for it to close, reconnects
    /// at once and then with backoff. `on_connect` runs for each new connection (the
    /// keeper's or one a request opened).
    pub async fn keep(
        self: Arc<Self>,
        on_connect: impl Fn() + Send,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut attempt = 0u32;
        let mut rng = rand::rngs::StdRng::from_entropy();
        let mut seen: Option<usize> = None;
        let stopping = |s: &tokio::sync::watch::Receiver<bool>| *s.borrow();
        loop {
            if stopping(&shutdown) {
                break;
            }
            let conn = match self.current() {
                Some(c) => Some(c),
                None => match self.connection(false).await {
                    Ok(c) => Some(c),
                    Err(e) => {
                        let d = backoff(
                            attempt,
                            self.settings.backoff_initial,
                            self.settings.backoff_max,
                            &mut rng,
                        );
                        attempt = attempt.saturating_add(1);
                        tracing::warn!(error = %e, retry_in_ms = d.as_millis() as u64, "gateway connection failed");
                        tokio::select! {
                            _ = tokio::time::sleep(d) => {}
                            _ = self.wanted.notified() => {}
                            r = shutdown.changed() => if r.is_err() { break },
                        }
                        None
                    }
                },
            };
            if let Some(conn) = conn {
                attempt = 0;
                if seen != Some(conn.stable_id()) {
                    seen = Some(conn.stable_id());
                    on_connect();
                }
                tokio::select! {
                    reason = conn.closed() => {
                        tracing::warn!(reason = %reason, "gateway connection lost");
                    }
                    // A request opened a newer connection (or dropped this one).
                    _ = self.wanted.notified() => {}
                    r = shutdown.changed() => if r.is_err() { break },
                }
            }
        }
        if let Some(c) = self.current() {
            c.close(0u32.into(), b"box shutting down");
        }
        // Bounded: a head end that is gone must not hold up the shutdown.
        let _ = tokio::time::timeout(Duration::from_secs(1), self.endpoint.wait_idle()).await;
    }
}

use rand::SeedableRng;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_caps_and_jitters_within_the_upper_half() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let (i, m) = (Duration::from_millis(500), Duration::from_secs(60));
        for attempt in 0..40 {
            let exp = (i * 2u32.saturating_pow(attempt.min(20))).min(m);
            let d = backoff(attempt, i, m, &mut rng);
            assert!(d >= exp / 2 && d <= exp, "{attempt}: {d:?} vs {exp:?}");
        }
        let a: Vec<_> = (0..5).map(|_| backoff(10, i, m, &mut rng)).collect();
        assert!(a.windows(2).any(|w| w[0] != w[1]), "jitter varies");
    }

    #[test]
    fn connection_failures_are_told_from_request_failures() {
        use transport::QuicError as Q;
        for e in [
            Q::Connection(quinn::ConnectionError::Reset),
            Q::Connection(quinn::ConnectionError::TimedOut),
            Q::Connection(quinn::ConnectionError::LocallyClosed),
            Q::ApplicationClosed {
                code: 0,
                reason: "bye".into(),
            },
            Q::ShuttingDown,
            Q::Refused,
        ] {
            assert!(connection_level(&e), "{e}");
        }
        for e in [
            Q::PeerTimeout,
            Q::ServiceFailed,
            Q::StreamReset(9),
            Q::PeerBadFrame,
            Q::Stream("x".into()),
        ] {
            assert!(!connection_level(&e), "{e}");
        }
    }

    /// Every error [`Gateway::call`] gives reaches the flows as its kind, with the same text.
    #[test]
    fn gateway_errors_reach_the_flows_as_their_kind_with_the_same_text() {
        let t = Duration::from_secs(5);
        for (e, want) in [
            (
                GatewayError::Connect("x".into()),
                NetworkFailure::Unreachable("x".into()),
            ),
            (
                GatewayError::Request("x".into()),
                NetworkFailure::Failed("x".into()),
            ),
            (GatewayError::Timeout(t), NetworkFailure::Timeout(t)),
            (
                GatewayError::Malformed("x".into()),
                NetworkFailure::Malformed("x".into()),
            ),
        ] {
            let f = NetworkFailure::from(&e);
            assert_eq!(f, want);
            assert_eq!(f.to_string(), e.to_string());
        }
    }

    #[test]
    fn only_a_gateway_that_cannot_act_sends_the_request_on() {
        let err = |code| {
            Message::Error(proto::messages::ErrorMsg {
                code,
                reason: "x".into(),
                transaction_id: None,
            })
        };
        use proto::messages::ErrorCode as C;
        assert!(gateway_cannot_act(&err(C::Internal)));
        for c in [C::Busy, C::Replay, C::BadSignature, C::RateLimited] {
            assert!(!gateway_cannot_act(&err(c)), "{c:?}");
        }
        assert!(!gateway_cannot_act(&Message::CatalogRequest));
    }

    #[test]
    fn only_the_catalog_request_rides_0rtt() {
        assert!(replay_safe(&Message::CatalogRequest));
        assert!(!replay_safe(&Message::OfferRequest {
            merchant_id: "m".into(),
            item_id: "i".into()
        }));
    }
}
