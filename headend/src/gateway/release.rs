//! Releases: accepted confirmations journaled (kind `release`) and delivered to the
//! merchant, whose receipt is kept.

use proto::messages::*;

use super::{Gateway, GwState, Outbound, Step, TxnGuard, definite, gw, txid_of_key};
use crate::journal;
use crate::role::refuse;

impl Gateway {
    /// Journals an accepted response: its release for the merchant and (FIG. 6/7) its
    /// notification for the payment server, in one write, before either is delivered.
    /// The refusal is the answer to relay, built once: boxing it would buy nothing.
    #[allow(clippy::result_large_err)]
    pub(super) fn accept(
        &self,
        lock: &TxnGuard<'_>,
        key: &str,
        out: &Outbound,
        notify: Option<&DebitResponseMsg>,
        step: Step,
    ) -> Result<(), Message> {
        let txid = lock.txid();
        let mut t = self.txn(txid).ok_or_else(|| {
            refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(txid),
            )
        })?;
        t.state = GwState::Confirmed;
        lock.atomically(|b| {
            b.put(journal::Kind::Gw, txid, &journal::encode(&t))?;
            b.put(journal::Kind::Release, key, &journal::encode(out))?;
            b.delete(journal::Kind::Confirming, key)?;
            if let Some(n) = notify {
                b.put(journal::Kind::Notify, key, &journal::encode(n))?;
            }
            b.step(txid, &step, "")
        })
        .map_err(|e| crate::role::journal_failed(e, Some(txid)))?;
        crate::test_hook::freeze_at(
            crate::test_hook::GATEWAY_PAUSE_AFTER_CONFIRMATION_JOURNALED,
            || format!("{txid}: confirmation journaled, not yet delivered to the merchant"),
        );
        if notify.is_some() {
            self.wake_notifier.notify_one();
        }
        Ok(())
    }

    pub(super) fn outbound(&self, key: &str) -> Option<Outbound> {
        journal::decode(&self.journal.get(journal::Kind::Release, key).ok()??).ok()
    }

    /// Delivers one journaled confirmation to the merchant. A receipt is kept (and the
    /// entry deleted) in one write; a definite refusal deletes only this entry; a merchant
    /// that is down keeps it for the background delivery and the box gets `Busy`.
    /// Under the transaction's lock.
    pub(super) async fn deliver(&self, lock: &TxnGuard<'_>, key: &str, out: Outbound) -> Message {
        let txid = lock.txid().to_string();
        let Some(mut t) = self.txn(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(&txid),
            );
        };
        if let Some(r) = &t.receipt {
            // Answered meanwhile (another response, or the background delivery).
            let _ = lock.atomically(|b| b.delete(journal::Kind::Release, key));
            return if t.debit_response.as_ref() == Some(&out.response) {
                r.clone()
            } else {
                refuse(
                    ErrorCode::Replay,
                    "transaction completed with another debit response",
                    Some(&txid),
                )
            };
        }
        let merchant = self.merchants[&t.merchant_id].merchant.clone();
        let answer = self
            .role(&merchant)
            .handle(gw(), Message::Confirmation(out.confirmation.clone()))
            .await;
        match answer {
            Message::Receipt(mut r) => {
                r.new_balance = r.new_balance.or(out.new_balance);
                let receipt = Message::Receipt(r);
                t.receipt = Some(receipt.clone());
                t.debit_response = Some(out.response);
                t.state = GwState::Done;
                self.open_draws.close(&t.box_id, &txid);
                if let Err(e) = lock.atomically(|b| {
                    b.put(journal::Kind::Gw, &txid, &journal::encode(&t))?;
                    b.delete(journal::Kind::Release, key)?;
                    b.step(&txid, &Step::ReceiptRelayed, "")
                }) {
                    return crate::role::journal_failed(e, Some(&txid));
                }
                receipt
            }
            other if definite(&other) => {
                let why = match &other {
                    Message::Error(e) => e.reason.clone(),
                    m => m.kind().to_string(),
                };
                let _ = lock.atomically(|b| {
                    b.delete(journal::Kind::Release, key)?;
                    b.step(&txid, &Step::MerchantRefused, &why)
                });
                if t.state == GwState::Confirmed && self.releases_for(&txid).is_empty() {
                    t.state = GwState::Drawn;
                    let _ = self.save(lock, &t, Step::NoReleasePending);
                }
                other
            }
            other => {
                tracing::warn!(
                    txid,
                    answer = other.kind(),
                    "merchant unreachable; release kept for background delivery"
                );
                self.wake_releases.notify_one();
                refuse(
                    ErrorCode::Busy,
                    "paid; the merchant is unreachable and the release will follow: retry for the receipt",
                    Some(&txid),
                )
            }
        }
    }

    /// The release entries journaled for a transaction.
    fn releases_for(&self, txid: &str) -> Vec<String> {
        self.journal
            .range_after(journal::Kind::Release, &format!("{txid}/"), 16)
            .unwrap_or_default()
            .into_iter()
            .map(|(k, _)| k)
            .filter(|k| txid_of_key(k) == txid)
            .collect()
    }
}
