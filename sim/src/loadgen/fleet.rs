//! A fleet of simulated boxes in one process ([`SimBox`]: the box core `stb-flow` with an
//! in-process card, `stbd`'s gateway client and journal), each with its own device
//! certificate and QUIC connection, many connections sharing a few client UDP sockets.
//! Drives purchases at a target rate (open loop) or as fast as possible (closed loop), timing
//! each request at the box.
//!
//! A box whose connection died or went silent makes a new one on its next request, as
//! `stbd`'s client does, so a fleet survives a gateway restart; what a restart left in doubt
//! is settled by the boxes' recovery rounds ([`Fleet::settle`]).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::purse::IssuerKeys;
use stb::daemon::gateway::{Gateway, GatewaySettings};
use stb::journal::Journal;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stats::{Errors, Flows, PerSecond};
use crate::sim_box::{self, SimBox};
use headend::pki::OperatorCa;
use headend::quic::{BoxId, ClientTls, TransportSettings, load_certs};
use stb_flow::purchase::Outcome;

/// A box's identity: its id and client TLS (device certificate and key, operator CA).
#[derive(Clone)]
pub struct BoxIdentity {
    pub box_id: String,
    pub tls: ClientTls,
}

/// Issues `n` device certificates `<prefix>-NNNNNN` from the CA in `ca_dir`, on every core.
/// A run issues each once and reuses them for every deployment made from the same CA.
pub fn issue_identities(ca_dir: &Path, prefix: &str, n: usize) -> Result<Vec<BoxIdentity>, String> {
    let ca_certs = load_certs(&ca_dir.join("ca.crt.pem")).map_err(|e| e.to_string())?;
    let threads = std::thread::available_parallelism()
        .map(|p| p.get())
        .unwrap_or(1)
        .clamp(1, 8);
    let chunk = n.div_ceil(threads).max(1);
    let results: Vec<Result<Vec<BoxIdentity>, String>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let ca_certs = ca_certs.clone();
                s.spawn(move || {
                    let ca = OperatorCa::load(ca_dir).map_err(|e| e.to_string())?;
                    (t * chunk..((t + 1) * chunk).min(n))
                        .map(|i| {
                            let box_id = format!("{prefix}-{i:06}");
                            let issued = ca
                                .issue_device(&BoxId::new(&box_id).map_err(|e| e.to_string())?)
                                .map_err(|e| e.to_string())?;
                            Ok(BoxIdentity {
                                tls: ClientTls::new(
                                    ca_certs.clone(),
                                    issued.tls_identity(),
                                    "gateway",
                                ),
                                box_id,
                            })
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("issuing thread panicked".into()))
            })
            .collect()
    });
    let mut out = Vec::with_capacity(n);
    for r in results {
        out.extend(r?);
    }
    Ok(out)
}

/// Connected boxes.
pub struct Fleet {
    pub boxes: Vec<Arc<tokio::sync::Mutex<SimBox>>>,
    /// Each card's balance when personalised.
    pub initial_balance: u64,
    /// Connections that failed, by reason.
    pub connect_errors: Errors,
    endpoints: Vec<quinn::Endpoint>,
}

/// How a fleet connects.
#[derive(Debug, Clone)]
pub struct ConnectPlan {
    /// Connections per client UDP socket.
    pub per_endpoint: usize,
    /// Handshakes in flight at once.
    pub parallel: usize,
    pub balance: u64,
    /// Each box's request deadline (`stbd`'s `[headend] request_timeout`).
    pub request_timeout: Duration,
    /// Where the boxes' journals go (one directory per box, `stbd`'s SQLite journal);
    /// `None`: each box's journal in memory ([`Journal::open_in_memory`]: the same records,
    /// no files — a fleet of 50,000 would otherwise need 150,000 file descriptors, and a
    /// process that is never power-cut gains nothing from fsyncs).
    pub journal_dir: Option<std::path::PathBuf>,
}

impl Default for ConnectPlan {
    fn default() -> Self {
        Self {
            per_endpoint: 1000,
            parallel: 64,
            balance: 1 << 40,
            request_timeout: Duration::from_secs(10),
            journal_dir: None,
        }
    }
}

/// The settings of one box's gateway client: `stbd`'s defaults, the gateway at `addr`.
pub fn gateway_settings(addr: SocketAddr, request_timeout: Duration) -> GatewaySettings {
    GatewaySettings {
        addrs: vec![addr.to_string()],
        server_name: "localhost".into(),
        server_role: "gateway".into(),
        keep_alive: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(30),
        request_timeout,
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_secs(2),
    }
}

