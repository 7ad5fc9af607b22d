//! Collection: settled transactions batched into collection files for the acquirer
//! (001 [0007], [0045]): per-merchant totals and counts, the security-card ids, every
//! record, and a batch acknowledgement. A transaction is in exactly one batch.

use super::step::PayStep;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{PayState, PayTxn, PaymentServer};
use crate::journal::{self, Kind};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerchantTotal {
    pub merchant_id: String,
    pub currency: u16,
    pub exponent: u8,
    pub count: u64,
    pub amount: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionRecordLine {
    pub transaction_id: String,
    pub merchant_id: String,
    pub security_card: String,
    #[serde(alias = "psam_txn")]
    pub security_card_txn: u32,
    pub card_id: String,
    pub amount: u64,
    pub currency: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionFile {
    pub batch: u64,
    pub payment_server: String,
    pub totals: Vec<MerchantTotal>,
    pub security_cards: Vec<String>,
    pub records: Vec<CollectionRecordLine>,
}

impl PaymentServer {
    /// Closes a batch of every completed transaction not yet collected, writes it to
    /// `dir/collection-<batch>.json`, and marks the transactions collected. Returns `None`
    /// when there is nothing to collect.
    pub fn close_batch(&self, dir: &Path) -> Result<Option<(CollectionFile, PathBuf)>, String> {
        let batch = self
            .journal
            .get(Kind::Meta, "next-batch")
            .map_err(|e| e.to_string())?
            .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
            .unwrap_or(1);
        let mut due: Vec<PayTxn> = Vec::new();
        for (_, bytes) in self.journal.all(Kind::Txn).map_err(|e| e.to_string())? {
            let t: PayTxn = journal::decode(&bytes)?;
            if t.state == PayState::Completed && t.batch.is_none() {
                due.push(t);
            }
        }
        if due.is_empty() {
            return Ok(None);
        }
        let mut totals: BTreeMap<(String, u16, u8), (u64, u64)> = BTreeMap::new();
        let mut cards = std::collections::BTreeSet::new();
        let mut records = Vec::new();
        for t in &due {
            let e = totals
                .entry((
                    t.merchant_id.clone(),
                    t.amount.currency.code,
                    t.amount.currency.exponent,
                ))
                .or_default();
            e.0 += 1;
            e.1 += t.amount.minor;
            cards.insert(format!("{:X}", t.security_card_id));
            records.push(CollectionRecordLine {
                transaction_id: t.transaction_id.clone(),
                merchant_id: t.merchant_id.clone(),
                security_card: format!("{:X}", t.security_card_id),
                security_card_txn: t.security_card_txn,
                card_id: format!("{:016X}", t.card_id),
                amount: t.amount.minor,
                currency: t.amount.currency.code,
            });
        }
        let file = CollectionFile {
            batch,
            payment_server: self.name.clone(),
            totals: totals
                .into_iter()
                .map(
                    |((merchant_id, currency, exponent), (count, amount))| MerchantTotal {
                        merchant_id,
                        currency,
                        exponent,
                        count,
                        amount,
                    },
                )
                .collect(),
            security_cards: cards.into_iter().collect(),
            records,
        };
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let path = dir.join(format!("collection-{batch:06}.json"));
        let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
        std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        self.journal
            .atomically(|b| {
                for mut t in due.clone() {
                    t.batch = Some(batch);
                    b.put(Kind::Txn, &t.transaction_id, &journal::encode(&t))?;
                    b.step(
                        &t.transaction_id,
                        &PayStep::Collected,
                        &format!("batch {batch}"),
                    )?;
                }
                b.put(Kind::Batch, &format!("{batch:06}"), b"open")?;
                b.put(Kind::Meta, "next-batch", &(batch + 1).to_be_bytes())
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(batch, transactions = due.len(), path = %path.display(), "collection batch closed");
        Ok(Some((file, path)))
    }

    /// Records the acquirer's acknowledgement of a batch.
    pub fn ack_batch(&self, batch: u64) -> Result<(), String> {
        let key = format!("{batch:06}");
        match self
            .journal
            .get(Kind::Batch, &key)
            .map_err(|e| e.to_string())?
        {
            None => Err(format!("no batch {batch}")),
            Some(_) => self
                .journal
                .put(Kind::Batch, &key, b"acknowledged")
                .map_err(|e| e.to_string()),
        }
    }

    pub fn batch_state(&self, batch: u64) -> Option<String> {
        let v = self
            .journal
            .get(Kind::Batch, &format!("{batch:06}"))
            .ok()??;
        String::from_utf8(v).ok()
    }
}
