//! The async Reader API that `stbd` (and a payment server with a hardware security card)
//! uses, whatever the reader: PC/SC, serial Phoenix/Smartmouse, or the in-process virtual card.
//!
//! A driver lists readers, streams reader/card events, and opens a [`CardSession`] on a
//! reader. Sessions hand back whole responses: T=0 `61xx` (GET RESPONSE) and `6Cxx`
//! (wrong Le) are resolved here by [`transmit_whole`], once, for every driver.
//!
//! # Sharing the card with other programs
//!
//! On PC/SC the card may be shared with other programs on the same pcscd (OSCam, OpenSC).
//! Two things follow, and the API carries both:
//!
//! - **Transactions.** A multi-APDU sequence (SELECT → READ, INITIALIZE → DEBIT, 61xx → GET
//!   RESPONSE) runs between [`CardSession::begin_transaction`] and
//!   [`CardSession::end_transaction`] (PC/SC: `SCardBeginTransaction`/`SCardEndTransaction`);
//!   other programs' commands and resets wait until it ends. Transactions nest (only the
//!   outermost pair reaches the reader). Drivers whose card no other program can reach (serial,
//!   virtual) keep the default no-ops.
//! - **Resets.** When another program reset the card since this session last used it, whatever
//!   the card had selected is gone. `begin_transaction` says so (`Ok(true)`); a command sent
//!   outside a transaction fails with [`ReaderError::CardReset`] and is *not* re-sent. Either
//!   way the caller starts its sequence again with SELECT.

use std::future::Future;
use std::pin::Pin;

use tokio::sync::mpsc;

/// What is in a reader right now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardPresence {
    Absent,
    /// A card is in and powered or powerable; the ATR when known.
    Present {
        atr: Vec<u8>,
    },
    /// A card is in but does not answer to reset.
    Mute,
    /// Another application holds the card exclusively.
    InUse,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderInfo {
    pub name: String,
    pub card: CardPresence,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReaderEvent {
    ReaderAttached {
        reader: String,
    },
    ReaderDetached {
        reader: String,
    },
    CardInserted {
        reader: String,
        atr: Vec<u8>,
    },
    CardRemoved {
        reader: String,
    },
    /// The driver lost its service (pcscd went away) and is re-establishing it.
    ServiceLost {
        reason: String,
    },
    ServiceRestored,
}

/// Errors name the reader and say what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReaderError {
    #[error(
        "pcscd is not running — start it (systemctl start pcscd, or scripts/start-pcscd.sh without systemd) and try again"
    )]
    ServiceNotRunning,
    #[error("no reader attached — plug in a card reader")]
    NoReader,
    #[error(
        "reader {reader}: not found — check the reader name in the config (`stbd readers` lists them)"
    )]
    UnknownReader { reader: String },
    #[error("reader {reader}: no card — insert the card")]
    NoCard { reader: String },
    #[error("reader {reader}: card is mute — reinsert it")]
    Mute { reader: String },
    #[error("reader {reader}: card was removed during the command — reinsert it")]
    CardRemoved { reader: String },
    #[error("reader {reader}: card is in use by another application")]
    InUse { reader: String },
    /// Another program reset the card since this session last used it: the command was not
    /// sent, and whatever was selected is gone.
    #[error(
        "reader {reader}: the card was reset by another application — select the application again"
    )]
    CardReset { reader: String },
    #[error("reader {reader}: timed out after {millis} ms waiting for the card — reinsert it")]
    Timeout { reader: String, millis: u64 },
    #[error(
        "reader {reader}: parity error on the serial line — check the cable and the speed settings"
    )]
    Parity { reader: String },
    #[error("reader {reader}: malformed answer to reset: {detail}")]
    BadAtr { reader: String, detail: String },
    #[error("reader {reader}: protocol error: {detail}")]
    Protocol { reader: String, detail: String },
    #[error("reader {reader}: {detail}")]
    Io { reader: String, detail: String },
    #[error("the reader driver has shut down")]
    Shutdown,
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// An open session and the ATR the card answered with.
pub type Connected = (Box<dyn CardSession>, Vec<u8>);

