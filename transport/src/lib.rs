//! Purselink's QUIC transport, shared by the set-top box and every head-end role: quinn + rustls (ring), TLS 1.3 only, ALPN `purselink/1`,
//! mutual TLS against the operator CA, one bidirectional stream per transaction carrying a
//! `proto::frame` each way per step.
//!
//! - [`config`]: server/client configs and transport limits
//! - [`identity`]: peer certificate → [`BoxId`], revocation list
//! - [`role_verifier`]: the client's check that the server is the role it means to reach
//! - [`server`] (listener) → `admission` (who may handshake, who holds a connection slot) →
//!   `connection` (per connection) → `handler` (per stream)
//! - [`call`](mod@call): the client side, [`call()`] for one transaction

mod admission;
pub mod call;
pub mod config;
mod connection;
mod error;
pub mod frame_io;
mod handler;
pub mod identity;
pub mod logging;
pub mod pki;
pub mod role_verifier;
pub mod server;
mod service;

/// The one application protocol this transport speaks.
pub const ALPN: &[u8] = b"purselink/1";

pub use admission::{AdmissionStats, ServerStats};
pub use call::{QuicClient, TxnStream, call, call_with_max, client_endpoint, connect};
pub use config::{
    ClientTls, ServerTls, TlsIdentity, TransportSettings, client_config, load_certs, server_config,
};
pub use error::{AppCode, QuicError, classify_connection, classify_stream_code};
pub use identity::{
    BOX_URI_PREFIX, BoxId, InvalidBoxId, Peer, PeerIdentity, ROLE_URI_PREFIX, RevocationConfig,
    Revocations,
};
pub use server::Server;
pub use service::{BoxFuture, Service, ServiceError};
