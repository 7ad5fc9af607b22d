//! One purchase (draw), 001 [0071]–[0094], as a sans-IO state machine.
//!
//! offer request → offer → SELECT, INITIALIZE FOR PURCHASE → checks ([0075]: currency,
//! expiry, balance ≥ amount) → the viewer's OK → SELECT, INITIALIZE FOR PURCHASE again (same
//! card, checks again) → draw request → debit command (its amount must be the offer's,
//! [0082]) → DEBIT → debit response → receipt.
//!
//! The card may be shared with other programs (OSCam, OpenSC on the same pcscd). The flow's
//! card work comes in two sequences the shell runs each inside one reader transaction
//! ([`Purchase::card_sequence_open`]): SELECT → INITIALIZE before the viewer is asked, and
//! SELECT → INITIALIZE → (draw request, debit command) → DEBIT after the OK. The card is not
//! held while the viewer decides: whatever another program does to it meanwhile (a reset, a
//! SELECT of its own application) is undone by the second SELECT, and the INITIALIZE whose
//! data the draw request carries is the one DEBIT follows, with nobody in between.
//!
//! Exactly one request (to the gateway or to the card) is outstanding at a time; the shell
//! executes [`Action`]s in order and feeds the one answer back as an [`Input`]. Every step
//! that commits to something is journaled *before* the action that commits
//! ([`Action::Journal`] comes first): a crash at any point leaves a journal from which
//! [`crate::recovery`] finishes the transaction without asking the viewer again.
//!
//! Each state carries what it knows (the offer once it came, the card data once it was
//! read), so no step has to assume an earlier one ran.
//!
//! **PIN threshold** (seed 004): a card whose SELECT answer names a PIN rule
//! ([`PinRule`]) needs its PIN for purchases above the rule's threshold. After the OK the
//! TV asks for it ([`Show::PinEntry`]), and VERIFY goes to the card between the second
//! SELECT and INITIALIZE, in the same card sequence as the DEBIT. A wrong PIN stops the
//! purchase before the draw (nothing charged; the card counts the try); a blocked PIN
//! stops it at the OK.

use proto::card::{PinRule, commands};
use proto::messages::{
    CancelMsg, CancelReason, DebitResponseMsg, DrawBody, DrawRequest, Message, Offer, Protected,
    Receipt,
};
use proto::money::{Currency, Money};
use proto::purse::{Date, DebitCommand, DebitResponse, PurchaseInit, Purse};
use proto::secret::Secret;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::recovery::{self, DebitEvidence};
use crate::show::{
    CardAnswer, Doubt, OfferShown, Progress, ReceiptShown, Receipted, Refusal, Request, Show,
};
use crate::{CardFailure, CardReply, NetworkFailure, split_sw};

/// A journal step: written before the action it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
// One step at a time, written and dropped: boxing the card data would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Step {
    /// The viewer pressed OK; the offer (with its TSK) and the card data are kept.
    OfferAccepted { offer: Offer, init: PurchaseInit },
    /// The draw request is about to go out: from here the transaction may be in doubt.
    DrawSent,
    /// The debit command came back (whether or not it matched the offer, 001 [0082]).
    DebitCommandReceived { command: DebitCommand },
    /// DEBIT is about to go to the card.
    DebitSent,
    /// The card answered DEBIT with its debit response (and signature): the card paid.
    DebitResponded { response: DebitResponse },
    /// A cancel is about to go out (the card was not debited).
    CancelPending { reason: CancelReason },
    /// Closed: the receipt came.
    Completed { receipt: Receipt },
    /// Closed without value moving; `why` is for the operator.
    Ended { why: String },
    /// Recovery cannot settle it from this box (DEBIT was sent, no debit response in the
    /// journal or the card's log, the head end rejected the proof): kept for the operator,
    /// with the reason. It no longer blocks the card, and it is not ended.
    Unresolvable { why: String },
}

impl Step {
    /// The transaction's state in the journal once this step is written.
    #[must_use]
    pub fn state(&self) -> JournalState {
        match self {
            Step::OfferAccepted { .. } => JournalState::Accepted,
            Step::DrawSent => JournalState::DrawSent,
            Step::DebitCommandReceived { .. } => JournalState::DebitCommand,
            Step::DebitSent => JournalState::DebitSent,
            Step::DebitResponded { .. } => JournalState::DebitResponded,
            Step::CancelPending { .. } => JournalState::CancelPending,
            Step::Completed { .. } => JournalState::Completed,
            Step::Ended { .. } => JournalState::Ended,
            Step::Unresolvable { .. } => JournalState::Unresolvable,
        }
    }
}

