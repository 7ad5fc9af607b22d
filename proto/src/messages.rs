//! Wire messages for every hop (box ↔ gateway ↔ payment server / merchant / bank / load
//! server), encoded with serde + postcard inside a [`crate::frame`].
//!
//! # Conversations (box ↔ gateway)
//!
//! Each step is one frame from the box and one frame back. Browsing and the offer take a
//! stream each; a purchase's steps share one stream (draw request → debit command, then
//! debit response → receipt), so one stream is one transaction. Every message after the
//! offer carries the
//! transaction id, which is the idempotency key on every hop: re-sending a message (after a
//! lost answer, a crash, a reconnect) gets the same answer and never moves value twice.
//!
//! | step | box sends | gateway answers |
//! |---|---|---|
//! | browse | `CatalogRequest` | `Catalog` |
//! | offer | `OfferRequest` | `Offer` (new transaction id, price, TSK); the gateway asks the merchant with `RoutedOfferRequest`, adding the box id |
//! | draw | `DrawRequest` | `DebitCommand` (the payment server answers the gateway with `RoutedDebitCommand`: the command for the box, and the early-release parts it keeps) |
//! | debit done | `DebitResponse` | `Receipt` (merchant released, or why not) |
//! | abort | `Cancel` (amount mismatch, card pulled before DEBIT, viewer) | `Receipt { released: false }` |
//! | load offer | `LoadOfferRequest` (READ PURSE data + source) | `LoadOffer` (transaction id, maximum, time stamp) |
//! | load request | `LoadRequest` (S1, amount, sealed PIN) | `LoadCommand` (S2); the gateway first has the funder verify the PIN and place a hold |
//! | load response | `LoadResponse` (S3, or a negative result / no response with a zero-value S1) | `LoadConfirmation` (hold captured or released) |
//!
//! Any step may be answered with `Error` instead, whose code says what to do.
//! Recovery: a box that crashed after DEBIT re-sends `DebitResponse` rebuilt from the card's
//! log; one whose card never ran DEBIT sends `Cancel` with a fresh INITIALIZE FOR PURCHASE
//! response as proof that the card's transaction counter has not moved.
//!
//! Names follow 001 [0070]: offer, draw request, debit command ("debit IEP"), debit
//! response, confirmation ("debit result C" for the box, "debit result M" for the
//! merchant), load request, load command, load response, load confirmation; and an error
//! with a reason code. Message-layer protection (FIG. 8) is [`Protected`]: a body either in
//! clear or sealed under the transaction session key.

use rand::RngCore;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::crypto::{self, CryptoError, DesKey, Mac};
use crate::frame::{self, FrameError};
use crate::money::Money;
use crate::purse::*;
use crate::secret::Secret;

/// Which party compares the card signature with the expected one (001 FIG. 4–7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Embodiment {
    /// FIG. 4: the security card compares.
    SecurityCard,
    /// FIG. 5: the payment server compares (early release of the security card).
    PaymentServer,
    /// FIG. 6: the gateway (cable head end) compares.
    Gateway,
    /// FIG. 7: the merchant compares, with the expected signature encrypted for it.
    Merchant,
}

/// A body in clear, or sealed under the transaction session key (FIG. 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protected<T> {
    Clear(T),
    Sealed(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("malformed message: {0}")]
    Malformed(String),
    #[error("message layer: {0}")]
    Crypto(#[from] CryptoError),
    #[error("message is sealed but no session key is known for it")]
    NoKey,
    #[error("message layer is on but the body came in clear")]
    ExpectedSealed,
}

impl<T: Serialize + DeserializeOwned> Protected<T> {
    /// Seals `body` under `key` if given, else sends it in clear.
    pub fn new(body: T, key: Option<&DesKey>, rng: &mut impl RngCore) -> Self {
        match key {
            None => Self::Clear(body),
            Some(k) => Self::Sealed(crypto::seal(
                k,
                &postcard::to_allocvec(&body).expect("in-memory serialization"),
                rng,
            )),
        }
    }

    /// Opens the body. With a key, a clear body is refused: the layer cannot be stripped.
    pub fn open(&self, key: Option<&DesKey>) -> Result<T, WireError> {
        match (self, key) {
            (Self::Clear(t), None) => Ok(clone_via_postcard(t)?),
            (Self::Clear(_), Some(_)) => Err(WireError::ExpectedSealed),
            (Self::Sealed(_), None) => Err(WireError::NoKey),
            (Self::Sealed(b), Some(k)) => {
                let raw = crypto::open(k, b)?;
                strict(&raw)
            }
        }
    }
}

