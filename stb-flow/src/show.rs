//! What the flows ask the TV to show: their own vocabulary, not wording.
//!
//! A flow says *what* happened ([`Show`], [`Refusal`], [`Doubt`]), with the facts a sentence
//! would need (amounts in minor units with their currency, dates, status words, the head
//! end's own reason). It never says *how*: every sentence the viewer reads is in the TV crate
//! (`ui/src/strings.rs`), and the daemon translates this vocabulary into UI updates in one
//! place (`stb::daemon::show`). So this crate needs no UI, and anything that drives the flows
//! (the daemon, a simulator, a test) gets the same typed answers.
//!
//! Text that comes from elsewhere is carried as it came: the head end's `reason`, a
//! merchant's receipt text. A card, network or journal failure is carried typed
//! ([`crate::failure`]); its text is the shell's. The daemon cleans all of it before it is
//! drawn.

use proto::apdu::StatusWord;
use proto::messages::ErrorCode;
use proto::money::{Currency, Money};
use proto::purse::Date;

use crate::failure::{CardFailure, JournalFailure, NetworkFailure};

/// Which kind of transaction a fact belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    /// A purchase (draw), 001 [0071]–[0094].
    Purchase,
    /// A load of value onto the card, 001 [0117]–[0160].
    Load,
    /// A refund credited to the card (issue 17).
    Refund,
}

/// One thing for the TV to show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Show {
    /// A step of the transaction is under way (a progress screen; "do not remove the card").
    Progress(Progress),
    /// The offer to confirm, after the card passed the 001 [0075] checks: OK accepts, BACK
    /// or the countdown declines.
    Offer(OfferShown),
    /// The offer with this transaction id is off (the card went): close its popup.
    OfferWithdrawn { transaction_id: String },
    /// The largest amount the viewer may load now (the load offer's maximum, 001 [0118],
    /// [0143]); opens the amount entry ([0120]).
    LoadMax(Money),
    /// A PIN of `min_len..=max_len` digits is needed: the bank's own check for a load from
    /// an account (not in the seed; the PIN goes sealed, see [`crate::load`]).
    /// Also the card's own PIN, for a purchase above its threshold (seed 004), with the
    /// tries the card has left.
    PinEntry {
        min_len: u8,
        max_len: u8,
        attempts_left: Option<u8>,
    },
    /// The transaction completed.
    Receipt(ReceiptShown),
    /// Paid, but the merchant did not release the goods; `text` is the merchant's receipt
    /// text, as it came.
    NotReleased { text: String },
    /// The load server confirmed that the card was not loaded (001 [0129]–[0132]); the hold
    /// on the account is released.
    NotLoaded,
    /// The flow stopped and no value moved.
    Refused(Refusal),
    /// Value may have moved; recovery settles it from the journal without the viewer.
    InDoubt(Doubt),
}

/// The named steps of a purchase or a load, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// SELECT, INITIALIZE (or READ PURSE) on the card.
    ReadingCard,
    /// A request is out to the head end (offer, draw, load offer, load request).
    ContactingServer,
    /// DEBIT is at the card.
    DebitingCard,
    /// LOAD is at the card (the load flow's counterpart of `DebitingCard`).
    LoadingCard,
    /// The card's answer is out to the head end (debit or load response).
    Confirming,
}

/// The offer popup's facts: what, from whom, the price and the card's balance before and
/// after (all [`Money`]: minor units with their currency).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OfferShown {
    /// Echoed back by the shell when the viewer answers; never drawn.
    pub transaction_id: String,
    /// The merchant's title for the item.
    pub item: String,
    /// The merchant's id.
    pub merchant: String,
    /// The offer's price.
    pub price: Money,
    /// The card's balance now (INITIALIZE FOR PURCHASE).
    pub balance: Money,
    /// The balance if the viewer accepts (checked ≥ 0 before, 001 [0075]).
    pub balance_after: Money,
}