/// A purchase's state in the box journal: the [`Step`] it last journaled. Named here once:
/// [`JournalState::as_str`] is the text on disk (a step's name and the transaction's state
/// column), which existing journals hold and which never changes for a variant. Recovery
/// decides by the variant, never by the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JournalState {
    /// `accepted`: the viewer's OK is journaled; the draw request has not gone out.
    Accepted,
    /// `draw_sent`: the draw request may have reached the payment server.
    DrawSent,
    /// `debit_command`: the debit command came back.
    DebitCommand,
    /// `debit_sent`: DEBIT may have reached the card.
    DebitSent,
    /// `debit_responded`: the card's debit response is journaled.
    DebitResponded,
    /// `cancel_pending`: a cancel is out or about to go.
    CancelPending,
    /// `completed`: the receipt came.
    Completed,
    /// `ended`: closed without value moving.
    Ended,
    /// `unresolvable`: kept for the operator (see [`Step::Unresolvable`]).
    Unresolvable,
}

impl JournalState {
    /// Every state, in the order a purchase goes through them.
    pub const ALL: [JournalState; 9] = [
        JournalState::Accepted,
        JournalState::DrawSent,
        JournalState::DebitCommand,
        JournalState::DebitSent,
        JournalState::DebitResponded,
        JournalState::CancelPending,
        JournalState::Completed,
        JournalState::Ended,
        JournalState::Unresolvable,
    ];

    /// The states in which value may be in flight (from the draw request until a receipt,
    /// an end or `unresolvable`): recovery's work ([`crate::recovery`]).
    pub const IN_DOUBT: [JournalState; 5] = [
        JournalState::DrawSent,
        JournalState::DebitCommand,
        JournalState::DebitSent,
        JournalState::DebitResponded,
        JournalState::CancelPending,
    ];

    /// The text on disk.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            JournalState::Accepted => "accepted",
            JournalState::DrawSent => "draw_sent",
            JournalState::DebitCommand => "debit_command",
            JournalState::DebitSent => "debit_sent",
            JournalState::DebitResponded => "debit_responded",
            JournalState::CancelPending => "cancel_pending",
            JournalState::Completed => "completed",
            JournalState::Ended => "ended",
            JournalState::Unresolvable => "unresolvable",
        }
    }

    /// The state whose text on disk is `text`, if any.
    #[must_use]
    pub fn from_text(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    /// Whether value may be in flight ([`JournalState::IN_DOUBT`]).
    #[must_use]
    pub fn is_in_doubt(self) -> bool {
        Self::IN_DOUBT.contains(&self)
    }
}

impl std::fmt::Display for JournalState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the shell must do next, in order (see [`crate::Action`]).
pub type Action = crate::Action<Step, Outcome>;

/// How a purchase ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The receipt came (`receipt.released` says whether the merchant released the goods).
    Paid {
        transaction_id: String,
        receipt: Receipt,
    },
    /// The viewer declined ([`CancelReason::Viewer`]) or let the offer time out
    /// ([`CancelReason::Timeout`]); nothing was journaled or debited.
    Cancelled {
        transaction_id: Option<String>,
        reason: CancelReason,
    },
    /// Nothing was debited. `transaction_id` is `None` when no offer came.
    Failed {
        transaction_id: Option<String>,
        refusal: Refusal,
    },
    /// Value may have moved; the journal holds the transaction and recovery will finish it.
    InDoubt {
        transaction_id: String,
        doubt: Doubt,
    },
}

/// What the shell feeds back.
#[derive(Debug, Clone, PartialEq)]
// One per step, consumed at once: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Input {
    /// The gateway's answer to the outstanding [`Action::Send`].
    Answer(Message),
    /// The outstanding request got no answer; what the transport saw.
    NetworkFailed(NetworkFailure),
    /// The card's reply to the outstanding [`Action::Apdu`], or what the reader saw.
    Card(Result<CardReply, CardFailure>),
    /// The card was pulled (between commands).
    CardRemoved,
    /// OK on the offer popup.
    Accept,
    /// BACK, or the countdown ran out (also BACK on the PIN entry).
    Decline { timeout: bool },
    /// The cardholder PIN typed after the OK, when the card asks for it ([`Show::PinEntry`]).
    Pin(Secret<String>),
}

