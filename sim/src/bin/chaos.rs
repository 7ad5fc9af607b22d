//! `chaos`: Purselink's chaos run from the command line.
//!
//! ```sh
//! cargo run --release -p sim --bin chaos -- --transactions 10000 --kills 100
//! ```
//!
//! Prints the figures (transactions attempted / completed / refused by reason, kills per
//! role, recovery times, the audit) and exits 0 only if the audit holds.

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use sim::run::{Plan, run};

#[derive(Parser)]
#[command(
    name = "chaos",
    about = "Purselink chaos run: split head end, stbd boxes, simulated fleet, SIGKILLs, audit"
)]
struct Cli {
    /// Transactions the regular drivers start (probes come on top).
    #[arg(long, default_value_t = 10_000)]
    transactions: u64,
    /// SIGKILLs in all (roles and stbd boxes; every role at least once when there are 5+).
    #[arg(long, default_value_t = 100)]
    kills: usize,
    /// Of the kills, how many hit stbd boxes (default: 30%).
    #[arg(long)]
    box_kills: Option<usize>,
    /// Transactions started per second.
    #[arg(long, default_value_t = 8.0)]
    rate: f64,
    #[arg(long, default_value_t = 10)]
    stbd_boxes: usize,
    #[arg(long, default_value_t = 50)]
    sim_boxes: usize,
    /// Concurrent simulated transactions.
    #[arg(long, default_value_t = 12)]
    sim_workers: usize,
    /// Share of loads among the transactions (0..1).
    #[arg(long, default_value_t = 0.25)]
    load_share: f64,
    /// Seconds the quiesce phase may wait for everything to settle.
    #[arg(long, default_value_t = 180)]
    quiesce_secs: u64,
    /// Keep everything in this directory (default: a temporary one, removed).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
    /// Restart stbd boxes that still hold open work halfway through the quiesce.
    #[arg(long)]
    nudge_boxes: bool,
    /// The short CI plan (3 stbd, 24 simulated, 360 transactions, 10 kills).
    #[arg(long)]
    ci: bool,
    /// Log filter for this process (tracing EnvFilter), default "warn".
    #[arg(long, default_value = "warn")]
    log: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log)
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let plan = if cli.ci {
        Plan {
            dir: cli.dir.clone(),
            nudge_boxes: cli.nudge_boxes,
            ..Plan::ci()
        }
    } else {
        Plan {
            dir: cli.dir.clone(),
            stbd_boxes: cli.stbd_boxes,
            sim_boxes: cli.sim_boxes,
            transactions: cli.transactions,
            kills: cli.kills,
            box_kills: cli.box_kills.unwrap_or(cli.kills * 3 / 10),
            rate: cli.rate,
            sim_workers: cli.sim_workers,
            load_share: cli.load_share,
            quiesce: Duration::from_secs(cli.quiesce_secs),
            nudge_boxes: cli.nudge_boxes,
            ..Plan::long()
        }
    };
    let bins = match sim::bins::Bins::locate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("chaos: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(plan, &bins)) {
        Ok(mut report) => {
            println!("{report}");
            if report.holds() {
                ExitCode::SUCCESS
            } else {
                report.keep_dir();
                eprintln!(
                    "chaos: the audit failed; everything is kept in {}",
                    report.dir.display()
                );
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos: {e}");
            ExitCode::FAILURE
        }
    }
}
