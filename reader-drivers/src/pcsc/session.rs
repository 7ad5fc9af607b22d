//! One PC/SC connection to a card, served by a thread of its own ("pcsc-card").
//!
//! The thread owns the `pcsc::Card` from `SCardConnect` to `SCardDisconnect` and runs every
//! call on it in order, so a PC/SC transaction (`pcsc::Transaction`, which borrows the card)
//! can stay open across several async calls: SELECT → READ, INITIALIZE → DEBIT. The async side
//! ([`PcscSession`]) sends it one request at a time and waits, bounded by the session timeout.
//!
//! Sharing with other programs on the same pcscd:
//!
//! - The card is never reset or powered down on our behalf except by [`Op::Reset`]: the
//!   connection ends with `SCARD_LEAVE_CARD` (the `pcsc` crate's `Drop` would reset the card
//!   under every other program), and a transaction ends the same way.
//! - `SCARD_W_RESET_CARD` (another program reset the card) is acknowledged with a reconnect that
//!   leaves the card, and reported: at the start of a transaction as "reset" (the caller then
//!   selects again, as every sequence starts with SELECT), on a command as
//!   [`ReaderError::CardReset`]. The command is not re-sent: the card lost its selection, and a
//!   blind re-send is what made READ PURSE answer `6985` before.
//! - A call that blocks (another program holds a transaction: pcscd makes `SCardConnect` and
//!   `SCardBeginTransaction` wait for it) blocks this thread only. The caller times out; the
//!   session is then given up, and the thread ends as soon as the call returns. One thread per
//!   session, never one per attempt.

use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use pcsc::{Card, Disposition, Protocols, ShareMode, Transaction};
use tokio::sync::oneshot;

use super::errors::map_error;
use super::{ConnectPermit, classify_failure, classify_short_response, establish, reader_cstring};
use crate::api::{BoxFuture, CardSession, ReaderError};

/// A request to the card thread.
pub(crate) enum Op {
    Transmit(Vec<u8>),
    Begin,
    End,
    Reset,
}

pub(crate) enum Done {
    Bytes(Vec<u8>),
    Began { reset: bool },
    Ended,
    Atr(Vec<u8>),
}

struct Req {
    op: Op,
    reply: oneshot::Sender<Result<Done, ReaderError>>,
}

/// A PC/SC connection to one card (see the module docs).
pub struct PcscSession {
    reader: String,
    atr: Vec<u8>,
    timeout: Duration,
    /// To the card thread; `None` once the session is closed or given up.
    tx: Option<std_mpsc::Sender<Req>>,
    /// Why the session cannot be used any more (a call timed out: the thread is still in it).
    broken: Option<String>,
    /// Open [`CardSession::begin_transaction`] calls; only the outermost reaches pcscd.
    depth: u32,
}

/// Opens a connection on a new card thread and waits (up to `timeout`) for `SCardConnect`.
/// `permit` is released as soon as `SCardConnect` returns, whoever still waits for it.
pub(crate) async fn open(
    reader: String,
    permit: ConnectPermit,
    connect_timeout: Duration,
    timeout: Duration,
) -> Result<PcscSession, ReaderError> {
    let (tx, rx) = std_mpsc::channel::<Req>();
    let (ctx, crx) = oneshot::channel();
    let name = reader.clone();
    std::thread::Builder::new()
        .name("pcsc-card".into())
        .spawn(move || run(name, permit, ctx, rx))
        .map_err(|e| ReaderError::Io {
            reader: reader.clone(),
            detail: format!("cannot start the PC/SC card thread: {e}"),
        })?;
    match tokio::time::timeout(connect_timeout, crx).await {
        Ok(Ok(Ok(atr))) => Ok(PcscSession {
            reader,
            atr,
            timeout,
            tx: Some(tx),
            broken: None,
            depth: 0,
        }),
        Ok(Ok(Err(e))) => Err(e),
        Ok(Err(_)) => Err(worker_gone(&reader)),
        // The thread stays in SCardConnect until it returns, then sees nobody waits for the
        // card and disconnects; the permit keeps any other attempt on this reader from
        // starting a second thread meanwhile.
        Err(_) => Err(ReaderError::Timeout {
            reader,
            millis: connect_timeout.as_millis() as u64,
        }),
    }
}

