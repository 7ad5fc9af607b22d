//! The gateway: the cable head end server 204 (module 224). It takes the boxes' messages
//! (identity from their device certificates), routes each transaction to the merchant and
//! payment server the config names for its merchant id, and relays the answers.
//!
//! Per merchant, the embodiment decides who compares the card signature (001 FIG. 4–7):
//! - FIG. 4/5: the debit response goes to the payment server, whose confirmation goes to
//!   the merchant;
//! - FIG. 6: the gateway compares with the expected signature
//!   ([`embodiment::card_signature_matches`]) and forwards the pre-sealed "debit result M"
//!   to the merchant itself — one round trip to the payment server fewer;
//! - FIG. 7: the gateway forwards the card's response and the expected signature sealed for
//!   the merchant, which compares.
//!
//! A file per operation: `catalog`, `offer` (offer request), `draw` (draw request relayed
//! to the payment server), `debit` (debit response → receipt; FIG. 4/5), [`embodiment`]
//! (FIG. 6/7), `release` (confirmations delivered to the merchant), `cancel`, `background`
//! (notifications, releases, reversal feed), `sweep` (lifetimes), [`load`] (the load
//! conversation); [`Step`] names the journaled steps, [`crate::journal::Kind`] the records.
//!
//! Nothing accepted is lost when a role is down, and nothing is done twice:
//! - **Releases.** Once a debit response is accepted (FIG. 4/5: the payment server
//!   confirmed; FIG. 6: the gateway's comparison matched; FIG. 7: queued for the
//!   merchant's comparison), the confirmation is journaled (kind `release`) before the
//!   merchant is called, and delivered in the background until the merchant answers for
//!   good ([`Gateway::run_releases`]). The box gets the receipt on its next retry.
//! - **Notifications** (FIG. 6/7). The payment server must see the debit response to keep
//!   the sale: each accepted response is journaled under its own key (kind `notify`,
//!   `txid/card signature`) — FIG. 6 only after its own comparison — and delivered until
//!   the payment server answers for good; only the delivered entry is deleted
//!   ([`Gateway::run_notifier`]).
//! - **Reversals.** The payment server's reversal feed is read in order
//!   ([`Gateway::run_reversal_feed`]) and each reversal passed on to the merchant, which
//!   moves the offer to Reversed; the cursor is journaled per payment server.
//! - **Idempotency.** The transaction id is the key on every step: a retried draw request or
//!   debit response must be identical to the first one the gateway accepted, or it is
//!   refused as a replay. Steps of one transaction run one at a time.
//! - **Lifetimes.** An offer not drawn within `offer_lifetime_secs` expires
//!   ([`Gateway::run_sweeper`]); so do load offers and holds (see [`crate::gateway::load`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proto::crypto::{DesKey, Mac};
use proto::messages::*;
use proto::money::Money;
use proto::purse::DebitResponse;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::config::MerchantDef;
use crate::journal::{self, Journal};
use crate::limits::{Kind, LimitSettings, OpenDraws, RateLimits};
use crate::quic::BoxFuture;
use crate::role::refuse;
use crate::role::{Caller, Role};

mod background;
mod cancel;
mod catalog;
mod debit;
mod draw;
pub mod embodiment;
pub mod load;
mod offer;
mod refund;
mod release;
mod step;
mod sweep;
pub mod transfer;

pub use step::Step;

/// How long offers and holds may stay open at the gateway, and what one box may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// A purchase or load offer not drawn / requested within this expires.
    pub offer: Duration,
    /// A load between its request and its response (see [`crate::gateway::load`]).
    pub hold: Duration,
    /// Per-box rates and open draws.
    pub limits: LimitSettings,
}

impl Default for Lifetimes {
    fn default() -> Self {
        Self {
            offer: Duration::from_secs(crate::config::default_offer_lifetime()),
            hold: Duration::from_secs(crate::config::default_hold_lifetime()),
            limits: LimitSettings::default(),
        }
    }
}

/// Where a purchase stands at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GwState {
    /// Offer relayed; no draw request yet.
    Offered,
    /// Draw request relayed to the payment server.
    Drawn,
    /// A confirmation was accepted and journaled; the merchant's release is pending.
    Confirmed,
    /// The merchant answered the confirmation (receipt kept).
    Done,
    /// Cancelled by the box before any draw request.
    Cancelled,
    /// Not drawn within the offer lifetime.
    Expired,
    /// The payment server reversed it (a late debit response may still complete it).
    Reversed,
}

