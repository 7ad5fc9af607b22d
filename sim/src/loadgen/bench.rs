//! `loadgen bench` and `loadgen fleet`: the scale and speed figures, each printed as a ratio
//! against a baseline measured in the same run.
//!
//! Round trips, counted from the code paths (gateway.rs, payment/mod.rs). The merchant role
//! runs with the gateway (the cable catalog, module 227, is in the head end); the payment
//! server is behind its own hop.
//!
//! | exchange (box → gateway → …)                  | FIG. 4/5             | FIG. 6/7            |
//! |-----------------------------------------------|----------------------|---------------------|
//! | offer: gateway → merchant (local)             | 1 box RTT            | 1 box RTT           |
//! | draw request: gateway → payment server        | 1 box + 1 payment    | 1 box + 1 payment   |
//! | debit response: → payment (FIG. 4/5) → merchant | 1 box + 1 payment  | 1 box (payment told in the background) |
//!
//! So the floor is 3 × box RTT + 2 × payment RTT for FIG. 4/5 and 3 × box RTT + 1 × payment RTT
//! for FIG. 6/7: 190 ms against 170 ms at 50 ms / 20 ms.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::deploy::{Conservation, Deployment, Options};
use super::fleet::{self, BoxIdentity, ConnectPlan, Fleet, RunPlan, RunReport};
use super::stats::vm_rss_kib;
use crate::bench_support::{LoadPlan, raw_quinn};
use crate::wan::{ProxyLimits, WanParams};
use headend::quic::{QuicClient, TransportSettings};

pub const EMBODIMENTS: [(&str, &str); 4] = [
    ("FIG. 4", "security-card"),
    ("FIG. 5", "payment-server"),
    ("FIG. 6", "gateway"),
    ("FIG. 7", "merchant"),
];

/// (box↔gateway round trips, gateway↔payment round trips) per exchange: offer, draw request,
/// debit response.
pub fn round_trips(embodiment: &str) -> [(u32, u32); 3] {
    let early = matches!(embodiment, "gateway" | "merchant");
    [(1, 0), (1, 1), (1, if early { 0 } else { 1 })]
}

