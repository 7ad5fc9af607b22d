//! The background pass: debit responses to the payment servers (FIG. 6/7 notifications),
//! confirmations asked again and releases delivered to the merchants, and the payment
//! servers' reversal feeds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proto::messages::*;
use tracing::Instrument;

use super::{Gateway, GwState, Outbound, Step, definite, gw, txid_of_key};
use crate::journal;

impl Gateway {
    /// Asks the payment server again for each FIG. 4/5 confirmation the gateway was waiting
    /// for (kind `confirming`, [`journal::Kind::Confirming`]). True: something is left to retry.
    async fn confirming_pass(&self) -> bool {
        let mut backlog = false;
        for (key, bytes) in self
            .journal
            .all(journal::Kind::Confirming)
            .unwrap_or_default()
        {
            let Ok(msg) = journal::decode::<DebitResponseMsg>(&bytes) else {
                tracing::error!(key, "unreadable debit response entry; left for an operator");
                continue;
            };
            let txid = txid_of_key(&key).to_string();
            // Held by another gateway (its pass, or the box's step there): next pass.
            let Ok(lock) = self.lock(&txid).await else {
                backlog = true;
                continue;
            };
            if self
                .journal
                .get(journal::Kind::Confirming, &key)
                .ok()
                .flatten()
                .is_none()
            {
                continue; // answered meanwhile
            }
            let resp = self
                .txn(&txid)
                .filter(|t| t.receipt.is_none())
                .and_then(|t| msg.body.open(t.tsk.as_ref()).ok().map(|r| (t, r)));
            let Some((t, resp)) = resp else {
                // Completed with a receipt meanwhile, or not a transaction we can open.
                let _ = lock.atomically(|b| b.delete(journal::Kind::Confirming, &key));
                continue;
            };
            let span = tracing::info_span!("confirmation", txid = %txid);
            let _calling = self.mark_retrying(&txid);
            if let Err(answer) = self
                .confirm(&lock, &key, &t, msg, resp)
                .instrument(span)
                .await
            {
                backlog |= !definite(&answer);
            }
        }
        backlog
    }
}

impl Gateway {
    /// Delivers journaled debit responses to their payment servers (FIG. 6/7) until each is
    /// answered for good; deletes exactly the entry delivered. Runs until `shutdown`.
    pub async fn run_notifier(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        background(&self.wake_notifier, shutdown, || me.notify_pass()).await
    }

    async fn notify_pass(&self) -> bool {
        let pending = self.journal.all(journal::Kind::Notify).unwrap_or_default();
        let mut backlog = false;
        for (key, bytes) in pending {
            let txid = txid_of_key(&key).to_string();
            let Ok(msg) = journal::decode::<DebitResponseMsg>(&bytes) else {
                tracing::error!(key, "unreadable notification entry; left for an operator");
                continue;
            };
            let Some(t) = self.txn(&txid) else { continue };
            let Some(payment) = self
                .merchants
                .get(&t.merchant_id)
                .map(|m| m.payment.clone())
            else {
                continue;
            };
            let answer = self
                .role(&payment)
                .handle(gw(), Message::DebitResponse(msg))
                .await;
            if definite(&answer) {
                let _ = self.journal.atomically(|b| {
                    b.delete(journal::Kind::Notify, &key)?;
                    b.step(&txid, &Step::PaymentServerNotified, answer.kind())
                });
            } else {
                backlog = true;
            }
        }
        backlog
    }

    /// Delivers journaled confirmations to the merchant until each is answered for good,
    /// after asking the payment server again for those the gateway was waiting for.
    pub async fn run_releases(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        background(&self.wake_releases, shutdown, || me.release_pass()).await
    }

    async fn release_pass(&self) -> bool {
        // Confirmations still to be had from the payment server first (they become releases).
        let mut backlog = self.confirming_pass().await;
        for (key, bytes) in self.journal.all(journal::Kind::Release).unwrap_or_default() {
            let Ok(out) = journal::decode::<Outbound>(&bytes) else {
                tracing::error!(key, "unreadable release entry; left for an operator");
                continue;
            };
            let txid = txid_of_key(&key).to_string();
            let Ok(lock) = self.lock(&txid).await else {
                backlog = true;
                continue;
            };
            if self.outbound(&key).is_none() {
                continue; // delivered meanwhile
            }
            let _calling = self.mark_retrying(&txid);
            let span = tracing::info_span!("release", txid = %txid);
            let answer = self.deliver(&lock, &key, out).instrument(span).await;
            if !definite(&answer) {
                backlog = true;
            }
        }
        backlog
    }

    /// Passes each reversal in every payment server's feed on to the merchant, in order,
    /// once; the cursor per payment server is journaled (kind `cursor`).
    pub async fn run_reversal_feed(self: Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        background(&self.wake_feed, shutdown, || me.feed_pass()).await
    }

