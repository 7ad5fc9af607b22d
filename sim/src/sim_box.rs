//! A simulated set-top box that runs the box core: [`stb_flow`]'s purchase and load flows,
//! executed the way `stbd` executes them, with an in-process purse card (the real `proto`
//! card, personalised under the deployment's issuer keys) in place of a reader, `stbd`'s own
//! gateway client ([`stb::daemon::gateway::Gateway`]) in place of its connection, and
//! `stbd`'s own SQLite journal ([`stb::journal::Journal`]).
//!
//! So a simulated box sends what `stbd` sends, in the same order and stream discipline:
//! one bidirectional stream per request (offer request, draw request, debit response, …),
//! a dropped connection made again on the next request (after a deadline or a failed
//! connection the client drops it, as `stbd`'s does), the journal written before each
//! action it guards, and the card checks of 001 [0075] and [0082] done by the flow, not
//! here. The viewer is scripted: OK on every offer, the load amount and PIN when asked.
//!
//! What the shell here does not do that `stbd` does: a TV, a remote, a reader driver,
//! cards pulled mid-command. What ends in doubt is settled by [`SimBox::recover`]: the
//! recovery round of the box core ([`stb_flow::recovery::round::Round`]), over this box's
//! journal and card, as `stbd` runs it at start-up and on its recovery timer.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::SeedableRng;

use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::DesKey;
use proto::messages::{LoadSource, Message};
use proto::money::Currency;
use proto::purse::{Date, IssuerKeys, PurseInfo};
use proto::secret::Secret;
use stb::daemon::exec::Driven;
use stb::daemon::gateway::Gateway;
use stb::journal::Journal;
use stb_flow::recovery::round::{self, Round, RoundEnd};
use stb_flow::show::Show;
use stb_flow::{Action, CardReply, JournalFailure, NetworkFailure, load, purchase};

/// A card personalised under `issuer` with `balance` EUR cents (`max_balance` its ceiling).
pub fn new_card(issuer: &IssuerKeys, card_id: u64, balance: u64, max_balance: u64) -> PurseCard {
    let spec = CardSpec::demo(card_id, Currency::EUR, balance, max_balance);
    PurseCard::new(CardState::personalise(&spec, issuer), card_id)
}

/// Today's date, as the box's clock gives it (`stbd`'s own).
pub fn today() -> Date {
    stb::daemon::card::today()
}

/// Where a simulated box loses power in the middle of a flow: right after the flow journaled
/// this step, before the action it guards (what `stbd` SIGKILLed at its test hook does).
/// The journal keeps what was committed; the flow's memory is gone; the card is powered
/// down (it keeps its purse and log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crash {
    /// The debit command came and was journaled; DEBIT never reached the card.
    BeforeDebit,
    /// DEBIT ran and its response was journaled; it never reached the head end.
    AfterDebit,
    /// LOAD ran and the card's S3 was journaled; it never reached the head end.
    AfterLoad,
}

/// How a flow run by [`SimBox::run_purchase`] or [`SimBox::run_load`] ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ran<O> {
    /// The flow ended with this outcome.
    Ended(O),
    /// The box lost power at the [`Crash`] point, in transaction `transaction_id`.
    Crashed { transaction_id: String },
}

/// What the scripted viewer answers in a load: the amount (minor units of the offer's
/// currency) and, for a bank load, the PIN.
#[derive(Debug, Clone)]
pub struct LoadViewer {
    pub amount: i64,
    pub pin: Option<Secret<String>>,
}

/// How long each request of a flow took at the box, by message kind (offer, draw, debit
/// response, …), in the order sent.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub requests: Vec<(&'static str, Duration)>,
    pub total: Duration,
}

impl Timings {
    /// The time of the first request of kind `kind` (see [`proto::messages::Message::kind`]).
    pub fn of(&self, kind: &str) -> Duration {
        self.requests
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| *d)
            .unwrap_or_default()
    }
}

