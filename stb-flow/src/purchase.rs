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

use proto::apdu::StatusWord;
use proto::card::commands;
use proto::messages::{
    CancelMsg, CancelReason, DebitResponseMsg, DrawBody, DrawRequest, ErrorCode, Message, Offer,
    Protected, Receipt,
};
use proto::purse::{Date, DebitCommand, DebitResponse, PurchaseInit};
use rand::SeedableRng;
use rand::rngs::StdRng;
use ui::UiUpdate;
use ui::model::{ErrorKind, ProgressStep, TxId, UiError};

use crate::{recovery, split_sw, ui_date, ui_money};

/// A journal step: written before the action it announces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// The viewer pressed OK; the offer (with its TSK) and the card data are kept.
    OfferAccepted {
        offer: Offer,
        init: PurchaseInit,
    },
    /// The draw request is about to go out: from here the transaction may be in doubt.
    DrawSent,
    DebitCommandReceived {
        command: DebitCommand,
    },
    /// DEBIT is about to go to the card.
    DebitSent,
    DebitResponded {
        response: DebitResponse,
    },
    /// A cancel is about to go out (the card was not debited).
    CancelPending {
        reason: CancelReason,
    },
    /// Closed: the receipt came.
    Completed {
        receipt: Receipt,
    },
    /// Closed without value moving.
    Ended {
        why: String,
    },
    /// Recovery cannot settle it from this box (DEBIT was sent, no debit response in the
    /// journal or the card's log, the head end rejected the proof): kept for the operator,
    /// with the reason. It no longer blocks the card, and it is not ended.
    Unresolvable {
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// One request to the gateway; its answer comes back as [`Input::Answer`] or
    /// [`Input::NetworkFailed`].
    Send(Message),
    /// One command APDU to the card; the reply comes back as [`Input::Card`].
    Apdu(Vec<u8>),
    /// Write this step for the transaction before executing the next actions.
    Journal {
        transaction_id: String,
        step: Step,
    },
    Ui(UiUpdate),
    /// The flow is over.
    Done(Outcome),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Paid {
        transaction_id: String,
        receipt: Receipt,
    },
    Cancelled {
        transaction_id: Option<String>,
        reason: String,
    },
    Failed {
        transaction_id: Option<String>,
        kind: ErrorKind,
        reason: String,
    },
    /// Value may have moved; the journal holds the transaction and recovery will finish it.
    InDoubt {
        transaction_id: String,
        reason: String,
    },
}

/// A card's answer, or why there is none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardReply {
    pub atr: Vec<u8>,
    pub response: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Answer(Message),
    NetworkFailed(String),
    Card(Result<CardReply, String>),
    /// The card was pulled (between commands).
    CardRemoved,
    /// OK on the offer popup.
    Accept,
    /// BACK, or the countdown ran out.
    Decline {
        timeout: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitOffer,
    AwaitSelect,
    AwaitInit,
    AwaitViewer,
    /// After the OK: the purse selected again, for the INITIALIZE that DEBIT follows.
    AwaitReselect,
    AwaitReinit,
    AwaitDebitCommand,
    AwaitDebit,
    AwaitReceipt,
    /// A fresh INITIALIZE for the cancel's proof.
    AwaitProof(CancelReason),
    /// The cancel is out; whatever the answer, the flow ends with `outcome`.
    AwaitCancelAck,
    Done,
}

pub struct Purchase {
    merchant_id: String,
    item_id: String,
    today: Date,
    state: State,
    offer: Option<Offer>,
    atr: Vec<u8>,
    init: Option<PurchaseInit>,
    /// What the flow ends with once the outstanding cancel is answered.
    after_cancel: Option<Outcome>,
    /// The transaction is in the journal (the viewer accepted).
    journaled: bool,
    /// `DebitSent` is journaled: DEBIT may have reached the card.
    debit_sent: bool,
    rng: StdRng,
}

fn err(kind: ErrorKind, detail: impl Into<String>) -> Action {
    Action::Ui(UiUpdate::Error(UiError {
        kind,
        detail: Some(detail.into()),
    }))
}

fn kind_of(code: ErrorCode) -> ErrorKind {
    match code {
        ErrorCode::InsufficientValue => ErrorKind::InsufficientValue,
        ErrorCode::Expired => ErrorKind::CardExpired,
        ErrorCode::AmountMismatch => ErrorKind::AmountMismatch,
        ErrorCode::Timeout | ErrorCode::Busy | ErrorCode::RateLimited => ErrorKind::Timeout,
        _ => ErrorKind::Other,
    }
}

