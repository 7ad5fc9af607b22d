//! The security-card pool: the terminals and concentrator of 001 [0091]–[0092]. Each
//! security card is held by one transaction at a time; a transaction waits (bounded) for a
//! free one rather than queueing without limit.
//!
//! A terminal holds the software security card from `proto`, or a hardware one in a PC/SC
//! reader ([`super::terminal::PcscSecurityCard`]); each is named by its security card id
//! in `[payment] security_cards` (001 [0042]).
//!
//! **A terminal that fails leaves the pool.** A command that ends in
//! [`SecurityCardError::Terminal`] (the reader died, the card was pulled or answered
//! garbage) marks the terminal down: no new draw is given to it ([`Pool::acquire`] skips
//! it) until [`Pool::probe_down`] finds it answering again. [`Pool::down`] lists them.
//! A terminal whose security card is found to hold the wrong keys ([`Pool::distrust`]) stays
//! out however well it answers, until the head end restarts.
//!
//! Every operation on a security card goes through [`Traced`]: the pool keeps the last
//! [`TRACE_LEN`] of them ([`Pool::trace`]: which card, which command, for which of its
//! transactions, and whether it succeeded) and logs each at debug level (target
//! `headend::payment::pool`), so an operator, or a test, sees what each card was asked.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proto::hotlist::Hotlist;
use proto::money::Currency;
use proto::purse::{CreditCommand, CreditResponse, Date, DebitResponse, MasterKeys, PurchaseInit};
use proto::security_card::{DebitAuthorization, DrawData, SecurityCard, SecurityCardError, Totals};
use tokio::sync::{Mutex, OwnedMutexGuard};

use super::privacy::{AtRest, PrivacyKeys};

use crate::journal;

/// What the payment server needs of a security card (001 [0091]–[0094], [0106]). The
/// software [`SecurityCard`] implements it; a hardware SAM in a PC/SC reader would send the
/// same operations as APDUs.
pub trait SecurityCardDevice: Send {
    fn id(&self) -> u64;
    /// The [0093] replay: the purse card's ATR, then its INITIALIZE response with the draw;
    /// the debit command back.
    fn issue_debit(
        &mut self,
        atr: &[u8],
        draw: &DrawData,
        today: Date,
        early_release: bool,
    ) -> Result<DebitAuthorization, SecurityCardError>;
    /// Verifies the card signature and records the sale (FIG. 4; a late proof too).
    fn complete(
        &mut self,
        security_card_txn: u32,
        resp: &DebitResponse,
    ) -> Result<(), SecurityCardError>;
    fn reverse(&mut self, security_card_txn: u32) -> Result<(), SecurityCardError>;
    fn verify_not_debited(
        &self,
        security_card_txn: u32,
        proof: &PurchaseInit,
    ) -> Result<(), SecurityCardError>;
    /// A refund (issue 17): the purse card's ATR, then its INITIALIZE FOR CREDIT answer
    /// with the amount; the credit command back, counted off the totals at once
    /// ([`SecurityCard::issue_credit`]).
    fn issue_credit(
        &mut self,
        atr: &[u8],
        credit: &DrawData,
        today: Date,
    ) -> Result<CreditCommand, SecurityCardError>;
    /// Verifies the card's signature on its credit response: the refund is credited.
    fn complete_credit(
        &mut self,
        security_card_txn: u32,
        resp: &CreditResponse,
    ) -> Result<(), SecurityCardError>;
    /// Settles an issued refund on the card's later INITIALIZE ([`SecurityCard::
    /// resolve_credit`]): credited (`true`), or not (`false`, counted back).
    fn resolve_credit(
        &mut self,
        security_card_txn: u32,
        later: &PurchaseInit,
    ) -> Result<bool, SecurityCardError>;
    /// Drops a settled transaction once the payment server has journaled it.
    fn forget(&mut self, security_card_txn: u32) -> bool;
    /// Drops every settled transaction but `open` in one command (see
    /// [`SecurityCard::purge_settled_except`]); the number dropped.
    fn purge_settled_except(&mut self, open: &[u32]) -> usize;
    /// Loads the issuer's hotlist (an older version than the card holds is ignored).
    fn set_hotlist(&mut self, hotlist: &Hotlist);
    fn totals(&self) -> BTreeMap<Currency, Totals>;
    /// The card's state for the journal (a hardware card keeps its own: empty), and back.
    fn snapshot(&self) -> Vec<u8>;
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
    /// Whether the security card answers now (a terminal out of the pool comes back when it
    /// does). The software card always does.
    fn probe(&mut self) -> Result<(), SecurityCardError> {
        Ok(())
    }
    /// Undoes an issued debit command whose transaction will never be journaled (the
    /// journal write failed, or the request was cancelled): the software card goes back to
    /// `before` (its snapshot taken just before); a hardware card reverses `security_card_txn`.
    fn undo_issue(&mut self, before: &[u8], security_card_txn: u32) {
        let _ = security_card_txn;
        if let Err(e) = self.restore(before) {
            tracing::error!(error = %e, "security card state not rolled back");
        }
    }
}