fn worker_gone(reader: &str) -> ReaderError {
    ReaderError::Io {
        reader: reader.to_string(),
        detail: "the PC/SC card thread ended — connect again".into(),
    }
}

impl PcscSession {
    /// The ATR the card answered with (at connect, or at the last reset).
    pub fn atr(&self) -> &[u8] {
        &self.atr
    }

    async fn call(&mut self, op: Op) -> Result<Done, ReaderError> {
        if let Some(why) = &self.broken {
            return Err(ReaderError::Io {
                reader: self.reader.clone(),
                detail: why.clone(),
            });
        }
        let Some(tx) = &self.tx else {
            return Err(ReaderError::Io {
                reader: self.reader.clone(),
                detail: "session is closed — connect again".into(),
            });
        };
        let (rtx, rrx) = oneshot::channel();
        if tx.send(Req { op, reply: rtx }).is_err() {
            self.tx = None;
            return Err(worker_gone(&self.reader));
        }
        match tokio::time::timeout(self.timeout, rrx).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => {
                self.tx = None;
                Err(worker_gone(&self.reader))
            }
            Err(_) => {
                // The thread is still in the call. Give the session up: dropping the sender
                // lets the thread end (leaving the card) once the call returns.
                self.tx = None;
                self.broken =
                    Some("an earlier call on this session timed out — connect again".into());
                Err(ReaderError::Timeout {
                    reader: self.reader.clone(),
                    millis: self.timeout.as_millis() as u64,
                })
            }
        }
    }
}

fn unexpected(reader: &str) -> ReaderError {
    ReaderError::Io {
        reader: reader.to_string(),
        detail: "the PC/SC card thread answered out of turn".into(),
    }
}

impl CardSession for PcscSession {
    fn reader(&self) -> &str {
        &self.reader
    }

    fn reset(&mut self) -> BoxFuture<'_, Result<Vec<u8>, ReaderError>> {
        Box::pin(async move {
            match self.call(Op::Reset).await? {
                Done::Atr(atr) => {
                    self.atr = atr.clone();
                    Ok(atr)
                }
                _ => Err(unexpected(&self.reader)),
            }
        })
    }

    fn transmit_raw<'a>(
        &'a mut self,
        apdu: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, ReaderError>> {
        Box::pin(async move {
            if apdu.len() < 4 {
                return Err(ReaderError::Protocol {
                    reader: self.reader.clone(),
                    detail: format!(
                        "command APDU of {} bytes is shorter than the 4-byte header",
                        apdu.len()
                    ),
                });
            }
            match self.call(Op::Transmit(apdu.to_vec())).await? {
                Done::Bytes(b) => Ok(b),
                _ => Err(unexpected(&self.reader)),
            }
        })
    }

    fn power_down(&mut self) -> BoxFuture<'_, Result<(), ReaderError>> {
        Box::pin(async move {
            // Closing the channel ends the thread: it ends any transaction and disconnects,
            // leaving the card for the other programs.
            self.tx = None;
            self.depth = 0;
            Ok(())
        })
    }

    fn begin_transaction(&mut self) -> BoxFuture<'_, Result<bool, ReaderError>> {
        Box::pin(async move {
            if self.depth > 0 {
                self.depth += 1;
                return Ok(false);
            }
            match self.call(Op::Begin).await? {
                Done::Began { reset } => {
                    self.depth = 1;
                    Ok(reset)
                }
                _ => Err(unexpected(&self.reader)),
            }
        })
    }

    fn end_transaction(&mut self) -> BoxFuture<'_, Result<(), ReaderError>> {
        Box::pin(async move {
            match self.depth {
                0 => Ok(()),
                1 => {
                    self.depth = 0;
                    match self.call(Op::End).await? {
                        Done::Ended => Ok(()),
                        _ => Err(unexpected(&self.reader)),
                    }
                }
                _ => {
                    self.depth -= 1;
                    Ok(())
                }
            }
        })
    }
}