fn card_kind(sw: StatusWord) -> ErrorKind {
    match sw {
        StatusWord::BLOCKED => ErrorKind::CardBlocked,
        StatusWord::EXPIRED => ErrorKind::CardExpired,
        StatusWord::INSUFFICIENT_VALUE => ErrorKind::InsufficientValue,
        _ => ErrorKind::Other,
    }
}

impl Purchase {
    /// Starts a purchase of `item_id` from `merchant_id`; `today` is the date the card and
    /// the expiry check use; `seed` drives the message-layer sealing.
    pub fn start(merchant_id: &str, item_id: &str, today: Date, seed: u64) -> (Self, Vec<Action>) {
        let p = Self {
            merchant_id: merchant_id.into(),
            item_id: item_id.into(),
            today,
            state: State::AwaitOffer,
            offer: None,
            atr: Vec::new(),
            init: None,
            after_cancel: None,
            journaled: false,
            debit_sent: false,
            rng: StdRng::seed_from_u64(seed),
        };
        let actions = vec![
            Action::Ui(UiUpdate::Progress(ProgressStep::ContactingServer)),
            Action::Send(Message::OfferRequest {
                merchant_id: p.merchant_id.clone(),
                item_id: p.item_id.clone(),
            }),
        ];
        (p, actions)
    }

