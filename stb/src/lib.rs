//! stbd: the set-top box daemon.
//!
//! - [`config`]: the TOML configuration
//! - [`flow`]: the purchase flow and recovery decisions, sans-IO
//! - [`journal`]: the SQLite journal of every transaction step
//! - [`readers_cmd`]: `stbd readers`

pub mod config;
pub mod flow;
pub mod journal;
pub mod readers_cmd;
