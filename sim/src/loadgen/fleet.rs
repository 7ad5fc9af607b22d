//! A fleet of simulated boxes in one process: each its own device certificate, virtual purse
//! card and QUIC connection ([`SimBox`]), many connections sharing a few client UDP sockets.
//! Drives purchases at a target rate (open loop) or as fast as possible (closed loop), timing
//! each flow at the box.
//!
//! Each box keeps a [`Link`]: what it needs to connect again. A box whose connection died
//! (closed, reset, idle timeout) or went silent (a step got no answer in time — e.g. the
//! gateway was restarted and the old connection will never answer) drops it and reconnects
//! with a capped backoff before its next purchase, so a fleet survives a gateway restart.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::messages::{Message, Offer};
use proto::purse::IssuerKeys;
use tokio::task::JoinSet;
use tokio::time::Instant;

use super::stats::{Errors, Flows, PerSecond};
use crate::sim_box::{self, SimBox};
use headend::pki::OperatorCa;
use headend::quic::{BoxId, ClientTls, QuicClient, TransportSettings, load_certs};
use headend::role::to_payload;

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

/// What a box needs to connect again: its identity, the client socket it shares, where the
/// gateway is.
#[derive(Clone)]
pub struct Link {
    pub identity: BoxIdentity,
    endpoint: quinn::Endpoint,
    addr: SocketAddr,
    settings: TransportSettings,
}

impl Link {
    /// Closes `b`'s connection (if it still is one) and connects again, bounded by `limit`.
    pub async fn reconnect(&self, b: &mut SimBox, limit: Duration) -> Result<(), String> {
        b.client
            .connection()
            .close(headend::quic::AppCode::Closed.varint(), b"reconnecting");
        let c = tokio::time::timeout(
            limit,
            QuicClient::connect_shared(
                &self.endpoint,
                &self.identity.tls,
                &self.settings,
                self.addr,
                "localhost",
            ),
        )
        .await
        .map_err(|_| format!("reconnect: no handshake within {} ms", limit.as_millis()))?
        .map_err(|e| format!("reconnect: {e}"))?;
        b.client = c;
        Ok(())
    }

    /// Reconnects until it works or `deadline` passes, doubling the pause from 100 ms up to
    /// 2 s between attempts.
    pub async fn reconnect_until(&self, b: &mut SimBox, deadline: Instant) -> Result<(), String> {
        let mut pause = Duration::from_millis(100);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let r = self
                .reconnect(
                    b,
                    left.clamp(Duration::from_millis(1), Duration::from_secs(5)),
                )
                .await;
            if r.is_ok() || Instant::now() + pause >= deadline {
                return r;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }
}

/// Whether a failed exchange says `b`'s connection is gone or unusable: closed (reset, idle
/// timeout, refused), or silent past a step's deadline. A refusal from the head end (an
/// `Error` answer) is not: the connection works.
pub fn connection_lost(b: &SimBox, failure: &str) -> bool {
    b.client.connection().close_reason().is_some() || failure.contains(NO_ANSWER)
}

/// The text [`purchase`] puts in a failure when a step had no answer in time.
pub const NO_ANSWER: &str = "no answer within";

/// Connected boxes.
pub struct Fleet {
    pub boxes: Vec<Arc<tokio::sync::Mutex<SimBox>>>,
    /// Each box's way back to the gateway (same order as `boxes`).
    pub links: Arc<Vec<Link>>,
    /// Each card's balance when personalised.
    pub initial_balance: u64,
    /// Connections that failed, by reason.
    pub connect_errors: Errors,
    endpoints: Vec<quinn::Endpoint>,
}

/// How a fleet connects.
#[derive(Debug, Clone, Copy)]
pub struct ConnectPlan {
    /// Connections per client UDP socket.
    pub per_endpoint: usize,
    /// Handshakes in flight at once.
    pub parallel: usize,
    pub balance: u64,
}

impl Default for ConnectPlan {
    fn default() -> Self {
        Self {
            per_endpoint: 1000,
            parallel: 64,
            balance: 1 << 40,
        }
    }
}

impl Fleet {
    /// Connects every identity to `addr` (server name `localhost`), each with a fresh card
    /// personalised under `issuer`; card ids start at `first_card`.
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
            let id = id.clone();
            let settings = settings.clone();
            let permit = limit.clone().acquire_owned().await.expect("never closed");
            tasks.spawn(async move {
                let r = tokio::time::timeout(
                    Duration::from_secs(30),
                    QuicClient::connect_shared(&endpoint, &id.tls, &settings, addr, "localhost"),
                )
                .await;
                drop(permit);
                let r = match r {
                    Ok(Ok(c)) => Ok(c),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(_) => Err("handshake timed out (30 s)".into()),
                };
                (i, id.box_id, r)
            });
        }
        let mut connected: Vec<(usize, String, QuicClient)> = Vec::with_capacity(ids.len());
        let mut connect_errors = Errors::default();
        while let Some(j) = tasks.join_next().await {
            match j {
                Ok((i, box_id, Ok(client))) => connected.push((i, box_id, client)),
                Ok((_, _, Err(e))) => connect_errors.add(&e),
                Err(e) => connect_errors.add(&format!("connect task: {e}")),
            }
        }
        connected.sort_by_key(|(i, _, _)| *i);
        let links = connected
            .iter()
            .map(|(i, _, _)| Link {
                identity: ids[*i].clone(),
                endpoint: endpoints[*i / plan.per_endpoint.max(1)].clone(),
                addr,
                settings: settings.clone(),
            })
            .collect();
        let boxes = connected
            .into_iter()
            .map(|(i, id, client)| {
                let card = sim_box::new_card(
                    issuer,
                    first_card + i as u64,
                    plan.balance,
                    plan.balance * 2,
                );
                Arc::new(tokio::sync::Mutex::new(SimBox { id, client, card }))
            })
            .collect();
        Ok(Fleet {
            boxes,
            links: Arc::new(links),
            initial_balance: plan.balance,
            connect_errors,
            endpoints,
        })
    }

    /// Takes another fleet's boxes (connected to the same head end) into this one.
    pub fn absorb(&mut self, other: Fleet) {
        self.boxes.extend(other.boxes);
        let mut links = self.links.as_ref().clone();
        links.extend(other.links.iter().cloned());
        self.links = Arc::new(links);
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

    /// Closes every connection and waits (bounded) for the server to be told.
    pub async fn close(self) {
        for b in &self.boxes {
            b.lock()
                .await
                .client
                .connection()
                .close(headend::quic::AppCode::Closed.varint(), b"fleet done");
        }
        for e in self.endpoints {
            let _ = tokio::time::timeout(Duration::from_secs(5), e.wait_idle()).await;
        }
    }
}

