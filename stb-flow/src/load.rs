//! One load of value onto the card, 001 [0117]–[0132] (bank account) and [0141]–[0157]
//! (pre-funded voucher), as a sans-IO state machine, and the recovery decision for an
//! in-doubt load ([`decide`]).
//!
//! SELECT, READ PURSE → load offer request → load offer (maximum, time stamp) → the viewer
//! enters the amount (≤ maximum) and, for a bank account, the PIN (sealed at once under the
//! box's PIN key in a [`PinBlock`] bound to the transaction id: the digits never leave this
//! module in clear and are never journaled) → SELECT, INITIALIZE FOR LOAD with the offer's
//! time stamp and date (S1) → load request → load command (for this card, its counter, this
//! amount and currency) → LOAD (S3) → load response → load confirmation → receipt.
//!
//! The negative-result procedure ([0129]–[0132]): a negative result code, a card that
//! refused LOAD, a load command that does not match, or a load request whose answer never
//! came, all end with a zero-value INITIALIZE FOR LOAD (a fresh S1) sent in a
//! [`LoadResponseMsg`]; the load server's HSM decides from it whether the card was loaded,
//! and the bank's hold is captured or released accordingly. The viewer is never asked twice.
//!
//! As in [`crate::purchase`], exactly one request is outstanding at a time and every step
//! that commits to something is journaled before the action it announces. From
//! [`Step::RequestSent`] until [`Step::Completed`] or [`Step::Ended`] the load is in doubt,
//! and [`decide`] resolves it from the journal and the card's log. Each state carries what
//! it knows (the purse, the offer, the amount, the S1 sent).

use proto::card::{LOG_CAPACITY, SW_RECORD_NOT_FOUND, commands};
use proto::crypto::DesKey;
use proto::messages::{
    ErrorCode, LoadConfirmation, LoadOffer, LoadOfferRequest, LoadRequest, LoadResponseMsg,
    LoadSource, Message, PinBlock,
};
use proto::money::Money;
use proto::purse::{
    LOAD_OK, LoadCommand, LoadInit, LoadInitRequest, LoadResponse, LogKind, LogRecord, PurseInfo,
};
use proto::secret::Secret;
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::recovery::CardSeen;
use crate::show::{CardAnswer, Doubt, Progress, ReceiptShown, Receipted, Refusal, Request, Show};
use crate::{CardFailure, CardReply, NetworkFailure, split_sw};

/// The shortest PIN the entry screen allows (digits).
pub const PIN_MIN: u8 = 4;
/// The longest PIN the entry screen allows (digits).
pub const PIN_MAX: u8 = 12;

/// A journal step of a load: written before the action it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The load request (with this S1) is about to go out: from here the load is in doubt.
    RequestSent { offer: LoadOffer, init: LoadInit },
    /// The load command came back (whether or not it matched).
    CommandReceived { command: LoadCommand },
    /// LOAD is about to go to the card.
    LoadSent,
    /// The card answered LOAD (loaded, or a negative result).
    Responded { response: LoadResponse },
    /// A zero-value INITIALIZE FOR LOAD proof is about to go out.
    ZeroValue { zero: LoadInit },
    /// Closed: the load confirmation came (loaded or not).
    Completed { confirmation: LoadConfirmation },
    /// Closed: refused before any load command; nothing held, nothing loaded. `why` is for
    /// the operator.
    Ended { why: String },
}

impl Step {
    /// The load's state in the journal once this step is written.
    #[must_use]
    pub fn state(&self) -> JournalState {
        match self {
            Step::RequestSent { .. } => JournalState::RequestSent,
            Step::CommandReceived { .. } => JournalState::Command,
            Step::LoadSent => JournalState::LoadSent,
            Step::Responded { .. } => JournalState::Responded,
            Step::ZeroValue { .. } => JournalState::ZeroValue,
            Step::Completed { .. } => JournalState::Completed,
            Step::Ended { .. } => JournalState::Ended,
        }
    }
}

/// A load's state in the box journal: the [`Step`] it last journaled. Named here once:
/// [`JournalState::as_str`] is the text on disk (a step's name and the load's state column),
/// which existing journals hold and which never changes for a variant. Recovery decides by
/// the variant, never by the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JournalState {
    /// `load_request_sent`: the load request may have reached the load server.
    RequestSent,
    /// `load_command`: the load command came back.
    Command,
    /// `load_sent`: LOAD may have reached the card.
    LoadSent,
    /// `load_responded`: the card's LOAD answer is journaled.
    Responded,
    /// `load_zero_value`: a zero-value proof is journaled.
    ZeroValue,
    /// `load_completed`: the load confirmation came (loaded or not).
    Completed,
    /// `load_ended`: refused before any load command.
    Ended,
}