enum State {
    AwaitOffer,
    AwaitSelect {
        offer: Offer,
    },
    AwaitInit {
        offer: Offer,
    },
    /// `shown` is the card data the offer popup was built from.
    AwaitViewer {
        offer: Offer,
        shown: PurchaseInit,
    },
    /// After the OK, for a purchase above the card's PIN threshold: the PIN entry.
    AwaitPin {
        offer: Offer,
        shown: PurchaseInit,
    },
    /// After the OK: the purse selected again, for the INITIALIZE that DEBIT follows (and
    /// the PIN to verify first, if the card asked for one).
    AwaitReselect {
        offer: Offer,
        shown: PurchaseInit,
        pin: Option<Secret<String>>,
    },
    /// VERIFY of the PIN is at the card; INITIALIZE follows.
    AwaitVerify {
        offer: Offer,
        shown: PurchaseInit,
    },
    AwaitReinit {
        offer: Offer,
        shown: PurchaseInit,
    },
    /// `init` is the INITIALIZE the draw request carried (journaled with the offer).
    AwaitDebitCommand {
        offer: Offer,
        init: PurchaseInit,
    },
    AwaitDebit {
        offer: Offer,
        init: PurchaseInit,
    },
    AwaitReceipt {
        offer: Offer,
        init: PurchaseInit,
    },
    /// A fresh INITIALIZE for the cancel's proof; then the cancel, and the flow ends with
    /// `then`.
    AwaitProof {
        reason: CancelReason,
        then: Outcome,
        evidence: DebitEvidence,
    },
    /// The cancel is out; whatever the answer, the flow ends with `then`. `evidence` is
    /// `Some` when the transaction is journaled (the cancel came after the draw).
    AwaitCancelAck {
        then: Outcome,
        evidence: Option<DebitEvidence>,
    },
    Done,
}

/// One purchase in progress. [`Purchase::start`] gives the first actions; the shell then
/// feeds every answer to [`Purchase::handle`] until an [`Action::Done`].
pub struct Purchase {
    merchant_id: String,
    item_id: String,
    today: Date,
    state: State,
    /// The offer's transaction id, once it came.
    transaction_id: Option<String>,
    /// The ATR of the card the last reply came from (the draw request carries it).
    atr: Vec<u8>,
    /// The card's PIN rule, from its last SELECT answer (`None`: no PIN).
    pin_rule: Option<PinRule>,
    rng: StdRng,
}

/// The PIN lengths VERIFY takes ([`proto::card::pin_block`]).
const PIN_MIN: u8 = 4;
const PIN_MAX: u8 = 12;

impl Purchase {
    /// Starts a purchase of `item_id` from `merchant_id`; `today` is the date the card and
    /// the expiry check use; `seed` drives the message-layer sealing (FIG. 8).
    #[must_use]
    pub fn start(merchant_id: &str, item_id: &str, today: Date, seed: u64) -> (Self, Vec<Action>) {
        let p = Self {
            merchant_id: merchant_id.into(),
            item_id: item_id.into(),
            today,
            state: State::AwaitOffer,
            transaction_id: None,
            atr: Vec::new(),
            pin_rule: None,
            rng: StdRng::seed_from_u64(seed),
        };
        let actions = vec![
            Action::Show(Show::Progress(Progress::ContactingServer)),
            Action::Send(Message::OfferRequest {
                merchant_id: p.merchant_id.clone(),
                item_id: p.item_id.clone(),
            }),
        ];
        (p, actions)
    }

    /// The offer's transaction id, once the offer came.
    pub fn transaction_id(&self) -> Option<&str> {
        self.transaction_id.as_deref()
    }

    /// Whether the flow is over ([`Action::Done`] was given); it then ignores every input.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the viewer is being asked (the shell runs the offer timer then).
    pub fn awaiting_viewer(&self) -> bool {
        matches!(self.state, State::AwaitViewer { .. })
    }

    /// Whether the flow waits for the viewer's PIN ([`Input::Pin`]).
    pub fn awaiting_pin(&self) -> bool {
        matches!(self.state, State::AwaitPin { .. })
    }