/// A receipt's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptShown {
    /// The reference the viewer can quote.
    pub transaction_id: String,
    /// What it is for.
    pub what: Receipted,
    /// What the purchase cost or the load added.
    pub amount: Money,
    /// The card's balance afterwards (the head end's figure when it sent one).
    pub balance_after: Money,
    /// The card's date of the transaction.
    pub date: Date,
}

/// What a receipt is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Receipted {
    /// A purchase of `item` (the merchant's title) from `merchant` (its id).
    Purchase { item: String, merchant: String },
    /// A load from the viewer's bank account (001 [0117]).
    Bank { account: String },
    /// A load from a pre-funded voucher (001 [0141]). The code is the voucher's only secret:
    /// only its last characters are carried, for the TV to show after a mask.
    Voucher { code_tail: String },
    /// A refund from `merchant` (its id) credited to the card (issue 17).
    Refund { merchant: String },
    /// Value unloaded from the card to the viewer's bank account (issue 17).
    Unload { account: String },
}

/// What the flow had asked the head end when an answer came out of turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The offer request (001 [0071]).
    Offer,
    /// The draw request (001 [0077]).
    Draw,
    /// The load offer request (001 [0118], [0142]).
    LoadOffer,
}

/// A card answer that could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardAnswer {
    /// INITIALIZE FOR PURCHASE.
    Initialize,
    /// READ PURSE.
    ReadPurse,
    /// INITIALIZE FOR LOAD (the S1).
    InitializeForLoad,
    /// READ LOG (the passbook of a bank load).
    ReadLog,
}

/// Why a flow stopped with no value moved (or, for the shell's own refusals, never started).
/// Each variant carries the facts its sentence needs; [`Refusal::problem`] says which kind
/// of trouble it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    // ---- the head end
    /// No answer from the head end; `error` says what the transport saw.
    Unreachable { error: NetworkFailure },
    /// The merchant refused the offer request; `reason` is the head end's.
    OfferRefused { code: ErrorCode, reason: String },
    /// The head end answered `to` with another kind of message (`answer`, see
    /// [`proto::messages::Message::kind`]).
    OutOfTurn { to: Request, answer: &'static str },
    /// The offer has no transaction id or a zero price.
    UnusableOffer,
    /// The payment server refused the draw request (001 [0091]); nothing was debited.
    DrawRefused { code: ErrorCode, reason: String },
    /// The debit command could not be opened under the offer's TSK (FIG. 8, [0109]).
    DebitCommandUnreadable { error: String },
    /// 001 [0082]: the debit command asks for another amount than the offer's.
    AmountMismatch { asked: Money, offered: Money },
    /// The debit command is for another card or card transaction counter.
    DebitCommandMismatch,
    /// The load server refused the load offer request; `reason` is the head end's.
    LoadOfferRefused { code: ErrorCode, reason: String },
    /// The load offer has no transaction id or is for another source.
    UnusableLoadOffer,
    /// The account pays in another currency than the card holds.
    AccountCurrency { card: Currency, account: Currency },
    /// Nothing can be loaded now; `limited_by` is the load server's word for the limit.
    NothingToLoad { limited_by: String },
    /// The load request was refused for good ([`crate::load::is_final_refusal`]): nothing
    /// held, no load command issued.
    LoadRefused { code: ErrorCode, reason: String },

    // ---- the card
    /// The card gave no reply; `error` says what the reader saw (the card may be gone).
    CardUnreadable { error: CardFailure },
    /// The card was pulled while the flow needed it.
    CardRemoved,
    /// The card refused a command with this status word.
    CardRefused { sw: StatusWord },
    /// The card refused DEBIT; its debit is atomic, so nothing moved.
    DebitRefused { sw: StatusWord },
    /// The card answered without a status word.
    NoStatusWord,
    /// The card's answer could not be decoded.
    Malformed(CardAnswer),
    /// READ PURSE says the card is blocked.
    CardBlocked,
    /// 001 [0075]: the card holds another currency than the price.
    PriceCurrency { card: Currency, price: Currency },
    /// 001 [0075]: the card expired at the end of this month.
    CardExpired { year: u16, month: u8 },
    /// 001 [0075]: the balance is below the price.
    InsufficientValue { balance: Money, price: Money },
    /// Another card is in the reader than the one the offer was shown for.
    CardSwapped,
    /// The card's INITIALIZE FOR LOAD answer is for another card, amount or time stamp.
    LoadInitMismatch,

    // ---- the viewer's entry
    /// The load amount is zero, negative or above the offer's maximum. `got` is the amount
    /// typed, in minor units of `max`'s currency.
    AmountOutOfRange { got: i64, max: Money },
    /// The account needs a PIN but the box has no PIN key (`[load] pin_key`).
    NoPinKey,
    /// The PIN typed is not `min..=max` digits.
    BadPin { min: u8, max: u8 },
    /// The card refused the PIN (seed 004); it has `tries_left` more.
    WrongPin { tries_left: u8 },
    /// The card's PIN is blocked (too many wrong ones): purchases above its threshold
    /// cannot be made; those under it can.
    PinBlocked,

    // ---- the shell (the daemon ends or refuses a flow with these)
    /// Another purchase or load is in progress.
    Busy,
    /// A local app asked for a payment, but this box has no TV UI for the viewer to
    /// confirm it.
    NoViewer,
    /// A refund due to the card could not be credited now (`why`); it stays due and is
    /// credited at a later insertion (issue 17).
    RefundNotNow { why: String },
    /// The journal write that must come before the next action failed; the flow stopped
    /// there. `error` is the journal's.
    NotRecorded { flow: Flow, error: JournalFailure },
    /// An earlier transaction on this card (`transaction_id`) is still in doubt; the new
    /// `flow` can start once it is settled.
    EarlierInDoubt { transaction_id: String, flow: Flow },
    /// The journal cannot be read, so the shell cannot tell whether the card has older
    /// work in doubt.
    JournalUnreadable { error: JournalFailure },
}

