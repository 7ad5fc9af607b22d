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
//! and [`decide`] resolves it from the journal and the card's log.

use proto::apdu::StatusWord;
use proto::card::commands;
use proto::crypto::DesKey;
use proto::messages::{
    ErrorCode, LoadConfirmation, LoadOffer, LoadOfferRequest, LoadRequest, LoadResponseMsg,
    LoadSource, Message, PinBlock,
};
use proto::money::Money;
use proto::purse::{
    LOAD_OK, LoadCommand, LoadInit, LoadInitRequest, LoadResponse, LogKind, PurseInfo,
};
use rand::SeedableRng;
use rand::rngs::StdRng;
use ui::UiUpdate;
use ui::model::{ErrorKind, PinRequest, ProgressStep, TxId, UiError};

use crate::purchase::{CardReply, name};
use crate::recovery::CardSeen;
use crate::{split_sw, ui_date, ui_money};

/// PIN length the entry screen allows.
pub const PIN_MIN: u8 = 4;
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
    /// Closed: refused before any load command; nothing held, nothing loaded.
    Ended { why: String },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// One request to the gateway; its answer comes back as [`Input::Answer`] or
    /// [`Input::NetworkFailed`].
    Send(Message),
    /// One command APDU to the card; the reply comes back as [`Input::Card`].
    Apdu(Vec<u8>),
    Journal {
        transaction_id: String,
        step: Step,
    },
    Ui(UiUpdate),
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Loaded {
        transaction_id: String,
        amount: Money,
        new_balance: u64,
    },
    /// The load server confirmed that the card was not loaded; the hold is released.
    NotLoaded {
        transaction_id: String,
        reason: String,
    },
    Cancelled {
        transaction_id: Option<String>,
    },
    Failed {
        transaction_id: Option<String>,
        kind: ErrorKind,
        reason: String,
    },
    /// Value may be in flight; the journal holds the load and recovery resolves it.
    InDoubt {
        transaction_id: String,
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Answer(Message),
    NetworkFailed(String),
    Card(Result<CardReply, String>),
    CardRemoved,
    /// The amount the viewer confirmed, in minor units.
    Amount(i64),
    /// The PIN as typed (its `Debug` hides the digits).
    Pin(ui::Pin),
    /// BACK on the amount or PIN screen.
    Cancel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitSelect,
    AwaitPurse,
    AwaitOffer,
    AwaitAmount,
    AwaitPin,
    AwaitSelectForInit,
    AwaitInit,
    AwaitCommand,
    AwaitLoad,
    AwaitSelectForZero,
    AwaitZero,
    AwaitConfirmation,
    Done,
}

pub struct Load {
    source: LoadSource,
    pin_key: Option<DesKey>,
    state: State,
    purse: Option<PurseInfo>,
    offer: Option<LoadOffer>,
    amount: u64,
    sealed_pin: Option<Vec<u8>>,
    init: Option<LoadInit>,
    /// The card's LOAD answer, once it came (sent along with the zero-value proof).
    response: Option<LoadResponse>,
    rng: StdRng,
}

fn err(kind: ErrorKind, detail: impl Into<String>) -> Action {
    Action::Ui(UiUpdate::Error(UiError {
        kind,
        detail: Some(detail.into()),
    }))
}

/// How the viewer sees a head-end refusal.
pub fn kind_of(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::Timeout | ErrorCode::Busy => ErrorKind::Timeout,
        ErrorCode::AmountMismatch => ErrorKind::AmountMismatch,
        ErrorCode::Expired => ErrorKind::CardExpired,
        _ => ErrorKind::Other,
    }
}

/// A refusal of the load request that settles it: nothing held (or the hold already
/// released by the gateway), no load command issued. Anything else (the head end busy, a
/// hop down, an internal error) may have left a hold, so the zero-value proof closes it.
pub fn is_final_refusal(code: ErrorCode) -> bool {
    !matches!(
        code,
        ErrorCode::Busy | ErrorCode::Timeout | ErrorCode::Internal | ErrorCode::UnknownRoute
    )
}

