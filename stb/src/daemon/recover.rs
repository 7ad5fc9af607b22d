//! Resolving the journal's in-doubt purchases and loads: the async shell that executes
//! [`stb_flow::recovery::round::Round`] (the round itself, sans-IO, shared with the
//! in-process pair in `sim/`) through the daemon's [`Parts`].
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
//!
//! What to read, send and journal, in which order, is the round's ([`Round`]); this shell
//! reads the journal for it, runs its card commands inline through the card port, its
//! journal writes on the daemon's journal, its messages as tasks, and owns the timer and
//! the "another round was asked for" state.

use std::collections::VecDeque;

use proto::messages::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use stb_flow::recovery::RetrySchedule;
use stb_flow::recovery::round::{self, Action, Input, Round, Step};
use stb_flow::{JournalFailure, NetworkFailure};
use tokio::time::Instant;

use super::card::today;
use super::event::Event;
use super::gateway::GatewayError;
use super::parts::Parts;

/// A recovery round ended (every answer is in, and no other round was asked for):
/// `progressed` says whether it closed something (so the card's balance may have changed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoundEnd {
    pub progressed: bool,
}

/// The daemon's recovery state: the timer, the round in progress.
pub struct RecoverySlot {
    schedule: RetrySchedule,
    /// The timer's jitter.
    rng: StdRng,
    /// The round and the recovery messages out.
    round: Round,
    /// When the recovery timer fires next.
    due: Option<Instant>,
    /// A round was asked for while one was out or a flow held the card.
    again: bool,
}

impl RecoverySlot {
    /// A slot whose timer runs from `initial` doubling to `max` (with jitter).
    pub fn new(initial: std::time::Duration, max: std::time::Duration) -> Self {
        let mut rng = StdRng::from_entropy();
        let round = Round::new(rng.r#gen());
        Self {
            schedule: RetrySchedule::new(initial, max),
            rng,
            round,
            due: None,
            again: false,
        }
    }

    /// Recovery messages awaiting the head end's answer.
    pub fn outstanding(&self) -> usize {
        self.round.outstanding()
    }

    /// Transactions closed by recovery (purchases and loads).
    pub fn resolved(&self) -> u64 {
        self.round.counts().resolved
    }

    /// Purchases journaled `unresolvable`.
    pub fn unresolvable(&self) -> u64 {
        self.round.counts().unresolvable
    }
}

impl Default for RecoverySlot {
    fn default() -> Self {
        Self::new(RetrySchedule::INITIAL, RetrySchedule::MAX)
    }
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
        if self.again && self.round.outstanding() == 0 {
            return self.round(parts, flow_active).await;
        }
        if self.due.is_some() || self.round.outstanding() > 0 {
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
            if self.round.outstanding() > 0 {
                self.again = true;
                return None;
            }
            self.due = None;
            self.again = false;
            if let Err(e) = parts.journal.close_unsent() {
                tracing::error!(error = %e, "journal: cannot close unsent transactions");
            }
            let purchases = parts.journal.in_doubt().map_err(JournalFailure::from);
            let loads = parts.journal.loads_in_doubt().map_err(JournalFailure::from);
            let actions = self
                .round
                .start(purchases, loads, parts.card.has_card(), today());
            let end = self.execute(parts, actions).await?;
            if let Some(end) = self.round_end(end) {
                return Some(end);
            }
        }
    }

    /// Executes the round's actions in order: card commands and journal writes inline (their
    /// results go back to the round at once), messages as tasks. The round's end, if it
    /// came.
    async fn execute(
        &mut self,
        parts: &mut Parts,
        actions: Vec<Action>,
    ) -> Option<round::RoundEnd> {
        let mut queue = VecDeque::from(actions);
        let mut end = None;
        while let Some(action) = queue.pop_front() {
            match action {
                Action::Apdu(apdu) => {
                    let reply = parts.card.transmit(&apdu).await;
                    queue.extend(self.round.handle(Input::Card(reply)));
                }
                Action::Journal {
                    transaction_id,
                    step,
                } => {
                    let written = match &step {
                        Step::Purchase(s) => parts.journal.record(&transaction_id, s),
                        Step::Load(s) => parts.journal.record_load(&transaction_id, s),
                    };
                    let result = written.map_err(JournalFailure::from);
                    queue.extend(self.round.handle(Input::Journaled(result)));
                }
                Action::Send {
                    transaction_id,
                    message,
                } => {
                    let span = self.round.span(&transaction_id);
                    parts.call(message, span, move |result| Event::Recovery {
                        transaction_id,
                        result,
                    });
                }
                Action::ReleaseCard => parts.card.release().await,
                Action::Ended(e) => end = Some(e),
            }
        }
        end
    }

    /// Every answer of the round is in: `None` when another round was asked for meanwhile
    /// (the caller runs it), else arms or clears the timer.
    fn round_end(&mut self, end: round::RoundEnd) -> Option<RoundEnd> {
        let progressed = end.progressed;
        if progressed {
            self.schedule.reset();
        }
        if self.again {
            return None;
        }
        if end.retry {
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
        result: Result<Message, GatewayError>,
        flow_active: bool,
        card_id: Option<u64>,
    ) -> Option<RoundEnd> {
        if !self.round.awaits(&txid) {
            return None;
        }
        let card = card_id.filter(|_| !flow_active && parts.card.has_card());
        let input = match result {
            Ok(message) => Input::Answer {
                transaction_id: txid,
                message,
                card,
            },
            Err(error) => Input::NetworkFailed {
                transaction_id: txid,
                error: NetworkFailure::from(error),
            },
        };
        let actions = self.round.handle(input);
        let end = self.execute(parts, actions).await?;
        match self.round_end(end) {
            Some(end) => Some(end),
            None => self.round(parts, flow_active).await,
        }
    }
}
