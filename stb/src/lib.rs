//! stbd: the set-top box daemon. The flows it drives (purchase, load, recovery decisions)
//! are the sans-IO crate [`stb_flow`].
//!
//! - [`config`]: the TOML configuration
//! - [`journal`]: the SQLite journal of every transaction step
//! - [`daemon`]: the tokio shell (gateway connection, reader, event loop, recovery)
//! - [`local_api`]: the Unix-socket JSON-lines API for other apps on the box
//! - [`readers_cmd`]: `stbd readers`

pub mod config;
pub mod daemon;
pub mod journal;
pub mod local_api;
pub mod readers_cmd;