    /// Whether the card is in use by the flow (so a removal matters).
    pub fn holds_card(&self) -> bool {
        matches!(
            self.state,
            State::AwaitSelect { .. }
                | State::AwaitInit { .. }
                | State::AwaitViewer { .. }
                | State::AwaitPin { .. }
                | State::AwaitReselect { .. }
                | State::AwaitVerify { .. }
                | State::AwaitReinit { .. }
                | State::AwaitDebit { .. }
        )
    }

    /// Whether the flow is inside a card sequence that must not be interleaved with another
    /// program's commands: SELECT → INITIALIZE, and SELECT → INITIALIZE → draw → DEBIT (with
    /// the cancel's proof INITIALIZE when the debit does not happen). The shell holds a reader
    /// transaction while this is true; not while the viewer decides or the receipt comes.
    pub fn card_sequence_open(&self) -> bool {
        matches!(
            self.state,
            State::AwaitSelect { .. }
                | State::AwaitInit { .. }
                | State::AwaitReselect { .. }
                | State::AwaitVerify { .. }
                | State::AwaitReinit { .. }
                | State::AwaitDebitCommand { .. }
                | State::AwaitDebit { .. }
                | State::AwaitProof { .. }
        )
    }

    fn txid(&self) -> String {
        self.transaction_id.clone().unwrap_or_default()
    }

    fn journal(&self, step: Step) -> Action {
        Action::Journal {
            transaction_id: self.txid(),
            step,
        }
    }

    fn done(&mut self, outcome: Outcome) -> Action {
        self.state = State::Done;
        Action::Done(outcome)
    }

    fn failure(&self, refusal: Refusal) -> Outcome {
        Outcome::Failed {
            transaction_id: self.transaction_id.clone(),
            refusal,
        }
    }

    /// Ends at once: tell the viewer, nothing to cancel.
    fn failed(&mut self, refusal: Refusal) -> Vec<Action> {
        let outcome = self.failure(refusal.clone());
        vec![Action::Show(Show::Refused(refusal)), self.done(outcome)]
    }

    /// Before the draw: nothing is at the payment server, so the cancel only tells the
    /// merchant to drop the offer, and no proof is needed.
    fn cancel_offer(&mut self, reason: CancelReason, then: Outcome) -> Vec<Action> {
        self.state = State::AwaitCancelAck {
            then,
            evidence: None,
        };
        vec![Action::Send(Message::Cancel(CancelMsg {
            transaction_id: self.txid(),
            reason,
            proof: None,
        }))]
    }

    /// A failed check before the draw: tell the viewer, drop the offer.
    fn refuse(&mut self, refusal: Refusal) -> Vec<Action> {
        let then = self.failure(refusal.clone());
        let mut a = vec![Action::Show(Show::Refused(refusal))];
        a.extend(self.cancel_offer(CancelReason::NotDebited, then));
        a
    }

    /// After the draw, with the card not debited: tell the viewer, journal the cancel, then
    /// a fresh INITIALIZE as proof.
    fn cancel_with_proof(
        &mut self,
        reason: CancelReason,
        refusal: Refusal,
        evidence: DebitEvidence,
    ) -> Vec<Action> {
        let then = self.failure(refusal.clone());
        self.state = State::AwaitProof {
            reason,
            then,
            evidence,
        };
        vec![
            Action::Show(Show::Refused(refusal)),
            self.journal(Step::CancelPending { reason }),
            Action::Apdu(commands::init_purchase_proof(self.today)),
        ]
    }

    fn in_doubt(&mut self, doubt: Doubt) -> Vec<Action> {
        let outcome = Outcome::InDoubt {
            transaction_id: self.txid(),
            doubt: doubt.clone(),
        };
        vec![Action::Show(Show::InDoubt(doubt)), self.done(outcome)]
    }

