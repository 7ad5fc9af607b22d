//! Debit response → receipt: the card's debit response is compared by whoever the
//! merchant's embodiment names (FIG. 4/5: the payment server, [`Gateway::confirm`]; FIG. 6/7:
//! see [`super::embodiment`]), the accepted confirmation is journaled as a release and
//! delivered to the merchant, whose receipt goes back to the box.

use proto::messages::*;
use proto::purse::DebitResponse;

use super::{Gateway, GwState, GwTxn, Outbound, Step, TxnGuard, definite, gw, response_key};
use crate::journal;
use crate::role::{open_body, refuse, repeat};

impl Gateway {
    /// A box's debit response: the same answer again for a retry of the one that got the
    /// receipt; otherwise compared as the merchant's embodiment says (FIG. 4/5:
    /// [`Gateway::confirm`]; FIG. 6: [`Gateway::gateway_compares`]; FIG. 7:
    /// [`Gateway::merchant_compares`]), journaled as a release, and delivered to the merchant.
    pub(super) async fn debit_response(&self, box_id: &str, msg: DebitResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let lock = match self.lock_for_box(&txid).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let t = match self.owned(box_id, &txid) {
            Ok(t) => t,
            Err(e) => return *e,
        };
        let resp = match open_body(&msg.body, t.tsk.as_ref(), "debit response body", &txid) {
            Ok(r) => r,
            Err(e) => return e,
        };
        if let Some(r) = &t.receipt {
            return repeat(t.debit_response.as_ref(), &resp, r, "debit response", &txid);
        }
        if matches!(
            t.state,
            GwState::Offered | GwState::Cancelled | GwState::Expired
        ) {
            return refuse(
                ErrorCode::UnknownTransaction,
                "no draw request was made for this transaction",
                Some(&txid),
            );
        }
        let key = response_key(&txid, &resp);
        if let Some(out) = self.outbound(&key) {
            return self.deliver(&lock, &key, out).await;
        }
        let out = match t.embodiment {
            Embodiment::SecurityCard | Embodiment::PaymentServer => {
                match self.confirm(&lock, &key, &t, msg, resp).await {
                    Ok(out) => out,
                    Err(answer) => {
                        if !definite(&answer) {
                            self.wake_releases.notify_one();
                        }
                        return answer;
                    }
                }
            }
            Embodiment::Gateway => match self.gateway_compares(&lock, &key, &t, &msg, resp) {
                Ok(out) => out,
                Err(refusal) => return refusal,
            },
            Embodiment::Merchant => match self.merchant_compares(&lock, &key, &t, &msg, resp) {
                Ok(out) => out,
                Err(refusal) => return refusal,
            },
        };
        self.deliver(&lock, &key, out).await
    }

    /// FIG. 4/5: the payment server compares and confirms. The debit response is journaled
    /// first (kind `confirming`), so a gateway that dies waiting asks again after its
    /// restart; the confirmation is journaled for the merchant ([`Gateway::accept`]) in the
    /// write that deletes it. `Err` carries the payment server's other answer; a definite
    /// one (a refusal) drops the entry. Under the transaction's lock.
    pub(super) async fn confirm(
        &self,
        lock: &TxnGuard<'_>,
        key: &str,
        t: &GwTxn,
        msg: DebitResponseMsg,
        resp: DebitResponse,
    ) -> Result<Outbound, Message> {
        let txid = lock.txid();
        let journaled = self
            .journal
            .get(journal::Kind::Confirming, key)
            .ok()
            .flatten()
            .is_some();
        if !journaled {
            lock.atomically(|b| {
                b.put(journal::Kind::Confirming, key, &journal::encode(&msg))?;
                b.step(txid, &Step::ToPaymentServer, "")
            })
            .map_err(|e| crate::role::journal_failed(e, Some(txid)))?;
        }
        crate::test_hook::freeze_at(
            crate::test_hook::GATEWAY_PAUSE_BEFORE_ASKING_CONFIRMATION,
            || format!("{txid}: debit response journaled, not yet sent to the payment server"),
        );
        let payment = &self.merchants[&t.merchant_id].payment;
        let c = match self
            .role(payment)
            .handle(gw(), Message::DebitResponse(msg))
            .await
        {
            Message::Confirmation(c) => c,
            other => {
                if definite(&other) {
                    let _ = lock.atomically(|b| {
                        b.delete(journal::Kind::Confirming, key)?;
                        b.step(txid, &Step::PaymentServerRefused, other.kind())
                    });
                }
                return Err(other);
            }
        };
        let new_balance = c.result_c.open(t.tsk.as_ref()).ok().map(|r| r.new_balance);
        let out = Outbound {
            confirmation: c,
            response: resp,
            new_balance,
        };
        self.accept(lock, key, &out, None, Step::ConfirmationReceived)?;
        Ok(out)
    }
}