/// Decodes exactly one value: trailing bytes are refused, not ignored.
fn strict<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, WireError> {
    let (v, rest) =
        postcard::take_from_bytes(bytes).map_err(|e| WireError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "{} trailing bytes after the body",
            rest.len()
        )));
    }
    Ok(v)
}

fn clone_via_postcard<T: Serialize + DeserializeOwned>(t: &T) -> Result<T, WireError> {
    let b = postcard::to_allocvec(t).map_err(|e| WireError::Malformed(e.to_string()))?;
    postcard::from_bytes(&b).map_err(|e| WireError::Malformed(e.to_string()))
}

/// An offer (001 [0072]): what is for sale, for how much, and where to pay.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Offer {
    pub transaction_id: String,
    pub merchant_id: String,
    pub item_id: String,
    pub title: String,
    pub amount: Money,
    /// The payment server that takes the draw request.
    pub payment_route: String,
    /// Where the confirmation goes.
    pub status_route: String,
    pub embodiment: Embodiment,
    /// FIG. 8: the TSK in clear for the box and gateway, and ETSK for the payment server.
    pub tsk: Option<DesKey>,
    pub etsk: Option<Vec<u8>>,
}

/// The card part of the draw request (001 [0077]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrawBody {
    pub amount: Money,
    pub atr: Vec<u8>,
    pub init: PurchaseInit,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrawRequest {
    pub transaction_id: String,
    pub merchant_id: String,
    pub etsk: Option<Vec<u8>>,
    pub body: Protected<DrawBody>,
}

/// What the box receives with the debit command: the command for the card, nothing else.
/// (The early-release parts, which would let a box forge the card's signature, go to the
/// gateway only, in [`GatewayCopy`].)
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitCommandBody {
    pub command: DebitCommand,
}

/// The parts of a draw's answer for the gateway alone (FIG. 6/7, [0095]–[0105]), which the
/// gateway keeps and never relays to the box: with the expected card signature in hand, a
/// box could answer without debiting its card.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GatewayCopy {
    /// FIG. 6: the expected card signature, for the gateway to compare.
    pub expected_card_signature: Option<Mac>,
    /// FIG. 7: the expected card signature sealed under the derived key, for the merchant.
    pub sealed_expected_signature: Option<Vec<u8>>,
    /// FIG. 6: "debit result M" sealed in advance, which the gateway forwards to the
    /// merchant only once its own comparison of the card signature succeeds.
    pub presealed_result_m: Option<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitCommandMsg {
    pub transaction_id: String,
    pub body: Protected<DebitCommandBody>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitResponseMsg {
    pub transaction_id: String,
    pub body: Protected<DebitResponse>,
}

/// "Debit result C": what the box and gateway learn.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitResultC {
    pub transaction_id: String,
    pub success: bool,
    pub amount: Money,
    pub new_balance: u64,
}

/// "Debit result M": the confirmation only the merchant can read (sealed under the
/// derived key), and so only the merchant can be convinced by.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitResultM {
    pub transaction_id: String,
    pub merchant_id: String,
    pub amount: Money,
    pub success: bool,
    pub security_card_id: u64,
    pub security_card_txn: u32,
}

/// "Authentication OK" (002 FIG. 16, [0163]): what the security card's verification of the
/// card's signature on an authentication draw says to the merchant (the benefits server
/// 208′) in place of [`DebitResultM`], sealed the same way under the FIG. 8 derived key
/// (`MessageKeys::derived`). It names the card that proved itself (its signature verified),
/// so the benefits server can map the card to a consumer account; nothing was paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthenticationOk {
    pub transaction_id: String,
    pub merchant_id: String,
    /// The card whose signature the security card verified.
    pub card_id: u64,
    pub security_card_id: u64,
    pub security_card_txn: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    pub transaction_id: String,
    pub result_c: Protected<DebitResultC>,
    /// Sealed `DebitResultM` ([`AuthenticationOk`] for an authentication draw).
    pub result_m: Vec<u8>,
    /// FIG. 7: the card's debit response, for the merchant's own comparison.
    pub debit_response: Option<DebitResponse>,
}

/// The merchant's answer once it released (or refused) the goods.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    pub transaction_id: String,
    pub released: bool,
    pub text: String,
    pub entitlement: Option<String>,
    /// The card balance after the debit, from debit result C.
    pub new_balance: Option<u64>,
}