impl JournalState {
    /// Every state, in the order a load goes through them.
    pub const ALL: [JournalState; 7] = [
        JournalState::RequestSent,
        JournalState::Command,
        JournalState::LoadSent,
        JournalState::Responded,
        JournalState::ZeroValue,
        JournalState::Completed,
        JournalState::Ended,
    ];

    /// The states in which value may be in flight (from the load request until the load
    /// confirmation or an end): [`decide`]'s work.
    pub const IN_DOUBT: [JournalState; 5] = [
        JournalState::RequestSent,
        JournalState::Command,
        JournalState::LoadSent,
        JournalState::Responded,
        JournalState::ZeroValue,
    ];

    /// The text on disk.
    #[must_use]
    pub const fn as_str(self) -> &'static str {
        match self {
            JournalState::RequestSent => "load_request_sent",
            JournalState::Command => "load_command",
            JournalState::LoadSent => "load_sent",
            JournalState::Responded => "load_responded",
            JournalState::ZeroValue => "load_zero_value",
            JournalState::Completed => "load_completed",
            JournalState::Ended => "load_ended",
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

/// How a load ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The card holds `new_balance` (minor units of `amount`'s currency).
    Loaded {
        transaction_id: String,
        amount: Money,
        new_balance: u64,
    },
    /// The load server confirmed that the card was not loaded; the hold is released.
    NotLoaded { transaction_id: String },
    /// BACK before the request went out; nothing journaled.
    Cancelled { transaction_id: Option<String> },
    /// Nothing held, nothing loaded. `transaction_id` is `None` when no offer came.
    Failed {
        transaction_id: Option<String>,
        refusal: Refusal,
    },
    /// Value may be in flight; the journal holds the load and recovery resolves it.
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
    /// The amount the viewer confirmed, in minor units of the offer's currency.
    Amount(i64),
    /// The PIN as typed (its `Debug` hides the digits; wiped on drop).
    Pin(Secret<String>),
    /// BACK on the amount or PIN screen.
    Cancel,
}

/// What the load request carried: the offer and the S1 (whose `amount` is the load's).
struct Requested {
    offer: LoadOffer,
    init: LoadInit,
}

enum State {
    AwaitSelect,
    AwaitPurse,
    AwaitOffer {
        purse: PurseInfo,
    },
    AwaitAmount {
        purse: PurseInfo,
        offer: LoadOffer,
    },
    /// The account needs a PIN; `key` is the box's PIN key.
    AwaitPin {
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        key: DesKey,
    },
    AwaitSelectForInit {
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        sealed_pin: Option<Vec<u8>>,
    },
    /// A bank load reads the card's passbook (seed 004) before its INITIALIZE: READ LOG
    /// `next`, newest first, until a record the bank already has. `records` so far, newest
    /// first.
    AwaitPassbook {
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        sealed_pin: Option<Vec<u8>>,
        next: u8,
        records: Vec<LogRecord>,
    },
    AwaitInit {
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        sealed_pin: Option<Vec<u8>>,
        /// The passbook to upload, oldest first.
        passbook: Vec<LogRecord>,
    },
    AwaitCommand(Requested),
    AwaitLoad(Requested),
    /// `response` is the card's negative LOAD answer, if it gave one (sent with the proof).
    AwaitSelectForZero {
        req: Requested,
        response: Option<LoadResponse>,
    },
    AwaitZero {
        req: Requested,
        response: Option<LoadResponse>,
    },
    AwaitConfirmation(Requested),
    Done,
}

/// One load in progress. [`Load::start`] gives the first actions; the shell then feeds
/// every answer to [`Load::handle`] until an [`Action::Done`].
pub struct Load {
    source: LoadSource,
    pin_key: Option<DesKey>,
    state: State,
    /// The offer's transaction id, once it came.
    transaction_id: Option<String>,
    rng: StdRng,
}

/// A refusal of the load request that settles it: nothing held (or the hold already
/// released by the gateway), no load command issued. Anything else (the head end busy, a
/// hop down, an internal error) may have left a hold, so the zero-value proof closes it.
#[must_use]
pub fn is_final_refusal(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::Busy | ErrorCode::Timeout | ErrorCode::Internal | ErrorCode::UnknownRoute
    )
}

