//! Every text the viewer can see, in one place (for review and later translation).
//!
//! This file owns the wording only; layout is in the components. Texts with a value in them are
//! small functions so the wording stays here too.

use crate::model::{CardStatus, ErrorKind, LoadSource, ProgressStep, TxKind};

pub const APP_TITLE: &str = "Purselink";

// Home
pub const HOME_TITLE: &str = "Smart card";
pub const HOME_INSERT_CARD: &str = "Please insert your card";
pub const HOME_NO_READER: &str = "No card reader connected";
pub const HOME_STARTING: &str = "Starting...";
pub const HOME_BALANCE: &str = "Balance";
pub const HOME_PROVIDER: &str = "Provider";
pub const HOME_EXPIRES: &str = "Valid until";
pub const HOME_STATUS: &str = "Card";
pub const HOME_MENU: [&str; 3] = ["Pay-per-view & shopping", "Load value", "Card history"];

pub fn card_status(s: CardStatus) -> &'static str {
    match s {
        CardStatus::Active => "ready",
        CardStatus::Blocked => "BLOCKED",
        CardStatus::Expired => "EXPIRED",
    }
}

// Catalog
pub const CATALOG_TITLE: &str = "Catalog";
pub const CATALOG_PPV: &str = "Pay-per-view";
pub const CATALOG_SHOPPING: &str = "Shopping channel";
pub const CATALOG_EMPTY: &str = "Nothing on offer right now.";
pub const CATALOG_LOADING: &str = "Loading the catalog...";

// Offer
pub const OFFER_TITLE: &str = "Confirm purchase";
pub const OFFER_ITEM: &str = "Item";
pub const OFFER_MERCHANT: &str = "From";
pub const OFFER_PRICE: &str = "Price";
pub const OFFER_BALANCE: &str = "Balance now";
pub const OFFER_BALANCE_AFTER: &str = "Balance after";

pub fn offer_countdown(secs: u32) -> String {
    format!("Cancels itself in {secs} s")
}

pub const OFFER_CANCELLED: &str = "Purchase cancelled. Your card was not charged.";
pub const OFFER_TIMED_OUT: &str = "No answer: purchase cancelled. Your card was not charged.";

// PIN
pub const PIN_TITLE: &str = "Enter your PIN";
pub const PIN_HELP: &str = "Type the digits on the remote. Nobody else can see them.";

pub fn pin_attempts(n: u8) -> String {
    format!("Attempts left: {n}")
}

pub fn pin_too_short(min: u8) -> String {
    format!("The PIN has at least {min} digits.")
}

// Load
pub const LOAD_TITLE: &str = "Load value";
pub const LOAD_CHOOSE_SOURCE: &str = "Load from:";

pub fn load_source(s: LoadSource) -> &'static str {
    match s {
        LoadSource::Bank => "Bank account",
        LoadSource::Voucher => "Voucher",
    }
}

pub const LOAD_WAITING: &str = "Asking your bank how much you can load...";
pub const LOAD_AMOUNT: &str = "Amount";
pub const LOAD_MAX: &str = "Maximum";
pub const LOAD_HELP: &str = "Type the amount with the digits; BACK deletes.";

pub fn load_over_max(max: &str) -> String {
    format!("That is more than the maximum of {max}.")
}

pub const LOAD_ZERO: &str = "Type an amount first.";

// Progress
pub const PROGRESS_TITLE: &str = "Please wait";
pub const PROGRESS_DO_NOT_REMOVE: &str = "Do not remove your card.";
pub const PROGRESS_WAITING: &str = "Working...";

pub fn progress_step(s: ProgressStep) -> &'static str {
    match s {
        ProgressStep::ReadingCard => "Reading card",
        ProgressStep::ContactingServer => "Contacting payment server",
        ProgressStep::DebitingCard => "Debiting card",
        ProgressStep::LoadingCard => "Loading card",
        ProgressStep::Confirming => "Confirming",
    }
}

// Receipt
pub fn receipt_title(k: TxKind) -> &'static str {
    match k {
        TxKind::Purchase => "Purchase complete",
        TxKind::Load => "Value loaded",
    }
}

pub const RECEIPT_AMOUNT: &str = "Amount";
pub const RECEIPT_NEW_BALANCE: &str = "New balance";
pub const RECEIPT_DATE: &str = "Date";
pub const RECEIPT_REF: &str = "Reference";

// History
pub const HISTORY_TITLE: &str = "Card history";
pub const HISTORY_LOADING: &str = "Reading the card log...";
pub const HISTORY_EMPTY: &str = "No transactions on this card yet.";
pub const HISTORY_COLUMNS: [&str; 4] = ["Date", "What", "Amount", "Balance"];
pub const HISTORY_CHART: &str = "Recent spending";

pub fn history_kind(k: TxKind) -> &'static str {
    match k {
        TxKind::Purchase => "Purchase",
        TxKind::Load => "Load",
    }
}

// Errors: (title, what happened, what to do)
pub fn error_texts(k: ErrorKind) -> (&'static str, &'static str, &'static str) {
    match k {
        ErrorKind::NoReader => (
            "No card reader",
            "The card reader is not connected or not working.",
            "Check the reader's cable, then press OK.",
        ),
        ErrorKind::NoCard => (
            "No card",
            "There is no card in the reader.",
            "Insert your card with the chip first.",
        ),
        ErrorKind::CardBlocked => (
            "Card blocked",
            "This card is blocked and cannot pay.",
            "Call your card provider.",
        ),
        ErrorKind::CardExpired => (
            "Card expired",
            "This card is past its expiry date.",
            "Ask your card provider for a new card.",
        ),
        ErrorKind::InsufficientValue => (
            "Not enough value",
            "The balance on your card is lower than the price.",
            "Load value onto the card, then try again.",
        ),
        ErrorKind::HeadEndUnreachable => (
            "No connection",
            "The payment server cannot be reached.",
            "Try again later. Your card was not charged.",
        ),
        ErrorKind::Timeout => (
            "Took too long",
            "The payment server did not answer in time.",
            "Try again. You will never be charged twice.",
        ),
        ErrorKind::AmountMismatch => (
            "Payment stopped",
            "The amount asked was not the price shown, so we stopped.",
            "Nothing was charged. Call your cable operator.",
        ),
        ErrorKind::Other => (
            "Something went wrong",
            "The transaction could not be completed.",
            "Try again. If it happens again, call your cable operator.",
        ),
    }
}

pub const ERROR_DETAIL: &str = "Reference";

// Info popup
pub const INFO_TITLE: &str = "Info";
pub const INFO_READER: &str = "Reader";
pub const INFO_NO_READER: &str = "none";
pub const INFO_KEYS: &str = "Keys: arrows move, OK selects, BACK returns, MENU goes home";

// Key hints in the footer
pub const KEY_OK: &str = "OK";
pub const KEY_BACK: &str = "BACK";
pub const KEY_MENU: &str = "MENU";
pub const HINT_SELECT: &str = "select";
pub const HINT_BACK: &str = "back";
pub const HINT_ACCEPT: &str = "pay";
pub const HINT_CANCEL: &str = "cancel";
pub const HINT_HOME: &str = "home";
pub const HINT_CONFIRM: &str = "confirm";
pub const HINT_DELETE: &str = "delete";
pub const HINT_RED: &str = "Catalog";
pub const HINT_GREEN: &str = "Load";
pub const HINT_YELLOW: &str = "History";
pub const HINT_BLUE: &str = "Info";