/// A simulated box: its id, its gateway client, its card and its journal.
pub struct SimBox {
    pub id: String,
    pub gateway: Arc<Gateway>,
    pub card: PurseCard,
    pub journal: Journal,
    /// The box's PIN-block key (bank loads), when it has one.
    pub pin_key: Option<DesKey>,
    /// Seeds the flows' randoms (sealing, jitter); moved on for every flow.
    seed: u64,
    /// A flow of this box ended in doubt and no recovery round has settled it since.
    doubt: bool,
}

/// The viewer's script for one flow.
enum Script {
    /// OK on the offer.
    Accept,
    /// The amount, then the PIN when asked.
    Load(LoadViewer),
}

impl Script {
    /// What the viewer answers to `shown` (the last thing the flow asked), as the input of
    /// flow `F`; `None` when the script has nothing to say to it.
    fn answer<F: Viewed>(&self, shown: &Show) -> Option<F::Input> {
        F::viewer(shown, self)
    }
}

/// What the scripted viewer types, for each flow.
trait Viewed: Driven {
    fn viewer(shown: &Show, script: &Script) -> Option<Self::Input>;
    /// Whether the box loses power right after journaling `step`.
    fn crashes_after(crash: Crash, step: &Self::Step) -> bool;
}

impl Viewed for purchase::Purchase {
    fn viewer(shown: &Show, script: &Script) -> Option<purchase::Input> {
        matches!((shown, script), (Show::Offer(_), Script::Accept))
            .then_some(purchase::Input::Accept)
    }
    fn crashes_after(crash: Crash, step: &purchase::Step) -> bool {
        matches!(
            (crash, step),
            (
                Crash::BeforeDebit,
                purchase::Step::DebitCommandReceived { .. }
            ) | (Crash::AfterDebit, purchase::Step::DebitResponded { .. })
        )
    }
}

impl Viewed for load::Load {
    fn viewer(shown: &Show, script: &Script) -> Option<load::Input> {
        let Script::Load(v) = script else {
            return None;
        };
        match shown {
            Show::LoadMax(_) => Some(load::Input::Amount(v.amount)),
            Show::PinEntry { .. } => Some(match &v.pin {
                Some(pin) => load::Input::Pin(pin.clone()),
                None => load::Input::Cancel,
            }),
            _ => None,
        }
    }
    fn crashes_after(crash: Crash, step: &load::Step) -> bool {
        matches!(
            (crash, step),
            (Crash::AfterLoad, load::Step::Responded { .. })
        )
    }
}

impl SimBox {
    /// A box `id` with `card`, its client `gateway` and its `journal`
    /// ([`Journal::open`] on a directory, or [`Journal::open_in_memory`]).
    pub fn new(
        id: &str,
        gateway: Arc<Gateway>,
        card: PurseCard,
        journal: Journal,
        pin_key: Option<DesKey>,
    ) -> Self {
        let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self {
            id: id.to_string(),
            gateway,
            card,
            journal,
            pin_key,
            seed,
            doubt: false,
        }
    }

    fn next_seed(&mut self) -> u64 {
        self.seed = self.seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        self.seed
    }

    /// One card command, as the reader would pass it.
    pub fn apdu(&mut self, apdu: &[u8]) -> Response {
        Response::parse(&self.card.process_apdu(apdu))
            .expect("the card always answers a status word")
    }

    /// The card's balance (SELECT, READ PURSE).
    pub fn balance(&mut self) -> u64 {
        self.apdu(&commands::select());
        PurseInfo::decode(&self.apdu(&commands::read_purse()).data)
            .map(|i| i.balance)
            .unwrap_or(0)
    }

    /// One recovery round over this box's journal and card, as `stbd` runs it (at start-up,
    /// on reconnection, on its timer): what is in doubt is re-sent, proved or cancelled, and
    /// what the answers settle is journaled. The messages go one at a time; the card is
    /// always in this box's reader. How the round ended (`retry`: something is still in
    /// doubt).
    pub async fn recover(&mut self) -> RoundEnd {
        let end = self.round().await;
        self.doubt = end.retry;
        end
    }

