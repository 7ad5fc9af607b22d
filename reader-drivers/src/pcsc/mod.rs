//! PC/SC driver over the `pcsc` crate (USB CCID readers, and vsmartcard's virtual reader,
//! through pcscd).
//!
//! - [`PcscDriver`] implements [`ReaderDriver`]. `list` and `connect` establish a fresh PC/SC
//!   context per call, so a pcscd restart between calls needs no recovery; event streams run
//!   on dedicated blocking threads ([`watcher`]) that re-establish their context themselves.
//! - A session ([`PcscSession`], module `session`) is a thread of its own that owns the card,
//!   so a PC/SC transaction can span several calls; every call is bounded by a timeout, so a
//!   reader that never answers (or another program that holds the card) cannot hang the caller.
//! - Sharing with other programs: transactions, resets reported rather than papered over, the
//!   card never reset on our behalf (see the `session` module and the API docs).
//! - `connect` times out ([`PcscDriver::with_connect_timeout`]) without leaking a thread per
//!   attempt: while one `SCardConnect` on a reader has not returned (pcscd holds it while
//!   another program keeps a transaction open), later attempts on that reader wait for it
//!   instead of starting another.
//! - `pcsc::Error`s become [`ReaderError`]s that name the reader and say what to do
//!   ([`errors`]).

mod errors;
mod session;
mod watcher;

use std::collections::HashMap;
use std::ffi::CString;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use pcsc::{Card, Context, ReaderState, Scope, State};
use tokio::sync::{mpsc, watch};

use crate::api::{
    BoxFuture, CardPresence, CardSession, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo,
};
use errors::map_error;
pub use session::PcscSession;
use watcher::{Timing, WatchCtl};

/// Capacity of an event channel. The watcher blocks (it is on its own thread) when the
/// consumer lags, so nothing is dropped.
const EVENT_CAPACITY: usize = 64;

/// The PC/SC reader driver.
pub struct PcscDriver {
    watchers: Mutex<Vec<Weak<WatchCtl>>>,
    transmit_timeout: Duration,
    connect_timeout: Duration,
    connects: Arc<ConnectGate>,
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
            connect_timeout: Duration::from_secs(5),
            connects: Arc::default(),
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

    /// How long `connect` waits for pcscd to connect the card (default 5 s) before it gives
    /// up with [`ReaderError::Timeout`]. pcscd holds a connect while another program keeps a
    /// transaction open on the card; the attempt then goes on in the background (one per
    /// reader at most) and its card is left as it was.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
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

pub(crate) fn establish() -> Result<Context, ReaderError> {
    Context::establish(Scope::User).map_err(|e| map_error(e, None))
}

pub(crate) fn reader_cstring(reader: &str) -> Result<CString, ReaderError> {
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
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + self.connect_timeout;
            let permit = self
                .connects
                .acquire(&reader, deadline, self.connect_timeout)
                .await?;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let session = session::open(reader, permit, left, self.transmit_timeout).await?;
            let atr = session.atr().to_vec();
            Ok((Box::new(session) as Box<dyn CardSession>, atr))
        })
    }
}

/// At most one `SCardConnect` in flight per reader. The entry goes (waking the waiters) when
/// the connect returns, whether or not anyone still wants its card.
#[derive(Default)]
pub(crate) struct ConnectGate {
    busy: Mutex<HashMap<String, watch::Sender<()>>>,
}

/// The right to run one `SCardConnect` on a reader; released on drop.
pub(crate) struct ConnectPermit {
    gate: Arc<ConnectGate>,
    reader: String,
}

impl ConnectGate {
    /// Waits until no connect on `reader` is in flight, then takes the slot; a
    /// [`ReaderError::Timeout`] at `deadline`.
    async fn acquire(
        self: &Arc<Self>,
        reader: &str,
        deadline: tokio::time::Instant,
        timeout: Duration,
    ) -> Result<ConnectPermit, ReaderError> {
        loop {
            let mut rx = {
                let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
                match busy.get(reader) {
                    Some(tx) => tx.subscribe(),
                    None => {
                        busy.insert(reader.to_string(), watch::channel(()).0);
                        return Ok(ConnectPermit {
                            gate: self.clone(),
                            reader: reader.to_string(),
                        });
                    }
                }
            };
            tracing::debug!(reader = %reader, "pcsc: an earlier connect has not returned; waiting for it");
            // Ends (Err) when the sender goes, i.e. when the earlier connect returned.
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return Err(ReaderError::Timeout {
                    reader: reader.to_string(),
                    millis: timeout.as_millis() as u64,
                });
            }
        }
    }
}

impl Drop for ConnectPermit {
    fn drop(&mut self) {
        self.gate
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.reader);
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
pub(crate) fn classify_failure(card: &Card, e: pcsc::Error, reader: &str) -> ReaderError {
    if e == pcsc::Error::RemovedCard || card_gone(card, REMOVAL_GRACE) {
        return ReaderError::CardRemoved {
            reader: reader.to_string(),
        };
    }
    map_error(e, Some(reader))
}

/// A "successful" exchange without a status word: vpcd answers that way when the card went
/// away mid-command; otherwise the card did not answer properly.
pub(crate) fn classify_short_response(card: &Card, resp: &[u8], reader: &str) -> ReaderError {
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
