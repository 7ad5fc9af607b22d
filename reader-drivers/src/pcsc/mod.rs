//! PC/SC driver over the `pcsc` crate (USB CCID readers through pcscd).