impl Fleet {
    /// Connects every identity to `addr` (server name `localhost`), each with a fresh card
    /// personalised under `issuer` and a journal of its own; card ids start at `first_card`.
    ///
    /// # Errors
    ///
    /// A UDP socket, the journal directory or a box's journal could not be made.
    pub async fn connect(
        ids: &[BoxIdentity],
        issuer: &IssuerKeys,
        addr: SocketAddr,
        plan: ConnectPlan,
        first_card: u64,
    ) -> Result<Fleet, String> {
        let mut endpoints = Vec::new();
        for _ in 0..ids.len().div_ceil(plan.per_endpoint.max(1)).max(1) {
            let bind: SocketAddr = ([127, 0, 0, 1], 0).into();
            endpoints.push(quinn::Endpoint::client(bind).map_err(|e| e.to_string())?);
        }
        let settings = TransportSettings::default();
        let limit = Arc::new(tokio::sync::Semaphore::new(plan.parallel.max(1)));
        let mut tasks = JoinSet::new();
        for (i, id) in ids.iter().enumerate() {
            let endpoint = endpoints[i / plan.per_endpoint.max(1)].clone();
            let config = transport::client_config(&id.tls, &settings).map_err(|e| e.to_string())?;
            let gateway = Gateway::on_endpoint(
                endpoint,
                config,
                gateway_settings(addr, plan.request_timeout),
            );
            let card = sim_box::new_card(
                issuer,
                first_card + i as u64,
                plan.balance,
                plan.balance * 2,
            );
            let journal = match &plan.journal_dir {
                Some(d) => Journal::open(&d.join(&id.box_id)),
                None => Journal::open_in_memory(),
            }
            .map_err(|e| format!("box {} journal: {e}", id.box_id))?;
            let b = SimBox::new(&id.box_id, gateway, card, journal, None);
            let permit = limit.clone().acquire_owned().await.expect("never closed");
            tasks.spawn(async move {
                let r =
                    tokio::time::timeout(Duration::from_secs(30), b.gateway.connect_now()).await;
                drop(permit);
                let r = match r {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("handshake timed out (30 s)".into()),
                };
                (i, b, r)
            });
        }
        let mut connected: Vec<(usize, SimBox)> = Vec::with_capacity(ids.len());
        let mut connect_errors = Errors::default();
        while let Some(j) = tasks.join_next().await {
            match j {
                Ok((i, b, Ok(()))) => connected.push((i, b)),
                Ok((_, _, Err(e))) => connect_errors.add(&e),
                Err(e) => connect_errors.add(&format!("connect task: {e}")),
            }
        }
        connected.sort_by_key(|(i, _)| *i);
        Ok(Fleet {
            boxes: connected
                .into_iter()
                .map(|(_, b)| Arc::new(tokio::sync::Mutex::new(b)))
                .collect(),
            initial_balance: plan.balance,
            connect_errors,
            endpoints,
        })
    }

    /// Takes another fleet's boxes (connected to the same head end) into this one.
    pub fn absorb(&mut self, other: Fleet) {
        self.boxes.extend(other.boxes);
        self.connect_errors.merge(&other.connect_errors);
        self.endpoints.extend(other.endpoints);
    }

    pub fn len(&self) -> usize {
        self.boxes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.boxes.is_empty()
    }

    /// Minor units debited from every card so far (read from the cards).
    pub async fn card_debits(&self) -> u64 {
        let mut sum = 0;
        for b in &self.boxes {
            let mut b = b.lock().await;
            sum += self.initial_balance - b.balance();
        }
        sum
    }

    /// Runs every box's recovery rounds until nothing is in doubt on any box or `limit`
    /// passed (boxes in parallel); how many boxes still hold something in doubt.
    pub async fn settle(&self, limit: Duration) -> usize {
        let mut tasks = JoinSet::new();
        for b in &self.boxes {
            let b = b.clone();
            tasks.spawn(async move { b.lock().await.settle(limit).await });
        }
        let mut open = 0;
        while let Some(r) = tasks.join_next().await {
            if !matches!(r, Ok(true)) {
                open += 1;
            }
        }
        open
    }

    /// Closes every connection and waits (bounded) for the server to be told.
    pub async fn close(self) {
        for b in &self.boxes {
            b.lock().await.gateway.close("fleet done");
        }
        for e in self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(5), e.wait_idle()).await;
        }
    }
}

/// The box's view of one purchase that was paid and released.
pub struct Done {
    pub transaction_id: String,
    pub offer_time: Duration,
    pub draw_time: Duration,
    pub debit_time: Duration,
    pub total: Duration,
}

/// One purchase as `stbd` makes it (the box core, one stream per request), the viewer
/// saying OK at once. Anything but a released receipt is a failure, described.
///
/// # Errors
///
/// How the purchase ended otherwise (refused, failed, in doubt: recovery settles those).
pub async fn purchase(b: &mut SimBox, merchant: &str, item: &str) -> Result<Done, String> {
    // As stbd: an earlier transaction of this card in doubt is settled first, or no new one.
    if b.has_doubt() && b.recover().await.retry {
        return Err("an earlier transaction of this card is still in doubt".into());
    }
    let (outcome, t) = b.buy(merchant, item).await;
    match outcome {
        Outcome::Paid {
            transaction_id,
            receipt,
        } if receipt.released => Ok(Done {
            transaction_id,
            offer_time: t.of("an offer request"),
            draw_time: t.of("a draw request"),
            debit_time: t.of("a debit response"),
            total: t.total,
        }),
        Outcome::Paid { receipt, .. } => Err(format!("receipt without release: {}", receipt.text)),
        Outcome::Failed { refusal, .. } => Err(format!("failed: {refusal:?}")),
        Outcome::Cancelled { reason, .. } => Err(format!("cancelled: {reason:?}")),
        Outcome::InDoubt { doubt, .. } => Err(format!("in doubt: {doubt:?}")),
    }
}

