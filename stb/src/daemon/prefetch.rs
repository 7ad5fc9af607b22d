//! Offer prefetch: when the catalog's cursor rests on an item, the box asks the gateway for
//! that item's offer ([`Message::OfferRequest`], 001 FIG. 4's first step) ahead of OK, so
//! that choosing it costs the viewer only the card's reads before the offer popup, and OK
//! on the popup → receipt only the draw request and the debit response.
//!
//! The prefetched answer is used once, and only as the answer to the very request the
//! purchase flow sends ([`Prefetch::take_for`] compares the whole message): the flow is not
//! told that its offer came early. A request still on its way when the viewer chooses the
//! item is joined, not sent twice. Nothing here touches the card or the journal: an offer
//! moves no value, and an unused one expires at the gateway (`offer_lifetime_secs`).
//!
//! Costs are bounded: a request goes only after the cursor rested [`DWELL`] on the item,
//! one at a time, at most [`BUDGET_PER_MINUTE`] a minute (a third of the gateway's default
//! per-box offer rate, so browsing never uses up the viewer's own purchases), and an answer
//! older than [`FRESH`] is not used.

use std::collections::VecDeque;
use std::time::Duration;

use proto::messages::Message;
use tokio::time::Instant;

/// How long the cursor must rest on an item before its offer is asked for.
pub const DWELL: Duration = Duration::from_millis(400);
/// A prefetched offer older than this is not used (the gateway's default offer lifetime is
/// 900 s; the price shown must be current).
pub const FRESH: Duration = Duration::from_secs(60);
/// Prefetches a box sends in any 60 s.
pub const BUDGET_PER_MINUTE: usize = 10;

/// What the purchase flow's request meets in the cache.
#[derive(Debug, PartialEq)]
pub enum Take {
    /// The answer, already here: feed it to the flow as the gateway's answer.
    Answer(Box<Message>),
    /// The same request is on its way: its answer will come back for the flow.
    Joined,
    /// Nothing usable: send the request.
    Send,
}

#[derive(Debug)]
enum Entry {
    InFlight {
        request: Message,
        /// The flow (its answer id) that joined this request.
        waiter: Option<u64>,
    },
    Ready {
        request: Message,
        answer: Box<Message>,
        at: Instant,
    },
}

/// The box's one prefetched offer and the request waiting for its dwell time.
#[derive(Debug, Default)]
pub struct Prefetch {
    enabled: bool,
    /// The request to send once the cursor has rested, and from when.
    wanted: Option<(Message, Instant)>,
    entry: Option<Entry>,
    /// When the prefetches of the last minute went.
    sent: VecDeque<Instant>,
}

impl Prefetch {
    /// A prefetch cache; `enabled: false` (config `[ui] prefetch_offers = false`) makes it
    /// never ask and always answer [`Take::Send`].
    #[must_use]
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// The cursor came to rest on the item that `request` asks the offer for.
    pub fn highlighted(&mut self, request: Message, now: Instant) {
        if !self.enabled || self.holds(&request, now) {
            self.wanted = None;
            return;
        }
        self.wanted = Some((request, now + DWELL));
    }

    /// Nothing is wanted any more (the viewer left the catalog, or a transaction started).
    pub fn stop_wanting(&mut self) {
        self.wanted = None;
    }

    /// When [`Prefetch::due`] has a request to send, if one waits.
    #[must_use]
    pub fn deadline(&self) -> Option<Instant> {
        match (&self.wanted, &self.entry) {
            // One at a time: the next waits for the answer to the one in flight.
            (_, Some(Entry::InFlight { .. })) => None,
            (Some((_, at)), _) => Some(*at),
            (None, _) => None,
        }
    }

