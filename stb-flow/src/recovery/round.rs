//! The IO half of a recovery round, sans-IO: one copy for `stbd` (`stb/src/daemon/recover.rs`
//! executes it asynchronously) and for the in-process pair (`sim/src/pair.rs` executes it
//! through its queue). 001 [0106] for purchase recovery, [0130] for the zero-value load
//! proof; the decisions themselves are [`super::plan`], [`super::on_debit_response_answer`],
//! [`super::on_cancel_answer`], [`super::response_for`], [`crate::load::decide`] and
//! [`crate::load::on_load_answer`].
//!
//! A round ([`Round::start`]) is given the journal's in-doubt loads and purchases (as the
//! shell read them) and whether a card is in the reader. Then:
//!
//! 1. when a transaction needs the card (no journaled answer to re-send) and a card is in
//!    the reader, the card is read once: SELECT, READ PURSE, READ LOG 1..n. The shell calls
//!    [`Round::start`] only while no purchase or load flow holds the card;
//! 2. loads first (nothing else may load the card before they are settled), then purchases:
//!    each gets what the decisions say — the journaled or log-proved debit response re-sent,
//!    a cancel with a fresh INITIALIZE FOR PURCHASE as proof, the load response re-sent or
//!    rebuilt from the log, a zero-value INITIALIZE FOR LOAD as proof, or nothing while its
//!    card is not in the reader;
//! 3. the card is released ([`Action::ReleaseCard`]);
//! 4. each message's answer ([`Input::Answer`], [`Input::NetworkFailed`], keyed by
//!    transaction id, whenever it comes) is read by the decisions, and what it settles is
//!    journaled (completed, ended, `unresolvable`) or the transaction stays in doubt;
//! 5. once no answer is outstanding, [`Action::Ended`] says whether the round closed
//!    something and whether something is left that a retry (the recovery timer, with
//!    [`super::RetrySchedule`]) may settle.
//!
//! **Journal before act.** Every journal write comes as an [`Action::Journal`] *before* the
//! action it guards: a debit response rebuilt from the card's log is journaled
//! (`debit_responded`) before it is sent; a cancel's `cancel_pending` (unless the journal
//! already says so) after the card gave its proof and before the cancel goes out; a load
//! response rebuilt from the log (`load_responded`) and a zero-value proof (`zero_value`)
//! before they are sent. A write that fails stops that transaction for this round (it stays
//! in doubt and the round asks for a retry); the other transactions go on.
//!
//! **Driving it.** The shell executes the actions in order. [`Action::Apdu`] and
//! [`Action::Journal`] are always the last action of a batch: the round waits for their
//! result ([`Input::Card`], [`Input::Journaled`]) and says what comes next in the batch that
//! result returns. [`Action::Send`] needs nothing back at once: the answer comes as
//! [`Input::Answer`] or [`Input::NetworkFailed`] whenever it arrives (an answer that comes
//! while a card reply or journal write is awaited is kept and handled after it). The shell
//! logs each send in [`Round::span`], the transaction's span.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use proto::apdu::StatusWord;
use proto::card::{LOG_CAPACITY, commands};
use proto::messages::{
    CancelMsg, CancelReason, DebitResponseMsg, LoadResponseMsg, Message, Offer, Protected,
};
use proto::purse::{Date, LoadInit, LoadResponse, LogRecord, PurchaseInit, PurseInfo};
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{
    CardSeen, DebitEvidence, InDoubt, Plan, Resolution, Source, log_reaches, on_cancel_answer,
    on_debit_response_answer, plan, response_for,
};
use crate::load::{self, Decision as LoadDecision, LoadResolution, PendingLoad};
use crate::purchase;
use crate::{CardFailure, CardReply, JournalFailure, NetworkFailure, split_sw};

/// An in-doubt purchase as the journal holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingPurchase {
    /// What the journal knows of the transaction.
    pub txn: InDoubt,
    /// The offer it was for (its TSK seals a re-sent debit response).
    pub offer: Offer,
    /// Its state in the journal (`draw_sent`, `debit_sent`, `cancel_pending`, ...).
    pub state: purchase::JournalState,
}

/// A journal step written by recovery, for a purchase or a load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A purchase's step (`debit_responded`, `cancel_pending`, `completed`, `ended`,
    /// `unresolvable`).
    Purchase(purchase::Step),
    /// A load's step (`load_responded`, `zero_value`, `load_completed`).
    Load(load::Step),
}

