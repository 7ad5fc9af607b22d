//! Every text the viewer can see, in one place (for review and later translation).
//!
//! This file owns the wording only; layout is in the components. Texts with a value in them are
//! small functions so the wording stays here too.

use crate::model::{CardStatus, ErrorKind, LoadSource, ProgressStep, TxKind};
use crate::money::Money;

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
pub const HOME_POINTS: &str = "Points";

/// Seed 004's BAD_KEY count, when non-zero: `n` bad signatures of `limit`.
pub fn home_bad_keys(n: u8, limit: u8) -> String {
    format!("Bad signatures: {n} of {limit}")
}
pub const HOME_MENU: [&str; 3] = ["Pay-per-view & shopping", "Load value", "Card history"];
/// The home menu's fifth and sixth entries, after the privacy switch.
pub const HOME_MENU_TRANSFER: [&str; 2] = [SEND_TITLE, RECEIVE_TITLE];

/// The home menu's fourth entry: the privacy switch (seed 004), showing where it stands.
pub fn home_privacy(on: bool) -> &'static str {
    if on {
        "Privacy: ON (turn off)"
    } else {
        "Privacy: off (turn on)"
    }
}

/// Said on the home screen once the card took the switch.
pub fn privacy_changed(on: bool) -> &'static str {
    if on {
        "Privacy on: payments no longer name your card, and your passbook stays on it."
    } else {
        "Privacy off: your passbook goes to your bank at the next bank load."
    }
}

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
/// The popup's title for an authentication (002 FIG. 16: a benefit claimed with the card).
pub const OFFER_AUTH_TITLE: &str = "Claim with your card";
/// An authentication's "price": the card only proves it is yours.
pub const NO_CHARGE: &str = "no charge";

pub fn offer_countdown(secs: u32) -> String {
    format!("Cancels itself in {secs} s")
}

pub const OFFER_CANCELLED: &str = "Purchase cancelled. Your card was not charged.";
pub const SETTLED: &str = "Settled. See History for how it ended.";
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
        LoadSource::Unload => "Unload to bank account",
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

// Card to card (seed 004)
pub const SEND_TITLE: &str = "Send to another card";
pub const RECEIVE_TITLE: &str = "Receive from another card";
pub const RECEIVE_WAITING: &str = "Reading your card...";
pub const SEND_ENTER_CODE: &str = "Type the code the receiver's TV shows:";
pub const SEND_CODE_HELP: &str = "8 digits; BACK deletes.";
pub const SEND_CODE_SHORT: &str = "The code has 8 digits.";
pub const SEND_WAITING: &str = "Looking up the transfer...";
pub const SEND_CONFIRM: &str = "Send this amount?";
pub const SEND_TO: &str = "To card";
pub const SEND_CONFIRM_HELP: &str = "OK sends it from your card; BACK cancels.";
pub const RECEIVE_CODE: &str = "Tell the sender this code:";
pub const RECEIVE_AMOUNT: &str = "Amount";
pub const RECEIVE_WAITING_SENDER: &str = "Waiting for the sender's card... BACK cancels.";
/// What the receipt names as the other side of a transfer.
pub fn transfer_party(to: bool, card: &str) -> String {
    if to {
        format!("to card {card}")
    } else {
        format!("from card {card}")
    }
}
/// Said on the home screen when a transfer ended without moving value.
pub const TRANSFER_CANCELLED: &str = "Transfer cancelled: nothing moved.";
/// Said while the daemon cancels a transfer the viewer pressed BACK on.
pub const TRANSFER_CANCELLING: &str = "Cancelling the transfer...";

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
        TxKind::Refund => "Refund credited",
        TxKind::Unload => "Value unloaded",
        TxKind::TransferOut => "Value sent",
        TxKind::TransferIn => "Value received",
        TxKind::TransferBack => "Transfer returned",
    }
}

/// What a refund's receipt names as its item (issue 17: a merchant gave back a purchase).
pub const REFUND_ITEM: &str = "Refund of a purchase";

/// An authentication's receipt (002 FIG. 16): the card proved itself, nothing was paid.
pub const RECEIPT_AUTHENTICATED: &str = "Card authenticated";
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
        TxKind::Refund => "Refund",
        TxKind::Unload => "Unload",
        TxKind::TransferOut => "Sent",
        TxKind::TransferIn => "Received",
        TxKind::TransferBack => "Returned",
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
        ErrorKind::CardHotlisted => (
            "Card blocked by the issuer",
            "The issuer of this card has blocked it. It cannot pay or load.",
            "Call your card issuer.",
        ),
        ErrorKind::KeyRetired => (
            "Card needs updating",
            "This card's security keys have been replaced. It cannot pay until it is updated.",
            "Load value onto the card: the load updates it. Then try again.",
        ),
        ErrorKind::CardExpired => (
            "Card expired",
            "This card is past its expiry date.",
            "Ask your card provider for a new card.",
        ),
        ErrorKind::OfferExpired => (
            "Offer expired",
            "The offer ran out before it was confirmed. Nothing was charged.",
            "Choose the item again for a fresh offer.",
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
        ErrorKind::WrongPin => (
            "Wrong PIN",
            "The PIN was not right. Nothing was charged.",
            "Try again with the right PIN.",
        ),
        ErrorKind::PinBlocked => (
            "PIN blocked",
            "Too many wrong PINs: this card's PIN is blocked. Nothing was charged.",
            "Smaller purchases still work without a PIN. Call your card provider to unblock it.",
        ),
        ErrorKind::Pending => (
            "Being settled",
            "The card may have paid or been loaded; the head end settles it by itself.",
            "Do not try again: you will never pay twice. It shows in History once settled.",
        ),
        ErrorKind::Other => (
            "Something went wrong",
            "The transaction could not be completed.",
            "Try again. If it happens again, call your cable operator.",
        ),
    }
}

