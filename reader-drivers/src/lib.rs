//! Reader API and drivers: PC/SC (USB CCID via pcscd), serial Phoenix/Smartmouse, and the
//! in-process virtual card; plus the `vcard` virtual purse card, the virtual security card
//! ([`vpsam`]) and their reader emulators.

pub mod api;
pub mod emulator;
pub mod pcsc;
pub mod serial;
pub mod vcard;
pub mod virtual_driver;
pub mod vpsam;

pub use api::{
    CardPresence, CardSession, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo, transmit_whole,
};
