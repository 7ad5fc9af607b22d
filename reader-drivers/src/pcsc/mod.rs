//! PC/SC driver over the `pcsc` crate (USB CCID readers, and vsmartcard's virtual reader,
//! through pcscd).
//!
//! - [`PcscDriver`] implements [`ReaderDriver`]. `list` and `connect` establish a fresh PC/SC
//!   context per call, so a pcscd restart between calls needs no recovery; event streams run
//!   on dedicated blocking threads ([`watcher`]) that re-establish their context themselves.
//! - Every blocking pcsc call runs under `spawn_blocking`; `transmit` is also bounded by a
//!   timeout so a reader that never answers cannot hang the caller.
//! - `pcsc::Error`s become [`ReaderError`]s that name the reader and say what to do
//!   ([`errors`]).

mod errors;
mod watcher;

use std::ffi::CString;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pcsc::{Card, Context, Disposition, Protocols, ReaderState, Scope, ShareMode, State};
use tokio::sync::mpsc;

use crate::api::{
    BoxFuture, CardPresence, CardSession, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo,
};
use errors::map_error;
use watcher::{Timing, WatchCtl};

/// Capacity of an event channel. The watcher blocks (it is on its own thread) when the
/// consumer lags, so nothing is dropped.
const EVENT_CAPACITY: usize = 64;

/// The PC/SC reader driver.
pub struct PcscDriver {
    watchers: Mutex<Vec<Weak<WatchCtl>>>,
    transmit_timeout: Duration,
    timing: Timing,
}

impl Default for PcscDriver {
    fn default() -> Self {
        Self::new()
    }
}

impl PcscDriver {
    pub fn new() -> Self {
        Self {
            watchers: Mutex::new(Vec::new()),
            transmit_timeout: Duration::from_secs(30),
            timing: Timing {
                poll: Duration::from_secs(1),
                retry: Duration::from_millis(500),
            },
        }
    }

    /// How long one APDU exchange may take before the session gives up with
    /// [`ReaderError::Timeout`] (default 30 s; slow cards doing crypto need seconds).
    pub fn with_transmit_timeout(mut self, timeout: Duration) -> Self {
        self.transmit_timeout = timeout;
        self
    }

    /// How often a watcher retries a pcscd that is not running (default 500 ms).
    pub fn with_service_retry(mut self, retry: Duration) -> Self {
        self.timing.retry = retry;
        self
    }

    /// Stops every event watcher (SCardCancel wakes their blocking wait). Their receivers then
    /// end. Also done on drop.
    pub fn shutdown(&self) {
        let watchers =
            std::mem::take(&mut *self.watchers.lock().unwrap_or_else(|p| p.into_inner()));
        for w in watchers.iter().filter_map(Weak::upgrade) {
            w.cancel();
        }
    }
}

impl Drop for PcscDriver {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn establish() -> Result<Context, ReaderError> {
    Context::establish(Scope::User).map_err(|e| map_error(e, None))
}

fn reader_cstring(reader: &str) -> Result<CString, ReaderError> {
    CString::new(reader).map_err(|_| ReaderError::UnknownReader {
        reader: reader.escape_debug().to_string(),
    })
}

/// Runs blocking pcsc work off the async runtime.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ReaderError> + Send + 'static,
) -> Result<T, ReaderError> {
    tokio::task::spawn_blocking(f).await.unwrap_or_else(|e| {
        Err(ReaderError::Io {
            reader: "(pcsc)".into(),
            detail: format!("PC/SC worker failed: {e}"),
        })
    })
}

fn list_blocking() -> Result<Vec<ReaderInfo>, ReaderError> {
    let ctx = establish()?;
    let names = match ctx.list_readers_owned() {
        Ok(n) => n,
        Err(pcsc::Error::NoReadersAvailable) => return Ok(Vec::new()),
        Err(e) => return Err(map_error(e, None)),
    };
    let mut states: Vec<ReaderState> = names
        .into_iter()
        .map(|n| ReaderState::new(n, State::UNAWARE))
        .collect();
    if !states.is_empty() {
        // UNAWARE makes this return the current state at once.
        ctx.get_status_change(Duration::ZERO, &mut states)
            .map_err(|e| map_error(e, None))?;
    }
    Ok(states
        .iter()
        .map(|s| ReaderInfo {
            name: s.name().to_string_lossy().into_owned(),
            card: watcher::presence(s.event_state(), s.atr()),
        })
        .collect())
}

