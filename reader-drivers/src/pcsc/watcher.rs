//! The PC/SC event watcher: one dedicated blocking thread per [`events`](super::PcscDriver)
//! stream, looping on SCardGetStatusChange over every reader plus the PnP notification reader,
//! and feeding a tokio mpsc channel with reader/card events.
//!
//! It stops when the receiver is dropped or the driver shuts down (both cancel the blocking
//! call with SCardCancel), and it survives a pcscd restart by re-establishing its context
//! (reporting `ServiceLost` / `ServiceRestored`, then the differences it finds).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pcsc::{Context, ReaderState, Scope, State};
use tokio::sync::mpsc;

use super::errors::{is_service_error, map_error};
use crate::api::{CardPresence, ReaderEvent};

/// Control block of one watcher, shared with whoever may cancel it.
#[derive(Default)]
pub(crate) struct WatchCtl {
    stop: AtomicBool,
    /// False once the watcher thread has finished.
    running: AtomicBool,
    /// The context the thread is blocked on now, for SCardCancel.
    ctx: Mutex<Option<Context>>,
}

impl WatchCtl {
    pub(crate) fn new() -> Arc<Self> {
        let ctl = Self::default();
        ctl.running.store(true, Ordering::SeqCst);
        Arc::new(ctl)
    }

    /// Stops the watcher. SCardCancel only wakes a wait already registered with pcscd, and the
    /// thread may be between two waits, so the cancel is repeated (from a short-lived helper
    /// thread, never blocking the caller) until the thread has ended.
    pub(crate) fn cancel(self: &Arc<Self>) {
        self.stop.store(true, Ordering::SeqCst);
        if !self.cancel_once() {
            return;
        }
        let ctl = self.clone();
        let _ = std::thread::Builder::new()
            .name("pcsc-cancel".into())
            .spawn(move || {
                for _ in 0..40 {
                    std::thread::sleep(Duration::from_millis(25));
                    if !ctl.cancel_once() {
                        return;
                    }
                }
            });
    }

    /// Cancels the current wait; false when the thread is no longer running.
    fn cancel_once(&self) -> bool {
        if !self.running.load(Ordering::SeqCst) {
            return false;
        }
        if let Some(ctx) = self.ctx.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            // Wakes a blocked SCardGetStatusChange with SCARD_E_CANCELLED.
            let _ = ctx.cancel();
        }
        true
    }

    fn stopped(&self, tx: &mpsc::Sender<ReaderEvent>) -> bool {
        self.stop.load(Ordering::SeqCst) || tx.is_closed()
    }
    fn set_ctx(&self, ctx: Option<Context>) {
        *self.ctx.lock().unwrap_or_else(|p| p.into_inner()) = ctx;
    }
}

/// Timing of a watcher. `poll` bounds how long a stop can go unnoticed if a cancel raced
/// with the blocking call; `retry` is the pause between attempts to reach a stopped pcscd.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub poll: Duration,
    pub retry: Duration,
}

/// What we last told the consumer about one reader.
struct Known {
    card: CardPresence,
    /// pcsc-lite's per-reader insert/remove counter (high 16 bits of the event state).
    count: u32,
}

enum Exit {
    Stop,
    Lost(pcsc::Error),
}