/// One thing for sale in the cable operator's catalog (001 [0037], [0049]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogItem {
    pub merchant_id: String,
    pub item_id: String,
    pub title: String,
    /// "ppv" (pay-per-view) or "shop" (shopping channel), or a merchant's own kind.
    pub kind: String,
    pub detail: String,
    pub amount: Money,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CancelReason {
    /// The viewer pressed BACK or the offer timed out.
    Viewer,
    /// The debit command's amount differed from the offer's (001 [0082]).
    AmountMismatch,
    /// The card was pulled, or refused DEBIT; the proof shows its counter did not move.
    NotDebited,
    Timeout,
    /// The card refused the DEBIT command with this status word (its debit is atomic: the
    /// proof shows its counter did not move). `6982` means the security card's signature on
    /// the debit command did not verify: the payment server counts it against the terminal
    /// that signed ([`crate::apdu::StatusWord::BAD_SIGNATURE`]). Appended, like every new
    /// variant of a wire enum.
    DebitRefused {
        sw: crate::apdu::StatusWord,
    },
}

/// Abandons a transaction. With `proof` (a fresh INITIALIZE FOR PURCHASE response), the
/// security card can see for itself that the card never ran the DEBIT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CancelMsg {
    pub transaction_id: String,
    pub reason: CancelReason,
    pub proof: Option<PurchaseInit>,
}

/// A refund a merchant authorized and the card has not yet been credited with (issue 17;
/// seed 004's refund to the card), as the box lists it for the viewer. `transaction_id` is
/// the sale's: a sale is refunded at most once, so the sale's id keys its refund on every
/// hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundDue {
    pub transaction_id: String,
    pub merchant_id: String,
    /// What the card is credited, in the sale's currency (at most the sale's amount).
    pub amount: Money,
    /// The credit command already out for it, if one is: the card either ran it (its log
    /// holds the signed credit response, which completes the refund) or did not (a proof of
    /// "not credited" counts it back, and it is due afresh). Useless to any other card.
    pub issued: Option<CreditCommand>,
}

/// Box → gateway → payment server: run the refund of sale `transaction_id` onto the card
/// whose INITIALIZE FOR CREDIT answer is `init` (MACed by the card under
/// [`CreditCommand::INIT_LABEL`]). Answered with [`Message::RefundCommand`]; a retry must be
/// identical. Refused for a card that is not the sale's, a sale with no refund due, or one
/// already credited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRequest {
    pub transaction_id: String,
    /// The card's ATR, replayed to the security card as for a draw ([0093]).
    pub atr: Vec<u8>,
    pub init: PurchaseInit,
}

/// The security card's credit command for the box to send to the card (CREDIT).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundCommandMsg {
    pub transaction_id: String,
    pub command: CreditCommand,
}

/// The card's signed answer to CREDIT (from the card, or from its log after a crash).
/// Answered with a [`Receipt`] (`released: true`, the new balance); a repeat of the same
/// response gets the same receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundResponseMsg {
    pub transaction_id: String,
    pub response: CreditResponse,
}

/// The card's proof that it did not run the refund's CREDIT: a fresh INITIALIZE FOR
/// PURCHASE (proof) whose counter has not moved past the credit command's. The security
/// card counts the refund back; it stays due, for a new INITIALIZE FOR CREDIT. Answered
/// with a [`Receipt`] (`released: false`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundProofMsg {
    pub transaction_id: String,
    pub proof: PurchaseInit,
}

/// Where a load's value comes from. A voucher's code is its only secret: it is a
/// [`Secret`] (masked in every log and `Debug`), and it crosses the wire once, in the load
/// offer request. The funder answers with the voucher's reference ([`voucher_ref`]) in its
/// place, and every later message, journal and record names the voucher by that reference,
/// so no journal on any hop holds a code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadSource {
    Bank {
        account: String,
    },
    /// The code (load offer request) or its reference (everything after).
    Voucher {
        code: Secret<String>,
    },
    /// Appended: an UNLOAD (issue 17; seed 004 card-to-bank) — the value goes the other
    /// way, from the card back to this bank account. The same conversation as a bank load
    /// (offer, hold, request, response, confirmation): the bank reserves the amount out of
    /// the issuer float at the hold and credits the account only once the load server's
    /// HSM has verified the card's S3 of UNLOAD, or the reversed negative-result procedure
    /// proved the card gave the value up.
    Unload {
        account: String,
    },
}

impl LoadSource {
    /// A voucher source from its code (or reference).
    pub fn voucher(code: impl Into<String>) -> Self {
        Self::Voucher {
            code: Secret::new(code.into()),
        }
    }

    /// Whether value goes from the card to the account ([`LoadSource::Unload`]).
    #[must_use]
    pub fn is_unload(&self) -> bool {
        matches!(self, Self::Unload { .. })
    }

