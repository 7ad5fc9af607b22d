//! The operator PKI the `headend pki ...` subcommands and `init-demo` use: the transport's
//! ([`transport::pki`]), next to the identity rules that check what it issues.

pub use transport::pki::*;