/// What a receipt says the load came from. The voucher's code is its only secret: only its
/// last four characters go to the TV.
fn receipted(s: &LoadSource) -> Receipted {
    match s {
        LoadSource::Bank { account } => Receipted::Bank {
            account: account.clone(),
        },
        LoadSource::Unload { account } => Receipted::Unload {
            account: account.clone(),
        },
        LoadSource::Voucher { code } => {
            let code = code.expose();
            let start = code.char_indices().rev().nth(3).map_or(0, |(i, _)| i);
            Receipted::Voucher {
                code_tail: code[start..].to_string(),
            }
        }
    }
}

/// Seals the PIN block for the bank under the box's PIN key.
#[must_use]
pub fn seal_pin(key: &DesKey, transaction_id: &str, pin: &str, rng: &mut StdRng) -> Vec<u8> {
    let block = PinBlock {
        transaction_id: transaction_id.into(),
        pin: Secret::new(pin.to_string()),
    };
    let mut clear = postcard::to_allocvec(&block).expect("in-memory serialization");
    let sealed = proto::crypto::seal(key, &clear, rng);
    clear.fill(0);
    sealed
}

impl Load {
    /// Starts a load from `source`. `pin_key` is the box's per-box PIN key (needed only when
    /// the offer says a PIN is required); `seed` drives the PIN block's sealing.
    #[must_use]
    pub fn start(source: LoadSource, pin_key: Option<DesKey>, seed: u64) -> (Self, Vec<Action>) {
        let l = Self {
            source,
            pin_key,
            state: State::AwaitSelect,
            transaction_id: None,
            rng: StdRng::seed_from_u64(seed),
        };
        (l, vec![Action::Apdu(commands::select())])
    }

    /// The offer's transaction id, once the load offer came.
    #[must_use]
    pub fn transaction_id(&self) -> Option<&str> {
        self.transaction_id.as_deref()
    }