fn card_error(sw: StatusWord) -> (ErrorKind, String) {
    match sw {
        StatusWord::BLOCKED => (ErrorKind::CardBlocked, "the card is blocked".into()),
        StatusWord::EXPIRED => (ErrorKind::CardExpired, "the card has expired".into()),
        StatusWord::OVER_MAX_BALANCE => (
            ErrorKind::Other,
            "that amount would take the card over its maximum balance".into(),
        ),
        StatusWord::WRONG_CURRENCY => (
            ErrorKind::Other,
            "the card holds another currency than the offer".into(),
        ),
        sw => (ErrorKind::Other, format!("the card refused: {sw}")),
    }
}

/// The label of a source on the receipt: (item, merchant).
fn source_label(s: &LoadSource) -> (String, String) {
    match s {
        LoadSource::Bank { account } => ("Bank account".into(), account.clone()),
        // The code is the voucher's only secret: the TV shows its last characters only.
        LoadSource::Voucher { code } => ("Voucher".into(), masked(code.expose())),
    }
}

/// A secret shown on the TV: its last four characters after a mask.
fn masked(s: &str) -> String {
    let tail: String = s
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("••••{tail}")
}

/// Seals the PIN block for the bank under the box's PIN key.
pub fn seal_pin(key: &DesKey, transaction_id: &str, pin: &str, rng: &mut StdRng) -> Vec<u8> {
    let block = PinBlock {
        transaction_id: transaction_id.into(),
        pin: proto::secret::Secret::new(pin.to_string()),
    };
    let mut clear = postcard::to_allocvec(&block).expect("in-memory serialization");
    let sealed = proto::crypto::seal(key, &clear, rng);
    clear.fill(0);
    sealed
}

impl Load {
    /// Starts a load from `source`. `pin_key` is the box's per-box PIN key (needed only when
    /// the offer says a PIN is required); `seed` drives the PIN block's sealing.
    pub fn start(source: LoadSource, pin_key: Option<DesKey>, seed: u64) -> (Self, Vec<Action>) {
        let l = Self {
            source,
            pin_key,
            state: State::AwaitSelect,
            purse: None,
            offer: None,
            amount: 0,
            sealed_pin: None,
            init: None,
            response: None,
            rng: StdRng::seed_from_u64(seed),
        };
        (l, vec![Action::Apdu(commands::select())])
    }