/// The kind of trouble a [`Refusal`] is: what the viewer should understand and do. The TV
/// has a title and advice for each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Problem {
    /// No card, or the card went: insert it.
    NoCard,
    /// The card is blocked: call the provider.
    CardBlocked,
    /// The issuer blocked the card (its hotlist: lost, stolen or misused): call the issuer.
    CardHotlisted,
    /// The card's keys are retired: a load re-keys it.
    KeyRetired,
    /// The card is past its expiry.
    CardExpired,
    /// The offer was not confirmed within its lifetime: nothing charged; choose again.
    OfferExpired,
    /// The balance is below the price: load value first.
    InsufficientValue,
    /// The head end cannot be reached: try later (nothing was charged).
    HeadEndUnreachable,
    /// The head end is busy or took too long: try again.
    Timeout,
    /// The amount asked was not the price shown (001 [0082]): stopped, nothing charged.
    AmountMismatch,
    /// The PIN was wrong: nothing charged; try again with the right one.
    WrongPin,
    /// The card's PIN is blocked: only purchases under its PIN threshold work.
    PinBlocked,
    /// Anything else.
    Other,
}

/// How the viewer reads a head end refusal of a purchase.
fn purchase_problem(code: ErrorCode) -> Problem {
    match code {
        ErrorCode::InsufficientValue => Problem::InsufficientValue,
        ErrorCode::Expired => Problem::CardExpired,
        ErrorCode::OfferExpired => Problem::OfferExpired,
        ErrorCode::AmountMismatch => Problem::AmountMismatch,
        ErrorCode::CardHotlisted => Problem::CardHotlisted,
        ErrorCode::KeyRetired => Problem::KeyRetired,
        ErrorCode::Timeout | ErrorCode::Busy | ErrorCode::RateLimited => Problem::Timeout,
        _ => Problem::Other,
    }
}