    #[must_use]
    /// Whether the flow is over ([`Action::Done`] was given); it then ignores every input.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Done)
    }

    /// Whether the flow uses the card now or will again (so a removal matters).
    #[must_use]
    pub fn holds_card(&self) -> bool {
        !matches!(
            self.state,
            State::AwaitCommand(_) | State::AwaitConfirmation(_) | State::Done
        )
    }

    /// Whether the flow is inside a card sequence that must not be interleaved with another
    /// program's commands (SELECT → READ PURSE; SELECT → INITIALIZE FOR LOAD → … → LOAD; SELECT
    /// → zero-value INITIALIZE). The shell holds a reader transaction while this is true, and
    /// lets other programs at the card while the viewer types or the offer is on its way.
    #[must_use]
    pub fn card_sequence_open(&self) -> bool {
        matches!(
            self.state,
            State::AwaitSelect
                | State::AwaitPurse
                | State::AwaitSelectForInit { .. }
                | State::AwaitPassbook { .. }
                | State::AwaitInit { .. }
                | State::AwaitCommand(_)
                | State::AwaitLoad(_)
                | State::AwaitSelectForZero { .. }
                | State::AwaitZero { .. }
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

    /// Ends before anything was journaled: nothing is held, nothing moved.
    fn failed(&mut self, refusal: Refusal) -> Vec<Action> {
        let outcome = Outcome::Failed {
            transaction_id: self.transaction_id.clone(),
            refusal: refusal.clone(),
        };
        vec![Action::Show(Show::Refused(refusal)), self.done(outcome)]
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
            (State::AwaitSelect, Input::Card(r)) => match card_ok(r) {
                Ok(_) => {
                    self.state = State::AwaitPurse;
                    vec![Action::Apdu(commands::read_purse())]
                }
                Err(refusal) => self.failed(refusal),
            },
            (State::AwaitPurse, Input::Card(r)) => self.on_purse(r),
            (State::AwaitOffer { purse }, Input::Answer(m)) => self.on_offer(purse, m),
            (State::AwaitOffer { .. }, Input::NetworkFailed(error)) => {
                self.failed(Refusal::Unreachable { error })
            }
            (State::AwaitAmount { purse, offer }, Input::Amount(minor)) => {
                self.on_amount(purse, offer, minor)
            }
            (
                State::AwaitPin {
                    purse,
                    offer,
                    amount,
                    key,
                },
                Input::Pin(pin),
            ) => self.on_pin(purse, offer, amount, &key, &pin),
            (
                State::AwaitSelect
                | State::AwaitPurse
                | State::AwaitOffer { .. }
                | State::AwaitAmount { .. }
                | State::AwaitPin { .. },
                Input::Cancel,
            ) => {
                let outcome = Outcome::Cancelled {
                    transaction_id: self.transaction_id.clone(),
                };
                vec![self.done(outcome)]
            }
            (
                State::AwaitSelect
                | State::AwaitPurse
                | State::AwaitOffer { .. }
                | State::AwaitAmount { .. }
                | State::AwaitPin { .. }
                | State::AwaitSelectForInit { .. }
                | State::AwaitPassbook { .. }
                | State::AwaitInit { .. },
                Input::CardRemoved,
            ) => self.failed(Refusal::CardRemoved),
            (
                State::AwaitSelectForInit {
                    purse,
                    offer,
                    amount,
                    sealed_pin,
                },
                Input::Card(r),
            ) => match card_ok(r) {
                // A bank load uploads the passbook, unless the cardholder chose privacy.
                Ok(_) if matches!(offer.source, LoadSource::Bank { .. }) && !purse.privacy => {
                    self.state = State::AwaitPassbook {
                        purse,
                        offer,
                        amount,
                        sealed_pin,
                        next: 1,
                        records: Vec::new(),
                    };
                    vec![Action::Apdu(commands::read_log(1))]
                }
                Ok(_) => self.initialize(purse, offer, amount, sealed_pin, Vec::new()),
                Err(refusal) => self.failed(refusal),
            },
            (
                State::AwaitPassbook {
                    purse,
                    offer,
                    amount,
                    sealed_pin,
                    next,
                    mut records,
                },
                Input::Card(r),
            ) => {
                let record = match r {
                    Ok(reply) => match split_sw(&reply.response) {
                        Some((data, sw)) if sw.is_ok() => match LogRecord::decode(data) {
                            Ok(rec) => Some(rec),
                            Err(_) => {
                                return self.failed(Refusal::Malformed(CardAnswer::ReadLog));
                            }
                        },
                        // Past the oldest record the card keeps.
                        Some((_, sw)) if sw == SW_RECORD_NOT_FOUND => None,
                        Some((_, sw)) => return self.failed(Refusal::CardRefused { sw }),
                        None => return self.failed(Refusal::NoStatusWord),
                    },
                    Err(error) => return self.failed(Refusal::CardUnreadable { error }),
                };
                match record {
                    Some(rec)
                        if rec.atc > purse.passbook_through && usize::from(next) < LOG_CAPACITY =>
                    {
                        records.push(rec);
                        self.state = State::AwaitPassbook {
                            purse,
                            offer,
                            amount,
                            sealed_pin,
                            next: next + 1,
                            records,
                        };
                        vec![Action::Apdu(commands::read_log(next + 1))]
                    }
                    last => {
                        if let Some(rec) = last.filter(|r| r.atc > purse.passbook_through) {
                            records.push(rec);
                        }
                        records.reverse();
                        self.initialize(purse, offer, amount, sealed_pin, records)
                    }
                }
            }
            (
                State::AwaitInit {
                    purse,
                    offer,
                    amount,
                    sealed_pin,
                    passbook,
                },
                Input::Card(r),
            ) => self.on_init(&purse, offer, amount, sealed_pin, passbook, r),
            (State::AwaitCommand(req), Input::Answer(m)) => self.on_command(req, m),
            (State::AwaitCommand(req), Input::NetworkFailed(e)) => {
                self.prove_not_loaded(req, None, "no load command from the head end", &e)
            }
            (State::AwaitLoad(req), Input::Card(r)) => self.on_load(req, r),
            (State::AwaitSelectForZero { req, response }, Input::Card(r)) => match card_ok(r) {
                Ok(_) => {
                    let apdu = zero_value_apdu(&req.offer);
                    self.state = State::AwaitZero { req, response };
                    vec![Action::Apdu(apdu)]
                }
                Err(why) => self.in_doubt(Doubt::NoZeroValueProof { why: Box::new(why) }),
            },
            (State::AwaitZero { req, response }, Input::Card(r)) => self.on_zero(req, response, r),
            (State::AwaitConfirmation(req), Input::Answer(m)) => self.on_confirmation(&req, m),
            (State::AwaitConfirmation(_), Input::NetworkFailed(error)) => {
                self.in_doubt(Doubt::LoadConfirmationLost { error })
            }
            // Anything else (a removal while the network answers, a late key) changes
            // nothing: the outstanding request's answer decides.
            (state, _) => {
                self.state = state;
                Vec::new()
            }
        }
    }

    fn on_purse(&mut self, r: Result<CardReply, CardFailure>) -> Vec<Action> {
        let data = match card_ok(r) {
            Ok(d) => d,
            Err(refusal) => return self.failed(refusal),
        };
        let Ok(purse) = PurseInfo::decode(&data) else {
            return self.failed(Refusal::Malformed(CardAnswer::ReadPurse));
        };
        // A card locked by bad signatures opens only with the issuer's UNBLOCK, which
        // comes with a bank load (seed 004): a voucher cannot open it.
        if purse.is_blocked() && !matches!(self.source, LoadSource::Bank { .. }) {
            return self.failed(Refusal::CardBlocked);
        }
        let request = Message::LoadOfferRequest(LoadOfferRequest {
            source: self.source.clone(),
            card: purse.clone(),
        });
        self.state = State::AwaitOffer { purse };
        vec![
            Action::Show(Show::Progress(Progress::ContactingServer)),
            Action::Send(request),
        ]
    }

    fn on_offer(&mut self, purse: PurseInfo, m: Message) -> Vec<Action> {
        let offer = match m {
            Message::LoadOffer(o) => o,
            Message::Error(e) => {
                return self.failed(Refusal::LoadOfferRefused {
                    code: e.code,
                    reason: e.reason,
                });
            }
            other => {
                return self.failed(Refusal::OutOfTurn {
                    to: Request::LoadOffer,
                    answer: other.kind(),
                });
            }
        };
        if offer.transaction_id.is_empty() || !self.source.offered_as(&offer.source) {
            return self.failed(Refusal::UnusableLoadOffer);
        }
        self.transaction_id = Some(offer.transaction_id.clone());
        let max = offer.max_amount;
        if purse.purse_for(max.currency).is_none() {
            return self.failed(Refusal::AccountCurrency {
                card: purse.currency,
                account: max.currency,
            });
        }
        if max.minor == 0 {
            return self.failed(Refusal::NothingToLoad {
                limited_by: offer.limited_by,
            });
        }
        self.state = State::AwaitAmount { purse, offer };
        vec![Action::Show(Show::LoadMax(max))]
    }

    fn on_amount(&mut self, purse: PurseInfo, offer: LoadOffer, minor: i64) -> Vec<Action> {
        let max = offer.max_amount;
        let amount = match u64::try_from(minor) {
            Ok(a) if a > 0 && a <= max.minor => a,
            _ => return self.failed(Refusal::AmountOutOfRange { got: minor, max }),
        };
        if !offer.pin_required {
            return self.go_to_card(purse, offer, amount, None);
        }
        let Some(key) = self.pin_key.clone() else {
            return self.failed(Refusal::NoPinKey);
        };
        self.state = State::AwaitPin {
            purse,
            offer,
            amount,
            key,
        };
        vec![Action::Show(Show::PinEntry {
            min_len: PIN_MIN,
            max_len: PIN_MAX,
            attempts_left: None,
        })]
    }

    fn on_pin(
        &mut self,
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        key: &DesKey,
        pin: &Secret<String>,
    ) -> Vec<Action> {
        let digits = pin.expose();
        let len = digits.len();
        if len < usize::from(PIN_MIN)
            || len > usize::from(PIN_MAX)
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return self.failed(Refusal::BadPin {
                min: PIN_MIN,
                max: PIN_MAX,
            });
        }
        let sealed = seal_pin(key, &offer.transaction_id, digits, &mut self.rng);
        self.go_to_card(purse, offer, amount, Some(sealed))
    }

    fn go_to_card(
        &mut self,
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        sealed_pin: Option<Vec<u8>>,
    ) -> Vec<Action> {
        self.state = State::AwaitSelectForInit {
            purse,
            offer,
            amount,
            sealed_pin,
        };
        vec![
            Action::Show(Show::Progress(Progress::ReadingCard)),
            Action::Apdu(commands::select()),
        ]
    }

    /// INITIALIZE FOR LOAD, with the passbook read (oldest first) to send with it.
    fn initialize(
        &mut self,
        purse: PurseInfo,
        offer: LoadOffer,
        amount: u64,
        sealed_pin: Option<Vec<u8>>,
        passbook: Vec<LogRecord>,
    ) -> Vec<Action> {
        let apdu = init_apdu(&offer, amount);
        self.state = State::AwaitInit {
            purse,
            offer,
            amount,
            sealed_pin,
            passbook,
        };
        vec![Action::Apdu(apdu)]
    }

    fn on_init(
        &mut self,
        purse: &PurseInfo,
        offer: LoadOffer,
        amount: u64,
        sealed_pin: Option<Vec<u8>>,
        passbook: Vec<LogRecord>,
        r: Result<CardReply, CardFailure>,
    ) -> Vec<Action> {
        let data = match card_ok(r) {
            Ok(d) => d,
            Err(refusal) => return self.failed(refusal),
        };
        let Ok(init) = LoadInit::decode(&data) else {
            return self.failed(Refusal::Malformed(CardAnswer::InitializeForLoad));
        };
        if init.card_id != purse.card_id
            || init.amount != amount
            || init.currency != offer.max_amount.currency
            || init.timestamp != offer.timestamp
        {
            return self.failed(Refusal::LoadInitMismatch);
        }
        let req = LoadRequest {
            transaction_id: offer.transaction_id.clone(),
            source: offer.source.clone(),
            amount: Money::new(amount, init.currency),
            init: init.clone(),
            sealed_pin,
            passbook,
        };
        let sent = self.journal(Step::RequestSent {
            offer: offer.clone(),
            init: init.clone(),
        });
        self.state = State::AwaitCommand(Requested { offer, init });
        vec![
            sent,
            Action::Show(Show::Progress(Progress::ContactingServer)),
            Action::Send(Message::LoadRequest(req)),
        ]
    }

    fn on_command(&mut self, req: Requested, m: Message) -> Vec<Action> {
        let (cmd, items) = match m {
            Message::LoadCommand(c) if c.transaction_id == req.offer.transaction_id => {
                (c.command, [c.key_update, c.unblock, c.app_key])
            }
            Message::Error(e) if is_final_refusal(e.code) => {
                let refusal = Refusal::LoadRefused {
                    code: e.code,
                    reason: e.reason,
                };
                let mut a = vec![self.journal(Step::Ended {
                    why: format!("{refusal:?}"),
                })];
                a.extend(self.failed(refusal));
                return a;
            }
            Message::Error(e) => {
                let detail = format!("{:?}: {}", e.code, e.reason);
                return self.prove_not_loaded(
                    req,
                    None,
                    "the head end could not load now",
                    &detail,
                );
            }
            other => {
                return self.prove_not_loaded(
                    req,
                    None,
                    "unexpected answer to the load request",
                    &other.kind(),
                );
            }
        };
        let init = &req.init;
        let mismatch = if cmd.card_id != init.card_id || cmd.atc != init.atc {
            Some("the load command is for another card or transaction")
        } else if cmd.amount != init.amount || cmd.currency != init.currency {
            Some("the load command is for another amount than was asked")
        } else {
            None
        };
        // The issuer's key update, if any, rides in the same LOAD (001 [0044]): the card
        // credits and re-keys in one state change, or does neither.
        // So do its UNBLOCK and a new application key, after it (seed 004).
        let apdu = if req.offer.source.is_unload() {
            // An unload's UNLOAD carries the command alone (no key update, no UNBLOCK).
            commands::unload(&cmd)
        } else {
            commands::load_with_items(&cmd, items.each_ref().map(Option::as_deref))
        };
        let mut a = vec![self.journal(Step::CommandReceived { command: cmd })];
        if let Some(why) = mismatch {
            a.extend(self.prove_not_loaded(req, None, why, &""));
            return a;
        }
        self.state = State::AwaitLoad(req);
        a.extend([
            self.journal(Step::LoadSent),
            Action::Show(Show::Progress(Progress::LoadingCard)),
            Action::Apdu(apdu),
        ]);
        a
    }

    fn on_load(&mut self, req: Requested, r: Result<CardReply, CardFailure>) -> Vec<Action> {
        let reply = match r {
            Ok(r) => r,
            // The reader failed mid-LOAD: the card may or may not have loaded.
            Err(error) => return self.in_doubt(Doubt::CardLostDuringLoad { error }),
        };
        match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => {
                let Ok(resp) = LoadResponse::decode(data) else {
                    return self.in_doubt(Doubt::LoadAnswerMalformed);
                };
                let mut a = vec![self.journal(Step::Responded {
                    response: resp.clone(),
                })];
                if resp.is_loaded() {
                    let msg = LoadResponseMsg {
                        transaction_id: self.txid(),
                        response: Some(resp),
                        zero_value: None,
                    };
                    self.state = State::AwaitConfirmation(req);
                    a.extend([
                        Action::Show(Show::Progress(Progress::Confirming)),
                        Action::Send(Message::LoadResponse(msg)),
                    ]);
                } else {
                    a.extend(self.prove_not_loaded(
                        req,
                        Some(resp),
                        "the card answered LOAD with a negative result",
                        &"",
                    ));
                }
                a
            }
            // The card refused LOAD: its LOAD is atomic, so nothing moved.
            Some((_, sw)) => self.prove_not_loaded(req, None, "the card refused LOAD", &sw),
            None => self.in_doubt(Doubt::LoadWithoutStatusWord),
        }
    }

    /// The negative-result procedure: a fresh zero-value INITIALIZE FOR LOAD, sent in the
    /// load response (with the card's negative answer, if any), for the HSM to decide. `why`
    /// and `detail` are for the log only: the viewer hears the HSM's verdict.
    fn prove_not_loaded(
        &mut self,
        req: Requested,
        response: Option<LoadResponse>,
        why: &str,
        detail: &dyn std::fmt::Display,
    ) -> Vec<Action> {
        tracing::info!(why, %detail, "load not completed: zero-value proof follows");
        self.state = State::AwaitSelectForZero { req, response };
        vec![
            Action::Show(Show::Progress(Progress::Confirming)),
            Action::Apdu(commands::select()),
        ]
    }

    fn on_zero(
        &mut self,
        req: Requested,
        response: Option<LoadResponse>,
        r: Result<CardReply, CardFailure>,
    ) -> Vec<Action> {
        let zero = match card_ok(r) {
            Ok(d) => match LoadInit::decode(&d) {
                Ok(z) => z,
                Err(_) => return self.in_doubt(Doubt::ZeroValueMalformed),
            },
            Err(why) => return self.in_doubt(Doubt::NoZeroValueProof { why: Box::new(why) }),
        };
        let msg = LoadResponseMsg {
            transaction_id: self.txid(),
            response,
            zero_value: Some(zero.clone()),
        };
        self.state = State::AwaitConfirmation(req);
        vec![
            self.journal(Step::ZeroValue { zero }),
            Action::Send(Message::LoadResponse(msg)),
        ]
    }

    fn on_confirmation(&mut self, req: &Requested, m: Message) -> Vec<Action> {
        let c = match m {
            Message::LoadConfirmation(c) if c.transaction_id == req.offer.transaction_id => c,
            Message::Error(e) => {
                return self.in_doubt(Doubt::LoadConfirmationRefused {
                    code: e.code,
                    reason: e.reason,
                });
            }
            other => {
                return self.in_doubt(Doubt::LoadConfirmationOutOfTurn {
                    answer: other.kind(),
                });
            }
        };
        let Requested { offer, init } = req;
        let amount = Money::new(init.amount, init.currency);
        let mut a = vec![self.journal(Step::Completed {
            confirmation: c.clone(),
        })];
        if c.loaded {
            let new_balance = c.new_balance.unwrap_or(if offer.source.is_unload() {
                init.balance.saturating_sub(init.amount)
            } else {
                init.balance + init.amount
            });
            a.push(Action::Show(Show::Receipt(ReceiptShown {
                transaction_id: offer.transaction_id.clone(),
                what: receipted(&offer.source),
                amount,
                balance_after: Money::new(new_balance, init.currency),
                date: offer.date,
            })));
            let outcome = Outcome::Loaded {
                transaction_id: offer.transaction_id.clone(),
                amount,
                new_balance,
            };
            a.push(self.done(outcome));
        } else {
            a.push(Action::Show(Show::NotLoaded));
            let outcome = Outcome::NotLoaded {
                transaction_id: offer.transaction_id.clone(),
            };
            a.push(self.done(outcome));
        }
        a
    }
}