    pub fn transaction_id(&self) -> Option<&str> {
        self.offer.as_ref().map(|o| o.transaction_id.as_str())
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the flow uses the card now or will again (so a removal matters).
    pub fn holds_card(&self) -> bool {
        !matches!(
            self.state,
            State::AwaitCommand | State::AwaitConfirmation | State::Done
        )
    }

    /// Whether the flow is inside a card sequence that must not be interleaved with another
    /// program's commands (SELECT → READ PURSE; SELECT → INITIALIZE FOR LOAD → … → LOAD; SELECT
    /// → zero-value INITIALIZE). The shell holds a reader transaction while this is true, and
    /// lets other programs at the card while the viewer types or the offer is on its way.
    pub fn card_sequence_open(&self) -> bool {
        matches!(
            self.state,
            State::AwaitSelect
                | State::AwaitPurse
                | State::AwaitSelectForInit
                | State::AwaitInit
                | State::AwaitCommand
                | State::AwaitLoad
                | State::AwaitSelectForZero
                | State::AwaitZero
        )
    }

    fn txid(&self) -> String {
        self.transaction_id().unwrap_or_default().to_string()
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
    fn failed(&mut self, kind: ErrorKind, reason: String) -> Vec<Action> {
        let outcome = Outcome::Failed {
            transaction_id: self.transaction_id().map(str::to_string),
            kind,
            reason: reason.clone(),
        };
        vec![err(kind, reason), self.done(outcome)]
    }

    fn in_doubt(&mut self, reason: String) -> Vec<Action> {
        let outcome = Outcome::InDoubt {
            transaction_id: self.txid(),
            reason: reason.clone(),
        };
        vec![
            err(
                ErrorKind::Other,
                format!(
                    "{reason}; the load will be settled automatically when the card is back — \
                     it is never paid twice"
                ),
            ),
            self.done(outcome),
        ]
    }

    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match (self.state, input) {
            (State::Done, _) => Vec::new(),
            (State::AwaitSelect, Input::Card(r)) => match self.card_ok(r) {
                Ok(_) => {
                    self.state = State::AwaitPurse;
                    vec![Action::Apdu(commands::read_purse())]
                }
                Err((kind, why)) => self.failed(kind, why),
            },
            (State::AwaitPurse, Input::Card(r)) => self.on_purse(r),
            (State::AwaitOffer, Input::Answer(m)) => self.on_offer(m),
            (State::AwaitOffer, Input::NetworkFailed(e)) => {
                self.failed(ErrorKind::HeadEndUnreachable, e)
            }
            (State::AwaitAmount, Input::Amount(minor)) => self.on_amount(minor),
            (State::AwaitPin, Input::Pin(pin)) => self.on_pin(&pin),
            (
                State::AwaitSelect
                | State::AwaitPurse
                | State::AwaitOffer
                | State::AwaitAmount
                | State::AwaitPin,
                Input::Cancel,
            ) => {
                let outcome = Outcome::Cancelled {
                    transaction_id: self.transaction_id().map(str::to_string),
                };
                vec![self.done(outcome)]
            }
            (
                State::AwaitSelect
                | State::AwaitPurse
                | State::AwaitOffer
                | State::AwaitAmount
                | State::AwaitPin
                | State::AwaitSelectForInit
                | State::AwaitInit,
                Input::CardRemoved,
            ) => self.failed(ErrorKind::NoCard, "the card was removed".into()),
            (State::AwaitSelectForInit, Input::Card(r)) => match self.card_ok(r) {
                Ok(_) => {
                    let offer = self.offer.as_ref().expect("offer");
                    self.state = State::AwaitInit;
                    vec![Action::Apdu(commands::init_load(&LoadInitRequest {
                        amount: self.amount,
                        currency: offer.max_amount.currency,
                        timestamp: offer.timestamp,
                        date: offer.date,
                    }))]
                }
                Err((kind, why)) => self.failed(kind, why),
            },
            (State::AwaitInit, Input::Card(r)) => self.on_init(r),
            (State::AwaitCommand, Input::Answer(m)) => self.on_command(m),
            (State::AwaitCommand, Input::NetworkFailed(e)) => self.prove_not_loaded(
                ErrorKind::HeadEndUnreachable,
                format!("no load command from the head end ({e})"),
            ),
            (State::AwaitLoad, Input::Card(r)) => self.on_load(r),
            (State::AwaitSelectForZero, Input::Card(r)) => match self.card_ok(r) {
                Ok(_) => {
                    let offer = self.offer.as_ref().expect("offer");
                    self.state = State::AwaitZero;
                    vec![Action::Apdu(zero_value_apdu(offer))]
                }
                Err((_, why)) => self.in_doubt(format!("no zero-value proof from the card: {why}")),
            },
            (State::AwaitZero, Input::Card(r)) => self.on_zero(r),
            (State::AwaitConfirmation, Input::Answer(m)) => self.on_confirmation(m),
            (State::AwaitConfirmation, Input::NetworkFailed(e)) => {
                self.in_doubt(format!("the load confirmation did not get through ({e})"))
            }
            // Anything else (a removal while the network answers, a late key) changes
            // nothing: the outstanding request's answer decides.
            _ => Vec::new(),
        }
    }

    fn card_ok(&mut self, r: Result<CardReply, String>) -> Result<Vec<u8>, (ErrorKind, String)> {
        let reply = r.map_err(|e| (ErrorKind::NoCard, e))?;
        match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
            Some((_, sw)) => Err(card_error(sw)),
            None => Err((
                ErrorKind::Other,
                "the card answered without a status word".into(),
            )),
        }
    }

    fn on_purse(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let data = match self.card_ok(r) {
            Ok(d) => d,
            Err((kind, why)) => return self.failed(kind, why),
        };
        let Ok(purse) = PurseInfo::decode(&data) else {
            return self.failed(
                ErrorKind::Other,
                "the card's READ PURSE answer is malformed".into(),
            );
        };
        if purse.is_blocked() {
            return self.failed(ErrorKind::CardBlocked, "the card is blocked".into());
        }
        self.purse = Some(purse.clone());
        self.state = State::AwaitOffer;
        vec![
            Action::Ui(UiUpdate::Progress(ProgressStep::ContactingServer)),
            Action::Send(Message::LoadOfferRequest(LoadOfferRequest {
                source: self.source.clone(),
                card: purse,
            })),
        ]
    }

