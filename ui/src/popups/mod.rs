//! Popups drawn over the current screen; while one is open it takes every key.
//!
//! `offer` is the confirmation popup (the explicit confirm step before any payment); `info`
//! shows reader/card details and the key legend.

pub mod info;
pub mod offer;
