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

pub mod step;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use step::MerchantStep;

use proto::crypto::{self, DesKey, Mac, MessageKeys};
use proto::messages::*;
use proto::money::Money;
use proto::security_card::SecurityCard;
use rand::RngCore;
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};

use crate::config::{HeadendConfig, MerchantDef, MerchantKind};
use crate::journal::{self, Journal, Kind};
use crate::quic::BoxFuture;
use crate::role::refuse;
use crate::role::{Caller, Role};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OfferState {
    Offered,
    Released,
    /// No confirmation within the offer lifetime.
    Expired,
    /// The payment server reversed the transaction.
    Reversed,
    // Appended (postcard indices above stay put).
    /// The confirmation validated but nothing is released for it, for good: an
    /// authenticated card that is no member of the benefits programme. Answered, and every
    /// repeat, with a receipt that says so (`released: false`) — a final answer, so the box
    /// does not keep proving what was already accepted.
    Declined,
}

/// The merchant's record of an offer (journal kind `offer`). Expired and Reversed are not
/// final for a confirmation: one that validates (the card's debit proved late) still
/// releases the goods, once.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OfferRecord {
    pub offer: Offer,
    pub box_id: String,
    pub state: OfferState,
    /// When the offer was made, seconds since the epoch.
    pub created: u64,
    pub receipt: Option<Receipt>,
    /// The confirmation that released the goods (postcard): a repeat must be identical.
    pub confirmation: Option<Vec<u8>>,
}

/// What a validated confirmation proved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proved {
    /// The card paid this (debit result M, or FIG. 7's comparison).
    Paid(Money),
    /// "Authentication OK" (002 FIG. 16): this card proved itself; nothing was paid.
    Authenticated { card_id: u64 },
}

struct Shop {
    def: MerchantDef,
    key: DesKey,
}

pub struct MerchantServer {
    journal: Arc<Journal>,
    shops: HashMap<String, Shop>,
    next_order: AtomicU64,
    offer_lifetime_secs: u64,
    /// One change to an offer record at a time (confirmation, reversal, expiry).
    write: std::sync::Mutex<()>,
}

