//! The gateway: the cable head end server 204 (module 224). It takes the boxes' messages
//! (identity from their device certificates), routes each transaction to the merchant and
//! payment server the config names for its merchant id, and relays the answers.
//!
//! Per merchant, the embodiment decides who compares the card signature (001 FIG. 4–7):
//! - FIG. 4/5: the debit response goes to the payment server, whose confirmation goes to
//!   the merchant;
//! - FIG. 6: the gateway compares with the expected signature and forwards the pre-sealed
//!   "debit result M" to the merchant itself — one round trip to the payment server fewer;
//! - FIG. 7: the gateway forwards the card's response and the expected signature sealed for
//!   the merchant, which compares.
//!
//! In FIG. 6/7 the payment server still has to see the debit response (to keep the sale,
//! not reverse it): the gateway journals it and delivers it in the background, retrying
//! until the payment server has it, across restarts.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use proto::crypto::{self, DesKey, Mac};
use proto::messages::*;
use proto::money::Money;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::config::MerchantDef;
use crate::journal::{self, Journal};
use crate::quic::BoxFuture;
use crate::role::refuse;
use crate::role::{Caller, Role};

/// The gateway's record of a transaction (journal kind `gw`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GwTxn {
    pub box_id: String,
    pub merchant_id: String,
    pub embodiment: Embodiment,
    pub tsk: Option<DesKey>,
    pub amount: Money,
    pub expected: Option<Mac>,
    pub sealed_expected: Option<Vec<u8>>,
    pub presealed_m: Option<Vec<u8>>,
    pub receipt: Option<Message>,
}

pub struct Gateway {
    journal: Arc<Journal>,
    merchants: HashMap<String, MerchantDef>,
    roles: HashMap<String, Arc<dyn Role>>,
    wake_notifier: tokio::sync::Notify,
}