/// How the viewer reads a head end refusal of a load.
fn load_problem(code: ErrorCode) -> Problem {
    match code {
        ErrorCode::Timeout | ErrorCode::Busy => Problem::Timeout,
        ErrorCode::AmountMismatch => Problem::AmountMismatch,
        ErrorCode::Expired => Problem::CardExpired,
        ErrorCode::OfferExpired => Problem::OfferExpired,
        ErrorCode::CardHotlisted => Problem::CardHotlisted,
        ErrorCode::WrongPin => Problem::WrongPin,
        _ => Problem::Other,
    }
}

fn card_problem(sw: StatusWord) -> Problem {
    match sw {
        StatusWord::BLOCKED => Problem::CardBlocked,
        StatusWord::EXPIRED => Problem::CardExpired,
        StatusWord::INSUFFICIENT_VALUE => Problem::InsufficientValue,
        sw if sw.pin_tries_left() == Some(0) => Problem::PinBlocked,
        sw if sw.pin_tries_left().is_some() => Problem::WrongPin,
        _ => Problem::Other,
    }
}

impl Refusal {
    /// The kind of trouble this is.
    #[must_use]
    pub fn problem(&self) -> Problem {
        match self {
            Refusal::Unreachable { .. } => Problem::HeadEndUnreachable,
            Refusal::OfferRefused { code, .. } | Refusal::DrawRefused { code, .. } => {
                purchase_problem(*code)
            }
            Refusal::LoadOfferRefused { code, .. } | Refusal::LoadRefused { code, .. } => {
                load_problem(*code)
            }
            Refusal::AmountMismatch { .. } => Problem::AmountMismatch,
            Refusal::CardUnreadable { .. } | Refusal::CardRemoved => Problem::NoCard,
            Refusal::CardRefused { sw } | Refusal::DebitRefused { sw } => card_problem(*sw),
            Refusal::CardBlocked => Problem::CardBlocked,
            Refusal::WrongPin { .. } => Problem::WrongPin,
            Refusal::PinBlocked => Problem::PinBlocked,
            Refusal::CardExpired { .. } => Problem::CardExpired,
            Refusal::InsufficientValue { .. } => Problem::InsufficientValue,
            Refusal::OutOfTurn { .. }
            | Refusal::UnusableOffer
            | Refusal::DebitCommandUnreadable { .. }
            | Refusal::DebitCommandMismatch
            | Refusal::UnusableLoadOffer
            | Refusal::AccountCurrency { .. }
            | Refusal::NothingToLoad { .. }
            | Refusal::NoStatusWord
            | Refusal::Malformed(_)
            | Refusal::PriceCurrency { .. }
            | Refusal::CardSwapped
            | Refusal::LoadInitMismatch
            | Refusal::AmountOutOfRange { .. }
            | Refusal::NoPinKey
            | Refusal::BadPin { .. }
            | Refusal::Busy
            | Refusal::NoViewer
            | Refusal::RefundNotNow { .. }
            | Refusal::NotRecorded { .. }
            | Refusal::EarlierInDoubt { .. }
            | Refusal::JournalUnreadable { .. } => Problem::Other,
        }
    }
}

