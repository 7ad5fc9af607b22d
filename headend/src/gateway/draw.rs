//! Draw request: checked against its offer (merchant, amount, open draws), journaled, then
//! relayed to the payment server; the debit command goes back to the box, the early-release
//! parts (expected signature, sealed expected signature, pre-sealed result M) stay here.

use proto::messages::*;

use super::{Gateway, GwState, Step, gw};
use crate::journal;
use crate::role::{open_body, refuse};

impl Gateway {
    /// A box's draw request: checked against its offer (merchant, amount, this box's open
    /// draws), journaled with state `Drawn` and step "draw request relayed" — and only then
    /// relayed (when the write fails the box gets `Internal` and nothing is relayed). A
    /// retry identical to the journaled request is relayed again (the payment server
    /// answers it with the same debit command).
    pub(super) async fn draw(&self, box_id: &str, req: DrawRequest) -> Message {
        let txid = req.transaction_id.clone();
        let lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let raw = journal::encode(&req);
        match (t.state, &t.draw) {
            (GwState::Offered, _) => {}
            (_, Some(prev)) if *prev == raw => {
                // A retry: the payment server answers it with the same debit command.
            }
            (GwState::Expired, _) => {
                return refuse(
                    ErrorCode::OfferExpired,
                    "the offer expired before its draw request; ask for a new offer",
                    Some(&txid),
                );
            }
            (GwState::Cancelled, _) => {
                return refuse(ErrorCode::Replay, "the offer was cancelled", Some(&txid));
            }
            _ => {
                return refuse(
                    ErrorCode::Replay,
                    "transaction id already used for another draw request",
                    Some(&txid),
                );
            }
        }
        if req.merchant_id != t.merchant_id {
            return refuse(
                ErrorCode::UnknownMerchant,
                "draw request names another merchant than its offer",
                Some(&txid),
            );
        }
        // The amount must be the offer's: a box (or anything on the way) asking to pay less
        // is refused here, before any security card signs anything.
        match open_body(&req.body, t.tsk.as_ref(), "draw request body", &txid) {
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
            Err(e) => return e,
        }
        if t.draw.is_none() {
            // One box may not hold the security-card pool: a cap on its unfinished draws.
            if let Err(n) = self
                .open_draws
                .open(box_id, &txid, std::time::Instant::now())
            {
                return refuse(
                    ErrorCode::RateLimited,
                    format!(
                        "this box has {n} purchases open; finish or cancel one before the next"
                    ),
                    Some(&txid),
                );
            }
            t.draw = Some(raw);
            t.state = GwState::Drawn;
            if let Err(e) = self.save(&lock, &t, Step::DrawRequestRelayed) {
                self.open_draws.close(box_id, &txid);
                return *e;
            }
        }
        let payment = self.merchants[&t.merchant_id].payment.clone();
        let answer = self
            .role(&payment)
            .handle(gw(), Message::DrawRequest(req))
            .await;
        match answer {
            Message::RoutedDebitCommand { command, gateway } => {
                // The gateway keeps the early-release parts; the box gets the command alone.
                t.expected = gateway.expected_card_signature;
                t.sealed_expected = gateway.sealed_expected_signature;
                t.presealed_m = gateway.presealed_result_m;
                if let Err(e) = self.save(&lock, &t, Step::DebitCommandRelayed) {
                    return *e;
                }
                Message::DebitCommand(command)
            }
            other => {
                // No debit command (refused, or the payment server unreachable): nothing
                // holds a security card for this box.
                self.open_draws.close(box_id, &txid);
                other
            }
        }
    }
}
