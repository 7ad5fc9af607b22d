//! stbd: the set-top box daemon