    /// Whether `offered` (the funder's answer) is this source: the same, or, for a voucher
    /// named by its code, its reference.
    pub fn offered_as(&self, offered: &LoadSource) -> bool {
        match (self, offered) {
            (Self::Voucher { code }, Self::Voucher { code: r }) => {
                code == r || voucher_ref(code.expose()) == *r.expose()
            }
            _ => self == offered,
        }
    }
}

/// The prefix of a voucher reference.
pub const VOUCHER_REF_PREFIX: &str = "VREF-";

/// The reference a voucher is known by after its load offer request: `VREF-` and the first
/// 128 bits of SHA-256 over a label and the code, in hex. One-way: the code cannot be
/// recovered from it, and with a random code of 80 bits it cannot be guessed from it either.
/// A reference is its own reference.
pub fn voucher_ref(code: &str) -> String {
    use sha2::Digest;
    if code.starts_with(VOUCHER_REF_PREFIX) {
        return code.to_string();
    }
    let mut h = sha2::Sha256::new();
    h.update(b"purselink voucher ref v1\0");
    h.update(code.as_bytes());
    format!(
        "{VOUCHER_REF_PREFIX}{}",
        hex::encode_upper(&h.finalize()[..16])
    )
}

/// The load request (001 [0123]): S1, card number, expiry, amount, counter, balance,
/// time stamp — all inside `init` — plus the source of funds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadRequest {
    pub transaction_id: String,
    pub source: LoadSource,
    pub amount: Money,
    pub init: LoadInit,
    /// The PIN block, sealed end to end for the bank.
    pub sealed_pin: Option<Vec<u8>>,
    /// Seed 004 PASSBOOK: with a bank load, the card's log records since its last upload,
    /// oldest first — exactly those its S1 covers ([`crate::purse::passbook_digest`]);
    /// none with a voucher, or when the cardholder chose privacy.
    pub passbook: Vec<crate::purse::LogRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadCommandMsg {
    pub transaction_id: String,
    pub command: LoadCommand,
    /// The issuer's sealed key update (001 [0044], [`crate::purse::KeyUpdate`]) for a card
    /// on an older key version: the box sends it to the card after the load command, in the
    /// same LOAD.
    pub key_update: Option<Vec<u8>>,
    /// The issuer's sealed UNBLOCK ([`crate::purse::Unblock`], seed 004), with a bank load
    /// when the load server is set to give it: the box sends it after the key update, in
    /// the same LOAD.
    pub unblock: Option<Vec<u8>>,
    /// The scheme's current application key, sealed for this card
    /// ([`crate::transfer::AppKeyPush`], seed 004), with a bank load when the load server
    /// has one: the box sends it after the UNBLOCK, in the same LOAD.
    pub app_key: Option<Vec<u8>>,
}

/// The card's answer to LOAD, or (negative result / card pulled) the zero-value S1.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadResponseMsg {
    pub transaction_id: String,
    pub response: Option<LoadResponse>,
    pub zero_value: Option<LoadInit>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadConfirmation {
    pub transaction_id: String,
    pub loaded: bool,
    pub new_balance: Option<u64>,
    /// Sealed for the bank (or the pre-funded account holder).
    pub sealed: Vec<u8>,
}

/// Load offer request (001 [0118], [0142]): the box's READ PURSE data and the source of
/// funds. The bank (or the load server, for a pre-funded account) answers with a
/// [`LoadOffer`] before the viewer enters the amount and the PIN.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOfferRequest {
    pub source: LoadSource,
    pub card: PurseInfo,
}

/// The answer to a [`LoadOfferRequest`]: the transaction id for the whole load, the most
/// the viewer may load now, and the server time stamp and date the card's INITIALIZE FOR
/// LOAD must use (S1 covers the time stamp).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadOffer {
    pub transaction_id: String,
    pub source: LoadSource,
    /// Least of card max balance − balance, funds available, and what is left of the
    /// per-day limit.
    pub max_amount: Money,
    /// Which of the three set `max_amount`: "card", "funds" or "daily limit".
    pub limited_by: String,
    pub timestamp: u64,
    pub date: Date,
    /// A bank account needs the PIN; a pre-funded voucher does not.
    pub pin_required: bool,
}

/// The PIN block the box seals end to end for the bank, under its per-box PIN key. The
/// transaction id binds it to one load: a sealed PIN replayed into another is refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PinBlock {
    pub transaction_id: String,
    pub pin: Secret<String>,
}