    fn on_offer(&mut self, m: Message) -> Vec<Action> {
        let offer = match m {
            Message::LoadOffer(o) => o,
            Message::Error(e) => {
                return self.failed(kind_of(e.code), format!("no load offer: {}", e.reason));
            }
            other => {
                return self.failed(
                    ErrorKind::Other,
                    format!(
                        "the head end answered the load offer request with {}",
                        name(&other)
                    ),
                );
            }
        };
        let purse = self.purse.as_ref().expect("purse before offer");
        if offer.transaction_id.is_empty() || !self.source.offered_as(&offer.source) {
            return self.failed(
                ErrorKind::Other,
                "the head end sent an unusable load offer".into(),
            );
        }
        let max = offer.max_amount;
        self.offer = Some(offer);
        if max.currency != purse.currency {
            return self.failed(
                ErrorKind::Other,
                format!(
                    "the card holds {} but the account pays in {}",
                    purse.currency.alpha(),
                    max.currency.alpha()
                ),
            );
        }
        if max.minor == 0 {
            let by = self.offer.as_ref().expect("set").limited_by.clone();
            return self.failed(
                ErrorKind::Other,
                format!("nothing can be loaded now (limited by {by})"),
            );
        }
        self.state = State::AwaitAmount;
        vec![Action::Ui(UiUpdate::LoadMax(ui_money(max)))]
    }

    fn on_amount(&mut self, minor: i64) -> Vec<Action> {
        let max = self.offer.as_ref().expect("offer").max_amount;
        let amount = match u64::try_from(minor) {
            Ok(a) if a > 0 && a <= max.minor => a,
            _ => {
                return self.failed(
                    ErrorKind::Other,
                    format!(
                        "the amount must be above zero and at most {max}; got {}",
                        Money::new(minor.unsigned_abs(), max.currency)
                    ),
                );
            }
        };
        self.amount = amount;
        if self.offer.as_ref().expect("offer").pin_required {
            if self.pin_key.is_none() {
                return self.failed(
                    ErrorKind::Other,
                    "this account needs a PIN but the box has no PIN key ([load] pin_key)".into(),
                );
            }
            self.state = State::AwaitPin;
            return vec![Action::Ui(UiUpdate::PinRequest(PinRequest {
                min_len: PIN_MIN,
                max_len: PIN_MAX,
                attempts_left: None,
            }))];
        }
        self.go_to_card()
    }

    fn on_pin(&mut self, pin: &ui::Pin) -> Vec<Action> {
        let digits = pin.expose();
        let len = digits.len();
        if len < usize::from(PIN_MIN)
            || len > usize::from(PIN_MAX)
            || !digits.bytes().all(|b| b.is_ascii_digit())
        {
            return self.failed(
                ErrorKind::Other,
                format!("a PIN has {PIN_MIN} to {PIN_MAX} digits"),
            );
        }
        let key = self.pin_key.clone().expect("checked before asking");
        let txid = self.txid();
        self.sealed_pin = Some(seal_pin(&key, &txid, digits, &mut self.rng));
        self.go_to_card()
    }

    fn go_to_card(&mut self) -> Vec<Action> {
        self.state = State::AwaitSelectForInit;
        vec![
            Action::Ui(UiUpdate::Progress(ProgressStep::ReadingCard)),
            Action::Apdu(commands::select()),
        ]
    }

