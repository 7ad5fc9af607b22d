//! Resolving an in-doubt purchase (001 [0106]; DESIGN "No value lost"), sans-IO: the shell
//! reads the journal and, when needed, the card (READ PURSE, READ LOG 1..n, a fresh
//! INITIALIZE FOR PURCHASE), asks [`plan`] what to send, sends it, and asks
//! [`on_debit_response_answer`] / [`on_cancel_answer`] what the head end's answer means.
//! [`round`] is that round itself (the card reads, the messages, the journal writes, for
//! purchases and loads) as a sans-IO machine, which `stbd` and the in-process pair both
//! execute.
//!
//! A journaled purchase is in doubt once its draw request may have reached the payment
//! server and no answer settled it. The order of evidence:
//!
//! 1. **The box journal.** A debit response the card gave (`debit_responded`) is re-sent as
//!    it is, until the head end answers it with a receipt. Such a purchase is never
//!    cancelled: the card paid, and a later card log may no longer show it (the log keeps the
//!    last [`LOG_CAPACITY`] records).
//! 2. **DEBIT never sent.** A purchase whose journal has no `debit_sent` step (state
//!    `draw_sent`, `debit_command`, or a `cancel_pending` before DEBIT) cannot have debited
//!    the card: it is cancelled with the card's proof (a fresh INITIALIZE FOR PURCHASE)
//!    without looking at the log. A debit in the log with the same counter belongs to
//!    another purchase.
//! 3. **The card's log, strictly.** DEBIT went out but the card's answer was not journaled: a
//!    log record is this purchase's debit only if it is a debit AND its counter, security
//!    card id, security-card transaction number, amount and currency all match
//!    ([`log_matches`]). Found: the debit response is rebuilt from it and re-sent. Not found:
//!    cancel with the card's proof.
//!
//! A purchase ends only on an answer that settles it ([`Resolution`]): a receipt to the
//! debit response (completed), a receipt to the cancel (ended), or a refused proof when the
//! journal proves DEBIT never went to the card (ended: the head end reverses at its own
//! deadline). `AlreadyCompleted` to a cancel means the head end holds the debit: the debit
//! response is re-sent instead. When DEBIT was sent, the box has no debit response, the
//! card's log has no matching record and the head end rejects the proof, nothing on this
//! box can settle it: it is journaled `unresolvable` with the reason (for the operator) and
//! no longer blocks the card, but it is never recorded as ended.

use std::time::Duration;

use proto::card::LOG_CAPACITY;
use proto::messages::{CancelReason, ErrorCode, Message, Receipt};
use proto::money::Money;
use proto::purse::{DebitResponse, LogKind, LogRecord};

use crate::NetworkFailure;

pub mod round;

/// What the journal knows of an in-doubt purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    /// The offer's transaction id (the idempotency key end to end).
    pub transaction_id: String,
    /// The purse card the draw was for.
    pub card_id: u64,
    /// The card transaction counter of the INITIALIZE FOR PURCHASE the draw carried.
    pub atc: u32,
    /// The offer's price (minor units and currency); the debit command was checked to ask
    /// for exactly this before DEBIT went out (001 [0082]).
    pub amount: Money,
    /// The security card's id and its transaction number, once the debit command arrived.
    pub security_card: Option<(u64, u32)>,
    /// The journal has a `debit_sent` step: DEBIT may have reached the card.
    pub debit_sent: bool,
    /// The card's debit response, if it was journaled (`debit_responded`).
    pub response: Option<DebitResponse>,
    /// Why the box cancelled, if it journaled a cancel (`cancel_pending`): recovery sends
    /// the same reason again (a card's refusal status word tells the payment server which
    /// signature failed).
    pub cancel_reason: Option<CancelReason>,
}

/// The card in the reader, as the shell read it: its id and its log (any order).
#[derive(Debug, Clone, Copy)]
pub struct CardSeen<'a> {
    /// The purse card's id (READ PURSE).
    pub card_id: u64,
    /// Its transaction log (READ LOG 1..n), at most [`LOG_CAPACITY`] records.
    pub log: &'a [LogRecord],
}

impl<'a> CardSeen<'a> {
    /// The card `card_id` with its `log`.
    #[must_use]
    pub fn new(card_id: u64, log: &'a [LogRecord]) -> Self {
        Self { card_id, log }
    }
}

/// Where a re-sent debit response comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The box journal's `debit_responded` step.
    Journal,
    /// A card-log record that strictly matches; the shell journals it before sending.
    CardLog,
}

/// What to do with an in-doubt purchase now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// The card debited: (re-)send this debit response, sealed under the offer's TSK.
    Resend {
        response: DebitResponse,
        source: Source,
    },
    /// The card did not debit: take a fresh INITIALIZE FOR PURCHASE as proof and send
    /// `Cancel { NotDebited, proof }`.
    CancelWithProof { evidence: DebitEvidence },
    /// The card of this purchase is not in the reader (none, or another card): wait for it.
    WaitForCard,
}