/// Gateway → funder (bank, or load server for a pre-funded account): verify the PIN and
/// place a hold for the load amount. The card fields come from the load request's
/// INITIALIZE FOR LOAD response (the HSM verifies them under S1 next).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldRequest {
    pub box_id: String,
    pub transaction_id: String,
    pub source: LoadSource,
    pub amount: Money,
    pub card_id: u64,
    pub card_balance: u64,
    pub card_max_balance: u64,
    pub sealed_pin: Option<Vec<u8>>,
}

/// The funder's answer once the hold is in place (and journaled). It travels on with the
/// load request to the load server ([`Message::RoutedLoadRequest`]), which authorises no
/// more than it: `mac` is the funder's MAC over [`HoldPlaced::mac_fields`] under a
/// per-transaction key derived from the key the funder shares with the load server, so
/// neither the gateway nor anyone else can raise the amount or invent a hold.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldPlaced {
    pub transaction_id: String,
    pub amount: Money,
    /// The card the hold funds a load onto.
    pub card_id: u64,
    pub mac: Mac,
}

impl HoldPlaced {
    /// The fields the funder's MAC covers: transaction id, amount (minor units, currency
    /// code, exponent), card id, and for an unload the word `UNLOAD` (so no load's hold is
    /// ever taken for an unload's, or the other way).
    pub fn mac_fields(transaction_id: &str, amount: Money, card_id: u64, unload: bool) -> Vec<u8> {
        let mut f = Vec::with_capacity(transaction_id.len() + 24);
        f.extend_from_slice(&(transaction_id.len() as u32).to_be_bytes());
        f.extend_from_slice(transaction_id.as_bytes());
        f.extend_from_slice(&amount.minor.to_be_bytes());
        f.extend_from_slice(&amount.currency.code.to_be_bytes());
        f.push(amount.currency.exponent);
        f.extend_from_slice(&card_id.to_be_bytes());
        if unload {
            f.extend_from_slice(b"UNLOAD");
        }
        f
    }
}

/// A reversal the payment server made (a cancel with a verified proof, a bad card
/// signature, or a transaction past its deadline), numbered in the order it was journaled,
/// so the gateway can pass each one on to the merchant exactly once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReversalNotice {
    /// Position in the payment server's reversal feed, from 1.
    pub seq: u64,
    pub transaction_id: String,
    pub merchant_id: String,
    pub reason: String,
}

/// The funder's answer to a relayed [`LoadConfirmation`]: the hold was captured (card
/// loaded, amount moved to the issuer's float) or released (confirmed no-load).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldSettled {
    pub transaction_id: String,
    pub captured: bool,
    pub amount: Money,
}

/// What the sealed part of a [`LoadConfirmation`] says, readable only by the funder.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadConfirmationBody {
    pub transaction_id: String,
    pub loaded: bool,
    pub amount: Money,
    pub card_id: u64,
    pub hsm_id: u64,
    /// How the load server decided: "S3 verified", "never authorized: …", or the
    /// negative-result verdict of 001 [0131]–[0132].
    pub basis: String,
    /// The card's passbook the load server's HSM verified against S1 (seed 004): the bank
    /// keeps it when the load went through.
    pub passbook: Vec<crate::purse::LogRecord>,
}

/// The load server refused a load request before any S2 was issued. The confirmation
/// (loaded: false) lets the funder release the hold; the error goes to the box.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadRefusal {
    pub error: ErrorMsg,
    pub confirmation: LoadConfirmation,
}

/// Why a hop refused a message. The code is for programs, the reason for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    Malformed,
    UnknownMerchant,
    UnknownRoute,
    UnknownTransaction,
    AmountMismatch,
    BadSignature,
    Replay,
    InsufficientValue,
    InsufficientFunds,
    OverMaxBalance,
    OverDailyLimit,
    WrongCurrency,
    Expired,
    WrongPin,
    AccountLocked,
    NotYourAccount,
    Busy,
    Timeout,
    Internal,
    // Appended (not inserted) so the postcard indices above stay put.
    /// A cancel's proof of "not debited" did not verify: nothing was reversed, and the
    /// transaction stays open (the box re-sends its debit response if it has one).
    ProofRejected,
    /// The purchase completed (the card's debit was proved): it cannot be cancelled. A box
    /// that asked to cancel re-sends its debit response for the receipt.
    AlreadyCompleted,
    /// The value may have moved and nobody can tell yet: the transaction waits for the
    /// box's proof or an operator (a hold whose load may have reached the card).
    InDoubt,
    /// This peer may not send this message to this role (its configuration does not name
    /// the peer for it).
    Forbidden,
    /// Too many requests from this peer; retry after a pause.
    RateLimited,
    /// The offer (or load offer, or load hold) is past its lifetime: nothing was charged;
    /// ask for a new one. Not the card's expiry, which is `Expired`.
    OfferExpired,
    /// The card is on its issuer's hotlist (lost, stolen or misused): no purchase, no load.
    /// The viewer is told to call the issuer.
    CardHotlisted,
    /// The card's key version is retired (seed 002 key generations): no purchase until a
    /// load has re-keyed it. The viewer is told to load value onto the card.
    KeyRetired,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    pub code: ErrorCode,
    pub reason: String,
    pub transaction_id: Option<String>,
}

