//! Who gets a handshake, and who gets a connection slot: the server's admission control.
//!
//! A QUIC Initial packet costs an outsider nothing to send, while a handshake costs the server
//! a TLS state machine and buffers until it finishes or times out. So:
//!
//! - Only an established, authenticated connection counts against `max_connections`; a
//!   handshake takes a [`PendingSlot`] and turns it into a [`ConnectionSlot`] once the peer's
//!   certificate has verified and named it ([`PendingSlot::establish`]).
//! - Pending handshakes have their own bound (`max_pending_handshakes`), a bound per source
//!   IP address (`max_pending_per_source`) and a timeout (`handshake_timeout_ms`, enforced by
//!   the connection task).
//! - A client whose address is not yet validated is sent a QUIC Retry (a stateless round trip
//!   that proves it receives at its address) once `retry_threshold` handshakes are pending, and
//!   always when its address already has a handshake pending. A flood of Initial packets that
//!   never answers costs one Retry packet each and no state.
//! - When every pending place is taken, a client with a validated address takes the place of
//!   a stalled handshake (older than a quarter of the timeout) of the busiest source that has
//!   more pending than its own: many attacking sources can fill the pool, but not keep an
//!   honest box out of it.
//! - Otherwise a handshake over a pending bound is dropped unanswered ([`Decision::Defer`]): an
//!   honest client retransmits its Initial on its own and is admitted once a place is free. At
//!   the connection limit the server refuses at once ([`Decision::Refuse`]).
//!
//! The decisions are plain functions of the counters (no sockets, no clock), tested below.
//! [`RefusalLog`] keeps the log of refusals to one line per source per interval.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::TransportSettings;

/// The "source" the per-source limits count by: an IPv4 address (also when it arrives
/// IPv4-mapped on a dual-stack socket), or an IPv6 /64 — the smallest block a site is given, so
/// one holder of a /64 can't take 2^64 separate shares.
pub(crate) fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(prefix.into())
            }
        },
    }
}

/// Why a handshake or a connection was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` authenticated connections are held.
    Connections,
    /// `max_connections_per_source` connections are held from this address.
    SourceConnections,
    /// `max_pending_handshakes` handshakes are in progress.
    Pending,
    /// `max_pending_per_source` handshakes are in progress from this address.
    SourcePending,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connections => "at the connection limit",
            Self::SourceConnections => "at the connection limit for this source",
            Self::Pending => "at the pending handshake limit",
            Self::SourcePending => "at the pending handshake limit for this source",
        }
    }
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What to do with a new connection attempt (a quinn `Incoming`).
#[derive(Debug)]
pub(crate) enum Decision {
    /// Start the handshake; the slot is released when it is dropped or established.
    Accept(PendingSlot),
    /// Send a QUIC Retry: the client must prove it receives at its address first.
    Retry,
    /// Drop the packet unanswered; the client's retransmission tries again later.
    Defer(Refusal),
    /// Refuse with CONNECTION_REFUSED.
    Refuse(Refusal),
}

/// The limits admission enforces, taken from [`TransportSettings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    pub max_connections: usize,
    /// 0: no per-source connection limit.
    pub max_connections_per_source: usize,
    pub max_pending: usize,
    pub max_pending_per_source: usize,
    pub retry_threshold: usize,
    /// A pending handshake this old may give its place to a fairer claimant (see `decide`).
    pub evict_after: Duration,
}

impl Limits {
    pub fn from_settings(s: &TransportSettings) -> Self {
        Self {
            max_connections: s.max_connections,
            max_connections_per_source: s.max_connections_per_source,
            max_pending: s.max_pending_handshakes,
            max_pending_per_source: s.max_pending_per_source,
            retry_threshold: s.retry_threshold,
            // An honest handshake is done in a few round trips; one that has taken a quarter
            // of the timeout is more likely stalled than slow.
            evict_after: s.handshake_timeout() / 4,
        }
    }
}

#[derive(Debug, Default, Clone, Copy)]
struct PerSource {
    pending: usize,
    established: usize,
}

#[derive(Debug, Default)]
struct Counts {
    pending: usize,
    established: usize,
    /// Only sources with something pending or established: the map shrinks back to empty.
    sources: HashMap<IpAddr, PerSource>,
    /// Every pending handshake, by id: at most `max_pending` entries.
    handshakes: HashMap<u64, Handshake>,
    next_id: u64,
}

#[derive(Debug)]
struct Handshake {
    source: IpAddr,
    since: Instant,
    evict: Arc<Eviction>,
}

