//! Reader emulators that put a [`proto::apdu::CardApplication`] on a real stack: vsmartcard's
//! vpcd protocol (so pcscd sees the card) and a Phoenix reader on a pty (for the serial driver).

pub mod phoenix;
pub mod vpcd;