/// Every message on every hop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    OfferRequest {
        merchant_id: String,
        item_id: String,
    },
    Offer(Offer),
    DrawRequest(DrawRequest),
    DebitCommand(DebitCommandMsg),
    DebitResponse(DebitResponseMsg),
    Confirmation(Confirmation),
    Receipt(Receipt),
    LoadRequest(LoadRequest),
    LoadCommand(LoadCommandMsg),
    LoadResponse(LoadResponseMsg),
    LoadConfirmation(LoadConfirmation),
    Error(ErrorMsg),
    // Appended (not inserted) so the postcard indices of the variants above stay put.
    /// Browse: the box asks for the cable operator's catalog. Safe to replay (0-RTT).
    CatalogRequest,
    Catalog(Vec<CatalogItem>),
    /// Abort a transaction; answered with `Receipt { released: false }`.
    Cancel(CancelMsg),
    /// Gateway → merchant: an offer request with the box identity the gateway took from the
    /// box's certificate (a box cannot claim another's).
    RoutedOfferRequest {
        box_id: String,
        merchant_id: String,
        item_id: String,
    },
    // Load side (appended). Box ↔ gateway: `LoadOfferRequest` → `LoadOffer`. Gateway →
    // funder: `RoutedLoadOfferRequest` → `LoadOffer`, `HoldRequest` → `HoldPlaced`,
    // `LoadConfirmation` → `HoldSettled`. Load server → gateway: `LoadRefused`.
    LoadOfferRequest(LoadOfferRequest),
    LoadOffer(LoadOffer),
    RoutedLoadOfferRequest {
        box_id: String,
        request: LoadOfferRequest,
    },
    HoldRequest(HoldRequest),
    HoldPlaced(HoldPlaced),
    HoldSettled(HoldSettled),
    LoadRefused(LoadRefusal),
    // Appended. Gateway → load server: the box's load request with the funder's hold, the
    // only form in which the load server authorises a load.
    RoutedLoadRequest {
        request: LoadRequest,
        hold: HoldPlaced,
    },
    /// Gateway → load server: a load whose box never came back, past its hold's lifetime.
    /// Never authorised: refused for good, answered with the sealed no-load confirmation
    /// that releases the hold. Authorised (S2 issued): `Error { InDoubt }` — the hold waits
    /// for the box's proof or an operator.
    LoadExpire {
        transaction_id: String,
    },
    /// Gateway → payment server: the reversals after `after` in its feed (at most a page).
    ReversalsSince {
        after: u64,
    },
    Reversals(Vec<ReversalNotice>),
    /// Gateway → merchant: the payment server reversed this transaction; an offer not yet
    /// released moves to Reversed. Answered with `Ack`.
    Reversed(ReversalNotice),
    /// A plain acknowledgement of the named transaction (or notice).
    Ack {
        transaction_id: String,
    },
    /// Payment server → gateway: the answer to a draw request — the debit command for the
    /// box, and the parts for the gateway alone.
    RoutedDebitCommand {
        command: DebitCommandMsg,
        gateway: GatewayCopy,
    },
    // Appended: clearing (see [`crate::clearing`]).
    /// Payment server → clearing: a collection batch. Answered with `BatchAck`, the same
    /// for a repeat of the identical batch.
    CollectionBatch(Box<crate::clearing::CollectionBatch>),
    /// Clearing → payment server: batch `batch` of `payment_server` is received, once and
    /// for all.
    BatchAck {
        payment_server: String,
        batch: u64,
    },
    /// Funder (bank, load server) → clearing: a captured load. Answered with `Ack`.
    LoadAdvice(crate::clearing::LoadAdvice),
    // Appended: system updates (seed 001 FIG. 1: they come back from clearing).
    /// Payment server or load server → clearing: "I hold hotlist version `have`; anything
    /// newer?" Answered with `HotlistUpdate`.
    HotlistRequest {
        have: u64,
    },
    /// Clearing → payment server or load server: the newest signed hotlist, or `None` when
    /// the asker already holds it (or clearing holds none).
    HotlistUpdate(Option<crate::hotlist::SignedHotlist>),
    // Appended: refunds (issue 17). Box → gateway → payment server(s).
    /// Which refunds are due to card `card_id`? Answered with [`Message::RefundsDue`]. The
    /// gateway asks every payment server it routes to.
    RefundsDueRequest {
        card_id: u64,
    },
    RefundsDue(Vec<RefundDue>),
    RefundRequest(RefundRequest),
    RefundCommand(RefundCommandMsg),
    RefundResponse(RefundResponseMsg),
    RefundProof(RefundProofMsg),
    // Appended: card to card through the gateway (issue 18; seed 004 FIG. 4 across two
    // boxes). The gateway keeps a journaled mailbox per transfer; the packets are the
    // cards' own, sealed under their application keys ([`crate::transfer`]).
    /// Payee box → gateway: open a transfer its card will receive (after RECEIVE on the
    /// card). Answered with [`Message::TransferTerms`], carrying the code the payee's holder
    /// tells the payer's. A retry must be identical.
    TransferInvite(TransferInvite),
    /// Payer box → gateway: join the transfer this code names. Answered with
    /// [`Message::TransferTerms`]; the transfer is then this box's to send.
    TransferJoin {
        code: String,
    },
    TransferTerms(TransferTerms),
    /// Box → gateway: this box's card's packet of a step. Answered with `Ack`; a repeat of
    /// the same packet too, another packet for the same step is refused (`Replay`).
    TransferPost(TransferPacket),
    /// Box → gateway: the other box's packet of `step`. Answered with
    /// [`Message::TransferPost`]'s packet, or `Busy` while it has not come.
    TransferFetch {
        transfer_id: String,
        step: TransferStep,
    },
    TransferPacket(TransferPacket),
}

