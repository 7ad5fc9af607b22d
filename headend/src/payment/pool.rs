//! The security-card pool: the terminals and concentrator of 001 [0091]–[0092]. Each
//! security card is held by one transaction at a time; a transaction waits (bounded) for a
//! free one rather than queueing without limit.
//!
//! The default security card is the software one from `proto`. A hardware security card in
//! a PC/SC reader implements [`SecurityCardDevice`] over `reader-drivers` (the seam; no
//! hardware implementation yet).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use proto::money::Currency;
use proto::purse::{Date, DebitResponse, PurchaseInit};
use proto::security_card::{DebitAuthorization, DrawData, SecurityCard, SecurityCardError, Totals};
use tokio::sync::{Mutex, OwnedMutexGuard};

use crate::journal;

/// What the payment server needs of a security card (001 [0091]–[0094], [0106]). The
/// software [`SecurityCard`] implements it; a hardware SAM in a PC/SC reader would send the
/// same operations as APDUs.
pub trait SecurityCardDevice: Send {
    fn id(&self) -> u64;
    fn issue_debit(
        &mut self,
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
    /// Drops a settled transaction once the payment server has journaled it.
    fn forget(&mut self, security_card_txn: u32) -> bool;
    fn totals(&self) -> BTreeMap<Currency, Totals>;
    /// The card's state for the journal (a hardware card keeps its own: empty), and back.
    fn snapshot(&self) -> Vec<u8>;
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
}

impl SecurityCardDevice for SecurityCard {
    fn id(&self) -> u64 {
        self.id
    }
    fn issue_debit(
        &mut self,
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
    fn forget(&mut self, security_card_txn: u32) -> bool {
        SecurityCard::forget(self, security_card_txn)
    }
    fn totals(&self) -> BTreeMap<Currency, Totals> {
        self.totals.clone()
    }
    fn snapshot(&self) -> Vec<u8> {
        journal::encode(self)
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.restore_state(journal::decode(snapshot)?);
        Ok(())
    }
}

/// One terminal with its security card.
pub type SecurityCardSlot = Mutex<Box<dyn SecurityCardDevice>>;

pub struct Pool {
    slots: Vec<Arc<SecurityCardSlot>>,
    free: Arc<tokio::sync::Semaphore>,
    taken: std::sync::Mutex<Vec<bool>>,
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
        Arc::new(Self {
            slots: cards.into_iter().map(|c| Arc::new(Mutex::new(c))).collect(),
            free: Arc::new(tokio::sync::Semaphore::new(n)),
            taken: std::sync::Mutex::new(vec![false; n]),
        })
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Waits up to `wait` for a free security card.
    pub async fn acquire(self: &Arc<Self>, wait: Duration) -> Option<Lease> {
        let permit = tokio::time::timeout(wait, self.free.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        let slot = {
            let mut t = self.taken.lock().unwrap_or_else(|p| p.into_inner());
            let i = t.iter().position(|x| !x)?;
            t[i] = true;
            i
        };
        Some(Lease {
            slot,
            pool: self.clone(),
            _permit: permit,
        })
    }

    /// The card in `slot`, for steps of a transaction whose lease was released (early
    /// release) or lost (restart).
    pub async fn card(&self, slot: usize) -> Option<OwnedMutexGuard<Box<dyn SecurityCardDevice>>> {
        Some(self.slots.get(slot)?.clone().lock_owned().await)
    }

    /// The number of security cards free now.
    pub fn available(&self) -> usize {
        self.free.available_permits()
    }
}
