//! Resolving the journal's in-doubt transactions against the card in the reader (at start,
//! on every card insertion, after a reconnect): the IO half of [`crate::flow::recovery`].

use proto::card::commands;
use proto::messages::{CancelMsg, CancelReason, DebitResponseMsg, Message, Protected};
use proto::purse::PurchaseInit;
use tracing::Instrument;

use super::card::{CardPort, today};
use super::gateway::Gateway;
use crate::flow::purchase::Step;
use crate::flow::recovery::{Decision, decide};
use crate::journal::Journal;

/// What one recovery pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub resent: usize,
    pub cancelled: usize,
    pub left: usize,
}

/// Tries every in-doubt transaction of the inserted card; the rest wait.
pub async fn resolve(journal: &mut Journal, card: &mut CardPort, gateway: &Gateway) -> Resolved {
    let mut done = Resolved::default();
    if let Err(e) = journal.close_unsent() {
        tracing::error!(error = %e, "journal: cannot close unsent transactions");
    }
    let pending = match journal.in_doubt() {
        Ok(p) => p,
        Err(e) => {
            tracing::error!(error = %e, "journal unreadable; in-doubt transactions wait");
            return done;
        }
    };
    if pending.is_empty() || !card.has_card() {
        done.left = pending.len();
        return done;
    }
    let info = match card.read_purse().await {
        Ok(i) => i,
        Err(e) => {
            tracing::warn!(error = %e, "recovery: cannot read the card");
            done.left = pending.len();
            return done;
        }
    };
    let log = match card.read_log().await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "recovery: cannot read the card's log");
            done.left = pending.len();
            return done;
        }
    };
    for p in pending {
        let txid = p.txn.transaction_id.clone();
        let span = tracing::info_span!("recover", transaction_id = %txid, state = %p.state);
        let ok = async {
            match decide(&p.txn, info.card_id, &log) {
                Decision::OtherCard => {
                    tracing::info!("another card is in the reader; waiting for the card of this transaction");
                    None
                }
                Decision::ResendDebitResponse(resp) => {
                    let msg = Message::DebitResponse(DebitResponseMsg {
                        transaction_id: txid.clone(),
                        body: Protected::new(resp.clone(), p.offer.tsk.as_ref(), &mut rand::thread_rng()),
                    });
                    if p.state != "debit_responded" {
                        // The crash came before the response was journaled: journal it now.
                        let _ = journal.record(&txid, &Step::DebitResponded { response: resp });
                    }
                    match gateway.call(&msg).await {
                        Ok(Message::Receipt(receipt)) => {
                            tracing::info!(released = receipt.released, "the card had debited; debit response re-sent");
                            journal.record(&txid, &Step::Completed { receipt }).ok().map(|_| true)
                        }
                        Ok(other) => {
                            tracing::warn!(answer = ?other, "debit response re-sent but not confirmed");
                            None
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot re-send the debit response");
                            None
                        }
                    }
                }
                Decision::ProveNotDebited => {
                    let proof = async {
                        card.expect_ok(&commands::select()).await?;
                        let d = card.expect_ok(&commands::init_purchase(today())).await?;
                        PurchaseInit::decode(&d).map_err(|e| e.to_string())
                    }
                    .await;
                    let proof = match proof {
                        Ok(p) => Some(p),
                        Err(e) => {
                            tracing::warn!(error = %e, "no INITIALIZE proof; cancelling without it");
                            None
                        }
                    };
                    if p.state != "cancel_pending" {
                        let _ = journal.record(&txid, &Step::CancelPending { reason: CancelReason::NotDebited });
                    }
                    let msg = Message::Cancel(CancelMsg {
                        transaction_id: txid.clone(),
                        reason: CancelReason::NotDebited,
                        proof,
                    });
                    // The session's INITIALIZE is consumed; the next use starts afresh.
                    card.release().await;
                    match gateway.call(&msg).await {
                        Ok(answer) => {
                            tracing::info!(answer = ?answer, "the card had not debited; cancelled with proof");
                            journal
                                .record(&txid, &Step::Ended { why: "not debited; cancelled with proof (recovery)".into() })
                                .ok()
                                .map(|_| false)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot send the cancel");
                            None
                        }
                    }
                }
            }
        }
        .instrument(span)
        .await;
        match ok {
            Some(true) => done.resent += 1,
            Some(false) => done.cancelled += 1,
            None => done.left += 1,
        }
    }
    card.release().await;
    done
}
