//! What one set-top box may ask of the gateway, so that no box can starve the others or
//! make the head end journal without end (issue 12: offers are free, one box holds the
//! security-card pool):
//! - [`RateLimits`]: a token bucket per box and kind of request (purchase offers, load
//!   offers, catalog requests); past it the box gets `RateLimited` with the wait;
//! - [`OpenDraws`]: how many purchases a box may have drawn and not yet finished (its debit
//!   response, a cancel or a reversal ends one; so does age), so one box cannot hold the
//!   pool's security cards.
//!
//! Both live in memory: they bound load, not money, and a restart only resets them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;

/// Per-box limits, from `[gateway]` (all optional; these are the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// Purchase offer requests a box may make per minute (sustained).
    pub offers_per_minute: u32,
    /// Load offer requests per minute.
    pub load_offers_per_minute: u32,
    /// Catalog requests per minute.
    pub catalog_per_minute: u32,
    /// Refused steps of a box's own transactions per minute (draw requests, debit
    /// responses, cancels, load requests and responses the head end refused for good: no
    /// proof, a forged signature, already completed, another box's…). Past the burst, the
    /// box's next such step is `RateLimited` before it reaches a journal.
    pub refusals_per_minute: u32,
    /// Requests of one kind a box may make at once before the per-minute rate applies.
    pub burst: u32,
    /// Purchases a box may have drawn and not finished at once.
    pub max_open_draws_per_box: usize,
    /// After this many seconds an unfinished draw no longer counts (the payment server
    /// reverses it at its own deadline).
    pub open_draw_secs: u64,
}

impl Default for LimitSettings {
    fn default() -> Self {
        Self {
            offers_per_minute: 30,
            load_offers_per_minute: 10,
            catalog_per_minute: 30,
            refusals_per_minute: 30,
            burst: 10,
            max_open_draws_per_box: 2,
            open_draw_secs: 60,
        }
    }
}

/// The kinds of request that are rate-limited per box.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Offer,
    LoadOffer,
    Catalog,
    /// A step of the box's own transaction that was refused for good.
    Refused,
    /// A refunds-due request (at the catalog's rate: once per card insertion is the
    /// norm).
    RefundsDue,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Token buckets per (box, kind).
pub struct RateLimits {
    settings: LimitSettings,
    buckets: Mutex<HashMap<(String, Kind), Bucket>>,
}

impl RateLimits {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            settings,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    fn per_minute(&self, kind: Kind) -> u32 {
        match kind {
            Kind::Offer => self.settings.offers_per_minute,
            Kind::LoadOffer => self.settings.load_offers_per_minute,
            Kind::Catalog | Kind::RefundsDue => self.settings.catalog_per_minute,
            Kind::Refused => self.settings.refusals_per_minute,
        }
    }

    /// Takes one request of `kind` for `box_id` at `now`: `Ok`, or how long to wait.
    ///
    /// # Errors
    /// The box is over its rate: the wait until its next request is allowed.
    pub fn take(&self, box_id: &str, kind: Kind, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.per_minute(kind).max(1)) / 60.0;
        let burst = f64::from(self.settings.burst.max(1));
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let e = b.entry((box_id.to_string(), kind)).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        e.tokens = (e.tokens + now.saturating_duration_since(e.at).as_secs_f64() * rate).min(burst);
        e.at = now;
        if e.tokens >= 1.0 {
            e.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - e.tokens) / rate))
        }
    }

    /// Whether `box_id` may make a request of `kind` at `now`, without taking one: `Ok`, or
    /// how long to wait.
    ///
    /// # Errors
    /// The box is over its rate: the wait until its next request is allowed.
    pub fn check(&self, box_id: &str, kind: Kind, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(self.per_minute(kind).max(1)) / 60.0;
        let burst = f64::from(self.settings.burst.max(1));
        let b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let Some(e) = b.get(&(box_id.to_string(), kind)) else {
            return Ok(());
        };
        let tokens =
            (e.tokens + now.saturating_duration_since(e.at).as_secs_f64() * rate).min(burst);
        if tokens >= 1.0 {
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - tokens) / rate))
        }
    }

    /// Forgets buckets that have refilled (idle boxes): keeps memory bounded by the active
    /// boxes.
    pub fn prune(&self, now: Instant) {
        let full_after = Duration::from_secs(60 * u64::from(self.settings.burst.max(1)));
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, b| now.saturating_duration_since(b.at) < full_after);
    }
}