    fn on_init(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let data = match self.card_ok(r) {
            Ok(d) => d,
            Err((kind, why)) => return self.failed(kind, why),
        };
        let Ok(init) = LoadInit::decode(&data) else {
            return self.failed(
                ErrorKind::Other,
                "the card's INITIALIZE FOR LOAD answer is malformed".into(),
            );
        };
        let offer = self.offer.clone().expect("offer");
        let purse = self.purse.as_ref().expect("purse");
        if init.card_id != purse.card_id
            || init.amount != self.amount
            || init.currency != offer.max_amount.currency
            || init.timestamp != offer.timestamp
        {
            return self.failed(
                ErrorKind::Other,
                "the card's INITIALIZE FOR LOAD answer is for another card, amount or time stamp"
                    .into(),
            );
        }
        let req = LoadRequest {
            transaction_id: offer.transaction_id.clone(),
            source: offer.source.clone(),
            amount: Money::new(self.amount, init.currency),
            init: init.clone(),
            sealed_pin: self.sealed_pin.take(),
        };
        self.init = Some(init.clone());
        self.state = State::AwaitCommand;
        vec![
            self.journal(Step::RequestSent { offer, init }),
            Action::Ui(UiUpdate::Progress(ProgressStep::ContactingServer)),
            Action::Send(Message::LoadRequest(req)),
        ]
    }

    fn on_command(&mut self, m: Message) -> Vec<Action> {
        let cmd = match m {
            Message::LoadCommand(c) if c.transaction_id == self.txid() => c.command,
            Message::Error(e) if is_final_refusal(e.code) => {
                let reason = format!("the load was refused: {}", e.reason);
                let mut a = vec![self.journal(Step::Ended {
                    why: reason.clone(),
                })];
                a.extend(self.failed(kind_of(e.code), reason));
                return a;
            }
            Message::Error(e) => {
                return self.prove_not_loaded(
                    kind_of(e.code),
                    format!("the head end could not load now: {}", e.reason),
                );
            }
            other => {
                return self.prove_not_loaded(
                    ErrorKind::Other,
                    format!("unexpected answer to the load request: {}", name(&other)),
                );
            }
        };
        let init = self.init.as_ref().expect("init");
        let mismatch = if cmd.card_id != init.card_id || cmd.atc != init.atc {
            Some((
                ErrorKind::Other,
                "the load command is for another card or transaction".to_string(),
            ))
        } else if cmd.amount != self.amount || cmd.currency != init.currency {
            Some((
                ErrorKind::AmountMismatch,
                format!(
                    "the load command is for {} but {} was asked",
                    Money::new(cmd.amount, cmd.currency),
                    Money::new(self.amount, init.currency)
                ),
            ))
        } else {
            None
        };
        let mut a = vec![self.journal(Step::CommandReceived {
            command: cmd.clone(),
        })];
        if let Some((kind, why)) = mismatch {
            a.extend(self.prove_not_loaded(kind, why));
            return a;
        }
        self.state = State::AwaitLoad;
        a.extend([
            self.journal(Step::LoadSent),
            Action::Ui(UiUpdate::Progress(ProgressStep::LoadingCard)),
            Action::Apdu(commands::load(&cmd)),
        ]);
        a
    }