impl MerchantServer {
    pub fn open(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        let section = cfg.merchant.as_ref().ok_or("no [merchant] section")?;
        let name = section.name.clone();
        let journal = Arc::new(
            Journal::open_target(&cfg.journal_target(&name).map_err(|e| e.to_string())?)
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
                        key: m.key().map_err(|e| e.to_string())?,
                    },
                ))
            })
            .collect::<Result<HashMap<_, _>, String>>()?;
        let next_order = journal.all(Kind::Release).map_err(|e| e.to_string())?.len() as u64 + 1;
        Ok(Arc::new(Self {
            journal,
            shops,
            next_order: AtomicU64::new(next_order),
            offer_lifetime_secs: section.offer_lifetime_secs,
            write: std::sync::Mutex::new(()),
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn offer_record(&self, txid: &str) -> Option<OfferRecord> {
        journal::decode(&self.journal.get(Kind::Offer, txid).ok()??).ok()
    }

    /// How many times goods were released for `txid` (0 or 1).
    pub fn releases(&self, txid: &str) -> usize {
        usize::from(
            self.journal
                .get(Kind::Release, txid)
                .ok()
                .flatten()
                .is_some(),
        )
    }

    /// The entitlements recorded for a box.
    pub fn entitlements(&self, box_id: &str) -> Vec<String> {
        self.journal
            .all(Kind::Entitlement)
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
        let created = crate::bank::now_secs();
        let rec = OfferRecord {
            offer: offer.clone(),
            box_id,
            state: OfferState::Offered,
            created,
            receipt: None,
            confirmation: None,
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Offer, &txid, &journal::encode(&rec))?;
            b.put(Kind::Open, &txid, &created.to_be_bytes())?;
            b.step(
                &txid,
                &MerchantStep::OfferMade,
                &format!("{} {} for {}", item.id, item.price(), rec.box_id),
            )
        }) {
            return crate::role::journal_failed(e, Some(&txid));
        }
        tracing::info!(txid, merchant = merchant_id, item = item_id, amount = %item.price(), "offer made");
        Message::Offer(offer)
    }

    /// Validates a confirmation; `Ok` carries what was proved: a payment, or (an
    /// authentication draw, 002 FIG. 16) the card that authenticated.
    fn validate(&self, shop: &Shop, rec: &OfferRecord, c: &Confirmation) -> Result<Proved, String> {
        let txid = &rec.offer.transaction_id;
        let derived = MessageKeys::derived(&shop.key, &shop.def.id, txid);
        let authentication = rec.offer.amount.is_authentication();
        if rec.offer.embodiment == Embodiment::Merchant {
            // FIG. 7 (001 [0063], routine 366): compare the card signature with the expected
            // one sealed for us — the security card's own comparison.
            let resp = c
                .debit_response
                .as_ref()
                .ok_or("no debit response to compare")?;
            let raw = crypto::open(&derived, &c.result_m)
                .map_err(|e| format!("expected signature: {e}"))?;
            let expected: Mac = raw
                .try_into()
                .map_err(|_| "expected signature is not 8 bytes")?;
            if !SecurityCard::signatures_match(&expected, resp) {
                return Err("card signature differs from the expected one".into());
            }
            if resp.amount != rec.offer.amount.minor || resp.currency != rec.offer.amount.currency {
                return Err("debit response is for another amount".into());
            }
            // The expected signature covers the card id: the card that answered.
            return Ok(if authentication {
                Proved::Authenticated {
                    card_id: resp.card_id,
                }
            } else {
                Proved::Paid(rec.offer.amount)
            });
        }
        if authentication {
            // "Authentication OK" (002 [0163]) under the FIG. 8 derived key.
            let raw = crypto::open(&derived, &c.result_m)
                .map_err(|e| format!("authentication OK: {e}"))?;
            let ok: AuthenticationOk = journal::decode(&raw)?;
            if &ok.transaction_id != txid || ok.merchant_id != shop.def.id {
                return Err("authentication OK is for another transaction".into());
            }
            return Ok(Proved::Authenticated {
                card_id: ok.card_id,
            });
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
        Ok(Proved::Paid(m.amount))
    }

    fn confirm(&self, c: Confirmation) -> Message {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let txid = c.transaction_id.clone();
        let Some(mut rec) = self.offer_record(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no offer {txid}"),
                Some(&txid),
            );
        };
        let raw = journal::encode(&c);
        if let (OfferState::Released | OfferState::Declined, Some(r)) = (rec.state, &rec.receipt) {
            // Replayed: the receipt already given, nothing more released.
            return crate::role::repeat(
                rec.confirmation.as_ref(),
                &raw,
                &Message::Receipt(r.clone()),
                "confirmation",
                &txid,
            );
        }
        let Some(shop) = self.shops.get(&rec.offer.merchant_id) else {
            return refuse(
                ErrorCode::UnknownMerchant,
                "merchant gone from config",
                Some(&txid),
            );
        };
        let proved = match self.validate(shop, &rec, &c) {
            Ok(p) => p,
            Err(why) => {
                let _ = self
                    .journal
                    .step(&txid, &MerchantStep::ConfirmationRefused, &why);
                return refuse(
                    ErrorCode::BadSignature,
                    format!("confirmation does not validate ({why}); nothing released"),
                    Some(&txid),
                );
            }
        };
        let item = rec.offer.item_id.clone();
        let (entitlement, text) = match (proved, shop.def.kind) {
            (Proved::Authenticated { card_id }, _) => {
                // The benefits server (208′) maps the card to its member account.
                let Some(member) = shop.def.members.iter().find(|m| m.card_id == card_id) else {
                    let why = format!(
                        "Card {card_id} is not a member of {}: no benefit (nothing was charged)",
                        shop.def.name
                    );
                    return self.decline(rec, raw, why);
                };
                let n = self.next_order.fetch_add(1, Ordering::Relaxed);
                (
                    format!("{}/benefit-{n:06}/{}/{}", rec.box_id, member.account, txid),
                    format!(
                        "Authenticated: \"{}\" for member {} (benefit {n:06})",
                        rec.offer.title, member.account
                    ),
                )
            }
            (Proved::Paid(paid), MerchantKind::Cable)
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
            (Proved::Paid(paid), _) => {
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
        let late = rec.state != OfferState::Offered;
        rec.state = OfferState::Released;
        rec.receipt = Some(receipt.clone());
        rec.confirmation = Some(raw);
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Offer, &txid, &journal::encode(&rec))?;
            b.delete(Kind::Open, &txid)?;
            b.put(Kind::Release, &txid, entitlement.as_bytes())?;
            b.put(Kind::Entitlement, &entitlement, txid.as_bytes())?;
            b.step(&txid, &MerchantStep::GoodsReleased, &entitlement)
        }) {
            return crate::role::journal_failed(e, Some(&txid));
        }
        tracing::info!(txid, entitlement, late, "goods released");
        Message::Receipt(receipt)
    }

    /// Closes `rec` for good without releasing anything ([`OfferState::Declined`]), and
    /// answers with the receipt that says why (`released: false`), journaled first.
    fn decline(&self, mut rec: OfferRecord, confirmation: Vec<u8>, why: String) -> Message {
        let txid = rec.offer.transaction_id.clone();
        let receipt = Receipt {
            transaction_id: txid.clone(),
            released: false,
            text: why.clone(),
            entitlement: None,
            new_balance: None,
        };
        rec.state = OfferState::Declined;
        rec.receipt = Some(receipt.clone());
        rec.confirmation = Some(confirmation);
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Offer, &txid, &journal::encode(&rec))?;
            b.delete(Kind::Open, &txid)?;
            b.step(&txid, &MerchantStep::Declined, &why)
        }) {
            return crate::role::journal_failed(e, Some(&txid));
        }
        tracing::info!(txid, why, "nothing released: declined");
        Message::Receipt(receipt)
    }

    /// The payment server reversed `n`: an offer not released moves to Reversed. A released
    /// one stays released — its confirmation proved the card's debit, which the payment
    /// server counts when the debit response reaches it.
    fn reversed(&self, n: ReversalNotice) -> Message {
        let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let txid = n.transaction_id.clone();
        let ack = Message::Ack {
            transaction_id: txid.clone(),
        };
        let Some(mut rec) = self.offer_record(&txid) else {
            // Not ours, or long gone: nothing to move.
            return ack;
        };
        match rec.state {
            OfferState::Released | OfferState::Reversed | OfferState::Declined => ack,
            OfferState::Offered | OfferState::Expired => {
                rec.state = OfferState::Reversed;
                match self.journal.atomically(|b| {
                    b.put(Kind::Offer, &txid, &journal::encode(&rec))?;
                    b.delete(Kind::Open, &txid)?;
                    b.step(&txid, &MerchantStep::ReversedByThePaymentServer, &n.reason)
                }) {
                    Ok(()) => {
                        tracing::info!(txid, reason = %n.reason, "offer reversed");
                        ack
                    }
                    Err(e) => crate::role::journal_failed(e, Some(&txid)),
                }
            }
        }
    }

    /// Marks offers not confirmed within their lifetime as expired. Returns how many.
    pub fn sweep(&self) -> usize {
        let now = crate::bank::now_secs();
        let mut n = 0;
        for (txid, created) in self.journal.all(Kind::Open).unwrap_or_default() {
            let created = <[u8; 8]>::try_from(created.as_slice()).map_or(0, u64::from_be_bytes);
            if now < created + self.offer_lifetime_secs {
                continue;
            }
            let _w = self.write.lock().unwrap_or_else(|p| p.into_inner());
            let rec = self.offer_record(&txid);
            let saved = self.journal.atomically(|b| {
                b.delete(Kind::Open, &txid)?;
                if let Some(mut r) = rec.clone().filter(|r| r.state == OfferState::Offered) {
                    r.state = OfferState::Expired;
                    b.put(Kind::Offer, &txid, &journal::encode(&r))?;
                    b.step(
                        &txid,
                        &MerchantStep::OfferExpired,
                        "no confirmation within its lifetime",
                    )?;
                }
                Ok(())
            });
            if saved.is_ok() {
                n += 1;
            }
        }
        n
    }

    /// Runs the expiry sweep every few seconds until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = tick.tick() => { self.sweep(); }
                _ = shutdown.changed() => return,
            }
        }
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
                Message::Reversed(_) if matches!(caller, Caller::Box(_)) => refuse(
                    ErrorCode::Forbidden,
                    "reversal notices reach the merchant through the gateway",
                    None,
                ),
                Message::Reversed(n) => self.reversed(n),
                other => Message::error(
                    ErrorCode::Malformed,
                    format!("the merchant does not take {}", other.kind()),
                    None,
                ),
            }
        })
    }
}