impl SecurityCardDevice for SecurityCard {
    fn id(&self) -> u64 {
        self.id
    }
    fn issue_debit(
        &mut self,
        _atr: &[u8],
        draw: &DrawData,
        today: Date,
        early_release: bool,
    ) -> Result<DebitAuthorization, SecurityCardError> {
        SecurityCard::issue_debit(self, draw, today, early_release)
    }
    fn complete(
        &mut self,
        security_card_txn: u32,
        resp: &DebitResponse,
    ) -> Result<(), SecurityCardError> {
        SecurityCard::complete(self, security_card_txn, resp).map(|_| ())
    }
    fn reverse(&mut self, security_card_txn: u32) -> Result<(), SecurityCardError> {
        SecurityCard::reverse(self, security_card_txn)
    }
    fn verify_not_debited(
        &self,
        security_card_txn: u32,
        proof: &PurchaseInit,
    ) -> Result<(), SecurityCardError> {
        SecurityCard::verify_not_debited(self, security_card_txn, proof)
    }
    fn issue_credit(
        &mut self,
        _atr: &[u8],
        credit: &DrawData,
        today: Date,
    ) -> Result<CreditCommand, SecurityCardError> {
        SecurityCard::issue_credit(self, credit, today)
    }
    fn complete_credit(
        &mut self,
        security_card_txn: u32,
        resp: &CreditResponse,
    ) -> Result<(), SecurityCardError> {
        SecurityCard::complete_credit(self, security_card_txn, resp)
    }
    fn resolve_credit(
        &mut self,
        security_card_txn: u32,
        later: &PurchaseInit,
    ) -> Result<bool, SecurityCardError> {
        SecurityCard::resolve_credit(self, security_card_txn, later)
    }
    fn forget(&mut self, security_card_txn: u32) -> bool {
        SecurityCard::forget(self, security_card_txn)
    }
    fn purge_settled_except(&mut self, open: &[u32]) -> usize {
        SecurityCard::purge_settled_except(self, open)
    }
    fn set_hotlist(&mut self, hotlist: &Hotlist) {
        SecurityCard::set_hotlist(self, hotlist);
    }
    fn totals(&self) -> BTreeMap<Currency, Totals> {
        self.totals.clone()
    }
    fn snapshot(&self) -> Vec<u8> {
        // A privacy card's transactions leave the card sealed ([`super::privacy`]).
        let keys = match self.master_keys() {
            Some(master) if self.has_sealed() => PrivacyKeys::new(master),
            _ => return journal::encode(self),
        };
        let naming = keys.naming(true, 0);
        journal::encode(&self.exported(|t| match keys.keep(&naming, t.clone()) {
            AtRest::Sealed {
                sealed,
                key_version,
            } => journal::encode(&(key_version, sealed)),
            AtRest::Clear(_) => unreachable!("a pseudonymous naming seals"),
        }))
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let state = journal::decode(snapshot)?;
        self.restore_state(state);
        let keys = self.master_keys().map(PrivacyKeys::new);
        self.import_sealed(|s| {
            let keys = keys.as_ref().ok_or("no purchase key to open it")?;
            let (key_version, sealed): (u8, Vec<u8>) = journal::decode(s)?;
            keys.open(&AtRest::Sealed {
                key_version,
                sealed,
            })
        })
    }
}

/// A software security card from its journaled snapshot, with its purchase masters (a
/// snapshot holds no key), its privacy cards' transactions unsealed.
///
/// # Errors
/// The snapshot does not decode, or a sealed transaction does not open.
pub fn software_card(snapshot: &[u8], master: &MasterKeys) -> Result<SecurityCard, String> {
    let mut card = SecurityCard::new(0, master.clone());
    card.restore(snapshot)?;
    Ok(card)
}

/// How many security-card operations [`Pool::trace`] keeps (the oldest go first).
pub const TRACE_LEN: usize = 4096;

