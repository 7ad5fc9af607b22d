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
//!    first delay on progress, reconnect or insertion), and tells the runner the round ended
//!    ([`RoundEnd`]), which then refreshes the card and resumes a purchase or load that
//!    waited for the round.
//!
//! A new purchase or load on a card waits while an older transaction of that same card is in
//! doubt (not `unresolvable`): a round runs first, and if the older one is still open the
//! viewer is told to try again later. Transactions of other cards do not block. That guard
//! is the runner's ([`super::runner`]); this module knows nothing of the runner or the UI: it
//! acts through the daemon's [`Parts`] and answers with what happened.

use std::collections::HashMap;
use std::sync::Arc;

use proto::card::commands;
use proto::messages::{CancelMsg, CancelReason, DebitResponseMsg, LoadResponseMsg, Message, Offer};
use proto::purse::{LoadInit, LogRecord, PurchaseInit};
use rand::SeedableRng;
use rand::rngs::StdRng;
use stb_flow::load::{
    Decision as LoadDecision, LoadResolution, PendingLoad, Step as LoadStep, decide, on_load_answer,
};
use stb_flow::purchase::Step;
use tokio::time::Instant;

use super::card::today;
use super::event::Event;
use super::parts::Parts;
use crate::journal::{Journal, Pending};
use stb_flow::recovery::{
    CardSeen, DebitEvidence, InDoubt, Plan, Resolution, RetrySchedule, Source, log_reaches,
    on_cancel_answer, on_debit_response_answer, plan, response_for,
};

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

/// A recovery round ended (every answer is in, and no other round was asked for):
/// `progressed` says whether it closed something (so the card's balance may have changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    pub progressed: bool,
}

