//! The listener: binds the UDP endpoint, decides on every connection attempt at once (start
//! the handshake, ask for address validation with a QUIC Retry, drop it at a pending-handshake
//! bound, or refuse it at the connection limit: see [`admission`](super::admission)), runs one
//! task per connection, and shuts down gracefully.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use quinn::{Endpoint, Incoming};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::admission::{Admission, Decision, Limits, ServerStats};
use super::connection::{self, ConnContext};
use super::{
    AppCode, QuicError, Revocations, ServerTls, Service, TransportSettings, server_config,
};

/// A bound head-end QUIC server; [`Server::run`] serves until its shutdown signal.
pub struct Server {
    endpoint: Endpoint,
    ctx: Arc<ConnContext>,
}

/// The endpoint configuration that lets a restarted server reset its predecessor's
/// connections: a peer still holding a connection to the dead process gets a valid stateless
/// reset (RFC 9000 §10.3) on its next packet and reconnects at once, instead of waiting for
/// its idle timeout. Two things must survive the restart, both derived from this server's TLS
/// private key (the HMAC of it; the key itself never leaves the process):
/// - the stateless-reset key, so the restarted process computes the reset tokens the dead one
///   announced;
/// - the connection-id generator's key: quinn's default generator signs each connection id
///   it issues with a random per-process key and silently drops a short-header packet whose
///   id does not verify ("dropping packet with invalid CID") — before any reset is
///   considered. With a per-process key, every packet of the old connections is dropped and
///   the peer waits for its own deadline or idle timeout.
fn endpoint_config(tls: &ServerTls) -> quinn::EndpointConfig {
    use ring::hmac;
    let seed = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, b"purselink stateless reset key v1"),
        tls.identity.key.secret_der(),
    );
    let cid_key = hmac::sign(
        &hmac::Key::new(hmac::HMAC_SHA256, seed.as_ref()),
        b"purselink connection id key v1",
    );
    let cid_key = u64::from_be_bytes(cid_key.as_ref()[..8].try_into().expect("8 bytes"));
    let mut config =
        quinn::EndpointConfig::new(Arc::new(hmac::Key::new(hmac::HMAC_SHA256, seed.as_ref())));
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    config
}

impl Server {
    pub fn bind(
        addr: SocketAddr,
        tls: &ServerTls,
        settings: TransportSettings,
        service: Arc<dyn Service>,
        revocations: Revocations,
    ) -> Result<Self, QuicError> {
        let config = server_config(tls, &settings)?;
        let socket = std::net::UdpSocket::bind(addr)?;
        let endpoint = Endpoint::new(
            endpoint_config(tls),
            Some(config),
            socket,
            Arc::new(quinn::TokioRuntime),
        )?;
        Ok(Self {
            endpoint,
            ctx: Arc::new(ConnContext {
                service,
                admission: Admission::new(Limits::from_settings(&settings)),
                settings: Arc::new(settings),
                revocations,
            }),
        })
    }

    /// Live admission counters: handshakes pending, connections held, retries, refusals.
    pub fn stats(&self) -> ServerStats {
        ServerStats(self.ctx.admission.clone())
    }

    pub fn local_addr(&self) -> Result<SocketAddr, QuicError> {
        Ok(self.endpoint.local_addr()?)
    }

    /// The live revocation list (revoke a box without a restart).
    pub fn revocations(&self) -> Revocations {
        self.ctx.revocations.clone()
    }

    /// Serves until `shutdown` completes, then stops accepting, lets in-flight transactions
    /// finish within the grace period, closes every connection and waits for the endpoint to
    /// go idle.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let addr = self.endpoint.local_addr().ok();
        tracing::info!(
            ?addr,
            max_connections = self.ctx.settings.max_connections,
            max_pending_handshakes = self.ctx.settings.max_pending_handshakes,
            max_pending_per_source = self.ctx.settings.max_pending_per_source,
            handshake_timeout_ms = self.ctx.settings.handshake_timeout_ms,
            retry_threshold = self.ctx.settings.retry_threshold,
            "head end listening"
        );
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                incoming = self.endpoint.accept() => {
                    let Some(incoming) = incoming else { break };
                    if let Some(task) = self.admit(incoming, &stop_rx) {
                        conns.spawn(task);
                    }
                }
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
            }
        }

        tracing::info!(tasks = conns.len(), "head end shutting down");
        // New handshakes are refused from here on.
        self.endpoint.set_server_config(None);
        let _ = stop_tx.send(true);
        let grace = self.ctx.settings.shutdown_grace();
        let drained = tokio::time::timeout(grace + grace / 2, async {
            while conns.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            conns.abort_all();
        }
        self.endpoint
            .close(AppCode::ShuttingDown.varint(), b"head end shutting down");
        // Lets the close reach the peers; bounded in case one never answers.
        let _ = tokio::time::timeout(grace, self.endpoint.wait_idle()).await;
        tracing::info!("head end stopped");
    }

    /// Applies the admission decision to one connection attempt; returns the connection task
    /// to run when the handshake may start.
    fn admit(
        &self,
        incoming: Incoming,
        stop: &watch::Receiver<bool>,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let remote = incoming.remote_address();
        let admission = &self.ctx.admission;
        match admission.decide(remote.ip(), incoming.remote_address_validated()) {
            Decision::Accept(slot) => {
                return Some(connection::run(
                    incoming,
                    slot,
                    self.ctx.clone(),
                    stop.clone(),
                ));
            }
            // Stateless: costs one small packet, keeps nothing until the client comes back.
            Decision::Retry => {
                if let Err(e) = incoming.retry() {
                    // Only an attempt that already carries a token can't be retried, and
                    // `decide` asks for a Retry only without one; drop it rather than guess.
                    e.into_incoming().ignore();
                }
            }
            Decision::Defer(why) => {
                if let Some(suppressed) = admission.may_log(remote.ip()) {
                    tracing::warn!(%remote, reason = %why, suppressed, action = "dropped, the client retransmits", "handshake refused");
                }
                incoming.ignore();
            }
            Decision::Refuse(why) => {
                if let Some(suppressed) = admission.may_log(remote.ip()) {
                    tracing::warn!(%remote, reason = %why, suppressed, "connection refused");
                }
                incoming.refuse();
            }
        }
        None
    }
}
