//! The gateway's side of the load conversation (001 [0117]–[0135], [0141]–[0157]): routing
//! each step to the funder — the bank for a bank account, the load server for a pre-funded
//! voucher — and to the load server, and relaying the answers.
//!
//! | box sends | the gateway does | box gets |
//! |---|---|---|
//! | `LoadOfferRequest` | funder: `RoutedLoadOfferRequest` → `LoadOffer` | `LoadOffer` |
//! | `LoadRequest` | funder: `HoldRequest` (PIN, limits) → `HoldPlaced`; load server: `LoadRequest` → `LoadCommand` (or `LoadRefused`, whose sealed no-load goes to the funder to release the hold) | `LoadCommand` |
//! | `LoadResponse` | load server → `LoadConfirmation` (sealed for the funder); funder: `LoadConfirmation` → `HoldSettled` | `LoadConfirmation` |
//!
//! The gateway journals each step (kind `gwload`) and keeps the answers: a retried load
//! request gets the same load command, a retried load response the same confirmation.
//! When a hop is unreachable the box gets `Busy` and retries with the same transaction id;
//! every hop is idempotent on it, so a retry never holds or loads twice.

// A refusal is the answer message itself, relayed to the box: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use std::sync::Arc;

use proto::messages::*;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::gateway::Gateway;
use crate::journal;
use crate::role::refuse;
use crate::role::{Caller, Role};

/// Role-table name of the bank server.
pub const BANK: &str = "bank";
/// Role-table name of the load server (also the funder of pre-funded accounts).
pub const LOAD: &str = "load";

/// The gateway's record of one load (journal kind `gwload`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GwLoad {
    pub box_id: String,
    pub funder: String,
    pub offer: LoadOffer,
    pub hold: Option<HoldPlaced>,
    pub command: Option<Message>,
    pub confirmation: Option<Message>,
    pub settled: Option<HoldSettled>,
}

fn funder_of(source: &LoadSource) -> &'static str {
    match source {
        LoadSource::Bank { .. } => BANK,
        LoadSource::Voucher { .. } => LOAD,
    }
}

fn gw() -> Caller {
    Caller::Role("gateway".into())
}

impl Gateway {
    fn load_role(&self, name: &str, txid: Option<&str>) -> Result<Arc<dyn Role>, Message> {
        self.try_role(name).cloned().ok_or_else(|| {
            refuse(
                ErrorCode::UnknownRoute,
                format!("no {name} role is configured on this head end"),
                txid,
            )
        })
    }

    pub fn load_txn(&self, txid: &str) -> Option<GwLoad> {
        journal::decode(&self.journal().get("gwload", txid).ok()??).ok()
    }

    fn save_load(&self, txid: &str, t: &GwLoad, step: &str) -> Result<(), Message> {
        self.journal()
            .atomically(|b| {
                b.put("gwload", txid, &journal::encode(t))?;
                b.step(txid, step, "")
            })
            .map_err(|e| refuse(ErrorCode::Internal, format!("journal: {e}"), Some(txid)))
    }

    fn owned_load(&self, box_id: &str, txid: &str) -> Result<GwLoad, Message> {
        match self.load_txn(txid) {
            None => Err(refuse(
                ErrorCode::UnknownTransaction,
                format!("no load transaction {txid}"),
                Some(txid),
            )),
            Some(t) if t.box_id != box_id => Err(refuse(
                ErrorCode::NotYourAccount,
                format!("load transaction {txid} belongs to another box"),
                Some(txid),
            )),
            Some(t) => Ok(t),
        }
    }

    /// Load offer: the funder computes the maximum and opens the transaction.
    pub(crate) async fn load_offer(&self, box_id: &str, req: LoadOfferRequest) -> Message {
        let funder = funder_of(&req.source);
        let role = match self.load_role(funder, None) {
            Ok(r) => r,
            Err(e) => return e,
        };
        let answer = role
            .handle(
                gw(),
                Message::RoutedLoadOfferRequest {
                    box_id: box_id.into(),
                    request: req,
                },
            )
            .await;
        if let Message::LoadOffer(o) = &answer {
            let t = GwLoad {
                box_id: box_id.into(),
                funder: funder.into(),
                offer: o.clone(),
                hold: None,
                command: None,
                confirmation: None,
                settled: None,
            };
            if let Err(e) = self.save_load(&o.transaction_id, &t, "load offer relayed") {
                return e;
            }
            tracing::info!(txid = %o.transaction_id, box_id, max = %o.max_amount, "load offer relayed");
        }
        answer
    }