/// The gateway's record of a transaction (journal kind `gw`, [`journal::Kind::Gw`]). The
/// decisions about a purchase read this record, never the step log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GwTxn {
    pub box_id: String,
    pub merchant_id: String,
    pub embodiment: Embodiment,
    pub tsk: Option<DesKey>,
    pub amount: Money,
    /// When the offer was relayed, seconds since the epoch.
    pub created: u64,
    pub state: GwState,
    /// The draw request as relayed (postcard): a retry must be identical.
    pub draw: Option<Vec<u8>>,
    pub expected: Option<Mac>,
    pub sealed_expected: Option<Vec<u8>>,
    pub presealed_m: Option<Vec<u8>>,
    /// The debit response the merchant's receipt answered: a retry must be identical.
    pub debit_response: Option<DebitResponse>,
    pub receipt: Option<Message>,
}

/// A confirmation accepted for delivery to the merchant (journal kind `release`,
/// [`journal::Kind::Release`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outbound {
    pub confirmation: Confirmation,
    /// The card's debit response it confirms.
    pub response: DebitResponse,
    /// The card balance after the debit, from debit result C.
    pub new_balance: Option<u64>,
}

/// The journal key of one accepted debit response of a transaction: `txid/card signature`,
/// so two different responses for one transaction never share an entry.
pub fn response_key(txid: &str, resp: &DebitResponse) -> String {
    format!("{txid}/{}", hex::encode(resp.card_signature))
}

/// The transaction id in a [`response_key`].
fn txid_of_key(key: &str) -> &str {
    key.rsplit_once('/').map_or(key, |(t, _)| t)
}

/// Seconds since the epoch.
pub(crate) fn now_secs() -> u64 {
    crate::bank::now_secs()
}

/// Whether an answer from a role is final (it will say the same again), as opposed to
/// "unreachable, busy, broken or misconfigured: ask again later". A refusal of the caller
/// itself (`Forbidden`: a certificate or `callers` list to fix) or of its pace
/// (`RateLimited`) is not final: nothing journaled for delivery is dropped on it.
pub(crate) fn definite(answer: &Message) -> bool {
    !matches!(answer, Message::Error(e) if matches!(
        e.code,
        ErrorCode::Busy
            | ErrorCode::Internal
            | ErrorCode::Timeout
            | ErrorCode::Forbidden
            | ErrorCode::RateLimited
    ))
}

pub struct Gateway {
    journal: Arc<Journal>,
    merchants: HashMap<String, MerchantDef>,
    roles: HashMap<String, Arc<dyn Role>>,
    pub(crate) lifetimes: Lifetimes,
    rates: RateLimits,
    open_draws: OpenDraws,
    wake_notifier: tokio::sync::Notify,
    wake_releases: tokio::sync::Notify,
    wake_feed: tokio::sync::Notify,
    /// Serializes the steps of one transaction (box retries, background delivery, sweeps).
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Transactions whose lock a background pass holds while it calls a role (for up to a
    /// call deadline when the role does not answer): see [`Gateway::lock_for_box`].
    retrying: std::sync::Mutex<HashMap<String, usize>>,
    /// Per card, the newest of its load requests answered with a load command here: when
    /// it was requested (seconds since the epoch) and its transaction id. The card's other
    /// open loads requested no later need not wait for their hold's lifetime (see
    /// [`Gateway::sweep_load`]). In memory: after a restart they wait, as before.
    pub(crate) commanded: std::sync::Mutex<HashMap<u64, (u64, String)>>,
}

/// Marks a transaction as in a background pass's role call while it lives
/// ([`Gateway::mark_retrying`]).
pub(crate) struct RetryMark<'a> {
    gw: &'a Gateway,
    txid: String,
}

impl Drop for RetryMark<'_> {
    fn drop(&mut self) {
        let mut r = self.gw.retrying.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = r.get_mut(&self.txid) {
            *n -= 1;
            if *n == 0 {
                r.remove(&self.txid);
            }
        }
    }
}

/// The per-transaction lock: in this process, then shared with every gateway on the same
/// journal database ([`journal::Journal::try_lock`]). Released on drop, the shared part
/// first. Journal writes of the transaction's records go through [`TxnGuard::atomically`],
/// which commits only while the shared lock is still held.
pub(crate) struct TxnGuard<'a> {
    shared: journal::SharedLock<'a>,
    _local: LocalGuard<'a>,
}