/// A command sent to a security card (one APDU exchange on a hardware card).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// The draw request replayed to the card: it issues the debit command ([0093]–[0094]).
    IssueDebit,
    /// The card's debit response, for the card to compare (FIG. 4; a late proof).
    Complete,
    Reverse,
    VerifyNotDebited,
    Forget,
    /// Drop the settled transactions, naming the open ones to keep.
    PurgeSettled,
    /// The issuer's hotlist (`security_card_txn`: none).
    LoadHotlist,
    /// Is the card answering (a terminal out of the pool)?
    Probe,
    /// A refund's INITIALIZE FOR CREDIT answer: the card issues the credit command.
    IssueCredit,
    /// The card's credit response, for the card to verify.
    CompleteCredit,
    /// The card's later INITIALIZE: the refund credited, or counted back.
    ResolveCredit,
}

/// One operation of [`Pool::trace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceEntry {
    pub security_card_id: u64,
    pub command: Command,
    /// The card's transaction the command is for (for `IssueDebit`, the one it opened;
    /// none for `PurgeSettled`, which names only the open ones it keeps).
    pub security_card_txn: Option<u32>,
    pub ok: bool,
}

type Trace = std::sync::Mutex<std::collections::VecDeque<TraceEntry>>;

/// Why each terminal is out of the pool (`None`: in it), by slot.
type Down = std::sync::Mutex<Vec<Option<String>>>;

/// Which terminals are out of the pool until a restart ([`Pool::distrust`]), by slot.
type Distrusted = std::sync::Mutex<Vec<bool>>;

/// A security card whose every command is recorded in its pool's trace, and whose terminal
/// leaves the pool on a terminal failure.
pub struct Traced {
    inner: Box<dyn SecurityCardDevice>,
    trace: Arc<Trace>,
    slot: usize,
    down: Arc<Down>,
    distrusted: Arc<Distrusted>,
}

impl Traced {
    /// A terminal failure takes the terminal out of the pool; its success in a probe
    /// brings it back.
    fn health<T>(&self, r: &Result<T, SecurityCardError>) {
        let mut d = self.down.lock().unwrap_or_else(|p| p.into_inner());
        if self
            .distrusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(self.slot)
            .copied()
            .unwrap_or(false)
        {
            return;
        }
        match r {
            Err(SecurityCardError::Terminal(why)) => {
                // Logged when it leaves the pool, and again when the reason changes (a
                // pulled card found to be another one, say).
                if d[self.slot].as_deref() != Some(why.as_str()) {
                    tracing::error!(
                        slot = self.slot,
                        security_card_id = self.inner.id(),
                        why,
                        "security card terminal down: out of the pool"
                    );
                }
                d[self.slot] = Some(why.clone());
            }
            Ok(_) if d[self.slot].is_some() => {
                tracing::warn!(
                    slot = self.slot,
                    security_card_id = self.inner.id(),
                    "security card terminal answers again: back in the pool"
                );
                d[self.slot] = None;
            }
            _ => {}
        }
    }

    fn note(&self, command: Command, security_card_txn: Option<u32>, ok: bool) {
        let security_card_id = self.inner.id();
        tracing::debug!(
            security_card_id,
            ?command,
            security_card_txn,
            ok,
            "security card command"
        );
        let mut t = self.trace.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == TRACE_LEN {
            t.pop_front();
        }
        t.push_back(TraceEntry {
            security_card_id,
            command,
            security_card_txn,
            ok,
        });
    }
}