    fn on_load(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let reply = match r {
            Ok(r) => r,
            // The reader failed mid-LOAD: the card may or may not have loaded.
            Err(e) => return self.in_doubt(format!("the card was lost during LOAD ({e})")),
        };
        match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => {
                let Ok(resp) = LoadResponse::decode(data) else {
                    return self.in_doubt("the card's LOAD answer is malformed".into());
                };
                let mut a = vec![self.journal(Step::Responded {
                    response: resp.clone(),
                })];
                if resp.is_loaded() {
                    self.state = State::AwaitConfirmation;
                    a.extend([
                        Action::Ui(UiUpdate::Progress(ProgressStep::Confirming)),
                        Action::Send(Message::LoadResponse(LoadResponseMsg {
                            transaction_id: self.txid(),
                            response: Some(resp),
                            zero_value: None,
                        })),
                    ]);
                } else {
                    self.response = Some(resp);
                    a.extend(self.prove_not_loaded(
                        ErrorKind::Other,
                        "the card answered LOAD with a negative result".into(),
                    ));
                }
                a
            }
            // The card refused LOAD: its LOAD is atomic, so nothing moved.
            Some((_, sw)) => {
                let (kind, why) = card_error(sw);
                self.prove_not_loaded(kind, format!("the card refused LOAD: {why}"))
            }
            None => self.in_doubt("the card answered LOAD without a status word".into()),
        }
    }

    /// The negative-result procedure: a fresh zero-value INITIALIZE FOR LOAD, sent in the
    /// load response (with the card's negative answer, if any), for the HSM to decide.
    fn prove_not_loaded(&mut self, kind: ErrorKind, why: String) -> Vec<Action> {
        tracing::info!(%why, ?kind, "load not completed: zero-value proof follows");
        self.state = State::AwaitSelectForZero;
        vec![
            Action::Ui(UiUpdate::Progress(ProgressStep::Confirming)),
            Action::Apdu(commands::select()),
        ]
    }

    fn on_zero(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let zero = match self.card_ok(r) {
            Ok(d) => match LoadInit::decode(&d) {
                Ok(z) => z,
                Err(_) => return self.in_doubt("the card's zero-value S1 is malformed".into()),
            },
            Err((_, why)) => {
                return self.in_doubt(format!("no zero-value proof from the card: {why}"));
            }
        };
        self.state = State::AwaitConfirmation;
        vec![
            self.journal(Step::ZeroValue { zero: zero.clone() }),
            Action::Send(Message::LoadResponse(LoadResponseMsg {
                transaction_id: self.txid(),
                response: self.response.clone(),
                zero_value: Some(zero),
            })),
        ]
    }

    fn on_confirmation(&mut self, m: Message) -> Vec<Action> {
        let c = match m {
            Message::LoadConfirmation(c) if c.transaction_id == self.txid() => c,
            Message::Error(e) => {
                return self.in_doubt(format!("the head end answered: {}", e.reason));
            }
            other => {
                return self.in_doubt(format!(
                    "the head end answered the load response with {}",
                    name(&other)
                ));
            }
        };
        let init = self.init.clone().expect("init");
        let offer = self.offer.clone().expect("offer");
        let mut a = vec![self.journal(Step::Completed {
            confirmation: c.clone(),
        })];
        if c.loaded {
            let new_balance = c.new_balance.unwrap_or(init.balance + self.amount);
            let (item, merchant) = source_label(&offer.source);
            a.push(Action::Ui(UiUpdate::Receipt(ui::model::Receipt {
                txid: TxId(self.txid()),
                kind: ui::model::TxKind::Load,
                item,
                merchant,
                amount: ui_money(Money::new(self.amount, init.currency)),
                balance_after: ui_money(Money::new(new_balance, init.currency)),
                date: ui_date(offer.date),
            })));
            let outcome = Outcome::Loaded {
                transaction_id: self.txid(),
                amount: Money::new(self.amount, init.currency),
                new_balance,
            };
            a.push(self.done(outcome));
        } else {
            let reason =
                "the card was not loaded; the amount held on the account is released".to_string();
            a.push(err(ErrorKind::Other, reason.clone()));
            let outcome = Outcome::NotLoaded {
                transaction_id: self.txid(),
                reason,
            };
            a.push(self.done(outcome));
        }
        a
    }
}

/// The zero-value INITIALIZE FOR LOAD of 001 [0130] for this offer.
pub fn zero_value_apdu(offer: &LoadOffer) -> Vec<u8> {
    commands::init_load(&LoadInitRequest {
        amount: 0,
        currency: offer.max_amount.currency,
        timestamp: offer.timestamp,
        date: offer.date,
    })
}

/// What the journal knows of an in-doubt load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingLoad {
    pub transaction_id: String,
    pub offer: LoadOffer,
    /// The S1 the load request carried.
    pub init: LoadInit,
    pub command: Option<LoadCommand>,
    pub response: Option<LoadResponse>,
    pub zero: Option<LoadInit>,
    pub state: String,
}

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
        let found = log.iter().find(|r| {
            r.kind == LogKind::Load
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
pub fn on_load_answer(
    txid: &str,
    sent: &LoadResponseMsg,
    from_log: bool,
    answer: Result<&Message, &str>,
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
        Ok(other) => LoadResolution::Retry(format!("unexpected answer: {}", name(other))),
        Err(e) => LoadResolution::Retry(format!("no answer from the head end: {e}")),
    }
}

#[cfg(test)]
mod tests;