/// The box's view of one purchase.
pub struct Done {
    pub offer: Offer,
    pub offer_time: Duration,
    pub draw_time: Duration,
    pub debit_time: Duration,
    pub total: Duration,
}

fn answer_err(step: &str, m: &Message) -> String {
    match m {
        Message::Error(e) => format!("{step}: {:?}: {}", e.code, e.reason),
        other => format!("{step}: unexpected {}", other.kind()),
    }
}

async fn within<T, E: std::fmt::Display>(
    limit: Duration,
    step: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, String> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(format!("{step}: {e}")),
        Err(_) => Err(format!("{step}: {NO_ANSWER} {} ms", limit.as_millis())),
    }
}

/// One purchase as the box makes it (offer; draw request and debit response on one stream),
/// each exchange bounded by `step_timeout`. A debit response whose answer is lost is sent
/// again on a new stream up to `resend` times, as the box does from its journal (the gateway
/// answers a retried debit response with the same receipt).
pub async fn purchase(
    b: &mut SimBox,
    merchant: &str,
    item: &str,
    step_timeout: Duration,
    resend: u32,
) -> Result<Done, String> {
    let t0 = Instant::now();
    let offer = within(step_timeout, "offer", b.offer(merchant, item)).await?;
    let t1 = Instant::now();
    let draw = b.draw_request(&offer)?;
    let mut txn = within(step_timeout, "draw", b.client.transaction()).await?;
    let answer = within(
        step_timeout,
        "draw",
        txn.exchange(&to_payload(&Message::DrawRequest(draw))),
    )
    .await?;
    let answer = Message::from_payload(&answer).map_err(|e| format!("draw: {e}"))?;
    let cmd =
        SimBox::open_debit_command(&offer, &answer).map_err(|_| answer_err("draw", &answer))?;
    let t2 = Instant::now();
    let resp = b.debit(&offer, &cmd)?;
    let payload = to_payload(&Message::DebitResponse(resp));
    let mut result = within(step_timeout, "debit response", txn.last(&payload)).await;
    let mut tries = 0;
    while result.is_err() && tries < resend {
        tries += 1;
        result = within(
            step_timeout,
            "debit response (resent)",
            b.client.call(&payload),
        )
        .await;
    }
    let receipt = Message::from_payload(&result?).map_err(|e| format!("debit response: {e}"))?;
    let t3 = Instant::now();
    match receipt {
        Message::Receipt(r) if r.released => Ok(Done {
            offer,
            offer_time: t1 - t0,
            draw_time: t2 - t1,
            debit_time: t3 - t2,
            total: t3 - t0,
        }),
        Message::Receipt(r) => Err(format!("receipt without release: {}", r.text)),
        other => Err(answer_err("debit response", &other)),
    }
}

/// [`purchase`], then, if the connection turned out lost, a fresh one (bounded by the step
/// timeout) so the box's next purchase does not die on it too.
pub async fn purchase_and_heal(
    b: &mut SimBox,
    link: &Link,
    plan: &RunPlan,
) -> Result<Done, String> {
    let r = purchase(
        b,
        &plan.merchant,
        &plan.item,
        plan.step_timeout,
        plan.resend,
    )
    .await;
    if let Err(e) = &r {
        if connection_lost(b, e) {
            if let Err(again) = link.reconnect(b, plan.step_timeout).await {
                tracing::debug!(box_id = %b.id, error = %again, "reconnect failed; next purchase retries");
            }
        }
    }
    r
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
    pub step_timeout: Duration,
    pub resend: u32,
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
            step_timeout: Duration::from_secs(10),
            resend: 3,
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
                let links = fleet.links.clone();
                tasks.spawn(async move {
                    let t = Instant::now();
                    let r = purchase_and_heal(&mut b, &links[at], &plan).await;
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
                let links = fleet.links.clone();
                tasks.spawn(async move {
                    while Instant::now() < end {
                        let at = next.fetch_add(1, Ordering::Relaxed) % boxes.len();
                        let mut b = boxes[at].clone().lock_owned().await;
                        let t = Instant::now();
                        let r = purchase_and_heal(&mut b, &links[at], &plan).await;
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
