//! The head end's view of the QUIC transport: everything of the `transport` crate (shared with
//! the set-top box), plus the load driver the benchmarks share.

pub use transport::*;