fn connect_blocking(reader: String) -> Result<PcscSession, ReaderError> {
    let ctx = establish()?;
    let name = reader_cstring(&reader)?;
    let card = ctx
        .connect(&name, ShareMode::Shared, Protocols::ANY)
        .map_err(|e| match e {
            // pcsc-lite says "no readers" when the named reader is missing and none exist.
            pcsc::Error::NoReadersAvailable => ReaderError::NoReader,
            e => map_error(e, Some(&reader)),
        })?;
    let atr = card
        .status2_owned()
        .map_err(|e| map_error(e, Some(&reader)))?
        .atr()
        .to_vec();
    tracing::debug!(reader = %reader, atr = %hex::encode(&atr), "pcsc: connected");
    Ok(PcscSession {
        reader,
        card: Arc::new(Mutex::new(Some(card))),
        atr,
        timeout: Duration::ZERO,
    })
}

impl ReaderDriver for PcscDriver {
    fn kind(&self) -> &'static str {
        "pcsc"
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ReaderInfo>, ReaderError>> {
        Box::pin(blocking(list_blocking))
    }

    fn events(&self) -> mpsc::Receiver<ReaderEvent> {
        let (tx, rx) = mpsc::channel(EVENT_CAPACITY);
        let ctl = WatchCtl::new();
        {
            let mut ws = self.watchers.lock().unwrap_or_else(|p| p.into_inner());
            ws.retain(|w| w.strong_count() > 0);
            ws.push(Arc::downgrade(&ctl));
        }
        // Wake the blocked wait as soon as the receiver goes, rather than at the next poll.
        // The thread drops `done` when it ends, which ends this task and so its sender clone:
        // the receiver then sees the stream end.
        let (done, done_rx) = tokio::sync::oneshot::channel::<()>();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (tx2, ctl2) = (tx.clone(), Arc::downgrade(&ctl));
            rt.spawn(async move {
                tokio::select! {
                    _ = tx2.closed() => {
                        if let Some(c) = ctl2.upgrade() {
                            c.cancel();
                        }
                    }
                    _ = done_rx => {}
                }
            });
        }
        let timing = self.timing;
        let spawned = std::thread::Builder::new()
            .name("pcsc-events".into())
            .spawn(move || {
                watcher::run(ctl, tx, timing);
                drop(done);
            });
        if let Err(e) = spawned {
            // The receiver ends at once; say why in the log.
            tracing::error!(error = %e, "pcsc: cannot start the event thread");
        }
        rx
    }

    fn connect<'a>(
        &'a self,
        reader: &'a str,
    ) -> BoxFuture<'a, Result<(Box<dyn CardSession>, Vec<u8>), ReaderError>> {
        let reader = reader.to_string();
        let timeout = self.transmit_timeout;
        Box::pin(async move {
            let mut session = blocking(move || connect_blocking(reader)).await?;
            session.timeout = timeout;
            let atr = session.atr.clone();
            Ok((Box::new(session) as Box<dyn CardSession>, atr))
        })
    }
}

/// A PC/SC connection to one card. The card handle sits behind a mutex shared with the
/// blocking workers, so a caller that gives up (timeout, dropped future) does not lose it.
pub struct PcscSession {
    reader: String,
    card: Arc<Mutex<Option<Card>>>,
    atr: Vec<u8>,
    timeout: Duration,
}

impl PcscSession {
    /// Runs `f` on the card in a blocking worker, bounded by the session timeout.
    async fn with_card<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Option<Card>, &str) -> Result<T, ReaderError> + Send + 'static,
    ) -> Result<T, ReaderError> {
        let card = self.card.clone();
        let reader = self.reader.clone();
        let work = blocking(move || {
            let mut guard = card.lock().unwrap_or_else(|p| p.into_inner());
            f(&mut guard, &reader)
        });
        match tokio::time::timeout(self.timeout, work).await {
            Ok(r) => r,
            Err(_) => Err(ReaderError::Timeout {
                reader: self.reader.clone(),
                millis: self.timeout.as_millis() as u64,
            }),
        }
    }
}

fn closed(reader: &str) -> ReaderError {
    ReaderError::Io {
        reader: reader.to_string(),
        detail: "session is powered down — connect again".into(),
    }
}

/// How long a failed exchange waits for pcscd to notice that the card went away: pcscd polls
/// readers (vpcd every 400 ms), so right after a pull the card may still read as present.
const REMOVAL_GRACE: Duration = Duration::from_millis(1500);