impl TxnGuard<'_> {
    /// The locked transaction id.
    pub(crate) fn txid(&self) -> &str {
        self.shared.name()
    }

    /// [`journal::Journal::atomically_holding`] this lock: nothing is written once another
    /// gateway may hold it.
    ///
    /// # Errors
    /// See there.
    pub(crate) fn atomically<T>(
        &self,
        f: impl FnOnce(&journal::Batch) -> Result<T, journal::StoreError>,
    ) -> Result<T, journal::JournalError> {
        self._local.gw.journal.atomically_holding(&self.shared, f)
    }
}

/// The in-process part of a [`TxnGuard`]; its map entry is dropped when nobody waits.
struct LocalGuard<'a> {
    gw: &'a Gateway,
    txid: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        let mut l = self.gw.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Ours plus the map's: nobody else waits.
        if l.get(&self.txid).is_some_and(|m| Arc::strong_count(m) <= 2) {
            l.remove(&self.txid);
        }
    }
}

/// How long a step waits for a transaction another gateway process is working on (its
/// shared lock) before it answers `Busy`: the box retries on its own schedule.
const SHARED_LOCK_WAIT: Duration = Duration::from_secs(2);

fn gw() -> Caller {
    Caller::Role("gateway".into())
}

impl Gateway {
    /// `roles` maps every payment/merchant name the merchants use to the role serving it.
    ///
    /// # Errors
    /// A merchant routes to a role name that `roles` does not hold.
    pub fn new(
        journal: Arc<Journal>,
        merchants: &[MerchantDef],
        roles: HashMap<String, Arc<dyn Role>>,
        lifetimes: Lifetimes,
    ) -> Result<Arc<Self>, String> {
        for m in merchants {
            for name in [&m.payment, &m.merchant] {
                if !roles.contains_key(name) {
                    return Err(format!(
                        "merchant {} routes to {name}, which is neither a local role nor an [endpoints] entry",
                        m.id
                    ));
                }
            }
        }
        Ok(Arc::new(Self {
            journal,
            merchants: merchants
                .iter()
                .map(|m| (m.id.clone(), m.clone()))
                .collect(),
            roles,
            lifetimes,
            rates: RateLimits::new(lifetimes.limits),
            open_draws: OpenDraws::new(lifetimes.limits),
            wake_notifier: tokio::sync::Notify::new(),
            wake_releases: tokio::sync::Notify::new(),
            wake_feed: tokio::sync::Notify::new(),
            locks: Default::default(),
            retrying: Default::default(),
            commanded: Default::default(),
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn txn(&self, txid: &str) -> Option<GwTxn> {
        journal::decode(&self.journal.get(journal::Kind::Gw, txid).ok()??).ok()
    }

    /// Takes the transaction's lock: one step of a transaction at a time, in this process
    /// and across the gateways sharing its journal database.
    ///
    /// # Errors
    /// `Busy` when another gateway held the transaction for [`SHARED_LOCK_WAIT`]; `Internal`
    /// when the journal cannot be reached. Background passes leave the transaction for
    /// their next pass.
    #[allow(clippy::result_large_err)] // the refusal is the answer, relayed as is
    pub(crate) async fn lock(&self, txid: &str) -> Result<TxnGuard<'_>, Message> {
        let m = {
            let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            l.entry(txid.to_string()).or_default().clone()
        };
        let local = LocalGuard {
            gw: self,
            txid: txid.into(),
            _guard: m.lock_owned().await,
        };
        let deadline = tokio::time::Instant::now() + SHARED_LOCK_WAIT;
        let mut pause = Duration::from_millis(10);
        loop {
            match self.journal.try_lock(txid) {
                Ok(Some(shared)) => {
                    return Ok(TxnGuard {
                        shared,
                        _local: local,
                    });
                }
                Ok(None) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(200));
                }
                Ok(None) => {
                    tracing::info!(
                        txid,
                        "transaction held by another gateway process; left to it for now"
                    );
                    return Err(refuse(
                        ErrorCode::Busy,
                        "another gateway is working on this transaction right now; try again \
                         shortly",
                        Some(txid),
                    ));
                }
                Err(e) => return Err(crate::role::journal_failed(e, Some(txid))),
            }
        }
    }

    /// The transaction's lock for a box's request — or `Busy` at once while a background
    /// pass (a confirmation asked of the payment server again, a release or a reversal
    /// delivered to the merchant, a load settled with its funder) holds it for a role call.
    /// A role that does not answer keeps that call, and the lock, for up to a call deadline,
    /// and the box's request would then make the same call again: together longer than a
    /// box waits for an answer, so it would drop its connection to the gateway and
    /// reconnect on every retry. With `Busy` it keeps the connection and retries on its own
    /// schedule.
    #[allow(clippy::result_large_err)] // the refusal is the answer, relayed as is
    pub(crate) async fn lock_for_box(&self, txid: &str) -> Result<TxnGuard<'_>, Message> {
        let calling = self
            .retrying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(txid);
        if calling {
            return Err(refuse(
                ErrorCode::Busy,
                "the gateway is settling this transaction with another part of the head end \
                 right now; try again shortly",
                Some(txid),
            ));
        }
        self.lock(txid).await
    }

