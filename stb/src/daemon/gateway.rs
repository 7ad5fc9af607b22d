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

/// What the client needs, loaded from the config's files.
pub struct GatewaySettings {
    pub addr: String,
    pub server_name: String,
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
    let mut tls = transport::ClientTls::new(ca, identity);
    tls.early_data = true;
    let settings = transport::TransportSettings {
        keep_alive_secs: s.keep_alive.as_secs().max(1),
        idle_timeout_secs: s.idle_timeout.as_secs().max(2),
        ..Default::default()
    };
    transport::client_config(&tls, &settings).map_err(|e| GatewayError::Tls(e.to_string()))
}

/// The next reconnect delay: `initial · 2^attempt`, capped at `max`, then a random point in
/// its upper half, so a fleet of boxes that lost the head end together does not come back in
/// lockstep.
pub fn backoff(attempt: u32, initial: Duration, max: Duration, rng: &mut impl Rng) -> Duration {
    let exp = initial
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = exp / 2;
    half + Duration::from_nanos(rng.gen_range(0..=half.as_nanos().min(u64::MAX as u128) as u64))
}

/// Whether a request may be sent as 0-RTT early data (safe to replay).
pub fn replay_safe(m: &Message) -> bool {
    matches!(m, Message::CatalogRequest)
}

pub struct Gateway {
    endpoint: Endpoint,
    settings: GatewaySettings,
    conn: Mutex<Option<Connection>>,
    /// Wakes the keeper when a request found no connection.
    wanted: Notify,
}

impl Gateway {
    pub fn new(
        config: quinn::ClientConfig,
        settings: GatewaySettings,
    ) -> Result<Arc<Self>, GatewayError> {
        let bind: SocketAddr = ([0, 0, 0, 0], 0).into();
        let mut endpoint = Endpoint::client(bind)
            .map_err(|e| GatewayError::Connect(format!("UDP socket: {e}")))?;
        endpoint.set_default_client_config(config);
        Ok(Arc::new(Self {
            endpoint,
            settings,
            conn: Mutex::new(None),
            wanted: Notify::new(),
        }))
    }

    fn current(&self) -> Option<Connection> {
        let g = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        g.as_ref().filter(|c| c.close_reason().is_none()).cloned()
    }

    fn resolve(&self) -> Result<SocketAddr, GatewayError> {
        use std::net::ToSocketAddrs;
        self.settings
            .addr
            .to_socket_addrs()
            .map_err(|e| GatewayError::Connect(format!("{}: {e}", self.settings.addr)))?
            .next()
            .ok_or_else(|| GatewayError::Connect(format!("{}: no address", self.settings.addr)))
    }

    /// Connects; with `early` a resumed session may use 0-RTT.
    async fn connect(&self, early: bool) -> Result<Connection, GatewayError> {
        let addr = self.resolve()?;
        let connecting = self
            .endpoint
            .connect(addr, &self.settings.server_name)
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
    pub async fn call(&self, msg: &Message) -> Result<Message, GatewayError> {
        let t = self.settings.request_timeout;
        match tokio::time::timeout(t, self.call_inner(msg)).await {
            Ok(r) => r,
            Err(_) => Err(GatewayError::Timeout(t)),
        }
    }

    async fn call_inner(&self, msg: &Message) -> Result<Message, GatewayError> {
        let conn = match self.current() {
            Some(c) => c,
            None => {
                self.wanted.notify_one();
                self.connect(replay_safe(msg)).await?
            }
        };
        let bytes = transport::call(&conn, &msg.to_payload())
            .await
            .map_err(|e| GatewayError::Request(e.to_string()))?;
        Message::from_payload(&bytes).map_err(|e| GatewayError::Malformed(e.to_string()))
    }

    /// Keeps the connection up until `shutdown`: connects, waits for it to close, reconnects
    /// with backoff. `on_connect` runs after each successful (re)connection.
    pub async fn keep(
        self: Arc<Self>,
        on_connect: impl Fn() + Send,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let mut attempt = 0u32;
        let mut rng = rand::rngs::StdRng::from_entropy();
        loop {
            if *shutdown.borrow() {
                break;
            }
            let conn = match self.current() {
                Some(c) => Some(c),
                None => match self.connect(false).await {
                    Ok(c) => {
                        attempt = 0;
                        on_connect();
                        Some(c)
                    }
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
                            _ = shutdown.changed() => {}
                        }
                        None
                    }
                },
            };
            if let Some(conn) = conn {
                tokio::select! {
                    reason = conn.closed() => {
                        tracing::warn!(reason = %reason, "gateway connection lost");
                    }
                    _ = shutdown.changed() => {}
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
    fn only_the_catalog_request_rides_0rtt() {
        assert!(replay_safe(&Message::CatalogRequest));
        assert!(!replay_safe(&Message::OfferRequest {
            merchant_id: "m".into(),
            item_id: "i".into()
        }));
    }
}