/// A connection to the card in one reader.
pub trait CardSession: Send {
    /// The reader this session is on.
    fn reader(&self) -> &str;
    /// Cold or warm reset; returns the ATR.
    fn reset(&mut self) -> BoxFuture<'_, Result<Vec<u8>, ReaderError>>;
    /// Sends one command APDU and returns the raw response (data + SW), without T=0
    /// fix-ups. Callers use [`transmit_whole`].
    fn transmit_raw<'a>(
        &'a mut self,
        apdu: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, ReaderError>>;
    /// Ends the session. Drivers that own the reader power the card down; PC/SC leaves the
    /// card as it is, because other programs may be using it (pcscd powers an idle card down
    /// itself), and never waits for another program's transaction.
    fn power_down(&mut self) -> BoxFuture<'_, Result<(), ReaderError>>;
    /// Begins exclusive use of the card for a multi-APDU sequence (see the module docs).
    /// `Ok(true)`: another program reset the card since this session last used it, so the
    /// sequence must start with SELECT. Nested calls only count. May wait while another
    /// program holds its own transaction (bounded by the driver's timeout).
    fn begin_transaction(&mut self) -> BoxFuture<'_, Result<bool, ReaderError>> {
        Box::pin(async { Ok(false) })
    }
    /// Ends the sequence [`begin_transaction`](Self::begin_transaction) started, leaving the
    /// card powered and selected. Without an open transaction it does nothing.
    fn end_transaction(&mut self) -> BoxFuture<'_, Result<(), ReaderError>> {
        Box::pin(async { Ok(()) })
    }
}

/// A reader driver.
pub trait ReaderDriver: Send + Sync {
    /// A short name for logs: "pcsc", "serial", "virtual".
    fn kind(&self) -> &'static str;
    /// The readers attached now, with each one's card state.
    fn list(&self) -> BoxFuture<'_, Result<Vec<ReaderInfo>, ReaderError>>;
    /// A stream of events. Each call starts a new watcher; it stops when the receiver is
    /// dropped. The first events describe the current state (attached readers, cards in).
    fn events(&self) -> mpsc::Receiver<ReaderEvent>;
    /// Powers up the card in `reader` and opens a session; returns the session and the ATR.
    fn connect<'a>(&'a self, reader: &'a str) -> BoxFuture<'a, Result<Connected, ReaderError>>;
}

/// How many GET RESPONSE / re-send rounds we follow before calling the card broken. Bounded,
/// so a card that answers 61xx forever cannot loop us endlessly.
const MAX_CHAINED: usize = 32;

/// True for ISO 7816-4 SELECT (any class, INS `A4`): the command that starts a sequence.
pub fn is_select(apdu: &[u8]) -> bool {
    apdu.get(1) == Some(&0xA4)
}

/// Transmits `apdu` and resolves T=0 `61xx` and `6Cxx` so the caller gets the whole response.
///
/// The command and its GET RESPONSE / re-send run in one transaction, so no other program's
/// command comes between them (nested in the caller's, if it holds one). If the card was reset
/// since the session last used it, a SELECT is sent anyway (it starts over); any other command
/// fails with [`ReaderError::CardReset`] without being sent.
pub async fn transmit_whole(
    session: &mut dyn CardSession,
    apdu: &[u8],
) -> Result<Vec<u8>, ReaderError> {
    let reset = session.begin_transaction().await?;
    if reset && !is_select(apdu) {
        let _ = session.end_transaction().await;
        return Err(ReaderError::CardReset {
            reader: session.reader().to_string(),
        });
    }
    let r = chained(session, apdu).await;
    if let Err(e) = session.end_transaction().await {
        // The answer (if any) still stands; a broken session shows on its next use.
        tracing::debug!(reader = %session.reader(), error = %e, "ending the transaction failed");
    }
    r
}

async fn chained(session: &mut dyn CardSession, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
    let mut command = apdu.to_vec();
    let mut data = Vec::new();
    for _ in 0..MAX_CHAINED {
        let resp = session.transmit_raw(&command).await?;
        let Some((body, sw)) = resp.split_last_chunk::<2>() else {
            return Err(ReaderError::Protocol {
                reader: session.reader().to_string(),
                detail: format!("response of {} bytes has no status word", resp.len()),
            });
        };
        match sw[0] {
            0x61 => {
                data.extend_from_slice(body);
                // GET RESPONSE with the class of the original command.
                command = vec![apdu.first().copied().unwrap_or(0), 0xC0, 0, 0, sw[1]];
            }
            // 6Cxx only makes sense for a case 1/2 command (no data): re-send it with the
            // Le the card asked for.
            0x6C if command.len() == 4 || command.len() == 5 => {
                command.truncate(4);
                command.push(sw[1]);
            }
            _ => {
                data.extend_from_slice(&resp);
                return Ok(data);
            }
        }
    }
    Err(ReaderError::Protocol {
        reader: session.reader().to_string(),
        detail: format!("card kept chaining after {MAX_CHAINED} responses"),
    })
}
