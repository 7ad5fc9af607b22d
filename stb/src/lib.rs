//! stbd: the set-top box daemon
pub mod readers_cmd;
