//! Card to card across two boxes (issue 18; seed 004 FIG. 4): the payee's and the payer's
//! box flows, sans-IO, over the gateway's transfer mailbox (`headend::gateway::transfer`).
//! The packets are the cards' own ([`proto::transfer`]); a box only carries them.
//!
//! - **Receive** (the payee's box): SELECT, READ PURSE (the currency), RECEIVE (card id,
//!   epochs, challenge; the card keeps the challenge across power loss);
//!   `TransferInvite` → the code for the TV; wait for P1; P1 on the card (it now waits for
//!   P4, across power loss); post P2 P3; wait for P4; P4 on the card (credited) and post
//!   its receipt.
//! - **Send** (the payer's box): `TransferJoin` with the code → the terms, which the viewer
//!   confirms; SELECT, VERIFY if a PIN was given, SEND (P1); post P1; wait for P2 P3; P2 P3
//!   on the card (debited, the card keeps P4 and the transfer until it is settled); post
//!   P4; wait for the payee's settlement; RESOLVE on the card (a receipt settles it, a
//!   cancellation credits the payer back).
//!
//! A post that fails is posted again with the same bytes (the mailbox takes a repeat); a
//! packet not there yet is fetched again after [`POLL`]. What a box or gateway crash leaves
//! is settled from the two cards' STATUS ([`proto::transfer::next_settle_step`]).

use std::time::Duration;

use proto::apdu::StatusWord;
use proto::card::commands;
use proto::card::transfer::commands as xfer;
use proto::messages::{
    ErrorCode, Message, TransferInvite, TransferPacket, TransferStep, TransferTerms,
};
use proto::money::Money;
use proto::purse::{Date, PurseInfo};
use proto::secret::Secret;
use proto::transfer::{Settled, Settlement, TransferStatus};

/// How long a box waits before fetching a packet that has not come.
pub const POLL: Duration = Duration::from_millis(200);

/// How many times in a row a box asks again (a packet that has not come, a gateway that
/// does not answer) before it gives up: ten minutes at [`POLL`]. A payee whose card
/// answered P1 then cancels on its card; a debited payer stops asking, its card keeping
/// the transfer until it is settled.
pub const MAX_POLLS: u32 = 3_000;

/// How many times in a row a resumed payee asks for P4 before it cancels on its card: ten
/// seconds at [`POLL`]. A payer that was debited posts P4 at once; one that was not will not
/// be (its box may never have seen this box's P2 P3), and the payee's card must not wait
/// for it.
pub const RESUME_POLLS: u32 = 50;

/// Where a transfer stands in the box's journal (the text on disk never changes for a
/// variant). A transfer the box did not see through is resumed ([`Transfer::resume`]) while
/// it is [`JournalState::Committing`] or [`JournalState::Committed`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JournalState {
    /// `transfer_started`: the flow began; its card has not committed (nothing moves).
    Started,
    /// `transfer_committing`: P1 (payee) or P2 P3 (payer) may have reached the card.
    Committing,
    /// `transfer_committed`: the card committed and its STATUS named R2 (journaled).
    Committed,
    /// `transfer_over`: done, refused, or settled by a resumed flow.
    Over,
    /// `transfer_disputed`: the payee's settlement did not verify on the payer's card
    /// ([`Transfer::disputed`]); never resumed by the box, for the issuer to settle.
    Disputed,
}

impl JournalState {
    pub const ALL: [JournalState; 5] = [
        JournalState::Started,
        JournalState::Committing,
        JournalState::Committed,
        JournalState::Over,
        JournalState::Disputed,
    ];
    /// What a box resumes.
    pub const IN_DOUBT: [JournalState; 2] = [JournalState::Committing, JournalState::Committed];

    /// The text on disk.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            JournalState::Started => "transfer_started",
            JournalState::Committing => "transfer_committing",
            JournalState::Committed => "transfer_committed",
            JournalState::Over => "transfer_over",
            JournalState::Disputed => "transfer_disputed",
        }
    }

    /// The state a text on disk names.
    #[must_use]
    pub fn from_text(t: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == t)
    }
}