    /// Load request: hold at the funder first, then S1 to the load server for S2.
    pub(crate) async fn load_request(&self, box_id: &str, req: LoadRequest) -> Message {
        let txid = req.transaction_id.clone();
        let t_ = Some(txid.as_str());
        let mut t = match self.owned_load(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if let Some(c) = &t.command {
            tracing::info!(txid, "retried load request: same load command");
            return c.clone();
        }
        if req.source != t.offer.source {
            return refuse(
                ErrorCode::NotYourAccount,
                "the load request names another source than its offer",
                t_,
            );
        }
        // S1 covers the server time stamp of this offer: an S1 made for another offer
        // (or an old one) is not accepted here.
        if req.init.timestamp != t.offer.timestamp {
            return refuse(
                ErrorCode::Replay,
                "the card's S1 is not over this offer's time stamp",
                t_,
            );
        }
        let (funder, load) = match (self.load_role(&t.funder, t_), self.load_role(LOAD, t_)) {
            (Ok(f), Ok(l)) => (f, l),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        if t.hold.is_none() {
            let hold = HoldRequest {
                box_id: box_id.into(),
                transaction_id: txid.clone(),
                source: req.source.clone(),
                amount: req.amount,
                card_id: req.init.card_id,
                card_balance: req.init.balance,
                card_max_balance: req.init.max_balance,
                sealed_pin: req.sealed_pin.clone(),
            };
            match funder.handle(gw(), Message::HoldRequest(hold)).await {
                Message::HoldPlaced(h) => {
                    t.hold = Some(h);
                    if let Err(e) = self.save_load(&txid, &t, "hold placed") {
                        return e;
                    }
                }
                other => return other,
            }
        }
        let answer = load.handle(gw(), Message::LoadRequest(req)).await;
        match answer {
            Message::LoadCommand(_) => {
                t.command = Some(answer.clone());
                if let Err(e) = self.save_load(&txid, &t, "load command relayed") {
                    return e;
                }
                tracing::info!(txid, "load command relayed");
                answer
            }
            Message::LoadRefused(r) => {
                // Never authorized: the sealed no-load releases the hold.
                let _ = self
                    .journal()
                    .step(&txid, "load request refused", &r.error.reason);
                let settled = self
                    .settle(&mut t, &funder, r.confirmation.clone(), &txid)
                    .await;
                if let Err(e) = settled {
                    return e;
                }
                Message::Error(r.error)
            }
            other => other,
        }
    }

    /// Relays a confirmation to the funder and journals the settlement.
    async fn settle(
        &self,
        t: &mut GwLoad,
        funder: &Arc<dyn Role>,
        c: LoadConfirmation,
        txid: &str,
    ) -> Result<HoldSettled, Message> {
        if let Some(s) = &t.settled {
            return Ok(s.clone());
        }
        t.confirmation = Some(Message::LoadConfirmation(c.clone()));
        match funder.handle(gw(), Message::LoadConfirmation(c)).await {
            Message::HoldSettled(s) => {
                t.settled = Some(s.clone());
                let step = if s.captured {
                    "hold captured"
                } else {
                    "hold released"
                };
                self.save_load(txid, t, step)?;
                Ok(s)
            }
            Message::Error(e) if e.code == ErrorCode::UnknownTransaction && t.hold.is_none() => {
                // No hold was ever placed (the funder refused first): nothing to settle.
                let s = HoldSettled {
                    transaction_id: txid.into(),
                    captured: false,
                    amount: proto::money::Money::zero(t.offer.max_amount.currency),
                };
                t.settled = Some(s.clone());
                self.save_load(txid, t, "nothing held")?;
                Ok(s)
            }
            other => Err(other),
        }
    }

    /// Load response: the load server's verdict, then the funder captures or releases.
    pub(crate) async fn load_response(&self, box_id: &str, msg: LoadResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let t_ = Some(txid.as_str());
        let mut t = match self.owned_load(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return e,
        };
        if let (Some(c), Some(_)) = (&t.confirmation, &t.settled) {
            tracing::info!(txid, "retried load response: same confirmation");
            return c.clone();
        }
        let (funder, load) = match (self.load_role(&t.funder, t_), self.load_role(LOAD, t_)) {
            (Ok(f), Ok(l)) => (f, l),
            (Err(e), _) | (_, Err(e)) => return e,
        };
        let _ = self.journal().step(&txid, "load response relayed", "");
        let c = match load.handle(gw(), Message::LoadResponse(msg)).await {
            Message::LoadConfirmation(c) => c,
            other => return other,
        };
        match self.settle(&mut t, &funder, c.clone(), &txid).await {
            Ok(s) => {
                tracing::info!(
                    txid,
                    loaded = c.loaded,
                    captured = s.captured,
                    "load confirmation relayed"
                );
                Message::LoadConfirmation(c)
            }
            Err(e) => e,
        }
    }

    /// Dispatch for the load conversation's box messages, with the transaction id on the
    /// span.
    pub(crate) async fn load_dispatch(&self, box_id: &str, msg: Message) -> Message {
        match msg {
            Message::LoadOfferRequest(r) => {
                let span = tracing::info_span!("load offer", %box_id);
                self.load_offer(box_id, r).instrument(span).await
            }
            Message::LoadRequest(r) => {
                let span = tracing::info_span!("load", txid = %r.transaction_id, %box_id);
                self.load_request(box_id, r).instrument(span).await
            }
            Message::LoadResponse(r) => {
                let span = tracing::info_span!("load", txid = %r.transaction_id, %box_id);
                self.load_response(box_id, r).instrument(span).await
            }
            other => refuse(
                ErrorCode::Malformed,
                format!("a box cannot send {}", crate::payment::kind(&other)),
                None,
            ),
        }
    }
}
