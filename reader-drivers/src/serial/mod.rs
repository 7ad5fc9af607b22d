//! Serial Phoenix/Smartmouse driver over `tokio-serial`: ISO 7816-3 ATR, T=0, PPS.
