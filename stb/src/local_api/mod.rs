//! The local app API: other applications on the box (EPG, PPV app) ask for a payment over a
//! Unix socket speaking JSON lines, and get the result. The viewer still confirms on the TV:
//! a request becomes an offer popup like a catalog choice.
//!
//! Access: the socket file's mode (0660 by default) and group limit who can connect; each
//! connection's peer uid (SO_PEERCRED) must be the daemon's own or on the config's allow-list.
//!
//! - [`protocol`]: the request and response lines
//! - [`server`]: the listener and one task per connection

pub mod protocol;
pub mod server;