/// A card reply's data, or why there is none.
fn card_ok(r: Result<CardReply, CardFailure>) -> Result<Vec<u8>, Refusal> {
    let reply = r.map_err(|error| Refusal::CardUnreadable { error })?;
    match split_sw(&reply.response) {
        Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
        Some((_, sw)) => Err(Refusal::CardRefused { sw }),
        None => Err(Refusal::NoStatusWord),
    }
}

/// The zero-value INITIALIZE FOR LOAD of 001 [0130] for this offer (FOR UNLOAD for an
/// unload's: the procedure in reverse).
#[must_use]
pub fn zero_value_apdu(offer: &LoadOffer) -> Vec<u8> {
    init_apdu(offer, 0)
}

/// INITIALIZE FOR LOAD of `amount` over the offer's time stamp, or FOR UNLOAD when the
/// offer is an unload's ([`LoadSource::Unload`], issue 17).
fn init_apdu(offer: &LoadOffer, amount: u64) -> Vec<u8> {
    let req = LoadInitRequest {
        amount,
        currency: offer.max_amount.currency,
        timestamp: offer.timestamp,
        date: offer.date,
    };
    if offer.source.is_unload() {
        commands::init_unload(&req)
    } else {
        commands::init_load(&req)
    }
}

/// What the journal knows of an in-doubt load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLoad {
    /// The load offer's transaction id.
    pub transaction_id: String,
    /// The load offer (source, maximum, time stamp and date the S1 was made with).
    pub offer: LoadOffer,
    /// The S1 the load request carried (its `amount` is the load's, in minor units).
    pub init: LoadInit,
    /// The load command, once it came (`load_command` and later).
    pub command: Option<LoadCommand>,
    /// The card's LOAD answer (S3 and result code), if it was journaled.
    pub response: Option<LoadResponse>,
    /// The zero-value S1 (001 [0130]), if one was journaled.
    pub zero: Option<LoadInit>,
    /// The load's state in the journal (`load_request_sent`, `load_sent`, ...).
    pub state: JournalState,
}