pub const ERROR_DETAIL: &str = "Reference";

// Why a transaction stopped: the detail line in small print under an error's texts. Apps on
// the box (the local API) get the same sentence as the reason. Values that come from
// elsewhere (the head end's reason, a transport or reader error, a merchant's text) are
// passed in as they came; amounts come formatted by `Money`.

/// Names of the requests and card commands the sentences below mention.
pub const REQ_OFFER: &str = "the offer request";
pub const REQ_DRAW: &str = "the draw request";
pub const REQ_LOAD_OFFER: &str = "the load offer request";
pub const CMD_INITIALIZE: &str = "INITIALIZE";
pub const CMD_READ_PURSE: &str = "READ PURSE";
pub const CMD_INITIALIZE_FOR_LOAD: &str = "INITIALIZE FOR LOAD";
pub const CMD_READ_LOG: &str = "READ LOG";

/// The head end answered `request` with another kind of message (`answer`: "a catalog").
pub fn why_out_of_turn(request: &str, answer: &str) -> String {
    format!("the head end answered {request} with {answer}")
}

pub const WHY_UNUSABLE_OFFER: &str = "the head end sent an unusable offer";

/// The draw request was refused; `head_end`: the head end itself could not take it now
/// (its journal, a role unreachable, a timeout), not the payment server's decision.
pub fn why_draw_refused(reason: &str, head_end: bool) -> String {
    if head_end {
        format!("the head end could not take it now: {reason}")
    } else {
        format!("the payment server refused: {reason}")
    }
}

pub fn why_debit_command_unreadable(error: &str) -> String {
    format!("debit command unreadable: {error}")
}

pub fn why_amount_mismatch(asked: &Money, offered: &Money) -> String {
    format!("the debit command asks for {asked} but the offer was {offered}")
}

pub const WHY_DEBIT_COMMAND_MISMATCH: &str = "the debit command is for another card or transaction";

pub fn why_load_offer_refused(reason: &str) -> String {
    format!("no load offer: {reason}")
}

pub const WHY_UNUSABLE_LOAD_OFFER: &str = "the head end sent an unusable load offer";

/// `card` and `account` are currency codes ("EUR").
pub fn why_account_currency(card: &str, account: &str) -> String {
    format!("the card holds {card} but the account pays in {account}")
}

pub fn why_nothing_to_load(limited_by: &str) -> String {
    format!("nothing can be loaded now (limited by {limited_by})")
}

pub fn why_load_refused(reason: &str) -> String {
    format!("the load was refused: {reason}")
}

pub const WHY_CARD_REMOVED: &str = "the card was removed";
pub const WHY_CARD_BLOCKED: &str = "the card is blocked";
pub const WHY_CARD_HAS_EXPIRED: &str = "the card has expired";
pub const WHY_OVER_MAX_BALANCE: &str = "that amount would take the card over its maximum balance";
pub const WHY_CARD_WRONG_CURRENCY: &str = "the card holds another currency than the offer";

/// The card refused a command; `status` is its status word as the protocol names it.
pub fn why_card_refused(status: &str) -> String {
    format!("the card refused: {status}")
}

pub fn why_debit_refused(status: &str) -> String {
    format!("the card refused the debit: {status}")
}

pub const WHY_NO_STATUS_WORD: &str = "the card answered without a status word";

/// `command` is one of the `CMD_` names.
pub fn why_card_answer_malformed(command: &str) -> String {
    format!("the card's {command} answer is malformed")
}

/// `card` and `price` are currency codes ("EUR").
pub fn why_price_currency(card: &str, price: &str) -> String {
    format!("the card holds {card} but the price is in {price}")
}

pub fn why_card_expired(year: u16, month: u8) -> String {
    format!("the card expired at the end of {year:04}-{month:02}")
}

pub fn why_insufficient_value(balance: &Money, price: &Money) -> String {
    format!("the card holds {balance} but the price is {price}")
}

pub const WHY_CARD_SWAPPED: &str =
    "another card is in the reader than the one the offer was shown for";
pub const WHY_LOAD_INIT_MISMATCH: &str =
    "the card's INITIALIZE FOR LOAD answer is for another card, amount or time stamp";

/// `got` is the amount typed, shown without its sign.
pub fn why_amount_out_of_range(max: &Money, got: &Money) -> String {
    format!("the amount must be above zero and at most {max}; got {got}")
}

