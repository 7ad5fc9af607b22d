//! The set-top box's core: its transaction flows as sans-IO state machines. Inputs in
//! (gateway answers, card responses, viewer decisions, failures), actions out (send a
//! message, send an APDU, write the journal, show something). No sockets, readers, clocks,
//! UI or async runtime here: a shell (`stbd`'s daemon, a simulator, a test) executes the
//! actions in order and feeds the results back. The crate depends on `proto` only (plus
//! `rand` for sealing and jitter, `postcard` for the PIN block, `tracing` for logs,
//! `thiserror` for the failures' texts).
//!
//! - [`purchase`]: one purchase (draw), 001 [0071]–[0094].
//! - [`recovery`]: what to do with an in-doubt purchase, given the journal, the card's log
//!   and the head end's answers (001 [0106]); the recovery timer's schedule; and
//!   [`recovery::round`], one recovery round over the journal's in-doubt purchases and
//!   loads (card reads, messages, journal writes) as a sans-IO machine.
//! - [`load`]: one load of value onto the card, 001 [0117]–[0160], and its recovery.
//! - [`refund`]: the refunds due to the card in the reader, credited (issue 17).
//! - [`privacy`]: the cardholder's privacy switch (seed 004): SELECT, VERIFY, SET PRIVACY.
//! - [`transfer`]: card to card across two boxes through the gateway (seed 004 FIG. 4).
//! - [`failure`]: what the shell reports when the card, the network or the journal fails
//!   ([`CardFailure`], [`NetworkFailure`], [`JournalFailure`]), typed.
//! - [`show`]: what the flows ask the TV to show, as their own vocabulary (no wording: the
//!   sentences are the TV crate's).
//!
//! Amounts are [`proto::money::Money`] (minor units with their currency) or plain `u64`
//! minor units of the card's currency; durations are [`std::time::Duration`].

pub mod failure;
pub mod load;
pub mod privacy;
pub mod purchase;
pub mod recovery;
pub mod refund;
pub mod show;
pub mod transfer;

pub use failure::{CardFailure, JournalFailure, NetworkFailure};

use proto::apdu::StatusWord;
use proto::messages::Message;

/// What a flow asks its shell to do next; the shell executes a flow's actions in order.
/// `S` is the flow's journal step, `O` its outcome ([`purchase::Action`],
/// [`load::Action`]).
#[derive(Debug, Clone, PartialEq)]
// One per step, consumed at once: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Action<S, O> {
    /// One request to the gateway; its answer comes back as the flow's `Input::Answer` or
    /// `Input::NetworkFailed`.
    Send(Message),
    /// One command APDU to the card; the reply comes back as the flow's `Input::Card`.
    Apdu(Vec<u8>),
    /// Write this step for the transaction before executing the next actions. If the write
    /// fails the shell must not execute the rest: the flow stops there.
    Journal { transaction_id: String, step: S },
    /// Show this on the TV.
    Show(show::Show),
    /// The flow is over.
    Done(O),
}

/// A card's answer to one command APDU: the card's ATR (as the reader saw it at power-up)
/// and the response APDU (data and status word).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CardReply {
    /// The card's answer to reset.
    pub atr: Vec<u8>,
    /// Response data followed by the two status-word bytes.
    pub response: Vec<u8>,
}

/// A retry delay: `initial · 2^attempt`, capped at `max`, then a random point in its upper
/// half (jitter), so a fleet of boxes that lost the head end together does not come back in
/// lockstep. Used for reconnects and for the recovery timer.
#[must_use]
pub fn backoff(
    attempt: u32,
    initial: std::time::Duration,
    max: std::time::Duration,
    rng: &mut impl rand::Rng,
) -> std::time::Duration {
    let exp = initial
        .checked_mul(1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX))
        .unwrap_or(max)
        .min(max);
    let half = exp / 2;
    half + std::time::Duration::from_nanos(
        rng.gen_range(0..=half.as_nanos().min(u64::MAX as u128) as u64),
    )
}

/// Splits a response APDU into data and status word; `None` if it has no status word.
#[must_use]
pub fn split_sw(resp: &[u8]) -> Option<(&[u8], StatusWord)> {
    let (data, sw) = resp.split_last_chunk::<2>()?;
    Some((data, StatusWord(u16::from_be_bytes(*sw))))
}