/// What the round asks its shell to do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// One command APDU to the card in the reader; the reply (or the reader's error) comes
    /// back as [`Input::Card`]. Always the last action of its batch.
    Apdu(Vec<u8>),
    /// Write this step for the transaction; the result comes back as
    /// [`Input::Journaled`]. Always the last action of its batch, and before the action it
    /// guards.
    Journal {
        /// The transaction the step is for.
        transaction_id: String,
        /// The purchase's or load's step.
        step: Step,
    },
    /// One request to the gateway for this transaction; its answer comes back, whenever it
    /// arrives, as [`Input::Answer`] or [`Input::NetworkFailed`].
    Send {
        /// The transaction the message is for (its answer comes back under this id).
        transaction_id: String,
        /// The request: a debit response, a cancel or a load response.
        message: Message,
    },
    /// The round is done with the card for now: end the reader's sequence and session.
    ReleaseCard,
    /// The round ended: no answer is outstanding.
    Ended(RoundEnd),
}

/// What the shell feeds back.
// One input at a time, handed over and consumed (as the flows' `Input::Answer(Message)`):
// the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// The reply to the outstanding [`Action::Apdu`], or what the reader saw.
    Card(Result<CardReply, CardFailure>),
    /// The result of the outstanding [`Action::Journal`].
    Journaled(Result<(), JournalFailure>),
    /// The gateway's answer to the [`Action::Send`] of this transaction.
    Answer {
        /// The transaction the answered message was for.
        transaction_id: String,
        /// The gateway's answer.
        message: Message,
        /// The id of the card in the reader as last read, when it is free for recovery (no
        /// flow holds it); a zero-value proof that the answer asks for runs only on that
        /// card, else the load waits for a later round.
        card: Option<u64>,
    },
    /// The [`Action::Send`] of this transaction got no answer; the transport's error.
    NetworkFailed {
        /// The transaction the unanswered message was for.
        transaction_id: String,
        /// What the transport saw.
        error: NetworkFailure,
    },
}

/// How a round ended ([`Action::Ended`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoundEnd {
    /// It closed something (completed, ended, `unresolvable`): the card's balance may have
    /// changed.
    pub progressed: bool,
    /// Something is still in doubt that a later round may settle without a new trigger
    /// (the head end did not settle it, the card could not be read or gave no proof, a
    /// journal write failed): arm the recovery timer.
    pub retry: bool,
    /// Transactions left waiting for their card (not in the reader): a card insertion
    /// starts the round that settles them.
    pub waiting_for_card: Vec<String>,
}

/// What recovery has done since this [`Round`] was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Transactions closed (completed or ended) by recovery, purchases and loads.
    pub resolved: u64,
    /// Purchases journaled `unresolvable`.
    pub unresolvable: u64,
    /// Times a transaction was left in doubt for a retry (busy, lost, no proof, a failed
    /// journal write, ...).
    pub retries: u64,
}

/// The card as the round read it.
#[derive(Debug)]
struct CardFacts {
    card_id: u64,
    log: Vec<LogRecord>,
}

impl CardFacts {
    fn seen(&self) -> CardSeen<'_> {
        CardSeen::new(self.card_id, &self.log)
    }
}

/// A purchase being recovered.
struct PurchaseCtx {
    txn: InDoubt,
    offer: Offer,
    card: Option<Arc<CardFacts>>,
    span: tracing::Span,
}

/// A load being recovered.
struct LoadCtx {
    pending: PendingLoad,
    span: tracing::Span,
}

/// Why a recovery message went out.
enum Out {
    Purchase {
        ctx: Box<PurchaseCtx>,
        evidence: Option<DebitEvidence>,
    },
    Load {
        ctx: Box<LoadCtx>,
        msg: Box<LoadResponseMsg>,
        from_log: bool,
    },
}

impl Out {
    fn span(&self) -> &tracing::Span {
        match self {
            Out::Purchase { ctx, .. } => &ctx.span,
            Out::Load { ctx, .. } => &ctx.span,
        }
    }
}

/// The round's work still to start, in order.
enum Job {
    ReadCard,
    Load(Box<PendingLoad>),
    Purchase(Box<PendingPurchase>),
    Release,
}

/// What was journaled, for when the write's result comes back.
enum Settled {
    /// A purchase completed or ended.
    Purchase,
    /// A purchase journaled `unresolvable`.
    Unresolvable,
    /// A load completed with this loaded flag.
    Load { loaded: bool },
}