    async fn feed_pass(&self) -> bool {
        let payments: BTreeSet<String> =
            self.merchants.values().map(|m| m.payment.clone()).collect();
        let mut backlog = false;
        for payment in payments {
            // A cursor that cannot be read is not 0: the feed waits for the journal rather
            // than passing every reversal on again.
            let cursor = match self.journal.get(journal::Kind::Cursor, &payment) {
                Ok(c) => c
                    .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                    .map_or(0, u64::from_be_bytes),
                Err(e) => {
                    tracing::warn!(payment, error = %e, "reversal feed cursor unreadable; retrying later");
                    backlog = true;
                    continue;
                }
            };
            let page = match self
                .role(&payment)
                .handle(gw(), Message::ReversalsSince { after: cursor })
                .await
            {
                Message::Reversals(p) => p,
                other => {
                    tracing::debug!(payment, answer = other.kind(), "reversal feed unavailable");
                    backlog = true;
                    continue;
                }
            };
            for notice in page {
                if !self.pass_on_reversal(&payment, &notice).await {
                    backlog = true;
                    break;
                }
            }
        }
        backlog
    }

    /// Marks the transaction reversed (unless the merchant already released it: a debit
    /// proved after the reversal) and tells the merchant. False: try again later.
    async fn pass_on_reversal(&self, payment: &str, n: &ReversalNotice) -> bool {
        let txid = n.transaction_id.clone();
        let Ok(lock) = self.lock(&txid).await else {
            return false;
        };
        if let Some(mut t) = self.txn(&txid) {
            self.open_draws.close(&t.box_id, &txid);
            if t.receipt.is_none() && t.state != GwState::Reversed {
                t.state = GwState::Reversed;
                if self.save(&lock, &t, Step::Reversed).is_err() {
                    return false;
                }
            }
        }
        if let Some(m) = self.merchants.get(&n.merchant_id) {
            let _calling = self.mark_retrying(&txid);
            let answer = self
                .role(&m.merchant)
                .handle(gw(), Message::Reversed(n.clone()))
                .await;
            if !definite(&answer) {
                return false;
            }
        }
        // Forward only: another gateway on the same database may have read further.
        lock.atomically(|b| {
            let at = b
                .get_for_update(journal::Kind::Cursor, payment)?
                .and_then(|b| <[u8; 8]>::try_from(b.as_slice()).ok())
                .map_or(0, u64::from_be_bytes);
            if n.seq > at {
                b.put(journal::Kind::Cursor, payment, &n.seq.to_be_bytes())?;
            }
            b.step(&txid, &Step::ReversalPassedOn, &n.reason)
        })
        .is_ok()
    }
}

impl Gateway {
    /// One pass of each background delivery, in this order: debit responses to the payment
    /// servers (FIG. 6/7, [`Gateway::run_notifier`]), confirmations asked again and releases
    /// delivered to the merchants ([`Gateway::run_releases`]), then the payment servers'
    /// reversal feeds ([`Gateway::run_reversal_feed`]). For a caller that runs the gateway
    /// without its background tasks and decides itself when this work happens (`sim`'s
    /// deterministic in-process pair). True when something is left to retry.
    pub async fn background_pass(&self) -> bool {
        let notify = self.notify_pass().await;
        let releases = self.release_pass().await;
        let feed = self.feed_pass().await;
        notify || releases || feed
    }

    /// Debit responses not yet delivered to a payment server.
    pub fn pending_notifications(&self) -> usize {
        self.journal
            .all(journal::Kind::Notify)
            .map(|v| v.len())
            .unwrap_or(0)
    }

    /// Confirmations not yet answered by the merchant.
    pub fn pending_releases(&self) -> usize {
        self.journal
            .all(journal::Kind::Release)
            .map(|v| v.len())
            .unwrap_or(0)
    }
}

/// How long the background loop waits after `failing` passes in a row that left something
/// to retry: 500 ms, doubling, at most 10 s — so a head end whose journal is full, or whose
/// payment server is down, does not send the same message every half second for as long as
/// it lasts. With nothing left to retry (`failing` 0) it is 5 s, or less when woken.
pub(super) fn retry_wait(failing: u32) -> Duration {
    if failing == 0 {
        return Duration::from_secs(5);
    }
    Duration::from_millis(500)
        .saturating_mul(1u32 << (failing - 1).min(10))
        .min(Duration::from_secs(10))
}

/// Runs `pass` until `shutdown`: again after [`retry_wait`] while it reports a backlog (backing
/// off while the backlog persists), else after 5 s or when `wake` fires.
pub(super) async fn background<F, Fut>(
    wake: &tokio::sync::Notify,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let mut failing = 0u32;
    loop {
        let backlog = pass().await;
        failing = if backlog {
            failing.saturating_add(1)
        } else {
            0
        };
        tokio::select! {
            _ = wake.notified() => {}
            _ = tokio::time::sleep(retry_wait(failing)) => {}
            _ = shutdown.changed() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::retry_wait;
    use std::time::Duration;

    #[test]
    fn a_persisting_backlog_is_retried_less_and_less_often() {
        let ms = |n| retry_wait(n).as_millis();
        assert_eq!(ms(0), 5_000);
        assert_eq!(
            (ms(1), ms(2), ms(3), ms(4), ms(5)),
            (500, 1_000, 2_000, 4_000, 8_000)
        );
        assert_eq!(ms(6), 10_000);
        assert_eq!(retry_wait(u32::MAX), Duration::from_secs(10));
    }
}
