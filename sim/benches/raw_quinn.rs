//! The raw quinn request/response ceiling on loopback: mTLS, one bidirectional stream per
//! request, ~200-byte payloads, an echo service, for 1, 8 and 64 concurrent boxes. The purchase
//! benchmark compares its rate against these figures.
//!
//! `cargo bench -p sim --bench raw_quinn` (optimised). Optional arguments: seconds per run
//! and a comma-separated client list, e.g. `cargo bench -p sim --bench raw_quinn -- 3 1,8`.

use std::time::Duration;

use sim::bench_support::{LoadPlan, raw_quinn};

const PAYLOAD: usize = 200;

fn main() {
    // `cargo bench` passes `--bench`; ignore flags, read plain numbers.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let seconds: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let clients: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 64]);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "raw quinn request/response on loopback: mTLS, 1 stream per request, {PAYLOAD}-byte echo, {seconds} s per run, {} worker threads",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for n in clients {
        let plan = LoadPlan {
            clients: n,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs_f64(seconds),
        };
        match runtime.block_on(raw_quinn(plan, PAYLOAD)) {
            Ok(report) => println!("{report}"),
            Err(e) => {
                eprintln!("raw_quinn with {n} clients failed: {e}");
                std::process::exit(1);
            }
        }
    }
}
