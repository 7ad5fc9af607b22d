//! Refunds to the card in the reader (issue 17; seed 004's refund to the card), as a sans-IO
//! flow: the box asks the head end which refunds are due to the card, and runs each.
//!
//! refunds-due request → for each refund due:
//! - **fresh**: SELECT, INITIALIZE FOR CREDIT → refund request → credit command (it must
//!   name this card and the amount listed) → CREDIT → credit response → receipt;
//! - **a credit command already out** (a box or card that went away mid-refund): the card's
//!   log is read for the credit record that answers it — found, its signed credit response
//!   completes the refund; not found, a fresh INITIALIZE FOR PURCHASE goes to the head end:
//!   the card names in it the credit sessions it ran ([`proto::purse::PurchaseInit::
//!   credits`]), so the security card tells credited (the receipt) from not (counted back,
//!   and the refund runs fresh), whatever the card did since.
//!
//! **Nothing is journaled on the box.** The head end journals each step of a refund, keyed
//! by the sale's transaction id, and lists an unfinished one with its credit command; the
//! card's log holds every credit the card ran. From those two the flow finds where any
//! earlier attempt stopped — a crash, a pulled card or a lost answer anywhere — and
//! finishes it; value moves onto the card only with a credit command the security card
//! signed for this card, and the head end counts it once. A flow that stops leaves the
//! refund due; the next check (a card insertion, a reconnection) takes it up.
//!
//! The INITIALIZE FOR CREDIT whose answer the refund request carries is the one the CREDIT
//! follows: the card sequence stays open from it to the CREDIT
//! ([`Refund::card_sequence_open`]).

use std::collections::VecDeque;

use proto::card::{LOG_CAPACITY, commands};
use proto::messages::{Message, RefundDue, RefundProofMsg, RefundRequest, RefundResponseMsg};
use proto::money::{Currency, Money};
use proto::purse::{
    CreditCommand, CreditResponse, Date, LogKind, LogRecord, PurchaseInit, PurseInfo,
};

use crate::show::{Progress, ReceiptShown, Receipted, Refusal, Show};
use crate::{CardFailure, CardReply, NetworkFailure, split_sw};

/// The refund flow journals nothing on the box (see the module doc): it has no steps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {}

/// What the shell feeds back.
#[derive(Debug, Clone, PartialEq)]
// One input at a time, consumed at once.
#[allow(clippy::large_enum_variant)]
pub enum Input {
    /// The gateway's answer to the outstanding [`crate::Action::Send`].
    Answer(Message),
    /// The outstanding request got no answer.
    NetworkFailed(NetworkFailure),
    /// The card's reply to the outstanding [`crate::Action::Apdu`].
    Card(Result<CardReply, CardFailure>),
    /// The card was pulled.
    CardRemoved,
}

/// How the flow ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every refund due was credited (none, when none was due): their sales' ids.
    Done { credited: Vec<String> },
    /// Stopped at this refund (`None`: before any): it stays due at the head end, and the
    /// next check takes it up. `why` is for the logs.
    Stopped {
        credited: Vec<String>,
        transaction_id: Option<String>,
        why: String,
    },
}

/// The flow's actions.
pub type Action = crate::Action<Step, Outcome>;

enum State {
    AwaitDue,
    LogSelect(RefundDue),
    ReadLog(RefundDue, u8),
    ProofSelect(RefundDue),
    ProofInit(RefundDue),
    AwaitProofAnswer(RefundDue),
    CreditSelect(RefundDue),
    CreditRoom(RefundDue),
    CreditInit(RefundDue),
    AwaitCommand(RefundDue),
    AwaitCredit(RefundDue, CreditCommand),
    AwaitReceipt(RefundDue, CreditResponse),
    Over,
}

/// One check of the refunds due to one card.
pub struct Refund {
    card_id: u64,
    today: Date,
    state: State,
    queue: VecDeque<RefundDue>,
    credited: Vec<String>,
}

