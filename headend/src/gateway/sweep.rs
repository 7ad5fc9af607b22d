//! Lifetimes: offers not drawn in time expire; open loads are swept (see [`super::load`]).

use std::sync::Arc;

use super::background::background;
use super::{Gateway, GwState, Step, now_secs};
use crate::journal;

impl Gateway {
    /// Expires offers not drawn within their lifetime, and (see [`crate::gateway::load`])
    /// load offers and holds. Runs until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        let never = tokio::sync::Notify::new();
        background(&never, shutdown, || me.sweep()).await
    }

    /// One sweep over the open offers and loads. True when something is left to retry.
    pub async fn sweep(&self) -> bool {
        let now = now_secs();
        let instant = std::time::Instant::now();
        self.rates.prune(instant);
        self.open_draws.prune(instant);
        let mut backlog = false;
        for (key, created) in self.journal.all(journal::Kind::Open).unwrap_or_default() {
            let created = <[u8; 8]>::try_from(created.as_slice()).map_or(0, u64::from_be_bytes);
            if let Some(txid) = key.strip_prefix("p/") {
                if now >= created + self.lifetimes.offer.as_secs() {
                    self.expire_offer(txid).await;
                }
            } else if let Some(txid) = key.strip_prefix("l/") {
                backlog |= self.sweep_load(txid, now).await;
            }
        }
        backlog
    }

    async fn expire_offer(&self, txid: &str) {
        // Held by another gateway: that one's sweep, or the box's step, decides it.
        let Ok(lock) = self.lock(txid).await else {
            return;
        };
        let Some(mut t) = self.txn(txid) else {
            let _ = lock.atomically(|b| b.delete(journal::Kind::Open, &format!("p/{txid}")));
            return;
        };
        if t.state == GwState::Offered {
            t.state = GwState::Expired;
            if self.save(&lock, &t, Step::OfferExpired).is_ok() {
                tracing::info!(txid, "offer expired before its draw request");
            }
        } else {
            let _ = lock.atomically(|b| b.delete(journal::Kind::Open, &format!("p/{txid}")));
        }
    }
}