    /// Whether a transaction of this box is in doubt (a flow ended so, and no round has
    /// settled it since). `stbd` starts no new purchase or load on the card then before a
    /// recovery round settled it.
    pub fn has_doubt(&self) -> bool {
        self.doubt
    }

    async fn round(&mut self) -> RoundEnd {
        let mut round = Round::new(self.next_seed());
        if let Err(e) = self.journal.close_unsent() {
            tracing::error!(box_id = %self.id, error = %e, "journal: cannot close unsent transactions");
        }
        let purchases = self.journal.in_doubt().map_err(JournalFailure::from);
        let loads = self.journal.loads_in_doubt().map_err(JournalFailure::from);
        let mut queue: VecDeque<round::Action> =
            round.start(purchases, loads, true, today()).into();
        let mut sends: VecDeque<(String, Message)> = VecDeque::new();
        loop {
            while let Some(action) = queue.pop_front() {
                match action {
                    round::Action::Apdu(apdu) => {
                        let reply = CardReply {
                            atr: self.card.atr(),
                            response: self.card.process_apdu(&apdu),
                        };
                        queue.extend(round.handle(round::Input::Card(Ok(reply))));
                    }
                    round::Action::Journal {
                        transaction_id,
                        step,
                    } => {
                        let written = match &step {
                            round::Step::Purchase(s) => self.journal.record(&transaction_id, s),
                            round::Step::Load(s) => self.journal.record_load(&transaction_id, s),
                        };
                        let result = written.map_err(JournalFailure::from);
                        queue.extend(round.handle(round::Input::Journaled(result)));
                    }
                    round::Action::Send {
                        transaction_id,
                        message,
                    } => sends.push_back((transaction_id, message)),
                    round::Action::ReleaseCard => {}
                    round::Action::Ended(end) => return end,
                }
            }
            let Some((transaction_id, message)) = sends.pop_front() else {
                // Nothing outstanding and no end: the round had nothing to do.
                return RoundEnd::default();
            };
            let input = match self.gateway.call(&message).await {
                Ok(message) => round::Input::Answer {
                    transaction_id,
                    message,
                    card: Some(self.card.state.card_id),
                },
                Err(e) => round::Input::NetworkFailed {
                    transaction_id,
                    error: NetworkFailure::from(e),
                },
            };
            queue.extend(round.handle(input));
        }
    }