    pub fn transaction_id(&self) -> Option<&str> {
        self.offer.as_ref().map(|o| o.transaction_id.as_str())
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Whether the viewer is being asked (the shell runs the offer timer then).
    pub fn awaiting_viewer(&self) -> bool {
        self.state == State::AwaitViewer
    }

    /// Whether the card is in use by the flow (so a removal matters).
    pub fn holds_card(&self) -> bool {
        matches!(
            self.state,
            State::AwaitSelect
                | State::AwaitInit
                | State::AwaitViewer
                | State::AwaitReselect
                | State::AwaitReinit
                | State::AwaitDebit
        )
    }

    /// Whether the flow is inside a card sequence that must not be interleaved with another
    /// program's commands: SELECT → INITIALIZE, and SELECT → INITIALIZE → draw → DEBIT (with
    /// the cancel's proof INITIALIZE when the debit does not happen). The shell holds a reader
    /// transaction while this is true; not while the viewer decides or the receipt comes.
    pub fn card_sequence_open(&self) -> bool {
        matches!(
            self.state,
            State::AwaitSelect
                | State::AwaitInit
                | State::AwaitReselect
                | State::AwaitReinit
                | State::AwaitDebitCommand
                | State::AwaitDebit
                | State::AwaitProof(_)
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

    fn failed(&mut self, kind: ErrorKind, reason: String) -> Vec<Action> {
        let outcome = Outcome::Failed {
            transaction_id: self.transaction_id().map(str::to_string),
            kind,
            reason: reason.clone(),
        };
        vec![err(kind, reason), self.done(outcome)]
    }

    /// Before the draw: nothing is at the payment server, so the cancel only tells the
    /// merchant to drop the offer, and no proof is needed.
    fn cancel_offer(&mut self, reason: CancelReason, outcome: Outcome) -> Vec<Action> {
        self.after_cancel = Some(outcome);
        self.state = State::AwaitCancelAck;
        vec![Action::Send(Message::Cancel(CancelMsg {
            transaction_id: self.txid(),
            reason,
            proof: None,
        }))]
    }

    /// After the draw, with the card not debited: journal, then a fresh INITIALIZE as proof.
    fn cancel_with_proof(&mut self, reason: CancelReason, outcome: Outcome) -> Vec<Action> {
        self.after_cancel = Some(outcome);
        self.state = State::AwaitProof(reason);
        vec![
            self.journal(Step::CancelPending { reason }),
            Action::Apdu(commands::init_purchase(self.today)),
        ]
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
                    "{reason}; the payment will be settled automatically — you will not pay twice"
                ),
            ),
            self.done(outcome),
        ]
    }

    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        match (self.state, input) {
            (State::Done, _) => Vec::new(),
            (State::AwaitOffer, Input::Answer(m)) => self.on_offer(m),
            (State::AwaitOffer, Input::NetworkFailed(e)) => {
                self.failed(ErrorKind::HeadEndUnreachable, e)
            }
            (State::AwaitSelect, Input::Card(r)) => self.on_select(r),
            (State::AwaitInit, Input::Card(r)) => self.on_init(r),
            (State::AwaitViewer, Input::Accept) => self.on_accept(),
            (State::AwaitReselect, Input::Card(r)) => self.on_reselect(r),
            (State::AwaitReinit, Input::Card(r)) => self.on_reinit(r),
            (State::AwaitViewer, Input::Decline { timeout }) => {
                let reason = if timeout {
                    CancelReason::Timeout
                } else {
                    CancelReason::Viewer
                };
                let outcome = Outcome::Cancelled {
                    transaction_id: Some(self.txid()),
                    reason: if timeout {
                        "the offer timed out"
                    } else {
                        "the viewer cancelled"
                    }
                    .into(),
                };
                self.cancel_offer(reason, outcome)
            }
            (
                State::AwaitSelect
                | State::AwaitInit
                | State::AwaitViewer
                | State::AwaitReselect
                | State::AwaitReinit,
                Input::CardRemoved,
            ) => {
                let mut a = vec![
                    Action::Ui(UiUpdate::OfferWithdrawn(TxId(self.txid()))),
                    err(ErrorKind::NoCard, "the card was removed"),
                ];
                let outcome = Outcome::Failed {
                    transaction_id: Some(self.txid()),
                    kind: ErrorKind::NoCard,
                    reason: "the card was removed".into(),
                };
                a.extend(self.cancel_offer(CancelReason::NotDebited, outcome));
                a
            }
            (State::AwaitDebitCommand, Input::Answer(m)) => self.on_debit_command(m),
            (State::AwaitDebitCommand, Input::NetworkFailed(e)) => {
                self.in_doubt(format!("no debit command from the head end ({e})"))
            }
            (State::AwaitDebit, Input::Card(r)) => self.on_debit(r),
            (State::AwaitReceipt, Input::Answer(m)) => self.on_receipt(m),
            (State::AwaitReceipt, Input::NetworkFailed(e)) => self.in_doubt(format!(
                "the card paid but the confirmation did not get through ({e})"
            )),
            (State::AwaitProof(reason), Input::Card(r)) => {
                let proof = r.ok().and_then(|r| {
                    let (data, sw) = split_sw(&r.response)?;
                    sw.is_ok()
                        .then(|| PurchaseInit::decode(data).ok())
                        .flatten()
                });
                self.state = State::AwaitCancelAck;
                vec![Action::Send(Message::Cancel(CancelMsg {
                    transaction_id: self.txid(),
                    reason,
                    proof,
                }))]
            }
            (State::AwaitCancelAck, Input::Answer(m)) => self.on_cancel_answer(Ok(&m)),
            (State::AwaitCancelAck, Input::NetworkFailed(e)) => self.on_cancel_answer(Err(&e)),
            // Anything else (a removal while waiting on the network, a late key) changes
            // nothing: the outstanding request's answer decides.
            _ => Vec::new(),
        }
    }

    fn on_offer(&mut self, m: Message) -> Vec<Action> {
        let offer = match m {
            Message::Offer(o) => o,
            Message::Error(e) => return self.failed(kind_of(e.code), e.reason),
            other => {
                return self.failed(
                    ErrorKind::Other,
                    format!(
                        "the head end answered the offer request with {}",
                        name(&other)
                    ),
                );
            }
        };
        if offer.amount.minor == 0 || offer.transaction_id.is_empty() {
            return self.failed(
                ErrorKind::Other,
                "the head end sent an unusable offer".into(),
            );
        }
        self.offer = Some(offer);
        self.state = State::AwaitSelect;
        vec![
            Action::Ui(UiUpdate::Progress(ProgressStep::ReadingCard)),
            Action::Apdu(commands::select()),
        ]
    }

    /// A card reply's data, or the actions that end the flow (before the draw).
    fn card_data(&mut self, r: Result<CardReply, String>) -> Result<Vec<u8>, Vec<Action>> {
        let outcome = |kind: ErrorKind, reason: &str, txid: String| Outcome::Failed {
            transaction_id: Some(txid),
            kind,
            reason: reason.to_string(),
        };
        let reply = match r {
            Ok(r) => r,
            Err(e) => {
                let mut a = vec![err(ErrorKind::NoCard, e.clone())];
                a.extend(self.cancel_offer(
                    CancelReason::NotDebited,
                    outcome(ErrorKind::NoCard, &e, self.txid()),
                ));
                return Err(a);
            }
        };
        self.atr = reply.atr;
        match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => Ok(data.to_vec()),
            other => {
                let (kind, why) = match other {
                    Some((_, sw)) => (card_kind(sw), format!("the card refused: {sw}")),
                    None => (
                        ErrorKind::Other,
                        "the card answered without a status word".into(),
                    ),
                };
                let mut a = vec![err(kind, why.clone())];
                a.extend(
                    self.cancel_offer(CancelReason::NotDebited, outcome(kind, &why, self.txid())),
                );
                Err(a)
            }
        }
    }

    fn on_select(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        if let Err(a) = self.card_data(r) {
            return a;
        }
        self.state = State::AwaitInit;
        vec![Action::Apdu(commands::init_purchase(self.today))]
    }

    /// The card's INITIALIZE answer, checked against the offer (001 [0075]: currency, expiry,
    /// balance ≥ amount); on a failed check, the actions that tell the viewer and drop the
    /// offer.
    fn checked_init(&mut self, r: Result<CardReply, String>) -> Result<PurchaseInit, Vec<Action>> {
        let data = self.card_data(r)?;
        let Ok(init) = PurchaseInit::decode(&data) else {
            return Err(self.refuse(
                ErrorKind::Other,
                "the card's INITIALIZE answer is malformed".into(),
            ));
        };
        let amount = self.offer.as_ref().expect("offer before card").amount;
        if init.currency != amount.currency {
            return Err(self.refuse(
                ErrorKind::Other,
                format!(
                    "the card holds {} but the price is in {}",
                    init.currency.alpha(),
                    amount.currency.alpha()
                ),
            ));
        }
        if init.expiry.is_expired_on(self.today) {
            return Err(self.refuse(
                ErrorKind::CardExpired,
                format!(
                    "the card expired at the end of {:04}-{:02}",
                    init.expiry.year, init.expiry.month
                ),
            ));
        }
        if init.balance < amount.minor {
            return Err(self.refuse(
                ErrorKind::InsufficientValue,
                format!(
                    "the card holds {} but the price is {}",
                    proto::money::Money::new(init.balance, init.currency),
                    amount
                ),
            ));
        }
        Ok(init)
    }

    fn on_init(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let init = match self.checked_init(r) {
            Ok(i) => i,
            Err(a) => return a,
        };
        let offer = self.offer.as_ref().expect("offer before card");
        let amount = offer.amount;
        let popup = ui::model::Offer {
            txid: TxId(offer.transaction_id.clone()),
            item: offer.title.clone(),
            merchant: offer.merchant_id.clone(),
            price: ui_money(amount),
            balance: ui_money(proto::money::Money::new(init.balance, init.currency)),
            balance_after: ui_money(proto::money::Money::new(
                init.balance - amount.minor,
                init.currency,
            )),
            timeout_secs: 0,
        };
        self.init = Some(init);
        self.state = State::AwaitViewer;
        vec![Action::Ui(UiUpdate::Offer(popup))]
    }

    /// A failed check before the viewer is asked: tell the viewer, drop the offer.
    fn refuse(&mut self, kind: ErrorKind, reason: String) -> Vec<Action> {
        let outcome = Outcome::Failed {
            transaction_id: Some(self.txid()),
            kind,
            reason: reason.clone(),
        };
        let mut a = vec![err(kind, reason)];
        a.extend(self.cancel_offer(CancelReason::NotDebited, outcome));
        a
    }

    /// The viewer's OK. The card was not held while the viewer decided, so the purse is
    /// selected again and a fresh INITIALIZE taken: the draw request carries the INITIALIZE
    /// that DEBIT follows, in one card sequence.
    fn on_accept(&mut self) -> Vec<Action> {
        self.state = State::AwaitReselect;
        vec![
            Action::Ui(UiUpdate::Progress(ProgressStep::ReadingCard)),
            Action::Apdu(commands::select()),
        ]
    }

    fn on_reselect(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        if let Err(a) = self.card_data(r) {
            return a;
        }
        self.state = State::AwaitReinit;
        vec![Action::Apdu(commands::init_purchase(self.today))]
    }

    fn on_reinit(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let init = match self.checked_init(r) {
            Ok(i) => i,
            Err(a) => return a,
        };
        let shown = self.init.as_ref().expect("init before the viewer");
        if init.card_id != shown.card_id {
            return self.refuse(
                ErrorKind::Other,
                "another card is in the reader than the one the offer was shown for".into(),
            );
        }
        self.init = Some(init);
        self.draw()
    }

    /// Journals the acceptance with the card data and sends the draw request.
    fn draw(&mut self) -> Vec<Action> {
        let offer = self.offer.clone().expect("offer");
        let init = self.init.clone().expect("init");
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
        self.state = State::AwaitDebitCommand;
        self.journaled = true;
        vec![
            self.journal(Step::OfferAccepted { offer, init }),
            self.journal(Step::DrawSent),
            Action::Ui(UiUpdate::Progress(ProgressStep::ContactingServer)),
            Action::Send(Message::DrawRequest(draw)),
        ]
    }

    fn on_debit_command(&mut self, m: Message) -> Vec<Action> {
        let offer = self.offer.clone().expect("offer");
        let msg = match m {
            Message::DebitCommand(d) if d.transaction_id == offer.transaction_id => d,
            Message::Error(e) => {
                // The payment server refused the draw: no debit command, nothing debited.
                let reason = format!("the payment server refused: {}", e.reason);
                let mut a = vec![self.journal(Step::Ended {
                    why: reason.clone(),
                })];
                a.extend(self.failed(kind_of(e.code), reason));
                return a;
            }
            other => {
                let outcome = Outcome::Failed {
                    transaction_id: Some(self.txid()),
                    kind: ErrorKind::Other,
                    reason: format!("unexpected answer to the draw request: {}", name(&other)),
                };
                let mut a = vec![err(ErrorKind::Other, "the head end answered out of turn")];
                a.extend(self.cancel_with_proof(CancelReason::NotDebited, outcome));
                return a;
            }
        };
        let body = match msg.body.open(offer.tsk.as_ref()) {
            Ok(b) => b,
            Err(e) => {
                let outcome = Outcome::Failed {
                    transaction_id: Some(self.txid()),
                    kind: ErrorKind::Other,
                    reason: format!("debit command unreadable: {e}"),
                };
                let mut a = vec![err(
                    ErrorKind::Other,
                    format!("debit command unreadable: {e}"),
                )];
                a.extend(self.cancel_with_proof(CancelReason::NotDebited, outcome));
                return a;
            }
        };
        let command = body.command;
        let init = self.init.as_ref().expect("init");
        // 001 [0082]: the debit command must ask for exactly the offer's amount.
        if command.amount != offer.amount.minor || command.currency != offer.amount.currency {
            let reason = format!(
                "the debit command asks for {} but the offer was {}",
                command.amount_money(),
                offer.amount
            );
            let outcome = Outcome::Failed {
                transaction_id: Some(self.txid()),
                kind: ErrorKind::AmountMismatch,
                reason: reason.clone(),
            };
            let mut a = vec![
                self.journal(Step::DebitCommandReceived { command }),
                err(ErrorKind::AmountMismatch, reason),
            ];
            a.extend(self.cancel_with_proof(CancelReason::AmountMismatch, outcome));
            return a;
        }
        if command.card_id != init.card_id || command.atc != init.atc {
            let reason = "the debit command is for another card or transaction".to_string();
            let outcome = Outcome::Failed {
                transaction_id: Some(self.txid()),
                kind: ErrorKind::Other,
                reason: reason.clone(),
            };
            let mut a = vec![
                self.journal(Step::DebitCommandReceived { command }),
                err(ErrorKind::Other, reason),
            ];
            a.extend(self.cancel_with_proof(CancelReason::NotDebited, outcome));
            return a;
        }
        self.state = State::AwaitDebit;
        self.debit_sent = true;
        vec![
            self.journal(Step::DebitCommandReceived {
                command: command.clone(),
            }),
            self.journal(Step::DebitSent),
            Action::Ui(UiUpdate::Progress(ProgressStep::DebitingCard)),
            Action::Apdu(commands::debit(&command)),
        ]
    }

    fn on_debit(&mut self, r: Result<CardReply, String>) -> Vec<Action> {
        let reply = match r {
            Ok(r) => r,
            // The reader failed mid-DEBIT: the card may or may not have debited.
            Err(e) => return self.in_doubt(format!("the card was lost during the debit ({e})")),
        };
        let response = match split_sw(&reply.response) {
            Some((data, sw)) if sw.is_ok() => match DebitResponse::decode(data) {
                Ok(r) => r,
                Err(_) => return self.in_doubt("the card's debit response is malformed".into()),
            },
            Some((_, sw)) => {
                // The card refused: its debit is atomic, so nothing moved.
                let reason = format!("the card refused the debit: {sw}");
                let outcome = Outcome::Failed {
                    transaction_id: Some(self.txid()),
                    kind: card_kind(sw),
                    reason: reason.clone(),
                };
                let mut a = vec![err(card_kind(sw), reason)];
                a.extend(self.cancel_with_proof(CancelReason::NotDebited, outcome));
                return a;
            }
            None => return self.in_doubt("the card answered DEBIT without a status word".into()),
        };
        let tsk = self.offer.as_ref().and_then(|o| o.tsk.clone());
        let msg = DebitResponseMsg {
            transaction_id: self.txid(),
            body: Protected::new(response.clone(), tsk.as_ref(), &mut self.rng),
        };
        self.state = State::AwaitReceipt;
        vec![
            self.journal(Step::DebitResponded { response }),
            Action::Ui(UiUpdate::Progress(ProgressStep::Confirming)),
            Action::Send(Message::DebitResponse(msg)),
        ]
    }

    fn on_receipt(&mut self, m: Message) -> Vec<Action> {
        match m {
            Message::Receipt(receipt) if receipt.transaction_id == self.txid() => {
                let offer = self.offer.as_ref().expect("offer");
                let init = self.init.as_ref().expect("init");
                let after = receipt
                    .new_balance
                    .unwrap_or(init.balance.saturating_sub(offer.amount.minor));
                let mut a = vec![self.journal(Step::Completed {
                    receipt: receipt.clone(),
                })];
                if receipt.released {
                    a.push(Action::Ui(UiUpdate::Receipt(ui::model::Receipt {
                        txid: TxId(self.txid()),
                        kind: ui::model::TxKind::Purchase,
                        item: offer.title.clone(),
                        merchant: offer.merchant_id.clone(),
                        amount: ui_money(offer.amount),
                        balance_after: ui_money(proto::money::Money::new(after, init.currency)),
                        date: ui_date(self.today),
                    })));
                } else {
                    a.push(err(
                        ErrorKind::Other,
                        format!("paid, but the merchant did not release: {}", receipt.text),
                    ));
                }
                let outcome = Outcome::Paid {
                    transaction_id: self.txid(),
                    receipt,
                };
                a.push(self.done(outcome));
                a
            }
            Message::Error(e) => self.in_doubt(format!(
                "the card paid but the head end answered: {}",
                e.reason
            )),
            other => self.in_doubt(format!(
                "the card paid but the head end answered {}",
                name(&other)
            )),
        }
    }

    /// A journaled cancel (after the draw) is closed only by an answer that settles it
    /// ([`recovery::on_cancel_answer`]): a receipt, or a refused proof when DEBIT never went
    /// to the card. Anything else (no answer, busy, `AlreadyCompleted`, a refused proof after
    /// DEBIT) leaves it `cancel_pending` for recovery, which reads the card's log.
    fn on_cancel_answer(&mut self, answer: Result<&Message, &str>) -> Vec<Action> {
        let outcome = self.after_cancel.take().unwrap_or(Outcome::Cancelled {
            transaction_id: self.transaction_id().map(str::to_string),
            reason: "cancelled".into(),
        });
        let mut a = Vec::new();
        if self.journaled {
            let evidence = if self.debit_sent {
                recovery::DebitEvidence::SentUnchecked
            } else {
                recovery::DebitEvidence::NeverSent
            };
            match recovery::on_cancel_answer(&self.txid(), evidence, answer) {
                recovery::Resolution::Ended(why) => a.push(self.journal(Step::Ended {
                    why: format!("{why}; {outcome:?}"),
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
        a.push(self.done(outcome));
        a
    }
}

/// A message's kind, for errors.
pub fn name(m: &Message) -> &'static str {
    match m {
        Message::OfferRequest { .. } => "an offer request",
        Message::Offer(_) => "an offer",
        Message::DrawRequest(_) => "a draw request",
        Message::DebitCommand(_) => "a debit command",
        Message::DebitResponse(_) => "a debit response",
        Message::Receipt(_) => "a receipt",
        Message::Error(_) => "an error",
        Message::CatalogRequest => "a catalog request",
        Message::Catalog(_) => "a catalog",
        Message::Cancel(_) => "a cancel",
        _ => "a load message",
    }
}

#[cfg(test)]
mod tests;
