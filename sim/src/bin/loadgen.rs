//! `loadgen`: a fleet of simulated set-top boxes against a Purselink head end on loopback.
//!
//! - `loadgen fleet --boxes 10000 --rate 1000 --seconds 60`: `headend all-in-one` as a child
//!   process (the `headend` binary next to this one, or `--headend PATH`), 10,000 boxes
//!   connected and idle (gateway VmRSS before/after), purchases at the target rate, latency
//!   p50/p99/p99.9 per flow, errors by reason, value conservation at the end.
//! - `loadgen bench`: latency against the round-trip floor per embodiment through simulated
//!   WAN links, success under loss, throughput against raw quinn, memory per idle connection.
//! - `loadgen drive --gateway HOST:PORT --ca-dir DIR --issuer-keys FILE`: the same boxes
//!   against a deployment that is already running (all-in-one or split, on this machine or
//!   not): device certificates issued from the operator CA in DIR, cards personalised under
//!   the issuer keys; it starts nothing and reads no journal (audit the deployment itself).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use sim::loadgen::bench::{self, BenchOptions, FleetOptions};
use sim::loadgen::fleet::RunPlan;

#[derive(Parser)]
#[command(about = "Purselink fleet simulator and scale benchmarks (loopback only)")]
struct Cli {
    /// Log filter for this process (tracing EnvFilter syntax).
    #[arg(long, global = true, default_value = "error")]
    log: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// N boxes connected and idle, then purchases at a rate or as fast as possible.
    Fleet {
        #[arg(long, default_value_t = 10_000)]
        boxes: usize,
        /// Purchases started per second; without it, as fast as --concurrency allows.
        #[arg(long)]
        rate: Option<f64>,
        /// Purchases in flight at most.
        #[arg(long, default_value_t = 256)]
        concurrency: usize,
        #[arg(long, default_value_t = 60.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2.0)]
        warmup: f64,
        #[arg(long, default_value = "security-card")]
        embodiment: String,
        /// Security cards in the payment server's pool (FIG. 4 holds one per purchase in flight).
        #[arg(long, default_value_t = 256)]
        security_cards: u32,
        /// Run every role in this process instead of a child `headend` process.
        #[arg(long)]
        in_process: bool,
        /// The head end binary (default: `headend` of this build, next to this one, or $PURSELINK_HEADEND).
        #[arg(long)]
        headend: Option<PathBuf>,
        /// The child head end's log filter.
        #[arg(long, default_value = "warn")]
        headend_log: String,
        /// Journal every role on this PostgreSQL database (a connection string, e.g.
        /// "host=/run/postgresql dbname=bench") instead of SQLite files; each run in schemas
        /// of its own.
        #[arg(long)]
        journal_url: Option<String>,
    },
    /// Boxes against a running deployment: purchases at a rate or as fast as possible.
    Drive {
        /// The gateway's address (its certificate must name role `gateway`).
        #[arg(long)]
        gateway: std::net::SocketAddr,
        /// The operator CA directory (`ca.crt.pem`, `ca.key.pem`) the boxes' device
        /// certificates are issued from.
        #[arg(long)]
        ca_dir: PathBuf,
        /// The card issuer's keys file the cards are personalised under.
        #[arg(long)]
        issuer_keys: PathBuf,
        #[arg(long, default_value_t = 100)]
        boxes: usize,
        /// Box ids are `<prefix>-NNNNNN` (the gateway's box limits count per id).
        #[arg(long, default_value = "loadgen")]
        prefix: String,
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        #[arg(long, default_value_t = 30.0)]
        seconds: f64,
        #[arg(long, default_value_t = 1.0)]
        warmup: f64,
        #[arg(long, default_value = "CABLE")]
        merchant: String,
        #[arg(long, default_value = "ppv-1001")]
        item: String,
    },
    /// All the figures of issue 8 in one run, as ratios against same-run baselines.
    Bench {
        #[arg(long, default_value_t = 10_000)]
        idle_boxes: usize,
        #[arg(long, default_value_t = 6.0)]
        wan_seconds: f64,
        #[arg(long, default_value_t = 20.0)]
        loss_seconds: f64,
        #[arg(long, default_value_t = 8.0)]
        throughput_seconds: f64,
        #[arg(long, default_value_t = 32)]
        throughput_boxes: usize,
        #[arg(long, default_value_t = 4)]
        wan_boxes: usize,
        #[arg(long)]
        headend: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .with_writer(std::io::stderr)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("loadgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Cmd::Fleet {
            boxes,
            rate,
            concurrency,
            seconds,
            warmup,
            embodiment,
            security_cards,
            in_process,
            headend,
            headend_log,
            journal_url,
        } => {
            let headend_bin = if in_process {
                None
            } else {
                match headend.or_else(bench::headend_bin) {
                    Some(b) => Some(b),
                    None => {
                        eprintln!(
                            "loadgen: no headend binary next to loadgen; build it (cargo build --release -p headend --bins), pass --headend, or use --in-process"
                        );
                        return ExitCode::FAILURE;
                    }
                }
            };
            let o = FleetOptions {
                boxes,
                run: RunPlan {
                    rate,
                    concurrency,
                    warmup: Duration::from_secs_f64(warmup),
                    duration: Duration::from_secs_f64(seconds),
                    ..RunPlan::default()
                },
                embodiment,
                security_cards,
                headend_bin,
                log: headend_log,
                journal_url,
            };
            rt.block_on(bench::fleet_run(&o))
        }
        Cmd::Drive {
            gateway,
            ca_dir,
            issuer_keys,
            boxes,
            prefix,
            rate,
            concurrency,
            seconds,
            warmup,
            merchant,
            item,
        } => {
            let o = bench::DriveOptions {
                gateway,
                ca_dir,
                issuer_keys,
                boxes,
                prefix,
                run: RunPlan {
                    rate,
                    concurrency,
                    warmup: Duration::from_secs_f64(warmup),
                    duration: Duration::from_secs_f64(seconds),
                    merchant,
                    item,
                },
            };
            rt.block_on(bench::drive(&o))
        }
        Cmd::Bench {
            idle_boxes,
            wan_seconds,
            loss_seconds,
            throughput_seconds,
            throughput_boxes,
            wan_boxes,
            headend,
        } => {
            let o = BenchOptions {
                idle_boxes,
                wan_seconds,
                loss_seconds,
                throughput_seconds,
                throughput_boxes,
                wan_boxes,
                headend_bin: headend.or_else(bench::headend_bin),
                ..BenchOptions::default()
            };
            rt.block_on(bench::bench(&o))
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("loadgen: value conservation did not hold");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("loadgen: {e}");
            ExitCode::FAILURE
        }
    }
}
