//! Resolving the journal's in-doubt purchases and loads: the IO half of
//! [`stb_flow::recovery`] and of [`stb_flow::load::decide`].
//!
//! A recovery *round* starts at start-up, on every (re)connection to the gateway, on every
//! card insertion, before a new purchase or load on a card with older in-doubt work, and on
//! the recovery timer. A round:
//!
//! 1. reads the journal; when a transaction needs the card (no journaled answer to re-send),
//!    reads the card in the reader once (READ PURSE, READ LOG) — card commands run inline,
//!    they take milliseconds — and never while a purchase or load flow holds the card;
//! 2. asks the sans-IO decisions what to send for each transaction (re-send the journaled or
//!    log-proved debit response, cancel with a fresh INITIALIZE as proof, re-send the load
//!    response or a zero-value proof, or wait for the card);
//! 3. sends each message as a task; the answers come back as [`Event::Recovery`], so the
//!    event loop keeps answering the remote meanwhile;
//! 4. journals what each answer settles (completed, ended, `unresolvable`), or keeps the
//!    transaction in doubt;
//! 5. once every answer is in: if something is still in doubt, arms the recovery timer with
//!    backoff ([`RetrySchedule`]: by default 2 s doubling to 60 s, with jitter; back to the
//!    first delay on progress, reconnect or insertion), and resumes a purchase or load that
//!    waited for the round ([`Deferred`]).
//!
//! A new purchase or load on a card waits while an older transaction of that same card is in
//! doubt (not `unresolvable`): a round runs first, and if the older one is still open the
//! viewer is told to try again later. Transactions of other cards do not block.

use std::collections::HashMap;
use std::sync::Arc;

use proto::card::commands;
use proto::messages::{CancelMsg, CancelReason, DebitResponseMsg, LoadResponseMsg, Message, Offer};
use proto::purse::{LoadInit, LogRecord, PurchaseInit};
use rand::SeedableRng;
use rand::rngs::StdRng;
use stb_flow::show::{Flow, Refusal};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument;
use ui::UiUpdate;
use ui::model::ProgressStep;

use super::card::today;
use super::runner::{Event, Runner};
use crate::journal::Pending;
use stb_flow::load::{
    Decision as LoadDecision, LoadResolution, PendingLoad, Step as LoadStep, decide, on_load_answer,
};
use stb_flow::purchase::{Outcome, Step};
use stb_flow::recovery::{
    CardSeen, DebitEvidence, InDoubt, Plan, Resolution, RetrySchedule, Source, log_reaches,
    on_cancel_answer, on_debit_response_answer, plan, response_for,
};

/// A new purchase or load that waits for a recovery round (an older transaction of the same
/// card was in doubt).
pub enum Deferred {
    Purchase {
        merchant_id: String,
        item_id: String,
        reply: Option<oneshot::Sender<Outcome>>,
    },
    Load {
        source: ui::model::LoadSource,
    },
}

/// What the card in the reader showed this round.
struct CardFacts {
    card_id: u64,
    log: Vec<LogRecord>,
}

impl CardFacts {
    fn seen(&self) -> CardSeen<'_> {
        CardSeen::new(self.card_id, &self.log)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sent {
    DebitResponse,
    Cancel(DebitEvidence),
}

/// A recovery message out to the gateway, by transaction id.
enum InFlight {
    Purchase {
        txn: InDoubt,
        offer: Offer,
        sent: Sent,
        card: Option<Arc<CardFacts>>,
        span: tracing::Span,
    },
    Load {
        pending: Box<PendingLoad>,
        msg: LoadResponseMsg,
        from_log: bool,
        span: tracing::Span,
    },
}

/// The runner's recovery state: the timer, the round in progress, a deferred start.
pub struct RecoverySlot {
    schedule: RetrySchedule,
    rng: StdRng,
    in_flight: HashMap<String, InFlight>,
    /// When the recovery timer fires next.
    due: Option<Instant>,
    /// A round was asked for while one was out or a flow held the card.
    again: bool,
    /// This round closed something / left something in doubt that the head end must answer.
    progressed: bool,
    retry: bool,
    deferred: Option<Deferred>,
    /// Transactions closed by recovery (purchases and loads).
    pub resolved: u64,
    /// Purchases journaled `unresolvable`.
    pub unresolvable: u64,
}

impl RecoverySlot {
    /// A slot whose timer runs from `initial` doubling to `max` (with jitter).
    pub fn new(initial: std::time::Duration, max: std::time::Duration) -> Self {
        Self {
            schedule: RetrySchedule::new(initial, max),
            rng: StdRng::from_entropy(),
            in_flight: HashMap::new(),
            due: None,
            again: false,
            progressed: false,
            retry: false,
            deferred: None,
            resolved: 0,
            unresolvable: 0,
        }
    }

