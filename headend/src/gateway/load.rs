//! The gateway's side of the load conversation (001 [0117]–[0135], [0141]–[0157]): routing
//! each step to the funder — the bank for a bank account, the load server for a pre-funded
//! voucher — and to the load server, and relaying the answers.
//!
//! | box sends | the gateway does | box gets |
//! |---|---|---|
//! | `LoadOfferRequest` | funder: `RoutedLoadOfferRequest` → `LoadOffer` | `LoadOffer` |
//! | `LoadRequest` | funder: `HoldRequest` (PIN, limits) → `HoldPlaced` (MACed by the funder); load server: `RoutedLoadRequest` (the request with the hold) → `LoadCommand` (or `LoadRefused`, whose sealed no-load goes to the funder to release the hold) | `LoadCommand` |
//! | `LoadResponse` | load server → `LoadConfirmation` (sealed for the funder); funder: `LoadConfirmation` → `HoldSettled` | `LoadConfirmation` |
//!
//! The gateway journals each step (kind `gwload`) before it acts. The transaction id is the
//! idempotency key: a retried load request must be byte-identical to the first one (else
//! `Replay`) and gets the same load command; the hold travels with it, and the load server
//! authorises no more than the hold. A retried load response must be identical to the one
//! that produced the confirmation. When a hop is unreachable the box gets `Busy` and retries.
//!
//! Lifetimes ([`crate::gateway::Lifetimes`]): a load offer with no load request expires; a
//! load whose response has not come within the hold lifetime is asked of the load server
//! with `LoadExpire` — never authorised: refused for good there, and its sealed no-load
//! releases the hold (journaled with the reason); authorised (the value may be on the
//! card): the hold is never released blindly, it waits for the box's proof and `headend
//! status` lists it for an operator. A confirmation the funder has not settled yet is
//! delivered again on every sweep.

// A refusal is the answer message itself, relayed to the box: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use proto::messages::*;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::gateway::{Gateway, Step, TxnGuard, definite, now_secs};
use crate::journal;
use crate::role::{Caller, Role};
use crate::role::{refuse, repeat};

/// Role-table name of the bank server.
pub const BANK: &str = "bank";
/// Role-table name of the load server (also the funder of pre-funded accounts).
pub const LOAD: &str = "load";

/// The gateway's record of one load (journal kind `gwload`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GwLoad {
    pub box_id: String,
    pub funder: String,
    pub offer: LoadOffer,
    /// When the offer was relayed, seconds since the epoch.
    pub created: u64,
    /// The first load request (postcard) and when it came: a retry must be identical.
    pub request: Option<Vec<u8>>,
    pub requested_at: Option<u64>,
    pub hold: Option<HoldPlaced>,
    pub command: Option<Message>,
    /// The load response (postcard) that produced the confirmation.
    pub response: Option<Vec<u8>>,
    pub confirmation: Option<Message>,
    pub settled: Option<HoldSettled>,
    /// Not requested within the offer lifetime.
    pub expired: bool,
    /// Past the hold lifetime with a load command issued: waits for the box's proof or an
    /// operator; listed by `headend status`.
    pub awaiting_operator: bool,
}

impl GwLoad {
    /// Still open: neither settled nor expired.
    pub fn is_open(&self) -> bool {
        self.settled.is_none() && !self.expired
    }
}

fn funder_of(source: &LoadSource) -> &'static str {
    match source {
        LoadSource::Bank { .. } | LoadSource::Unload { .. } => BANK,
        LoadSource::Voucher { .. } => LOAD,
    }
}

fn gw() -> Caller {
    Caller::Role("gateway".into())
}

impl Gateway {
    fn load_role(&self, name: &str, txid: Option<&str>) -> Result<Arc<dyn Role>, Message> {
        self.try_role(name).cloned().ok_or_else(|| {
            refuse(
                ErrorCode::UnknownRoute,
                format!("no {name} role is configured on this head end"),
                txid,
            )
        })
    }