/// True when the reader says the card in this session is gone, waiting up to `grace` for it
/// to notice.
fn card_gone(card: &Card, grace: Duration) -> bool {
    let deadline = std::time::Instant::now() + grace;
    loop {
        match card.status2_owned() {
            Err(pcsc::Error::RemovedCard) | Err(pcsc::Error::NoSmartcard) => return true,
            Ok(s) if !s.status().contains(pcsc::Status::PRESENT) => return true,
            _ => {}
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// After a failed exchange, asks the reader whether the card is still there, so a card
/// pulled mid-APDU reads as `CardRemoved` whatever error the transport gave.
fn classify_failure(card: &Card, e: pcsc::Error, reader: &str) -> ReaderError {
    if e == pcsc::Error::RemovedCard || card_gone(card, REMOVAL_GRACE) {
        return ReaderError::CardRemoved {
            reader: reader.to_string(),
        };
    }
    map_error(e, Some(reader))
}

/// A "successful" exchange without a status word: vpcd answers that way when the card went
/// away mid-command; otherwise the card did not answer properly.
fn classify_short_response(card: &Card, resp: &[u8], reader: &str) -> ReaderError {
    if card_gone(card, REMOVAL_GRACE) {
        ReaderError::CardRemoved {
            reader: reader.to_string(),
        }
    } else if resp.is_empty() {
        ReaderError::Mute {
            reader: reader.to_string(),
        }
    } else {
        ReaderError::Protocol {
            reader: reader.to_string(),
            detail: format!(
                "response {} has no status word — reinsert the card",
                hex::encode(resp)
            ),
        }
    }
}

impl CardSession for PcscSession {
    fn reader(&self) -> &str {
        &self.reader
    }

    fn reset(&mut self) -> BoxFuture<'_, Result<Vec<u8>, ReaderError>> {
        Box::pin(async move {
            let atr = self
                .with_card(|card, reader| {
                    let card = card.as_mut().ok_or_else(|| closed(reader))?;
                    card.reconnect(ShareMode::Shared, Protocols::ANY, Disposition::ResetCard)
                        .map_err(|e| classify_failure(card, e, reader))?;
                    let status = card
                        .status2_owned()
                        .map_err(|e| map_error(e, Some(reader)))?;
                    Ok(status.atr().to_vec())
                })
                .await?;
            self.atr = atr.clone();
            Ok(atr)
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
            let apdu = apdu.to_vec();
            self.with_card(move |card, reader| {
                let card = card.as_mut().ok_or_else(|| closed(reader))?;
                let mut buf = vec![0u8; pcsc::MAX_BUFFER_SIZE_EXTENDED];
                let first = match card.transmit(&apdu, &mut buf) {
                    Ok(resp) => Ok(resp.to_vec()),
                    Err(e) => Err(e),
                };
                match first {
                    Ok(resp) if resp.len() >= 2 => return Ok(resp),
                    Ok(resp) => return Err(classify_short_response(card, &resp, reader)),
                    // Another application reset the card: reconnect once and re-send.
                    Err(pcsc::Error::ResetCard) => {
                        tracing::info!(reader = %reader, "pcsc: card was reset by another application; reconnecting");
                        card.reconnect(ShareMode::Shared, Protocols::ANY, Disposition::LeaveCard)
                            .map_err(|e| classify_failure(card, e, reader))?;
                    }
                    Err(e) => return Err(classify_failure(card, e, reader)),
                }
                match card.transmit(&apdu, &mut buf).map(|r| r.to_vec()) {
                    Ok(resp) if resp.len() >= 2 => Ok(resp),
                    Ok(resp) => Err(classify_short_response(card, &resp, reader)),
                    Err(e) => Err(classify_failure(card, e, reader)),
                }
            })
            .await
        })
    }

    fn power_down(&mut self) -> BoxFuture<'_, Result<(), ReaderError>> {
        Box::pin(async move {
            self.with_card(|card, reader| {
                let Some(card) = card.take() else {
                    return Ok(());
                };
                match card.disconnect(Disposition::UnpowerCard) {
                    Ok(()) => Ok(()),
                    // The card is already gone: powered down as far as anyone can tell.
                    Err((_, pcsc::Error::RemovedCard | pcsc::Error::NoSmartcard)) => Ok(()),
                    Err((_, e)) => Err(map_error(e, Some(reader))),
                }
            })
            .await
        })
    }
}

/// The card state of one reader, for callers that want a single reader without a session.
pub async fn reader_state(reader: &str) -> Result<CardPresence, ReaderError> {
    let reader = reader.to_string();
    blocking(move || {
        let ctx = establish()?;
        let mut st = [ReaderState::new(reader_cstring(&reader)?, State::UNAWARE)];
        ctx.get_status_change(Duration::ZERO, &mut st)
            .map_err(|e| map_error(e, Some(&reader)))?;
        if st[0].event_state().contains(State::UNKNOWN) {
            return Err(ReaderError::UnknownReader { reader });
        }
        Ok(watcher::presence(st[0].event_state(), st[0].atr()))
    })
    .await
}