/// What the round waits for from the shell (a card reply or a journal write's result).
enum Wait {
    ReadSelect,
    ReadPurse,
    ReadLog {
        card_id: u64,
        log: Vec<LogRecord>,
    },
    ProofSelect {
        ctx: Box<PurchaseCtx>,
        evidence: DebitEvidence,
        journal_cancel: bool,
    },
    ProofInit {
        ctx: Box<PurchaseCtx>,
        evidence: DebitEvidence,
        journal_cancel: bool,
    },
    CancelJournaled {
        ctx: Box<PurchaseCtx>,
        evidence: DebitEvidence,
        proof: PurchaseInit,
    },
    /// A debit response rebuilt from the card's log was journaled; then it is sent.
    DebitJournaled {
        ctx: Box<PurchaseCtx>,
    },
    /// A load response rebuilt from the card's log was journaled; then it is sent.
    LoadJournaled {
        ctx: Box<LoadCtx>,
        msg: Box<LoadResponseMsg>,
    },
    ZeroSelect {
        ctx: Box<LoadCtx>,
        response: Option<LoadResponse>,
    },
    ZeroInit {
        ctx: Box<LoadCtx>,
        response: Option<LoadResponse>,
    },
    ZeroJournaled {
        ctx: Box<LoadCtx>,
        msg: Box<LoadResponseMsg>,
    },
    Settled {
        span: tracing::Span,
        what: Settled,
    },
}

/// A box's recovery rounds: the round in progress and the recovery messages still out.
///
/// A shell keeps one for the box's life (a restart starts with a new one): it starts a
/// round on its triggers (start, reconnect, card insertion, the recovery timer), executes
/// the [`Action`]s and feeds back the [`Input`]s. A round started while answers of an
/// earlier one are still out leaves their transactions to those answers.
pub struct Round {
    rng: StdRng,
    today: Date,
    in_flight: BTreeMap<String, Out>,
    todo: VecDeque<Job>,
    wait: Option<Wait>,
    /// Answers that came while a card reply or journal write was awaited.
    deferred: VecDeque<Input>,
    card: Option<Arc<CardFacts>>,
    /// A round is in progress: its [`Action::Ended`] is still to come.
    active: bool,
    progressed: bool,
    retry: bool,
    waiting_for_card: Vec<String>,
    counts: Counts,
}

fn needs_card(purchases: &[PendingPurchase], loads: &[PendingLoad]) -> bool {
    purchases.iter().any(|p| p.txn.response.is_none())
        || loads
            .iter()
            .any(|p| !(p.response.as_ref().is_some_and(|r| r.is_loaded()) || p.zero.is_some()))
}

