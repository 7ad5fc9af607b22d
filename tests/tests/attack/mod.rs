//! The attack suite's harness (issue 12, "Must show"): a split head end of real `headend`
//! processes ([`deploy`]), the attacker's own QUIC client and frames ([`wire`]), boxes built
//! from it with virtual card files ([`boxes`]), one of every message ([`samples`]), and the
//! value ledger read from the journals and card files ([`ledger`]).
//!
//! Every test checks three things: the refusal and its reason; that no value moved (a
//! [`ledger::Ledger`] before and after); and that an honest box — its own device
//! certificate and card — completes a purchase while the attack runs ([`HonestLoop`]) and
//! right after it.

#![allow(dead_code)] // each test binary uses a different subset

pub mod boxes;
pub mod deploy;
pub mod ledger;
pub mod samples;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use boxes::{BoxClient, Purchase};

/// The demo catalog's pay-per-view event (4.99 EUR) and the other items.
pub const PPV: (&str, &str) = ("CABLE", "ppv-1001");
pub const PPV2: (&str, &str) = ("CABLE", "ppv-1002");
pub const SHOP: (&str, &str) = ("CABLE", "shop-2001");
pub const WEBSHOP: (&str, &str) = ("M-WEBSHOP", "ebook-1");

/// What an honest box saw while an attack ran.
pub struct HonestReport {
    pub client: BoxClient,
    pub purchases: Vec<Purchase>,
    pub failures: Vec<String>,
    pub latencies: Vec<Duration>,
}

impl HonestReport {
    pub fn attempts(&self) -> usize {
        self.purchases.len() + self.failures.len()
    }

    pub fn success_rate(&self) -> f64 {
        if self.attempts() == 0 {
            return 0.0;
        }
        self.purchases.len() as f64 / self.attempts() as f64
    }

    pub fn summary(&self) -> String {
        let mut l = self.latencies.clone();
        l.sort();
        let p = |q: f64| {
            l.get(((l.len().max(1) - 1) as f64 * q).round() as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1e3)
        };
        format!(
            "{}/{} purchases completed ({:.0}%), latency p50 {:.0} ms, max {:.0} ms",
            self.purchases.len(),
            self.attempts(),
            self.success_rate() * 100.0,
            p(0.5),
            p(1.0)
        )
    }
}

/// An honest box buying the pay-per-view event every `every` until stopped.
pub struct HonestLoop {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<HonestReport>,
}

impl HonestLoop {
    pub fn start(client: BoxClient, every: Duration) -> HonestLoop {
        Self::run(client, every, false)
    }

    /// Like [`Self::start`], each purchase on a new connection (a new handshake).
    pub fn start_fresh(client: BoxClient, every: Duration) -> HonestLoop {
        Self::run(client, every, true)
    }

    fn run(mut client: BoxClient, every: Duration, fresh: bool) -> HonestLoop {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let task = tokio::spawn(async move {
            let mut purchases = Vec::new();
            let mut failures = Vec::new();
            let mut latencies = Vec::new();
            // At least one attempt: on two busy cores the attack can end before this task
            // is first polled (a rehearsal saw 0 attempts); the attempt then starts at once.
            while latencies.is_empty() || !s.load(Ordering::Relaxed) {
                let t = Instant::now();
                if fresh {
                    if let Err(e) = client.try_reconnect().await {
                        failures.push(format!("connect: {e:?}"));
                        latencies.push(t.elapsed());
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                }
                match client.buy(PPV.0, PPV.1).await {
                    Ok(p) => {
                        latencies.push(t.elapsed());
                        purchases.push(p);
                    }
                    Err(e) => {
                        eprintln!("honest {}: purchase failed: {e}", client.box_id);
                        latencies.push(t.elapsed());
                        failures.push(e);
                        if client.conn.conn.close_reason().is_some() {
                            client.reconnect().await;
                        }
                    }
                }
                let deadline = t + every;
                while Instant::now() < deadline && !s.load(Ordering::Relaxed) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            HonestReport {
                client,
                purchases,
                failures,
                latencies,
            }
        });
        HonestLoop { stop, task }
    }

    pub async fn finish(self) -> HonestReport {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("the honest box's task")
    }
}

/// The honest box's purchase right after an attack: must complete (a retry allowed only on
/// the refusals that say "retry", within 15 s).
pub async fn honest_after(client: &mut BoxClient, what: &str) -> Purchase {
    let (p, tries) = client
        .buy_patiently(PPV.0, PPV.1, Duration::from_secs(15))
        .await
        .unwrap_or_else(|e| panic!("{what}: the honest box could not buy right after: {e}"));
    eprintln!("{what}: honest purchase right after the attack: ok (try {tries})");
    p
}

/// Asserts the honest box completed at least one purchase during the attack and that every
/// failure, if any, was a "retry" refusal; returns its report.
pub fn assert_honest_during(r: &HonestReport, what: &str) {
    eprintln!("{what}: honest box during the attack: {}", r.summary());
    assert!(
        !r.purchases.is_empty(),
        "{what}: the honest box completed no purchase during the attack: {:?}",
        r.failures
    );
}

/// The reason of an error answer, or a panic naming what came instead.
pub fn reason(o: &wire::Outcome, what: &str) -> String {
    match o.error() {
        Some(e) => e.reason.clone(),
        None => panic!("{what}: expected an error answer, got {o:?}"),
    }
}
