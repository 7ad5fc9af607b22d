//! Purchases per second through the gateway and the payment server on loopback, with N
//! concurrent simulated boxes (the box core with its own device certificate, `stbd`'s
//! gateway client and journal, and a purse card: `sim::sim_box`), latency p50/p99 — against the raw quinn request/response rate measured in the same
//! run as the ceiling. A purchase is three request/response exchanges (offer, draw request,
//! debit response) plus the card, security-card and journal work, so the ratio is printed
//! both per purchase and per exchange.
//!
//! `cargo bench -p sim --bench purchase -- [SECONDS] [CLIENTS,..] [EMBODIMENT]`
//! e.g. `cargo bench -p sim --bench purchase -- 5 1,8,32 security-card`.

use std::sync::Arc;
use std::time::Duration;

use headend::assembly::{self, DemoOptions, Roles};
use headend::config::HeadendConfig;
use sim::bench_support::{LoadPlan, drive, raw_quinn};
use sim::loadgen::fleet::{self, ConnectPlan, Fleet};

const EXCHANGES_PER_PURCHASE: f64 = 3.0;

async fn purchases(
    plan: LoadPlan,
    embodiment: &str,
) -> Result<sim::bench_support::LoadReport, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let opts = DemoOptions {
        gateway_listen: ([127, 0, 0, 1], 0).into(),
        embodiment: embodiment.into(),
        ..Default::default()
    };
    let files = assembly::init_demo(dir.path(), &opts).map_err(|e| e.to_string())?;
    let mut cfg = HeadendConfig::load(&files.config).map_err(|e| e.to_string())?;
    cfg.transport.max_connections = plan.clients + 8;
    // A benchmark box buys far faster than a viewer: lift the per-box limits.
    if let Some(g) = cfg.gateway.as_mut() {
        g.limits.offers_per_minute = u32::MAX;
        g.limits.burst = u32::MAX;
    }
    if let Some(p) = cfg.payment.as_mut() {
        p.security_cards = headend::config::SecurityCards::Count(plan.clients.max(4) as u32);
    }
    let running = assembly::start(&cfg, Roles::ALL)
        .await
        .map_err(|e| e.to_string())?;
    let issuer =
        headend::config::load_issuer_keys(&files.issuer_keys).map_err(|e| e.to_string())?;
    let ids = fleet::issue_identities(&dir.path().join("ca"), "box", plan.clients)?;
    let f = Fleet::connect(
        &ids,
        &issuer,
        running.gateway_addr.ok_or("no gateway address")?,
        ConnectPlan::default(),
        0x1000,
    )
    .await?;
    if f.len() != plan.clients {
        return Err(format!("connecting: {}", f.connect_errors));
    }
    let boxes = Arc::new(f.boxes.clone());
    let report = drive(plan, move |i| {
        let boxes = boxes.clone();
        async move {
            let mut b = boxes[i].lock().await;
            fleet::purchase(&mut b, "CABLE", "ppv-1001")
                .await
                .map(|_| ())
        }
    })
    .await;
    f.close().await;
    running.stop().await;
    Ok(report)
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let seconds: f64 = args.first().and_then(|s| s.parse().ok()).unwrap_or(5.0);
    let clients: Vec<usize> = args
        .get(1)
        .map(|s| s.split(',').filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 8, 32]);
    let embodiment = args
        .get(2)
        .cloned()
        .unwrap_or_else(|| "security-card".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "purchases through gateway + payment server + merchant on loopback ({embodiment}, FIG. 8 on, SQLite journals with synchronous=FULL), {seconds} s per run"
    );
    for n in clients {
        let plan = LoadPlan {
            clients: n,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs_f64(seconds),
        };
        let p = match rt.block_on(purchases(plan, &embodiment)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("purchase run with {n} boxes failed: {e}");
                std::process::exit(1);
            }
        };
        let raw = match rt.block_on(raw_quinn(plan, 200)) {
            Ok(r) => r,
            Err(e) => {
                eprintln!("raw quinn run with {n} boxes failed: {e}");
                std::process::exit(1);
            }
        };
        println!("purchases  {p}");
        println!("raw quinn  {raw}");
        println!(
            "ratio      purchases/raw = {:.4}; exchanges/raw = {:.4} ({} exchanges per purchase)",
            p.per_second / raw.per_second,
            p.per_second * EXCHANGES_PER_PURCHASE / raw.per_second,
            EXCHANGES_PER_PURCHASE
        );
    }
}
