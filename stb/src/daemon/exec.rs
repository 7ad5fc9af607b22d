//! The one executor for the flow slots: it runs a flow's actions in order — journal first
//! (a failed write stops the flow before the action it guards), card commands inline (they
//! take milliseconds and the card is the flow's only resource, so the reply feeds straight
//! back into the flow), gateway requests as tasks whose answers come back as
//! [`Event::Answer`] — and hands what to show and how the flow ended back to the runner.
//!
//! [`Driven`] is what the executor needs of a flow; [`stb_flow::purchase::Purchase`] and
//! [`stb_flow::load::Load`] and [`stb_flow::refund::Refund`] implement it here. A [`Slot`] holds at most one flow of a kind;
//! that only one transaction runs at a time (across both slots) is the runner's guard.

use std::collections::VecDeque;
use std::fmt::Debug;

use proto::messages::Message;
use stb_flow::show::{Doubt, Flow, Refusal, Show};
use stb_flow::{
    Action, CardFailure, CardReply, JournalFailure, NetworkFailure, load, purchase, refund,
};

use super::event::Event;
use super::gateway::GatewayError;
use super::parts::Parts;
use super::prefetch::Take;
use crate::journal::{Journal, JournalError};

/// What the executor needs of a flow.
pub trait Driven {
    type Step: Debug;
    type Outcome: Debug;
    type Input;
    /// Which kind of transaction this is (for the journal-failure refusal and the logs).
    const FLOW: Flow;

    /// Feeds one input (see the flows' `handle`).
    fn handle(&mut self, input: Self::Input) -> Vec<Action<Self::Step, Self::Outcome>>;
    /// The input a card reply is.
    fn card_input(reply: Result<CardReply, CardFailure>) -> Self::Input;
    /// The input a gateway answer is: a gateway error becomes the flow's
    /// [`NetworkFailure`] here.
    fn answer_input(result: Result<Message, GatewayError>) -> Self::Input;
    fn transaction_id(&self) -> Option<&str>;
    /// See the flows' `card_sequence_open`: while false, other programs may use the card.
    fn card_sequence_open(&self) -> bool;
    /// Writes `step` to the journal.
    ///
    /// # Errors
    /// The journal's, when the write failed (the flow then stops).
    fn record(journal: &mut Journal, txid: &str, step: &Self::Step) -> Result<(), JournalError>;
    /// How the flow ended when writing `step` failed with `error`.
    fn not_recorded(txid: String, step: &Self::Step, error: JournalFailure) -> Self::Outcome;
    /// Called after `step` was journaled, before the next action.
    fn journaled(_step: &Self::Step) {}
}

/// The test hook's environment variable and the values it acts on.
pub const TEST_HOOK_ENV: &str = "STBD_TEST_HOOK";
/// Freeze after journaling the card's debit response, before sending it.
pub const TEST_HOOK_PAUSE_AFTER_DEBIT: &str = "pause-after-debit-journaled";
/// Freeze after journaling `DebitSent`, before DEBIT goes to the card.
pub const TEST_HOOK_PAUSE_BEFORE_DEBIT: &str = "pause-before-debit";

/// With this set to a file path, the hook holds the daemon only until that file exists, then
/// lets it go on (instead of freezing it until it is killed).
pub const TEST_HOOK_RELEASE_ENV: &str = "STBD_TEST_HOOK_RELEASE";

/// TEST HOOK, for the end-to-end tests only (tests/tests/e2e_purchase.rs,
/// sim/tests/scenarios.rs); no config key reaches it and a box never sets it. With
/// `STBD_TEST_HOOK` set to one of the values above the daemon freezes (the whole
/// single-threaded runtime) right after journaling that step, and says so on stderr, so the
/// test can SIGKILL it exactly in that window — or, with `STBD_TEST_HOOK_RELEASE` naming a
/// file, act on the head end (stop a role) in that window and let the daemon go on by
/// creating the file.
fn test_hook_after_journal(step: &purchase::Step) {
    use purchase::Step;
    let hook = match step {
        Step::DebitResponded { .. } => TEST_HOOK_PAUSE_AFTER_DEBIT,
        Step::DebitSent => TEST_HOOK_PAUSE_BEFORE_DEBIT,
        _ => return,
    };
    test_hook(hook, &format!("{step:?}"));
}

