//! What can go wrong outside the flows, as the flows are told it: the card or its reader
//! ([`CardFailure`]), the network to the head end ([`NetworkFailure`]), the box journal
//! ([`JournalFailure`]). The shell (`stbd`, a simulator, a test) maps its own errors onto
//! these at the flow boundary, once; the flows match on the kind where it decides something
//! and carry it, typed, into what they show ([`crate::show::Refusal`],
//! [`crate::show::Doubt`]) and log.
//!
//! The texts ([`std::fmt::Display`]) are those the shell's own errors give (`stbd`'s card
//! port and gateway client): they reach the TV's small print and the logs as they did when
//! the flows took words.
//!
//! Which kind matters where (001 [0075]: the set-top box talks to the card in the reader and
//! to the head end over the network; 001 [0106]: what may have moved decides recovery):
//! before DEBIT or LOAD any failure ends the flow with nothing moved; a card failure *during*
//! DEBIT or LOAD leaves the card's own answer unknown (its log decides), while a network
//! failure *after* DEBIT leaves the head end's answer unknown (the journaled debit response
//! is re-sent). The flows tell those apart by the input a failure comes in
//! (`Input::Card(Err(..))` or `Input::NetworkFailed(..)`); the variants below say what the
//! shell saw, for the viewer, the operator and the tests.

use std::time::Duration;

/// Why a command APDU got no reply from the card.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CardFailure {
    /// No card in the reader when the command was due: it was not sent.
    #[error("no card in the reader")]
    NoCard,
    /// The card left the reader (pulled, or gone mute) during the command; the reader's
    /// words. The card may have acted on the command.
    #[error("{0}")]
    Removed(String),
    /// The card gave no answer to reset within the shell's deadline: no command was sent.
    #[error("reader {reader}: no answer to reset")]
    NoAtr {
        /// The reader.
        reader: String,
    },
    /// The card did not answer the command within the shell's deadline. The card may have
    /// acted on it.
    #[error("reader {reader}: the card did not answer in {waited:?}")]
    NoAnswer {
        /// The reader.
        reader: String,
        /// How long the shell waited.
        waited: Duration,
    },
    /// Another application held the card for the whole deadline: the command was not sent.
    #[error("reader {reader}: the card stayed in use by another application for {waited:?}")]
    InUse {
        /// The reader.
        reader: String,
        /// How long the shell waited.
        waited: Duration,
    },
    /// Another application reset the card, and the command relied on the selection the
    /// reset took away: it was not sent.
    #[error(
        "reader {reader}: the card was reset by another application — select the application again"
    )]
    Reset {
        /// The reader.
        reader: String,
    },
    /// Any other reader, driver or line fault; the reader's words.
    #[error("{0}")]
    Reader(String),
}

/// Why a request to the head end got no usable answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NetworkFailure {
    /// No connection to the head end could be made; the transport's words. The request did
    /// not go out.
    #[error("head end unreachable: {0}")]
    Unreachable(String),
    /// The request failed on the connection (reset, refused, connection lost); the
    /// transport's words. It may have reached the head end.
    #[error("request to the head end failed: {0}")]
    Failed(String),
    /// No answer within the request deadline. The request may have reached the head end.
    #[error("the head end did not answer within {0:?}")]
    Timeout(Duration),
    /// An answer came but could not be decoded; the decoder's words.
    #[error("the head end's answer is malformed: {0}")]
    Malformed(String),
}

/// A journal read or write that failed, in the journal's words. Any journal failure stops
/// what it guards (journal before act); nothing decides by its kind.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JournalFailure(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts are the shell's (the TV's small print and the logs show them).
    #[test]
    fn failures_read_as_the_shell_said_them() {
        let r = || "R0".to_string();
        let waited = Duration::from_secs(5);
        for (f, text) in [
            (CardFailure::NoCard, "no card in the reader"),
            (
                CardFailure::Removed("reader R0: card was removed during the command".into()),
                "reader R0: card was removed during the command",
            ),
            (
                CardFailure::NoAtr { reader: r() },
                "reader R0: no answer to reset",
            ),
            (
                CardFailure::NoAnswer {
                    reader: r(),
                    waited,
                },
                "reader R0: the card did not answer in 5s",
            ),
            (
                CardFailure::InUse {
                    reader: r(),
                    waited,
                },
                "reader R0: the card stayed in use by another application for 5s",
            ),
            (
                CardFailure::Reset { reader: r() },
                "reader R0: the card was reset by another application — select the application again",
            ),
            (CardFailure::Reader("reader R0: x".into()), "reader R0: x"),
        ] {
            assert_eq!(f.to_string(), text);
        }
        for (f, text) in [
            (
                NetworkFailure::Unreachable("x".into()),
                "head end unreachable: x",
            ),
            (
                NetworkFailure::Failed("x".into()),
                "request to the head end failed: x",
            ),
            (
                NetworkFailure::Timeout(waited),
                "the head end did not answer within 5s",
            ),
            (
                NetworkFailure::Malformed("x".into()),
                "the head end's answer is malformed: x",
            ),
        ] {
            assert_eq!(f.to_string(), text);
        }
        assert_eq!(
            JournalFailure("journal: x".into()).to_string(),
            "journal: x"
        );
    }
}