/// Why the round got no usable answer from the card, for the logs: any of them leaves the
/// transaction in doubt for a later round.
#[derive(Debug, thiserror::Error)]
enum Unusable {
    /// No reply: what the reader saw.
    #[error(transparent)]
    Card(#[from] CardFailure),
    /// The card refused the command.
    #[error("the card refused: {0}")]
    Refused(StatusWord),
    /// The reply has no status word.
    #[error("the card answered without a status word")]
    NoStatusWord,
    /// The reply's data could not be decoded; what and why.
    #[error("{0}")]
    Malformed(String),
}

/// A command that must succeed: its data, or why not.
fn expect_ok(reply: Result<CardReply, CardFailure>) -> Result<Vec<u8>, Unusable> {
    let r = reply?;
    match split_sw(&r.response) {
        Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
        Some((_, sw)) => Err(Unusable::Refused(sw)),
        None => Err(Unusable::NoStatusWord),
    }
}

impl Round {
    /// No round yet, nothing out; `seed` drives the sealing of re-sent debit responses
    /// under the offer's TSK (FIG. 8).
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            // Set by every start, before any INITIALIZE FOR PURCHASE.
            today: Date::new(2000, 1, 1),
            in_flight: BTreeMap::new(),
            todo: VecDeque::new(),
            wait: None,
            deferred: VecDeque::new(),
            card: None,
            active: false,
            progressed: false,
            retry: false,
            waiting_for_card: Vec::new(),
            counts: Counts::default(),
        }
    }

    /// Recovery messages awaiting the head end's answer.
    #[must_use]
    pub fn outstanding(&self) -> usize {
        self.in_flight.len()
    }

    /// Whether a recovery message of this transaction awaits its answer.
    #[must_use]
    pub fn awaits(&self, transaction_id: &str) -> bool {
        self.in_flight.contains_key(transaction_id)
    }

    /// A round is in progress (its [`Action::Ended`] has not come yet).
    #[must_use]
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The span of the transaction whose message is out (for the shell's send task and its
    /// logs); [`tracing::Span::none`] for any other.
    #[must_use]
    pub fn span(&self, transaction_id: &str) -> tracing::Span {
        self.in_flight
            .get(transaction_id)
            .map_or_else(tracing::Span::none, |o| o.span().clone())
    }

    /// What recovery has done so far.
    #[must_use]
    pub fn counts(&self) -> Counts {
        self.counts
    }

    /// Starts a round over the journal's in-doubt `purchases` and `loads` (or why the
    /// journal could not list them: those wait, and the round asks for a retry).
    /// `card_present`: a card is in the reader (and no flow holds it). `today` dates the
    /// INITIALIZE FOR PURCHASE taken as a cancel's proof. Transactions whose message is
    /// still out are left to its answer.
    pub fn start(
        &mut self,
        purchases: Result<Vec<PendingPurchase>, JournalFailure>,
        loads: Result<Vec<PendingLoad>, JournalFailure>,
        card_present: bool,
        today: Date,
    ) -> Vec<Action> {
        self.today = today;
        self.active = true;
        self.progressed = false;
        self.retry = false;
        self.waiting_for_card.clear();
        self.card = None;
        let purchases = purchases.unwrap_or_else(|e| {
            tracing::error!(error = %e, "journal unreadable; in-doubt purchases wait");
            self.set_retry();
            Vec::new()
        });
        let loads = loads.unwrap_or_else(|e| {
            tracing::error!(error = %e, "journal unreadable; in-doubt loads wait");
            self.set_retry();
            Vec::new()
        });
        if needs_card(&purchases, &loads) && card_present {
            self.todo.push_back(Job::ReadCard);
        }
        for p in loads {
            if !self.in_flight.contains_key(&p.transaction_id) {
                self.todo.push_back(Job::Load(Box::new(p)));
            }
        }
        for p in purchases {
            if !self.in_flight.contains_key(&p.txn.transaction_id) {
                self.todo.push_back(Job::Purchase(Box::new(p)));
            }
        }
        self.todo.push_back(Job::Release);
        let mut out = Vec::new();
        self.pump(&mut out);
        out
    }

    /// Feeds back a card reply, a journal write's result or a gateway answer; returns what
    /// to do next. An answer for a transaction with no message out is ignored (it returns
    /// nothing).
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let mut out = Vec::new();
        match input {
            Input::Card(reply) => match self.wait.take() {
                Some(w) => self.on_card(w, reply, &mut out),
                None => tracing::warn!("recovery: a card reply nobody waits for; ignored"),
            },
            Input::Journaled(result) => match self.wait.take() {
                Some(w) => self.on_journaled(w, result, &mut out),
                None => tracing::warn!("recovery: a journal result nobody waits for; ignored"),
            },
            answer @ (Input::Answer { .. } | Input::NetworkFailed { .. }) => {
                if self.wait.is_some() {
                    self.deferred.push_back(answer);
                } else {
                    self.on_answer(answer, &mut out);
                }
            }
        }
        self.pump(&mut out);
        out
    }

    fn set_retry(&mut self) {
        self.retry = true;
        self.counts.retries += 1;
    }

    fn closed_one(&mut self) {
        self.progressed = true;
        self.counts.resolved += 1;
    }

    /// Runs the next jobs and deferred answers until the round waits for the shell, or
    /// ends.
    fn pump(&mut self, out: &mut Vec<Action>) {
        while self.wait.is_none() {
            if let Some(answer) = self.deferred.pop_front() {
                self.on_answer(answer, out);
                continue;
            }
            let Some(job) = self.todo.pop_front() else {
                break;
            };
            match job {
                Job::ReadCard => {
                    self.wait = Some(Wait::ReadSelect);
                    out.push(Action::Apdu(commands::select()));
                }
                Job::Load(p) => self.recover_load(*p, out),
                Job::Purchase(p) => self.recover_purchase(*p, out),
                Job::Release => out.push(Action::ReleaseCard),
            }
        }
        if self.wait.is_none() && self.todo.is_empty() && self.active && self.in_flight.is_empty() {
            self.active = false;
            self.card = None;
            out.push(Action::Ended(RoundEnd {
                progressed: std::mem::take(&mut self.progressed),
                retry: std::mem::take(&mut self.retry),
                waiting_for_card: std::mem::take(&mut self.waiting_for_card),
            }));
        }
    }

    fn journal(&mut self, txid: &str, step: Step, wait: Wait, out: &mut Vec<Action>) {
        self.wait = Some(wait);
        out.push(Action::Journal {
            transaction_id: txid.to_string(),
            step,
        });
    }

    fn send(&mut self, txid: String, message: Message, why: Out, out: &mut Vec<Action>) {
        why.span()
            .in_scope(|| tracing::info!(message = message.kind(), "recovery: to the gateway"));
        self.in_flight.insert(txid.clone(), why);
        out.push(Action::Send {
            transaction_id: txid,
            message,
        });
    }

    // ---- the card read of the round

    fn card_read_failed(&mut self, e: &Unusable) {
        tracing::warn!(error = %e, "recovery: cannot read the card; retrying later");
        self.set_retry();
    }

    fn on_card(
        &mut self,
        wait: Wait,
        reply: Result<CardReply, CardFailure>,
        out: &mut Vec<Action>,
    ) {
        match wait {
            Wait::ReadSelect => match expect_ok(reply) {
                Ok(_) => {
                    self.wait = Some(Wait::ReadPurse);
                    out.push(Action::Apdu(commands::read_purse()));
                }
                Err(e) => self.card_read_failed(&e),
            },
            Wait::ReadPurse => match expect_ok(reply).and_then(|d| {
                PurseInfo::decode(&d)
                    .map_err(|e| Unusable::Malformed(format!("READ PURSE answer malformed: {e}")))
            }) {
                Ok(info) => {
                    self.wait = Some(Wait::ReadLog {
                        card_id: info.card_id,
                        log: Vec::new(),
                    });
                    out.push(Action::Apdu(commands::read_log(1)));
                }
                Err(e) => self.card_read_failed(&e),
            },
            Wait::ReadLog { card_id, mut log } => {
                let n = log.len() + 1;
                let more = match reply.map(|r| r.response) {
                    Err(e) => Err(Unusable::Card(e)),
                    Ok(resp) => match split_sw(&resp) {
                        Some((data, sw)) if sw.is_ok() => match LogRecord::decode(data) {
                            Ok(r) => {
                                log.push(r);
                                Ok(true)
                            }
                            Err(e) => Err(Unusable::Malformed(format!(
                                "log record {n} malformed: {e}"
                            ))),
                        },
                        // Past the last record.
                        Some(_) => Ok(false),
                        None => Err(Unusable::Malformed(
                            "READ LOG answer without a status word".into(),
                        )),
                    },
                };
                match more {
                    Ok(true) if log.len() < LOG_CAPACITY.min(255) => {
                        let next = log.len() as u8 + 1;
                        self.wait = Some(Wait::ReadLog { card_id, log });
                        out.push(Action::Apdu(commands::read_log(next)));
                    }
                    Ok(_) => self.card = Some(Arc::new(CardFacts { card_id, log })),
                    Err(e) => self.card_read_failed(&e),
                }
            }
            Wait::ProofSelect {
                ctx,
                evidence,
                journal_cancel,
            } => match expect_ok(reply) {
                Ok(_) => {
                    self.wait = Some(Wait::ProofInit {
                        ctx,
                        evidence,
                        journal_cancel,
                    });
                    out.push(Action::Apdu(commands::init_purchase_proof(self.today)));
                }
                Err(e) => self.no_proof(&ctx, &e),
            },
            Wait::ProofInit {
                ctx,
                evidence,
                journal_cancel,
            } => {
                match expect_ok(reply).and_then(|d| {
                    PurchaseInit::decode(&d).map_err(|e| Unusable::Malformed(e.to_string()))
                }) {
                    Ok(p) if p.card_id == ctx.txn.card_id => {
                        self.proof_taken(ctx, evidence, journal_cancel, p, out);
                    }
                    Ok(p) => {
                        ctx.span.in_scope(|| {
                            tracing::warn!(
                                card_id = p.card_id,
                                "the card was swapped during recovery; retrying later"
                            )
                        });
                        self.set_retry();
                    }
                    Err(e) => self.no_proof(&ctx, &e),
                }
            }
            Wait::ZeroSelect { ctx, response } => match expect_ok(reply) {
                Ok(_) => {
                    let apdu = load::zero_value_apdu(&ctx.pending.offer);
                    self.wait = Some(Wait::ZeroInit { ctx, response });
                    out.push(Action::Apdu(apdu));
                }
                Err(e) => {
                    out.push(Action::ReleaseCard);
                    self.no_zero(&ctx, &e);
                }
            },
            Wait::ZeroInit { ctx, response } => {
                out.push(Action::ReleaseCard);
                match expect_ok(reply).and_then(|d| {
                    LoadInit::decode(&d)
                        .map_err(|e| Unusable::Malformed(format!("zero-value S1 malformed: {e}")))
                }) {
                    Ok(zero) => {
                        let txid = ctx.pending.transaction_id.clone();
                        let msg = LoadResponseMsg {
                            transaction_id: txid.clone(),
                            response,
                            zero_value: Some(zero.clone()),
                        };
                        self.journal(
                            &txid,
                            Step::Load(load::Step::ZeroValue { zero }),
                            Wait::ZeroJournaled {
                                ctx,
                                msg: Box::new(msg),
                            },
                            out,
                        );
                    }
                    Err(e) => self.no_zero(&ctx, &e),
                }
            }
            other => {
                tracing::warn!("recovery: a card reply while a journal write was awaited");
                self.wait = Some(other);
            }
        }
    }

    fn no_proof(&mut self, ctx: &PurchaseCtx, e: &Unusable) {
        ctx.span.in_scope(
            || tracing::warn!(error = %e, "no INITIALIZE proof from the card; retrying later"),
        );
        self.set_retry();
    }

    fn no_zero(&mut self, ctx: &LoadCtx, e: &Unusable) {
        ctx.span.in_scope(|| {
            tracing::warn!(error = %e, "no zero-value proof from the card; the load stays in doubt")
        });
        self.set_retry();
    }

    // ---- journal results

    fn on_journaled(
        &mut self,
        wait: Wait,
        result: Result<(), JournalFailure>,
        out: &mut Vec<Action>,
    ) {
        let span = match &wait {
            Wait::CancelJournaled { ctx, .. } | Wait::DebitJournaled { ctx } => ctx.span.clone(),
            Wait::LoadJournaled { ctx, .. } | Wait::ZeroJournaled { ctx, .. } => ctx.span.clone(),
            Wait::Settled { span, .. } => span.clone(),
            _ => {
                tracing::warn!("recovery: a journal result while a card reply was awaited");
                self.wait = Some(wait);
                return;
            }
        };
        if let Err(e) = result {
            if matches!(
                wait,
                Wait::Settled {
                    what: Settled::Load { .. },
                    ..
                }
            ) {
                span.in_scope(|| tracing::error!(error = %e, "journal: cannot close the load"));
            } else {
                span.in_scope(|| tracing::error!(error = %e, "journal write failed"));
            }
            self.set_retry();
            return;
        }
        match wait {
            Wait::CancelJournaled {
                ctx,
                evidence,
                proof,
            } => self.send_cancel(ctx, evidence, proof, out),
            Wait::DebitJournaled { ctx } => self.send_debit_response(ctx, out),
            Wait::LoadJournaled { ctx, msg } => self.send_load_response(ctx, *msg, true, out),
            Wait::ZeroJournaled { ctx, msg } => {
                ctx.span
                    .in_scope(|| tracing::info!("zero-value proof sent"));
                self.send_load_response(ctx, *msg, false, out);
            }
            Wait::Settled { span, what } => match what {
                Settled::Purchase => self.closed_one(),
                Settled::Unresolvable => {
                    self.progressed = true;
                    self.counts.unresolvable += 1;
                }
                Settled::Load { loaded } => {
                    span.in_scope(|| tracing::info!(loaded, "in-doubt load settled"));
                    self.closed_one();
                }
            },
            _ => unreachable!("card waits were handled above"),
        }
    }

    // ---- purchases

    fn recover_purchase(&mut self, p: PendingPurchase, out: &mut Vec<Action>) {
        let PendingPurchase { txn, offer, state } = p;
        let txid = txn.transaction_id.clone();
        let span = tracing::info_span!("recover", transaction_id = %txid, %state);
        let card = self.card.clone();
        let decision = plan(&txn, card.as_deref().map(CardFacts::seen));
        let ctx = Box::new(PurchaseCtx {
            txn,
            offer,
            card,
            span,
        });
        match decision {
            Plan::WaitForCard => {
                ctx.span.in_scope(|| {
                    tracing::info!(
                        card_id = ctx.txn.card_id,
                        "waiting for the card of this purchase"
                    )
                });
                self.waiting_for_card.push(txid);
            }
            Plan::Resend { response, source } => {
                let mut ctx = ctx;
                if source == Source::CardLog {
                    ctx.span.in_scope(|| {
                        tracing::info!("the card's log holds the debit; its response is re-sent")
                    });
                    // Journaled first: from now on the response itself settles it.
                    ctx.txn.response = Some(response.clone());
                    self.journal(
                        &txid,
                        Step::Purchase(purchase::Step::DebitResponded { response }),
                        Wait::DebitJournaled { ctx },
                        out,
                    );
                } else {
                    ctx.span
                        .in_scope(|| tracing::info!("the journaled debit response is re-sent"));
                    self.send_debit_response(ctx, out);
                }
            }
            Plan::CancelWithProof { evidence } => {
                self.wait = Some(Wait::ProofSelect {
                    ctx,
                    evidence,
                    journal_cancel: state != purchase::JournalState::CancelPending,
                });
                out.push(Action::Apdu(commands::select()));
            }
        }
    }

    fn proof_taken(
        &mut self,
        ctx: Box<PurchaseCtx>,
        evidence: DebitEvidence,
        journal_cancel: bool,
        proof: PurchaseInit,
        out: &mut Vec<Action>,
    ) {
        if journal_cancel {
            let txid = ctx.txn.transaction_id.clone();
            self.journal(
                &txid,
                Step::Purchase(purchase::Step::CancelPending {
                    reason: ctx.txn.cancel_reason.unwrap_or(CancelReason::NotDebited),
                }),
                Wait::CancelJournaled {
                    ctx,
                    evidence,
                    proof,
                },
                out,
            );
        } else {
            self.send_cancel(ctx, evidence, proof, out);
        }
    }

    fn send_cancel(
        &mut self,
        ctx: Box<PurchaseCtx>,
        evidence: DebitEvidence,
        proof: PurchaseInit,
        out: &mut Vec<Action>,
    ) {
        ctx.span.in_scope(|| {
            tracing::info!(
                ?evidence,
                proof_atc = proof.atc,
                "the card did not debit; cancelling with its proof"
            )
        });
        let txid = ctx.txn.transaction_id.clone();
        let msg = Message::Cancel(CancelMsg {
            transaction_id: txid.clone(),
            reason: ctx.txn.cancel_reason.unwrap_or(CancelReason::NotDebited),
            proof: Some(proof),
        });
        self.send(
            txid,
            msg,
            Out::Purchase {
                ctx,
                evidence: Some(evidence),
            },
            out,
        );
    }

    /// Sends the purchase's debit response (which must be set), sealed under the offer's
    /// TSK as the purchase flow does.
    fn send_debit_response(&mut self, ctx: Box<PurchaseCtx>, out: &mut Vec<Action>) {
        let Some(response) = ctx.txn.response.clone() else {
            return;
        };
        let txid = ctx.txn.transaction_id.clone();
        let msg = Message::DebitResponse(DebitResponseMsg {
            transaction_id: txid.clone(),
            body: Protected::new(response, ctx.offer.tsk.as_ref(), &mut self.rng),
        });
        self.send(
            txid,
            msg,
            Out::Purchase {
                ctx,
                evidence: None,
            },
            out,
        );
    }

    fn purchase_resolved(
        &mut self,
        mut ctx: Box<PurchaseCtx>,
        evidence: Option<DebitEvidence>,
        resolution: Resolution,
        out: &mut Vec<Action>,
    ) {
        let txid = ctx.txn.transaction_id.clone();
        let span = ctx.span.clone();
        let step = match resolution {
            Resolution::Completed(receipt) => {
                span.in_scope(|| {
                    tracing::info!(released = receipt.released, "in-doubt purchase completed")
                });
                purchase::Step::Completed { receipt }
            }
            Resolution::Ended(why) => {
                span.in_scope(|| tracing::info!(reason = %why, "in-doubt purchase ended"));
                purchase::Step::Ended {
                    why: format!("{why} (recovery)"),
                }
            }
            Resolution::Unresolvable(why) => {
                let why = match (&ctx.card, evidence) {
                    (Some(c), Some(DebitEvidence::SentNotInLog)) => {
                        if log_reaches(&c.log, ctx.txn.atc) {
                            format!(
                                "{why} (the card's log reaches back to counter {} without this debit: the card did not pay)",
                                ctx.txn.atc
                            )
                        } else {
                            format!(
                                "{why} (the card's log no longer reaches back to counter {})",
                                ctx.txn.atc
                            )
                        }
                    }
                    _ => why,
                };
                return self.purchase_unresolvable(&txid, why, span, out);
            }
            Resolution::ResendDebitResponse => {
                match response_for(&ctx.txn, ctx.card.as_deref().map(CardFacts::seen)) {
                    Ok(response) => {
                        span.in_scope(|| {
                            tracing::info!(
                                "the head end holds the debit; the debit response is re-sent"
                            )
                        });
                        if ctx.txn.response.as_ref() != Some(&response) {
                            // From the card's log (none journaled, or the journaled copy
                            // differs from the card's own record): journaled first.
                            ctx.txn.response = Some(response.clone());
                            self.journal(
                                &txid,
                                Step::Purchase(purchase::Step::DebitResponded { response }),
                                Wait::DebitJournaled { ctx },
                                out,
                            );
                        } else {
                            self.send_debit_response(ctx, out);
                        }
                    }
                    Err(why) => self.purchase_unresolvable(&txid, why.to_string(), span, out),
                }
                return;
            }
            Resolution::Retry(why) => {
                span.in_scope(
                    || tracing::warn!(reason = %why, "purchase still in doubt; retrying later"),
                );
                self.set_retry();
                return;
            }
        };
        self.journal(
            &txid,
            Step::Purchase(step),
            Wait::Settled {
                span,
                what: Settled::Purchase,
            },
            out,
        );
    }

    fn purchase_unresolvable(
        &mut self,
        txid: &str,
        why: String,
        span: tracing::Span,
        out: &mut Vec<Action>,
    ) {
        span.in_scope(|| {
            tracing::warn!(reason = %why, "purchase cannot be resolved from this box; kept for the operator")
        });
        self.journal(
            txid,
            Step::Purchase(purchase::Step::Unresolvable { why }),
            Wait::Settled {
                span,
                what: Settled::Unresolvable,
            },
            out,
        );
    }

    // ---- loads

    fn recover_load(&mut self, p: PendingLoad, out: &mut Vec<Action>) {
        let txid = p.transaction_id.clone();
        let span = tracing::info_span!("recover load", transaction_id = %txid, state = %p.state);
        let decision = load::decide(&p, self.card.as_deref().map(CardFacts::seen));
        let ctx = Box::new(LoadCtx { pending: p, span });
        match decision {
            LoadDecision::WaitForCard => {
                ctx.span.in_scope(|| {
                    tracing::info!(
                        card_id = ctx.pending.init.card_id,
                        "waiting for the card of this load"
                    )
                });
                self.waiting_for_card.push(txid);
            }
            LoadDecision::Resend(msg) => {
                ctx.span
                    .in_scope(|| tracing::info!("the journaled load response is re-sent"));
                self.send_load_response(ctx, msg, false, out);
            }
            LoadDecision::FromLog(resp) => {
                ctx.span
                    .in_scope(|| tracing::info!("the card's log has the load: its S3 is re-sent"));
                let msg = LoadResponseMsg {
                    transaction_id: txid.clone(),
                    response: Some(resp.clone()),
                    zero_value: None,
                };
                self.journal(
                    &txid,
                    Step::Load(load::Step::Responded { response: resp }),
                    Wait::LoadJournaled {
                        ctx,
                        msg: Box::new(msg),
                    },
                    out,
                );
            }
            LoadDecision::ProveWithZero { response } => self.prove_with_zero(ctx, response, out),
        }
    }

    /// A zero-value INITIALIZE FOR LOAD on the card (001 [0130]); journaled, then sent.
    fn prove_with_zero(
        &mut self,
        ctx: Box<LoadCtx>,
        response: Option<LoadResponse>,
        out: &mut Vec<Action>,
    ) {
        self.wait = Some(Wait::ZeroSelect { ctx, response });
        out.push(Action::Apdu(commands::select()));
    }

    fn send_load_response(
        &mut self,
        ctx: Box<LoadCtx>,
        msg: LoadResponseMsg,
        from_log: bool,
        out: &mut Vec<Action>,
    ) {
        let txid = ctx.pending.transaction_id.clone();
        let message = Message::LoadResponse(msg.clone());
        self.send(
            txid,
            message,
            Out::Load {
                ctx,
                msg: Box::new(msg),
                from_log,
            },
            out,
        );
    }

    // ---- answers

    fn on_answer(&mut self, input: Input, out: &mut Vec<Action>) {
        let (txid, result, card) = match input {
            Input::Answer {
                transaction_id,
                message,
                card,
            } => (transaction_id, Ok(message), card),
            Input::NetworkFailed {
                transaction_id,
                error,
            } => (transaction_id, Err(error), None),
            Input::Card(_) | Input::Journaled(_) => return,
        };
        let Some(why) = self.in_flight.remove(&txid) else {
            return;
        };
        let answer = result.as_ref();
        match why {
            Out::Purchase { ctx, evidence } => {
                let resolution = match evidence {
                    None => on_debit_response_answer(&txid, answer),
                    Some(evidence) => on_cancel_answer(&txid, evidence, answer),
                };
                self.purchase_resolved(ctx, evidence, resolution, out);
            }
            Out::Load { ctx, msg, from_log } => {
                match load::on_load_answer(&txid, &msg, from_log, answer) {
                    LoadResolution::Completed(confirmation) => {
                        let loaded = confirmation.loaded;
                        let span = ctx.span.clone();
                        self.journal(
                            &txid,
                            Step::Load(load::Step::Completed { confirmation }),
                            Wait::Settled {
                                span,
                                what: Settled::Load { loaded },
                            },
                            out,
                        );
                    }
                    LoadResolution::ProveWithZero => {
                        ctx.span.in_scope(|| {
                            tracing::warn!("logged S3 refused; zero-value proof follows")
                        });
                        if card == Some(ctx.pending.init.card_id) {
                            self.prove_with_zero(ctx, None, out);
                        } else {
                            self.set_retry();
                        }
                    }
                    LoadResolution::Retry(why) => {
                        ctx.span.in_scope(
                            || tracing::warn!(reason = %why, "load still in doubt; retrying later"),
                        );
                        self.set_retry();
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