/// Freeze after journaling `transfer_committing`, before the APDU that commits the card
/// (P1 to the payee's, P2 P3 to the payer's) goes to it.
pub const TEST_HOOK_PAUSE_BEFORE_TRANSFER_COMMIT: &str = "pause-before-transfer-commit";

/// Freeze after journaling a card-to-card transfer's R2, the card committed (the payer's
/// debited), before the box posts the card's answer.
pub const TEST_HOOK_PAUSE_AFTER_TRANSFER_COMMIT: &str = "pause-after-transfer-committed";

/// The test hook's freeze (see [`test_hook_after_journal`]) when `STBD_TEST_HOOK` is `hook`;
/// `step` names what was journaled.
pub fn test_hook(hook: &str, step: &str) {
    if std::env::var(TEST_HOOK_ENV).as_deref() == Ok(hook) {
        if let Some(release) = std::env::var_os(TEST_HOOK_RELEASE_ENV) {
            let release = std::path::PathBuf::from(release);
            eprintln!(
                "stbd: TEST HOOK {hook}: {step} journaled; held until {} exists",
                release.display()
            );
            while !release.exists() {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            eprintln!("stbd: TEST HOOK {hook}: released");
            return;
        }
        eprintln!("stbd: TEST HOOK {hook}: {step} journaled; frozen until killed");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

impl Driven for purchase::Purchase {
    type Step = purchase::Step;
    type Outcome = purchase::Outcome;
    type Input = purchase::Input;
    const FLOW: Flow = Flow::Purchase;

    fn handle(&mut self, input: purchase::Input) -> Vec<purchase::Action> {
        purchase::Purchase::handle(self, input)
    }
    fn card_input(reply: Result<CardReply, CardFailure>) -> purchase::Input {
        purchase::Input::Card(reply)
    }
    fn answer_input(result: Result<Message, GatewayError>) -> purchase::Input {
        match result {
            Ok(m) => purchase::Input::Answer(m),
            Err(e) => purchase::Input::NetworkFailed(NetworkFailure::from(e)),
        }
    }
    fn transaction_id(&self) -> Option<&str> {
        purchase::Purchase::transaction_id(self)
    }
    fn card_sequence_open(&self) -> bool {
        purchase::Purchase::card_sequence_open(self)
    }
    fn record(
        journal: &mut Journal,
        txid: &str,
        step: &purchase::Step,
    ) -> Result<(), JournalError> {
        journal.record(txid, step)
    }
    fn not_recorded(
        txid: String,
        _step: &purchase::Step,
        error: JournalFailure,
    ) -> purchase::Outcome {
        // Not journaled means not done: the step it guards did not happen.
        purchase::Outcome::Failed {
            transaction_id: Some(txid),
            refusal: Refusal::NotRecorded {
                flow: Flow::Purchase,
                error,
            },
        }
    }
    fn journaled(step: &purchase::Step) {
        test_hook_after_journal(step);
    }
}

impl Driven for load::Load {
    type Step = load::Step;
    type Outcome = load::Outcome;
    type Input = load::Input;
    const FLOW: Flow = Flow::Load;

    fn handle(&mut self, input: load::Input) -> Vec<load::Action> {
        load::Load::handle(self, input)
    }
    fn card_input(reply: Result<CardReply, CardFailure>) -> load::Input {
        load::Input::Card(reply)
    }
    fn answer_input(result: Result<Message, GatewayError>) -> load::Input {
        match result {
            Ok(m) => load::Input::Answer(m),
            Err(e) => load::Input::NetworkFailed(NetworkFailure::from(e)),
        }
    }
    fn transaction_id(&self) -> Option<&str> {
        load::Load::transaction_id(self)
    }
    fn card_sequence_open(&self) -> bool {
        load::Load::card_sequence_open(self)
    }
    fn record(journal: &mut Journal, txid: &str, step: &load::Step) -> Result<(), JournalError> {
        journal.record_load(txid, step)
    }
    fn not_recorded(txid: String, step: &load::Step, error: JournalFailure) -> load::Outcome {
        match step {
            // The request never went out: nothing is held.
            load::Step::RequestSent { .. } => load::Outcome::Failed {
                transaction_id: Some(txid),
                refusal: Refusal::NotRecorded {
                    flow: Flow::Load,
                    error,
                },
            },
            _ => load::Outcome::InDoubt {
                transaction_id: txid,
                doubt: Doubt::LoadNotRecorded { error },
            },
        }
    }
}

impl Driven for refund::Refund {
    type Step = refund::Step;
    type Outcome = refund::Outcome;
    type Input = refund::Input;
    const FLOW: Flow = Flow::Refund;

    fn handle(&mut self, input: refund::Input) -> Vec<refund::Action> {
        refund::Refund::handle(self, input)
    }
    fn card_input(reply: Result<CardReply, CardFailure>) -> refund::Input {
        refund::Input::Card(reply)
    }
    fn answer_input(result: Result<Message, GatewayError>) -> refund::Input {
        match result {
            Ok(m) => refund::Input::Answer(m),
            Err(e) => refund::Input::NetworkFailed(NetworkFailure::from(e)),
        }
    }
    fn transaction_id(&self) -> Option<&str> {
        refund::Refund::transaction_id(self)
    }
    fn card_sequence_open(&self) -> bool {
        refund::Refund::card_sequence_open(self)
    }
    /// The refund flow has no steps to journal (see [`stb_flow::refund`]).
    fn record(_: &mut Journal, _: &str, step: &refund::Step) -> Result<(), JournalError> {
        match *step {}
    }
    fn not_recorded(_: String, step: &refund::Step, _: JournalFailure) -> refund::Outcome {
        match *step {}
    }
}

/// The flow in a slot.
pub struct Active<F> {
    /// The id its gateway answers come back with ([`Event::Answer`]).
    pub id: u64,
    pub flow: F,
    pub span: tracing::Span,
    /// The span has its transaction id (recorded once: the fmt layer appends every record).
    txid_recorded: bool,
}

/// What running a flow's actions gave the runner: what to show, in order, and how the
/// flow ended (`None`: it waits for an answer, the viewer or the card).
pub struct Ran<O> {
    pub shows: Vec<Show>,
    pub done: Option<O>,
}

impl<O> Ran<O> {
    fn nothing() -> Self {
        Self {
            shows: Vec::new(),
            done: None,
        }
    }
}

/// At most one flow of one kind.
pub struct Slot<F> {
    active: Option<Active<F>>,
    /// Flows started so far; the next one's number is this + 1.
    started: u64,
    /// Added to a flow's number to make its answer id, so the two slots' ids never meet.
    ids_from: u64,
}

impl<F: Driven> Slot<F> {
    /// An empty slot whose flows' answer ids start above `ids_from`.
    #[must_use]
    pub fn new(ids_from: u64) -> Self {
        Self {
            active: None,
            started: 0,
            ids_from,
        }
    }

    /// Whether a flow is in the slot.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The flow in the slot, if any.
    pub fn active(&self) -> Option<&Active<F>> {
        self.active.as_ref()
    }

    /// Drops the active flow without an outcome (its answers are then ignored): only for a
    /// flow that holds nothing — no card sequence, nothing journaled to finish.
    pub fn abandon(&mut self) {
        self.active = None;
    }

    /// Whether answer id `id` is for the active flow.
    pub fn owns(&self, id: u64) -> bool {
        self.active.as_ref().map(|a| a.id) == Some(id)
    }

    /// Puts `flow` in the (empty) slot and runs its first `actions`. `span` gets the
    /// slot's flow number (1, 2, …) and must have an empty `transaction_id` field.
    pub async fn start(
        &mut self,
        parts: &mut Parts,
        flow: F,
        actions: Vec<Action<F::Step, F::Outcome>>,
        span: impl FnOnce(u64) -> tracing::Span,
    ) -> Ran<F::Outcome> {
        self.started += 1;
        self.active = Some(Active {
            id: self.ids_from + self.started,
            flow,
            span: span(self.started),
            txid_recorded: false,
        });
        self.execute(parts, actions).await
    }

    /// Feeds `input` to the active flow (nothing happens without one) and runs what it
    /// asks for.
    pub async fn feed(&mut self, parts: &mut Parts, input: F::Input) -> Ran<F::Outcome> {
        let Some(a) = self.active.as_mut() else {
            return Ran::nothing();
        };
        let actions = a.span.in_scope(|| a.flow.handle(input));
        self.execute(parts, actions).await
    }

    /// Executes `actions` in order; a card reply feeds straight back into the flow.
    async fn execute(
        &mut self,
        parts: &mut Parts,
        actions: Vec<Action<F::Step, F::Outcome>>,
    ) -> Ran<F::Outcome> {
        let mut ran = Ran::nothing();
        let mut queue: VecDeque<_> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(active) = self.active.as_mut() else {
                return ran;
            };
            let span = active.span.clone();
            if !active.txid_recorded {
                if let Some(t) = active.flow.transaction_id() {
                    span.record("transaction_id", t);
                    active.txid_recorded = true;
                }
            }
            match action {
                Action::Journal {
                    transaction_id,
                    step,
                } => {
                    if let Err(e) = F::record(&mut parts.journal, &transaction_id, &step) {
                        // Not journaled means not done: stop here, before the action it
                        // guards.
                        span.in_scope(|| tracing::error!(error = %e, ?step, "journal write failed; flow stopped"));
                        let error = JournalFailure::from(e);
                        ran.shows.push(Show::Refused(Refusal::NotRecorded {
                            flow: F::FLOW,
                            error: error.clone(),
                        }));
                        let outcome = F::not_recorded(transaction_id, &step, error);
                        return self.finished(outcome, ran);
                    }
                    span.in_scope(|| tracing::debug!(?step, "journaled"));
                    F::journaled(&step);
                }
                Action::Apdu(apdu) => {
                    let reply = parts.card.transmit(&apdu).await;
                    if let Err(e) = &reply {
                        span.in_scope(|| tracing::warn!(error = %e, "card command failed"));
                    }
                    let more = span.in_scope(|| active.flow.handle(F::card_input(reply)));
                    queue.extend(more);
                }
                Action::Send(msg) => {
                    let flow = active.id;
                    let now = tokio::time::Instant::now();
                    match parts.prefetch.take_for(&msg, flow, now) {
                        Take::Answer(answer) => {
                            span.in_scope(|| {
                                tracing::info!(
                                    message = msg.kind(),
                                    "answered by the prefetched offer"
                                )
                            });
                            let more =
                                span.in_scope(|| active.flow.handle(F::answer_input(Ok(*answer))));
                            queue.extend(more);
                            continue;
                        }
                        Take::Joined => {
                            span.in_scope(|| {
                                tracing::info!(
                                    message = msg.kind(),
                                    "joined the offer prefetch on its way"
                                )
                            });
                            continue;
                        }
                        Take::Send => {}
                    }
                    span.in_scope(|| tracing::info!(message = msg.kind(), "to the gateway"));
                    parts.call(msg, span.clone(), move |result| {
                        if let Err(e) = &result {
                            tracing::warn!(error = %e, "gateway request failed");
                        }
                        Event::Answer { flow, result }
                    });
                }
                Action::Show(s) => ran.shows.push(s),
                Action::Done(outcome) => {
                    span.in_scope(|| match F::FLOW {
                        Flow::Purchase => tracing::info!(?outcome, "purchase finished"),
                        Flow::Load => tracing::info!(?outcome, "load finished"),
                        Flow::Refund => tracing::info!(?outcome, "refund check finished"),
                    });
                    return self.finished(outcome, ran);
                }
            }
        }
        // Between two card sequences (the viewer decides, the network answers) other
        // programs may use the card.
        if let Some(a) = &self.active {
            if !a.flow.card_sequence_open() {
                parts.card.end_sequence().await;
            }
        }
        ran
    }

    fn finished(&mut self, outcome: F::Outcome, mut ran: Ran<F::Outcome>) -> Ran<F::Outcome> {
        self.active = None;
        ran.done = Some(outcome);
        ran
    }
}
