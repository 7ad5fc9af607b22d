//! One connection: finish the handshake, name the peer from its certificate, refuse revoked
//! boxes, then accept its streams (each a task) until it closes or the server shuts down.

use std::sync::Arc;

use quinn::Incoming;
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::task::JoinSet;

use super::identity::peer_of;
use super::{AppCode, Revocations, Service, TransportSettings, classify_connection, handler};

pub(crate) struct ConnContext {
    pub service: Arc<dyn Service>,
    pub settings: Arc<TransportSettings>,
    pub revocations: Revocations,
}

pub(crate) async fn run(
    incoming: Incoming,
    _permit: OwnedSemaphorePermit,
    ctx: Arc<ConnContext>,
    mut stop: watch::Receiver<bool>,
) {
    let remote = incoming.remote_address();
    let connecting = match incoming.accept() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(%remote, error = %e, "connection not accepted");
            return;
        }
    };
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(%remote, reason = %classify_connection(e), "handshake refused");
            return;
        }
    };
    let peer = match peer_of(&conn) {
        Ok(peer) => Arc::new(peer),
        Err(e) => {
            tracing::warn!(%remote, reason = %e, "connection refused: no identity");
            conn.close(AppCode::NoIdentity.varint(), e.to_string().as_bytes());
            return;
        }
    };
    if let Some(why) = ctx.revocations.check(&peer) {
        tracing::warn!(%remote, peer = ?peer.identity, serial = %peer.serial, reason = %why, "connection refused: revoked");
        conn.close(AppCode::BoxRevoked.varint(), why.as_bytes());
        return;
    }
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