fn floor(rts: (u32, u32), box_rtt: Duration, pay_rtt: Duration) -> Duration {
    box_rtt * rts.0 + pay_rtt * rts.1
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The `headend` binary of this build ([`crate::bins::Bins::locate`]: next to this one,
/// built first if it is older than its sources, or `$PURSELINK_HEADEND`).
pub fn headend_bin() -> Option<PathBuf> {
    crate::bins::Bins::locate().ok().map(|b| b.headend)
}

/// Total CPU seconds (user + system) a process has used, from /proc/<pid>/stat (USER_HZ 100).
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let (u, s): (u64, u64) = (f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?);
    Some((u + s) as f64 / 100.0)
}

pub async fn wait_ready(ids: &BoxIdentity, addr: std::net::SocketAddr) -> Result<(), String> {
    let end = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        match QuicClient::connect(&ids.tls, &TransportSettings::default(), addr, "localhost").await
        {
            Ok(c) => {
                c.close().await;
                return Ok(());
            }
            Err(e) if tokio::time::Instant::now() >= end => {
                return Err(format!("head end at {addr} not ready: {e}"));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The gateway's memory for idle connections.
#[derive(Debug, Clone, Copy)]
pub struct IdleMemory {
    pub connections: usize,
    pub rss_before_kib: u64,
    pub rss_first_kib: u64,
    pub first: usize,
    pub rss_after_kib: u64,
    pub client_kib_per_conn: f64,
    pub connect_time: Duration,
}

impl IdleMemory {
    /// (after − before) / connections.
    pub fn kib_per_conn(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_before_kib as f64) / self.connections.max(1) as f64
    }

    /// The slope between `first` and all connections: fixed allocations made by the first
    /// connections (runtime threads, pools) do not count.
    pub fn marginal_kib_per_conn(&self) -> f64 {
        (self.rss_after_kib as f64 - self.rss_first_kib as f64)
            / (self.connections - self.first).max(1) as f64
    }

    pub fn print(&self) {
        println!(
            "  gateway VmRSS: {} KiB before, {} KiB with {} boxes, {} KiB with {} boxes (connected in {:.1} s)",
            self.rss_before_kib,
            self.rss_first_kib,
            self.first,
            self.rss_after_kib,
            self.connections,
            self.connect_time.as_secs_f64()
        );
        println!(
            "  KiB per idle connection at the gateway: {:.1} overall, {:.1} marginal ({}→{}); loadgen side {:.1}",
            self.kib_per_conn(),
            self.marginal_kib_per_conn(),
            self.first,
            self.connections,
            self.client_kib_per_conn
        );
    }
}

/// Connects `ids` to `deploy` in two steps (`first`, then the rest), reading the gateway's
/// VmRSS before, between and after (after a short settle).
pub async fn connect_idle(
    deploy: &Deployment,
    ids: &[BoxIdentity],
    first: usize,
) -> Result<(Fleet, IdleMemory), String> {
    let issuer =
        headend::config::load_issuer_keys(&deploy.files.issuer_keys).map_err(|e| e.to_string())?;
    wait_ready(&ids[0], deploy.box_addr).await?;
    let pid = deploy.gateway_pid();
    let rss = || vm_rss_kib(pid).unwrap_or(0);
    let me = std::process::id();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss();
    let me_before = vm_rss_kib(me).unwrap_or(0);
    let t = tokio::time::Instant::now();
    let first = first.min(ids.len());
    let plan = ConnectPlan::default();
    let mut fleet = Fleet::connect(
        &ids[..first],
        &issuer,
        deploy.box_addr,
        plan.clone(),
        0x10_0000,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_first = rss();
    let rest = Fleet::connect(
        &ids[first..],
        &issuer,
        deploy.box_addr,
        plan,
        0x10_0000 + first as u64,
    )
    .await?;
    let connect_time = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = rss();
    let me_after = vm_rss_kib(me).unwrap_or(0);
    fleet.absorb(rest);
    let n = fleet.len();
    Ok((
        fleet,
        IdleMemory {
            connections: n,
            rss_before_kib: before,
            rss_first_kib: rss_first,
            first,
            rss_after_kib: after,
            client_kib_per_conn: (me_after as f64 - me_before as f64) / n.max(1) as f64,
            connect_time,
        },
    ))
}

fn print_run(label: &str, r: &mut RunReport) {
    let (lo, med, hi) = r.per_second.spread();
    println!(
        "  {label}: {} ok / {} attempted ({:.2}% success), {} shed, {:.1} purchases/s over {:.1} s; per second min/median/max {lo}/{med}/{hi}",
        r.ok,
        r.attempted,
        100.0 * r.success(),
        r.shed,
        r.rate(),
        r.elapsed.as_secs_f64()
    );
    println!("  errors: {}", r.errors);
    r.flows.print("    ");
}

fn print_conservation(c: &Result<Conservation, String>) -> bool {
    match c {
        Ok(c) => {
            println!("  conservation {c}");
            c.holds()
        }
        Err(e) => {
            println!("  conservation not checked: {e}");
            false
        }
    }
}

/// What `loadgen bench` does.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub box_rtt: Duration,
    pub pay_rtt: Duration,
    /// Boxes buying at once through the WAN.
    pub wan_boxes: usize,
    pub wan_seconds: f64,
    pub loss_seconds: f64,
    pub throughput_boxes: usize,
    pub throughput_seconds: f64,
    pub idle_boxes: usize,
    pub headend_bin: Option<PathBuf>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            box_rtt: Duration::from_millis(50),
            pay_rtt: Duration::from_millis(20),
            wan_boxes: 4,
            wan_seconds: 6.0,
            loss_seconds: 20.0,
            throughput_boxes: 32,
            throughput_seconds: 8.0,
            idle_boxes: 10_000,
            headend_bin: None,
        }
    }
}

fn limits() -> ProxyLimits {
    ProxyLimits {
        lifetime: Duration::from_secs(900),
        ..ProxyLimits::default()
    }
}

async fn wan_run(
    deploy: &Deployment,
    ids: &[BoxIdentity],
    seconds: f64,
) -> Result<(Fleet, RunReport), String> {
    let issuer =
        headend::config::load_issuer_keys(&deploy.files.issuer_keys).map_err(|e| e.to_string())?;
    // Fresh cards need card ids never seen by this deployment: a real card's transaction
    // counter never starts again, and the payment server refuses an INITIALIZE that is not
    // newer than one a draw already used (a replay).
    static NEXT_CARD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0x20_0000);
    let first_card = NEXT_CARD.fetch_add(ids.len() as u64, std::sync::atomic::Ordering::Relaxed);
    let fleet = Fleet::connect(
        ids,
        &issuer,
        deploy.box_addr,
        ConnectPlan::default(),
        first_card,
    )
    .await?;
    if !fleet.connect_errors.0.is_empty() {
        return Err(format!("connecting: {}", fleet.connect_errors));
    }
    let plan = RunPlan {
        concurrency: ids.len(),
        warmup: Duration::from_secs(1),
        duration: Duration::from_secs_f64(seconds),
        ..RunPlan::default()
    };
    let report = fleet::run(&fleet, &plan).await;
    Ok((fleet, report))
}