impl SecurityCardDevice for Traced {
    fn id(&self) -> u64 {
        self.inner.id()
    }
    fn issue_debit(
        &mut self,
        atr: &[u8],
        draw: &DrawData,
        today: Date,
        early_release: bool,
    ) -> Result<DebitAuthorization, SecurityCardError> {
        let out = self.inner.issue_debit(atr, draw, today, early_release);
        let txn = out.as_ref().ok().map(|a| a.command.security_card_txn);
        self.note(Command::IssueDebit, txn, out.is_ok());
        self.health(&out);
        out
    }
    fn complete(
        &mut self,
        security_card_txn: u32,
        resp: &DebitResponse,
    ) -> Result<(), SecurityCardError> {
        let out = self.inner.complete(security_card_txn, resp);
        self.note(Command::Complete, Some(security_card_txn), out.is_ok());
        self.health(&out);
        out
    }
    fn reverse(&mut self, security_card_txn: u32) -> Result<(), SecurityCardError> {
        let out = self.inner.reverse(security_card_txn);
        self.note(Command::Reverse, Some(security_card_txn), out.is_ok());
        self.health(&out);
        out
    }
    fn verify_not_debited(
        &self,
        security_card_txn: u32,
        proof: &PurchaseInit,
    ) -> Result<(), SecurityCardError> {
        let out = self.inner.verify_not_debited(security_card_txn, proof);
        self.note(
            Command::VerifyNotDebited,
            Some(security_card_txn),
            out.is_ok(),
        );
        out
    }
    fn issue_credit(
        &mut self,
        atr: &[u8],
        credit: &DrawData,
        today: Date,
    ) -> Result<CreditCommand, SecurityCardError> {
        let out = self.inner.issue_credit(atr, credit, today);
        let txn = out.as_ref().ok().map(|c| c.0.security_card_txn);
        self.note(Command::IssueCredit, txn, out.is_ok());
        self.health(&out);
        out
    }
    fn complete_credit(
        &mut self,
        security_card_txn: u32,
        resp: &CreditResponse,
    ) -> Result<(), SecurityCardError> {
        let out = self.inner.complete_credit(security_card_txn, resp);
        self.note(
            Command::CompleteCredit,
            Some(security_card_txn),
            out.is_ok(),
        );
        self.health(&out);
        out
    }
    fn resolve_credit(
        &mut self,
        security_card_txn: u32,
        later: &PurchaseInit,
    ) -> Result<bool, SecurityCardError> {
        let out = self.inner.resolve_credit(security_card_txn, later);
        self.note(Command::ResolveCredit, Some(security_card_txn), out.is_ok());
        self.health(&out);
        out
    }
    fn forget(&mut self, security_card_txn: u32) -> bool {
        let out = self.inner.forget(security_card_txn);
        self.note(Command::Forget, Some(security_card_txn), out);
        out
    }
    fn purge_settled_except(&mut self, open: &[u32]) -> usize {
        let out = self.inner.purge_settled_except(open);
        self.note(Command::PurgeSettled, None, true);
        out
    }
    fn set_hotlist(&mut self, hotlist: &Hotlist) {
        self.inner.set_hotlist(hotlist);
        self.note(Command::LoadHotlist, None, true);
    }
    fn totals(&self) -> BTreeMap<Currency, Totals> {
        self.inner.totals()
    }
    fn snapshot(&self) -> Vec<u8> {
        self.inner.snapshot()
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.inner.restore(snapshot)
    }
    fn undo_issue(&mut self, before: &[u8], security_card_txn: u32) {
        self.inner.undo_issue(before, security_card_txn);
        self.note(Command::Reverse, Some(security_card_txn), true);
    }
    fn probe(&mut self) -> Result<(), SecurityCardError> {
        let out = self.inner.probe();
        self.note(Command::Probe, None, out.is_ok());
        self.health(&out);
        out
    }
}

/// One terminal with its security card.
pub type SecurityCardSlot = Mutex<Box<dyn SecurityCardDevice>>;

pub struct Pool {
    slots: Vec<Arc<SecurityCardSlot>>,
    /// Each slot's security card id (fixed by the config).
    ids: Vec<u64>,
    free: Arc<tokio::sync::Semaphore>,
    taken: std::sync::Mutex<Vec<bool>>,
    trace: Arc<Trace>,
    down: Arc<Down>,
    distrusted: Arc<Distrusted>,
}

/// A security card held by one transaction. Released on drop.
pub struct Lease {
    pub slot: usize,
    pool: Arc<Pool>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let mut t = self.pool.taken.lock().unwrap_or_else(|p| p.into_inner());
        t[self.slot] = false;
    }
}

impl Lease {
    pub async fn card(&self) -> OwnedMutexGuard<Box<dyn SecurityCardDevice>> {
        self.pool.slots[self.slot].clone().lock_owned().await
    }
}

impl Pool {
    pub fn new(cards: Vec<Box<dyn SecurityCardDevice>>) -> Arc<Self> {
        let n = cards.len();
        let trace: Arc<Trace> = Default::default();
        let down: Arc<Down> = Arc::new(std::sync::Mutex::new(vec![None; n]));
        let distrusted: Arc<Distrusted> = Arc::new(std::sync::Mutex::new(vec![false; n]));
        let ids = cards.iter().map(|c| c.id()).collect();
        Arc::new(Self {
            ids,
            slots: cards
                .into_iter()
                .enumerate()
                .map(|(slot, inner)| {
                    let traced = Traced {
                        inner,
                        trace: trace.clone(),
                        slot,
                        down: down.clone(),
                        distrusted: distrusted.clone(),
                    };
                    Arc::new(Mutex::new(Box::new(traced) as Box<dyn SecurityCardDevice>))
                })
                .collect(),
            free: Arc::new(tokio::sync::Semaphore::new(n)),
            taken: std::sync::Mutex::new(vec![false; n]),
            trace,
            down,
            distrusted,
        })
    }

