//! Purselink head end: the gateway and the back-end roles (payment, merchant, bank, load),
//! their journals, and the QUIC transport between them.
//!
//! - [`gateway`]: the cable head end server — boxes' messages in, routed to the roles (a file
//!   per operation; [`gateway::load`] routes the load conversation);
//! - [`payment`]: the payment server with its security-card pool;
//! - [`merchant`]: the cable catalog and internet merchants;
//! - [`bank`]: the bank server (accounts with a PIN);
//! - [`funds`]: what bank and load server share: accounts, holds, issuer float;
//! - [`load`]: the load server with its HSM, and pre-funded accounts;
//! - [`role`]: the one seam between roles (in process or over QUIC);
//! - [`assembly`]: builds the roles a config asks for and serves them;
//! - [`journal`], [`config`], [`quic`], [`pki`], [`notify`], [`cli`].

pub mod assembly;
pub mod bank;
pub mod clearing;
pub mod cli;
pub mod config;
pub mod funds;
pub mod gateway;
pub mod hotlist;
pub mod journal;
pub mod limits;
pub mod load;
pub mod merchant;
pub mod notify;
pub mod outbox;
pub mod payment;
pub mod pki;
pub mod quic;
pub mod role;
pub mod status;
pub mod test_hook;

/// The private PostgreSQL the journal's tests run on (shared with the integration tests).
#[cfg(test)]
#[path = "../tests/pg_rig/mod.rs"]
pub(crate) mod pg_rig;