/// The whole bench; returns whether conservation held after every run.
pub async fn bench(o: &BenchOptions) -> Result<bool, String> {
    let mut all_hold = true;
    println!(
        "== 1. purchase latency against the round-trip floor: box↔gateway RTT {} ms, gateway↔payment RTT {} ms (WAN proxies), {} boxes buying back to back for {} s per embodiment",
        ms(o.box_rtt),
        ms(o.pay_rtt),
        o.wan_boxes,
        o.wan_seconds
    );
    let wan = |rtt: Duration| WanParams::rtt(rtt);
    let mut summary = Vec::new();
    for (fig, emb) in EMBODIMENTS {
        let opts = Options {
            embodiment: emb.into(),
            ..Options::default()
        };
        let deploy = Deployment::split_wan(&opts, wan(o.box_rtt), wan(o.pay_rtt), limits()).await?;
        let ids = fleet::issue_identities(&deploy.files.ca_dir, "wanbox", o.wan_boxes)?;
        // Baseline in the same deployment: the proxies with no delay.
        deploy.set_wan(WanParams::default(), WanParams::default());
        let (fleet0, mut zero) = wan_run(&deploy, &ids, 2.0).await?;
        let zero_debits = fleet0.card_debits().await;
        fleet0.close().await;
        deploy.set_wan(wan(o.box_rtt), wan(o.pay_rtt));
        let (fleet, mut r) = wan_run(&deploy, &ids, o.wan_seconds).await?;
        let rts = round_trips(emb);
        let total = (
            rts.iter().map(|r| r.0).sum::<u32>(),
            rts.iter().map(|r| r.1).sum::<u32>(),
        );
        let f = floor(total, o.box_rtt, o.pay_rtt);
        let p50 = r.flows.purchase.p50();
        let z50 = zero.flows.purchase.p50();
        println!(
            "{fig} ({emb}): floor {} box + {} payment round trips = {:.0} ms; purchase p50 {:.1} ms (p99 {:.1}) → latency/floor {:.3}; zero-delay p50 {:.1} ms → (p50 − zero-delay p50)/floor {:.3}; {} purchases, errors: {}",
            total.0,
            total.1,
            ms(f),
            ms(p50),
            ms(r.flows.purchase.quantile(0.99)),
            p50.as_secs_f64() / f.as_secs_f64(),
            ms(z50),
            (p50.as_secs_f64() - z50.as_secs_f64()) / f.as_secs_f64(),
            r.ok,
            r.errors
        );
        for (name, h, rt) in [
            ("offer", &mut r.flows.offer, rts[0]),
            ("draw request", &mut r.flows.draw, rts[1]),
            ("debit response", &mut r.flows.debit_response, rts[2]),
        ] {
            let f = floor(rt, o.box_rtt, o.pay_rtt);
            println!(
                "    {name:<15} floor {}+{} RTT = {:>5.0} ms; p50 {:>7.1} ms → {:.3}",
                rt.0,
                rt.1,
                ms(f),
                ms(h.p50()),
                h.p50().as_secs_f64() / f.as_secs_f64()
            );
        }
        summary.push((fig, ms(f), ms(p50), p50.as_secs_f64() / f.as_secs_f64()));
        let debits = zero_debits + fleet.card_debits().await;
        fleet.close().await;
        let left = deploy.settle(Duration::from_secs(10)).await;
        if left > 0 {
            println!("    {left} debit responses still pending at the payment server");
        }
        all_hold &= print_conservation(&deploy.stop_and_check(debits).await);
    }
    println!("  summary (p50 ms / floor ms = ratio):");
    for (fig, f, p, r) in &summary {
        println!("    {fig}: {p:.1} / {f:.0} = {r:.3}");
    }

    println!(
        "\n== 2. loss: FIG. 4 through the same WAN with packet loss on every hop, each way; {} boxes for {} s",
        o.wan_boxes, o.loss_seconds
    );
    let opts = Options::default();
    let deploy = Deployment::split_wan(&opts, wan(o.box_rtt), wan(o.pay_rtt), limits()).await?;
    let ids = fleet::issue_identities(&deploy.files.ca_dir, "lossbox", o.wan_boxes)?;
    let (fleet0, mut base) = wan_run(&deploy, &ids, o.wan_seconds).await?;
    let base50 = base.flows.purchase.p50();
    println!(
        "  0% loss baseline: {:.2}% success, p50 {:.1} ms, p99 {:.1} ms",
        100.0 * base.success(),
        ms(base50),
        ms(base.flows.purchase.quantile(0.99))
    );
    let mut debits = fleet0.card_debits().await;
    fleet0.close().await;
    for loss in [0.01, 0.05] {
        deploy.set_wan(
            wan(o.box_rtt).with_loss(loss),
            wan(o.pay_rtt).with_loss(loss),
        );
        let before = deploy.wan_stats().unwrap_or_default();
        // Connect over the lossy path too (handshakes see the loss).
        let (fleet, mut r) = wan_run(&deploy, &ids, o.loss_seconds).await?;
        let after = deploy.wan_stats().unwrap_or_default();
        let p50 = r.flows.purchase.p50();
        let p99 = r.flows.purchase.quantile(0.99);
        println!(
            "  {:.0}% loss: success {}/{} = {:.2}%; p50 {:.1} ms ({:.2}× lossless p50), p99 {:.1} ms ({:.2}×), p99.9 {:.1} ms; packets lost {} of {}; errors: {}",
            loss * 100.0,
            r.ok,
            r.attempted,
            100.0 * r.success(),
            ms(p50),
            p50.as_secs_f64() / base50.as_secs_f64(),
            ms(p99),
            p99.as_secs_f64() / base50.as_secs_f64(),
            ms(r.flows.purchase.quantile(0.999)),
            after.1 - before.1,
            after.0 - before.0 + after.1 - before.1,
            r.errors
        );
        debits += fleet.card_debits().await;
        fleet.close().await;
    }
    all_hold &= print_conservation(&deploy.stop_and_check(debits).await);

    println!(
        "\n== 3. throughput on loopback: purchases through gateway + payment server (FIG. 4, in process, SQLite journals fsynced on every commit, group commit) against raw quinn echo, {} boxes, {} s each, same run",
        o.throughput_boxes, o.throughput_seconds
    );
    let opts = Options {
        max_connections: o.throughput_boxes + 16,
        security_cards: (o.throughput_boxes as u32).max(4),
        ..Options::default()
    };
    let deploy = Deployment::in_process(&opts).await?;
    let ids = fleet::issue_identities(&deploy.files.ca_dir, "tpbox", o.throughput_boxes)?;
    let issuer =
        headend::config::load_issuer_keys(&deploy.files.issuer_keys).map_err(|e| e.to_string())?;
    let fleet = Fleet::connect(
        &ids,
        &issuer,
        deploy.box_addr,
        ConnectPlan::default(),
        0x30_0000,
    )
    .await?;
    let plan = RunPlan {
        concurrency: o.throughput_boxes,
        warmup: Duration::from_millis(500),
        duration: Duration::from_secs_f64(o.throughput_seconds),
        ..RunPlan::default()
    };
    let me = std::process::id();
    let cpu0 = cpu_secs(me);
    let mut r = fleet::run(&fleet, &plan).await;
    let cpu1 = cpu_secs(me);
    print_run("purchases", &mut r);
    if let (Some(a), Some(b)) = (cpu0, cpu1) {
        println!(
            "  CPU {:.2} s over {:.1} s wall (of 2 cores) = {:.2} ms CPU per purchase, boxes and head end together",
            b - a,
            r.elapsed.as_secs_f64() + 0.5,
            1e3 * (b - a) / r.ok.max(1) as f64
        );
    }
    let debits = fleet.card_debits().await;
    fleet.close().await;
    all_hold &= print_conservation(&deploy.stop_and_check(debits).await);
    let raw = raw_quinn(
        LoadPlan {
            clients: o.throughput_boxes,
            warmup: Duration::from_millis(500),
            duration: Duration::from_secs_f64(o.throughput_seconds),
        },
        200,
    )
    .await
    .map_err(|e| e.to_string())?;
    println!("  raw quinn  {raw}");
    println!(
        "  purchases/s ÷ raw quinn req/s = {:.4}; exchanges/s ÷ raw = {:.4} (3 box exchanges per purchase)",
        r.rate() / raw.per_second,
        3.0 * r.rate() / raw.per_second
    );

    println!(
        "\n== 4. memory per idle connection at the gateway: `headend all-in-one` as a child process, {} boxes connected and idle",
        o.idle_boxes
    );
    match &o.headend_bin {
        None => println!(
            "  skipped: no headend binary (cargo build --release -p headend --bins, or set PURSELINK_HEADEND)"
        ),
        Some(bin) => {
            let opts = Options {
                max_connections: o.idle_boxes + 64,
                ..Options::default()
            };
            let deploy = Deployment::child(&opts, bin, "warn").await?;
            let t = std::time::Instant::now();
            let ids = fleet::issue_identities(&deploy.files.ca_dir, "box", o.idle_boxes)?;
            println!(
                "  {} device certificates issued in {:.1} s",
                ids.len(),
                t.elapsed().as_secs_f64()
            );
            let (fleet, mem) = connect_idle(&deploy, &ids, o.idle_boxes / 10).await?;
            println!(
                "  connected {} of {}; failures: {}",
                fleet.len(),
                ids.len(),
                fleet.connect_errors
            );
            mem.print();
            fleet.close().await;
            all_hold &= print_conservation(&deploy.stop_and_check(0).await);
        }
    }
    Ok(all_hold)
}

