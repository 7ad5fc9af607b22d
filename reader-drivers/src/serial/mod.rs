//! Serial Phoenix/Smartmouse reader driver over `tokio-serial`.
//!
//! Sans-IO cores, each tested without IO: [`atr`] (ISO 7816-3 answer to reset, read the way
//! field readers read it), [`t0`] (T=0 procedure bytes and PPS), [`t1`] (T=1 blocks, chaining,
//! S-blocks, error recovery), [`wire`] (parity marks in the byte stream), [`line`] (reset and
//! card-detect wiring, and where the modem lines are). [`driver`] is the thin tokio shell
//! implementing the Reader API.

pub mod atr;
pub mod driver;
pub mod line;
pub mod t0;
pub mod t1;
pub mod wire;

pub use driver::{
    LinesFactory, PpsPolicy, Profile, SerialCardInfo, SerialConfig, SerialDriver, SerialSession,
};
pub use line::{CardDetect, InputLine, LineConfig, LineControl, ModemLines, OutputLine};