/// What to do with an in-doubt load now ([`decide`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The journal does not settle it and the load's card is not in the reader (none, or
    /// another card): wait for the right one.
    WaitForCard,
    /// Everything is known: send this load response (again).
    Resend(LoadResponseMsg),
    /// The card's S3 was not journaled but the card's log has the load: this response,
    /// rebuilt from the log, is to be journaled and sent.
    FromLog(LoadResponse),
    /// No S3: run a fresh zero-value INITIALIZE FOR LOAD and send it (with the card's
    /// negative answer, if journaled).
    ProveWithZero { response: Option<LoadResponse> },
}

/// Decides from the journal first (a loaded S3 or a zero-value proof is re-sent as it is,
/// whatever card is in the reader), then from the load's card and its log (any order).
#[must_use]
pub fn decide(p: &PendingLoad, card: Option<CardSeen<'_>>) -> Decision {
    let msg = |response: Option<LoadResponse>, zero_value: Option<LoadInit>| {
        Decision::Resend(LoadResponseMsg {
            transaction_id: p.transaction_id.clone(),
            response,
            zero_value,
        })
    };
    match (&p.response, &p.zero) {
        (Some(r), _) if r.is_loaded() => return msg(Some(r.clone()), None),
        (r, Some(z)) => return msg(r.clone(), Some(z.clone())),
        _ => {}
    }
    let Some(CardSeen { card_id, log }) = card.filter(|c| c.card_id == p.init.card_id) else {
        return Decision::WaitForCard;
    };
    if let Some(r) = &p.response {
        return Decision::ProveWithZero {
            response: Some(r.clone()),
        };
    }
    // LOAD may have run (state load_sent): the card logs every credited load with its S3.
    if p.command.is_some() {
        let kind = if p.offer.source.is_unload() {
            LogKind::Unload
        } else {
            LogKind::Load
        };
        let found = log.iter().find(|r| {
            r.kind == kind
                && r.atc == p.init.atc
                && r.amount == p.init.amount
                && r.currency == p.init.currency
                && p.command
                    .as_ref()
                    .is_none_or(|c| c.hsm_id == r.counterparty)
        });
        if let Some(r) = found {
            return Decision::FromLog(LoadResponse {
                card_id,
                atc: r.atc,
                amount: r.amount,
                currency: r.currency,
                result: LOAD_OK,
                new_balance: r.balance_after,
                s3: r.signature,
            });
        }
    }
    Decision::ProveWithZero { response: None }
}