    /// The request to send now, if the dwell time passed, none is in flight and the budget
    /// allows; the caller sends it and reports its answer to [`Prefetch::arrived`].
    pub fn due(&mut self, now: Instant) -> Option<Message> {
        if matches!(self.entry, Some(Entry::InFlight { .. })) {
            return None;
        }
        match &self.wanted {
            Some((_, at)) if *at <= now => {}
            _ => return None,
        }
        let (request, _) = self.wanted.take()?;
        while self
            .sent
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(60))
        {
            self.sent.pop_front();
        }
        if self.sent.len() >= BUDGET_PER_MINUTE {
            tracing::debug!(
                budget = BUDGET_PER_MINUTE,
                "offer prefetch skipped: budget used"
            );
            return None;
        }
        self.sent.push_back(now);
        self.entry = Some(Entry::InFlight {
            request: request.clone(),
            waiter: None,
        });
        Some(request)
    }

    /// The answer to a prefetch came. If a flow joined the request, the answer is its:
    /// returned with the flow's answer id. Otherwise an offer is kept for
    /// [`Prefetch::take_for`]; a refusal or a failure is dropped (the flow asks itself).
    pub fn arrived<E>(
        &mut self,
        request: &Message,
        result: Result<Message, E>,
        now: Instant,
    ) -> Option<(u64, Result<Message, E>)> {
        match self.entry.take() {
            Some(Entry::InFlight {
                request: r,
                waiter: Some(flow),
            }) if r == *request => Some((flow, result)),
            Some(Entry::InFlight { request: r, .. }) if r == *request => {
                if let Ok(answer @ Message::Offer(_)) = result {
                    if let Message::Offer(o) = &answer {
                        tracing::info!(transaction_id = %o.transaction_id, item_id = %o.item_id, "offer prefetched");
                    }
                    self.entry = Some(Entry::Ready {
                        request: r,
                        answer: Box::new(answer),
                        at: now,
                    });
                }
                None
            }
            other => {
                self.entry = other;
                None
            }
        }
    }

    /// The purchase flow (answer id `flow`) sends `request`: answered here, joined to the
    /// prefetch on its way, or to be sent.
    pub fn take_for(&mut self, request: &Message, flow: u64, now: Instant) -> Take {
        self.wanted = None;
        match &mut self.entry {
            Some(Entry::InFlight { request: r, waiter }) if r == request && waiter.is_none() => {
                *waiter = Some(flow);
                Take::Joined
            }
            Some(Entry::Ready { request: r, at, .. }) if r == request => {
                let fresh = now.duration_since(*at) < FRESH;
                match self.entry.take() {
                    Some(Entry::Ready { answer, .. }) if fresh => Take::Answer(answer),
                    _ => Take::Send,
                }
            }
            _ => Take::Send,
        }
    }

    /// Whether `request`'s offer is already here (fresh) or on its way.
    fn holds(&self, request: &Message, now: Instant) -> bool {
        match &self.entry {
            Some(Entry::InFlight { request: r, .. }) => r == request,
            Some(Entry::Ready { request: r, at, .. }) => {
                r == request && now.duration_since(*at) < FRESH
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::messages::{Embodiment, Offer};
    use proto::money::{Currency, Money};

    fn ask(item: &str) -> Message {
        Message::OfferRequest {
            merchant_id: "ppv".into(),
            item_id: item.into(),
        }
    }

    fn offer(txid: &str) -> Message {
        Message::Offer(Offer {
            transaction_id: txid.into(),
            merchant_id: "ppv".into(),
            item_id: "a".into(),
            title: "Cup Final".into(),
            amount: Money::new(1250, Currency::EUR),
            payment_route: "pay".into(),
            status_route: "ppv".into(),
            embodiment: Embodiment::SecurityCard,
            tsk: None,
            etsk: None,
        })
    }

    #[test]
    fn an_offer_is_asked_after_the_dwell_and_used_once() {
        let mut p = Prefetch::new(true);
        let t0 = Instant::now();
        p.highlighted(ask("a"), t0);
        assert_eq!(p.deadline(), Some(t0 + DWELL));
        assert_eq!(p.due(t0 + DWELL / 2), None, "not before the dwell");
        assert_eq!(p.due(t0 + DWELL), Some(ask("a")));
        assert_eq!(p.deadline(), None, "nothing more wanted");
        assert_eq!(p.arrived::<()>(&ask("a"), Ok(offer("t1")), t0), None);
        assert_eq!(p.take_for(&ask("b"), 1, t0), Take::Send, "another item");
        assert_eq!(
            p.take_for(&ask("a"), 1, t0),
            Take::Answer(Box::new(offer("t1")))
        );
        assert_eq!(p.take_for(&ask("a"), 2, t0), Take::Send, "used once");
    }

    #[test]
    fn a_flow_joins_the_request_on_its_way() {
        let mut p = Prefetch::new(true);
        let t0 = Instant::now();
        p.highlighted(ask("a"), t0);
        assert!(p.due(t0 + DWELL).is_some());
        assert_eq!(p.take_for(&ask("a"), 7, t0), Take::Joined);
        assert_eq!(
            p.arrived::<()>(&ask("a"), Ok(offer("t1")), t0),
            Some((7, Ok(offer("t1"))))
        );
        assert_eq!(p.take_for(&ask("a"), 8, t0), Take::Send);
    }

    #[test]
    fn moving_on_replaces_the_wanted_item_and_one_goes_at_a_time() {
        let mut p = Prefetch::new(true);
        let t0 = Instant::now();
        p.highlighted(ask("a"), t0);
        p.highlighted(ask("b"), t0 + DWELL / 2);
        assert_eq!(p.due(t0 + DWELL), None, "b's dwell restarted");
        assert_eq!(p.due(t0 + DWELL * 2), Some(ask("b")));
        p.highlighted(ask("c"), t0 + DWELL * 2);
        assert_eq!(p.deadline(), None, "c waits for b's answer");
        assert_eq!(p.due(t0 + DWELL * 4), None);
        p.arrived::<()>(&ask("b"), Ok(offer("tb")), t0 + DWELL * 4);
        assert_eq!(p.due(t0 + DWELL * 4), Some(ask("c")));
    }

    #[test]
    fn refusals_failures_and_stale_offers_are_not_used() {
        let mut p = Prefetch::new(true);
        let t0 = Instant::now();
        p.highlighted(ask("a"), t0);
        p.due(t0 + DWELL);
        let refusal = Message::error(proto::messages::ErrorCode::Busy, "busy", None);
        p.arrived::<()>(&ask("a"), Ok(refusal), t0);
        assert_eq!(p.take_for(&ask("a"), 1, t0), Take::Send);
        p.highlighted(ask("a"), t0);
        p.due(t0 + DWELL);
        p.arrived(&ask("a"), Err("unreachable"), t0);
        assert_eq!(p.take_for(&ask("a"), 1, t0), Take::Send);
        p.highlighted(ask("a"), t0);
        p.due(t0 + DWELL);
        p.arrived::<()>(&ask("a"), Ok(offer("t1")), t0);
        assert_eq!(p.take_for(&ask("a"), 1, t0 + FRESH), Take::Send, "stale");
    }

    #[test]
    fn the_budget_caps_prefetches_per_minute() {
        let mut p = Prefetch::new(true);
        let mut now = Instant::now();
        let mut sent = 0;
        for i in 0..BUDGET_PER_MINUTE + 5 {
            p.highlighted(ask(&format!("i{i}")), now);
            now += DWELL;
            if let Some(r) = p.due(now) {
                sent += 1;
                p.arrived::<()>(&r, Ok(offer("t")), now);
            }
        }
        assert_eq!(sent, BUDGET_PER_MINUTE);
        now += Duration::from_secs(60);
        p.highlighted(ask("later"), now);
        assert_eq!(p.due(now + DWELL), Some(ask("later")), "budget refilled");
    }

    #[test]
    fn disabled_never_asks() {
        let mut p = Prefetch::new(false);
        let t0 = Instant::now();
        p.highlighted(ask("a"), t0);
        assert_eq!(p.deadline(), None);
        assert_eq!(p.due(t0 + DWELL), None);
        assert_eq!(p.take_for(&ask("a"), 1, t0), Take::Send);
    }
}