pub(crate) fn run(ctl: Arc<WatchCtl>, tx: mpsc::Sender<ReaderEvent>, timing: Timing) {
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut lost = false;
    'outer: loop {
        if ctl.stopped(&tx) {
            break;
        }
        let ctx = match Context::establish(Scope::User) {
            Ok(ctx) => ctx,
            Err(e) => {
                if !lost {
                    lost = true;
                    tracing::warn!(error = %e, "pcsc watcher: cannot reach pcscd; retrying");
                    let reason = map_error(e, None).to_string();
                    if tx
                        .blocking_send(ReaderEvent::ServiceLost { reason })
                        .is_err()
                    {
                        break;
                    }
                }
                sleep_unless_stopped(&ctl, &tx, timing.retry);
                continue;
            }
        };
        ctl.set_ctx(Some(ctx.clone()));
        if std::mem::take(&mut lost) {
            tracing::info!("pcsc watcher: pcscd is back; context re-established");
            if tx.blocking_send(ReaderEvent::ServiceRestored).is_err() {
                break;
            }
        }
        let exit = watch(&ctx, &ctl, &tx, &mut known, timing);
        ctl.set_ctx(None);
        match exit {
            Exit::Stop => break,
            Exit::Lost(e) => {
                lost = true;
                tracing::warn!(error = %e, "pcsc watcher: lost pcscd; re-establishing the context");
                let reason = map_error(e, None).to_string();
                if tx
                    .blocking_send(ReaderEvent::ServiceLost { reason })
                    .is_err()
                {
                    break;
                }
                // Sessions died with pcscd: report the cards gone, so consumers reconnect
                // on the fresh CardInserted once pcscd is back.
                for (reader, k) in known.iter_mut() {
                    k.count = 0;
                    if k.card != CardPresence::Absent {
                        k.card = CardPresence::Absent;
                        let ev = ReaderEvent::CardRemoved {
                            reader: reader.clone(),
                        };
                        if tx.blocking_send(ev).is_err() {
                            break 'outer;
                        }
                    }
                }
                sleep_unless_stopped(&ctl, &tx, timing.retry);
            }
        }
    }
    ctl.set_ctx(None);
    ctl.running.store(false, Ordering::SeqCst);
    tracing::debug!("pcsc watcher stopped");
}

fn sleep_unless_stopped(ctl: &WatchCtl, tx: &mpsc::Sender<ReaderEvent>, total: Duration) {
    let step = Duration::from_millis(50);
    let mut left = total;
    while !left.is_zero() && !ctl.stopped(tx) {
        let d = left.min(step);
        std::thread::sleep(d);
        left -= d;
    }
}

fn watch(
    ctx: &Context,
    ctl: &WatchCtl,
    tx: &mpsc::Sender<ReaderEvent>,
    known: &mut BTreeMap<String, Known>,
    timing: Timing,
) -> Exit {
    let mut states = vec![ReaderState::new(pcsc::PNP_NOTIFICATION(), State::UNAWARE)];
    let mut rescan = true;
    loop {
        if ctl.stopped(tx) {
            return Exit::Stop;
        }
        if rescan {
            rescan = false;
            let names = match ctx.list_readers_owned() {
                Ok(names) => names,
                Err(pcsc::Error::NoReadersAvailable) => Vec::new(),
                Err(e) if is_service_error(e) => return Exit::Lost(e),
                Err(e) => {
                    tracing::warn!(error = %e, "pcsc watcher: listing readers failed");
                    Vec::new()
                }
            };
            // Keep the state of readers still there so their next wait is incremental.
            let mut old: BTreeMap<String, ReaderState> = states
                .drain(1..)
                .map(|s| (s.name().to_string_lossy().into_owned(), s))
                .collect();
            let names: Vec<(String, std::ffi::CString)> = names
                .into_iter()
                .map(|n| (n.to_string_lossy().into_owned(), n))
                .collect();
            let gone: Vec<String> = known
                .keys()
                .filter(|k| !names.iter().any(|(n, _)| n == *k))
                .cloned()
                .collect();
            for reader in gone {
                let was = known.remove(&reader).map(|k| k.card);
                if matches!(was, Some(c) if c != CardPresence::Absent)
                    && !send(
                        tx,
                        ReaderEvent::CardRemoved {
                            reader: reader.clone(),
                        },
                    )
                {
                    return Exit::Stop;
                }
                tracing::info!(reader = %reader, "reader detached");
                if !send(tx, ReaderEvent::ReaderDetached { reader }) {
                    return Exit::Stop;
                }
            }
            for (name, cname) in names {
                if !known.contains_key(&name) {
                    tracing::info!(reader = %name, "reader attached");
                    if !send(
                        tx,
                        ReaderEvent::ReaderAttached {
                            reader: name.clone(),
                        },
                    ) {
                        return Exit::Stop;
                    }
                    known.insert(
                        name.clone(),
                        Known {
                            card: CardPresence::Absent,
                            count: 0,
                        },
                    );
                }
                let st = old
                    .remove(&name)
                    .unwrap_or_else(|| ReaderState::new(cname, State::UNAWARE));
                states.push(st);
            }
        }
        match ctx.get_status_change(timing.poll, &mut states) {
            Ok(()) => {}
            Err(pcsc::Error::Timeout) | Err(pcsc::Error::Cancelled) => continue,
            // A reader vanished between listing and waiting.
            Err(pcsc::Error::UnknownReader) | Err(pcsc::Error::ReaderUnavailable) => {
                rescan = true;
                continue;
            }
            Err(e) if is_service_error(e) => return Exit::Lost(e),
            Err(e) => {
                tracing::warn!(error = %e, "pcsc watcher: SCardGetStatusChange failed; rescanning");
                // Pause so a persistent error cannot spin the thread.
                sleep_unless_stopped(ctl, tx, timing.poll);
                rescan = true;
                continue;
            }
        }
        for (i, st) in states.iter_mut().enumerate() {
            let ev = st.event_state();
            if !ev.contains(State::CHANGED) {
                continue;
            }
            if i == 0 {
                // The PnP pseudo-reader: the set of readers changed.
                rescan = true;
            } else if ev.intersects(State::UNKNOWN | State::IGNORE) {
                rescan = true;
            } else {
                let reader = st.name().to_string_lossy().into_owned();
                let card = presence(ev, st.atr());
                let count = st.event_count();
                if let Some(k) = known.get_mut(&reader) {
                    for event in card_events(&reader, k, &card, count) {
                        if !send(tx, event) {
                            return Exit::Stop;
                        }
                    }
                    k.card = card;
                    k.count = count;
                }
            }
            st.sync_current_state();
        }
    }
}

