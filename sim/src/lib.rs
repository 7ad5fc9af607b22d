//! Purselink's simulators, load generators and benchmarks (none of it is in `headend`), and
//! its own chaos test (issue 11, "Must show"): a split head end of real role
//! processes, real `stbd` boxes driven through their TV and local app API, and a simulated
//! fleet, under SIGKILLs of every role and of boxes mid-transaction; then an audit of value
//! from the raw journals and card files.
//!
//! - [`deploy`]: the deployment (per-role configurations and certificates, merchants,
//!   accounts, vouchers) and the role processes (start, READY, SIGKILL, restart);
//! - [`stbd`]: `stbd` boxes in tmux and their drivers (local app API, remote keys);
//! - [`fleet`]: the simulated boxes, which settle what they hold open as a box must;
//! - [`audit`]: the audit, usable on its own by any test;
//! - [`record`]: outcomes, faults, pacing;
//! - [`run`]: the run itself and its report;
//! - [`bins`]: the `headend` and `stbd` binaries of this build;
//! - [`pair`]: the deterministic in-process pair: the real box core and card against the
//!   head end's roles in process, with a queue between them that tests step, fault and crash
//!   (`sim/tests/pair.rs`).
//!
//! - [`loadgen`]: the load generator and fleet simulator (`loadgen bench`, `loadgen fleet`),
//!   its deployments ([`loadgen::deploy`]) and figures ([`loadgen::stats`]);
//! - [`wan`]: the userspace WAN proxy (delay, jitter, loss; the machine has no netem);
//! - [`bench_support`]: the load driver the benchmarks share, and the raw quinn ceiling;
//! - [`sim_box`]: the simulated box the fleet and benches drive.
//!
//! The binary `chaos` runs it (`cargo run --release -p sim --bin chaos -- --help`); the test
//! `sim/tests/chaos.rs` is the short CI version.

pub mod audit;
pub mod bench_support;
pub mod bins;
pub mod deploy;
pub mod fleet;
pub mod loadgen;
pub mod pair;
pub mod record;
pub mod run;
pub mod sim_box;
pub mod stbd;
pub mod wan;
