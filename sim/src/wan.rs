//! A WAN simulator: a userspace UDP proxy with one-way delay, jitter and loss, for loopback
//! benchmarks (the kernel here has no netem). Put it between the boxes and the gateway, and
//! between the gateway and a payment role, by pointing the client at [`WanProxy::addr`].
//!
//! - [`Link`] is the sans-IO core of one direction: it decides loss with a seeded RNG, gives
//!   each kept packet its delivery time (delay ± jitter, never before the packet ahead of it:
//!   a link is FIFO, so jitter does not reorder), and bounds its queue (tail drop).
//! - [`WanProxy`] runs it: one front socket facing the clients, and per client address (a
//!   *flow*) one back socket connected to the upstream, so answers find their way back. Each
//!   flow is one task holding both directions' links. Everything is bounded (queue per link,
//!   flows per proxy) and stops by itself: at its lifetime, on [`WanProxy::stop`], and a flow
//!   after `flow_idle` without packets.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// How the simulated network treats each packet, per direction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WanParams {
    /// One-way delay.
    pub delay: Duration,
    /// Uniform jitter around the delay: each packet's delay is in `delay ± jitter` (at least 0).
    pub jitter: Duration,
    /// Probability that a packet is dropped, 0.0 to 1.0.
    pub loss: f64,
    /// Packets a link holds at once; more are dropped (tail drop).
    pub queue_limit: usize,
}

impl Default for WanParams {
    fn default() -> Self {
        Self {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            queue_limit: 4096,
        }
    }
}

impl WanParams {
    /// `rtt` split evenly into two one-way delays.
    pub fn rtt(rtt: Duration) -> Self {
        Self {
            delay: rtt / 2,
            ..Self::default()
        }
    }

    pub fn with_loss(self, loss: f64) -> Self {
        Self { loss, ..self }
    }

    pub fn with_jitter(self, jitter: Duration) -> Self {
        Self { jitter, ..self }
    }
}

/// What became of an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Offered {
    Queued,
    Lost,
    /// The queue was full.
    Overflow,
}

/// One direction of the simulated link (sans-IO).
pub struct Link {
    params: WanParams,
    rng: StdRng,
    queue: VecDeque<(Instant, Vec<u8>)>,
    last_due: Option<Instant>,
}

impl Link {
    pub fn new(params: WanParams, seed: u64) -> Self {
        Self {
            params,
            rng: StdRng::seed_from_u64(seed),
            queue: VecDeque::new(),
            last_due: None,
        }
    }

    pub fn set_params(&mut self, params: WanParams) {
        self.params = params;
    }

    /// A packet that arrived at `now`.
    pub fn offer(&mut self, now: Instant, packet: Vec<u8>) -> Offered {
        if self.params.loss > 0.0 && self.rng.gen_bool(self.params.loss.clamp(0.0, 1.0)) {
            return Offered::Lost;
        }
        if self.queue.len() >= self.params.queue_limit {
            return Offered::Overflow;
        }
        let mut delay = self.params.delay;
        let j = self.params.jitter;
        if !j.is_zero() {
            let offset = self.rng.gen_range(0..=2 * j.as_nanos() as u64);
            delay = (delay + Duration::from_nanos(offset)).saturating_sub(j);
        }
        let mut due = now + delay;
        if let Some(last) = self.last_due {
            due = due.max(last);
        }
        self.last_due = Some(due);
        self.queue.push_back((due, packet));
        Offered::Queued
    }

    /// When the packet at the head is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|(t, _)| *t)
    }

    /// The head packet, if it is due at `now`.
    pub fn pop_due(&mut self, now: Instant) -> Option<Vec<u8>> {
        if self.queue.front().is_some_and(|(t, _)| *t <= now) {
            self.queue.pop_front().map(|(_, p)| p)
        } else {
            None
        }
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// Packet counters of a proxy, both directions together.
#[derive(Debug, Default)]
pub struct WanStats {
    pub forwarded: AtomicU64,
    pub lost: AtomicU64,
    pub overflow: AtomicU64,
    pub flows: AtomicU64,
    pub flows_refused: AtomicU64,
}

impl WanStats {
    fn count(&self, o: Offered) {
        match o {
            Offered::Queued => {}
            Offered::Lost => {
                self.lost.fetch_add(1, Ordering::Relaxed);
            }
            Offered::Overflow => {
                self.overflow.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.forwarded.load(Ordering::Relaxed),
            self.lost.load(Ordering::Relaxed),
            self.overflow.load(Ordering::Relaxed),
        )
    }
}

/// Limits of a proxy beyond the link parameters.
#[derive(Debug, Clone, Copy)]
pub struct ProxyLimits {
    /// The proxy stops by itself after this long.
    pub lifetime: Duration,
    /// A flow without packets this long ends (its back socket is closed).
    pub flow_idle: Duration,
    /// Client addresses served at once; packets from more are dropped.
    pub max_flows: usize,
    /// RNG seed; each flow and direction derives its own.
    pub seed: u64,
}

impl Default for ProxyLimits {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(600),
            flow_idle: Duration::from_secs(120),
            max_flows: 1024,
            seed: 0x5eed,
        }
    }
}