/// The payee's side of a card-to-card transfer, as its card's RECEIVE answered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferInvite {
    pub transfer_id: String,
    pub amount: Money,
    pub payee_card: u64,
    pub payee_epochs: [u8; 4],
    /// The payee card's challenge R0, which the payer card's P1 must answer.
    pub payee_challenge: [u8; 8],
}

/// A transfer as the gateway holds it: the invite and its code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferTerms {
    pub invite: TransferInvite,
    /// Eight digits, what the payee's TV shows and the payer's holder types.
    pub code: String,
}

/// The packets of a transfer (seed 004 FIG. 4), each posted by the box whose card made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum TransferStep {
    /// The payer card's SEND answer (AK0, AK1, P1): posted by the payer.
    P1,
    /// The payee card's P2 and P3: posted by the payee.
    P23,
    /// The payer card's P4 (the payer is debited): posted by the payer.
    P4,
    /// The payee card's settlement (a receipt, or its cancellation): posted by the payee.
    Settlement,
    /// The payee's viewer withdrew the transfer before its card answered P1 (one byte,
    /// 0): posted by the payee, never after P2 P3; the code is dead from then on and the
    /// payer's box is told so. Appended: the postcard indices above stay put.
    Withdrawn,
}

impl TransferStep {
    /// Whether the payer's box posts this step (else the payee's).
    pub fn payer_posts(self) -> bool {
        matches!(self, Self::P1 | Self::P4)
    }
}

/// One packet of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferPacket {
    pub transfer_id: String,
    pub step: TransferStep,
    pub data: Vec<u8>,
}