    /// Recovery rounds until nothing is left in doubt or `limit` passed, pausing with
    /// `stbd`'s retry schedule between rounds. Whether nothing is left in doubt.
    pub async fn settle(&mut self, limit: Duration) -> bool {
        let end = Instant::now() + limit;
        let mut schedule = stb_flow::recovery::RetrySchedule::new(
            Duration::from_millis(200),
            Duration::from_secs(2),
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(self.next_seed());
        loop {
            if !self.recover().await.retry {
                return true;
            }
            let d = schedule.next_delay(&mut rng);
            if Instant::now() + d >= end {
                return false;
            }
            tokio::time::sleep(d).await;
        }
    }

    /// One purchase of `item` from `merchant`, the viewer saying OK to the offer; how it
    /// ended and how long each request took.
    pub async fn buy(&mut self, merchant: &str, item: &str) -> (purchase::Outcome, Timings) {
        match self.run_purchase(merchant, item, None).await {
            (Ran::Ended(o), t) => (o, t),
            (Ran::Crashed { .. }, _) => unreachable!("no crash point was given"),
        }
    }

    /// One load from `source`, the viewer entering `viewer`'s amount and PIN when asked.
    pub async fn load(
        &mut self,
        source: LoadSource,
        viewer: LoadViewer,
    ) -> (load::Outcome, Timings) {
        match self.run_load(source, viewer, None).await {
            (Ran::Ended(o), t) => (o, t),
            (Ran::Crashed { .. }, _) => unreachable!("no crash point was given"),
        }
    }

    /// [`SimBox::buy`], losing power at `crash` if the flow gets there.
    pub async fn run_purchase(
        &mut self,
        merchant: &str,
        item: &str,
        crash: Option<Crash>,
    ) -> (Ran<purchase::Outcome>, Timings) {
        let seed = self.next_seed();
        let (flow, actions) = purchase::Purchase::start(merchant, item, today(), seed);
        let (ran, t) = self.drive(flow, actions, Script::Accept, crash).await;
        self.doubt |= matches!(
            ran,
            Ran::Crashed { .. } | Ran::Ended(purchase::Outcome::InDoubt { .. })
        );
        (ran, t)
    }

    /// [`SimBox::load`], losing power at `crash` if the flow gets there.
    pub async fn run_load(
        &mut self,
        source: LoadSource,
        viewer: LoadViewer,
        crash: Option<Crash>,
    ) -> (Ran<load::Outcome>, Timings) {
        let seed = self.next_seed();
        let (flow, actions) = load::Load::start(source, self.pin_key.clone(), seed);
        let (ran, t) = self.drive(flow, actions, Script::Load(viewer), crash).await;
        self.doubt |= matches!(
            ran,
            Ran::Crashed { .. } | Ran::Ended(load::Outcome::InDoubt { .. })
        );
        (ran, t)
    }

    /// Runs `flow` to its end as `stbd`'s executor does: actions in order, the journal first
    /// (a failed write ends the flow before the action it guards), card commands inline, one
    /// request at a time to the gateway, whose answer goes back to the flow after the rest of
    /// the batch ran; the scripted viewer answers what the flow shows.
    async fn drive<F: Viewed>(
        &mut self,
        mut flow: F,
        actions: Vec<Action<F::Step, F::Outcome>>,
        script: Script,
        crash: Option<Crash>,
    ) -> (Ran<F::Outcome>, Timings) {
        let t0 = Instant::now();
        let mut timings = Timings::default();
        let mut queue: VecDeque<_> = actions.into();
        let mut request: Option<Message> = None;
        let mut asked: Option<Show> = None;
        loop {
            while let Some(action) = queue.pop_front() {
                match action {
                    Action::Journal {
                        transaction_id,
                        step,
                    } => {
                        if let Err(e) = F::record(&mut self.journal, &transaction_id, &step) {
                            timings.total = t0.elapsed();
                            let outcome = F::not_recorded(transaction_id, &step, e.into());
                            return (Ran::Ended(outcome), timings);
                        }
                        F::journaled(&step);
                        if crash.is_some_and(|c| F::crashes_after(c, &step)) {
                            self.card.reset();
                            timings.total = t0.elapsed();
                            return (Ran::Crashed { transaction_id }, timings);
                        }
                    }
                    Action::Apdu(apdu) => {
                        let reply = CardReply {
                            atr: self.card.atr(),
                            response: self.card.process_apdu(&apdu),
                        };
                        queue.extend(flow.handle(F::card_input(Ok(reply))));
                    }
                    Action::Send(m) => request = Some(m),
                    Action::Show(s) => {
                        if matches!(s, Show::LoadMax(_) | Show::PinEntry { .. } | Show::Offer(_)) {
                            asked = Some(s);
                        }
                    }
                    Action::Done(o) => {
                        timings.total = t0.elapsed();
                        return (Ran::Ended(o), timings);
                    }
                }
            }
            if let Some(m) = request.take() {
                let t = Instant::now();
                let answer = self.gateway.call(&m).await;
                timings.requests.push((m.kind(), t.elapsed()));
                queue.extend(flow.handle(F::answer_input(answer)));
            } else if let Some(input) = asked.take().and_then(|s| script.answer::<F>(&s)) {
                queue.extend(flow.handle(input));
            } else {
                panic!(
                    "box {}: the flow waits for nothing the shell can give",
                    self.id
                );
            }
        }
    }
}
