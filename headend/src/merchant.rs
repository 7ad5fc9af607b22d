//! The merchant role: the cable operator's own catalog (001 merchant code module 227:
//! pay-per-view events, shopping-channel items; [0037], [0049]) and internet merchants
//! (merchant server 208; [0046]–[0048], [0072], [0089]).
//!
//! It makes offers — amount, currency and exponent, a unique transaction id, merchant id,
//! payment-server route and status route, and (FIG. 8) TSK + ETSK — and it releases goods
//! only on a confirmation it validates itself: "debit result M" opened under the key it
//! derives from the key it shares with the payment server, or (FIG. 7) the card signature
//! compared with the expected one sealed for it. A forged confirmation releases nothing; a
//! replayed one gets the receipt already given and releases nothing more.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use proto::crypto::{self, DesKey, Mac, MessageKeys};
use proto::messages::*;
use proto::money::Money;
use rand::RngCore;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};

use crate::config::{HeadendConfig, MerchantDef, MerchantKind};
use crate::journal::{self, Journal};
use crate::quic::BoxFuture;
use crate::role::refuse;
use crate::role::{Caller, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferState {
    Offered,
    Released,
}

/// The merchant's record of an offer (journal kind `offer`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferRecord {
    pub offer: Offer,
    pub box_id: String,
    pub state: OfferState,
    pub receipt: Option<Receipt>,
}

struct Shop {
    def: MerchantDef,
    key: DesKey,
}

pub struct MerchantServer {
    journal: Arc<Journal>,
    shops: HashMap<String, Shop>,
    next_order: AtomicU64,
}