    /// The security card id of `slot`'s terminal.
    pub fn id(&self, slot: usize) -> Option<u64> {
        self.ids.get(slot).copied()
    }

    /// The terminals out of the pool now: slot and why.
    pub fn down(&self) -> Vec<(usize, String)> {
        self.down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.clone().map(|d| (i, d)))
            .collect()
    }

    /// Marks `slot` down (a terminal found dead outside a command, e.g. at start).
    pub fn mark_down(&self, slot: usize, why: String) {
        if let Some(d) = self
            .down
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(slot)
        {
            *d = Some(why);
        }
    }

    /// Takes `slot` out of the pool until the head end restarts: its security card was
    /// found to hold the wrong keys (it refused what another one verified). No probe brings
    /// it back: it answers well, and would refuse every viewer.
    pub fn distrust(&self, slot: usize, why: String) {
        let mut d = self.down.lock().unwrap_or_else(|p| p.into_inner());
        let mut t = self.distrusted.lock().unwrap_or_else(|p| p.into_inner());
        if let (Some(d), Some(t)) = (d.get_mut(slot), t.get_mut(slot)) {
            *d = Some(why);
            *t = true;
        }
    }

    /// Probes every terminal in the pool that nothing holds now, so a reader that died or
    /// a card that was swapped while idle leaves the pool before a draw meets it. The
    /// software card answers at once.
    pub async fn probe_idle(&self) {
        let down: Vec<usize> = self.down().into_iter().map(|(s, _)| s).collect();
        for slot in (0..self.slots.len()).filter(|s| !down.contains(s)) {
            if let Some(mut card) = self.try_card(slot) {
                let _ = tokio::task::spawn_blocking(move || card.probe()).await;
            }
        }
    }

    /// Probes every terminal out of the pool that nothing holds; the ones that answer come
    /// back. The slots that came back.
    pub async fn probe_down(&self) -> Vec<usize> {
        let mut back = Vec::new();
        let distrusted = self
            .distrusted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for (slot, _) in self.down() {
            if distrusted.get(slot).copied().unwrap_or(false) {
                continue;
            }
            if let Some(mut card) = self.try_card(slot) {
                // A dead reader answers only at its timeout: not on the async threads.
                let ok = tokio::task::spawn_blocking(move || card.probe().is_ok())
                    .await
                    .unwrap_or(false);
                if ok {
                    back.push(slot);
                }
            }
        }
        back
    }

    /// The last [`TRACE_LEN`] commands sent to the pool's security cards, oldest first.
    pub fn trace(&self) -> Vec<TraceEntry> {
        self.trace
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Waits up to `wait` for a free security card.
    /// Waits up to `wait` for a free security card whose terminal is in the pool.
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Option<Lease> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let permit = tokio::time::timeout_at(deadline, self.free.clone().acquire_owned())
                .await
                .ok()?
                .ok()?;
            let slot = {
                let mut t = self.taken.lock().unwrap_or_else(|p| p.into_inner());
                let down = self.down.lock().unwrap_or_else(|p| p.into_inner());
                (0..t.len())
                    .find(|&i| !t[i] && down[i].is_none())
                    .inspect(|&i| t[i] = true)
            };
            match slot {
                Some(slot) => {
                    return Some(Lease {
                        slot,
                        pool: self.clone(),
                        _permit: permit,
                    });
                }
                // The free card's terminal is out of the pool: wait for another, unless
                // every terminal is out.
                None => {
                    drop(permit);
                    let all_down = self
                        .down
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .iter()
                        .all(Option::is_some);
                    if all_down || tokio::time::Instant::now() >= deadline {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    /// The card in `slot`, for steps of a transaction whose lease was released (early
    /// release) or lost (restart).
    pub async fn card(&self, slot: usize) -> Option<OwnedMutexGuard<Box<dyn SecurityCardDevice>>> {
        Some(self.slots.get(slot)?.clone().lock_owned().await)
    }

    /// The card in `slot` if nothing holds it now (at start, before any transaction).
    pub fn try_card(&self, slot: usize) -> Option<OwnedMutexGuard<Box<dyn SecurityCardDevice>>> {
        self.slots.get(slot)?.clone().try_lock_owned().ok()
    }

    /// The number of security cards free now.
    pub fn available(&self) -> usize {
        self.free.available_permits()
    }
}