/// The daemon's recovery state: the timer, the round in progress.
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
            resolved: 0,
            unresolvable: 0,
        }
    }

    /// Recovery messages awaiting the head end's answer.
    pub fn outstanding(&self) -> usize {
        self.in_flight.len()
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

impl RecoverySlot {
    /// When the recovery timer fires next, if it is armed.
    pub fn due(&self) -> Option<Instant> {
        self.due
    }

    /// A trigger (start, reconnect, card insertion): the schedule starts over. The runner
    /// then runs a [`round`](Self::round).
    pub fn restart(&mut self) {
        self.schedule.reset();
    }

    /// The recovery timer fired. The runner then runs a [`round`](Self::round).
    pub fn timer_fired(&mut self) {
        self.due = None;
    }

    /// After a purchase or load flow ended: a round that waited for it runs now; a flow that
    /// left its transaction in doubt arms the timer.
    pub async fn after_flow(&mut self, parts: &mut Parts, flow_active: bool) -> Option<RoundEnd> {
        if self.again && self.in_flight.is_empty() {
            return self.round(parts, flow_active).await;
        }
        if self.due.is_some() || !self.in_flight.is_empty() {
            return None;
        }
        let open = parts
            .journal
            .in_doubt()
            .map(|p| !p.is_empty())
            .unwrap_or(true)
            || parts
                .journal
                .loads_in_doubt()
                .map(|p| !p.is_empty())
                .unwrap_or(true);
        if open {
            let d = self.schedule.next_delay(&mut self.rng);
            tracing::info!(
                retry_in_ms = d.as_millis() as u64,
                "in-doubt work; recovery timer armed"
            );
            self.due = Some(Instant::now() + d);
        }
        None
    }

    /// One recovery round (see the module docs), and another while one was asked for
    /// meanwhile. `flow_active`: a purchase or load flow holds the card, so the round waits
    /// for it to end. `Some` when the round ended here (no answer outstanding).
    pub async fn round(&mut self, parts: &mut Parts, flow_active: bool) -> Option<RoundEnd> {
        loop {
            if flow_active {
                // The flow holds the card; the round runs when it ends.
                self.again = true;
                self.due = None;
                return None;
            }
            if !self.in_flight.is_empty() {
                self.again = true;
                return None;
            }
            self.run_round(parts).await;
            if !self.in_flight.is_empty() {
                return None;
            }
            if let Some(end) = self.round_end() {
                return Some(end);
            }
        }
    }

    async fn run_round(&mut self, parts: &mut Parts) {
        self.due = None;
        self.again = false;
        self.progressed = false;
        self.retry = false;
        if let Err(e) = parts.journal.close_unsent() {
            tracing::error!(error = %e, "journal: cannot close unsent transactions");
        }
        let purchases = match parts.journal.in_doubt() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "journal unreadable; in-doubt purchases wait");
                self.retry = true;
                Vec::new()
            }
        };
        let loads = match parts.journal.loads_in_doubt() {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "journal unreadable; in-doubt loads wait");
                self.retry = true;
                Vec::new()
            }
        };
        let needs_card = purchases.iter().any(|p| p.txn.response.is_none())
            || loads.iter().any(pending_load_needs_card);
        let facts = if needs_card && parts.card.has_card() {
            match async {
                let info = parts.card.read_purse().await?;
                let log = parts.card.read_log().await?;
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
                    self.retry = true;
                    None
                }
            }
        } else {
            None
        };
        // Loads first: nothing else may load the card before they are settled.
        for p in loads {
            self.recover_load(parts, p, facts.clone()).await;
        }
        for p in purchases {
            self.recover_purchase(parts, p, facts.clone()).await;
        }
        parts.card.release().await;
    }

    /// Every answer of the round is in: `None` when another round was asked for meanwhile
    /// (the caller runs it), else arms or clears the timer.
    fn round_end(&mut self) -> Option<RoundEnd> {
        let progressed = std::mem::take(&mut self.progressed);
        if progressed {
            self.schedule.reset();
        }
        if self.again {
            return None;
        }
        if self.retry {
            let d = self.schedule.next_delay(&mut self.rng);
            tracing::info!(
                retry_in_ms = d.as_millis() as u64,
                "in-doubt work left; recovery timer armed"
            );
            self.due = Some(Instant::now() + d);
        } else {
            self.schedule.reset();
            self.due = None;
        }
        Some(RoundEnd { progressed })
    }

    /// The gateway's answer to a recovery message. `flow_active` and `card_id` (the card in
    /// the reader, as last read) say whether the card is free for a zero-value proof.
    /// `Some` when this answer ended the round.
    pub async fn answer(
        &mut self,
        parts: &mut Parts,
        txid: String,
        result: Result<Message, String>,
        flow_active: bool,
        card_id: Option<u64>,
    ) -> Option<RoundEnd> {
        let entry = self.in_flight.remove(&txid)?;
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
                self.purchase_resolved(parts, txn, offer, sent, card, span, resolution);
            }
            InFlight::Load {
                pending,
                msg,
                from_log,
                span,
            } => match on_load_answer(&txid, &msg, from_log, answer) {
                LoadResolution::Completed(confirmation) => {
                    let loaded = confirmation.loaded;
                    match parts
                        .journal
                        .record_load(&txid, &LoadStep::Completed { confirmation })
                    {
                        Ok(()) => {
                            span.in_scope(|| tracing::info!(loaded, "in-doubt load settled"));
                            self.closed_one();
                        }
                        Err(e) => {
                            span.in_scope(
                                || tracing::error!(error = %e, "journal: cannot close the load"),
                            );
                            self.retry = true;
                        }
                    }
                }
                LoadResolution::ProveWithZero => {
                    span.in_scope(|| tracing::warn!("logged S3 refused; zero-value proof follows"));
                    let card_ok = !flow_active
                        && parts.card.has_card()
                        && card_id == Some(pending.init.card_id);
                    if card_ok {
                        self.prove_load_with_zero(parts, *pending, None, span).await;
                    } else {
                        self.retry = true;
                    }
                }
                LoadResolution::Retry(why) => {
                    span.in_scope(
                        || tracing::warn!(reason = %why, "load still in doubt; retrying later"),
                    );
                    self.retry = true;
                }
            },
        }
        if !self.in_flight.is_empty() {
            return None;
        }
        match self.round_end() {
            Some(end) => Some(end),
            None => self.round(parts, flow_active).await,
        }
    }
    async fn recover_purchase(
        &mut self,
        parts: &mut Parts,
        p: Pending,
        card: Option<Arc<CardFacts>>,
    ) {
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
                    if let Err(e) = parts.journal.record(
                        &txid,
                        &Step::DebitResponded {
                            response: response.clone(),
                        },
                    ) {
                        span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                        self.retry = true;
                        return;
                    }
                    txn.response = Some(response);
                } else {
                    span.in_scope(|| tracing::info!("the journaled debit response is re-sent"));
                }
                self.send_debit_response(parts, txn, offer, card, span);
            }
            Plan::CancelWithProof { evidence } => {
                let proof = async {
                    parts.card.expect_ok(&commands::select()).await?;
                    let d = parts
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
                        self.retry = true;
                        return;
                    }
                    Err(e) => {
                        span.in_scope(|| tracing::warn!(error = %e, "no INITIALIZE proof from the card; retrying later"));
                        self.retry = true;
                        return;
                    }
                };
                if state != "cancel_pending" {
                    if let Err(e) = parts.journal.record(
                        &txid,
                        &Step::CancelPending {
                            reason: CancelReason::NotDebited,
                        },
                    ) {
                        span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                        self.retry = true;
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
                self.send(
                    parts,
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
        parts: &Parts,
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
            body: proto::messages::Protected::new(response, offer.tsk.as_ref(), &mut self.rng),
        });
        self.send(
            parts,
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

    async fn recover_load(
        &mut self,
        parts: &mut Parts,
        p: PendingLoad,
        card: Option<Arc<CardFacts>>,
    ) {
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
                self.send_load_response(parts, p, msg, false, span);
            }
            LoadDecision::FromLog(resp) => {
                span.in_scope(|| tracing::info!("the card's log has the load: its S3 is re-sent"));
                if let Err(e) = parts.journal.record_load(
                    &txid,
                    &LoadStep::Responded {
                        response: resp.clone(),
                    },
                ) {
                    span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                    self.retry = true;
                    return;
                }
                let msg = LoadResponseMsg {
                    transaction_id: txid,
                    response: Some(resp),
                    zero_value: None,
                };
                self.send_load_response(parts, p, msg, true, span);
            }
            LoadDecision::ProveWithZero { response } => {
                self.prove_load_with_zero(parts, p, response, span).await;
            }
        }
    }

    /// Runs a zero-value INITIALIZE FOR LOAD on the card, journals it and sends it.
    async fn prove_load_with_zero(
        &mut self,
        parts: &mut Parts,
        p: PendingLoad,
        response: Option<proto::purse::LoadResponse>,
        span: tracing::Span,
    ) {
        let zero = async {
            parts.card.expect_ok(&commands::select()).await?;
            let d = parts
                .card
                .expect_ok(&stb_flow::load::zero_value_apdu(&p.offer))
                .await?;
            LoadInit::decode(&d).map_err(|e| format!("zero-value S1 malformed: {e}"))
        }
        .await;
        parts.card.release().await;
        let zero = match zero {
            Ok(z) => z,
            Err(e) => {
                span.in_scope(|| tracing::warn!(error = %e, "no zero-value proof from the card; the load stays in doubt"));
                self.retry = true;
                return;
            }
        };
        let txid = p.transaction_id.clone();
        if let Err(e) = parts
            .journal
            .record_load(&txid, &LoadStep::ZeroValue { zero: zero.clone() })
        {
            span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
            self.retry = true;
            return;
        }
        span.in_scope(|| tracing::info!("zero-value proof sent"));
        let msg = LoadResponseMsg {
            transaction_id: txid,
            response,
            zero_value: Some(zero),
        };
        self.send_load_response(parts, p, msg, false, span);
    }

    fn send_load_response(
        &mut self,
        parts: &Parts,
        pending: PendingLoad,
        msg: LoadResponseMsg,
        from_log: bool,
        span: tracing::Span,
    ) {
        let txid = pending.transaction_id.clone();
        self.send(
            parts,
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
    fn send(&mut self, parts: &Parts, txid: String, msg: Message, entry: InFlight) {
        let span = match &entry {
            InFlight::Purchase { span, .. } | InFlight::Load { span, .. } => span.clone(),
        };
        let id = txid.clone();
        span.in_scope(|| tracing::info!(message = msg.kind(), "recovery: to the gateway"));
        parts.call(msg, span, move |result| Event::Recovery {
            transaction_id: id,
            result,
        });
        self.in_flight.insert(txid, entry);
    }

    fn closed_one(&mut self) {
        self.progressed = true;
        self.resolved += 1;
    }

    #[allow(clippy::too_many_arguments)]
    fn purchase_resolved(
        &mut self,
        parts: &mut Parts,
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
                return self.purchase_unresolvable(&mut parts.journal, &txid, why, span);
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
                            if let Err(e) = parts.journal.record(
                                &txid,
                                &Step::DebitResponded {
                                    response: response.clone(),
                                },
                            ) {
                                span.in_scope(
                                    || tracing::error!(error = %e, "journal write failed"),
                                );
                                self.retry = true;
                                return;
                            }
                            txn.response = Some(response);
                        }
                        self.send_debit_response(parts, txn, offer, card, span);
                    }
                    Err(why) => self.purchase_unresolvable(&mut parts.journal, &txid, why, span),
                }
                return;
            }
            Resolution::Retry(why) => {
                span.in_scope(
                    || tracing::warn!(reason = %why, "purchase still in doubt; retrying later"),
                );
                self.retry = true;
                return;
            }
        };
        match parts.journal.record(&txid, &step) {
            Ok(()) => self.closed_one(),
            Err(e) => {
                span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                self.retry = true;
            }
        }
    }

    fn purchase_unresolvable(
        &mut self,
        journal: &mut Journal,
        txid: &str,
        why: String,
        span: tracing::Span,
    ) {
        span.in_scope(|| {
            tracing::warn!(reason = %why, "purchase cannot be resolved from this box; kept for the operator")
        });
        match journal.record(txid, &Step::Unresolvable { why: why.clone() }) {
            Ok(()) => {
                self.progressed = true;
                self.unresolvable += 1;
            }
            Err(e) => {
                span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
                self.retry = true;
            }
        }
    }
}
