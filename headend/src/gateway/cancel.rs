//! Cancel: before the draw request went out the gateway cancels the offer itself; after it,
//! the cancel goes to the payment server. The decision reads the purchase's record
//! ([`GwState`]), never the step log.

use proto::messages::*;

use super::{Gateway, GwState, GwTxn, Step, gw};

/// What a box's cancel does to a purchase, decided from its record alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CancelDecision {
    /// No draw request was relayed (`Offered`): the gateway cancels the offer itself and
    /// nothing is charged anywhere.
    Locally,
    /// Cancelled or expired already: nothing was charged.
    AlreadyOver,
    /// A draw request was relayed (`Drawn` and after: the state is set in the same write as
    /// the step "draw request relayed", before the request goes out): only the payment
    /// server knows whether a security card issued a debit command, so it decides.
    AskPaymentServer,
}

/// The cancel decision for `t` (see [`CancelDecision`]).
pub(super) fn decide(t: &GwTxn) -> CancelDecision {
    match t.state {
        GwState::Offered => CancelDecision::Locally,
        GwState::Cancelled | GwState::Expired => CancelDecision::AlreadyOver,
        GwState::Drawn | GwState::Confirmed | GwState::Done | GwState::Reversed => {
            CancelDecision::AskPaymentServer
        }
    }
}

impl Gateway {
    /// A box's cancel. The step "cancel relayed" is journaled before the cancel goes to the
    /// payment server; when it cannot be, the cancel is not relayed and the box gets
    /// `Internal` (and retries).
    pub(super) async fn cancel(&self, box_id: &str, c: CancelMsg) -> Message {
        let txid = c.transaction_id.clone();
        let lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let nothing_charged = || {
            Message::Receipt(Receipt {
                transaction_id: txid.clone(),
                released: false,
                text: "Cancelled; nothing was charged".into(),
                entitlement: None,
                new_balance: None,
            })
        };
        match decide(&t) {
            // An offer whose draw request never went out has nothing to reverse anywhere.
            CancelDecision::Locally => {
                t.state = GwState::Cancelled;
                if let Err(e) = self.save(&lock, &t, Step::CancelledBeforeDraw) {
                    return *e;
                }
                return nothing_charged();
            }
            CancelDecision::AlreadyOver => return nothing_charged(),
            CancelDecision::AskPaymentServer => {}
        }
        if let Err(e) = self.step(&txid, Step::CancelRelayed, &format!("{:?}", c.reason)) {
            return *e;
        }
        let payment = self.merchants[&t.merchant_id].payment.clone();
        match self.role(&payment).handle(gw(), Message::Cancel(c)).await {
            // The draw request never reached the payment server.
            Message::Error(e) if e.code == ErrorCode::UnknownTransaction => nothing_charged(),
            r @ Message::Receipt(_) => {
                self.open_draws.close(box_id, &txid);
                self.wake_feed.notify_one();
                r
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::money::{Currency, Money};

    fn offered() -> GwTxn {
        GwTxn {
            box_id: "box-000001".into(),
            merchant_id: "CABLE".into(),
            embodiment: Embodiment::SecurityCard,
            tsk: None,
            amount: Money::new(499, Currency::EUR),
            created: 0,
            state: GwState::Offered,
            draw: None,
            expected: None,
            sealed_expected: None,
            presealed_m: None,
            debit_response: None,
            receipt: None,
        }
    }

    #[test]
    fn the_cancel_decision_reads_the_state_the_draw_step_was_journaled_with() {
        let t = offered();
        assert_eq!(decide(&t), CancelDecision::Locally, "no draw relayed");
        // What the draw request's journaled write sets (see `draw`).
        let drawn = GwTxn {
            state: GwState::Drawn,
            draw: Some(vec![1, 2, 3]),
            ..offered()
        };
        assert_eq!(decide(&drawn), CancelDecision::AskPaymentServer);
        for s in [GwState::Confirmed, GwState::Done, GwState::Reversed] {
            let t = GwTxn {
                state: s,
                ..drawn.clone()
            };
            assert_eq!(decide(&t), CancelDecision::AskPaymentServer, "{s:?}");
        }
        for s in [GwState::Cancelled, GwState::Expired] {
            let t = GwTxn {
                state: s,
                ..offered()
            };
            assert_eq!(decide(&t), CancelDecision::AlreadyOver, "{s:?}");
        }
    }
}