    /// Recovery messages awaiting the head end's answer.
    pub fn outstanding(&self) -> usize {
        self.in_flight.len()
    }

    /// A new purchase or load waits for this round.
    pub fn has_deferred(&self) -> bool {
        self.deferred.is_some()
    }
}

impl Default for RecoverySlot {
    fn default() -> Self {
        Self::new(RetrySchedule::INITIAL, RetrySchedule::MAX)
    }
}

fn pending_load_needs_card(p: &PendingLoad) -> bool {
    !(p.response.as_ref().is_some_and(|r| r.is_loaded()) || p.zero.is_some())
}

impl Runner {
    /// When the recovery timer fires next, if it is armed.
    pub fn recovery_deadline(&self) -> Option<Instant> {
        self.recovery.due
    }

    /// A trigger (start, reconnect, card insertion): the schedule starts over and a round
    /// runs now (or as soon as the running one or the active flow ends).
    pub async fn recover(&mut self) {
        self.recovery.schedule.reset();
        self.recovery_round().await;
    }

    /// The recovery timer fired.
    pub async fn recovery_timer(&mut self) {
        self.recovery.due = None;
        self.recovery_round().await;
    }

    /// After a purchase or load flow ended: a round that waited for it runs now; a flow that
    /// left its transaction in doubt arms the timer.
    pub(crate) async fn recovery_after_flow(&mut self) {
        if self.recovery.again && self.recovery.in_flight.is_empty() {
            Box::pin(self.recovery_round()).await;
            return;
        }
        if self.recovery.due.is_some() || !self.recovery.in_flight.is_empty() {
            return;
        }
        let open = self
            .journal
            .in_doubt()
            .map(|p| !p.is_empty())
            .unwrap_or(true)
            || self
                .journal
                .loads_in_doubt()
                .map(|p| !p.is_empty())
                .unwrap_or(true);
        if open {
            let r = &mut self.recovery;
            let d = r.schedule.next_delay(&mut r.rng);
            tracing::info!(
                retry_in_ms = d.as_millis() as u64,
                "in-doubt work; recovery timer armed"
            );
            r.due = Some(Instant::now() + d);
        }
    }