fn data(reply: Result<CardReply, CardFailure>) -> Result<(Vec<u8>, Vec<u8>), String> {
    let r = reply.map_err(|e| e.to_string())?;
    match split_sw(&r.response) {
        Some((d, sw)) if sw.is_ok() => Ok((d.to_vec(), r.atr)),
        Some((_, sw)) => Err(format!("the card refused: {sw}")),
        None => Err("the card answered without a status word".into()),
    }
}

impl Refund {
    /// Starts a check for the card `card_id` (as read from the reader) on `today`.
    #[must_use]
    pub fn start(card_id: u64, today: Date) -> (Self, Vec<Action>) {
        let flow = Self {
            card_id,
            today,
            state: State::AwaitDue,
            queue: VecDeque::new(),
            credited: Vec::new(),
        };
        (
            flow,
            vec![Action::Send(Message::RefundsDueRequest { card_id })],
        )
    }

    /// The refund being run, once one is.
    #[must_use]
    pub fn transaction_id(&self) -> Option<&str> {
        match &self.state {
            State::AwaitDue | State::Over => None,
            State::LogSelect(d)
            | State::ReadLog(d, _)
            | State::ProofSelect(d)
            | State::ProofInit(d)
            | State::AwaitProofAnswer(d)
            | State::CreditSelect(d)
            | State::CreditRoom(d)
            | State::CreditInit(d)
            | State::AwaitCommand(d)
            | State::AwaitCredit(d, _)
            | State::AwaitReceipt(d, _) => Some(&d.transaction_id),
        }
    }

    /// From INITIALIZE FOR CREDIT to CREDIT the card is this flow's alone.
    #[must_use]
    pub fn card_sequence_open(&self) -> bool {
        matches!(
            self.state,
            State::CreditSelect(_)
                | State::CreditRoom(_)
                | State::CreditInit(_)
                | State::AwaitCommand(_)
                | State::AwaitCredit(..)
        )
    }

    /// Whether the card is in use by the flow (a pull then stops it).
    #[must_use]
    pub fn holds_card(&self) -> bool {
        !matches!(self.state, State::AwaitDue | State::Over)
    }

    fn stop(&mut self, why: impl Into<String>) -> Vec<Action> {
        let transaction_id = self.transaction_id().map(str::to_string);
        self.stop_at(transaction_id, why.into())
    }

    fn stop_with(&mut self, d: RefundDue, why: String) -> Vec<Action> {
        self.stop_at(Some(d.transaction_id), why)
    }

    fn stop_at(&mut self, transaction_id: Option<String>, why: String) -> Vec<Action> {
        tracing::warn!(transaction_id, why, "refund stopped; it stays due");
        self.state = State::Over;
        let mut out = Vec::new();
        // The TV was showing a refund under way: it says why it stopped.
        if transaction_id.is_some() {
            out.push(Action::Show(Show::Refused(Refusal::RefundNotNow {
                why: why.clone(),
            })));
        }
        out.push(Action::Done(Outcome::Stopped {
            credited: std::mem::take(&mut self.credited),
            transaction_id,
            why,
        }));
        out
    }

    /// The next refund due, or the end.
    fn next(&mut self) -> Vec<Action> {
        let Some(due) = self.queue.pop_front() else {
            self.state = State::Over;
            return vec![Action::Done(Outcome::Done {
                credited: std::mem::take(&mut self.credited),
            })];
        };
        if due.amount.currency == Currency::POINTS {
            // The card's CREDIT refunds its money purse only; the head end lists none else.
            return self.stop_with(due, "a refund in points: the card cannot take it".into());
        }
        let mut out = vec![Action::Show(Show::Progress(Progress::ReadingCard))];
        if due.issued.is_some() {
            self.state = State::LogSelect(due);
        } else {
            self.state = State::CreditSelect(due);
        }
        out.push(Action::Apdu(commands::select()));
        out
    }

