//! The data the daemon shows on the TV: card summary, catalog, offer, receipt, history, errors.
//!
//! This file owns plain value types only. They carry no card or network handles: `stbd` builds
//! them from what it read and sends them in as [`crate::UiUpdate`]s.

use crate::money::Money;
use std::fmt;

/// A calendar date as the card or the daemon reports it. Shown as YYYY-MM-DD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

impl Date {
    pub const fn new(year: u16, month: u8, day: u8) -> Self {
        Date { year, month, day }
    }
}

impl fmt::Display for Date {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}-{:02}", self.year, self.month, self.day)
    }
}

/// The purse's own status, as INITIALIZE reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardStatus {
    Active,
    Blocked,
    Expired,
}

/// What the home screen shows about the inserted card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardSummary {
    /// The card issuer / provider name, e.g. "Kabel Nord".
    pub provider: String,
    pub balance: Money,
    pub expiry: Date,
    pub status: CardStatus,
    /// Loyalty points on the card (002's second purse); shown when non-zero.
    pub points: u64,
    /// Bad signatures in a row and the limit at which the card blocks (seed 004's
    /// BAD_KEY); the count is shown when non-zero.
    pub bad_keys: (u8, u8),
    /// The cardholder chose privacy (seed 004): no passbook upload, and payments name the
    /// card by pseudonym. The home menu's switch shows it.
    pub privacy: bool,
}

/// Whether a card reader is there at all.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ReaderState {
    /// Not known yet (daemon still starting).
    #[default]
    Unknown,
    /// No reader found.
    Missing,
    /// A reader is ready; its name for the INFO popup.
    Ready { name: String },
}

/// Catalog item id as the merchant gives it; opaque to the UI.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CatalogId(pub String);

/// Transaction id of an offer; opaque to the UI and echoed back in intents.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TxId(pub String);

impl fmt::Display for TxId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One thing the viewer can buy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CatalogItem {
    pub id: CatalogId,
    pub title: String,
    pub price: Money,
    /// A short second line: air time for an event, a detail for a product. May be empty.
    pub detail: String,
}

/// The cable operator's catalog: two sections.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Catalog {
    pub pay_per_view: Vec<CatalogItem>,
    pub shopping: Vec<CatalogItem>,
}

/// An offer to confirm on the TV. OK accepts, BACK or the timeout cancels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    pub txid: TxId,
    pub item: String,
    pub merchant: String,
    pub price: Money,
    pub balance: Money,
    pub balance_after: Money,
    /// Seconds the viewer has to answer; counted down by `UiEvent::Tick`. 0 means the UI's
    /// configured default.
    pub timeout_secs: u32,
}

/// The named steps of a purchase or a load, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProgressStep {
    ReadingCard,
    ContactingServer,
    DebitingCard,
    /// The load flow's counterpart of `DebitingCard`.
    LoadingCard,
    Confirming,
}

/// What a finished transaction did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    Purchase,
    Load,
    /// A merchant's refund credited to the card (CREDIT).
    Refund,
    /// Value unloaded from the card back to the bank.
    Unload,
    /// Value sent to another card (seed 004 card to card).
    TransferOut,
    /// Value received from another card.
    TransferIn,
    /// A transfer the other card cancelled, credited back.
    TransferBack,
}

/// The receipt shown after a completed purchase or load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub txid: TxId,
    pub kind: TxKind,
    /// Item title for a purchase, source ("Bank account") for a load.
    pub item: String,
    pub merchant: String,
    pub amount: Money,
    pub balance_after: Money,
    pub date: Date,
}

/// One line of the card's own transaction log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryEntry {
    pub date: Date,
    pub kind: TxKind,
    /// Always positive; `kind` says which way it went.
    pub amount: Money,
    pub balance_after: Money,
}

/// Why a screen could not go on. Each kind has its own what-happened and what-to-do text in
/// [`crate::strings`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    NoReader,
    NoCard,
    CardBlocked,
    /// The issuer blocked the card (its hotlist).
    CardHotlisted,
    /// The card's key version is retired: a load updates it.
    KeyRetired,
    CardExpired,
    /// The offer was not confirmed within its lifetime (nothing charged).
    OfferExpired,
    InsufficientValue,
    HeadEndUnreachable,
    Timeout,
    AmountMismatch,
    /// The PIN was wrong (nothing charged): try again.
    WrongPin,
    /// The card's PIN is blocked: only purchases under its PIN threshold work.
    PinBlocked,
    /// Value may have moved and the transaction settles by itself (in doubt): the viewer
    /// must not try again.
    Pending,
    Other,
}

impl ErrorKind {
    /// Every kind, for whatever must know them all (the simulators read the TV by title).
    pub const ALL: [ErrorKind; 15] = [
        ErrorKind::NoReader,
        ErrorKind::NoCard,
        ErrorKind::CardBlocked,
        ErrorKind::CardHotlisted,
        ErrorKind::KeyRetired,
        ErrorKind::CardExpired,
        ErrorKind::OfferExpired,
        ErrorKind::InsufficientValue,
        ErrorKind::HeadEndUnreachable,
        ErrorKind::Timeout,
        ErrorKind::AmountMismatch,
        ErrorKind::WrongPin,
        ErrorKind::PinBlocked,
        ErrorKind::Pending,
        ErrorKind::Other,
    ];
}

/// An error for the viewer, with an optional short technical detail (a reference the hotline
/// can use), shown in small print under the texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UiError {
    pub kind: ErrorKind,
    pub detail: Option<String>,
}

/// The daemon asks for a PIN (bank load).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinRequest {
    pub min_len: u8,
    pub max_len: u8,
    /// Attempts left before the bank blocks, if it says.
    pub attempts_left: Option<u8>,
}

/// What the sender's viewer confirms before the card sends value to another card (seed
/// 004 card to card): the amount and the receiving card the receiver's box named. The
/// receiving card proves it is that card (P2) before any value leaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransferTerms {
    pub amount: Money,
    /// The receiving card's number, as its passbook names it.
    pub to_card: String,
}

/// Where load value comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadSource {
    Bank,
    Voucher,
    /// Value back from the card to the bank account (issue 17).
    Unload,
}
