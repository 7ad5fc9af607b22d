//! Serial Phoenix/Smartmouse reader driver over `tokio-serial`.
//!
//! Sans-IO cores, each tested without IO: [`atr`] (ISO 7816-3 answer to reset), [`t0`] (T=0
//! procedure bytes and PPS), [`wire`] (parity marks in the byte stream), [`line`] (reset and
//! card-detect wiring behind the [`line::LineControl`] seam). [`driver`] is the thin tokio
//! shell implementing the Reader API.

pub mod atr;
pub mod driver;
pub mod line;
pub mod t0;
pub mod wire;

pub use driver::{LinesFactory, SerialConfig, SerialDriver, SerialSession};
pub use line::{CardDetect, InputLine, LineConfig, LineControl, OutputLine};