    /// Marks `txid`, whose lock the caller (a background pass) holds, as in a role call
    /// until the mark is dropped (before the lock): box requests for it get `Busy` at once
    /// meanwhile ([`Self::lock_for_box`]).
    pub(crate) fn mark_retrying(&self, txid: &str) -> RetryMark<'_> {
        *self
            .retrying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(txid.to_string())
            .or_default() += 1;
        RetryMark {
            gw: self,
            txid: txid.into(),
        }
    }

    /// Journals the purchase's record with `step` (and drops it from the sweep index once it
    /// left `Offered`).
    ///
    /// # Errors
    /// The journal cannot be written: the `Internal` refusal to answer with.
    fn save(&self, lock: &TxnGuard<'_>, t: &GwTxn, step: Step) -> Result<(), Box<Message>> {
        let txid = lock.txid();
        lock.atomically(|b| {
            b.put(journal::Kind::Gw, txid, &journal::encode(t))?;
            if !matches!(t.state, GwState::Offered) {
                b.delete(journal::Kind::Open, &format!("p/{txid}"))?;
            }
            b.step(txid, &step, "")
        })
        .map_err(|e| Box::new(crate::role::journal_failed(e, Some(txid))))
    }

    /// Journals one step of a transaction before the gateway acts on it.
    ///
    /// # Errors
    /// The journal cannot be written: the `Internal` refusal to answer with — the act must
    /// not happen.
    fn step(&self, txid: &str, step: Step, detail: &str) -> Result<(), Box<Message>> {
        self.journal
            .step(txid, &step, detail)
            .map_err(|e| Box::new(crate::role::journal_failed(e, Some(txid))))
    }

    /// One request of `kind` from `box_id`, or the `RateLimited` refusal to send.
    #[allow(clippy::result_large_err)] // the refusal is the answer, relayed as is
    pub(crate) fn rate(&self, box_id: &str, kind: Kind) -> Result<(), Message> {
        self.rates
            .take(box_id, kind, std::time::Instant::now())
            .map_err(|wait| {
                refuse(
                    ErrorCode::RateLimited,
                    format!(
                        "too many requests from this box; retry in {} ms",
                        wait.as_millis().max(1)
                    ),
                    None,
                )
            })
    }

    fn role(&self, name: &str) -> &Arc<dyn Role> {
        &self.roles[name]
    }

    /// A role by name, if this head end routes to it (load side: `bank`, `load`).
    pub(crate) fn try_role(&self, name: &str) -> Option<&Arc<dyn Role>> {
        self.roles.get(name)
    }

    /// The transaction, if it exists and belongs to this box.
    fn owned(&self, box_id: &str, txid: &str) -> Result<GwTxn, Box<Message>> {
        match self.txn(txid) {
            None => Err(Box::new(refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(txid),
            ))),
            Some(t) if t.box_id != box_id => Err(Box::new(refuse(
                ErrorCode::NotYourAccount,
                format!("transaction {txid} belongs to another box"),
                Some(txid),
            ))),
            Some(t) => Ok(t),
        }
    }
}

