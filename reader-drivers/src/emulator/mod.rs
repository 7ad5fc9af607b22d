//! Reader emulators that put a [`proto::apdu::CardApplication`] on a real stack: vsmartcard's
//! vpcd protocol (so pcscd sees the card) and a Phoenix/Smartmouse reader on a pty (for the
//! serial driver), whose card speaks T=0 or T=1 ([`t1card`]).

pub mod phoenix;
pub mod t1card;
pub mod vpcd;