/// The purchases each box has drawn and not yet finished.
pub struct OpenDraws {
    max: usize,
    ttl: Duration,
    open: Mutex<HashMap<String, Vec<(String, Instant)>>>,
}

impl OpenDraws {
    pub fn new(settings: LimitSettings) -> Self {
        Self {
            max: settings.max_open_draws_per_box.max(1),
            ttl: Duration::from_secs(settings.open_draw_secs),
            open: Mutex::new(HashMap::new()),
        }
    }

    /// Records `txid` as drawn by `box_id`, unless the box already has its maximum open
    /// (then `Err` with how many).
    ///
    /// # Errors
    /// The box has `max` purchases open already.
    pub fn open(&self, box_id: &str, txid: &str, now: Instant) -> Result<(), usize> {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.entry(box_id.to_string()).or_default();
        v.retain(|(t, at)| t != txid && now.saturating_duration_since(*at) < self.ttl);
        if v.len() >= self.max {
            return Err(v.len());
        }
        v.push((txid.to_string(), now));
        Ok(())
    }

    /// `txid` of `box_id` is finished (receipt, cancel, reversal).
    pub fn close(&self, box_id: &str, txid: &str) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = m.get_mut(box_id) {
            v.retain(|(t, _)| t != txid);
            if v.is_empty() {
                m.remove(box_id);
            }
        }
    }

    /// Forgets draws past their age.
    pub fn prune(&self, now: Instant) {
        let mut m = self.open.lock().unwrap_or_else(|p| p.into_inner());
        m.retain(|_, v| {
            v.retain(|(_, at)| now.saturating_duration_since(*at) < self.ttl);
            !v.is_empty()
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_box_gets_its_burst_then_its_rate_and_others_are_unaffected() {
        let s = LimitSettings {
            offers_per_minute: 60,
            burst: 3,
            ..Default::default()
        };
        let r = RateLimits::new(s);
        let t0 = Instant::now();
        for _ in 0..3 {
            r.take("box-1", Kind::Offer, t0).unwrap();
        }
        let wait = r.take("box-1", Kind::Offer, t0).unwrap_err();
        assert!(
            wait <= Duration::from_secs(1) && wait > Duration::ZERO,
            "{wait:?}"
        );
        r.take("box-2", Kind::Offer, t0).unwrap();
        r.take("box-1", Kind::Catalog, t0).unwrap();
        // One per second comes back.
        r.take("box-1", Kind::Offer, t0 + Duration::from_millis(1001))
            .unwrap();
        r.prune(t0 + Duration::from_secs(3600));
        assert!(r.buckets.lock().unwrap().is_empty());
    }

    #[test]
    fn check_looks_without_taking() {
        let s = LimitSettings {
            refusals_per_minute: 60,
            burst: 2,
            ..Default::default()
        };
        let r = RateLimits::new(s);
        let t0 = Instant::now();
        for _ in 0..5 {
            r.check("box-1", Kind::Refused, t0).unwrap();
        }
        r.take("box-1", Kind::Refused, t0).unwrap();
        r.take("box-1", Kind::Refused, t0).unwrap();
        assert!(r.check("box-1", Kind::Refused, t0).is_err());
        r.check("box-2", Kind::Refused, t0).unwrap();
        r.check("box-1", Kind::Offer, t0).unwrap();
        r.check("box-1", Kind::Refused, t0 + Duration::from_millis(1001))
            .unwrap();
    }

    #[test]
    fn open_draws_are_capped_per_box_and_freed_by_close_or_age() {
        let s = LimitSettings {
            max_open_draws_per_box: 2,
            open_draw_secs: 60,
            ..Default::default()
        };
        let o = OpenDraws::new(s);
        let t0 = Instant::now();
        o.open("box-1", "t1", t0).unwrap();
        o.open("box-1", "t2", t0).unwrap();
        assert_eq!(o.open("box-1", "t3", t0), Err(2));
        o.open("box-1", "t2", t0).unwrap(); // the same draw again is no new one
        o.open("box-2", "u1", t0).unwrap();
        o.close("box-1", "t1");
        o.open("box-1", "t3", t0).unwrap();
        assert_eq!(o.open("box-1", "t4", t0), Err(2));
        o.open("box-1", "t4", t0 + Duration::from_secs(61)).unwrap();
    }
}