impl Role for Gateway {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            let Caller::Box(box_id) = caller else {
                return refuse(
                    ErrorCode::Forbidden,
                    "the gateway serves set-top boxes only",
                    None,
                );
            };
            // A box's own transaction steps: past its budget of refused ones, nothing more
            // reaches a journal until it has waited (a refused step costs journal writes
            // here and at the payment server, and a box could repeat it without end).
            let step = matches!(
                msg,
                Message::DrawRequest(_)
                    | Message::DebitResponse(_)
                    | Message::Cancel(_)
                    | Message::LoadRequest(_)
                    | Message::LoadResponse(_)
                    | Message::RefundRequest(_)
                    | Message::RefundResponse(_)
                    | Message::RefundProof(_)
                    | Message::TransferInvite(_)
                    | Message::TransferJoin { .. }
                    | Message::TransferPost(_)
            );
            if step {
                if let Err(wait) =
                    self.rates
                        .check(&box_id, Kind::Refused, std::time::Instant::now())
                {
                    return refuse(
                        ErrorCode::RateLimited,
                        format!(
                            "too many refused requests from this box; retry in {} ms",
                            wait.as_millis().max(1)
                        ),
                        None,
                    );
                }
            }
            let answer = self.dispatch(&box_id, msg).await;
            if step && refused_for_good(&answer) {
                let _ = self
                    .rates
                    .take(&box_id, Kind::Refused, std::time::Instant::now());
            }
            answer
        })
    }
}

/// An answer that refuses a box's step for good (not "busy, retry", nor a rate limit).
fn refused_for_good(answer: &Message) -> bool {
    matches!(answer, Message::Error(e) if !matches!(
        e.code,
        ErrorCode::Busy
            | ErrorCode::Internal
            | ErrorCode::Timeout
            | ErrorCode::RateLimited
            | ErrorCode::InDoubt
    ))
}

impl Gateway {
    /// One box message to the step that handles it.
    async fn dispatch(&self, box_id: &str, msg: Message) -> Message {
        match msg {
            Message::CatalogRequest => self.catalog(box_id).await,
            Message::OfferRequest {
                merchant_id,
                item_id,
            } => self.offer(box_id, merchant_id, item_id).await,
            Message::DrawRequest(r) => {
                let span = tracing::info_span!("draw", txid = %r.transaction_id, box_id = %box_id);
                self.draw(box_id, r).instrument(span).await
            }
            Message::DebitResponse(r) => {
                let span = tracing::info_span!("debit response", txid = %r.transaction_id, box_id = %box_id);
                self.debit_response(box_id, r).instrument(span).await
            }
            Message::Cancel(c) => {
                let span =
                    tracing::info_span!("cancel", txid = %c.transaction_id, box_id = %box_id);
                self.cancel(box_id, c).instrument(span).await
            }
            m @ (Message::LoadOfferRequest(_)
            | Message::LoadRequest(_)
            | Message::LoadResponse(_)) => self.load_dispatch(box_id, m).await,
            Message::RefundsDueRequest { card_id } => self.refunds_due(box_id, card_id).await,
            Message::TransferInvite(i) => self.transfer_invite(box_id, i).await,
            Message::TransferJoin { code } => self.transfer_join(box_id, code).await,
            Message::TransferPost(p) => self.transfer_post(box_id, p).await,
            Message::TransferFetch { transfer_id, step } => {
                self.transfer_fetch(box_id, transfer_id, step)
            }
            m @ (Message::RefundRequest(_)
            | Message::RefundResponse(_)
            | Message::RefundProof(_)) => {
                let txid = match &m {
                    Message::RefundRequest(r) => r.transaction_id.clone(),
                    Message::RefundResponse(r) => r.transaction_id.clone(),
                    Message::RefundProof(r) => r.transaction_id.clone(),
                    _ => unreachable!("matched above"),
                };
                let span = tracing::info_span!("refund", txid = %txid, box_id = %box_id);
                self.refund_step(&txid, m).instrument(span).await
            }
            other => refuse(
                ErrorCode::Malformed,
                format!("a box cannot send {}", other.kind()),
                None,
            ),
        }
    }
}

/// Open records in a journal's sweep index (`open`: the gateway's `p/` offers and `l/`
/// loads, the merchant's offers), for status output.
pub fn open_counts(journal: &Journal) -> BTreeMap<&'static str, usize> {
    let mut out = BTreeMap::new();
    for (k, _) in journal.all(journal::Kind::Open).unwrap_or_default() {
        let kind = if k.starts_with("l/") {
            "loads"
        } else {
            "offers"
        };
        *out.entry(kind).or_default() += 1;
    }
    out
}
