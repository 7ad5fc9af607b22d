//! Collection (001 [0007], [0044]–[0045]): the security-card terminals' completed purchases
//! go into numbered collection batches ([`proto::clearing::CollectionBatch`]) for clearing,
//! and clearing's batch acknowledgement lowers what the security cards still have to
//! settle.
//!
//! The batch is built and journaled before anything leaves: one write numbers it, marks
//! its transactions collected, and queues it for clearing ([`crate::outbox`]). The export
//! file (`headend collect`) and every send read the journaled batch, so a crash anywhere
//! re-sends or re-writes the identical batch under the same number, and a transaction is
//! in exactly one batch. The acknowledgement is journaled in the same write as the
//! outbox's delivery record; a repeat changes nothing.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proto::clearing::{BatchRecord, CollectionBatch, day_text};
use proto::messages::Message;
use proto::money::Currency;
use serde::{Deserialize, Serialize};

use super::refund::{RefundRec, RefundState};
use super::step::PayStep;
use super::{PayState, PayTxn, PaymentServer};
use crate::journal::{self, Kind, StoreError};
use crate::outbox::Outbox;

/// The most records one batch carries (fewer when `[transport] max_frame` needs it): a
/// batch travels as one frame (64 KiB by default; a record is about 60 bytes), so a busy
/// day closes several batches.
pub const MAX_BATCH_RECORDS: usize = 500;

/// A closed batch and where it stands (journal kind `batch`, key [`batch_key`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedBatch {
    pub batch: CollectionBatch,
    pub state: BatchState,
}

/// Where a closed batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BatchState {
    /// Closed and journaled; clearing has not acknowledged it.
    Closed,
    /// Clearing (or the acquirer, `headend ack-batch`) acknowledged it: its value no longer
    /// counts as remaining to settle.
    Acknowledged,
}

impl BatchState {
    /// The state's name for operators (`headend status`, logs).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            BatchState::Closed => "closed",
            BatchState::Acknowledged => "acknowledged",
        }
    }
}

/// The journal key of batch `n` (zero-padded: key order is batch order).
#[must_use]
pub fn batch_key(n: u64) -> String {
    format!("{n:06}")
}

/// The batch's id in the outbox and the step log.
#[must_use]
pub fn batch_id(n: u64) -> String {
    format!("batch-{n:06}")
}

/// Marks batch `n` acknowledged inside a journal write; false when it already was.
///
/// # Errors
/// The journal's; a batch that does not exist or does not decode is `QueryReturnedNoRows`
/// / a conversion error.
pub(crate) fn acknowledge_in(b: &journal::Batch, n: u64) -> Result<bool, StoreError> {
    let key = batch_key(n);
    let raw = b
        .get_for_update(Kind::Batch, &key)?
        .ok_or_else(|| StoreError::Aborted(format!("no batch {n}")))?;
    let mut rec: ClosedBatch = journal::decode(&raw).map_err(StoreError::Aborted)?;
    if rec.state == BatchState::Acknowledged {
        return Ok(false);
    }
    rec.state = BatchState::Acknowledged;
    b.put(Kind::Batch, &key, &journal::encode(&rec))?;
    b.step(&batch_id(n), &PayStep::BatchAcknowledged, "")?;
    Ok(true)
}

