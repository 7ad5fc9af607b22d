//! Purselink's shared core: the purse card application, the security card (PSAM), the host
//! security module, their cryptography, and the wire messages and framing every hop speaks.
//!
//! Sans-IO, in the manner of quinn-proto: no tokio, no sockets, no clocks. The callers pass
//! time and randomness in, and own all IO — except [`secret`], the one place every crate
//! writes and checks its secret files, so that rule is written once.

pub mod apdu;
pub mod card;
pub mod clearing;
pub mod codec;
pub mod crypto;
pub mod frame;
pub mod hotlist;
pub mod hsm;
pub mod messages;
pub mod money;
pub mod provider;
pub mod psam;
pub mod purse;
pub mod secret;
pub mod security_card;
pub mod transfer;
