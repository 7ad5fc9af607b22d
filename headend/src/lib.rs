//! Purselink head end: gateway, payment, merchant, bank, load roles

pub mod cli;
pub mod notify;
pub mod pki;
pub mod quic;