impl PaymentServer {
    /// Closes a batch of the completed transactions not yet collected (at most
    /// [`MAX_BATCH_RECORDS`]; call again for the rest): numbers it, marks its transactions,
    /// and (with `[payment] clearing`) queues it for clearing, in one journal write. `None`
    /// when there is nothing to collect.
    ///
    /// # Errors
    /// The journal cannot be read or written, or holds a corrupt record (nothing is then
    /// closed).
    pub fn close_batch(&self) -> Result<Option<CollectionBatch>, String> {
        let closed_on = day_text(super::today());
        let out = self
            .journal
            .atomically(|b| {
                let n = b
                    .get_for_update(Kind::Meta, "next-batch")?
                    .map(|v| u64::from_be_bytes(v.try_into().unwrap_or([0; 8])))
                    .unwrap_or(1);
                let mut due: Vec<PayTxn> = Vec::new();
                for (_, bytes) in b.all_for_update(Kind::Txn)? {
                    let t: PayTxn = journal::decode(&bytes).map_err(StoreError::Aborted)?;
                    // An authentication (002 FIG. 16) is no payment: it is never collected.
                    if t.state == PayState::Completed
                        && t.batch.is_none()
                        && !t.amount.is_authentication()
                    {
                        due.push(t);
                    }
                }
                // Refunds credited to cards (issue 17) go in as refund records.
                let mut refunds: Vec<RefundRec> = Vec::new();
                for (_, bytes) in b.all_for_update(Kind::Refund)? {
                    let r: RefundRec = journal::decode(&bytes).map_err(StoreError::Aborted)?;
                    if matches!(r.state, RefundState::Credited { .. }) && r.batch.is_none() {
                        refunds.push(r);
                    }
                }
                if due.is_empty() && refunds.is_empty() {
                    return Ok(None);
                }
                due.truncate(MAX_BATCH_RECORDS);
                refunds.truncate(MAX_BATCH_RECORDS - due.len());
                let refund_records: Vec<BatchRecord> = refunds
                    .iter()
                    .filter_map(|r| {
                        let i = r.issued()?;
                        Some(BatchRecord {
                            transaction_id: r.transaction_id.clone(),
                            merchant_id: r.merchant_id.clone(),
                            security_card_id: r.security_card_id,
                            security_card_txn: i.security_card_txn,
                            card_id: r.card_id,
                            amount: r.amount,
                        })
                    })
                    .collect();
                let records: Vec<BatchRecord> = due
                    .iter()
                    .map(|t| BatchRecord {
                        transaction_id: t.transaction_id.clone(),
                        merchant_id: t.merchant_id.clone(),
                        security_card_id: t.security_card_id,
                        security_card_txn: t.security_card_txn,
                        card_id: t.card_id,
                        amount: t.amount,
                    })
                    .collect();
                let build = |keep: usize, keep_refunds: usize| {
                    CollectionBatch::build(&self.name, n, &closed_on, records[..keep].to_vec())
                        .with_refunds(refund_records[..keep_refunds].to_vec())
                };
                let (mut keep, mut keep_refunds) = (records.len(), refund_records.len());
                let mut batch = build(keep, keep_refunds);
                // Small enough for one frame at this deployment's limit (with room for the
                // frame header and the message around it): fewer records if need be.
                while keep + keep_refunds > 1
                    && Message::CollectionBatch(Box::new(batch.clone()))
                        .to_payload()
                        .len()
                        > self.max_frame * 9 / 10
                {
                    if keep > keep_refunds {
                        keep = keep * 3 / 4;
                    } else {
                        keep_refunds = keep_refunds * 3 / 4;
                    }
                    batch = build(keep, keep_refunds);
                }
                due.truncate(keep);
                refunds.truncate(keep_refunds);
                for mut r in refunds {
                    r.batch = Some(n);
                    b.put(Kind::Refund, &r.transaction_id, &journal::encode(&r))?;
                    b.step(&r.transaction_id, &PayStep::RefundCollected, &batch_id(n))?;
                }
                for mut t in due {
                    t.batch = Some(n);
                    b.put(Kind::Txn, &t.transaction_id, &journal::encode(&t))?;
                    b.step(&t.transaction_id, &PayStep::Collected, &batch_id(n))?;
                }
                b.put(
                    Kind::Batch,
                    &batch_key(n),
                    &journal::encode(&ClosedBatch {
                        batch: batch.clone(),
                        state: BatchState::Closed,
                    }),
                )?;
                b.step(
                    &batch_id(n),
                    &PayStep::BatchClosed,
                    &format!(
                        "{} records, {} refunds",
                        batch.records.len(),
                        batch.refunds.len()
                    ),
                )?;
                if let Some(to) = &self.clearing {
                    Outbox::queue(
                        b,
                        to,
                        &batch_id(n),
                        &Message::CollectionBatch(Box::new(batch.clone())),
                    )?;
                }
                b.put(Kind::Meta, "next-batch", &(n + 1).to_be_bytes())?;
                Ok(Some(batch))
            })
            .map_err(|e| e.to_string())?;
        if let Some(batch) = &out {
            tracing::info!(
                batch = batch.batch,
                transactions = batch.records.len(),
                "collection batch closed"
            );
        }
        Ok(out)
    }

    /// Batch `n` as journaled, and where it stands.
    ///
    /// # Errors
    /// The journal cannot be read or the record is corrupt.
    pub fn batch(&self, n: u64) -> Result<Option<ClosedBatch>, String> {
        self.journal
            .get(Kind::Batch, &batch_key(n))
            .map_err(|e| e.to_string())?
            .map(|raw| journal::decode(&raw))
            .transpose()
    }