/// Why a transaction is in doubt: value may have moved, the journal holds it, and recovery
/// ([`crate::recovery`], [`crate::load::decide`]) settles it without asking the viewer
/// again (001 [0106], [0129]–[0132]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doubt {
    // ---- a purchase
    /// No debit command came back for the draw request; `error` says what the transport
    /// saw.
    NoDebitCommand { error: NetworkFailure },
    /// The reader failed during DEBIT: the card may or may not have debited.
    CardLostDuringDebit { error: CardFailure },
    /// The card's debit response could not be decoded.
    DebitResponseMalformed,
    /// The card answered DEBIT without a status word.
    DebitWithoutStatusWord,
    /// The card paid; the debit response's answer did not come back.
    ConfirmationLost { error: NetworkFailure },
    /// The card paid; the head end refused the debit response.
    PaidButRefused { code: ErrorCode, reason: String },
    /// The card paid; the head end answered the debit response with this message.
    PaidButOutOfTurn { answer: &'static str },

    // ---- a load
    /// The reader failed during LOAD: the card may or may not have loaded.
    CardLostDuringLoad { error: CardFailure },
    /// The card's LOAD answer could not be decoded.
    LoadAnswerMalformed,
    /// The card answered LOAD without a status word.
    LoadWithoutStatusWord,
    /// The card gave no zero-value INITIALIZE FOR LOAD (001 [0130]).
    NoZeroValueProof { why: Box<Refusal> },
    /// The zero-value S1 could not be decoded.
    ZeroValueMalformed,
    /// The load response's answer did not come back.
    LoadConfirmationLost { error: NetworkFailure },
    /// The head end refused the load response.
    LoadConfirmationRefused { code: ErrorCode, reason: String },
    /// The head end answered the load response with this message.
    LoadConfirmationOutOfTurn { answer: &'static str },
    /// The shell could not journal a load step after the request went out.
    LoadNotRecorded { error: JournalFailure },
}

impl Doubt {
    /// Which kind of transaction is in doubt.
    #[must_use]
    pub fn flow(&self) -> Flow {
        match self {
            Doubt::NoDebitCommand { .. }
            | Doubt::CardLostDuringDebit { .. }
            | Doubt::DebitResponseMalformed
            | Doubt::DebitWithoutStatusWord
            | Doubt::ConfirmationLost { .. }
            | Doubt::PaidButRefused { .. }
            | Doubt::PaidButOutOfTurn { .. } => Flow::Purchase,
            Doubt::CardLostDuringLoad { .. }
            | Doubt::LoadAnswerMalformed
            | Doubt::LoadWithoutStatusWord
            | Doubt::NoZeroValueProof { .. }
            | Doubt::ZeroValueMalformed
            | Doubt::LoadConfirmationLost { .. }
            | Doubt::LoadConfirmationRefused { .. }
            | Doubt::LoadConfirmationOutOfTurn { .. }
            | Doubt::LoadNotRecorded { .. } => Flow::Load,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn head_end_refusals_read_as_the_viewer_should_act() {
        let r = |code| Refusal::OfferRefused {
            code,
            reason: String::new(),
        };
        assert_eq!(r(ErrorCode::Busy).problem(), Problem::Timeout);
        assert_eq!(r(ErrorCode::RateLimited).problem(), Problem::Timeout);
        assert_eq!(
            r(ErrorCode::InsufficientValue).problem(),
            Problem::InsufficientValue
        );
        let l = |code| Refusal::LoadRefused {
            code,
            reason: String::new(),
        };
        assert_eq!(l(ErrorCode::Busy).problem(), Problem::Timeout);
        assert_eq!(l(ErrorCode::RateLimited).problem(), Problem::Other);
        // An offer past its lifetime is not the card's expiry (an expired prefetched offer
        // once told the viewer the card had expired).
        let d = |code| Refusal::DrawRefused {
            code,
            reason: String::new(),
        };
        assert_eq!(d(ErrorCode::OfferExpired).problem(), Problem::OfferExpired);
        assert_eq!(
            d(ErrorCode::CardHotlisted).problem(),
            Problem::CardHotlisted
        );
        assert_eq!(
            l(ErrorCode::CardHotlisted).problem(),
            Problem::CardHotlisted
        );
        assert_eq!(d(ErrorCode::KeyRetired).problem(), Problem::KeyRetired);
        assert_eq!(d(ErrorCode::Expired).problem(), Problem::CardExpired);
        assert_eq!(l(ErrorCode::OfferExpired).problem(), Problem::OfferExpired);
        assert_eq!(
            Refusal::CardRefused {
                sw: StatusWord::BLOCKED
            }
            .problem(),
            Problem::CardBlocked
        );
    }
}