fn send(tx: &mpsc::Sender<ReaderEvent>, ev: ReaderEvent) -> bool {
    tracing::debug!(event = ?ev, "pcsc event");
    tx.blocking_send(ev).is_ok()
}

/// The card state PC/SC reports for a reader.
pub(crate) fn presence(ev: State, atr: &[u8]) -> CardPresence {
    if !ev.contains(State::PRESENT) {
        CardPresence::Absent
    } else if ev.contains(State::MUTE) {
        CardPresence::Mute
    } else if ev.contains(State::EXCLUSIVE) {
        CardPresence::InUse
    } else {
        CardPresence::Present { atr: atr.to_vec() }
    }
}

/// Events for one reader's transition. A mute card is reported inserted with an empty ATR;
/// connecting to it then fails with "card is mute — reinsert it". A counter that moved by two
/// or more while a card stayed present means it was pulled and reinserted between two waits.
fn card_events(reader: &str, k: &Known, now: &CardPresence, count: u32) -> Vec<ReaderEvent> {
    let removed = ReaderEvent::CardRemoved {
        reader: reader.to_string(),
    };
    let inserted = || ReaderEvent::CardInserted {
        reader: reader.to_string(),
        atr: match now {
            CardPresence::Present { atr } => atr.clone(),
            _ => Vec::new(),
        },
    };
    let was_in = k.card != CardPresence::Absent;
    let is_in = *now != CardPresence::Absent;
    match (was_in, is_in) {
        (false, true) => vec![inserted()],
        (true, false) => vec![removed],
        (true, true) if count.wrapping_sub(k.count) >= 2 => vec![removed, inserted()],
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_from_state_bits() {
        assert_eq!(presence(State::EMPTY, &[]), CardPresence::Absent);
        assert_eq!(
            presence(State::PRESENT, &[0x3B, 0x00]),
            CardPresence::Present {
                atr: vec![0x3B, 0x00]
            }
        );
        assert_eq!(
            presence(State::PRESENT | State::MUTE, &[]),
            CardPresence::Mute
        );
        assert_eq!(
            presence(State::PRESENT | State::EXCLUSIVE | State::INUSE, &[0x3B]),
            CardPresence::InUse
        );
    }

    #[test]
    fn transitions_give_events() {
        let absent = Known {
            card: CardPresence::Absent,
            count: 0,
        };
        let present = CardPresence::Present { atr: vec![0x3B] };
        assert_eq!(
            card_events("r", &absent, &present, 1),
            vec![ReaderEvent::CardInserted {
                reader: "r".into(),
                atr: vec![0x3B]
            }]
        );
        let was_in = Known {
            card: present.clone(),
            count: 1,
        };
        assert_eq!(
            card_events("r", &was_in, &CardPresence::Absent, 2),
            vec![ReaderEvent::CardRemoved { reader: "r".into() }]
        );
        // Pulled and reinserted between two waits.
        assert_eq!(card_events("r", &was_in, &present, 3).len(), 2);
        // In use by another application: the same card, no event.
        assert!(card_events("r", &was_in, &CardPresence::InUse, 1).is_empty());
    }
}
