//! The gateway: the cable head end server 204 (module 224). It takes the boxes' messages
//! (identity from their device certificates), routes each transaction to the merchant and
//! payment server the config names for its merchant id, and relays the answers.
//!
//! Per merchant, the embodiment decides who compares the card signature (001 FIG. 4–7):
//! - FIG. 4/5: the debit response goes to the payment server, whose confirmation goes to
//!   the merchant;
//! - FIG. 6: the gateway compares with the expected signature and forwards the pre-sealed
//!   "debit result M" to the merchant itself — one round trip to the payment server fewer;
//! - FIG. 7: the gateway forwards the card's response and the expected signature sealed for
//!   the merchant, which compares.
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
//!   ([`Gateway::run_sweeper`]); so do load offers and holds (see [`crate::gateway_load`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proto::crypto::{self, DesKey, Mac};
use proto::messages::*;
use proto::money::Money;
use proto::purse::DebitResponse;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::config::MerchantDef;
use crate::journal::{self, Journal};
use crate::limits::{Kind, LimitSettings, OpenDraws, RateLimits};
use crate::quic::BoxFuture;
use crate::role::{Caller, Role};
use crate::role::{open_body, refuse, repeat};

/// How long offers and holds may stay open at the gateway, and what one box may ask.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// A purchase or load offer not drawn / requested within this expires.
    pub offer: Duration,
    /// A load between its request and its response (see [`crate::gateway_load`]).
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

/// The gateway's record of a transaction (journal kind `gw`).
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

/// A confirmation accepted for delivery to the merchant (journal kind `release`).
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

/// Journal kind of the sweeper's index of open offers and loads (`p/<txid>`, `l/<txid>`).
pub(crate) const OPEN: &str = "open";

/// Journal kind of a FIG. 4/5 debit response on its way to the payment server (keyed like
/// a release, [`response_key`]): written before the payment server is asked, deleted in the
/// write that journals its confirmation (or on its definite refusal). A gateway that dies
/// waiting for the confirmation asks again after its restart ([`Gateway::run_releases`]).
const CONFIRMING: &str = "confirming";

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

/// The per-transaction lock, released (and its map entry dropped when unused) on drop.
pub(crate) struct TxnGuard<'a> {
    gw: &'a Gateway,
    txid: String,
    _guard: tokio::sync::OwnedMutexGuard<()>,
}