/// Tells a pending handshake's task that its place was given to another client.
#[derive(Debug, Default)]
pub(crate) struct Eviction {
    evicted: AtomicBool,
    notify: tokio::sync::Notify,
}

impl Eviction {
    fn evict(&self) {
        self.evicted.store(true, Ordering::SeqCst);
        // Stores a permit when the task is not waiting yet.
        self.notify.notify_one();
    }

    pub fn is_evicted(&self) -> bool {
        self.evicted.load(Ordering::SeqCst)
    }
}

#[derive(Debug, Default)]
struct Counters {
    accepted: AtomicU64,
    retries: AtomicU64,
    deferred: AtomicU64,
    refused: AtomicU64,
    established: AtomicU64,
    handshake_timeouts: AtomicU64,
    handshake_failures: AtomicU64,
    evicted: AtomicU64,
}

/// The admission state shared by the accept loop and every connection task.
#[derive(Debug)]
pub(crate) struct Admission {
    limits: Limits,
    counts: Mutex<Counts>,
    counters: Counters,
    log: Mutex<RefusalLog>,
}

/// A snapshot of the server's admission counters, for tests, benchmarks and status output.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AdmissionStats {
    /// Handshakes in progress now.
    pub pending: usize,
    /// Authenticated connections held now (what `max_connections` bounds).
    pub established: usize,
    /// Source addresses with a handshake pending or a connection held now.
    pub sources: usize,
    /// Handshakes started since the server began.
    pub handshakes_started: u64,
    /// QUIC Retry packets sent (address validation asked).
    pub retries_sent: u64,
    /// Connection attempts dropped unanswered at a pending-handshake bound.
    pub deferred: u64,
    /// Connection attempts refused at a connection limit (before or after the handshake).
    pub refused: u64,
    /// Connections that completed the handshake, authenticated and took a slot.
    pub established_total: u64,
    /// Handshakes dropped at `handshake_timeout_ms`.
    pub handshake_timeouts: u64,
    /// Handshakes that failed (TLS refusal, no usable identity, revoked, lost).
    pub handshake_failures: u64,
    /// Pending handshakes that gave their place to a client from a less busy source.
    pub evicted: u64,
}

/// A live view of a server's admission counters: [`Server::stats`](super::Server::stats).
#[derive(Debug, Clone)]
pub struct ServerStats(pub(crate) Arc<Admission>);

