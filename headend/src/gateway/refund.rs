//! Refunds (issue 17, see [`crate::payment::refund`]): the gateway routes a box's refund
//! steps to the payment server of the sale's merchant, and asks every payment server it
//! routes to for the refunds due to a card. It keeps no refund state: the payment server
//! journals each step, keyed by the sale's transaction id, and answers a retry the same;
//! the card's log is the box's record. A refund is routed only for a sale this gateway
//! relayed, whichever box now holds the card (the credit command works on the sale's card
//! alone).

use std::collections::BTreeSet;

use proto::messages::*;

use super::{Gateway, gw};
use crate::role::refuse;

impl Gateway {
    /// The refunds due to `card_id` at every payment server this gateway routes to (at the
    /// catalog's rate per box).
    pub(super) async fn refunds_due(&self, box_id: &str, card_id: u64) -> Message {
        if let Err(e) = self.rate(box_id, crate::limits::Kind::RefundsDue) {
            return e;
        }
        let servers: BTreeSet<&String> = self.merchants.values().map(|m| &m.payment).collect();
        let mut due = Vec::new();
        for ps in servers {
            match self
                .role(ps)
                .handle(gw(), Message::RefundsDueRequest { card_id })
                .await
            {
                Message::RefundsDue(list) => due.extend(list),
                Message::Error(e) => {
                    return refuse(
                        ErrorCode::Busy,
                        format!("payment server {ps} did not list refunds: {}", e.reason),
                        None,
                    );
                }
                other => {
                    return refuse(
                        ErrorCode::Internal,
                        format!("payment server {ps} answered {}", other.kind()),
                        None,
                    );
                }
            }
        }
        Message::RefundsDue(due)
    }

    /// A refund request, credit response or proof: to the payment server of sale `txid`.
    pub(super) async fn refund_step(&self, txid: &str, msg: Message) -> Message {
        // Not echoed: a huge id would make the refusal too big to send.
        if txid.is_empty() || txid.len() > 64 {
            return refuse(
                ErrorCode::Malformed,
                "transaction id must be 1 to 64 characters",
                None,
            );
        }
        let Some(t) = self.txn(txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no sale {txid} was relayed here"),
                Some(txid),
            );
        };
        let Some(m) = self.merchants.get(&t.merchant_id) else {
            return refuse(
                ErrorCode::UnknownMerchant,
                format!(
                    "sale {txid}'s merchant {} is no longer routed",
                    t.merchant_id
                ),
                Some(txid),
            );
        };
        let payment = m.payment.clone();
        match self.role(&payment).handle(gw(), msg).await {
            a @ (Message::RefundCommand(_) | Message::Receipt(_) | Message::Error(_)) => a,
            other => refuse(
                ErrorCode::Internal,
                format!("payment server {payment} answered {}", other.kind()),
                Some(txid),
            ),
        }
    }
}