// ---------------------------------------------------------------------------------------
// The card thread

/// A card that is disconnected leaving it as it is, however the thread ends.
struct Owned(Option<Card>);

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(card) = self.0.take() {
            leave(card);
        }
    }
}

/// Disconnects without resetting the card. If even that fails (pcscd went away), the handle is
/// forgotten rather than dropped: the `pcsc` crate's `Drop` would reset the card.
pub(crate) fn leave(card: Card) {
    if let Err((card, e)) = card.disconnect(Disposition::LeaveCard) {
        tracing::debug!(error = %e, "pcsc: disconnect failed; handle abandoned");
        std::mem::forget(card);
    }
}

/// What the card thread does with a card, in or out of a transaction.
trait Handle {
    fn card(&self) -> &Card;
    fn reconnect(&mut self, init: Disposition) -> Result<(), pcsc::Error>;
}

impl Handle for Card {
    fn card(&self) -> &Card {
        self
    }
    fn reconnect(&mut self, init: Disposition) -> Result<(), pcsc::Error> {
        Card::reconnect(self, ShareMode::Shared, Protocols::ANY, init)
    }
}

impl Handle for Transaction<'_> {
    fn card(&self) -> &Card {
        self
    }
    fn reconnect(&mut self, init: Disposition) -> Result<(), pcsc::Error> {
        Transaction::reconnect(self, ShareMode::Shared, Protocols::ANY, init)
    }
}

fn connect_card(reader: &str) -> Result<(Card, Vec<u8>), ReaderError> {
    let ctx = establish()?;
    let name = reader_cstring(reader)?;
    let card = ctx
        .connect(&name, ShareMode::Shared, Protocols::ANY)
        .map_err(|e| match e {
            // pcsc-lite says "no readers" when the named reader is missing and none exist.
            pcsc::Error::NoReadersAvailable => ReaderError::NoReader,
            e => map_error(e, Some(reader)),
        })?;
    match card.status2_owned() {
        Ok(s) => {
            let atr = s.atr().to_vec();
            tracing::debug!(reader = %reader, atr = %hex::encode(&atr), "pcsc: connected");
            Ok((card, atr))
        }
        Err(e) => {
            leave(card);
            Err(map_error(e, Some(reader)))
        }
    }
}

fn run(
    reader: String,
    permit: ConnectPermit,
    connected: oneshot::Sender<Result<Vec<u8>, ReaderError>>,
    rx: std_mpsc::Receiver<Req>,
) {
    let r = connect_card(&reader);
    drop(permit);
    let (card, atr) = match r {
        Ok(c) => c,
        Err(e) => {
            let _ = connected.send(Err(e));
            return;
        }
    };
    let mut card = Owned(Some(card));
    if connected.send(Ok(atr)).is_err() {
        tracing::debug!(reader = %reader, "pcsc: connected after the caller gave up; leaving the card");
        return;
    }
    if let Some(c) = card.0.as_mut() {
        serve(c, &reader, &rx);
    }
    tracing::debug!(reader = %reader, "pcsc: session ended");
}

/// Serves requests outside a transaction until the session ends.
fn serve(card: &mut Card, reader: &str, rx: &std_mpsc::Receiver<Req>) {
    while let Ok(req) = rx.recv() {
        match req.op {
            Op::Begin => match begin(card, reader) {
                Ok((tx, reset)) => {
                    if req.reply.send(Ok(Done::Began { reset })).is_err() {
                        // The caller gave up meanwhile: do not hold the card for nobody.
                        drop(tx);
                        continue;
                    }
                    if !serve_transaction(tx, reader, rx) {
                        return;
                    }
                }
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                }
            },
            Op::End => {
                let _ = req.reply.send(Ok(Done::Ended));
            }
            Op::Transmit(apdu) => {
                let _ = req
                    .reply
                    .send(transmit(card, &apdu, reader).map(Done::Bytes));
            }
            Op::Reset => {
                let _ = req.reply.send(reset(card, reader).map(Done::Atr));
            }
        }
    }
}