/// What the box knows about whether DEBIT reached the card, for reading a cancel's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DebitEvidence {
    /// The journal has no `debit_sent` step: the card cannot have run this DEBIT.
    NeverSent,
    /// DEBIT was sent, and the log of this very card was read without a matching record.
    SentNotInLog,
    /// DEBIT was sent and the card's log was not searched (the purchase flow's own cancel
    /// after the card refused DEBIT).
    SentUnchecked,
}

/// What the head end's answer means for the purchase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    /// Settled as paid: journal `completed` with this receipt.
    Completed(Receipt),
    /// Settled as not paid: journal `ended` with this reason.
    Ended(String),
    /// The head end holds proof of the debit (`AlreadyCompleted`): re-send the debit
    /// response, from the journal or a strictly matching log record ([`response_for`]).
    ResendDebitResponse,
    /// Nothing this box holds can settle it: journal `unresolvable` with this reason.
    Unresolvable(String),
    /// Still in doubt (busy, timeout, network, or an answer that settles nothing): retry
    /// later, with backoff. The reason is for the log.
    Retry(String),
}

/// Whether log record `r` of card `card_id` is the debit of `txn`: a debit, for this card,
/// with the same counter, security card, security-card transaction number, amount and
/// currency. Without a journaled debit command (no security card known) nothing matches.
#[must_use]
pub fn log_matches(txn: &InDoubt, card_id: u64, r: &LogRecord) -> bool {
    let Some((security_card_id, security_card_txn)) = txn.security_card else {
        return false;
    };
    card_id == txn.card_id
        && r.kind == LogKind::Debit
        && r.atc == txn.atc
        && r.counterparty == security_card_id
        && r.counterparty_txn == security_card_txn
        && r.amount == txn.amount.minor
        && r.currency == txn.amount.currency
}

/// The debit response the card's log proves for `txn`, if a record strictly matches.
#[must_use]
pub fn find_in_log(txn: &InDoubt, card: CardSeen<'_>) -> Option<DebitResponse> {
    card.log
        .iter()
        .find(|r| log_matches(txn, card.card_id, r))
        .and_then(|r| r.debit_response(card.card_id))
}

/// Whether `log` still reaches back to counter `atc`: it is not full, or its oldest record
/// is at or before `atc`. When it does and holds no matching debit, the card did not pay.
#[must_use]
pub fn log_reaches(log: &[LogRecord], atc: u32) -> bool {
    log.len() < LOG_CAPACITY || log.iter().map(|r| r.atc).min().is_some_and(|a| a <= atc)
}

/// Decides what to send for `txn`, given the card in the reader (if any).
#[must_use]
pub fn plan(txn: &InDoubt, card: Option<CardSeen<'_>>) -> Plan {
    let card = card.filter(|c| c.card_id == txn.card_id);
    if let Some(response) = &txn.response {
        // The card's own record wins over the journal's copy of its answer: that copy may
        // have been corrupted on its way from the card (a reader, a line), and the head end
        // refuses it for ever — the card paid and nobody would count it.
        if let Some(from_log) = card
            .and_then(|c| find_in_log(txn, c))
            .filter(|r| r != response)
        {
            return Plan::Resend {
                response: from_log,
                source: Source::CardLog,
            };
        }
        return Plan::Resend {
            response: response.clone(),
            source: Source::Journal,
        };
    }
    let Some(card) = card else {
        return Plan::WaitForCard;
    };
    if !txn.debit_sent {
        return Plan::CancelWithProof {
            evidence: DebitEvidence::NeverSent,
        };
    }
    match find_in_log(txn, card) {
        Some(response) => Plan::Resend {
            response,
            source: Source::CardLog,
        },
        None => Plan::CancelWithProof {
            evidence: DebitEvidence::SentNotInLog,
        },
    }
}

/// Why [`response_for`] has no debit response to re-send: the head end holds the debit as
/// completed, but neither the journal nor the card's log has the card's answer. Nothing on
/// this box can settle the purchase then (`unresolvable`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the head end holds this debit as completed, but this box has neither the card's \
     debit response nor a matching record in the card's log to fetch the receipt with"
)]
pub struct NoDebitResponse;

/// After `AlreadyCompleted`: the debit response to re-send (journal first, then a strictly
/// matching record of the card seen), or why there is none.
///
/// # Errors
///
/// [`NoDebitResponse`] when neither the journal nor a strictly matching record of `card`'s
/// log has the card's debit response.
pub fn response_for(
    txn: &InDoubt,
    card: Option<CardSeen<'_>>,
) -> Result<DebitResponse, NoDebitResponse> {
    // The card's own record first (the journal's copy may be corrupted: see [`plan`]).
    card.filter(|c| c.card_id == txn.card_id)
        .and_then(|c| find_in_log(txn, c))
        .or_else(|| txn.response.clone())
        .ok_or(NoDebitResponse)
}