impl MerchantServer {
    pub fn open(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        let name = cfg
            .merchant
            .as_ref()
            .map(|m| m.name.clone())
            .ok_or("no [merchant] section")?;
        let journal = Arc::new(
            Journal::open(&cfg.state_dir.join(format!("{name}.sqlite")))
                .map_err(|e| e.to_string())?,
        );
        let shops = cfg
            .merchants
            .iter()
            .filter(|m| m.merchant == name)
            .map(|m| {
                Ok((
                    m.id.clone(),
                    Shop {
                        def: m.clone(),
                        key: m.key()?,
                    },
                ))
            })
            .collect::<Result<HashMap<_, _>, String>>()?;
        let next_order = journal.all("release").map_err(|e| e.to_string())?.len() as u64 + 1;
        Ok(Arc::new(Self {
            journal,
            shops,
            next_order: AtomicU64::new(next_order),
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn offer_record(&self, txid: &str) -> Option<OfferRecord> {
        journal::decode(&self.journal.get("offer", txid).ok()??).ok()
    }

    /// How many times goods were released for `txid` (0 or 1).
    pub fn releases(&self, txid: &str) -> usize {
        usize::from(self.journal.get("release", txid).ok().flatten().is_some())
    }

    /// The entitlements recorded for a box.
    pub fn entitlements(&self, box_id: &str) -> Vec<String> {
        self.journal
            .all("entitlement")
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{box_id}/")))
            .map(|(k, _)| k)
            .collect()
    }

    fn catalog(&self) -> Vec<CatalogItem> {
        let mut out: Vec<CatalogItem> = self
            .shops
            .values()
            .flat_map(|s| {
                s.def.items.iter().map(|i| CatalogItem {
                    merchant_id: s.def.id.clone(),
                    item_id: i.id.clone(),
                    title: i.title.clone(),
                    kind: i.kind.clone(),
                    detail: i.detail.clone(),
                    amount: i.price(),
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.merchant_id, &a.item_id).cmp(&(&b.merchant_id, &b.item_id)));
        out
    }

    fn offer(&self, box_id: String, merchant_id: &str, item_id: &str) -> Message {
        let Some(shop) = self.shops.get(merchant_id) else {
            return refuse(
                ErrorCode::UnknownMerchant,
                format!("no merchant {merchant_id} here"),
                None,
            );
        };
        let Some(item) = shop.def.items.iter().find(|i| i.id == item_id) else {
            return refuse(
                ErrorCode::Malformed,
                format!("merchant {merchant_id} has no item {item_id}"),
                None,
            );
        };
        let mut rng = OsRng;
        let txid = format!(
            "{}-{}-{:08x}",
            merchant_id,
            time::OffsetDateTime::now_utc().unix_timestamp(),
            rng.next_u32()
        );
        let (tsk, etsk) = if shop.def.message_layer {
            let derived = MessageKeys::derived(&shop.key, merchant_id, &txid);
            let (tsk, etsk) = MessageKeys::new_tsk(&derived, &mut rng);
            (Some(tsk), Some(etsk))
        } else {
            (None, None)
        };
        let offer = Offer {
            transaction_id: txid.clone(),
            merchant_id: merchant_id.into(),
            item_id: item_id.into(),
            title: item.title.clone(),
            amount: item.price(),
            payment_route: shop.def.payment.clone(),
            status_route: shop.def.merchant.clone(),
            embodiment: shop.def.embodiment,
            tsk,
            etsk,
        };
        let rec = OfferRecord {
            offer: offer.clone(),
            box_id,
            state: OfferState::Offered,
            receipt: None,
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put("offer", &txid, &journal::encode(&rec))?;
            b.step(
                &txid,
                "offer made",
                &format!("{} {} for {}", item.id, item.price(), rec.box_id),
            )
        }) {
            return refuse(ErrorCode::Internal, format!("journal: {e}"), Some(&txid));
        }
        tracing::info!(txid, merchant = merchant_id, item = item_id, amount = %item.price(), "offer made");
        Message::Offer(offer)
    }

    /// Validates a confirmation; `Ok` carries what was proved paid.
    fn validate(&self, shop: &Shop, rec: &OfferRecord, c: &Confirmation) -> Result<Money, String> {
        let txid = &rec.offer.transaction_id;
        let derived = MessageKeys::derived(&shop.key, &shop.def.id, txid);
        if rec.offer.embodiment == Embodiment::Merchant {
            // FIG. 7: compare the card signature with the expected one sealed for us.
            let resp = c
                .debit_response
                .as_ref()
                .ok_or("no debit response to compare")?;
            let raw = crypto::open(&derived, &c.result_m)
                .map_err(|e| format!("expected signature: {e}"))?;
            let expected: Mac = raw
                .try_into()
                .map_err(|_| "expected signature is not 8 bytes")?;
            if !crypto::mac_eq(&expected, &resp.card_signature) {
                return Err("card signature differs from the expected one".into());
            }
            if resp.amount != rec.offer.amount.minor || resp.currency != rec.offer.amount.currency {
                return Err("debit response is for another amount".into());
            }
            return Ok(rec.offer.amount);
        }
        let raw =
            crypto::open(&derived, &c.result_m).map_err(|e| format!("debit result M: {e}"))?;
        let m: DebitResultM = journal::decode(&raw)?;
        if &m.transaction_id != txid || m.merchant_id != shop.def.id {
            return Err("debit result M is for another transaction".into());
        }
        if m.amount != rec.offer.amount {
            return Err(format!(
                "paid {} but the offer was {}",
                m.amount, rec.offer.amount
            ));
        }
        if !m.success {
            return Err("the payment server reports no debit".into());
        }
        Ok(m.amount)
    }

    fn confirm(&self, c: Confirmation) -> Message {
        let txid = c.transaction_id.clone();
        let Some(mut rec) = self.offer_record(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no offer {txid}"),
                Some(&txid),
            );
        };
        if let (OfferState::Released, Some(r)) = (rec.state, &rec.receipt) {
            tracing::info!(
                txid,
                "confirmation replayed: receipt already given, nothing more released"
            );
            return Message::Receipt(r.clone());
        }
        let Some(shop) = self.shops.get(&rec.offer.merchant_id) else {
            return refuse(
                ErrorCode::UnknownMerchant,
                "merchant gone from config",
                Some(&txid),
            );
        };
        let paid = match self.validate(shop, &rec, &c) {
            Ok(p) => p,
            Err(why) => {
                let _ = self.journal.step(&txid, "confirmation refused", &why);
                return refuse(
                    ErrorCode::BadSignature,
                    format!("confirmation does not validate ({why}); nothing released"),
                    Some(&txid),
                );
            }
        };
        let item = rec.offer.item_id.clone();
        let (entitlement, text) = match shop.def.kind {
            MerchantKind::Cable
                if shop
                    .def
                    .items
                    .iter()
                    .any(|i| i.id == item && i.kind == "ppv") =>
            {
                (
                    format!("{}/{}/{}", rec.box_id, item, txid),
                    format!("Enjoy \"{}\" — paid {paid}", rec.offer.title),
                )
            }
            _ => {
                let n = self.next_order.fetch_add(1, Ordering::Relaxed);
                (
                    format!("{}/order-{n:06}/{}", rec.box_id, txid),
                    format!("Order {n:06}: \"{}\" — paid {paid}", rec.offer.title),
                )
            }
        };
        let receipt = Receipt {
            transaction_id: txid.clone(),
            released: true,
            text,
            entitlement: Some(entitlement.clone()),
            new_balance: None,
        };
        rec.state = OfferState::Released;
        rec.receipt = Some(receipt.clone());
        if let Err(e) = self.journal.atomically(|b| {
            b.put("offer", &txid, &journal::encode(&rec))?;
            b.put("release", &txid, entitlement.as_bytes())?;
            b.put("entitlement", &entitlement, txid.as_bytes())?;
            b.step(&txid, "goods released", &entitlement)
        }) {
            return refuse(ErrorCode::Internal, format!("journal: {e}"), Some(&txid));
        }
        tracing::info!(txid, entitlement, "goods released");
        Message::Receipt(receipt)
    }
}

impl Role for MerchantServer {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            match msg {
                Message::CatalogRequest => Message::Catalog(self.catalog()),
                // Only the gateway vouches for a box id; a box asking directly is itself.
                Message::RoutedOfferRequest {
                    box_id,
                    merchant_id,
                    item_id,
                } if matches!(caller, Caller::Role(_)) => {
                    self.offer(box_id, &merchant_id, &item_id)
                }
                Message::OfferRequest {
                    merchant_id,
                    item_id,
                } => match caller {
                    Caller::Box(b) => self.offer(b, &merchant_id, &item_id),
                    Caller::Role(r) => refuse(
                        ErrorCode::Malformed,
                        format!("{r}: use a routed offer request"),
                        None,
                    ),
                },
                // Confirmations come from the gateway only; a box cannot post one.
                Message::Confirmation(_) if matches!(caller, Caller::Box(_)) => refuse(
                    ErrorCode::NotYourAccount,
                    "confirmations reach the merchant through the gateway",
                    None,
                ),
                Message::Confirmation(c) => self.confirm(c),
                other => Message::error(
                    ErrorCode::Malformed,
                    format!(
                        "the merchant does not take {}",
                        crate::payment::kind(&other)
                    ),
                    None,
                ),
            }
        })
    }
}