impl ServerStats {
    pub fn snapshot(&self) -> AdmissionStats {
        self.0.stats()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The guarded values are plain counters updated in one step; a panic elsewhere can't leave
    // them half-written.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Admission {
    pub fn new(limits: Limits) -> Arc<Self> {
        Arc::new(Self {
            limits,
            counts: Mutex::new(Counts::default()),
            counters: Counters::default(),
            log: Mutex::new(RefusalLog::new(REFUSAL_LOG_INTERVAL, REFUSAL_LOG_SOURCES)),
        })
    }

    /// Decides what to do with a connection attempt from `ip`; `validated` is quinn's
    /// `Incoming::remote_address_validated` (the client came back with a Retry token).
    pub fn decide(self: &Arc<Self>, ip: IpAddr, validated: bool) -> Decision {
        self.decide_at(ip, validated, Instant::now())
    }

    /// [`decide`](Self::decide) at a given time. When every pending place is taken, a client
    /// with a validated address takes the place of the oldest handshake (running at least
    /// `evict_after`) of the busiest source that has more handshakes pending than its own:
    /// a stalled handshake from a flooding source gives way; an honest one is done long
    /// before, and one source can't push out another as busy as itself.
    pub fn decide_at(self: &Arc<Self>, ip: IpAddr, validated: bool, now: Instant) -> Decision {
        let ip = source_of(ip);
        let l = self.limits;
        let mut c = lock(&self.counts);
        let src = c.sources.get(&ip).copied().unwrap_or_default();
        let decision = if c.established >= l.max_connections {
            Decision::Refuse(Refusal::Connections)
        } else if l.max_connections_per_source > 0
            && src.established >= l.max_connections_per_source
        {
            Decision::Refuse(Refusal::SourceConnections)
        } else if !validated && (src.pending > 0 || c.pending >= l.retry_threshold) {
            Decision::Retry
        } else if src.pending >= l.max_pending_per_source {
            Decision::Defer(Refusal::SourcePending)
        } else if c.pending >= l.max_pending && !(validated && self.evict_for(&mut c, src, now)) {
            Decision::Defer(Refusal::Pending)
        } else {
            c.pending += 1;
            c.sources.entry(ip).or_default().pending += 1;
            let id = c.next_id;
            c.next_id += 1;
            let evict = Arc::new(Eviction::default());
            c.handshakes.insert(
                id,
                Handshake {
                    source: ip,
                    since: now,
                    evict: evict.clone(),
                },
            );
            self.counters.accepted.fetch_add(1, Ordering::Relaxed);
            return Decision::Accept(PendingSlot {
                admission: Some(self.clone()),
                ip,
                id,
                evict,
            });
        };
        drop(c);
        let counter = match decision {
            Decision::Retry => &self.counters.retries,
            Decision::Defer(_) => &self.counters.deferred,
            _ => &self.counters.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        decision
    }

    /// Frees a place in the pending pool for a claimant from a source with `claimant`'s counts:
    /// evicts the oldest handshake (at least `evict_after` old) of the busiest source with
    /// more handshakes pending than the claimant's. `false` when there is none.
    fn evict_for(&self, c: &mut Counts, claimant: PerSource, now: Instant) -> bool {
        let victim = c
            .handshakes
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.since) >= self.limits.evict_after)
            .filter_map(|(id, h)| {
                let busy = c.sources.get(&h.source).map_or(0, |s| s.pending);
                (busy > claimant.pending).then_some((busy, std::cmp::Reverse(h.since), *id))
            })
            .max()
            .map(|(_, _, id)| id);
        let Some(id) = victim else {
            return false;
        };
        if let Some(h) = Self::take_pending(c, id) {
            h.evict.evict();
        }
        self.counters.evicted.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Takes handshake `id` off the pending counts; `None` if it already was (finished,
    /// dropped or evicted: whichever comes first counts, once).
    fn take_pending(c: &mut Counts, id: u64) -> Option<Handshake> {
        let h = c.handshakes.remove(&id)?;
        c.pending = c.pending.saturating_sub(1);
        Self::update_source(c, h.source, |s| s.pending = s.pending.saturating_sub(1));
        Some(h)
    }

    /// A handshake ended without a connection (pending slot dropped).
    fn release_pending(&self, id: u64) {
        Self::take_pending(&mut lock(&self.counts), id);
    }

    fn release_established(&self, ip: IpAddr) {
        let mut c = lock(&self.counts);
        c.established = c.established.saturating_sub(1);
        Self::update_source(&mut c, ip, |s| {
            s.established = s.established.saturating_sub(1)
        });
    }

    fn update_source(c: &mut Counts, ip: IpAddr, f: impl FnOnce(&mut PerSource)) {
        if let Entry::Occupied(mut e) = c.sources.entry(ip) {
            f(e.get_mut());
            if e.get().pending == 0 && e.get().established == 0 {
                e.remove();
            }
        }
    }

    pub fn handshake_timed_out(&self) {
        self.counters
            .handshake_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn handshake_failed(&self) {
        self.counters
            .handshake_failures
            .fetch_add(1, Ordering::Relaxed);
    }

    /// `Some(lines suppressed since the last one)` when a refusal from `ip` may be logged now.
    pub fn may_log(&self, ip: IpAddr) -> Option<u64> {
        lock(&self.log).check(source_of(ip), Instant::now())
    }

    pub fn stats(&self) -> AdmissionStats {
        let c = lock(&self.counts);
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        AdmissionStats {
            pending: c.pending,
            established: c.established,
            sources: c.sources.len(),
            handshakes_started: n(&self.counters.accepted),
            retries_sent: n(&self.counters.retries),
            deferred: n(&self.counters.deferred),
            refused: n(&self.counters.refused),
            established_total: n(&self.counters.established),
            handshake_timeouts: n(&self.counters.handshake_timeouts),
            handshake_failures: n(&self.counters.handshake_failures),
            evicted: n(&self.counters.evicted),
        }
    }
}

/// A handshake in progress: counted against the pending bounds until dropped or established.
#[derive(Debug)]
pub(crate) struct PendingSlot {
    /// `None` once established (the drop then releases nothing).
    admission: Option<Arc<Admission>>,
    ip: IpAddr,
    id: u64,
    evict: Arc<Eviction>,
}

impl PendingSlot {
    /// Completes when this handshake's place has been given to another client.
    pub async fn evicted(&self) {
        if !self.evict.is_evicted() {
            self.evict.notify.notified().await;
        }
    }

    /// The handshake finished and the peer is authenticated: trade the pending slot for a
    /// connection slot, if the connection limits allow. On refusal the pending slot is released.
    pub fn establish(mut self) -> Result<ConnectionSlot, Refusal> {
        let Some(admission) = self.admission.take() else {
            unreachable!("a pending slot is established at most once (it is consumed)")
        };
        let l = admission.limits;
        let mut c = lock(&admission.counts);
        // Off the pending counts (unless an eviction just took it off: the handshake won the
        // race, and is as welcome as any other).
        Admission::take_pending(&mut c, self.id);
        let src_established = c.sources.entry(self.ip).or_default().established;
        let refusal = if c.established >= l.max_connections {
            Some(Refusal::Connections)
        } else if l.max_connections_per_source > 0
            && src_established >= l.max_connections_per_source
        {
            Some(Refusal::SourceConnections)
        } else {
            None
        };
        if let Some(why) = refusal {
            Admission::update_source(&mut c, self.ip, |_| {});
            drop(c);
            admission.counters.refused.fetch_add(1, Ordering::Relaxed);
            return Err(why);
        }
        c.established += 1;
        if let Some(s) = c.sources.get_mut(&self.ip) {
            s.established += 1;
        }
        drop(c);
        admission
            .counters
            .established
            .fetch_add(1, Ordering::Relaxed);
        Ok(ConnectionSlot {
            admission,
            ip: self.ip,
        })
    }
}

impl Drop for PendingSlot {
    fn drop(&mut self) {
        if let Some(admission) = self.admission.take() {
            admission.release_pending(self.id);
        }
    }
}

/// An established connection's place under `max_connections`; released when dropped.
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.admission.release_established(self.ip);
    }
}

/// How often one source's refusals may be logged.
pub(crate) const REFUSAL_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// Sources remembered by the refusal log; past that (a spoofed or distributed flood), the
/// remaining sources share one line per interval.
pub(crate) const REFUSAL_LOG_SOURCES: usize = 4096;

/// Rate limit for refusal log lines: at most one per source per interval, and while more than
/// `max_sources` sources are being refused, one per interval for all the others together.
/// Suppressed lines are counted and reported on the next line for that source.
#[derive(Debug)]
pub(crate) struct RefusalLog {
    interval: Duration,
    max_sources: usize,
    sources: HashMap<IpAddr, LogEntry>,
    others: Option<LogEntry>,
}

#[derive(Debug, Clone, Copy)]
struct LogEntry {
    last: Instant,
    suppressed: u64,
}

impl LogEntry {
    /// Logs when the interval is over (returning what was suppressed), counts otherwise.
    fn check(&mut self, now: Instant, interval: Duration) -> Option<u64> {
        if now.saturating_duration_since(self.last) >= interval {
            self.last = now;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

impl RefusalLog {
    pub fn new(interval: Duration, max_sources: usize) -> Self {
        Self {
            interval,
            max_sources,
            sources: HashMap::new(),
            others: None,
        }
    }

    /// `Some(suppressed)` when a line about `ip` may be written at `now`.
    pub fn check(&mut self, ip: IpAddr, now: Instant) -> Option<u64> {
        let interval = self.interval;
        if let Some(e) = self.sources.get_mut(&ip) {
            return e.check(now, interval);
        }
        if self.sources.len() >= self.max_sources {
            // Forget the sources whose interval is over and that have nothing to report.
            self.sources.retain(|_, e| {
                now.saturating_duration_since(e.last) < interval || e.suppressed > 0
            });
        }
        if self.sources.len() < self.max_sources {
            self.sources.insert(
                ip,
                LogEntry {
                    last: now,
                    suppressed: 0,
                },
            );
            return Some(0);
        }
        match &mut self.others {
            Some(e) => e.check(now, interval),
            None => {
                self.others = Some(LogEntry {
                    last: now,
                    suppressed: 0,
                });
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_connections: 3,
            max_connections_per_source: 0,
            max_pending: 4,
            max_pending_per_source: 2,
            retry_threshold: 3,
            evict_after: Duration::from_secs(1),
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    fn accept(a: &Arc<Admission>, from: IpAddr, validated: bool) -> PendingSlot {
        match a.decide(from, validated) {
            Decision::Accept(slot) => slot,
            other => panic!("expected Accept from {from}, got {other:?}"),
        }
    }

    #[test]
    fn a_source_with_a_pending_handshake_must_validate_its_address() {
        let a = Admission::new(limits());
        let _first = accept(&a, ip(1), false);
        assert!(matches!(a.decide(ip(1), false), Decision::Retry));
        // Another source, below the threshold, needs no Retry.
        let _other = accept(&a, ip(2), false);
        // Back with a token: admitted.
        let _second = accept(&a, ip(1), true);
        assert_eq!(a.stats().retries_sent, 1);
    }

    #[test]
    fn every_unvalidated_client_gets_a_retry_under_load() {
        let a = Admission::new(limits());
        let _slots: Vec<_> = (1..=3).map(|i| accept(&a, ip(i), false)).collect();
        // 3 pending = the threshold: a fresh source must validate first...
        assert!(matches!(a.decide(ip(9), false), Decision::Retry));
        // ...and is admitted with a token.
        let _s = accept(&a, ip(9), true);
    }

    #[test]
    fn retry_threshold_zero_always_asks_for_validation() {
        let a = Admission::new(Limits {
            retry_threshold: 0,
            ..limits()
        });
        assert!(matches!(a.decide(ip(1), false), Decision::Retry));
        let _s = accept(&a, ip(1), true);
    }

    #[test]
    fn per_source_pending_bound() {
        let a = Admission::new(limits());
        let s1 = accept(&a, ip(1), true);
        let _s2 = accept(&a, ip(1), true);
        assert!(matches!(
            a.decide(ip(1), true),
            Decision::Defer(Refusal::SourcePending)
        ));
        // Other sources are not affected.
        let _o = accept(&a, ip(2), true);
        // A finished (or timed-out, or aborted) handshake gives the source its slot back.
        drop(s1);
        let _s3 = accept(&a, ip(1), true);
        assert_eq!(a.stats().deferred, 1);
    }

    #[test]
    fn pending_bound_across_sources() {
        let a = Admission::new(limits());
        let slots: Vec<_> = (1..=4).map(|i| accept(&a, ip(i), true)).collect();
        assert_eq!(a.stats().pending, 4);
        assert!(matches!(
            a.decide(ip(5), true),
            Decision::Defer(Refusal::Pending)
        ));
        drop(slots);
        let s = a.stats();
        assert_eq!((s.pending, s.sources), (0, 0), "{s:?}");
        let _again = accept(&a, ip(5), true);
    }

    #[test]
    fn a_full_pool_gives_a_stalled_handshake_of_the_busiest_source_to_a_newcomer() {
        let a = Admission::new(Limits {
            max_pending_per_source: 3,
            retry_threshold: 100,
            ..limits()
        });
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let take = |from, validated, t| match a.decide_at(from, validated, t) {
            Decision::Accept(slot) => slot,
            other => panic!("expected Accept, got {other:?}"),
        };
        // Source 1 holds 3 places (the first the oldest), source 2 the fourth: the pool is full.
        let oldest = take(ip(1), true, at(0));
        let s1b = take(ip(1), true, at(100));
        let _s1c = take(ip(1), true, at(200));
        let s2 = take(ip(2), true, at(0));
        // Too young to give way, and an unvalidated address never evicts anyone.
        assert!(matches!(
            a.decide_at(ip(3), true, at(900)),
            Decision::Defer(Refusal::Pending)
        ));
        assert!(matches!(
            a.decide_at(ip(3), false, at(5000)),
            Decision::Defer(Refusal::Pending)
        ));
        // Old enough: the newcomer takes the busiest source's oldest place (not source 2's,
        // though it is as old).
        let newcomer = take(ip(3), true, at(1500));
        assert!(oldest.evict.is_evicted() && !s2.evict.is_evicted() && !s1b.evict.is_evicted());
        let s = a.stats();
        assert_eq!((s.pending, s.evicted), (4, 1), "{s:?}");
        // The evicted task's slot, dropped later, releases nothing twice.
        drop(oldest);
        assert_eq!(a.stats().pending, 4);
        // Nobody is busier than source 1 (2 left) itself: it can't push anyone out.
        assert!(matches!(
            a.decide_at(ip(1), true, at(3000)),
            Decision::Defer(Refusal::Pending)
        ));
        drop((newcomer, s1b, s2));
        let s = a.stats();
        assert_eq!((s.pending, s.sources), (1, 1), "{s:?}");
    }

    #[tokio::test]
    async fn an_evicted_handshake_hears_of_it() {
        let a = Admission::new(Limits {
            max_pending: 1,
            retry_threshold: 100,
            ..limits()
        });
        let t0 = Instant::now();
        let Decision::Accept(victim) = a.decide_at(ip(1), true, t0) else {
            panic!()
        };
        let waiting = tokio::spawn(async move {
            victim.evicted().await;
            victim
        });
        let Decision::Accept(_winner) = a.decide_at(ip(2), true, t0 + Duration::from_secs(2))
        else {
            panic!("the stalled handshake should give way")
        };
        let victim = tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the evicted handshake's task was not told")
            .unwrap();
        // A handshake that finished in the race still gets its connection (its pending
        // place was given away, not its right to connect).
        assert!(victim.establish().is_ok());
        assert_eq!(a.stats().pending, 1);
    }

    #[test]
    fn pending_handshakes_take_no_connection_permit() {
        // One connection allowed; handshakes pending beyond that do not count against it.
        let a = Admission::new(Limits {
            max_connections: 1,
            ..limits()
        });
        let p1 = accept(&a, ip(1), true);
        let p2 = accept(&a, ip(2), true);
        let p3 = accept(&a, ip(3), true);
        assert_eq!(a.stats().established, 0);
        // The first to authenticate takes the one permit...
        let conn = p2.establish().expect("permit free");
        assert_eq!((a.stats().pending, a.stats().established), (2, 1));
        // ...new attempts are refused at once while it is held...
        assert!(matches!(
            a.decide(ip(4), true),
            Decision::Refuse(Refusal::Connections)
        ));
        // ...and a handshake that finishes now is refused after it, releasing its pending slot.
        assert_eq!(p1.establish().unwrap_err(), Refusal::Connections);
        assert_eq!(a.stats().pending, 1);
        drop(conn);
        let _c3 = p3.establish().expect("permit back");
        let s = a.stats();
        assert_eq!((s.pending, s.established, s.sources), (0, 1, 1), "{s:?}");
        assert_eq!(s.established_total, 2);
    }

    #[test]
    fn per_source_connection_limit_when_set() {
        let a = Admission::new(Limits {
            max_connections_per_source: 1,
            ..limits()
        });
        let _c = accept(&a, ip(1), true).establish().unwrap();
        assert!(matches!(
            a.decide(ip(1), true),
            Decision::Refuse(Refusal::SourceConnections)
        ));
        let _d = accept(&a, ip(2), true).establish().unwrap();
    }

    #[test]
    fn an_ipv6_64_is_one_source() {
        let a = Admission::new(limits());
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        let _s1 = accept(&a, v6("2001:db8:1:2::1"), true);
        let _s2 = accept(&a, v6("2001:db8:1:2:ffff::9"), true);
        assert!(matches!(
            a.decide(v6("2001:db8:1:2:abcd::1"), true),
            Decision::Defer(Refusal::SourcePending)
        ));
        // The next /64 is another source; an IPv4-mapped address is its IPv4 address.
        let _o = accept(&a, v6("2001:db8:1:3::1"), true);
        let _m = accept(&a, v6("::ffff:192.0.2.1"), true);
        assert!(matches!(a.decide(ip(1), false), Decision::Retry));
    }

    #[test]
    fn refusals_are_logged_once_per_source_per_interval() {
        let t0 = Instant::now();
        let sec = Duration::from_secs(1);
        let mut log = RefusalLog::new(Duration::from_secs(10), 2);
        assert_eq!(log.check(ip(1), t0), Some(0));
        for i in 1..=5 {
            assert_eq!(log.check(ip(1), t0 + i * sec), None);
        }
        assert_eq!(
            log.check(ip(2), t0),
            Some(0),
            "another source logs its own line"
        );
        // The next line after the interval says how many were suppressed.
        assert_eq!(log.check(ip(1), t0 + 10 * sec), Some(5));
        assert_eq!(log.check(ip(1), t0 + 11 * sec), None);
    }

    #[test]
    fn a_spoofed_flood_of_sources_shares_one_line() {
        let t0 = Instant::now();
        let mut log = RefusalLog::new(Duration::from_secs(10), 2);
        assert_eq!(log.check(ip(1), t0), Some(0));
        assert_eq!(log.check(ip(2), t0), Some(0));
        // The table is full: every further source shares the "others" line.
        assert_eq!(log.check(ip(3), t0), Some(0));
        let lines = (4..=200)
            .filter(|i| log.check(ip(*i as u8), t0).is_some())
            .count();
        assert_eq!(lines, 0);
        // Once the interval is over, quiet entries are forgotten and new sources get lines.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(log.check(ip(7), later), Some(0));
    }
}