impl Message {
    /// The message's kind as a noun phrase ("a draw request"), for refusals, logs and the
    /// TV's out-of-turn details: one name per variant, the field's terms (seed 001's draw
    /// request, debit command, …).
    pub fn kind(&self) -> &'static str {
        match self {
            Message::CatalogRequest => "a catalog request",
            Message::Catalog(_) => "a catalog",
            Message::OfferRequest { .. } => "an offer request",
            Message::Offer(_) => "an offer",
            Message::Cancel(_) => "a cancel",
            Message::DrawRequest(_) => "a draw request",
            Message::DebitCommand(_) => "a debit command",
            Message::DebitResponse(_) => "a debit response",
            Message::Confirmation(_) => "a confirmation",
            Message::Receipt(_) => "a receipt",
            Message::LoadRequest(_) => "a load request",
            Message::LoadCommand(_) => "a load command",
            Message::LoadResponse(_) => "a load response",
            Message::LoadConfirmation(_) => "a load confirmation",
            Message::Error(_) => "an error",
            Message::RoutedOfferRequest { .. } => "a routed offer request",
            Message::LoadOfferRequest(_) => "a load offer request",
            Message::LoadOffer(_) => "a load offer",
            Message::RoutedLoadOfferRequest { .. } => "a routed load offer request",
            Message::HoldRequest(_) => "a hold request",
            Message::HoldPlaced(_) => "a hold placed",
            Message::HoldSettled(_) => "a hold settled",
            Message::LoadRefused(_) => "a load refusal",
            Message::RoutedLoadRequest { .. } => "a routed load request",
            Message::LoadExpire { .. } => "a load expiry",
            Message::ReversalsSince { .. } => "a reversal feed request",
            Message::Reversals(_) => "a reversal feed page",
            Message::Reversed(_) => "a reversal notice",
            Message::Ack { .. } => "an acknowledgement",
            Message::RoutedDebitCommand { .. } => "a routed debit command",
            Message::CollectionBatch(_) => "a collection batch",
            Message::BatchAck { .. } => "a batch acknowledgement",
            Message::LoadAdvice(_) => "a load advice",
            Message::HotlistRequest { .. } => "a hotlist request",
            Message::HotlistUpdate(_) => "a hotlist update",
            Message::RefundsDueRequest { .. } => "a refunds-due request",
            Message::TransferInvite(_) => "a transfer invite",
            Message::TransferJoin { .. } => "a transfer join",
            Message::TransferTerms(_) => "a transfer's terms",
            Message::TransferPost(_) => "a transfer packet posted",
            Message::TransferFetch { .. } => "a transfer packet fetch",
            Message::TransferPacket(_) => "a transfer packet",
            Message::RefundsDue(_) => "a list of refunds due",
            Message::RefundRequest(_) => "a refund request",
            Message::RefundCommand(_) => "a credit command",
            Message::RefundResponse(_) => "a credit response",
            Message::RefundProof(_) => "a proof of no credit",
        }
    }

    /// Encodes as a frame payload.
    pub fn to_payload(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("in-memory serialization of a message")
    }

    /// Encodes into one frame.
    pub fn to_frame(&self, max: usize) -> Result<Vec<u8>, WireError> {
        Ok(frame::encode(&self.to_payload(), max)?)
    }

    /// Decodes a frame payload: exactly one message, nothing after it. Never panics,
    /// whatever the bytes.
    ///
    /// # Errors
    /// [`WireError::Malformed`] when the bytes are not a message, or when bytes follow it.
    pub fn from_payload(payload: &[u8]) -> Result<Self, WireError> {
        strict(payload)
    }

    /// Decodes exactly one whole frame.
    pub fn from_frame(bytes: &[u8], max: usize) -> Result<Self, WireError> {
        Self::from_payload(&frame::decode_one(bytes, max)?)
    }

    pub fn error(code: ErrorCode, reason: impl Into<String>, txid: Option<&str>) -> Self {
        Self::Error(ErrorMsg {
            code,
            reason: reason.into(),
            transaction_id: txid.map(str::to_string),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::money::Currency;
    use rand::SeedableRng;

    #[test]
    fn protected_bodies_seal_and_refuse_stripping() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let tsk = DesKey::random(&mut rng);
        let body = DebitResultC {
            transaction_id: "t".into(),
            success: true,
            amount: Money::new(5, Currency::EUR),
            new_balance: 1,
        };
        let sealed = Protected::new(body.clone(), Some(&tsk), &mut rng);
        assert!(matches!(sealed, Protected::Sealed(_)));
        assert_eq!(sealed.open(Some(&tsk)).unwrap(), body);
        assert_eq!(sealed.open(None), Err(WireError::NoKey));
        let clear = Protected::new(body.clone(), None, &mut rng);
        assert_eq!(clear.open(Some(&tsk)), Err(WireError::ExpectedSealed));
        assert_eq!(clear.open(None).unwrap(), body);
    }

    #[test]
    fn message_frames_round_trip() {
        let m = Message::error(
            ErrorCode::UnknownMerchant,
            "merchant M-9 is not routed",
            Some("t1"),
        );
        let f = m.to_frame(frame::DEFAULT_MAX_FRAME).unwrap();
        assert_eq!(
            Message::from_frame(&f, frame::DEFAULT_MAX_FRAME).unwrap(),
            m
        );
        assert!(matches!(
            Message::from_frame(&f, 8),
            Err(WireError::Frame(FrameError::Oversize { .. }))
        ));
        assert!(matches!(
            Message::from_payload(&[0xFF, 0xFF]),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn trailing_bytes_after_a_message_are_refused() {
        let m = Message::Ack {
            transaction_id: "t1".into(),
        };
        let mut p = m.to_payload();
        assert_eq!(Message::from_payload(&p).unwrap(), m);
        p.push(0);
        match Message::from_payload(&p) {
            Err(WireError::Malformed(why)) => assert!(why.contains("1 trailing bytes"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