/// What the head end's answer to a (re-)sent load response means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadResolution {
    /// Settled (loaded or not): journal `load_completed` with this confirmation.
    Completed(LoadConfirmation),
    /// An S3 rebuilt from the card's log was refused as a bad signature (a card that loaded
    /// but had answered "not loaded" logs an S3 the HSM cannot verify): the zero-value proof
    /// decides instead.
    ProveWithZero,
    /// Still in doubt: retry later. The reason is for the log.
    Retry(String),
}

/// Reads the answer to `sent` for load `txid`; `from_log` says whether its S3 came from the
/// card's log ([`Decision::FromLog`]).
#[must_use]
pub fn on_load_answer(
    txid: &str,
    sent: &LoadResponseMsg,
    from_log: bool,
    answer: Result<&Message, &NetworkFailure>,
) -> LoadResolution {
    match answer {
        Ok(Message::LoadConfirmation(c)) if c.transaction_id == txid => {
            LoadResolution::Completed(c.clone())
        }
        Ok(Message::Error(e))
            if e.code == ErrorCode::BadSignature && from_log && sent.zero_value.is_none() =>
        {
            LoadResolution::ProveWithZero
        }
        Ok(Message::Error(e)) => {
            LoadResolution::Retry(format!("the head end answered {:?}: {}", e.code, e.reason))
        }
        Ok(other) => LoadResolution::Retry(format!("unexpected answer: {}", other.kind())),
        Err(e) => LoadResolution::Retry(format!("no answer from the head end: {e}")),
    }
}

#[cfg(test)]
mod tests;