impl Drop for TxnGuard<'_> {
    fn drop(&mut self) {
        let mut l = self.gw.locks.lock().unwrap_or_else(|p| p.into_inner());
        // Ours plus the map's: nobody else waits.
        if l.get(&self.txid).is_some_and(|m| Arc::strong_count(m) <= 2) {
            l.remove(&self.txid);
        }
    }
}

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
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn txn(&self, txid: &str) -> Option<GwTxn> {
        journal::decode(&self.journal.get("gw", txid).ok()??).ok()
    }

    /// Takes the transaction's lock: one step of a transaction at a time.
    pub(crate) async fn lock(&self, txid: &str) -> TxnGuard<'_> {
        let m = {
            let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            l.entry(txid.to_string()).or_default().clone()
        };
        TxnGuard {
            gw: self,
            txid: txid.into(),
            _guard: m.lock_owned().await,
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
        Ok(self.lock(txid).await)
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

    fn save(&self, txid: &str, t: &GwTxn, step: &str) -> Result<(), Box<Message>> {
        self.journal
            .atomically(|b| {
                b.put("gw", txid, &journal::encode(t))?;
                if !matches!(t.state, GwState::Offered) {
                    b.delete(OPEN, &format!("p/{txid}"))?;
                }
                b.step(txid, step, "")
            })
            .map_err(|e| {
                Box::new(refuse(
                    ErrorCode::Internal,
                    format!("journal: {e}"),
                    Some(txid),
                ))
            })
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

    async fn catalog(&self, box_id: &str) -> Message {
        if let Err(e) = self.rate(box_id, Kind::Catalog) {
            return e;
        }
        let names: BTreeSet<&String> = self.merchants.values().map(|m| &m.merchant).collect();
        let mut items = Vec::new();
        for name in names {
            match self.role(name).handle(gw(), Message::CatalogRequest).await {
                Message::Catalog(mut c) => items.append(&mut c),
                other => {
                    tracing::warn!(merchant = %name, box_id, answer = other.kind(), "catalog unavailable")
                }
            }
        }
        Message::Catalog(items)
    }

    async fn offer(&self, box_id: &str, merchant_id: String, item_id: String) -> Message {
        if let Err(e) = self.rate(box_id, Kind::Offer) {
            return e;
        }
        let Some(m) = self.merchants.get(&merchant_id) else {
            return refuse(
                ErrorCode::UnknownRoute,
                format!("no route for merchant {merchant_id}"),
                None,
            );
        };
        let ask = Message::RoutedOfferRequest {
            box_id: box_id.into(),
            merchant_id: merchant_id.clone(),
            item_id,
        };
        let answer = self.role(&m.merchant).handle(gw(), ask).await;
        if let Message::Offer(o) = &answer {
            // A merchant speaks for itself only: its offer must agree with what this head
            // end's config says of it, and may not reuse a transaction id.
            if let Err(why) = self.check_offer(&merchant_id, m, o) {
                return refuse(
                    ErrorCode::Malformed,
                    format!("merchant {merchant_id}'s offer refused: {why}"),
                    None,
                );
            }
            let created = now_secs();
            let t = GwTxn {
                box_id: box_id.into(),
                merchant_id: o.merchant_id.clone(),
                embodiment: o.embodiment,
                tsk: o.tsk.clone(),
                amount: o.amount,
                created,
                state: GwState::Offered,
                draw: None,
                expected: None,
                sealed_expected: None,
                presealed_m: None,
                debit_response: None,
                receipt: None,
            };
            let txid = &o.transaction_id;
            if let Err(e) = self.journal.atomically(|b| {
                b.put("gw", txid, &journal::encode(&t))?;
                b.put(OPEN, &format!("p/{txid}"), &created.to_be_bytes())?;
                b.step(txid, "offer relayed", "")
            }) {
                return refuse(ErrorCode::Internal, format!("journal: {e}"), Some(txid));
            }
        }
        answer
    }

    /// Whether a merchant's offer agrees with its configuration: the merchant id asked for,
    /// its configured embodiment, payment route and status route, the FIG. 8 layer as
    /// configured, a price, and a transaction id of 1–64 of `A-Za-z0-9._-` that no other
    /// purchase or load at this gateway uses. (A merchant that claimed another merchant's
    /// id, another embodiment or a used id would have boxes pay for nothing.)
    fn check_offer(&self, asked: &str, m: &MerchantDef, o: &Offer) -> Result<(), String> {
        let txid = &o.transaction_id;
        if txid.is_empty()
            || txid.len() > 64
            || !txid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err("the transaction id must be 1 to 64 of A-Za-z0-9._-".into());
        }
        if o.merchant_id != asked {
            return Err(format!("it names merchant {}", o.merchant_id));
        }
        if o.embodiment != m.embodiment {
            return Err(format!(
                "it names {:?}, the configuration {:?}",
                o.embodiment, m.embodiment
            ));
        }
        if o.payment_route != m.payment || o.status_route != m.merchant {
            return Err("its payment or status route is not the configured one".into());
        }
        if o.tsk.is_some() != m.message_layer || o.etsk.is_some() != m.message_layer {
            return Err("its message layer (TSK/ETSK) is not as configured".into());
        }
        if o.amount.minor == 0 {
            return Err("it has no price".into());
        }
        let taken = self.journal.get("gw", txid).ok().flatten().is_some()
            || self.journal.get("gwload", txid).ok().flatten().is_some();
        if taken {
            return Err(format!("transaction id {txid} is already in use"));
        }
        Ok(())
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

    async fn draw(&self, box_id: &str, req: DrawRequest) -> Message {
        let txid = req.transaction_id.clone();
        let _lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let raw = journal::encode(&req);
        match (t.state, &t.draw) {
            (GwState::Offered, _) => {}
            (_, Some(prev)) if *prev == raw => {
                // A retry: the payment server answers it with the same debit command.
            }
            (GwState::Expired, _) => {
                return refuse(
                    ErrorCode::Expired,
                    "the offer expired before its draw request; ask for a new offer",
                    Some(&txid),
                );
            }
            (GwState::Cancelled, _) => {
                return refuse(ErrorCode::Replay, "the offer was cancelled", Some(&txid));
            }
            _ => {
                return refuse(
                    ErrorCode::Replay,
                    "transaction id already used for another draw request",
                    Some(&txid),
                );
            }
        }
        if req.merchant_id != t.merchant_id {
            return refuse(
                ErrorCode::UnknownMerchant,
                "draw request names another merchant than its offer",
                Some(&txid),
            );
        }
        // The amount must be the offer's: a box (or anything on the way) asking to pay less
        // is refused here, before any security card signs anything.
        match open_body(&req.body, t.tsk.as_ref(), "draw request body", &txid) {
            Ok(body) if body.amount == t.amount => {}
            Ok(body) => {
                return refuse(
                    ErrorCode::AmountMismatch,
                    format!(
                        "draw request for {} but the offer is {}",
                        body.amount, t.amount
                    ),
                    Some(&txid),
                );
            }
            Err(e) => return e,
        }
        if t.draw.is_none() {
            // One box may not hold the security-card pool: a cap on its unfinished draws.
            if let Err(n) = self
                .open_draws
                .open(box_id, &txid, std::time::Instant::now())
            {
                return refuse(
                    ErrorCode::RateLimited,
                    format!(
                        "this box has {n} purchases open; finish or cancel one before the next"
                    ),
                    Some(&txid),
                );
            }
            t.draw = Some(raw);
            t.state = GwState::Drawn;
            if let Err(e) = self.save(&txid, &t, "draw request relayed") {
                self.open_draws.close(box_id, &txid);
                return *e;
            }
        }
        let payment = self.merchants[&t.merchant_id].payment.clone();
        let answer = self
            .role(&payment)
            .handle(gw(), Message::DrawRequest(req))
            .await;
        match answer {
            Message::RoutedDebitCommand { command, gateway } => {
                // The gateway keeps the early-release parts; the box gets the command alone.
                t.expected = gateway.expected_card_signature;
                t.sealed_expected = gateway.sealed_expected_signature;
                t.presealed_m = gateway.presealed_result_m;
                if let Err(e) = self.save(&txid, &t, "debit command relayed") {
                    return *e;
                }
                Message::DebitCommand(command)
            }
            other => {
                // No debit command (refused, or the payment server unreachable): nothing
                // holds a security card for this box.
                self.open_draws.close(box_id, &txid);
                other
            }
        }
    }

    async fn debit_response(&self, box_id: &str, msg: DebitResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let _lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let resp = match open_body(&msg.body, t.tsk.as_ref(), "debit response body", &txid) {
            Ok(r) => r,
            Err(e) => return e,
        };
        if let Some(r) = &t.receipt {
            return repeat(t.debit_response.as_ref(), &resp, r, "debit response", &txid);
        }
        if matches!(
            t.state,
            GwState::Offered | GwState::Cancelled | GwState::Expired
        ) {
            return refuse(
                ErrorCode::UnknownTransaction,
                "no draw request was made for this transaction",
                Some(&txid),
            );
        }
        let key = response_key(&txid, &resp);
        if let Some(out) = self.outbound(&key) {
            return self.deliver(&key, out).await;
        }
        let out = match t.embodiment {
            Embodiment::SecurityCard | Embodiment::PaymentServer => {
                match self.confirm(&txid, &key, &t, msg, resp).await {
                    Ok(out) => out,
                    Err(answer) => {
                        if !definite(&answer) {
                            self.wake_releases.notify_one();
                        }
                        return answer;
                    }
                }
            }
            Embodiment::Gateway => {
                let (Some(expected), Some(m)) = (t.expected, t.presealed_m.clone()) else {
                    return refuse(
                        ErrorCode::Internal,
                        "no expected signature for this transaction",
                        Some(&txid),
                    );
                };
                if !crypto::mac_eq(&expected, &resp.card_signature) {
                    let _ = self.journal.step(&txid, "gateway compared: mismatch", "");
                    return refuse(
                        ErrorCode::BadSignature,
                        "card signature differs from the expected one; nothing released",
                        Some(&txid),
                    );
                }
                let out = self.local_confirmation(&txid, &t, resp, m, None);
                // Only a response that passed the comparison is passed on to the payment
                // server, in the same write as its release.
                if let Err(e) =
                    self.accept(&txid, &key, &out, Some(&msg), "gateway compared: match")
                {
                    return e;
                }
                out
            }
            Embodiment::Merchant => {
                let Some(sealed) = t.sealed_expected.clone() else {
                    return refuse(
                        ErrorCode::Internal,
                        "no sealed expected signature for this transaction",
                        Some(&txid),
                    );
                };
                let out = self.local_confirmation(&txid, &t, resp.clone(), sealed, Some(resp));
                // The merchant compares; the payment server must see every response the
                // merchant may accept, so each one is queued for it.
                if let Err(e) = self.accept(
                    &txid,
                    &key,
                    &out,
                    Some(&msg),
                    "debit response queued for the merchant's comparison",
                ) {
                    return e;
                }
                out
            }
        };
        self.deliver(&key, out).await
    }

    /// FIG. 4/5: the payment server compares and confirms. The debit response is journaled
    /// first (kind `confirming`), so a gateway that dies waiting asks again after its
    /// restart; the confirmation is journaled for the merchant ([`Gateway::accept`]) in the
    /// write that deletes it. `Err` carries the payment server's other answer; a definite
    /// one (a refusal) drops the entry. The caller holds the transaction's lock.
    async fn confirm(
        &self,
        txid: &str,
        key: &str,
        t: &GwTxn,
        msg: DebitResponseMsg,
        resp: DebitResponse,
    ) -> Result<Outbound, Message> {
        let journaled = self.journal.get(CONFIRMING, key).ok().flatten().is_some();
        if !journaled {
            self.journal
                .atomically(|b| {
                    b.put(CONFIRMING, key, &journal::encode(&msg))?;
                    b.step(txid, "debit response to the payment server", "")
                })
                .map_err(|e| refuse(ErrorCode::Internal, format!("journal: {e}"), Some(txid)))?;
        }
        let payment = &self.merchants[&t.merchant_id].payment;
        let c = match self
            .role(payment)
            .handle(gw(), Message::DebitResponse(msg))
            .await
        {
            Message::Confirmation(c) => c,
            other => {
                if definite(&other) {
                    let _ = self.journal.atomically(|b| {
                        b.delete(CONFIRMING, key)?;
                        b.step(
                            txid,
                            "payment server refused the debit response",
                            other.kind(),
                        )
                    });
                }
                return Err(other);
            }
        };
        let new_balance = c.result_c.open(t.tsk.as_ref()).ok().map(|r| r.new_balance);
        let out = Outbound {
            confirmation: c,
            response: resp,
            new_balance,
        };
        self.accept(txid, key, &out, None, "confirmation received")?;
        Ok(out)
    }

    /// Asks the payment server again for each FIG. 4/5 confirmation the gateway was waiting
    /// for (see [`CONFIRMING`]). True: something is left to retry.
    async fn confirming_pass(&self) -> bool {
        let mut backlog = false;
        for (key, bytes) in self.journal.all(CONFIRMING).unwrap_or_default() {
            let Ok(msg) = journal::decode::<DebitResponseMsg>(&bytes) else {
                tracing::error!(key, "unreadable debit response entry; left for an operator");
                continue;
            };
            let txid = txid_of_key(&key).to_string();
            let _lock = self.lock(&txid).await;
            if self.journal.get(CONFIRMING, &key).ok().flatten().is_none() {
                continue; // answered meanwhile
            }
            let resp = self
                .txn(&txid)
                .filter(|t| t.receipt.is_none())
                .and_then(|t| msg.body.open(t.tsk.as_ref()).ok().map(|r| (t, r)));
            let Some((t, resp)) = resp else {
                // Completed with a receipt meanwhile, or not a transaction we can open.
                let _ = self.journal.atomically(|b| b.delete(CONFIRMING, &key));
                continue;
            };
            let span = tracing::info_span!("confirmation", txid = %txid);
            let _calling = self.mark_retrying(&txid);
            if let Err(answer) = self
                .confirm(&txid, &key, &t, msg, resp)
                .instrument(span)
                .await
            {
                backlog |= !definite(&answer);
            }
        }
        backlog
    }

    /// A confirmation the gateway builds itself (FIG. 6: the pre-sealed result M; FIG. 7:
    /// the sealed expected signature and the card's response for the merchant).
    fn local_confirmation(
        &self,
        txid: &str,
        t: &GwTxn,
        resp: DebitResponse,
        result_m: Vec<u8>,
        for_merchant: Option<DebitResponse>,
    ) -> Outbound {
        let new_balance = resp.new_balance;
        Outbound {
            confirmation: Confirmation {
                transaction_id: txid.into(),
                result_c: Protected::Clear(DebitResultC {
                    transaction_id: txid.into(),
                    success: true,
                    amount: t.amount,
                    new_balance,
                }),
                result_m,
                debit_response: for_merchant,
            },
            response: resp,
            new_balance: Some(new_balance),
        }
    }

    /// Journals an accepted response: its release for the merchant and (FIG. 6/7) its
    /// notification for the payment server, in one write, before either is delivered.
    /// The refusal is the answer to relay, built once: boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    fn accept(
        &self,
        txid: &str,
        key: &str,
        out: &Outbound,
        notify: Option<&DebitResponseMsg>,
        step: &str,
    ) -> Result<(), Message> {
        let mut t = self.txn(txid).ok_or_else(|| {
            refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(txid),
            )
        })?;
        t.state = GwState::Confirmed;
        self.journal
            .atomically(|b| {
                b.put("gw", txid, &journal::encode(&t))?;
                b.put("release", key, &journal::encode(out))?;
                b.delete(CONFIRMING, key)?;
                if let Some(n) = notify {
                    b.put("notify", key, &journal::encode(n))?;
                }
                b.step(txid, step, "")
            })
            .map_err(|e| refuse(ErrorCode::Internal, format!("journal: {e}"), Some(txid)))?;
        if notify.is_some() {
            self.wake_notifier.notify_one();
        }
        Ok(())
    }

    fn outbound(&self, key: &str) -> Option<Outbound> {
        journal::decode(&self.journal.get("release", key).ok()??).ok()
    }

    /// Delivers one journaled confirmation to the merchant. A receipt is kept (and the
    /// entry deleted) in one write; a definite refusal deletes only this entry; a merchant
    /// that is down keeps it for the background delivery and the box gets `Busy`.
    /// The caller holds the transaction's lock.
    async fn deliver(&self, key: &str, out: Outbound) -> Message {
        let txid = txid_of_key(key).to_string();
        let Some(mut t) = self.txn(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(&txid),
            );
        };
        if let Some(r) = &t.receipt {
            // Answered meanwhile (another response, or the background delivery).
            let _ = self.journal.atomically(|b| b.delete("release", key));
            return if t.debit_response.as_ref() == Some(&out.response) {
                r.clone()
            } else {
                refuse(
                    ErrorCode::Replay,
                    "transaction completed with another debit response",
                    Some(&txid),
                )
            };
        }
        let merchant = self.merchants[&t.merchant_id].merchant.clone();
        let answer = self
            .role(&merchant)
            .handle(gw(), Message::Confirmation(out.confirmation.clone()))
            .await;
        match answer {
            Message::Receipt(mut r) => {
                r.new_balance = r.new_balance.or(out.new_balance);
                let receipt = Message::Receipt(r);
                t.receipt = Some(receipt.clone());
                t.debit_response = Some(out.response);
                t.state = GwState::Done;
                self.open_draws.close(&t.box_id, &txid);
                if let Err(e) = self.journal.atomically(|b| {
                    b.put("gw", &txid, &journal::encode(&t))?;
                    b.delete("release", key)?;
                    b.step(&txid, "receipt relayed", "")
                }) {
                    return refuse(ErrorCode::Internal, format!("journal: {e}"), Some(&txid));
                }
                receipt
            }
            other if definite(&other) => {
                let why = match &other {
                    Message::Error(e) => e.reason.clone(),
                    m => m.kind().to_string(),
                };
                let _ = self.journal.atomically(|b| {
                    b.delete("release", key)?;
                    b.step(&txid, "merchant refused the confirmation", &why)
                });
                if t.state == GwState::Confirmed && self.releases_for(&txid).is_empty() {
                    t.state = GwState::Drawn;
                    let _ = self.save(&txid, &t, "no release pending");
                }
                other
            }
            other => {
                tracing::warn!(
                    txid,
                    answer = other.kind(),
                    "merchant unreachable; release kept for background delivery"
                );
                self.wake_releases.notify_one();
                refuse(
                    ErrorCode::Busy,
                    "paid; the merchant is unreachable and the release will follow: retry for the receipt",
                    Some(&txid),
                )
            }
        }
    }

    /// The release entries journaled for a transaction.
    fn releases_for(&self, txid: &str) -> Vec<String> {
        self.journal
            .range_after("release", &format!("{txid}/"), 16)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| txid_of_key(k) == txid)
            .collect()
    }

    async fn cancel(&self, box_id: &str, c: CancelMsg) -> Message {
        let txid = c.transaction_id.clone();
        let _lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let nothing_charged = || {
            Message::Receipt(Receipt {
                transaction_id: txid.clone(),
                released: false,
                text: "Cancelled; nothing was charged".into(),
                entitlement: None,
                new_balance: None,
            })
        };
        match t.state {
            // An offer whose draw request never went out has nothing to reverse anywhere.
            GwState::Offered => {
                t.state = GwState::Cancelled;
                if let Err(e) = self.save(&txid, &t, "cancelled before the draw") {
                    return *e;
                }
                return nothing_charged();
            }
            GwState::Cancelled | GwState::Expired => return nothing_charged(),
            _ => {}
        }
        let _ = self
            .journal
            .step(&txid, "cancel relayed", &format!("{:?}", c.reason));
        let payment = self.merchants[&t.merchant_id].payment.clone();
        match self.role(&payment).handle(gw(), Message::Cancel(c)).await {
            // The draw request never reached the payment server.
            Message::Error(e) if e.code == ErrorCode::UnknownTransaction => nothing_charged(),
            r @ Message::Receipt(_) => {
                self.open_draws.close(box_id, &txid);
                self.wake_feed.notify_one();
                r
            }
            other => other,
        }
    }

    /// Delivers journaled debit responses to their payment servers (FIG. 6/7) until each is
    /// answered for good; deletes exactly the entry delivered. Runs until `shutdown`.
    pub async fn run_notifier(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        background(&self.wake_notifier, shutdown, || me.notify_pass()).await
    }

    async fn notify_pass(&self) -> bool {
        let pending = self.journal.all("notify").unwrap_or_default();
        let mut backlog = false;
        for (key, bytes) in pending {
            let txid = txid_of_key(&key).to_string();
            let Ok(msg) = journal::decode::<DebitResponseMsg>(&bytes) else {
                tracing::error!(key, "unreadable notification entry; left for an operator");
                continue;
            };
            let Some(t) = self.txn(&txid) else { continue };
            let Some(payment) = self
                .merchants
                .get(&t.merchant_id)
                .map(|m| m.payment.clone())
            else {
                continue;
            };
            let answer = self
                .role(&payment)
                .handle(gw(), Message::DebitResponse(msg))
                .await;
            if definite(&answer) {
                let _ = self.journal.atomically(|b| {
                    b.delete("notify", &key)?;
                    b.step(&txid, "payment server notified", answer.kind())
                });
            } else {
                backlog = true;
            }
        }
        backlog
    }

    /// Delivers journaled confirmations to the merchant until each is answered for good,
    /// after asking the payment server again for those the gateway was waiting for.
    pub async fn run_releases(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        background(&self.wake_releases, shutdown, || me.release_pass()).await
    }

    async fn release_pass(&self) -> bool {
        // Confirmations still to be had from the payment server first (they become releases).
        let mut backlog = self.confirming_pass().await;
        for (key, bytes) in self.journal.all("release").unwrap_or_default() {
            let Ok(out) = journal::decode::<Outbound>(&bytes) else {
                tracing::error!(key, "unreadable release entry; left for an operator");
                continue;
            };
            let txid = txid_of_key(&key).to_string();
            let _lock = self.lock(&txid).await;
            if self.outbound(&key).is_none() {
                continue; // delivered meanwhile
            }
            let _calling = self.mark_retrying(&txid);
            let span = tracing::info_span!("release", txid = %txid);
            let answer = self.deliver(&key, out).instrument(span).await;
            if !definite(&answer) {
                backlog = true;
            }
        }
        backlog
    }

    /// Passes each reversal in every payment server's feed on to the merchant, in order,
    /// once; the cursor per payment server is journaled (kind `cursor`).
    pub async fn run_reversal_feed(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        background(&self.wake_feed, shutdown, || me.feed_pass()).await
    }

    async fn feed_pass(&self) -> bool {
        let payments: BTreeSet<String> =
            self.merchants.values().map(|m| m.payment.clone()).collect();
        let mut backlog = false;
        for payment in payments {
            let cursor = self
                .journal
                .get("cursor", &payment)
                .ok()
                .flatten()
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes);
            let page = match self
                .role(&payment)
                .handle(gw(), Message::ReversalsSince { after: cursor })
                .await
            {
                Message::Reversals(p) => p,
                other => {
                    tracing::debug!(payment, answer = other.kind(), "reversal feed unavailable");
                    backlog = true;
                    continue;
                }
            };
            for notice in page {
                if !self.pass_on_reversal(&payment, &notice).await {
                    backlog = true;
                    break;
                }
            }
        }
        backlog
    }

    /// Marks the transaction reversed (unless the merchant already released it: a debit
    /// proved after the reversal) and tells the merchant. False: try again later.
    async fn pass_on_reversal(&self, payment: &str, n: &ReversalNotice) -> bool {
        let txid = n.transaction_id.clone();
        let _lock = self.lock(&txid).await;
        if let Some(mut t) = self.txn(&txid) {
            self.open_draws.close(&t.box_id, &txid);
            if t.receipt.is_none() && t.state != GwState::Reversed {
                t.state = GwState::Reversed;
                if self
                    .save(&txid, &t, "reversed by the payment server")
                    .is_err()
                {
                    return false;
                }
            }
        }
        if let Some(m) = self.merchants.get(&n.merchant_id) {
            let _calling = self.mark_retrying(&txid);
            let answer = self
                .role(&m.merchant)
                .handle(gw(), Message::Reversed(n.clone()))
                .await;
            if !definite(&answer) {
                return false;
            }
        }
        self.journal
            .atomically(|b| {
                b.put("cursor", payment, &n.seq.to_be_bytes())?;
                b.step(&txid, "reversal passed to the merchant", &n.reason)
            })
            .is_ok()
    }

    /// Expires offers not drawn within their lifetime, and (see [`crate::gateway_load`])
    /// load offers and holds. Runs until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        let never = tokio::sync::Notify::new();
        background(&never, shutdown, || me.sweep()).await
    }

    /// One sweep over the open offers and loads. True when something is left to retry.
    pub async fn sweep(&self) -> bool {
        let now = now_secs();
        let instant = std::time::Instant::now();
        self.rates.prune(instant);
        self.open_draws.prune(instant);
        let mut backlog = false;
        for (key, created) in self.journal.all(OPEN).unwrap_or_default() {
            let created = <[u8; 8]>::try_from(created.as_slice()).map_or(0, u64::from_be_bytes);
            if let Some(txid) = key.strip_prefix("p/") {
                if now >= created + self.lifetimes.offer.as_secs() {
                    self.expire_offer(txid).await;
                }
            } else if let Some(txid) = key.strip_prefix("l/") {
                backlog |= self.sweep_load(txid, now).await;
            }
        }
        backlog
    }

    async fn expire_offer(&self, txid: &str) {
        let _lock = self.lock(txid).await;
        let Some(mut t) = self.txn(txid) else {
            let _ = self
                .journal
                .atomically(|b| b.delete(OPEN, &format!("p/{txid}")));
            return;
        };
        if t.state == GwState::Offered {
            t.state = GwState::Expired;
            if self.save(txid, &t, "offer expired").is_ok() {
                tracing::info!(txid, "offer expired before its draw request");
            }
        } else {
            let _ = self
                .journal
                .atomically(|b| b.delete(OPEN, &format!("p/{txid}")));
        }
    }

    /// One pass of each background delivery, in this order: debit responses to the payment
    /// servers (FIG. 6/7, [`Gateway::run_notifier`]), confirmations asked again and releases
    /// delivered to the merchants ([`Gateway::run_releases`]), then the payment servers'
    /// reversal feeds ([`Gateway::run_reversal_feed`]). For a caller that runs the gateway
    /// without its background tasks and decides itself when this work happens (`sim`'s
    /// deterministic in-process pair). True when something is left to retry.
    pub async fn background_pass(&self) -> bool {
        let notify = self.notify_pass().await;
        let releases = self.release_pass().await;
        let feed = self.feed_pass().await;
        notify || releases || feed
    }

    /// Debit responses not yet delivered to a payment server.
    pub fn pending_notifications(&self) -> usize {
        self.journal.all("notify").map(|v| v.len()).unwrap_or(0)
    }

    /// Confirmations not yet answered by the merchant.
    pub fn pending_releases(&self) -> usize {
        self.journal.all("release").map(|v| v.len()).unwrap_or(0)
    }
}

/// Runs `pass` until `shutdown`: again after 500 ms while it reports a backlog, else after
/// 5 s or when `wake` fires.
async fn background<F, Fut>(
    wake: &tokio::sync::Notify,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        let backlog = pass().await;
        let wait = if backlog {
            Duration::from_millis(500)
        } else {
            Duration::from_secs(5)
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
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
    for (k, _) in journal.all(OPEN).unwrap_or_default() {
        let kind = if k.starts_with("l/") {
            "loads"
        } else {
            "offers"
        };
        *out.entry(kind).or_default() += 1;
    }
    out
}
