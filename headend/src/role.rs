//! The one seam between head-end roles: a [`Role`] answers a [`Message`] from a [`Caller`].
//! In all-in-one the gateway calls the payment and merchant roles in process; split across
//! machines, [`RemoteRole`] carries the same messages over QUIC with the same framing, and
//! [`serve`] puts any role behind the QUIC server.

use std::net::SocketAddr;
use std::sync::Arc;

use proto::messages::{ErrorCode, Message};

use crate::config::Callers;
use crate::quic::{
    BoxFuture, ClientTls, Peer, PeerIdentity, QuicClient, Service, ServiceError, TransportSettings,
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

/// The answer when the journal cannot be written: this role did not record the step. It
/// may have acted before (another role may already have answered it), so the answer says
/// only what is true either way: retry, and the retry gets the same answer (every step is
/// idempotent by its transaction id).
pub fn journal_failed(e: crate::journal::JournalError, txid: Option<&str>) -> Message {
    tracing::error!(txid = txid.unwrap_or("-"), error = %e, "journal write failed; step not recorded");
    Message::error(
        ErrorCode::Internal,
        "journal unavailable; the step was not recorded here: retry it (a retry gets the same answer)",
        txid,
    )
}

/// The idempotency rule for a step already answered: a repeat gets the stored answer only
/// when it is the message that was answered (`first`, when it was kept); anything else under
/// the transaction id is refused as a replay. `what` names the message ("debit response").
pub fn repeat<T: PartialEq>(
    first: Option<&T>,
    now: &T,
    stored: &Message,
    what: &str,
    txid: &str,
) -> Message {
    if first.is_none_or(|f| f == now) {
        tracing::info!(txid, what, "retried: same answer");
        stored.clone()
    } else {
        refuse(
            ErrorCode::Replay,
            format!("transaction {txid} was answered on another {what}"),
            Some(txid),
        )
    }
}

/// Opens a message-layer body (FIG. 8) under the transaction's key, or the refusal to send:
/// a body that does not open is `BadSignature`, named by `what`.
#[allow(clippy::result_large_err)] // the refusal is the answer, relayed as is
pub fn open_body<T: serde::Serialize + serde::de::DeserializeOwned>(
    body: &proto::messages::Protected<T>,
    key: Option<&proto::crypto::DesKey>,
    what: &str,
    txid: &str,
) -> Result<T, Message> {
    body.open(key)
        .map_err(|e| refuse(ErrorCode::BadSignature, format!("{what}: {e}"), Some(txid)))
}

/// Encodes a message as a frame payload.
pub fn to_payload(msg: &Message) -> Vec<u8> {
    msg.to_payload()
}

/// Who a role serves over QUIC: set-top boxes (the gateway), or the roles its config names
/// ([`Callers`]). Checked on every request, before the message is looked at.
#[derive(Debug, Clone)]
pub enum Access {
    /// Set-top boxes with device certificates; every other peer is refused.
    Boxes,
    /// The listed roles (by role name or certificate fingerprint); boxes and every other
    /// peer are refused.
    Roles(Callers),
}

impl Access {
    /// The caller a peer is, or why it may not call.
    fn caller(&self, peer: &Peer) -> Result<Caller, String> {
        match (self, &peer.identity) {
            (Self::Boxes, PeerIdentity::Box(b)) => Ok(Caller::Box(b.as_str().to_string())),
            (Self::Boxes, id) => Err(format!(
                "the gateway serves set-top boxes only, not {}",
                describe(id)
            )),
            (Self::Roles(_), PeerIdentity::Box(b)) => Err(format!(
                "box {b}: set-top boxes reach this role through the gateway"
            )),
            (Self::Roles(c), PeerIdentity::Role(name)) if c.allows(name, &peer.fingerprint) => {
                Ok(Caller::Role(name.clone()))
            }
            (Self::Roles(c), PeerIdentity::Other(name)) if c.allows("", &peer.fingerprint) => {
                Ok(Caller::Role(name.clone()))
            }
            (Self::Roles(_), id) => Err(format!(
                "{} (certificate sha256:{}) is not among this role's callers",
                describe(id),
                peer.fingerprint
            )),
        }
    }
}

fn describe(id: &PeerIdentity) -> String {
    match id {
        PeerIdentity::Box(b) => format!("box {b}"),
        PeerIdentity::Role(r) => format!("role {r}"),
        PeerIdentity::Other(n) => format!("certificate {n} (no role name)"),
    }
}

/// Puts a role behind the QUIC server: check the peer against `access`, decode, handle,
/// encode. A peer not allowed gets `Error { Forbidden }` naming why; a payload that is not
/// a message gets `Error { Malformed }` naming what was wrong.
pub fn serve(role: Arc<dyn Role>, access: Access) -> Arc<dyn Service> {
    Arc::new(RoleService { role, access })
}

struct RoleService {
    role: Arc<dyn Role>,
    access: Access,
}

impl Service for RoleService {
    fn call(
        &self,
        peer: Arc<Peer>,
        request: Vec<u8>,
    ) -> BoxFuture<'_, Result<Vec<u8>, ServiceError>> {
        Box::pin(async move {
            let answer = match self.access.caller(&peer) {
                Err(why) => {
                    tracing::warn!(peer = %peer.remote, reason = %why, "request refused: peer not allowed");
                    Message::error(ErrorCode::Forbidden, why, None)
                }
                Ok(caller) => match Message::from_payload(&request) {
                    Ok(msg) => self.role.handle(caller, msg).await,
                    Err(e) => {
                        tracing::warn!(?caller, error = %e, "request refused: not a message");
                        Message::error(
                            ErrorCode::Malformed,
                            format!("not a Purselink message: {e}"),
                            None,
                        )
                    }
                },
            };
            Ok(to_payload(&answer))
        })
    }
}