    /// Feeds one input; returns what to do next, in order.
    #[must_use]
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match (std::mem::replace(&mut self.state, State::Done), input) {
            (State::Done, _) => Vec::new(),
            (State::AwaitOffer, Input::Answer(m)) => self.on_offer(m),
            (State::AwaitOffer, Input::NetworkFailed(error)) => {
                self.failed(Refusal::Unreachable { error })
            }
            (State::AwaitSelect { offer }, Input::Card(r)) => self.on_select(offer, r),
            (State::AwaitInit { offer }, Input::Card(r)) => self.on_init(offer, r),
            (State::AwaitViewer { offer, shown }, Input::Accept) => match self.pin_rule {
                // The PIN guards money (seed 004), not points.
                Some(rule)
                    if Purse::of(offer.amount.currency) == Purse::Money
                        && rule.needs_pin(offer.amount.minor) =>
                {
                    if rule.tries_left == 0 {
                        return self.refuse(Refusal::PinBlocked);
                    }
                    self.state = State::AwaitPin { offer, shown };
                    vec![Action::Show(Show::PinEntry {
                        min_len: PIN_MIN,
                        max_len: PIN_MAX,
                        attempts_left: Some(rule.tries_left),
                    })]
                }
                _ => self.reselect(offer, shown, None),
            },
            (State::AwaitPin { offer, shown }, Input::Pin(pin)) => {
                self.reselect(offer, shown, Some(pin))
            }
            (State::AwaitReselect { offer, shown, pin }, Input::Card(r)) => {
                let fci = match self.card_data(r) {
                    Ok(fci) => fci,
                    Err(refusal) => return self.refuse(refusal),
                };
                self.pin_rule = PinRule::from_fci(&fci);
                match pin {
                    Some(pin) => {
                        let Some(verify) = commands::verify_pin(pin.expose()) else {
                            return self.refuse(Refusal::BadPin {
                                min: PIN_MIN,
                                max: PIN_MAX,
                            });
                        };
                        self.state = State::AwaitVerify { offer, shown };
                        vec![Action::Apdu(verify)]
                    }
                    None => {
                        let init = init_for(&offer, self.today);
                        self.state = State::AwaitReinit { offer, shown };
                        vec![Action::Apdu(init)]
                    }
                }
            }
            (State::AwaitVerify { offer, shown }, Input::Card(r)) => {
                if let Err(refusal) = self.card_data(r) {
                    let refusal = match refusal {
                        Refusal::CardRefused { sw } => match sw.pin_tries_left() {
                            Some(0) => Refusal::PinBlocked,
                            Some(tries_left) => Refusal::WrongPin { tries_left },
                            None => Refusal::CardRefused { sw },
                        },
                        other => other,
                    };
                    return self.refuse(refusal);
                }
                let init = init_for(&offer, self.today);
                self.state = State::AwaitReinit { offer, shown };
                vec![Action::Apdu(init)]
            }
            (State::AwaitReinit { offer, shown }, Input::Card(r)) => {
                self.on_reinit(offer, &shown, r)
            }
            // BACK on the offer or on the PIN entry (or the countdown): nothing drawn yet.
            (State::AwaitViewer { .. } | State::AwaitPin { .. }, Input::Decline { timeout }) => {
                let reason = if timeout {
                    CancelReason::Timeout
                } else {
                    CancelReason::Viewer
                };
                let then = Outcome::Cancelled {
                    transaction_id: self.transaction_id.clone(),
                    reason,
                };
                self.cancel_offer(reason, then)
            }
            (
                State::AwaitSelect { .. }
                | State::AwaitInit { .. }
                | State::AwaitViewer { .. }
                | State::AwaitPin { .. }
                | State::AwaitReselect { .. }
                | State::AwaitVerify { .. }
                | State::AwaitReinit { .. },
                Input::CardRemoved,
            ) => {
                let mut a = vec![Action::Show(Show::OfferWithdrawn {
                    transaction_id: self.txid(),
                })];
                a.extend(self.refuse(Refusal::CardRemoved));
                a
            }
            (State::AwaitDebitCommand { offer, init }, Input::Answer(m)) => {
                self.on_debit_command(offer, init, m)
            }
            (State::AwaitDebitCommand { .. }, Input::NetworkFailed(error)) => {
                self.in_doubt(Doubt::NoDebitCommand { error })
            }
            (State::AwaitDebit { offer, init }, Input::Card(r)) => self.on_debit(offer, init, r),
            (State::AwaitReceipt { offer, init }, Input::Answer(m)) => {
                self.on_receipt(&offer, &init, m)
            }
            (State::AwaitReceipt { .. }, Input::NetworkFailed(error)) => {
                self.in_doubt(Doubt::ConfirmationLost { error })
            }
            (
                State::AwaitProof {
                    reason,
                    then,
                    evidence,
                },
                Input::Card(r),
            ) => {
                let proof = r.ok().and_then(|r| {
                    let (data, sw) = split_sw(&r.response)?;
                    sw.is_ok()
                        .then(|| PurchaseInit::decode(data).ok())
                        .flatten()
                });
                self.state = State::AwaitCancelAck {
                    then,
                    evidence: Some(evidence),
                };
                vec![Action::Send(Message::Cancel(CancelMsg {
                    transaction_id: self.txid(),
                    reason,
                    proof,
                }))]
            }
            (State::AwaitCancelAck { then, evidence }, Input::Answer(m)) => {
                self.on_cancel_answer(then, evidence, Ok(&m))
            }
            (State::AwaitCancelAck { then, evidence }, Input::NetworkFailed(e)) => {
                self.on_cancel_answer(then, evidence, Err(&e))
            }
            // Anything else (a removal while waiting on the network, a late key) changes
            // nothing: the outstanding request's answer decides.
            (state, _) => {
                self.state = state;
                Vec::new()
            }
        }
    }

    fn on_offer(&mut self, m: Message) -> Vec<Action> {
        let offer = match m {
            Message::Offer(o) => o,
            Message::Error(e) => {
                return self.failed(Refusal::OfferRefused {
                    code: e.code,
                    reason: e.reason,
                });
            }
            other => {
                return self.failed(Refusal::OutOfTurn {
                    to: Request::Offer,
                    answer: other.kind(),
                });
            }
        };
        // Zero only as an authentication (002 FIG. 16); no value in its currency.
        let authentication = offer.amount.currency == Currency::AUTHENTICATION;
        if (offer.amount.minor == 0) != authentication || offer.transaction_id.is_empty() {
            return self.failed(Refusal::UnusableOffer);
        }
        self.transaction_id = Some(offer.transaction_id.clone());
        self.state = State::AwaitSelect { offer };
        vec![
            Action::Show(Show::Progress(Progress::ReadingCard)),
            Action::Apdu(commands::select()),
        ]
    }

    /// A card reply's data (keeping the card's ATR), or why there is none.
    fn card_data(&mut self, r: Result<CardReply, CardFailure>) -> Result<Vec<u8>, Refusal> {
        let reply = r.map_err(|error| Refusal::CardUnreadable { error })?;
        self.atr = reply.atr;
        match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
            Some((_, sw)) => Err(Refusal::CardRefused { sw }),
            None => Err(Refusal::NoStatusWord),
        }
    }

    fn on_select(&mut self, offer: Offer, r: Result<CardReply, CardFailure>) -> Vec<Action> {
        match self.card_data(r) {
            Ok(fci) => self.pin_rule = PinRule::from_fci(&fci),
            Err(refusal) => return self.refuse(refusal),
        }
        let init = init_for(&offer, self.today);
        self.state = State::AwaitInit { offer };
        vec![Action::Apdu(init)]
    }

    /// The card's INITIALIZE answer, checked against the offer (001 [0075]: currency, expiry,
    /// balance ≥ amount).
    fn checked_init(
        &mut self,
        offer: &Offer,
        r: Result<CardReply, CardFailure>,
    ) -> Result<PurchaseInit, Refusal> {
        let data = self.card_data(r)?;
        let init =
            PurchaseInit::decode(&data).map_err(|_| Refusal::Malformed(CardAnswer::Initialize))?;
        let price = offer.amount;
        // An authentication (zero in its own currency) fits any card that has not expired.
        if init.currency != price.currency && !price.is_authentication() {
            return Err(Refusal::PriceCurrency {
                card: init.currency,
                price: price.currency,
            });
        }
        if init.expiry.is_expired_on(self.today) {
            return Err(Refusal::CardExpired {
                year: init.expiry.year,
                month: init.expiry.month,
            });
        }
        if init.balance < price.minor && !price.is_authentication() {
            return Err(Refusal::InsufficientValue {
                balance: Money::new(init.balance, init.currency),
                price,
            });
        }
        Ok(init)
    }

    fn on_init(&mut self, offer: Offer, r: Result<CardReply, CardFailure>) -> Vec<Action> {
        let init = match self.checked_init(&offer, r) {
            Ok(i) => i,
            Err(refusal) => return self.refuse(refusal),
        };
        let price = offer.amount;
        let popup = OfferShown {
            transaction_id: offer.transaction_id.clone(),
            item: offer.title.clone(),
            merchant: offer.merchant_id.clone(),
            price,
            balance: Money::new(init.balance, init.currency),
            // checked_init made sure balance ≥ price.
            balance_after: Money::new(init.balance - price.minor, init.currency),
        };
        self.state = State::AwaitViewer { offer, shown: init };
        vec![Action::Show(Show::Offer(popup))]
    }

    /// The INITIALIZE after the OK (the card was not held while the viewer decided): checked
    /// again, and for the same card the offer was shown for.
    fn on_reinit(
        &mut self,
        offer: Offer,
        shown: &PurchaseInit,
        r: Result<CardReply, CardFailure>,
    ) -> Vec<Action> {
        let init = match self.checked_init(&offer, r) {
            Ok(i) => i,
            Err(refusal) => return self.refuse(refusal),
        };
        if init.card_id != shown.card_id {
            return self.refuse(Refusal::CardSwapped);
        }
        self.draw(offer, init)
    }

    /// After the OK (and the PIN, if asked): SELECT again, for the sequence DEBIT ends.
    fn reselect(
        &mut self,
        offer: Offer,
        shown: PurchaseInit,
        pin: Option<Secret<String>>,
    ) -> Vec<Action> {
        self.state = State::AwaitReselect { offer, shown, pin };
        vec![
            Action::Show(Show::Progress(Progress::ReadingCard)),
            Action::Apdu(commands::select()),
        ]
    }

    /// Journals the acceptance with the card data and sends the draw request.
    fn draw(&mut self, offer: Offer, init: PurchaseInit) -> Vec<Action> {
        let body = DrawBody {
            amount: offer.amount,
            atr: self.atr.clone(),
            init: init.clone(),
        };
        let draw = DrawRequest {
            transaction_id: offer.transaction_id.clone(),
            merchant_id: offer.merchant_id.clone(),
            etsk: offer.etsk.clone(),
            body: Protected::new(body, offer.tsk.as_ref(), &mut self.rng),
        };
        let accepted = self.journal(Step::OfferAccepted {
            offer: offer.clone(),
            init: init.clone(),
        });
        self.state = State::AwaitDebitCommand { offer, init };
        vec![
            accepted,
            self.journal(Step::DrawSent),
            Action::Show(Show::Progress(Progress::ContactingServer)),
            Action::Send(Message::DrawRequest(draw)),
        ]
    }

    fn on_debit_command(&mut self, offer: Offer, init: PurchaseInit, m: Message) -> Vec<Action> {
        let msg = match m {
            Message::DebitCommand(d) if d.transaction_id == offer.transaction_id => d,
            Message::Error(e) => {
                // The payment server refused the draw: no debit command, nothing debited.
                let refusal = Refusal::DrawRefused {
                    code: e.code,
                    reason: e.reason,
                };
                let mut a = vec![self.journal(Step::Ended {
                    why: format!("{refusal:?}"),
                })];
                a.extend(self.failed(refusal));
                return a;
            }
            other => {
                let refusal = Refusal::OutOfTurn {
                    to: Request::Draw,
                    answer: other.kind(),
                };
                return self.cancel_with_proof(
                    CancelReason::NotDebited,
                    refusal,
                    DebitEvidence::NeverSent,
                );
            }
        };
        let body = match msg.body.open(offer.tsk.as_ref()) {
            Ok(b) => b,
            Err(e) => {
                let refusal = Refusal::DebitCommandUnreadable {
                    error: e.to_string(),
                };
                return self.cancel_with_proof(
                    CancelReason::NotDebited,
                    refusal,
                    DebitEvidence::NeverSent,
                );
            }
        };
        let command = body.command;
        // 001 [0082]: the debit command must ask for exactly the offer's amount.
        let mismatch =
            if command.amount != offer.amount.minor || command.currency != offer.amount.currency {
                Some((
                    CancelReason::AmountMismatch,
                    Refusal::AmountMismatch {
                        asked: command.amount_money(),
                        offered: offer.amount,
                    },
                ))
            } else if command.card_id != init.card_id || command.atc != init.atc {
                Some((CancelReason::NotDebited, Refusal::DebitCommandMismatch))
            } else {
                None
            };
        if let Some((reason, refusal)) = mismatch {
            let mut a = vec![self.journal(Step::DebitCommandReceived { command })];
            a.extend(self.cancel_with_proof(reason, refusal, DebitEvidence::NeverSent));
            return a;
        }
        let apdu = commands::debit(&command);
        let received = self.journal(Step::DebitCommandReceived { command });
        self.state = State::AwaitDebit { offer, init };
        vec![
            received,
            self.journal(Step::DebitSent),
            Action::Show(Show::Progress(Progress::DebitingCard)),
            Action::Apdu(apdu),
        ]
    }

    fn on_debit(
        &mut self,
        offer: Offer,
        init: PurchaseInit,
        r: Result<CardReply, CardFailure>,
    ) -> Vec<Action> {
        let reply = match r {
            Ok(r) => r,
            // The reader failed mid-DEBIT: the card may or may not have debited.
            Err(error) => return self.in_doubt(Doubt::CardLostDuringDebit { error }),
        };
        let response = match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => match DebitResponse::decode(data) {
                Ok(r) => r,
                Err(_) => return self.in_doubt(Doubt::DebitResponseMalformed),
            },
            // The card refused: its debit is atomic, so nothing moved.
            Some((_, sw)) => {
                return self.cancel_with_proof(
                    CancelReason::DebitRefused { sw },
                    Refusal::DebitRefused { sw },
                    DebitEvidence::SentUnchecked,
                );
            }
            None => return self.in_doubt(Doubt::DebitWithoutStatusWord),
        };
        let msg = DebitResponseMsg {
            transaction_id: self.txid(),
            body: Protected::new(response.clone(), offer.tsk.as_ref(), &mut self.rng),
        };
        self.state = State::AwaitReceipt { offer, init };
        vec![
            self.journal(Step::DebitResponded { response }),
            Action::Show(Show::Progress(Progress::Confirming)),
            Action::Send(Message::DebitResponse(msg)),
        ]
    }

    fn on_receipt(&mut self, offer: &Offer, init: &PurchaseInit, m: Message) -> Vec<Action> {
        match m {
            Message::Receipt(receipt) if receipt.transaction_id == offer.transaction_id => {
                let after = receipt
                    .new_balance
                    .unwrap_or(init.balance.saturating_sub(offer.amount.minor));
                let mut a = vec![self.journal(Step::Completed {
                    receipt: receipt.clone(),
                })];
                a.push(Action::Show(if receipt.released {
                    Show::Receipt(ReceiptShown {
                        transaction_id: offer.transaction_id.clone(),
                        what: Receipted::Purchase {
                            item: offer.title.clone(),
                            merchant: offer.merchant_id.clone(),
                        },
                        amount: offer.amount,
                        balance_after: Money::new(after, init.currency),
                        date: self.today,
                    })
                } else {
                    Show::NotReleased {
                        text: receipt.text.clone(),
                    }
                }));
                let outcome = Outcome::Paid {
                    transaction_id: offer.transaction_id.clone(),
                    receipt,
                };
                a.push(self.done(outcome));
                a
            }
            Message::Error(e) => self.in_doubt(Doubt::PaidButRefused {
                code: e.code,
                reason: e.reason,
            }),
            other => self.in_doubt(Doubt::PaidButOutOfTurn {
                answer: other.kind(),
            }),
        }
    }

    /// A journaled cancel (after the draw) is closed only by an answer that settles it
    /// ([`recovery::on_cancel_answer`]): a receipt, or a refused proof when DEBIT never went
    /// to the card. Anything else (no answer, busy, `AlreadyCompleted`, a refused proof after
    /// DEBIT) leaves it `cancel_pending` for recovery, which reads the card's log.
    fn on_cancel_answer(
        &mut self,
        then: Outcome,
        evidence: Option<DebitEvidence>,
        answer: Result<&Message, &NetworkFailure>,
    ) -> Vec<Action> {
        let mut a = Vec::new();
        if let Some(evidence) = evidence {
            match recovery::on_cancel_answer(&self.txid(), evidence, answer) {
                recovery::Resolution::Ended(why) => a.push(self.journal(Step::Ended {
                    why: format!("{why}; {then:?}"),
                })),
                recovery::Resolution::Completed(receipt) => {
                    a.push(self.journal(Step::Completed { receipt }))
                }
                other => tracing::warn!(
                    resolution = ?other,
                    "cancel not settled; recovery finishes the transaction"
                ),
            }
        }
        a.push(self.done(then));
        a
    }
}

#[cfg(test)]
mod tests;

/// The INITIALIZE FOR PURCHASE an offer needs: of the points purse for a price in points
/// (002 [0164]: points redeemed from the card), else of the money purse.
fn init_for(offer: &Offer, today: Date) -> Vec<u8> {
    commands::init_purchase_of(Purse::of(offer.amount.currency), today)
}
