//! The security-card pool: the terminals and concentrator of 001 [0091]–[0092]. Each
//! security card is held by one transaction at a time; a transaction waits (bounded) for a
//! free one rather than queueing without limit.
//!
//! The default security card is the software one from `proto`. A hardware security card in
//! a PC/SC reader would implement [`SecurityCardSlot`] over `reader-drivers` (the seam).

use std::sync::Arc;
use std::time::Duration;

use proto::security_card::SecurityCard;
use tokio::sync::{Mutex, OwnedMutexGuard};

/// One terminal with its security card. The software card is the only implementation so
/// far; a hardware SAM would sit behind the same lock and snapshot.
pub type SecurityCardSlot = Mutex<SecurityCard>;

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
    pub async fn card(&self) -> OwnedMutexGuard<SecurityCard> {
        self.pool.slots[self.slot].clone().lock_owned().await
    }
}

impl Pool {
    pub fn new(cards: Vec<SecurityCard>) -> Arc<Self> {
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
    pub async fn card(&self, slot: usize) -> Option<OwnedMutexGuard<SecurityCard>> {
        Some(self.slots.get(slot)?.clone().lock_owned().await)
    }

    /// The number of security cards free now.
    pub fn available(&self) -> usize {
        self.free.available_permits()
    }
}