/// A transfer as the box's journal keeps it: what [`Transfer::resume`] needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Journaled {
    pub transfer_id: String,
    pub sending: bool,
    pub card_id: u64,
    pub amount: Money,
    /// The payee's card (payer only).
    pub to_card: Option<u64>,
    pub random: Option<[u8; 8]>,
    pub state: JournalState,
}

/// What the shell does next; the result comes back through [`Transfer::card`],
/// [`Transfer::answer`] or [`Transfer::failed`].
#[derive(Debug, Clone, PartialEq)]
// One at a time, consumed at once: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Next {
    /// Send this APDU to the card.
    Apdu(Vec<u8>),
    /// Send this message to the gateway (after waiting this long).
    Send(Message, Duration),
    /// Payee: tell the viewer this code for the sender; then [`Transfer::go_on`].
    ShowCode(String),
    /// Payer: ask the viewer to confirm these terms; then [`Transfer::go_on`] (or drop the
    /// flow: nothing happened yet).
    Confirm(TransferTerms),
    /// Payer: the card wants its PIN for this amount (seed 004); then [`Transfer::pin`]
    /// (or [`Transfer::cancel`]: nothing moved).
    NeedsPin { min: u8, max: u8 },
    /// Over: the card moved this value (sent, received, or credited back).
    Done(Outcome),
    /// Over without moving value.
    Refused(String),
}

/// How a transfer ended, for the receipt screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The payee's card was credited (its passbook names the payer's card).
    Received { amount: Money },
    /// The payee's viewer cancelled after the payer's card answered P1: the payee's card
    /// signed its cancellation, which credits the payer back if it was debited.
    Declined { amount: Money },
    /// The payer's card was debited and the payee's credited.
    Sent { amount: Money, to_card: u64 },
    /// The payer's card was debited, the payee cancelled: credited back.
    Returned { amount: Money, to_card: u64 },
}

#[derive(Debug, Clone, PartialEq)]
enum State {
    // Payee.
    Select,
    ReadPurse,
    Receive,
    Invite,
    Code,
    WaitP1,
    Packet1,
    PostP23,
    WaitP4,
    Packet4,
    PostReceipt,
    /// The viewer cancelled before the card answered P1: the withdrawal is posted.
    PostWithdrawn,
    /// The viewer cancelled: STATUS, CANCEL, post the cancellation.
    CancelStatus,
    CancelCard,
    PostCancel,
    // Payer.
    Join,
    Confirm,
    /// The card answered SEND with "PIN required": the viewer is asked.
    AwaitPin,
    PayerSelect,
    Verify,
    SendCmd,
    PostP1,
    WaitP23,
    Packets23,
    PostP4,
    WaitSettlement,
    Resolve {
        kind: Settled,
    },
    /// The card committed (answered P1, or was debited): its STATUS names R2, which the
    /// box journals before it posts the card's answer (`step`, `data`).
    NoteR2 {
        step: TransferStep,
        data: Vec<u8>,
    },
    /// A box restarted (or the card came back) with this transfer journaled as committed:
    /// SELECT, then STATUS says what the card still waits for.
    ResumeSelect,
    ResumeStatus,
    Over,
}

/// One transfer, as one of its two boxes runs it.
pub struct Transfer {
    transfer_id: String,
    today: Date,
    /// Payee: what to receive; payer: learnt from the terms.
    amount: Option<Money>,
    code: Option<String>,
    pin: Option<Secret<String>>,
    terms: Option<TransferTerms>,
    /// Payer: the payee's card, from the terms (or the card's STATUS on resuming).
    to_card: Option<u64>,
    /// The transfer's R2 (the payer card's random, sealed in P1), as the card's STATUS
    /// names it once the card committed: what the box journals, and what a resumed flow
    /// asks the card about.
    random: Option<[u8; 8]>,
    /// Whether this box sends (the payer) or receives.
    sending: bool,
    /// See [`Transfer::pending`].
    pending: bool,
    /// Resumed: the card waits for nothing and was asked for its word on R2.
    asked_word: bool,
    /// See [`Transfer::disputed`].
    disputed: bool,
    /// Asks in a row before giving up ([`MAX_POLLS`]; fewer for a resumed payee).
    max_polls: u32,
    /// The last post, to repeat after a failure.
    post: Option<Message>,
    /// Asked again in a row ([`MAX_POLLS`]).
    polls: u32,
    state: State,
}