/// A role on another machine, reached over QUIC with this process's role certificate.
///
/// Connects on first use. Every call has a deadline (`call_timeout_ms`, covering the
/// connect and the answer): past it, or on any connection-level failure, the connection is
/// dropped so the next call reconnects at once rather than waiting for the idle timeout —
/// a restarted peer answers the dead connection's next packet with a stateless reset (see
/// `transport::server`). A call that failed because the connection was already dead (lost,
/// reset, closed) is retried once on a fresh connection: every message between roles is
/// idempotent on its transaction id.
pub struct RemoteRole {
    name: String,
    addr: SocketAddr,
    server_name: String,
    tls: ClientTls,
    settings: TransportSettings,
    /// The connection, with a generation number so a failure drops only the connection it
    /// happened on. Never held across an await: dropping a connection never waits.
    client: std::sync::Mutex<(u64, Option<QuicClient>)>,
    /// One connect at a time; callers wait for it within their own deadline.
    connecting: tokio::sync::Mutex<()>,
}

/// Why a call to a remote role failed.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("connect: {0}")]
    Connect(crate::quic::QuicError),
    #[error("{0}")]
    Call(crate::quic::QuicError),
    #[error("no answer within {0:?}")]
    Deadline(std::time::Duration),
    #[error("answer is not a message: {0}")]
    Malformed(proto::messages::WireError),
}

impl CallError {
    /// The connection was dead before (or without) the peer answering: a fresh connection
    /// may succeed at once.
    fn connection_lost(&self) -> bool {
        use crate::quic::QuicError as Q;
        matches!(
            self,
            Self::Call(
                Q::Connection(_) | Q::ShuttingDown | Q::Superseded(_) | Q::ApplicationClosed { .. }
            )
        )
    }
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
            client: std::sync::Mutex::new((0, None)),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// The current connection, if it is still open.
    fn current(&self) -> Option<(u64, QuicClient)> {
        let slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        slot.1
            .as_ref()
            .filter(|c| c.connection().close_reason().is_none())
            .map(|c| (slot.0, c.clone()))
    }

    async fn connection(&self) -> Result<(u64, QuicClient), CallError> {
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c); // connected while we waited
        }
        let c = QuicClient::connect(&self.tls, &self.settings, self.addr, &self.server_name)
            .await
            .map_err(CallError::Connect)?;
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        slot.0 += 1;
        slot.1 = Some(c.clone());
        Ok((slot.0, c))
    }

    /// Drops connection `generation` (if it is still the current one). Never waits: a
    /// connect in progress (holding `connecting` up to its caller's deadline) does not hold
    /// up a caller whose deadline has passed.
    fn drop_connection(&self, generation: u64) {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        if slot.0 == generation {
            if let Some(c) = slot.1.take() {
                c.connection()
                    .close(crate::quic::AppCode::Closed.varint(), b"call failed");
            }
        }
    }

    /// One attempt, ending by `deadline` at the latest.
    async fn call_once(
        &self,
        msg: &Message,
        deadline: tokio::time::Instant,
    ) -> Result<Message, CallError> {
        let mut generation = None;
        let attempt = async {
            let (g, client) = self.connection().await?;
            generation = Some(g);
            let bytes = client
                .call(&to_payload(msg))
                .await
                .map_err(CallError::Call)?;
            Message::from_payload(&bytes).map_err(CallError::Malformed)
        };
        let result = match tokio::time::timeout_at(deadline, attempt).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Deadline(self.settings.call_timeout())),
        };
        if let (Err(_), Some(g)) = (&result, generation) {
            self.drop_connection(g);
        }
        result
    }

    /// The call and its one retry share one deadline: a call failed because another call's
    /// deadline dropped the shared connection (the peer stopped answering) is not given a
    /// fresh one, so no caller waits longer than `call_timeout_ms`.
    async fn call(&self, msg: &Message) -> Result<Message, CallError> {
        let deadline = tokio::time::Instant::now() + self.settings.call_timeout();
        match self.call_once(msg, deadline).await {
            Err(e) if e.connection_lost() => {
                tracing::info!(role = %self.name, addr = %self.addr, error = %e, "connection to role lost; reconnecting");
                self.call_once(msg, deadline).await
            }
            other => other,
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
                        // The cause (TLS, address) is in the log above, not for the caller.
                        format!("{} is unreachable; try again", self.name),
                        None,
                    )
                }
            }
        })
    }
}