    /// One recovery round (see the module docs).
    async fn recovery_round(&mut self) {
        if self.purchase_active() || self.load.is_active() {
            // The flow holds the card; the round runs when it ends.
            self.recovery.again = true;
            self.recovery.due = None;
            return;
        }
        if !self.recovery.in_flight.is_empty() {
            self.recovery.again = true;
            return;
        }
        let r = &mut self.recovery;
        r.due = None;
        r.again = false;
        r.progressed = false;
        r.retry = false;
        if let Err(e) = self.journal.close_unsent() {
            tracing::error!(error = %e, "journal: cannot close unsent transactions");
        }
        let purchases = match self.journal.in_doubt() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "journal unreadable; in-doubt purchases wait");
                self.recovery.retry = true;
                Vec::new()
            }
        };
        let loads = match self.journal.loads_in_doubt() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "journal unreadable; in-doubt loads wait");
                self.recovery.retry = true;
                Vec::new()
            }
        };
        let needs_card = purchases.iter().any(|p| p.txn.response.is_none())
            || loads.iter().any(pending_load_needs_card);
        let facts = if needs_card && self.card.has_card() {
            match async {
                let info = self.card.read_purse().await?;
                let log = self.card.read_log().await?;
                Ok::<_, String>(CardFacts {
                    card_id: info.card_id,
                    log,
                })
            }
            .await
            {
                Ok(f) => Some(Arc::new(f)),
                Err(e) => {
                    tracing::warn!(error = %e, "recovery: cannot read the card; retrying later");
                    self.recovery.retry = true;
                    None
                }
            }
        } else {
            None
        };
        // Loads first: nothing else may load the card before they are settled.
        for p in loads {
            self.recover_load(p, facts.clone()).await;
        }
        for p in purchases {
            self.recover_purchase(p, facts.clone()).await;
        }
        self.card.release().await;
        if self.recovery.in_flight.is_empty() {
            Box::pin(self.round_end()).await;
        }
    }

    async fn recover_purchase(&mut self, p: Pending, card: Option<Arc<CardFacts>>) {
        let Pending { txn, offer, state } = p;
        let txid = txn.transaction_id.clone();
        let span = tracing::info_span!("recover", transaction_id = %txid, %state);
        match plan(&txn, card.as_deref().map(CardFacts::seen)) {
            Plan::WaitForCard => span.in_scope(|| {
                tracing::info!(
                    card_id = txn.card_id,
                    "waiting for the card of this purchase"
                )
            }),
            Plan::Resend { response, source } => {
                let mut txn = txn;
                if source == Source::CardLog {
                    span.in_scope(|| {
                        tracing::info!("the card's log holds the debit; its response is re-sent")
                    });
                    // Journaled first: from now on the response itself settles it.
                    if let Err(e) = self.journal.record(
                        &txid,
                        &Step::DebitResponded {
                            response: response.clone(),
                        },
                    ) {
                        span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                        self.recovery.retry = true;
                        return;
                    }
                    txn.response = Some(response);
                } else {
                    span.in_scope(|| tracing::info!("the journaled debit response is re-sent"));
                }
                self.send_debit_response(txn, offer, card, span);
            }
            Plan::CancelWithProof { evidence } => {
                let proof = async {
                    self.card.expect_ok(&commands::select()).await?;
                    let d = self
                        .card
                        .expect_ok(&commands::init_purchase(today()))
                        .await?;
                    PurchaseInit::decode(&d).map_err(|e| e.to_string())
                }
                .await;
                let proof = match proof {
                    Ok(p) if p.card_id == txn.card_id => p,
                    Ok(p) => {
                        span.in_scope(|| {
                            tracing::warn!(
                                card_id = p.card_id,
                                "the card was swapped during recovery; retrying later"
                            )
                        });
                        self.recovery.retry = true;
                        return;
                    }
                    Err(e) => {
                        span.in_scope(|| tracing::warn!(error = %e, "no INITIALIZE proof from the card; retrying later"));
                        self.recovery.retry = true;
                        return;
                    }
                };
                if state != "cancel_pending" {
                    if let Err(e) = self.journal.record(
                        &txid,
                        &Step::CancelPending {
                            reason: CancelReason::NotDebited,
                        },
                    ) {
                        span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                        self.recovery.retry = true;
                        return;
                    }
                }
                span.in_scope(|| {
                    tracing::info!(
                        ?evidence,
                        proof_atc = proof.atc,
                        "the card did not debit; cancelling with its proof"
                    )
                });
                let msg = Message::Cancel(CancelMsg {
                    transaction_id: txid.clone(),
                    reason: CancelReason::NotDebited,
                    proof: Some(proof),
                });
                self.recovery_send(
                    txid,
                    msg,
                    InFlight::Purchase {
                        txn,
                        offer,
                        sent: Sent::Cancel(evidence),
                        card,
                        span,
                    },
                );
            }
        }
    }

    /// Sends `txn`'s debit response (which must be set), sealed under the offer's TSK as the
    /// purchase flow does.
    fn send_debit_response(
        &mut self,
        txn: InDoubt,
        offer: Offer,
        card: Option<Arc<CardFacts>>,
        span: tracing::Span,
    ) {
        let Some(response) = txn.response.clone() else {
            return;
        };
        let txid = txn.transaction_id.clone();
        let msg = Message::DebitResponse(DebitResponseMsg {
            transaction_id: txid.clone(),
            body: proto::messages::Protected::new(
                response,
                offer.tsk.as_ref(),
                &mut self.recovery.rng,
            ),
        });
        self.recovery_send(
            txid,
            msg,
            InFlight::Purchase {
                txn,
                offer,
                sent: Sent::DebitResponse,
                card,
                span,
            },
        );
    }

    async fn recover_load(&mut self, p: PendingLoad, card: Option<Arc<CardFacts>>) {
        let txid = p.transaction_id.clone();
        let span = tracing::info_span!("recover load", transaction_id = %txid, state = %p.state);
        match decide(&p, card.as_deref().map(CardFacts::seen)) {
            LoadDecision::WaitForCard => span.in_scope(|| {
                tracing::info!(
                    card_id = p.init.card_id,
                    "waiting for the card of this load"
                )
            }),
            LoadDecision::Resend(msg) => {
                span.in_scope(|| tracing::info!("the journaled load response is re-sent"));
                self.send_load_response(p, msg, false, span);
            }
            LoadDecision::FromLog(resp) => {
                span.in_scope(|| tracing::info!("the card's log has the load: its S3 is re-sent"));
                if let Err(e) = self.journal.record_load(
                    &txid,
                    &LoadStep::Responded {
                        response: resp.clone(),
                    },
                ) {
                    span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                    self.recovery.retry = true;
                    return;
                }
                let msg = LoadResponseMsg {
                    transaction_id: txid,
                    response: Some(resp),
                    zero_value: None,
                };
                self.send_load_response(p, msg, true, span);
            }
            LoadDecision::ProveWithZero { response } => {
                self.prove_load_with_zero(p, response, span).await;
            }
        }
    }

    /// Runs a zero-value INITIALIZE FOR LOAD on the card, journals it and sends it.
    async fn prove_load_with_zero(
        &mut self,
        p: PendingLoad,
        response: Option<proto::purse::LoadResponse>,
        span: tracing::Span,
    ) {
        let zero = async {
            self.card.expect_ok(&commands::select()).await?;
            let d = self
                .card
                .expect_ok(&stb_flow::load::zero_value_apdu(&p.offer))
                .await?;
            LoadInit::decode(&d).map_err(|e| format!("zero-value S1 malformed: {e}"))
        }
        .await;
        self.card.release().await;
        let zero = match zero {
            Ok(z) => z,
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "no zero-value proof from the card; the load stays in doubt"));
                self.recovery.retry = true;
                return;
            }
        };
        let txid = p.transaction_id.clone();
        if let Err(e) = self
            .journal
            .record_load(&txid, &LoadStep::ZeroValue { zero: zero.clone() })
        {
            span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
            self.recovery.retry = true;
            return;
        }
        span.in_scope(|| tracing::info!("zero-value proof sent"));
        let msg = LoadResponseMsg {
            transaction_id: txid,
            response,
            zero_value: Some(zero),
        };
        self.send_load_response(p, msg, false, span);
    }

    fn send_load_response(
        &mut self,
        pending: PendingLoad,
        msg: LoadResponseMsg,
        from_log: bool,
        span: tracing::Span,
    ) {
        let txid = pending.transaction_id.clone();
        self.recovery_send(
            txid,
            Message::LoadResponse(msg.clone()),
            InFlight::Load {
                pending: Box::new(pending),
                msg,
                from_log,
                span,
            },
        );
    }

    /// Sends `msg` as a task; the answer comes back as [`Event::Recovery`].
    fn recovery_send(&mut self, txid: String, msg: Message, entry: InFlight) {
        let span = match &entry {
            InFlight::Purchase { span, .. } | InFlight::Load { span, .. } => span.clone(),
        };
        let gw = self.gateway.clone();
        let tx = self.events.clone();
        let id = txid.clone();
        span.in_scope(|| {
            tracing::info!(message = stb_flow::name(&msg), "recovery: to the gateway")
        });
        tokio::spawn(
            async move {
                let result = gw.call(&msg).await.map_err(|e| e.to_string());
                let _ = tx
                    .send(Event::Recovery {
                        transaction_id: id,
                        result,
                    })
                    .await;
            }
            .instrument(span),
        );
        self.recovery.in_flight.insert(txid, entry);
    }

    /// The gateway's answer to a recovery message.
    pub(crate) async fn recovery_answer(&mut self, txid: String, result: Result<Message, String>) {
        let Some(entry) = self.recovery.in_flight.remove(&txid) else {
            return;
        };
        let answer = result.as_ref().map_err(String::as_str);
        match entry {
            InFlight::Purchase {
                txn,
                offer,
                sent,
                card,
                span,
            } => {
                let resolution = match sent {
                    Sent::DebitResponse => on_debit_response_answer(&txid, answer),
                    Sent::Cancel(evidence) => on_cancel_answer(&txid, evidence, answer),
                };
                self.purchase_resolved(txn, offer, sent, card, span, resolution);
            }
            InFlight::Load {
                pending,
                msg,
                from_log,
                span,
            } => match on_load_answer(&txid, &msg, from_log, answer) {
                LoadResolution::Completed(confirmation) => {
                    let loaded = confirmation.loaded;
                    match self
                        .journal
                        .record_load(&txid, &LoadStep::Completed { confirmation })
                    {
                        Ok(()) => {
                            span.in_scope(|| tracing::info!(loaded, "in-doubt load settled"));
                            self.closed_one();
                            self.load.recovered += 1;
                        }
                        Err(e) => {
                            span.in_scope(
                                || tracing::error!(error = %e, "journal: cannot close the load"),
                            );
                            self.recovery.retry = true;
                        }
                    }
                }
                LoadResolution::ProveWithZero => {
                    span.in_scope(|| tracing::warn!("logged S3 refused; zero-value proof follows"));
                    let card_ok = !self.purchase_active()
                        && !self.load.is_active()
                        && self.card.has_card()
                        && self.card_id == Some(pending.init.card_id);
                    if card_ok {
                        self.prove_load_with_zero(*pending, None, span).await;
                    } else {
                        self.recovery.retry = true;
                    }
                }
                LoadResolution::Retry(why) => {
                    span.in_scope(
                        || tracing::warn!(reason = %why, "load still in doubt; retrying later"),
                    );
                    self.recovery.retry = true;
                }
            },
        }
        if self.recovery.in_flight.is_empty() {
            Box::pin(self.round_end()).await;
        }
    }

    fn closed_one(&mut self) {
        self.recovery.progressed = true;
        self.recovery.resolved += 1;
    }

    fn purchase_resolved(
        &mut self,
        txn: InDoubt,
        offer: Offer,
        sent: Sent,
        card: Option<Arc<CardFacts>>,
        span: tracing::Span,
        resolution: Resolution,
    ) {
        let txid = txn.transaction_id.clone();
        let step = match resolution {
            Resolution::Completed(receipt) => {
                span.in_scope(|| {
                    tracing::info!(released = receipt.released, "in-doubt purchase completed")
                });
                Step::Completed { receipt }
            }
            Resolution::Ended(why) => {
                span.in_scope(|| tracing::info!(reason = %why, "in-doubt purchase ended"));
                Step::Ended {
                    why: format!("{why} (recovery)"),
                }
            }
            Resolution::Unresolvable(why) => {
                let why = match (&card, sent) {
                    (Some(c), Sent::Cancel(DebitEvidence::SentNotInLog)) => {
                        if log_reaches(&c.log, txn.atc) {
                            format!(
                                "{why} (the card's log reaches back to counter {} without this debit: the card did not pay)",
                                txn.atc
                            )
                        } else {
                            format!(
                                "{why} (the card's log no longer reaches back to counter {})",
                                txn.atc
                            )
                        }
                    }
                    _ => why,
                };
                return self.purchase_unresolvable(&txid, why, span);
            }
            Resolution::ResendDebitResponse => {
                match response_for(&txn, card.as_deref().map(CardFacts::seen)) {
                    Ok(response) => {
                        span.in_scope(|| {
                            tracing::info!(
                                "the head end holds the debit; the debit response is re-sent"
                            )
                        });
                        let mut txn = txn;
                        if txn.response.is_none() {
                            if let Err(e) = self.journal.record(
                                &txid,
                                &Step::DebitResponded {
                                    response: response.clone(),
                                },
                            ) {
                                span.in_scope(
                                    || tracing::error!(error = %e, "journal write failed"),
                                );
                                self.recovery.retry = true;
                                return;
                            }
                            txn.response = Some(response);
                        }
                        self.send_debit_response(txn, offer, card, span);
                    }
                    Err(why) => self.purchase_unresolvable(&txid, why, span),
                }
                return;
            }
            Resolution::Retry(why) => {
                span.in_scope(
                    || tracing::warn!(reason = %why, "purchase still in doubt; retrying later"),
                );
                self.recovery.retry = true;
                return;
            }
        };
        match self.journal.record(&txid, &step) {
            Ok(()) => self.closed_one(),
            Err(e) => {
                span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                self.recovery.retry = true;
            }
        }
    }

    fn purchase_unresolvable(&mut self, txid: &str, why: String, span: tracing::Span) {
        span.in_scope(|| {
            tracing::warn!(reason = %why, "purchase cannot be resolved from this box; kept for the operator")
        });
        match self
            .journal
            .record(txid, &Step::Unresolvable { why: why.clone() })
        {
            Ok(()) => {
                self.recovery.progressed = true;
                self.recovery.unresolvable += 1;
            }
            Err(e) => {
                span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                self.recovery.retry = true;
            }
        }
    }

    /// Every answer of the round is in.
    async fn round_end(&mut self) {
        let r = &mut self.recovery;
        let progressed = std::mem::take(&mut r.progressed);
        if progressed {
            r.schedule.reset();
        }
        if r.again {
            Box::pin(self.recovery_round()).await;
            return;
        }
        if r.retry {
            let d = r.schedule.next_delay(&mut r.rng);
            tracing::info!(
                retry_in_ms = d.as_millis() as u64,
                "in-doubt work left; recovery timer armed"
            );
            r.due = Some(Instant::now() + d);
        } else {
            r.schedule.reset();
            r.due = None;
        }
        if progressed {
            self.refresh_card().await;
        }
        Box::pin(self.resume_deferred()).await;
    }

    /// The in-doubt transaction (purchase or load, not `unresolvable`) of the card in the
    /// reader that a new one must wait for; `Err` when the journal cannot tell.
    async fn blocking_transaction(&mut self) -> Result<Option<String>, String> {
        if !self.card.has_card() {
            return Ok(None);
        }
        let card_id = match self.card_id {
            Some(id) => id,
            None => {
                let r = self.card.read_purse().await;
                self.card.release().await;
                match r {
                    Ok(info) => {
                        self.card_id = Some(info.card_id);
                        info.card_id
                    }
                    // The flow will find out about the card itself.
                    Err(_) => return Ok(None),
                }
            }
        };
        let purchases = self.journal.in_doubt().map_err(|e| e.to_string())?;
        if let Some(p) = purchases.iter().find(|p| p.txn.card_id == card_id) {
            return Ok(Some(p.txn.transaction_id.clone()));
        }
        let loads = self.journal.loads_in_doubt().map_err(|e| e.to_string())?;
        Ok(loads
            .iter()
            .find(|p| p.init.card_id == card_id)
            .map(|p| p.transaction_id.clone()))
    }

    /// Before a new purchase or load: `Some(d)` to start it now; `None` when it waits for a
    /// recovery round (older in-doubt work on this card) or was refused.
    pub(crate) async fn gate(&mut self, d: Deferred) -> Option<Deferred> {
        match self.blocking_transaction().await {
            Ok(None) => Some(d),
            Ok(Some(txid)) => {
                tracing::info!(blocking = %txid, "an earlier transaction on this card is in doubt; settling it first");
                self.recovery.deferred = Some(d);
                self.update(UiUpdate::Progress(ProgressStep::ContactingServer))
                    .await;
                self.recover().await;
                None
            }
            Err(e) => {
                let error = e.to_string();
                self.refuse(d, Refusal::JournalUnreadable { error }).await;
                None
            }
        }
    }

    /// After a round: start what waited for it, or tell the viewer why not.
    async fn resume_deferred(&mut self) {
        let Some(d) = self.recovery.deferred.take() else {
            return;
        };
        match self.blocking_transaction().await {
            Ok(None) => match d {
                Deferred::Purchase {
                    merchant_id,
                    item_id,
                    reply,
                } => self.start_now(&merchant_id, &item_id, reply).await,
                Deferred::Load { source } => self.start_load_now(source).await,
            },
            Ok(Some(txid)) => {
                tracing::warn!(blocking = %txid, "new transaction refused: an earlier one on this card is still in doubt");
                let flow = match d {
                    Deferred::Purchase { .. } => Flow::Purchase,
                    Deferred::Load { .. } => Flow::Load,
                };
                let refusal = Refusal::EarlierInDoubt {
                    transaction_id: txid,
                    flow,
                };
                self.refuse(d, refusal).await
            }
            Err(e) => {
                let error = e.to_string();
                self.refuse(d, Refusal::JournalUnreadable { error }).await
            }
        }
    }

    async fn refuse(&mut self, d: Deferred, refusal: Refusal) {
        let shown = UiUpdate::Error(super::show::refused(&refusal));
        if let Deferred::Purchase {
            reply: Some(reply), ..
        } = d
        {
            let _ = reply.send(Outcome::Failed {
                transaction_id: None,
                refusal,
            });
        }
        self.update(shown).await;
    }
}