/// A running proxy: clients send to [`addr`](Self::addr), the proxy forwards to the upstream.
pub struct WanProxy {
    addr: SocketAddr,
    params: watch::Sender<WanParams>,
    stop: watch::Sender<bool>,
    stats: Arc<WanStats>,
    task: tokio::task::JoinHandle<()>,
}

impl WanProxy {
    /// Binds `listen` (loopback) and forwards to `upstream`.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        params: WanParams,
        limits: ProxyLimits,
    ) -> io::Result<Self> {
        let front = Arc::new(UdpSocket::bind(listen).await?);
        let addr = front.local_addr()?;
        let (params_tx, params_rx) = watch::channel(params);
        let (stop_tx, stop_rx) = watch::channel(false);
        let stats = Arc::new(WanStats::default());
        let task = tokio::spawn(run_front(
            front,
            upstream,
            params_rx,
            stop_rx,
            stats.clone(),
            limits,
        ));
        Ok(Self {
            addr,
            params: params_tx,
            stop: stop_tx,
            stats,
            task,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// New parameters for every flow, from their next packet on.
    pub fn set_params(&self, params: WanParams) {
        let _ = self.params.send(params);
    }

    pub fn stats(&self) -> &WanStats {
        &self.stats
    }

    /// Stops the proxy and its flows.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

async fn run_front(
    front: Arc<UdpSocket>,
    upstream: SocketAddr,
    params: watch::Receiver<WanParams>,
    mut stop: watch::Receiver<bool>,
    stats: Arc<WanStats>,
    limits: ProxyLimits,
) {
    let deadline = Instant::now() + limits.lifetime;
    let mut flows: HashMap<SocketAddr, mpsc::Sender<(Instant, Vec<u8>)>> = HashMap::new();
    let mut tasks = tokio::task::JoinSet::new();
    let mut buf = vec![0u8; 65_536];
    let mut next_flow = 0u64;
    loop {
        let (n, from) = tokio::select! {
            r = front.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors surface as recv errors on some platforms; keep serving.
                Err(_) => continue,
            },
            _ = stop.changed() => break,
            _ = tokio::time::sleep_until(deadline) => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let now = Instant::now();
        let packet = buf[..n].to_vec();
        if flows.get(&from).is_none_or(|tx| tx.is_closed()) {
            flows.retain(|_, tx| !tx.is_closed());
            if flows.len() >= limits.max_flows {
                stats.flows_refused.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            let back = match UdpSocket::bind(SocketAddr::new(upstream.ip(), 0)).await {
                Ok(s) => s,
                Err(_) => continue,
            };
            if back.connect(upstream).await.is_err() {
                continue;
            }
            let queue = params.borrow().queue_limit.max(1);
            let (tx, rx) = mpsc::channel(queue);
            next_flow += 1;
            stats.flows.fetch_add(1, Ordering::Relaxed);
            tasks.spawn(run_flow(Flow {
                front: front.clone(),
                back,
                client: from,
                rx,
                params: params.clone(),
                stop: stop.clone(),
                stats: stats.clone(),
                idle: limits.flow_idle,
                deadline,
                seed: limits.seed ^ next_flow.wrapping_mul(0x9E37_79B9_7F4A_7C15),
            }));
            flows.insert(from, tx);
        }
        if flows[&from].try_send((now, packet)).is_err() {
            stats.count(Offered::Overflow);
        }
    }
    drop(flows);
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

struct Flow {
    front: Arc<UdpSocket>,
    back: UdpSocket,
    client: SocketAddr,
    rx: mpsc::Receiver<(Instant, Vec<u8>)>,
    params: watch::Receiver<WanParams>,
    stop: watch::Receiver<bool>,
    stats: Arc<WanStats>,
    idle: Duration,
    deadline: Instant,
    seed: u64,
}

async fn run_flow(mut f: Flow) {
    let p = *f.params.borrow();
    let mut up = Link::new(p, f.seed);
    let mut down = Link::new(p, f.seed ^ 0xD0_57);
    let mut buf = vec![0u8; 65_536];
    let mut last_packet = Instant::now();
    let far = f.deadline;
    loop {
        let due = [up.next_due(), down.next_due()]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(far)
            .min(last_packet + f.idle)
            .min(far);
        tokio::select! {
            got = f.rx.recv() => {
                let Some((at, packet)) = got else { return };
                if f.params.has_changed().unwrap_or(false) {
                    let p = *f.params.borrow_and_update();
                    up.set_params(p);
                    down.set_params(p);
                }
                last_packet = at;
                f.stats.count(up.offer(at, packet));
            }
            r = f.back.recv(&mut buf) => {
                if let Ok(n) = r {
                    last_packet = Instant::now();
                    f.stats.count(down.offer(last_packet, buf[..n].to_vec()));
                }
            }
            _ = f.stop.changed() => return,
            _ = tokio::time::sleep_until(due) => {}
        }
        let now = Instant::now();
        if now >= far || (up.is_empty() && down.is_empty() && now >= last_packet + f.idle) {
            return;
        }
        while let Some(p) = up.pop_due(now) {
            if f.back.send(&p).await.is_ok() {
                f.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
        while let Some(p) = down.pop_due(now) {
            if f.front.send_to(&p, f.client).await.is_ok() {
                f.stats.forwarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn delay_keeps_order_even_with_jitter() {
        let params = WanParams {
            delay: ms(25),
            jitter: ms(10),
            ..WanParams::default()
        };
        let mut link = Link::new(params, 7);
        let t0 = Instant::now();
        for i in 0..1000u32 {
            let at = t0 + Duration::from_micros(u64::from(i) * 100);
            assert_eq!(link.offer(at, i.to_be_bytes().to_vec()), Offered::Queued);
        }
        // Nothing is due before the minimum delay.
        assert_eq!(link.pop_due(t0 + ms(14)), None);
        let mut last_due = t0;
        let mut next = 0u32;
        while let Some(due) = link.next_due() {
            assert!(due >= last_due, "due times never go backwards");
            assert!(due >= t0 + ms(15), "at least delay - jitter");
            last_due = due;
            let p = link.pop_due(due).expect("due at its time");
            assert_eq!(u32::from_be_bytes(p.try_into().unwrap()), next, "FIFO");
            next += 1;
        }
        assert_eq!(next, 1000);
        // The last packet left at most delay + jitter after it arrived.
        assert!(last_due <= t0 + Duration::from_micros(999 * 100) + ms(35));
    }

    #[test]
    fn loss_rate_is_within_bounds_and_seeded() {
        let count = |seed| {
            let mut link = Link::new(
                WanParams {
                    loss: 0.05,
                    queue_limit: usize::MAX,
                    ..WanParams::default()
                },
                seed,
            );
            let now = Instant::now();
            (0..100_000)
                .filter(|_| link.offer(now, vec![0]) == Offered::Lost)
                .count()
        };
        let lost = count(42);
        // 5% of 100,000 = 5,000; the standard deviation is ~69, so ±500 is > 7 sigma.
        assert!((4_500..=5_500).contains(&lost), "lost {lost}");
        assert_eq!(lost, count(42), "same seed, same losses");
        let no_loss = Link::new(WanParams::default(), 1);
        assert!(no_loss.is_empty());
    }

    #[test]
    fn queue_is_bounded() {
        let mut link = Link::new(
            WanParams {
                delay: ms(10),
                queue_limit: 8,
                ..WanParams::default()
            },
            1,
        );
        let now = Instant::now();
        let verdicts: Vec<Offered> = (0..12).map(|_| link.offer(now, vec![1, 2, 3])).collect();
        assert_eq!(
            verdicts.iter().filter(|v| **v == Offered::Queued).count(),
            8
        );
        assert_eq!(
            verdicts.iter().filter(|v| **v == Offered::Overflow).count(),
            4
        );
        assert_eq!(link.len(), 8);
        // Draining makes room again.
        assert!(link.pop_due(now + ms(10)).is_some());
        assert_eq!(link.offer(now, vec![4]), Offered::Queued);
    }

    #[tokio::test]
    async fn proxy_forwards_both_ways_and_stops() {
        let echo = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let echo_task = tokio::spawn(async move {
            let mut buf = [0u8; 1500];
            for _ in 0..10 {
                let (n, from) = echo.recv_from(&mut buf).await.unwrap();
                echo.send_to(&buf[..n], from).await.unwrap();
            }
        });
        let proxy = WanProxy::start(
            "127.0.0.1:0".parse().unwrap(),
            echo_addr,
            WanParams::rtt(ms(2)),
            ProxyLimits {
                lifetime: Duration::from_secs(30),
                ..ProxyLimits::default()
            },
        )
        .await
        .unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        client.connect(proxy.addr()).await.unwrap();
        let mut buf = [0u8; 1500];
        for i in 0..10u8 {
            client.send(&[i; 100]).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(10), client.recv(&mut buf))
                .await
                .expect("echo through the proxy")
                .unwrap();
            assert_eq!(&buf[..n], &[i; 100]);
        }
        echo_task.await.unwrap();
        assert_eq!(proxy.stats().snapshot(), (20, 0, 0));
        proxy.stop().await;
    }
}