impl Transfer {
    /// The payee's flow: receive `amount` under `transfer_id` (unique per box; the box's
    /// journal names it).
    pub fn receive(transfer_id: String, amount: Money, today: Date) -> Self {
        Self::new(transfer_id, today, Some(amount), None, State::Select)
    }

    /// The payer's flow: send what the transfer with `code` asks, with the card's PIN if
    /// the viewer gave it.
    pub fn send(code: String, pin: Option<Secret<String>>, today: Date) -> Self {
        let mut t = Self::new(String::new(), today, None, Some(code), State::Join);
        t.pin = pin;
        t.sending = true;
        t
    }

    /// A transfer the box journaled as committing (P1 went to the payee's card, or P2 P3
    /// to the payer's) and did not see through — the box restarted, or the card was
    /// pulled. `random` is R2 if the box journaled it (the card's STATUS after it
    /// committed); without it, the card's one pending transfer of this amount (and, for a
    /// payer, to this card) is taken for it. [`Transfer::start`] asks the card's STATUS;
    /// then:
    ///
    /// - a payee card still waiting for R2's P4 fetches it again (and cancels after
    ///   [`MAX_POLLS`]); one that is not asks the card for its word on R2 (CANCEL answers
    ///   the receipt or cancellation it remembers) and posts it;
    /// - a payer card with R2 sent and unsettled posts its P4 again and waits for the
    ///   payee's settlement; one without was never debited (or is settled): over.
    pub fn resume(
        transfer_id: String,
        sending: bool,
        random: Option<[u8; 8]>,
        amount: Money,
        to_card: Option<u64>,
        today: Date,
    ) -> Self {
        let mut t = Self::new(transfer_id, today, Some(amount), None, State::ResumeSelect);
        t.sending = sending;
        t.random = random;
        t.to_card = to_card;
        t.pending = true;
        if !sending {
            // The box does not know whether its P2 P3 reached the mailbox before it
            // stopped: a P4 that does not come soon is not coming, and the card cancels.
            t.max_polls = RESUME_POLLS;
        }
        t
    }

    /// Whether this box is the payer.
    pub fn sending(&self) -> bool {
        self.sending
    }

    /// The amount, once known (the payer learns it from the terms).
    pub fn amount(&self) -> Option<Money> {
        self.amount
    }

    /// The payee's card, for a payer once it has the terms.
    pub fn to_card(&self) -> Option<u64> {
        self.to_card
    }

    /// Whether the APDU the flow just asked for commits the card to the transfer — P1 to
    /// the payee's card (it then waits for P4 across power loss) or P2 P3 to the payer's
    /// (the debit): the box journals that before it sends the APDU.
    pub fn committing(&self) -> bool {
        matches!(self.state, State::Packet1 | State::Packets23)
    }

    fn done(&mut self, outcome: Outcome) -> Next {
        self.state = State::Over;
        self.pending = false;
        Next::Done(outcome)
    }

    /// R2, once the committed card's STATUS named it (the box journals it before the
    /// flow's next post).
    pub fn random(&self) -> Option<[u8; 8]> {
        self.random
    }

    /// The box cannot go on (the card did not answer, the journal could not be written):
    /// the flow stops. What a committed card still waits for ([`Transfer::pending`]) is
    /// settled by [`Transfer::resume`] later.
    pub fn stop(&mut self, why: impl Into<String>) -> Next {
        // The committing command went out and its answer did not come back: the card may
        // have committed (answered P1, or been debited).
        if self.committing() {
            self.pending = true;
        }
        self.refuse(why)
    }

