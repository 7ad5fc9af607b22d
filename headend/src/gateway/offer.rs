//! Offer request: routed to the merchant its id names; the offer is checked against the
//! merchant's configuration and journaled (kind `gw`, state `Offered`) before it is relayed.

use proto::messages::*;

use super::{Gateway, GwState, GwTxn, Step, gw, now_secs};
use crate::config::MerchantDef;
use crate::journal;
use crate::limits::Kind;
use crate::role::refuse;

impl Gateway {
    /// A box's offer request, routed to the merchant its id names; the merchant's offer is
    /// checked ([`Gateway::check_offer`]) and journaled before the box gets it.
    pub(super) async fn offer(
        &self,
        box_id: &str,
        merchant_id: String,
        item_id: String,
    ) -> Message {
        if let Err(e) = self.rate(box_id, Kind::Offer) {
            return e;
        }
        let Some(m) = self.merchants.get(&merchant_id) else {
            return refuse(
                ErrorCode::UnknownRoute,
                format!("no route for merchant {merchant_id}"),
                None,
            );
        };
        let ask = Message::RoutedOfferRequest {
            box_id: box_id.into(),
            merchant_id: merchant_id.clone(),
            item_id,
        };
        let answer = self.role(&m.merchant).handle(gw(), ask).await;
        if let Message::Offer(o) = &answer {
            // A merchant speaks for itself only: its offer must agree with what this head
            // end's config says of it, and may not reuse a transaction id.
            if let Err(why) = self.check_offer(&merchant_id, m, o) {
                return refuse(
                    ErrorCode::Malformed,
                    format!("merchant {merchant_id}'s offer refused: {why}"),
                    None,
                );
            }
            let created = now_secs();
            let t = GwTxn {
                box_id: box_id.into(),
                merchant_id: o.merchant_id.clone(),
                embodiment: o.embodiment,
                tsk: o.tsk.clone(),
                amount: o.amount,
                created,
                state: GwState::Offered,
                draw: None,
                expected: None,
                sealed_expected: None,
                presealed_m: None,
                debit_response: None,
                receipt: None,
            };
            let txid = &o.transaction_id;
            if let Err(e) = self.journal.atomically(|b| {
                b.put(journal::Kind::Gw, txid, &journal::encode(&t))?;
                b.put(
                    journal::Kind::Open,
                    &format!("p/{txid}"),
                    &created.to_be_bytes(),
                )?;
                b.step(txid, &Step::OfferRelayed, "")
            }) {
                return crate::role::journal_failed(e, Some(txid));
            }
        }
        answer
    }

    /// Whether a merchant's offer agrees with its configuration: the merchant id asked for,
    /// its configured embodiment, payment route and status route, the FIG. 8 layer as
    /// configured, a price, and a transaction id of 1–64 of `A-Za-z0-9._-` that no other
    /// purchase or load at this gateway uses. (A merchant that claimed another merchant's
    /// id, another embodiment or a used id would have boxes pay for nothing.)
    fn check_offer(&self, asked: &str, m: &MerchantDef, o: &Offer) -> Result<(), String> {
        let txid = &o.transaction_id;
        if txid.is_empty()
            || txid.len() > 64
            || !txid
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
        {
            return Err("the transaction id must be 1 to 64 of A-Za-z0-9._-".into());
        }
        if o.merchant_id != asked {
            return Err(format!("it names merchant {}", o.merchant_id));
        }
        if o.embodiment != m.embodiment {
            return Err(format!(
                "it names {:?}, the configuration {:?}",
                o.embodiment, m.embodiment
            ));
        }
        if o.payment_route != m.payment || o.status_route != m.merchant {
            return Err("its payment or status route is not the configured one".into());
        }
        if o.tsk.is_some() != m.message_layer || o.etsk.is_some() != m.message_layer {
            return Err("its message layer (TSK/ETSK) is not as configured".into());
        }
        // Zero only as an authentication (002 FIG. 16), which is nothing else.
        let authentication = o.amount.currency == proto::money::Currency::AUTHENTICATION;
        if o.amount.minor == 0 && !authentication {
            return Err("it has no price".into());
        }
        if authentication && o.amount.minor != 0 {
            return Err("it asks value in the authentication currency (999)".into());
        }
        if authentication && m.kind != crate::config::MerchantKind::Loyalty {
            return Err("an authentication, from a merchant that is not a benefits server".into());
        }
        let taken = self
            .journal
            .get(journal::Kind::Gw, txid)
            .ok()
            .flatten()
            .is_some()
            || self
                .journal
                .get(journal::Kind::GwLoad, txid)
                .ok()
                .flatten()
                .is_some();
        if taken {
            return Err(format!("transaction id {txid} is already in use"));
        }
        Ok(())
    }
}