    /// Every batch as journaled, in number order.
    ///
    /// # Errors
    /// The journal cannot be read or a record is corrupt.
    pub fn batches(&self) -> Result<Vec<ClosedBatch>, String> {
        self.journal
            .all(Kind::Batch)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, raw)| journal::decode(&raw))
            .collect()
    }

    /// Writes batch `n`, as journaled, to `dir/collection-<n>.json` (the same bytes
    /// however often it is written).
    ///
    /// # Errors
    /// No such batch, the journal cannot be read, or the file cannot be written.
    pub fn export_batch(&self, n: u64, dir: &Path) -> Result<PathBuf, String> {
        let rec = self.batch(n)?.ok_or_else(|| format!("no batch {n}"))?;
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("collection-{n:06}.json"));
        let text = serde_json::to_string_pretty(&rec.batch).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(path)
    }

    /// Records the acknowledgement of batch `n` (by the acquirer, without a clearing role;
    /// clearing's own acknowledgement is journaled on delivery). True when it changed
    /// something; a repeat changes nothing.
    ///
    /// # Errors
    /// This payment server sends its batches to clearing (only clearing acknowledges them
    /// then), no such batch, or the journal cannot be written.
    pub fn ack_batch(&self, n: u64) -> Result<bool, String> {
        if let Some(to) = &self.clearing {
            return Err(format!(
                "this payment server sends its batches to {to}, whose acknowledgement is recorded when it arrives; ack-batch is for an acquirer without a clearing role"
            ));
        }
        if self.batch(n)?.is_none() {
            return Err(format!("no batch {n}"));
        }
        self.journal
            .atomically(|b| acknowledge_in(b, n))
            .map_err(|e| e.to_string())
    }

    /// Where batch `n` stands, if it exists.
    pub fn batch_state(&self, n: u64) -> Option<BatchState> {
        self.batch(n).ok()?.map(|r| r.state)
    }

    /// What each security card (by id) still has to settle, per currency, in minor units
    /// ([0044]): its totals less every acknowledged batch's records of it, signed — a
    /// refund comes off the totals when it is issued, before a batch carries it, so a card
    /// whose sales were all settled owes its refunds until they are (negative).
    pub async fn remaining_to_settle(&self) -> Result<BTreeMap<(u64, Currency), i128>, String> {
        let mut out: BTreeMap<(u64, Currency), i128> = BTreeMap::new();
        for slot in 0..self.pool.len() {
            let card = self.pool.card(slot).await.ok_or("no such slot")?;
            for (c, t) in card.totals() {
                *out.entry((card.id(), c)).or_default() += i128::from(t.amount);
            }
        }
        for rec in self.batches()? {
            if rec.state != BatchState::Acknowledged {
                continue;
            }
            for t in &rec.batch.security_cards {
                *out.entry((t.security_card_id, t.currency)).or_default() -= i128::from(t.amount);
            }
            for t in &rec.batch.refund_security_cards {
                *out.entry((t.security_card_id, t.currency)).or_default() += i128::from(t.amount);
            }
        }
        Ok(out)
    }

    /// The outbox to clearing, if `[payment] clearing` names one: it sends the closed
    /// batches and journals each acknowledgement with the batch's new state.
    pub fn clearing_outbox(
        self: &std::sync::Arc<Self>,
        receiver: std::sync::Arc<dyn crate::role::Role>,
    ) -> Option<std::sync::Arc<Outbox>> {
        let to = self.clearing.as_ref()?;
        Some(std::sync::Arc::new(
            Outbox::new(self.journal.clone(), &self.name, to, receiver).on_ack(
                |b, sent| match sent {
                    Message::CollectionBatch(batch) => acknowledge_in(b, batch.batch).map(|_| ()),
                    _ => Ok(()),
                },
            ),
        ))
    }

    /// Closes a batch every `every` and hands it to `outbox` (which delivers it and what
    /// an earlier run left), until `shutdown`.
    pub async fn run_collector(
        self: std::sync::Arc<Self>,
        outbox: std::sync::Arc<Outbox>,
        every: std::time::Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(every) => {}
            }
            // One batch per call, at most MAX_BATCH_RECORDS: close until none is due.
            loop {
                match self.close_batch() {
                    Ok(Some(_)) => outbox.nudge(),
                    Ok(None) => break,
                    Err(e) => {
                        tracing::error!(error = %e, "collection batch not closed; retrying later");
                        break;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::money::Money;

    /// The largest batch fits one frame, with room: transaction ids as long as the
    /// merchants make them and wider than they are.
    #[test]
    fn a_full_batch_fits_one_frame() {
        let records = (0..MAX_BATCH_RECORDS as u32)
            .map(|n| BatchRecord {
                transaction_id: format!("M-WEBSHOP-1796030667-{n:08x}-padding-to-48"),
                merchant_id: "M-WEBSHOP".into(),
                security_card_id: 0x5A00_0000 + u64::from(n % 4),
                security_card_txn: u32::MAX - n,
                card_id: u64::MAX - u64::from(n),
                amount: Money::new(u64::from(u32::MAX), Currency::EUR),
            })
            .collect();
        let batch =
            CollectionBatch::build("payment-with-a-long-name", u64::MAX, "2026-11-30", records);
        let frame = crate::role::to_payload(&Message::CollectionBatch(Box::new(batch)));
        assert!(
            frame.len() < proto::frame::DEFAULT_MAX_FRAME * 9 / 10,
            "{} bytes",
            frame.len()
        );
    }
}