pub const WHY_NO_PIN_KEY: &str =
    "this account needs a PIN but the box has no PIN key ([load] pin_key)";

pub fn why_bad_pin(min: u8, max: u8) -> String {
    format!("a PIN has {min} to {max} digits")
}

/// The card refused the PIN; it takes `tries_left` more before it blocks.
pub fn why_wrong_pin(tries_left: u8) -> String {
    format!("the card refused the PIN: {tries_left} more tries before it blocks")
}

pub const WHY_PIN_BLOCKED: &str = "the card's PIN is blocked after too many wrong PINs; purchases under its PIN-free limit still work";

pub const WHY_BUSY: &str = "another transaction is in progress; try again";
pub const WHY_NO_VIEWER: &str = "no TV UI on this box to confirm the payment";

/// A refund due to the card that could not be credited now (issue 17).
pub fn why_refund_not_now(why: &str) -> String {
    format!(
        "a refund could not be credited now ({why}); it stays due and is credited the next time the card is inserted"
    )
}
pub const WHY_PURCHASE_NOT_RECORDED: &str = "the box could not record the transaction";
pub const WHY_LOAD_NOT_RECORDED: &str = "the box could not record the load";

/// A new purchase (`payment`) or `load` waits for an earlier, in-doubt transaction of the
/// same card (`transaction_id`).
pub fn why_earlier_in_doubt(transaction_id: &str, load: bool) -> String {
    let what = if load { "load" } else { "payment" };
    format!(
        "an earlier transaction on this card ({transaction_id}) is still being settled with \
         the head end; the new {what} can start once it is — please try again in a moment"
    )
}

pub fn why_journal_unreadable(error: &str) -> String {
    format!("the box's journal cannot be read: {error}")
}

pub fn why_not_released(merchant_text: &str) -> String {
    format!("paid, but the merchant did not release: {merchant_text}")
}

pub const WHY_NOT_LOADED: &str =
    "the card was not loaded; the amount held on the account is released";

// The same, when value may have moved: `why` is one of the `DOUBT_` sentences below, and
// recovery settles it without the viewer.
pub fn in_doubt_purchase(why: &str) -> String {
    format!("{why}; the payment will be settled automatically — you will not pay twice")
}

pub fn in_doubt_load(why: &str) -> String {
    format!(
        "{why}; the load will be settled automatically (with the card in the reader) — it is \
         never paid twice"
    )
}

pub fn doubt_no_debit_command(error: &str) -> String {
    format!("no debit command from the head end ({error})")
}

pub fn doubt_card_lost_during_debit(error: &str) -> String {
    format!("the card was lost during the debit ({error})")
}

pub const DOUBT_DEBIT_RESPONSE_MALFORMED: &str = "the card's debit response is malformed";
pub const DOUBT_DEBIT_WITHOUT_STATUS_WORD: &str = "the card answered DEBIT without a status word";

pub fn doubt_confirmation_lost(error: &str) -> String {
    format!("the card paid but the confirmation did not get through ({error})")
}

pub fn doubt_paid_but_refused(reason: &str) -> String {
    format!("the card paid but the head end answered: {reason}")
}

pub fn doubt_paid_but_out_of_turn(answer: &str) -> String {
    format!("the card paid but the head end answered {answer}")
}

pub fn doubt_card_lost_during_load(error: &str) -> String {
    format!("the card was lost during LOAD ({error})")
}

pub const DOUBT_LOAD_ANSWER_MALFORMED: &str = "the card's LOAD answer is malformed";
pub const DOUBT_LOAD_WITHOUT_STATUS_WORD: &str = "the card answered LOAD without a status word";

/// `why` is the card's refusal, as above.
pub fn doubt_no_zero_value_proof(why: &str) -> String {
    format!("no zero-value proof from the card: {why}")
}

pub const DOUBT_ZERO_VALUE_MALFORMED: &str = "the card's zero-value S1 is malformed";

pub fn doubt_load_confirmation_lost(error: &str) -> String {
    format!("the load confirmation did not get through ({error})")
}

pub fn doubt_load_confirmation_refused(reason: &str) -> String {
    format!("the head end answered: {reason}")
}

pub fn doubt_load_confirmation_out_of_turn(answer: &str) -> String {
    format!("the head end answered the load response with {answer}")
}

// Before a load starts (the box's own settings and the card).
pub const LOAD_NO_BANK_ACCOUNT: &str =
    "no bank account is set up on this box ([load] bank_account)";
pub const LOAD_NO_VOUCHER: &str = "no voucher is set up on this box ([load] voucher)";
pub const LOAD_INSERT_CARD: &str = "insert the card to load it";

/// A voucher on a receipt: its code's last characters after a mask (the code is its only
/// secret).
pub fn voucher_masked(code_tail: &str) -> String {
    format!("••••{code_tail}")
}

// Why a purchase was cancelled, for apps on the box (the local API).
pub const CANCELLED_BY_VIEWER: &str = "the viewer cancelled";
pub const CANCELLED_TIMED_OUT: &str = "the offer timed out";

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
