//! The fleet simulator and the scale benchmarks (issue 8): many simulated set-top boxes in one
//! process against a head end on loopback, optionally through a simulated WAN.
//!
//! - [`fleet`]: device certificates, connections over shared client sockets, purchases timed
//!   per flow, open-loop (target rate) and closed-loop runs;
//! - [`deploy`]: the head ends to run against (in process, split over WAN proxies, a child
//!   `headend` process) and the value-conservation check;
//! - [`stats`]: histograms (p50/p99/p99.9), errors by reason, VmRSS;
//! - [`bench`]: `loadgen bench` and `loadgen fleet`.
//!
//! The binary is `src/bin/loadgen.rs`. Figures are printed, never asserted.

pub mod bench;
pub mod deploy;
pub mod fleet;
pub mod stats;