/// What `loadgen fleet` does.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub boxes: usize,
    pub run: RunPlan,
    pub embodiment: String,
    pub security_cards: u32,
    /// `None`: every role in this process (memory then includes the boxes).
    pub headend_bin: Option<PathBuf>,
    pub log: String,
    /// See [`Options::journal_url`].
    pub journal_url: Option<String>,
}

pub async fn fleet_run(o: &FleetOptions) -> Result<bool, String> {
    let opts = Options {
        embodiment: o.embodiment.clone(),
        max_connections: o.boxes + 64,
        security_cards: o.security_cards,
        journal_url: o.journal_url.clone(),
    };
    let deploy = match &o.headend_bin {
        Some(bin) => Deployment::child(&opts, bin, &o.log).await?,
        None => Deployment::in_process(&opts).await?,
    };
    println!(
        "fleet: {} boxes against {} ({}), {}",
        o.boxes,
        match &o.headend_bin {
            Some(b) => format!(
                "`{} all-in-one` (pid {})",
                b.display(),
                deploy.gateway_pid()
            ),
            None => "every role in this process (memory figures include the boxes)".into(),
        },
        o.embodiment,
        match o.run.rate {
            Some(r) => format!(
                "{r} purchases/s offered for {} s",
                o.run.duration.as_secs_f64()
            ),
            None => format!(
                "as fast as {} in flight allow for {} s",
                o.run.concurrency,
                o.run.duration.as_secs_f64()
            ),
        }
    );
    let t = std::time::Instant::now();
    let ids = fleet::issue_identities(&deploy.files.ca_dir, "box", o.boxes)?;
    println!(
        "  {} device certificates issued in {:.1} s",
        ids.len(),
        t.elapsed().as_secs_f64()
    );
    let (fleet, mem) = connect_idle(&deploy, &ids, o.boxes / 10).await?;
    println!(
        "  connected {} of {}; failures: {}",
        fleet.len(),
        ids.len(),
        fleet.connect_errors
    );
    mem.print();
    let gw = deploy.gateway_pid();
    let me = std::process::id();
    let (g0, m0) = (cpu_secs(gw), cpu_secs(me));
    let commits0 = headend::journal::commits_in_this_process();
    let wall = std::time::Instant::now();
    let mut r = fleet::run(&fleet, &o.run).await;
    let wall = wall.elapsed().as_secs_f64();
    let commits = headend::journal::commits_in_this_process() - commits0;
    let (g1, m1) = (cpu_secs(gw), cpu_secs(me));
    print_run("purchases", &mut r);
    println!(
        "  journal: {}",
        match (&o.headend_bin, &o.journal_url) {
            (None, url) => format!(
                "{} ({commits} commits in this process: {:.2} per purchase, the head end's journals; the boxes' are not counted)",
                if url.is_some() {
                    "PostgreSQL"
                } else {
                    "SQLite"
                },
                commits as f64 / r.ok.max(1) as f64
            ),
            (Some(_), url) => format!(
                "{} (commits are counted in process only: run with --in-process)",
                if url.is_some() {
                    "PostgreSQL"
                } else {
                    "SQLite"
                }
            ),
        }
    );
    if let Some(target) = o.run.rate {
        println!(
            "  sustained: {} of {} whole seconds reached ≥ 95% of {target}/s; achieved/target = {:.3}",
            r.per_second.seconds_at_least(0.95 * target),
            r.per_second.0.len(),
            r.rate() / target
        );
    }
    if let (Some(g0), Some(g1), Some(m0), Some(m1)) = (g0, g1, m0, m1) {
        if gw != me {
            println!(
                "  CPU over {wall:.1} s wall: head end {:.1} s ({:.0}% of a core), loadgen {:.1} s ({:.0}%); 2 cores = 200%",
                g1 - g0,
                100.0 * (g1 - g0) / wall,
                m1 - m0,
                100.0 * (m1 - m0) / wall
            );
            println!(
                "  CPU per purchase: head end {:.2} ms, loadgen (boxes) {:.2} ms",
                1e3 * (g1 - g0) / r.ok.max(1) as f64,
                1e3 * (m1 - m0) / r.ok.max(1) as f64
            );
        } else {
            println!(
                "  CPU over {wall:.1} s wall: {:.1} s ({:.0}% of a core; 2 cores = 200%)",
                m1 - m0,
                100.0 * (m1 - m0) / wall
            );
        }
    }
    if let Some(rss) = vm_rss_kib(gw) {
        println!("  gateway VmRSS after the run: {rss} KiB");
    }
    let debits = fleet.card_debits().await;
    fleet.close().await;
    let left = deploy.settle(Duration::from_secs(10)).await;
    if left > 0 {
        println!("  {left} debit responses still pending at the payment server");
    }
    let _ = log_tail(&deploy.log_path());
    Ok(print_conservation(&deploy.stop_and_check(debits).await))
}

