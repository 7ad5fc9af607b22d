//! Receiving collection batches and load advices (001 [0007], [0045], [0135]).
//!
//! A batch is accepted only from the payment server it names, speaking for itself, when
//! `[clearing] payment_servers` lists it; it must be whole
//! ([`proto::clearing::CollectionBatch::check`]); the identical batch again gets the same
//! acknowledgement and changes nothing; other content under a received batch id, or a
//! security-card transaction another batch already cleared, is refused naming it. The
//! checks read inside the write that journals the batch, so two receivers on one journal
//! cannot both take it. Load advices follow the same rules per funder and transaction id.

use proto::clearing::{CollectionBatch, LoadAdvice};
use proto::messages::{ErrorCode, Message};

use super::step::ClearingStep;
use super::{AdviceRec, ClearingServer, Received, advice_key, batch_key, txn_key};
use crate::journal::{self, Kind, StoreError};
use crate::role::{Caller, journal_failed, refuse};

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ClearingServer {
    /// Who may send for `party`: the role named `party` itself, listed in `allowed`.
    #[allow(clippy::result_large_err)] // the refusal is the answer, sent as is
    fn speaks_for(
        caller: &Caller,
        party: &str,
        allowed: &std::collections::BTreeSet<String>,
        what: &str,
    ) -> Result<(), Message> {
        match caller {
            Caller::Role(r) if r == party && allowed.contains(party) => Ok(()),
            Caller::Role(r) if r != party => Err(refuse(
                ErrorCode::Forbidden,
                format!("{what} of {party} sent by {r}: a party sends only its own"),
                None,
            )),
            Caller::Role(_) => Err(refuse(
                ErrorCode::Forbidden,
                format!("{party} is not a {what} sender this clearing knows"),
                None,
            )),
            Caller::Box(b) => Err(refuse(
                ErrorCode::Forbidden,
                format!("a set-top box ({b}) cannot send {what}"),
                None,
            )),
        }
    }

    /// Takes a collection batch from `caller`: the acknowledgement, or the refusal with its
    /// reason (nothing journaled).
    pub fn receive_batch(&self, caller: &Caller, batch: CollectionBatch) -> Message {
        let id = batch_key(&batch.payment_server, batch.batch);
        if let Err(m) = Self::speaks_for(
            caller,
            &batch.payment_server,
            &self.payment_servers,
            "collection batches",
        ) {
            return m;
        }
        if let Err(e) = batch.check() {
            return refuse(
                ErrorCode::Malformed,
                format!("batch {id} refused: {e}"),
                Some(&id),
            );
        }
        // A merchant this clearing pays must be one it knows, acquired by this payment server.
        if !self.merchants.is_empty() {
            for (r, _) in batch.all_records() {
                match self.merchants.get(&r.merchant_id) {
                    Some(ps) if *ps == batch.payment_server => {}
                    Some(ps) => {
                        return refuse(
                            ErrorCode::Malformed,
                            format!(
                                "batch {id} refused: transaction {} is for merchant {}, whose payment server is {ps}",
                                r.transaction_id, r.merchant_id
                            ),
                            Some(&id),
                        );
                    }
                    None => {
                        return refuse(
                            ErrorCode::Malformed,
                            format!(
                                "batch {id} refused: transaction {} is for merchant {}, which this clearing does not know",
                                r.transaction_id, r.merchant_id
                            ),
                            Some(&id),
                        );
                    }
                }
            }
        }
        let ack = Message::BatchAck {
            payment_server: batch.payment_server.clone(),
            batch: batch.batch,
        };
        let outcome = self.journal.atomically(|b| {
            if let Some(raw) = b.get_for_update(Kind::ClearedBatch, &id)? {
                let first: Received = journal::decode(&raw).map_err(StoreError::Aborted)?;
                return Ok(if first.batch == batch {
                    tracing::info!(batch = %id, "batch received again: same acknowledgement");
                    Ok(())
                } else {
                    Err(format!(
                        "batch {id} was received with other content; a batch id is used once"
                    ))
                });
            }
            for (r, refund) in batch.all_records() {
                let cleared_id = cleared_id_key(&batch.payment_server, &r.transaction_id, refund);
                if let Some(other) = b.get_for_update(Kind::ClearedId, &cleared_id)? {
                    return Ok(Err(format!(
                        "transaction {} was cleared in batch {} already",
                        r.transaction_id,
                        String::from_utf8_lossy(&other)
                    )));
                }
                if let Some(other) = b.get_for_update(Kind::ClearedTxn, &txn_key(r.security_card_id, r.security_card_txn))? {
                    return Ok(Err(format!(
                        "transaction {} (security card {:X} transaction {}) was cleared in batch {} already",
                        r.transaction_id,
                        r.security_card_id,
                        r.security_card_txn,
                        String::from_utf8_lossy(&other)
                    )));
                }
            }
            b.put(
                Kind::ClearedBatch,
                &id,
                &journal::encode(&Received {
                    batch: batch.clone(),
                    received_at: now_secs(),
                    settlement: None,
                }),
            )?;
            for (r, refund) in batch.all_records() {
                b.put(
                    Kind::ClearedTxn,
                    &txn_key(r.security_card_id, r.security_card_txn),
                    id.as_bytes(),
                )?;
                b.put(
                    Kind::ClearedId,
                    &cleared_id_key(&batch.payment_server, &r.transaction_id, refund),
                    id.as_bytes(),
                )?;
            }
            b.step(
                &id,
                &ClearingStep::BatchReceived,
                &format!("{} records", batch.records.len()),
            )?;
            Ok(Ok(()))
        });
        match outcome {
            Ok(Ok(())) => {
                tracing::info!(batch = %id, records = batch.records.len(), "batch received and acknowledged");
                ack
            }
            Ok(Err(why)) => refuse(ErrorCode::Replay, why, Some(&id)),
            Err(e) => journal_failed(e, Some(&id)),
        }
    }

    /// Takes a load advice from `caller`: `Ack`, or the refusal with its reason.
    pub fn receive_advice(&self, caller: &Caller, advice: LoadAdvice) -> Message {
        let txid = advice.transaction_id.clone();
        if let Err(m) = Self::speaks_for(caller, &advice.funder, &self.funders, "load advices") {
            return m;
        }
        if advice.amount.minor == 0 {
            return refuse(
                ErrorCode::Malformed,
                format!("load advice {txid}: a zero amount moves nothing"),
                Some(&txid),
            );
        }
        if advice.amount.minor > proto::clearing::MAX_AMOUNT
            || advice.amount.currency.exponent > proto::clearing::MAX_EXPONENT
        {
            return refuse(
                ErrorCode::Malformed,
                format!("load advice {txid}: the amount is beyond any purse"),
                Some(&txid),
            );
        }
        let key = advice_key(&advice.funder, &txid);
        let outcome = self.journal.atomically(|b| {
            if let Some(raw) = b.get_for_update(Kind::Advice, &key)? {
                let first: AdviceRec = journal::decode(&raw).map_err(StoreError::Aborted)?;
                return Ok(if first.advice == advice {
                    Ok(())
                } else {
                    Err(format!(
                        "load {txid} was advised by {} with other content",
                        advice.funder
                    ))
                });
            }
            b.put(
                Kind::Advice,
                &key,
                &journal::encode(&AdviceRec {
                    advice: advice.clone(),
                    received_at: now_secs(),
                    settlement: None,
                }),
            )?;
            b.step(
                &txid,
                &ClearingStep::AdviceReceived,
                &format!("{} from {}", advice.amount, advice.funder),
            )?;
            Ok(Ok(()))
        });
        match outcome {
            Ok(Ok(())) => Message::Ack {
                transaction_id: txid,
            },
            Ok(Err(why)) => refuse(ErrorCode::Replay, why, Some(&txid)),
            Err(e) => journal_failed(e, Some(&txid)),
        }
    }
}

/// The `cleared_txid` key of a sale (`<payment server>/<transaction id>`) or of its refund
/// (`<payment server>/refund/<transaction id>`): each is cleared once.
fn cleared_id_key(payment_server: &str, txid: &str, refund: bool) -> String {
    if refund {
        format!("{payment_server}/refund/{txid}")
    } else {
        format!("{payment_server}/{txid}")
    }
}