    /// Feeds one input; the actions to execute next, in order.
    pub fn handle(&mut self, input: Input) -> Vec<Action> {
        let state = std::mem::replace(&mut self.state, State::Over);
        match (state, input) {
            (State::Over, _) => Vec::new(),
            (s, Input::CardRemoved) => {
                self.state = s;
                self.stop("the card was pulled")
            }
            (s, Input::NetworkFailed(e)) => {
                self.state = s;
                self.stop(format!("the head end did not answer: {e}"))
            }
            (State::AwaitDue, Input::Answer(Message::RefundsDue(list))) => {
                self.queue = list.into_iter().collect();
                self.next()
            }
            (State::LogSelect(d), Input::Card(r)) => match data(r) {
                Ok(_) => {
                    self.state = State::ReadLog(d, 1);
                    vec![Action::Apdu(commands::read_log(1))]
                }
                Err(e) => self.stop_with(d, e),
            },
            (State::ReadLog(d, n), Input::Card(r)) => {
                let cmd = d
                    .issued
                    .clone()
                    .expect("only an issued refund reads the log");
                let found = data(r)
                    .ok()
                    .and_then(|(b, _)| LogRecord::decode(&b).ok())
                    .map(|rec| {
                        (rec.kind == LogKind::Credit
                            && rec.counterparty == cmd.0.security_card_id
                            && rec.counterparty_txn == cmd.0.security_card_txn)
                            .then(|| rec.credit_response(self.card_id))
                            .flatten()
                    });
                match found {
                    // The card ran it: its signed answer completes the refund.
                    Some(Some(response)) => self.send_response(d, response),
                    // Another record: read the next one.
                    Some(None) if (n as usize) < LOG_CAPACITY => {
                        self.state = State::ReadLog(d, n + 1);
                        vec![Action::Apdu(commands::read_log(n + 1))]
                    }
                    // The log holds no answer to it: prove the card never ran it.
                    _ => {
                        self.state = State::ProofSelect(d);
                        vec![Action::Apdu(commands::select())]
                    }
                }
            }
            (State::ProofSelect(d), Input::Card(r)) => match data(r) {
                Ok(_) => {
                    self.state = State::ProofInit(d);
                    vec![Action::Apdu(commands::init_purchase_proof(self.today))]
                }
                Err(e) => self.stop_with(d, e),
            },
            (State::ProofInit(d), Input::Card(r)) => {
                match data(r).and_then(|(b, _)| {
                    PurchaseInit::decode(&b).map_err(|e| format!("INITIALIZE answer: {e}"))
                }) {
                    Ok(proof) => {
                        let msg = Message::RefundProof(RefundProofMsg {
                            transaction_id: d.transaction_id.clone(),
                            proof,
                        });
                        self.state = State::AwaitProofAnswer(d);
                        vec![
                            Action::Show(Show::Progress(Progress::ContactingServer)),
                            Action::Send(msg),
                        ]
                    }
                    Err(e) => self.stop_with(d, e),
                }
            }
            (State::AwaitProofAnswer(mut d), Input::Answer(Message::Receipt(r))) => {
                if r.released {
                    // The card's INITIALIZE named the credit session: it was credited.
                    let balance = Money::new(r.new_balance.unwrap_or_default(), d.amount.currency);
                    return self.credited(d, balance);
                }
                // Counted back: due afresh.
                d.issued = None;
                self.state = State::CreditSelect(d);
                vec![Action::Apdu(commands::select())]
            }
            (State::CreditSelect(d), Input::Card(r)) => match data(r) {
                Ok(_) => {
                    self.state = State::CreditRoom(d);
                    vec![Action::Apdu(commands::read_purse())]
                }
                Err(e) => self.stop_with(d, e),
            },
            // A card without room for the refund would refuse CREDIT after the security
            // card issued it: not asked for until there is room.
            (State::CreditRoom(d), Input::Card(r)) => {
                match data(r).and_then(|(b, _)| {
                    PurseInfo::decode(&b).map_err(|e| format!("READ PURSE answer: {e}"))
                }) {
                    Ok(p) if p.balance.saturating_add(d.amount.minor) > p.max_balance => {
                        let why = format!(
                            "the card has no room for it: {} on it, at most {}",
                            Money::new(p.balance, p.currency),
                            Money::new(p.max_balance, p.currency)
                        );
                        self.stop_with(d, why)
                    }
                    Ok(_) => {
                        self.state = State::CreditInit(d);
                        vec![Action::Apdu(commands::init_credit(self.today))]
                    }
                    Err(e) => self.stop_with(d, e),
                }
            }
            (State::CreditInit(d), Input::Card(r)) => {
                match data(r).and_then(|(b, atr)| {
                    PurchaseInit::decode(&b)
                        .map(|i| (i, atr))
                        .map_err(|e| format!("INITIALIZE FOR CREDIT answer: {e}"))
                }) {
                    Ok((init, atr)) if init.card_id == self.card_id => {
                        let msg = Message::RefundRequest(RefundRequest {
                            transaction_id: d.transaction_id.clone(),
                            atr,
                            init,
                        });
                        self.state = State::AwaitCommand(d);
                        vec![
                            Action::Show(Show::Progress(Progress::ContactingServer)),
                            Action::Send(msg),
                        ]
                    }
                    Ok(_) => self.stop_with(d, "another card is in the reader".into()),
                    Err(e) => self.stop_with(d, e),
                }
            }
            (State::AwaitCommand(d), Input::Answer(Message::RefundCommand(c))) => {
                let cmd = c.command;
                let card_ok = cmd.0.card_id == self.card_id;
                let amount_ok = cmd.0.amount_money() == d.amount;
                if c.transaction_id != d.transaction_id || !card_ok || !amount_ok {
                    return self.stop_with(
                        d,
                        format!(
                            "the credit command is for card {:X}, {}: not this refund",
                            cmd.0.card_id,
                            cmd.0.amount_money()
                        ),
                    );
                }
                self.state = State::AwaitCredit(d, cmd.clone());
                vec![
                    Action::Show(Show::Progress(Progress::LoadingCard)),
                    Action::Apdu(commands::credit(&cmd)),
                ]
            }
            (State::AwaitCredit(d, cmd), Input::Card(r)) => match data(r).and_then(|(b, _)| {
                CreditResponse::decode(&b)
                    .map_err(|e| format!("CREDIT answer: {e}"))
                    .and_then(|resp| {
                        if resp.0.answers(&cmd.0) {
                            Ok(resp)
                        } else {
                            Err("the card's CREDIT answer does not answer the command".into())
                        }
                    })
            }) {
                Ok(response) => self.send_response(d, response),
                // Credited or not, the head end keeps the command out; the next check
                // finds the answer in the card's log, or proves it was not run.
                Err(e) => self.stop_with(d, e),
            },
            (State::AwaitReceipt(d, response), Input::Answer(Message::Receipt(r)))
                if r.released =>
            {
                let balance = Money::new(response.0.new_balance, response.0.currency);
                self.credited(d, balance)
            }
            (s, Input::Answer(Message::Error(e))) => {
                self.state = s;
                self.stop(format!("refused ({:?}): {}", e.code, e.reason))
            }
            (s, Input::Answer(other)) => {
                self.state = s;
                self.stop(format!("out of turn: {}", other.kind()))
            }
            (s, Input::Card(_)) => {
                self.state = s;
                self.stop("a card reply out of turn")
            }
        }
    }

    /// Refund `d` is credited, the card's balance now `balance_after`: the receipt, then
    /// the next refund due.
    fn credited(&mut self, d: RefundDue, balance_after: Money) -> Vec<Action> {
        self.credited.push(d.transaction_id.clone());
        let shown = ReceiptShown {
            transaction_id: d.transaction_id.clone(),
            what: Receipted::Refund {
                merchant: d.merchant_id.clone(),
            },
            amount: d.amount,
            balance_after,
            date: self.today,
        };
        let mut out = vec![Action::Show(Show::Receipt(shown))];
        out.extend(self.next());
        out
    }

    fn send_response(&mut self, d: RefundDue, response: CreditResponse) -> Vec<Action> {
        let msg = Message::RefundResponse(RefundResponseMsg {
            transaction_id: d.transaction_id.clone(),
            response: response.clone(),
        });
        self.state = State::AwaitReceipt(d, response);
        vec![
            Action::Show(Show::Progress(Progress::Confirming)),
            Action::Send(msg),
        ]
    }
}

#[cfg(test)]
mod tests;
