//! One connection: finish the handshake within the handshake timeout, name the peer from its
//! certificate, refuse revoked boxes, take a connection slot (only now: a handshake never
//! holds one), then accept its streams (each a task) until it closes or the server shuts down.

use std::net::SocketAddr;
use std::sync::Arc;

use quinn::Incoming;
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::admission::{Admission, PendingSlot};
use super::identity::peer_of;
use super::{AppCode, Revocations, Service, TransportSettings, classify_connection, handler};

pub(crate) struct ConnContext {
    pub service: Arc<dyn Service>,
    pub settings: Arc<TransportSettings>,
    pub revocations: Revocations,
    pub admission: Arc<Admission>,
}

/// Logs a handshake that ended without a connection: at most one line per source per interval
/// (an outsider can fail handshakes as fast as it can send), fields first.
fn log_failure(admission: &Admission, remote: SocketAddr, reason: &dyn std::fmt::Display) {
    admission.handshake_failed();
    if let Some(suppressed) = admission.may_log(remote.ip()) {
        tracing::warn!(%remote, %reason, suppressed, "handshake refused");
    }
}

pub(crate) async fn run(
    incoming: Incoming,
    pending: PendingSlot,
    ctx: Arc<ConnContext>,
    mut stop: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let admission = &ctx.admission;
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => return log_failure(admission, remote, &e),
    };
    // Dropping `connecting` (timeout, shutdown) closes the half-made connection at once, and
    // `pending` frees its slot.
    let timeout = ctx.settings.handshake_timeout();
    let handshake = tokio::select! {
        done = tokio::time::timeout(timeout, connecting) => done,
        _ = stop.changed() => return,
        // The pending pool was full and this handshake, old and from a busy source, gave
        // its place to a client from a quieter one.
        _ = pending.evicted() => {
            if let Some(suppressed) = admission.may_log(remote.ip()) {
                tracing::warn!(%remote, suppressed, "handshake dropped: its place went to a less busy source");
            }
            return;
        }
    };
    let conn = match handshake {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => return log_failure(admission, remote, &classify_connection(e)),
        Err(_) => {
            admission.handshake_timed_out();
            if let Some(suppressed) = admission.may_log(remote.ip()) {
                tracing::warn!(%remote, timeout_ms = timeout.as_millis() as u64, suppressed, "handshake timed out");
            }
            return;
        }
    };
    let peer = match peer_of(&conn) {
        Ok(peer) => Arc::new(peer),
        Err(e) => {
            log_failure(admission, remote, &format_args!("no identity: {e}"));
            conn.close(AppCode::NoIdentity.varint(), e.to_string().as_bytes());
            return;
        }
    };
    if let Some(why) = ctx.revocations.check(&peer) {
        admission.handshake_failed();
        if let Some(suppressed) = admission.may_log(remote.ip()) {
            tracing::warn!(%remote, peer = ?peer.identity, serial = %peer.serial, reason = %why, suppressed, "connection refused: revoked");
        }
        conn.close(AppCode::BoxRevoked.varint(), why.as_bytes());
        return;
    }
    // Authenticated: only now does the connection count against `max_connections`.
    let _slot = match pending.establish() {
        Ok(slot) => slot,
        Err(why) => {
            if let Some(suppressed) = admission.may_log(remote.ip()) {
                tracing::warn!(%remote, peer = ?peer.identity, reason = %why, suppressed, "connection refused");
            }
            conn.close(AppCode::ConnectionLimit.varint(), why.as_str().as_bytes());
            return;
        }
    };
    tracing::info!(%remote, peer = ?peer.identity, serial = %peer.serial, "connection established");

    let mut streams = JoinSet::new();
    loop {
        tokio::select! {
            // Shutdown asked (or the server went away): stop taking transactions.
            _ = stop.changed() => break,
            accepted = conn.accept_bi() => match accepted {
                Ok((send, recv)) => {
                    streams.spawn(handler::serve_stream(
                        peer.clone(),
                        send,
                        recv,
                        ctx.service.clone(),
                        ctx.settings.clone(),
                    ));
                }
                Err(e) => {
                    tracing::info!(%remote, peer = ?peer.identity, reason = %classify_connection(e), "connection closed");
                    return;
                }
            },
            // Reap finished streams so the set stays as small as the stream limit.
            Some(_) = streams.join_next(), if !streams.is_empty() => {}
        }
    }
    // In-flight transactions get the grace period; the rest are cut off by the close.
    let drained = tokio::time::timeout(ctx.settings.shutdown_grace(), async {
        while streams.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(%remote, peer = ?peer.identity, left = streams.len(), "shutdown grace over, cutting transactions off");
    }
    conn.close(AppCode::ShuttingDown.varint(), b"head end shutting down");
}