    /// Whether the payee's settlement did not verify on the payer's card (RESOLVE refused):
    /// the card counted a bad key and keeps the transfer unsettled; the box must not try
    /// it again by itself (each try would count another), so it journals the transfer as
    /// disputed, for the issuer.
    pub fn disputed(&self) -> bool {
        self.disputed
    }

    /// Whether the card may still wait for this transfer to be settled: it committed (or a
    /// resumed flow found it pending) and this flow did not settle it. A flow that ends
    /// so leaves the box's journal as it is, for [`Transfer::resume`].
    pub fn pending(&self) -> bool {
        self.pending
    }

    fn new(
        transfer_id: String,
        today: Date,
        amount: Option<Money>,
        code: Option<String>,
        state: State,
    ) -> Self {
        Self {
            transfer_id,
            today,
            amount,
            code,
            pin: None,
            terms: None,
            to_card: None,
            random: None,
            sending: false,
            pending: false,
            asked_word: false,
            disputed: false,
            max_polls: MAX_POLLS,
            post: None,
            polls: 0,
            state,
        }
    }

    /// The transfer's id (the payer learns it from the terms).
    pub fn transfer_id(&self) -> &str {
        &self.transfer_id
    }

    /// The first step.
    pub fn start(&mut self) -> Next {
        match self.state {
            State::Select => Next::Apdu(commands::select()),
            State::ResumeSelect => Next::Apdu(commands::select()),
            State::Join => {
                let join = Message::TransferJoin {
                    code: self.code.clone().unwrap_or_default(),
                };
                self.post = Some(join.clone());
                Next::Send(join, Duration::ZERO)
            }
            _ => self.refuse("started twice"),
        }
    }

    fn refuse(&mut self, why: impl Into<String>) -> Next {
        self.state = State::Over;
        Next::Refused(why.into())
    }

    fn posting(&mut self, step: TransferStep, data: Vec<u8>) -> Next {
        let m = Message::TransferPost(TransferPacket {
            transfer_id: self.transfer_id.clone(),
            step,
            data,
        });
        self.post = Some(m.clone());
        Next::Send(m, Duration::ZERO)
    }

    fn fetch(&mut self, step: TransferStep, wait: Duration) -> Next {
        if wait.is_zero() {
            self.polls = 0;
        } else if let Some(gave_up) = self.count_poll() {
            return gave_up;
        }
        Next::Send(
            Message::TransferFetch {
                transfer_id: self.transfer_id.clone(),
                step,
            },
            wait,
        )
    }

    /// The card's PIN, which the viewer typed after [`Next::NeedsPin`]: VERIFY, then SEND
    /// again (the card stays selected, so the verification holds for that SEND).
    pub fn pin(&mut self, pin: Secret<String>) -> Next {
        if self.state != State::AwaitPin {
            return self.refuse("no PIN was asked");
        }
        match commands::verify_pin(pin.expose()) {
            Some(v) => {
                self.pin = Some(pin);
                self.state = State::Verify;
                Next::Apdu(v)
            }
            None => self.refuse("a PIN is 4 to 12 digits"),
        }
    }

    /// Whether the flow waits for the card's PIN.
    pub fn awaiting_pin(&self) -> bool {
        self.state == State::AwaitPin
    }

    /// The viewer saw the code (payee) or confirmed the terms (payer).
    pub fn go_on(&mut self) -> Next {
        match self.state {
            State::Code => {
                self.state = State::WaitP1;
                self.fetch(TransferStep::P1, Duration::ZERO)
            }
            State::Confirm => {
                self.state = State::PayerSelect;
                Next::Apdu(commands::select())
            }
            _ => self.refuse("nothing to go on with"),
        }
    }

