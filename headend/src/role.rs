//! The one seam between head-end roles: a [`Role`] answers a [`Message`] from a [`Caller`].
//! In all-in-one the gateway calls the payment and merchant roles in process; split across
//! machines, [`RemoteRole`] carries the same messages over QUIC with the same framing, and
//! [`serve`] puts any role behind the QUIC server.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::messages::{ErrorCode, Message};
use tokio::sync::Mutex;

use crate::quic::{
    BoxFuture, ClientTls, Peer, QuicClient, Service, ServiceError, TransportSettings,
};

/// Who is asking: a set-top box (identity from its certificate) or another role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    Box(String),
    Role(String),
}

pub trait Role: Send + Sync + 'static {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message>;
}

/// A refusal with its reason, logged with the transaction id (when there is one) by the
/// role refusing (tracing's target names it).
pub fn refuse(code: ErrorCode, reason: impl Into<String>, txid: Option<&str>) -> Message {
    let reason = reason.into();
    tracing::warn!(txid = txid.unwrap_or("-"), ?code, %reason, "refused");
    Message::error(code, reason, txid)
}

/// The answer when the journal cannot be written: nothing was done, so a retry is safe.
pub fn journal_failed(e: crate::journal::JournalError, txid: Option<&str>) -> Message {
    tracing::error!(txid = txid.unwrap_or("-"), error = %e, "journal write failed; nothing done");
    Message::error(
        ErrorCode::Internal,
        "journal unavailable; nothing was done, retry",
        txid,
    )
}

/// Encodes a message as a frame payload.
pub fn to_payload(msg: &Message) -> Vec<u8> {
    msg.to_payload()
}

/// Puts a role behind the QUIC server: decode, handle, encode. A payload that is not a
/// message gets an `Error { Malformed }` answer naming what was wrong.
pub fn serve(role: Arc<dyn Role>) -> Arc<dyn Service> {
    Arc::new(RoleService(role))
}

struct RoleService(Arc<dyn Role>);

impl Service for RoleService {
    fn call(
        &self,
        peer: Arc<Peer>,
        request: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, ServiceError>> {
        Box::pin(async move {
            let caller = match peer.box_id() {
                Some(b) => Caller::Box(b.as_str().to_string()),
                None => Caller::Role(format!("{:?}", peer.identity)),
            };
            let answer = match Message::from_payload(&request) {
                Ok(msg) => self.0.handle(caller, msg).await,
                Err(e) => {
                    tracing::warn!(?caller, error = %e, "request refused: not a message");
                    Message::error(
                        ErrorCode::Malformed,
                        format!("not a Purselink message: {e}"),
                        None,
                    )
                }
            };
            Ok(to_payload(&answer))
        })
    }
}

/// A role on another machine, reached over QUIC with this process's role certificate.
/// Connects on first use and reconnects after a failure.
pub struct RemoteRole {
    name: String,
    addr: SocketAddr,
    server_name: String,
    tls: ClientTls,
    settings: TransportSettings,
    client: Mutex<Option<QuicClient>>,
}

impl RemoteRole {
    pub fn new(
        name: &str,
        addr: SocketAddr,
        server_name: &str,
        tls: ClientTls,
        settings: TransportSettings,
    ) -> Self {
        Self {
            name: name.into(),
            addr,
            server_name: server_name.into(),
            tls,
            settings,
            client: Mutex::new(None),
        }
    }

    async fn call(&self, msg: &Message) -> Result<Message, String> {
        let client = {
            let mut slot = self.client.lock().await;
            match &*slot {
                Some(c) => c.clone(),
                None => {
                    let c = QuicClient::connect(
                        &self.tls,
                        &self.settings,
                        self.addr,
                        &self.server_name,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                    *slot = Some(c.clone());
                    c
                }
            }
        };
        match client.call(&to_payload(msg)).await {
            Ok(bytes) => Message::from_payload(&bytes).map_err(|e| e.to_string()),
            Err(e) => {
                // Drop the connection so the next call reconnects.
                *self.client.lock().await = None;
                Err(e.to_string())
            }
        }
    }
}

impl Role for RemoteRole {
    fn handle(&self, _caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            match self.call(&msg).await {
                Ok(m) => m,
                Err(e) => {
                    tracing::warn!(role = %self.name, addr = %self.addr, error = %e, "role unreachable");
                    Message::error(
                        ErrorCode::Busy,
                        format!("{} is unreachable ({e}); try again", self.name),
                        None,
                    )
                }
            }
        })
    }
}