/// How a run drives the fleet.
#[derive(Debug, Clone)]
pub struct RunPlan {
    /// Purchases started per second (open loop); `None`: as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Purchases in flight at most; at a target rate, a start beyond it is shed and counted.
    pub concurrency: usize,
    /// Run first, not measured.
    pub warmup: Duration,
    pub duration: Duration,
    pub merchant: String,
    pub item: String,
}

impl Default for RunPlan {
    fn default() -> Self {
        Self {
            rate: None,
            concurrency: 32,
            warmup: Duration::from_secs(1),
            duration: Duration::from_secs(5),
            merchant: "CABLE".into(),
            item: "ppv-1001".into(),
        }
    }
}

/// What a run measured (its measured window only).
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub flows: Flows,
    pub errors: Errors,
    pub ok: u64,
    pub attempted: u64,
    /// Starts dropped because `concurrency` purchases were in flight or no box was free.
    pub shed: u64,
    pub elapsed: Duration,
    pub per_second: PerSecond,
}

impl RunReport {
    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    pub fn success(&self) -> f64 {
        if self.attempted == 0 {
            return 0.0;
        }
        self.ok as f64 / self.attempted as f64
    }
}

struct Collector {
    report: RunReport,
    measure_from: Instant,
}

impl Collector {
    fn record(&mut self, started: Instant, result: Result<Done, String>) {
        if started < self.measure_from {
            return;
        }
        let r = &mut self.report;
        r.attempted += 1;
        match result {
            Ok(d) => {
                r.ok += 1;
                r.flows.offer.add(d.offer_time);
                r.flows.draw.add(d.draw_time);
                r.flows.debit_response.add(d.debit_time);
                r.flows.purchase.add(d.total);
                let second = (started + d.total - self.measure_from).as_secs() as usize;
                r.per_second.add(second);
            }
            Err(e) => r.errors.add(&e),
        }
    }
}

/// Drives purchases over the fleet as `plan` says and reports the measured window.
pub async fn run(fleet: &Fleet, plan: &RunPlan) -> RunReport {
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let end = measure_from + plan.duration;
    let collector = Arc::new(Mutex::new(Collector {
        report: RunReport::default(),
        measure_from,
    }));
    let plan = Arc::new(plan.clone());
    let mut tasks = JoinSet::new();
    let mut shed = 0u64;
    let n = fleet.boxes.len();
    if n == 0 {
        return RunReport::default();
    }
    match plan.rate {
        Some(rate) => {
            let mut cursor = 0usize;
            let mut i = 0u64;
            loop {
                let due = start + Duration::from_secs_f64(i as f64 / rate);
                i += 1;
                if due >= end {
                    break;
                }
                tokio::time::sleep_until(due).await;
                while tasks.try_join_next().is_some() {}
                if tasks.len() >= plan.concurrency {
                    if due >= measure_from {
                        shed += 1;
                    }
                    continue;
                }
                // The next free box, round robin.
                let mut guard = None;
                for _ in 0..n.min(64) {
                    let b = fleet.boxes[cursor % n].clone();
                    cursor += 1;
                    if let Ok(g) = b.try_lock_owned() {
                        guard = Some((g, (cursor - 1) % n));
                        break;
                    }
                }
                let Some((mut b, at)) = guard else {
                    if due >= measure_from {
                        shed += 1;
                    }
                    continue;
                };
                let (plan, collector) = (plan.clone(), collector.clone());
                let _ = at;
                tasks.spawn(async move {
                    let t = Instant::now();
                    let r = purchase(&mut b, &plan.merchant, &plan.item).await;
                    collector
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .record(t, r);
                });
            }
        }
        None => {
            let next = Arc::new(AtomicUsize::new(0));
            for _ in 0..plan.concurrency.min(n) {
                let (plan, collector, next) = (plan.clone(), collector.clone(), next.clone());
                let boxes = fleet.boxes.clone();
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let at = next.fetch_add(1, Ordering::Relaxed) % boxes.len();
                        let mut b = boxes[at].clone().lock_owned().await;
                        let t = Instant::now();
                        let r = purchase(&mut b, &plan.merchant, &plan.item).await;
                        collector
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .record(t, r);
                    }
                });
            }
        }
    }
    while tasks.join_next().await.is_some() {}
    // Purchases still running at the end finish late; count the time they really took.
    let elapsed = Instant::now().max(end) - measure_from;
    let mut report =
        std::mem::take(&mut collector.lock().unwrap_or_else(|p| p.into_inner()).report);
    report.shed = shed;
    report.elapsed = elapsed;
    // The last partial second would understate the rate.
    let whole = plan.duration.as_secs() as usize;
    report.per_second.0.truncate(whole);
    report
}