    pub fn load_txn(&self, txid: &str) -> Option<GwLoad> {
        journal::decode(&self.journal().get(journal::Kind::GwLoad, txid).ok()??).ok()
    }

    /// Every load the gateway holds open past its hold lifetime with a load command issued:
    /// the operator's queue.
    pub fn loads_awaiting_operator(&self) -> Vec<(String, GwLoad)> {
        self.journal()
            .all(journal::Kind::GwLoad)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(k, b)| Some((k, journal::decode::<GwLoad>(&b).ok()?)))
            .filter(|(_, t)| t.awaiting_operator && t.is_open())
            .collect()
    }

    /// Journals the load's record (and its place in the sweep index) with `step`.
    ///
    /// # Errors
    /// The journal cannot be written: the `Internal` refusal to answer with.
    fn save_load(&self, lock: &TxnGuard<'_>, t: &GwLoad, step: Step) -> Result<(), Message> {
        let txid = lock.txid();
        lock.atomically(|b| {
            b.put(journal::Kind::GwLoad, txid, &journal::encode(t))?;
            if t.is_open() {
                b.put(
                    journal::Kind::Open,
                    &format!("l/{txid}"),
                    &t.created.to_be_bytes(),
                )?;
            } else {
                b.delete(journal::Kind::Open, &format!("l/{txid}"))?;
            }
            b.step(txid, &step, "")
        })
        .map_err(|e| crate::role::journal_failed(e, Some(txid)))
    }

    fn owned_load(&self, box_id: &str, txid: &str) -> Result<GwLoad, Message> {
        match self.load_txn(txid) {
            None => Err(refuse(
                ErrorCode::UnknownTransaction,
                format!("no load transaction {txid}"),
                Some(txid),
            )),
            Some(t) if t.box_id != box_id => Err(refuse(
                ErrorCode::NotYourAccount,
                format!("load transaction {txid} belongs to another box"),
                Some(txid),
            )),
            Some(t) => Ok(t),
        }
    }

    /// Load offer: the funder computes the maximum and opens the transaction.
    pub(crate) async fn load_offer(&self, box_id: &str, req: LoadOfferRequest) -> Message {
        if let Err(e) = self.rate(box_id, crate::limits::Kind::LoadOffer) {
            return e;
        }
        let funder = funder_of(&req.source);
        let role = match self.load_role(funder, None) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let answer = role
            .handle(
                gw(),
                Message::RoutedLoadOfferRequest {
                    box_id: box_id.into(),
                    request: req,
                },
            )
            .await;
        if let Message::LoadOffer(o) = &answer {
            let lock = match self.lock(&o.transaction_id).await {
                Ok(l) => l,
                Err(busy) => return busy,
            };
            let taken = self
                .journal()
                .get(journal::Kind::GwLoad, &o.transaction_id)
                .ok()
                .flatten()
                .is_some()
                || self
                    .journal()
                    .get(journal::Kind::Gw, &o.transaction_id)
                    .ok()
                    .flatten()
                    .is_some();
            if taken || o.transaction_id.is_empty() || o.transaction_id.len() > 64 {
                return refuse(
                    ErrorCode::Malformed,
                    "the funder's load offer reuses or lacks a transaction id; refused",
                    None,
                );
            }
            let t = GwLoad {
                box_id: box_id.into(),
                funder: funder.into(),
                offer: o.clone(),
                created: now_secs(),
                request: None,
                requested_at: None,
                hold: None,
                command: None,
                response: None,
                confirmation: None,
                settled: None,
                expired: false,
                awaiting_operator: false,
            };
            if let Err(e) = self.save_load(&lock, &t, Step::LoadOfferRelayed) {
                return e;
            }
            tracing::info!(txid = %o.transaction_id, box_id, max = %o.max_amount, "load offer relayed");
        }
        answer
    }

    /// Load request: hold at the funder first, then the request with the hold to the load
    /// server for S2.
    pub(crate) async fn load_request(&self, box_id: &str, req: LoadRequest) -> Message {
        let txid = req.transaction_id.clone();
        let t_ = Some(txid.as_str());
        let lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut t = match self.owned_load(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let raw = journal::encode(&req);
        match &t.request {
            Some(prev) if *prev != raw => {
                return refuse(
                    ErrorCode::Replay,
                    "transaction id already used for another load request",
                    t_,
                );
            }
            Some(_) => {
                if let Some(c) = &t.command {
                    tracing::info!(txid, "retried load request: same load command");
                    return c.clone();
                }
            }
            None if t.expired => {
                return refuse(
                    ErrorCode::OfferExpired,
                    "the load offer expired; ask for a new one",
                    t_,
                );
            }
            None => {}
        }
        if req.source != t.offer.source {
            return refuse(
                ErrorCode::NotYourAccount,
                "the load request names another source than its offer",
                t_,
            );
        }
        // S1 covers the server time stamp of this offer: an S1 made for another offer
        // (or an old one) is not accepted here.
        if req.init.timestamp != t.offer.timestamp {
            return refuse(
                ErrorCode::Replay,
                "the card's S1 is not over this offer's time stamp",
                t_,
            );
        }
        let (funder, load) = match (self.load_role(&t.funder, t_), self.load_role(LOAD, t_)) {
            (Ok(f), Ok(l)) => (f, l),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        if t.request.is_none() {
            t.request = Some(raw);
            t.requested_at = Some(now_secs());
            if let Err(e) = self.save_load(&lock, &t, Step::LoadRequestReceived) {
                return e;
            }
        }
        let hold = match &t.hold {
            Some(h) => h.clone(),
            None => {
                let ask = HoldRequest {
                    box_id: box_id.into(),
                    transaction_id: txid.clone(),
                    source: req.source.clone(),
                    amount: req.amount,
                    card_id: req.init.card_id,
                    card_balance: req.init.balance,
                    card_max_balance: req.init.max_balance,
                    sealed_pin: req.sealed_pin.clone(),
                };
                match funder.handle(gw(), Message::HoldRequest(ask)).await {
                    Message::HoldPlaced(h)
                        if h.transaction_id == txid
                            && h.amount == req.amount
                            && h.card_id == req.init.card_id =>
                    {
                        t.hold = Some(h.clone());
                        if let Err(e) = self.save_load(&lock, &t, Step::HoldPlaced) {
                            return e;
                        }
                        h
                    }
                    Message::HoldPlaced(h) => {
                        return refuse(
                            ErrorCode::Internal,
                            format!(
                                "the funder's hold ({} {} card {:X}) is not for this request",
                                h.transaction_id, h.amount, h.card_id
                            ),
                            t_,
                        );
                    }
                    other => {
                        if definite(&other) {
                            // Refused for good before any hold (wrong PIN, a limit): the
                            // request is spent, and another one may follow under this id.
                            t.request = None;
                            t.requested_at = None;
                            let why = match &other {
                                Message::Error(e) => format!("{:?}", e.code),
                                m => m.kind().to_string(),
                            };
                            if let Err(e) = self.save_load(&lock, &t, Step::HoldRefused(why)) {
                                return e;
                            }
                        }
                        return other;
                    }
                }
            }
        };
        let answer = load
            .handle(gw(), Message::RoutedLoadRequest { request: req, hold })
            .await;
        match answer {
            Message::LoadCommand(_) => {
                t.command = Some(answer.clone());
                if let Err(e) = self.save_load(&lock, &t, Step::LoadCommandRelayed) {
                    return e;
                }
                if let Some(h) = &t.hold {
                    let at = t.requested_at.unwrap_or_else(now_secs);
                    let mut c = self.commanded.lock().unwrap_or_else(|p| p.into_inner());
                    let newest = c.entry(h.card_id).or_default();
                    if at >= newest.0 {
                        *newest = (at, txid.clone());
                    }
                }
                tracing::info!(txid, "load command relayed");
                answer
            }
            Message::LoadRefused(r) => {
                // Never authorized: the sealed no-load releases the hold.
                if let Err(e) = self.step(&txid, Step::LoadRequestRefused, &r.error.reason) {
                    return *e;
                }
                if let Err(e) = self
                    .settle(&mut t, &funder, r.confirmation.clone(), &lock)
                    .await
                {
                    return e;
                }
                Message::Error(r.error)
            }
            other => other,
        }
    }

    /// Relays a confirmation to the funder and journals the settlement.
    async fn settle(
        &self,
        t: &mut GwLoad,
        funder: &Arc<dyn Role>,
        c: LoadConfirmation,
        lock: &TxnGuard<'_>,
    ) -> Result<HoldSettled, Message> {
        let txid = lock.txid();
        if let Some(s) = &t.settled {
            return Ok(s.clone());
        }
        if t.confirmation.is_none() {
            t.confirmation = Some(Message::LoadConfirmation(c.clone()));
            self.save_load(lock, t, Step::LoadConfirmationReceived)?;
        }
        match funder.handle(gw(), Message::LoadConfirmation(c)).await {
            Message::HoldSettled(s) => {
                t.settled = Some(s.clone());
                let step = if s.captured {
                    Step::HoldCaptured
                } else {
                    Step::HoldReleased
                };
                self.save_load(lock, t, step)?;
                Ok(s)
            }
            Message::Error(e) if e.code == ErrorCode::UnknownTransaction && t.hold.is_none() => {
                // No hold was ever placed (the funder refused first): nothing to settle.
                let s = HoldSettled {
                    transaction_id: txid.into(),
                    captured: false,
                    amount: proto::money::Money::zero(t.offer.max_amount.currency),
                };
                t.settled = Some(s.clone());
                self.save_load(lock, t, Step::NothingHeld)?;
                Ok(s)
            }
            other => Err(other),
        }
    }

    /// Load response: the load server's verdict, then the funder captures or releases.
    pub(crate) async fn load_response(&self, box_id: &str, msg: LoadResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let t_ = Some(txid.as_str());
        let lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut t = match self.owned_load(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let raw = journal::encode(&msg);
        if let (Some(c), Some(prev)) = (&t.confirmation, &t.response) {
            if *prev != raw || t.settled.is_some() {
                return repeat(Some(prev), &raw, c, "load response", &txid);
            }
        }
        let (funder, load) = match (self.load_role(&t.funder, t_), self.load_role(LOAD, t_)) {
            (Ok(f), Ok(l)) => (f, l),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        // Journaled before the load response goes out; if it cannot be, it does not go.
        if let Err(e) = self.step(&txid, Step::LoadResponseRelayed, "") {
            return *e;
        }
        let c = match load.handle(gw(), Message::LoadResponse(msg)).await {
            Message::LoadConfirmation(c) => c,
            other => return other,
        };
        if t.response.is_none() {
            t.response = Some(raw);
            t.confirmation = Some(Message::LoadConfirmation(c.clone()));
            if let Err(e) = self.save_load(&lock, &t, Step::LoadConfirmationReceived) {
                return e;
            }
        }
        match self.settle(&mut t, &funder, c.clone(), &lock).await {
            Ok(s) => {
                tracing::info!(
                    txid,
                    loaded = c.loaded,
                    captured = s.captured,
                    "load confirmation relayed"
                );
                Message::LoadConfirmation(c)
            }
            Err(e) => e,
        }
    }

    /// One sweep step for an open load (see the module doc). True: retry soon.
    pub(crate) async fn sweep_load(&self, txid: &str, now: u64) -> bool {
        // Held by another gateway: its sweep or the box's step there; retry soon.
        let Ok(lock) = self.lock(txid).await else {
            return true;
        };
        let Some(mut t) = self.load_txn(txid) else {
            let _ = lock.atomically(|b| b.delete(journal::Kind::Open, &format!("l/{txid}")));
            return false;
        };
        if !t.is_open() {
            let _ = lock.atomically(|b| b.delete(journal::Kind::Open, &format!("l/{txid}")));
            return false;
        }
        let Ok(funder) = self.load_role(&t.funder, Some(txid)) else {
            return false;
        };
        // A confirmation the funder has not settled: deliver it again.
        if let Some(Message::LoadConfirmation(c)) = t.confirmation.clone() {
            let _calling = self.mark_retrying(txid);
            return self.settle(&mut t, &funder, c, &lock).await.is_err();
        }
        let Some(requested) = t.requested_at else {
            if now >= t.created + self.lifetimes.offer.as_secs() {
                t.expired = true;
                if self.save_load(&lock, &t, Step::LoadOfferExpired).is_ok() {
                    tracing::info!(txid, "load offer expired before its load request");
                }
            }
            return false;
        };
        // A later load request of the same card got its load command: that session ended
        // this one at the card, and the load server settled this one from the later S1 if
        // it was authorised (else it never will be) — ask now rather than at the hold's
        // lifetime (an outside attack on issue 17's U1 fix: a settled unload kept blocking
        // the card's next unload at the bank until then).
        let moved_on = t.hold.as_ref().is_some_and(|h| {
            self.commanded
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&h.card_id)
                .is_some_and(|(at, by)| by != txid && *at >= requested)
        });
        if now < requested + self.lifetimes.hold.as_secs() && !moved_on {
            return false;
        }
        let Ok(load) = self.load_role(LOAD, Some(txid)) else {
            return false;
        };
        let _calling = self.mark_retrying(txid);
        let answer = load
            .handle(
                gw(),
                Message::LoadExpire {
                    transaction_id: txid.into(),
                },
            )
            .await;
        match answer {
            Message::LoadConfirmation(c) if !c.loaded => {
                if self
                    .step(txid, Step::HoldLifetimeNeverAuthorised, "")
                    .is_err()
                {
                    return true; // settled on a later sweep, once journaled
                }
                match self.settle(&mut t, &funder, c, &lock).await {
                    Ok(_) => {
                        tracing::info!(txid, "expired hold released");
                        false
                    }
                    Err(_) => true,
                }
            }
            Message::LoadConfirmation(c) => self.settle(&mut t, &funder, c, &lock).await.is_err(),
            Message::Error(e) if e.code == ErrorCode::InDoubt => {
                if !t.awaiting_operator {
                    t.awaiting_operator = true;
                    let _ = self.save_load(&lock, &t, Step::HoldLifetimeAwaitingOperator);
                    tracing::warn!(
                        txid,
                        "load may be on the card: hold kept for the box's proof or an operator"
                    );
                }
                false
            }
            other => !definite(&other),
        }
    }

    /// Dispatch for the load conversation's box messages, with the transaction id on the
    /// span.
    pub(crate) async fn load_dispatch(&self, box_id: &str, msg: Message) -> Message {
        match msg {
            Message::LoadOfferRequest(r) => {
                let span = tracing::info_span!("load offer", %box_id);
                self.load_offer(box_id, r).instrument(span).await
            }
            Message::LoadRequest(r) => {
                let span = tracing::info_span!("load", txid = %r.transaction_id, %box_id);
                self.load_request(box_id, r).instrument(span).await
            }
            Message::LoadResponse(r) => {
                let span = tracing::info_span!("load", txid = %r.transaction_id, %box_id);
                self.load_response(box_id, r).instrument(span).await
            }
            other => refuse(
                ErrorCode::Malformed,
                format!("a box cannot send {}", other.kind()),
                None,
            ),
        }
    }
}