impl Gateway {
    /// `roles` maps every payment/merchant name the merchants use to the role serving it.
    pub fn new(
        journal: Arc<Journal>,
        merchants: &[MerchantDef],
        roles: HashMap<String, Arc<dyn Role>>,
    ) -> Result<Arc<Self>, String> {
        for m in merchants {
            for name in [&m.payment, &m.merchant] {
                if !roles.contains_key(name) {
                    return Err(format!(
                        "merchant {} routes to {name}, which is neither a local role nor an [endpoints] entry",
                        m.id
                    ));
                }
            }
        }
        Ok(Arc::new(Self {
            journal,
            merchants: merchants
                .iter()
                .map(|m| (m.id.clone(), m.clone()))
                .collect(),
            roles,
            wake_notifier: tokio::sync::Notify::new(),
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn txn(&self, txid: &str) -> Option<GwTxn> {
        journal::decode(&self.journal.get("gw", txid).ok()??).ok()
    }

    fn save(&self, txid: &str, t: &GwTxn, step: &str) -> Result<(), Box<Message>> {
        self.journal
            .atomically(|b| {
                b.put("gw", txid, &journal::encode(t))?;
                b.step(txid, step, "")
            })
            .map_err(|e| {
                Box::new(refuse(
                    ErrorCode::Internal,
                    format!("journal: {e}"),
                    Some(txid),
                ))
            })
    }

    fn role(&self, name: &str) -> &Arc<dyn Role> {
        &self.roles[name]
    }

    /// A role by name, if this head end routes to it (load side: `bank`, `load`).
    pub(crate) fn try_role(&self, name: &str) -> Option<&Arc<dyn Role>> {
        self.roles.get(name)
    }

    async fn catalog(&self, box_id: &str) -> Message {
        let names: BTreeSet<&String> = self.merchants.values().map(|m| &m.merchant).collect();
        let mut items = Vec::new();
        for name in names {
            match self
                .role(name)
                .handle(Caller::Role("gateway".into()), Message::CatalogRequest)
                .await
            {
                Message::Catalog(mut c) => items.append(&mut c),
                other => {
                    tracing::warn!(merchant = %name, box_id, answer = crate::payment::kind(&other), "catalog unavailable")
                }
            }
        }
        Message::Catalog(items)
    }

    async fn offer(&self, box_id: &str, merchant_id: String, item_id: String) -> Message {
        let Some(m) = self.merchants.get(&merchant_id) else {
            return refuse(
                ErrorCode::UnknownRoute,
                format!("no route for merchant {merchant_id}"),
                None,
            );
        };
        let ask = Message::RoutedOfferRequest {
            box_id: box_id.into(),
            merchant_id,
            item_id,
        };
        let answer = self
            .role(&m.merchant)
            .handle(Caller::Role("gateway".into()), ask)
            .await;
        if let Message::Offer(o) = &answer {
            let t = GwTxn {
                box_id: box_id.into(),
                merchant_id: o.merchant_id.clone(),
                embodiment: o.embodiment,
                tsk: o.tsk.clone(),
                amount: o.amount,
                expected: None,
                sealed_expected: None,
                presealed_m: None,
                receipt: None,
            };
            if let Err(e) = self.save(&o.transaction_id, &t, "offer relayed") {
                return *e;
            }
        }
        answer
    }

    /// The transaction, if it exists and belongs to this box.
    fn owned(&self, box_id: &str, txid: &str) -> Result<GwTxn, Box<Message>> {
        match self.txn(txid) {
            None => Err(Box::new(refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(txid),
            ))),
            Some(t) if t.box_id != box_id => Err(Box::new(refuse(
                ErrorCode::NotYourAccount,
                format!("transaction {txid} belongs to another box"),
                Some(txid),
            ))),
            Some(t) => Ok(t),
        }
    }

    async fn draw(&self, box_id: &str, req: DrawRequest) -> Message {
        let txid = req.transaction_id.clone();
        let mut t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        if req.merchant_id != t.merchant_id {
            return refuse(
                ErrorCode::UnknownMerchant,
                "draw request names another merchant than its offer",
                Some(&txid),
            );
        }
        // The amount must be the offer's: a box (or anything on the way) asking to pay less
        // is refused here, before any security card signs anything.
        match req.body.open(t.tsk.as_ref()) {
            Ok(body) if body.amount == t.amount => {}
            Ok(body) => {
                return refuse(
                    ErrorCode::AmountMismatch,
                    format!(
                        "draw request for {} but the offer is {}",
                        body.amount, t.amount
                    ),
                    Some(&txid),
                );
            }
            Err(e) => {
                return refuse(
                    ErrorCode::BadSignature,
                    format!("draw request body: {e}"),
                    Some(&txid),
                );
            }
        }
        let payment = self.merchants[&t.merchant_id].payment.clone();
        let _ = self.journal.step(&txid, "draw request relayed", &payment);
        let answer = self
            .role(&payment)
            .handle(Caller::Role("gateway".into()), Message::DrawRequest(req))
            .await;
        if let Message::DebitCommand(dc) = &answer {
            match dc.body.open(t.tsk.as_ref()) {
                Ok(body) => {
                    t.expected = body.expected_card_signature;
                    t.sealed_expected = body.sealed_expected_signature;
                    t.presealed_m = body.presealed_result_m;
                    if let Err(e) = self.save(&txid, &t, "debit command relayed") {
                        return *e;
                    }
                }
                Err(e) => {
                    return refuse(
                        ErrorCode::BadSignature,
                        format!("debit command from the payment server: {e}"),
                        Some(&txid),
                    );
                }
            }
        }
        answer
    }

    async fn debit_response(&self, box_id: &str, msg: DebitResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let mut t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        if let Some(r) = &t.receipt {
            tracing::info!(txid, "retried debit response: same receipt");
            return r.clone();
        }
        let merchant = self.merchants[&t.merchant_id].merchant.clone();
        let payment = self.merchants[&t.merchant_id].payment.clone();
        let _ = self.journal.step(&txid, "debit response received", "");
        let (confirmation, new_balance) = match t.embodiment {
            Embodiment::SecurityCard | Embodiment::PaymentServer => {
                match self
                    .role(&payment)
                    .handle(Caller::Role("gateway".into()), Message::DebitResponse(msg))
                    .await
                {
                    Message::Confirmation(c) => {
                        let balance = c.result_c.open(t.tsk.as_ref()).ok().map(|r| r.new_balance);
                        (c, balance)
                    }
                    other => return other,
                }
            }
            Embodiment::Gateway | Embodiment::Merchant => {
                let resp = match msg.body.open(t.tsk.as_ref()) {
                    Ok(r) => r,
                    Err(e) => {
                        return refuse(
                            ErrorCode::BadSignature,
                            format!("debit response body: {e}"),
                            Some(&txid),
                        );
                    }
                };
                // The payment server must see the response whatever happens next: journal it
                // for background delivery before anything is released.
                if let Err(e) = self.journal.put("notify", &txid, &journal::encode(&msg)) {
                    return refuse(ErrorCode::Internal, format!("journal: {e}"), Some(&txid));
                }
                self.wake_notifier.notify_one();
                if t.embodiment == Embodiment::Gateway {
                    let (Some(expected), Some(m)) = (t.expected, t.presealed_m.clone()) else {
                        return refuse(
                            ErrorCode::Internal,
                            "no expected signature for this transaction",
                            Some(&txid),
                        );
                    };
                    if !crypto::mac_eq(&expected, &resp.card_signature) {
                        let _ = self.journal.step(&txid, "gateway compared: mismatch", "");
                        return refuse(
                            ErrorCode::BadSignature,
                            "card signature differs from the expected one; nothing released",
                            Some(&txid),
                        );
                    }
                    let _ = self.journal.step(&txid, "gateway compared: match", "");
                    let c = Confirmation {
                        transaction_id: txid.clone(),
                        result_c: Protected::Clear(DebitResultC {
                            transaction_id: txid.clone(),
                            success: true,
                            amount: t.amount,
                            new_balance: resp.new_balance,
                        }),
                        result_m: m,
                        debit_response: None,
                    };
                    (c, Some(resp.new_balance))
                } else {
                    let Some(sealed) = t.sealed_expected.clone() else {
                        return refuse(
                            ErrorCode::Internal,
                            "no sealed expected signature for this transaction",
                            Some(&txid),
                        );
                    };
                    let c = Confirmation {
                        transaction_id: txid.clone(),
                        result_c: Protected::Clear(DebitResultC {
                            transaction_id: txid.clone(),
                            success: true,
                            amount: t.amount,
                            new_balance: resp.new_balance,
                        }),
                        result_m: sealed,
                        debit_response: Some(resp.clone()),
                    };
                    (c, Some(resp.new_balance))
                }
            }
        };
        let answer = self
            .role(&merchant)
            .handle(
                Caller::Role("gateway".into()),
                Message::Confirmation(confirmation),
            )
            .await;
        let answer = match answer {
            Message::Receipt(mut r) => {
                r.new_balance = r.new_balance.or(new_balance);
                Message::Receipt(r)
            }
            other => other,
        };
        if matches!(answer, Message::Receipt(_)) {
            t.receipt = Some(answer.clone());
            if let Err(e) = self.save(&txid, &t, "receipt relayed") {
                return *e;
            }
        }
        answer
    }

    async fn cancel(&self, box_id: &str, c: CancelMsg) -> Message {
        let txid = c.transaction_id.clone();
        let t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let _ = self
            .journal
            .step(&txid, "cancel relayed", &format!("{:?}", c.reason));
        let nothing_charged = || {
            Message::Receipt(Receipt {
                transaction_id: txid.clone(),
                released: false,
                text: "Cancelled; nothing was charged".into(),
                entitlement: None,
                new_balance: None,
            })
        };
        // An offer whose draw request never went out has nothing to reverse anywhere.
        let drawn = self
            .journal
            .steps(&txid)
            .is_ok_and(|s| s.iter().any(|x| x == "draw request relayed"));
        if !drawn {
            return nothing_charged();
        }
        let payment = self.merchants[&t.merchant_id].payment.clone();
        match self
            .role(&payment)
            .handle(Caller::Role("gateway".into()), Message::Cancel(c))
            .await
        {
            Message::Error(e) if e.code == ErrorCode::UnknownTransaction => nothing_charged(),
            other => other,
        }
    }

    /// Delivers journaled debit responses to their payment servers (FIG. 6/7) until each is
    /// acknowledged. Runs until `shutdown`.
    pub async fn run_notifier(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let pending: BTreeMap<String, Vec<u8>> = self
                .journal
                .all("notify")
                .unwrap_or_default()
                .into_iter()
                .collect();
            for (txid, bytes) in pending {
                let Ok(msg) = journal::decode::<DebitResponseMsg>(&bytes) else {
                    let _ = self.journal.atomically(|b| b.delete("notify", &txid));
                    continue;
                };
                let Some(t) = self.txn(&txid) else { continue };
                let payment = self
                    .merchants
                    .get(&t.merchant_id)
                    .map(|m| m.payment.clone());
                let Some(payment) = payment else { continue };
                let answer = self
                    .role(&payment)
                    .handle(Caller::Role("gateway".into()), Message::DebitResponse(msg))
                    .await;
                let delivered = match &answer {
                    Message::Error(e) => e.code != ErrorCode::Busy && e.code != ErrorCode::Internal,
                    _ => true,
                };
                if delivered {
                    let _ = self.journal.atomically(|b| {
                        b.delete("notify", &txid)?;
                        b.step(
                            &txid,
                            "payment server notified",
                            crate::payment::kind(&answer),
                        )
                    });
                }
            }
            let backlog = !self.journal.all("notify").unwrap_or_default().is_empty();
            let wait = if backlog {
                Duration::from_millis(500)
            } else {
                Duration::from_secs(30)
            };
            tokio::select! {
                _ = self.wake_notifier.notified() => {}
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
    }

    /// Debit responses not yet delivered to a payment server.
    pub fn pending_notifications(&self) -> usize {
        self.journal.all("notify").map(|v| v.len()).unwrap_or(0)
    }
}

impl Role for Gateway {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            let Caller::Box(box_id) = caller else {
                return refuse(
                    ErrorCode::NotYourAccount,
                    "the gateway serves set-top boxes only",
                    None,
                );
            };
            match msg {
                Message::CatalogRequest => self.catalog(&box_id).await,
                Message::OfferRequest {
                    merchant_id,
                    item_id,
                } => self.offer(&box_id, merchant_id, item_id).await,
                Message::DrawRequest(r) => {
                    let span =
                        tracing::info_span!("draw", txid = %r.transaction_id, box_id = %box_id);
                    self.draw(&box_id, r).instrument(span).await
                }
                Message::DebitResponse(r) => self.debit_response(&box_id, r).await,
                Message::Cancel(c) => self.cancel(&box_id, c).await,
                m @ (Message::LoadOfferRequest(_)
                | Message::LoadRequest(_)
                | Message::LoadResponse(_)) => self.load_dispatch(&box_id, m).await,
                other => refuse(
                    ErrorCode::Malformed,
                    format!("a box cannot send {}", crate::payment::kind(&other)),
                    None,
                ),
            }
        })
    }
}