/// What `loadgen drive` does: boxes against a deployment that is already running.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    pub gateway: std::net::SocketAddr,
    pub ca_dir: PathBuf,
    pub issuer_keys: PathBuf,
    pub boxes: usize,
    pub prefix: String,
    pub run: RunPlan,
}

/// Issues the boxes' certificates, personalises their cards, connects them and runs
/// `o.run`; prints the figures and what the cards paid. Returns `Ok(true)`: nothing here can
/// see the deployment's journals, so conservation is the deployment's own audit's to check.
///
/// # Errors
///
/// The CA or issuer keys could not be read, or no box connected.
pub async fn drive(o: &DriveOptions) -> Result<bool, String> {
    let issuer = headend::config::load_issuer_keys(&o.issuer_keys).map_err(|e| e.to_string())?;
    let ids = fleet::issue_identities(&o.ca_dir, &o.prefix, o.boxes)?;
    let fleet = Fleet::connect(
        &ids,
        &issuer,
        o.gateway,
        ConnectPlan::default(),
        0x2000_0000,
    )
    .await?;
    println!(
        "drive: {} of {} boxes connected to {}; failures: {}",
        fleet.len(),
        ids.len(),
        o.gateway,
        fleet.connect_errors
    );
    if fleet.is_empty() {
        return Err("no box connected".into());
    }
    let mut r = fleet::run(&fleet, &o.run).await;
    print_run("purchases", &mut r);
    let open = fleet.settle(Duration::from_secs(60)).await;
    println!(
        "  cards paid {} minor units in all; {open} transactions still in doubt on the boxes",
        fleet.card_debits().await
    );
    fleet.close().await;
    Ok(true)
}

fn log_tail(path: &Path) -> Option<()> {
    let text = std::fs::read_to_string(path).ok()?;
    let errors = text.lines().filter(|l| l.contains("ERROR")).count();
    if errors > 0 {
        println!("  head end log: {errors} ERROR lines");
    }
    Some(())
}