/// Serves requests inside a transaction until it ends (true) or the session ends (false; the
/// transaction ends as `tx` drops, leaving the card).
fn serve_transaction(mut tx: Transaction<'_>, reader: &str, rx: &std_mpsc::Receiver<Req>) -> bool {
    while let Ok(req) = rx.recv() {
        match req.op {
            Op::End => {
                let r = match tx.end(Disposition::LeaveCard) {
                    Ok(()) => Ok(Done::Ended),
                    Err((tx, e)) => {
                        // Dropping it tries once more; either way the lock goes with the
                        // connection at the latest.
                        let err = classify_failure(&tx, e, reader);
                        drop(tx);
                        Err(err)
                    }
                };
                let _ = req.reply.send(r);
                return true;
            }
            // The async side counts nesting; a second Begin cannot come, but is harmless.
            Op::Begin => {
                let _ = req.reply.send(Ok(Done::Began { reset: false }));
            }
            Op::Transmit(apdu) => {
                let _ = req
                    .reply
                    .send(transmit(&mut tx, &apdu, reader).map(Done::Bytes));
            }
            Op::Reset => {
                let _ = req.reply.send(reset(&mut tx, reader).map(Done::Atr));
            }
        }
    }
    false
}

/// `SCardBeginTransaction`; after another program's reset, acknowledges it (reconnect leaving
/// the card) and begins again, reporting the reset.
fn begin<'c>(card: &'c mut Card, reader: &str) -> Result<(Transaction<'c>, bool), ReaderError> {
    let card = match card.transaction2() {
        Ok(tx) => return Ok((tx, false)),
        Err((card, pcsc::Error::ResetCard)) => card,
        Err((card, e)) => return Err(classify_failure(card, e, reader)),
    };
    tracing::info!(reader = %reader, "pcsc: the card was reset by another application; the sequence starts over");
    Handle::reconnect(card, Disposition::LeaveCard)
        .map_err(|e| classify_failure(card, e, reader))?;
    match card.transaction2() {
        Ok(tx) => Ok((tx, true)),
        Err((card, e)) => Err(classify_failure(card, e, reader)),
    }
}

fn transmit<H: Handle>(h: &mut H, apdu: &[u8], reader: &str) -> Result<Vec<u8>, ReaderError> {
    let mut buf = vec![0u8; pcsc::MAX_BUFFER_SIZE_EXTENDED];
    let r = h.card().transmit(apdu, &mut buf).map(|r| r.to_vec());
    match r {
        Ok(resp) if resp.len() >= 2 => Ok(resp),
        Ok(resp) => Err(classify_short_response(h.card(), &resp, reader)),
        // pcscd refuses the command before sending it. Acknowledge the reset so the next
        // call goes through, and let the caller start again from SELECT.
        Err(pcsc::Error::ResetCard) => {
            tracing::info!(reader = %reader, "pcsc: the card was reset by another application; command not sent");
            h.reconnect(Disposition::LeaveCard)
                .map_err(|e| classify_failure(h.card(), e, reader))?;
            Err(ReaderError::CardReset {
                reader: reader.to_string(),
            })
        }
        Err(e) => Err(classify_failure(h.card(), e, reader)),
    }
}

fn reset<H: Handle>(h: &mut H, reader: &str) -> Result<Vec<u8>, ReaderError> {
    h.reconnect(Disposition::ResetCard)
        .map_err(|e| classify_failure(h.card(), e, reader))?;
    let status = h
        .card()
        .status2_owned()
        .map_err(|e| map_error(e, Some(reader)))?;
    Ok(status.atr().to_vec())
}