/// Head-end refusals that say "not now": retry later.
#[must_use]
pub fn is_transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Busy
            | ErrorCode::Timeout
            | ErrorCode::Internal
            | ErrorCode::RateLimited
            | ErrorCode::InDoubt
            | ErrorCode::UnknownRoute
    )
}

fn unsettled(txid: &str, answer: Result<&Message, &NetworkFailure>) -> String {
    match answer {
        Err(e) => format!("no answer from the head end: {e}"),
        Ok(Message::Error(e)) if is_transient(e.code) => {
            format!(
                "the head end cannot answer now ({:?}): {}",
                e.code, e.reason
            )
        }
        Ok(Message::Error(e)) => format!("the head end refused ({:?}): {}", e.code, e.reason),
        Ok(Message::Receipt(r)) => format!(
            "a receipt for another transaction ({}, expected {txid})",
            r.transaction_id
        ),
        Ok(other) => format!("unexpected answer: {}", other.kind()),
    }
}

/// The answer to a (re-)sent debit response: a receipt for this transaction settles it
/// (released or not; the head end answers a repeated response with the same receipt).
/// Anything else leaves it in doubt.
#[must_use]
pub fn on_debit_response_answer(
    txid: &str,
    answer: Result<&Message, &NetworkFailure>,
) -> Resolution {
    match answer {
        Ok(Message::Receipt(r)) if r.transaction_id == txid => Resolution::Completed(r.clone()),
        other => Resolution::Retry(unsettled(txid, other)),
    }
}

/// The answer to `Cancel { NotDebited, proof }`.
///
/// - a receipt: settled (`released: false` is the reversal, or nothing to reverse);
/// - `ProofRejected`: nothing was reversed. Ended only when the journal proves DEBIT never
///   went to the card; unresolvable when DEBIT was sent and the card's log was searched in
///   vain; otherwise still in doubt (a later log read decides);
/// - `AlreadyCompleted`: re-send the debit response;
/// - anything else (busy, timeout, network): retry later.
#[must_use]
pub fn on_cancel_answer(
    txid: &str,
    evidence: DebitEvidence,
    answer: Result<&Message, &NetworkFailure>,
) -> Resolution {
    match answer {
        Ok(Message::Receipt(r)) if r.transaction_id == txid && !r.released => {
            Resolution::Ended(format!("not debited; cancelled with proof: {}", r.text))
        }
        // The head end says the goods went out: it holds the debit.
        Ok(Message::Receipt(r)) if r.transaction_id == txid => Resolution::Completed(r.clone()),
        Ok(Message::Error(e)) if e.code == ErrorCode::ProofRejected => match evidence {
            DebitEvidence::NeverSent => Resolution::Ended(format!(
                "DEBIT never went to the card; the head end could not verify the proof ({}) \
                 and reverses at its deadline",
                e.reason
            )),
            DebitEvidence::SentNotInLog => Resolution::Unresolvable(format!(
                "DEBIT was sent, the card's answer was not journaled, the card's log holds no \
                 matching debit, and the head end rejected the card's proof: {}",
                e.reason
            )),
            DebitEvidence::SentUnchecked => Resolution::Retry(format!(
                "the head end rejected the proof ({}); the card's log decides",
                e.reason
            )),
        },
        Ok(Message::Error(e)) if e.code == ErrorCode::AlreadyCompleted => {
            Resolution::ResendDebitResponse
        }
        other => Resolution::Retry(unsettled(txid, other)),
    }
}

/// The recovery timer's schedule: `initial · 2^attempt` capped at `max`, each delay a random
/// point in the upper half of that (see [`crate::backoff`]), so boxes that lost the head end
/// together do not retry in lockstep. [`reset`](Self::reset) on progress, reconnect or card
/// insertion.
#[derive(Debug, Clone)]
pub struct RetrySchedule {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl RetrySchedule {
    /// The default first delay: 2 s.
    pub const INITIAL: Duration = Duration::from_secs(2);
    /// The default cap: 60 s.
    pub const MAX: Duration = Duration::from_secs(60);

    /// A schedule from `initial` doubling to `max` (at least `initial`).
    #[must_use]
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self {
            initial,
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The delay before the next retry; each call doubles the next one, up to the cap.
    #[must_use]
    pub fn next_delay(&mut self, rng: &mut impl rand::Rng) -> Duration {
        let d = crate::backoff(self.attempt, self.initial, self.max, rng);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Back to the first delay.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Retries scheduled since the last reset.
    #[must_use]
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

impl Default for RetrySchedule {
    fn default() -> Self {
        Self::new(Self::INITIAL, Self::MAX)
    }
}

#[cfg(test)]
mod tests;