    /// The card's answer to the last APDU.
    pub fn card(&mut self, response: &[u8]) -> Next {
        let Some((data, sw)) = crate::split_sw(response) else {
            return self.refuse("the card answered without a status word");
        };
        let data = data.to_vec();
        if !sw.is_ok() && self.state == State::Packet4 {
            // The card cannot take this P4 (over its maximum after a load, blocked, a P4
            // that is not its): it cancels, so the payer is credited back.
            tracing::info!(sw = ?sw, "the card refused P4; cancelling the transfer");
            self.state = State::CancelStatus;
            return Next::Apdu(xfer::status());
        }
        if sw == StatusWord::PIN_REQUIRED && self.state == State::SendCmd && self.pin.is_none() {
            self.state = State::AwaitPin;
            return Next::NeedsPin {
                min: crate::load::PIN_MIN,
                max: crate::load::PIN_MAX,
            };
        }
        if !sw.is_ok() {
            if matches!(self.state, State::Resolve { .. }) {
                self.disputed = true;
                self.state = State::Over;
                return Next::Refused(format!(
                    "the receiver's settlement does not verify on the card ({sw:?}): the card keeps the transfer for the issuer to settle"
                ));
            }
            if self.asked_word {
                // Resumed, nothing pending, and the card does not remember R2: nothing
                // left to settle from this card.
                self.pending = false;
            }
            return self.card_refused(sw);
        }
        if self.committing() {
            self.pending = true;
        }
        let amount = self.amount_or_zero();
        match std::mem::replace(&mut self.state, State::Over) {
            State::Select => {
                self.state = State::ReadPurse;
                Next::Apdu(commands::read_purse())
            }
            State::ReadPurse => match PurseInfo::decode(&data) {
                Ok(info) if info.currency == amount.currency => {
                    self.state = State::Receive;
                    Next::Apdu(xfer::receive(self.today, amount.minor, amount.currency))
                }
                Ok(info) => self.refuse(format!(
                    "the card holds {:?}, the transfer is in {:?}",
                    info.currency, amount.currency
                )),
                Err(_) => self.refuse("the card's purse did not decode"),
            },
            State::Receive => {
                let card = data.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok());
                let epochs = data.get(8..12).and_then(|b| <[u8; 4]>::try_from(b).ok());
                let challenge = data.get(12..20).and_then(|b| <[u8; 8]>::try_from(b).ok());
                match (card, epochs, challenge, data.len()) {
                    (Some(card), Some(epochs), Some(challenge), 20) => {
                        self.state = State::Invite;
                        let invite = Message::TransferInvite(TransferInvite {
                            transfer_id: self.transfer_id.clone(),
                            amount,
                            payee_card: u64::from_be_bytes(card),
                            payee_epochs: epochs,
                            payee_challenge: challenge,
                        });
                        self.post = Some(invite.clone());
                        Next::Send(invite, Duration::ZERO)
                    }
                    _ => self.refuse("the card's RECEIVE answer did not decode"),
                }
            }
            State::Packet1 => {
                self.state = State::NoteR2 {
                    step: TransferStep::P23,
                    data,
                };
                Next::Apdu(xfer::status())
            }
            State::NoteR2 { step, data: post } => {
                if let Ok(st) = TransferStatus::decode(&data) {
                    self.random = if self.sending {
                        st.sent.map(|s| s.random)
                    } else {
                        st.receiving.map(|r| r.random)
                    };
                }
                self.state = match step {
                    TransferStep::P23 => State::PostP23,
                    _ => State::PostP4,
                };
                self.posting(step, post)
            }
            State::Packet4 => match Settlement::decode(&data) {
                Ok(_) => {
                    self.state = State::PostReceipt;
                    self.posting(TransferStep::Settlement, data)
                }
                Err(_) => self.refuse("the card's receipt did not decode"),
            },
            State::PayerSelect => match &self.pin {
                Some(pin) => match commands::verify_pin(pin.expose()) {
                    Some(v) => {
                        self.state = State::Verify;
                        Next::Apdu(v)
                    }
                    None => self.refuse("a PIN is 4 to 12 digits"),
                },
                None => self.send_cmd(),
            },
            State::Verify => self.send_cmd(),
            State::SendCmd => {
                self.state = State::PostP1;
                self.posting(TransferStep::P1, data)
            }
            State::Packets23 => {
                self.state = State::NoteR2 {
                    step: TransferStep::P4,
                    data,
                };
                Next::Apdu(xfer::status())
            }
            State::CancelStatus => match TransferStatus::decode(&data) {
                Ok(TransferStatus {
                    receiving: Some(r), ..
                }) => {
                    self.state = State::CancelCard;
                    Next::Apdu(xfer::cancel(r.random))
                }
                // Credited meanwhile: the word to post is the receipt it kept.
                Ok(_) => self.refuse("nothing to cancel: the card waits for no transfer"),
                Err(_) => self.refuse("the card's STATUS did not decode"),
            },
            // The card's word on R2: a cancellation, or (resumed) the receipt it kept.
            State::CancelCard => match Settlement::decode(&data) {
                Ok(s) => {
                    self.state = match s.kind {
                        Settled::Cancelled => State::PostCancel,
                        Settled::Credited => State::PostReceipt,
                    };
                    self.posting(TransferStep::Settlement, data)
                }
                Err(_) => self.refuse("the card's cancellation did not decode"),
            },
            State::ResumeSelect => {
                self.state = State::ResumeStatus;
                Next::Apdu(xfer::status())
            }
            State::ResumeStatus => self.resumed(&data),
            State::Resolve { kind } => {
                self.state = State::Over;
                let to_card = self.to_card.unwrap_or_default();
                self.done(match kind {
                    Settled::Credited => Outcome::Sent { amount, to_card },
                    Settled::Cancelled => Outcome::Returned { amount, to_card },
                })
            }
            other => {
                self.state = other;
                self.refuse("a card answer out of turn")
            }
        }
    }

    /// The card's STATUS for a resumed transfer (see [`Transfer::resume`]).
    fn resumed(&mut self, data: &[u8]) -> Next {
        let Ok(st) = TransferStatus::decode(data) else {
            return self.refuse("the card's STATUS did not decode");
        };
        let amount = self.amount_or_zero();
        let r2 = self.random;
        if self.sending {
            let to_card = self.to_card;
            let ours = |s: &proto::transfer::Sent| match r2 {
                Some(r2) => s.random == r2,
                None => {
                    (s.amount, s.currency) == (amount.minor, amount.currency)
                        && Some(s.payee) == to_card
                }
            };
            match st.sent.filter(ours) {
                Some(s) => {
                    self.random = Some(s.random);
                    self.to_card = Some(s.payee);
                    self.amount = Some(Money::new(s.amount, s.currency));
                    self.state = State::PostP4;
                    self.posting(TransferStep::P4, s.p4)
                }
                None => {
                    self.pending = false;
                    self.refuse(
                        "the card has no unsettled transfer of this id: it was not debited, or it is settled",
                    )
                }
            }
        } else {
            let ours = |r: &proto::transfer::Receiving| match r2 {
                Some(r2) => r.random == r2,
                None => (r.amount, r.currency) == (amount.minor, amount.currency),
            };
            match st.receiving.filter(ours) {
                Some(r) => {
                    self.random = Some(r.random);
                    self.amount = Some(Money::new(r.amount, r.currency));
                    self.state = State::WaitP4;
                    self.fetch(TransferStep::P4, Duration::ZERO)
                }
                // Credited or cancelled already: the card's word goes to the payer.
                None => match r2 {
                    Some(r2) => {
                        self.asked_word = true;
                        self.state = State::CancelCard;
                        Next::Apdu(xfer::cancel(r2))
                    }
                    // Never journaled R2 and nothing pending: P1 never reached the card.
                    None => {
                        self.pending = false;
                        self.refuse("the card waits for no transfer of this id; nothing moved")
                    }
                },
            }
        }
    }

    fn send_cmd(&mut self) -> Next {
        let Some(t) = &self.terms else {
            return self.refuse("no terms");
        };
        let i = &t.invite;
        let apdu = xfer::send(
            self.today,
            i.amount.minor,
            i.amount.currency,
            i.payee_card,
            i.payee_epochs,
            i.payee_challenge,
        );
        self.state = State::SendCmd;
        Next::Apdu(apdu)
    }

    fn card_refused(&mut self, sw: StatusWord) -> Next {
        let when = format!("{:?}", self.state);
        self.state = State::Over;
        Next::Refused(format!("the card refused ({when}): {sw:?}"))
    }

    /// The amount, once known: the payee's from the start, the payer's from the terms or
    /// the card's STATUS (the states that use it come after).
    fn amount_or_zero(&self) -> Money {
        self.amount
            .unwrap_or(Money::new(0, proto::money::Currency::EUR))
    }

    /// The gateway's answer to the last message.
    pub fn answer(&mut self, m: Message) -> Next {
        match (std::mem::replace(&mut self.state, State::Over), m) {
            (State::Invite, Message::TransferTerms(t))
                if t.invite.transfer_id == self.transfer_id =>
            {
                let code = t.code.clone();
                self.terms = Some(t);
                self.state = State::Code;
                Next::ShowCode(code)
            }
            (State::Join, Message::TransferTerms(t)) => {
                self.transfer_id = t.invite.transfer_id.clone();
                self.amount = Some(t.invite.amount);
                self.to_card = Some(t.invite.payee_card);
                self.terms = Some(t.clone());
                self.state = State::Confirm;
                Next::Confirm(t)
            }
            (
                state @ (State::WaitP1 | State::WaitP4 | State::WaitP23 | State::WaitSettlement),
                Message::TransferPacket(p),
            ) if p.transfer_id == self.transfer_id => match (state, p.step) {
                (State::WaitP1, TransferStep::P1) => {
                    self.state = State::Packet1;
                    Next::Apdu(xfer::packet1(&p.data))
                }
                (State::WaitP4, TransferStep::P4) => {
                    self.state = State::Packet4;
                    Next::Apdu(xfer::packet4(self.today, &p.data))
                }
                (State::WaitP23, TransferStep::P23) => {
                    self.state = State::Packets23;
                    Next::Apdu(xfer::packets23(&p.data))
                }
                (State::WaitSettlement, TransferStep::Settlement) => {
                    match Settlement::decode(&p.data) {
                        Ok(s) => {
                            self.state = State::Resolve { kind: s.kind };
                            Next::Apdu(xfer::resolve(self.today, &s))
                        }
                        Err(_) => self.refuse("the payee's settlement did not decode"),
                    }
                }
                (state, _) => {
                    self.state = state;
                    self.refuse("a packet of another step")
                }
            },
            // Not there yet: fetch again after a pause.
            (
                state @ (State::WaitP1 | State::WaitP4 | State::WaitP23 | State::WaitSettlement),
                Message::Error(e),
            ) if e.code == ErrorCode::Busy => {
                let step = match state {
                    State::WaitP1 => TransferStep::P1,
                    State::WaitP4 => TransferStep::P4,
                    State::WaitP23 => TransferStep::P23,
                    _ => TransferStep::Settlement,
                };
                self.state = state;
                self.fetch(step, POLL)
            }
            // Withdrawn, or not (the gateway unreachable): either way this card never
            // answered P1, so nothing can move.
            (State::PostWithdrawn, _) => self.refuse("cancelled; nothing moved"),
            (State::PostCancel, Message::Ack { .. }) => self.done(Outcome::Declined {
                amount: self.amount_or_zero(),
            }),
            (
                state @ (State::PostP23 | State::PostP1 | State::PostP4 | State::PostReceipt),
                Message::Ack { .. },
            ) => match state {
                State::PostP23 => {
                    self.state = State::WaitP4;
                    self.fetch(TransferStep::P4, Duration::ZERO)
                }
                State::PostP1 => {
                    self.state = State::WaitP23;
                    self.fetch(TransferStep::P23, Duration::ZERO)
                }
                State::PostP4 => {
                    self.state = State::WaitSettlement;
                    self.fetch(TransferStep::Settlement, Duration::ZERO)
                }
                _ => self.done(Outcome::Received {
                    amount: self.amount_or_zero(),
                }),
            },
            (state, m) => {
                let when = format!("{state:?}");
                if matches!(m, Message::Error(ref e) if matches!(e.code, ErrorCode::Busy | ErrorCode::Internal | ErrorCode::RateLimited))
                {
                    // The gateway could not answer now: the same message again, later.
                    self.state = state;
                    return self.failed();
                }
                match m {
                    Message::Error(e) => self.refuse(format!("{} ({when})", e.reason)),
                    m => self.refuse(format!("the gateway answered {} ({when})", m.kind())),
                }
            }
        }
    }

    /// One more ask in a row; past [`MAX_POLLS`], what giving up means here.
    fn count_poll(&mut self) -> Option<Next> {
        self.polls += 1;
        if self.polls <= self.max_polls {
            return None;
        }
        Some(match self.state {
            // The payee's card answered P1: it cancels, so the payer is credited back.
            State::PostP23 | State::WaitP4 => {
                self.polls = 0;
                self.state = State::CancelStatus;
                Next::Apdu(xfer::status())
            }
            // No sender came: the code is withdrawn so a late one is told.
            State::WaitP1 => {
                self.polls = 0;
                self.state = State::PostWithdrawn;
                self.posting(TransferStep::Withdrawn, vec![0])
            }
            State::PostP4 | State::WaitSettlement => self.refuse(
                "the other box did not settle in time; the card keeps the transfer until it is settled",
            ),
            _ => self.refuse("the other box or the gateway did not answer in time; nothing moved"),
        })
    }

    /// The viewer cancelled (between two steps). Before its card answered P1 nothing
    /// happened anywhere: over. A payee whose card answered P1 cancels on its card (STATUS,
    /// CANCEL) and posts the signed cancellation, so the payer is credited back if it was
    /// debited; if P4 came first the card says so and the flow goes on to post its receipt.
    /// A payer once debited cannot cancel: it waits on (the payee settles).
    pub fn cancel(&mut self) -> Next {
        match self.state {
            // The code is out: withdrawn at the gateway, so the payer's box is told.
            State::Code | State::WaitP1 => {
                self.state = State::PostWithdrawn;
                self.posting(TransferStep::Withdrawn, vec![0])
            }
            State::Select
            | State::ReadPurse
            | State::Receive
            | State::Invite
            | State::Join
            | State::Confirm
            | State::AwaitPin
            | State::PayerSelect
            | State::Verify
            | State::SendCmd
            | State::PostP1
            | State::WaitP23 => self.refuse("cancelled; nothing moved"),
            State::PostP23 | State::WaitP4 => {
                self.state = State::CancelStatus;
                Next::Apdu(xfer::status())
            }
            State::WaitSettlement => self.fetch(TransferStep::Settlement, POLL),
            _ => self.failed(),
        }
    }

    /// The last message got no answer (the gateway was unreachable or died): the same
    /// message again after a pause — a post with the same bytes, a fetch as it was.
    pub fn failed(&mut self) -> Next {
        match self.state.clone() {
            // Posts, the invite and the join are all idempotent: the same message again.
            State::PostP1
            | State::PostP23
            | State::PostP4
            | State::PostReceipt
            | State::PostCancel
            | State::Invite
            | State::Join => match (self.count_poll(), self.post.clone()) {
                (Some(gave_up), _) => gave_up,
                (None, Some(m)) => Next::Send(m, POLL),
                (None, None) => self.refuse("nothing to send again"),
            },
            State::PostWithdrawn => self.refuse("cancelled; nothing moved"),
            State::WaitP1 => self.fetch(TransferStep::P1, POLL),
            State::WaitP23 => self.fetch(TransferStep::P23, POLL),
            State::WaitP4 => self.fetch(TransferStep::P4, POLL),
            State::WaitSettlement => self.fetch(TransferStep::Settlement, POLL),
            _ => self.refuse("the gateway did not answer"),
        }
    }
}

#[cfg(test)]
mod tests;
