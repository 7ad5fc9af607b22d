//! FIG. 6 and FIG. 7 at the gateway: the embodiments in which the payment server is not
//! asked again for the debit response before the merchant releases (001 [0061]–[0063],
//! FIG. 12 and FIG. 13, [0099]–[0106]).
//!
//! In both, the security card issued the expected card signature with its debit command
//! (step 724 / 744), the payment server passed it on with the command (step 728 / 748) and
//! the security card was released at once. Then:
//! - **FIG. 6** (the gateway compares, [`card_signature_matches`]): the cable head end
//!   compares the card's signature in the debit response with the expected one (step 732,
//!   "trusted agent 356") and, on a match, builds the confirmation itself from the pre-sealed
//!   debit result M (step 734) — one round trip to the payment server fewer;
//! - **FIG. 7** (the merchant compares): the expected signature reaches the gateway sealed
//!   for the merchant, which the gateway cannot read or change; it forwards that and the
//!   card's response, and the merchant's routine 366 compares.
//!
//! In FIG. 4/5 ([`super::debit`]) the security card or the payment server compares instead
//! (001 [0095]–[0098] for FIG. 5). Either way the payment server must still see every debit
//! response the merchant may accept: each is journaled for it (kind `notify`) in the same
//! write as its release ([`Gateway::accept`]).

// A refusal is the answer message itself, relayed to the box: boxing it would buy nothing.
#![allow(clippy::result_large_err)]

use proto::crypto::Mac;
use proto::messages::*;
use proto::purse::DebitResponse;
use proto::security_card::SecurityCard;

use super::{Gateway, GwTxn, Outbound, Step, TxnGuard};
use crate::role::refuse;

/// The FIG. 6 comparison (001 [0061], [0101] step 732): whether the card's signature in its
/// debit response is the expected card signature the security card gave with the debit
/// command. The gateway compares instead of asking the security card again, which released
/// as soon as it issued the command ([0097], [0101]). The comparison takes the same time
/// whatever the signatures ([`proto::crypto::mac_eq`]); it is the security card's own check
/// ([`SecurityCard::signatures_match`]), so the payment server's, the gateway's and the
/// merchant's comparisons are one piece of code.
pub fn card_signature_matches(expected: &Mac, resp: &DebitResponse) -> bool {
    SecurityCard::signatures_match(expected, resp)
}

impl Gateway {
    /// FIG. 6: compares the card's signature with the expected one
    /// ([`card_signature_matches`]); on a match, builds the confirmation from the pre-sealed
    /// result M and journals it — the release for the merchant and the debit response for
    /// the payment server — in one write. A mismatch releases nothing.
    ///
    /// # Errors
    /// The answer to relay: `BadSignature` on a mismatch, `Internal` when the transaction
    /// has no expected signature or the journal cannot be written.
    pub(super) fn gateway_compares(
        &self,
        lock: &TxnGuard<'_>,
        key: &str,
        t: &GwTxn,
        msg: &DebitResponseMsg,
        resp: DebitResponse,
    ) -> Result<Outbound, Message> {
        let txid = lock.txid();
        let (Some(expected), Some(m)) = (t.expected, t.presealed_m.clone()) else {
            return Err(refuse(
                ErrorCode::Internal,
                "no expected signature for this transaction",
                Some(txid),
            ));
        };
        if !card_signature_matches(&expected, &resp) {
            // Nothing follows from it but the refusal: the step is a record for operators.
            let _ = self.journal.step(txid, &Step::ComparedMismatch, "");
            return Err(refuse(
                ErrorCode::BadSignature,
                "card signature differs from the expected one; nothing released",
                Some(txid),
            ));
        }
        let out = self.local_confirmation(txid, t, resp, m, None);
        // Only a response that passed the comparison is passed on to the payment server,
        // in the same write as its release.
        self.accept(lock, key, &out, Some(msg), Step::ComparedMatch)?;
        Ok(out)
    }

    /// FIG. 7: forwards the card's response with the expected signature sealed for the
    /// merchant, which compares. Every response the merchant may accept is journaled for
    /// the payment server, with its release, in one write.
    ///
    /// # Errors
    /// The answer to relay: `Internal` when the transaction has no sealed expected signature
    /// or the journal cannot be written.
    pub(super) fn merchant_compares(
        &self,
        lock: &TxnGuard<'_>,
        key: &str,
        t: &GwTxn,
        msg: &DebitResponseMsg,
        resp: DebitResponse,
    ) -> Result<Outbound, Message> {
        let txid = lock.txid();
        let Some(sealed) = t.sealed_expected.clone() else {
            return Err(refuse(
                ErrorCode::Internal,
                "no sealed expected signature for this transaction",
                Some(txid),
            ));
        };
        let out = self.local_confirmation(txid, t, resp.clone(), sealed, Some(resp));
        self.accept(lock, key, &out, Some(msg), Step::QueuedForMerchant)?;
        Ok(out)
    }

    /// A confirmation the gateway builds itself (FIG. 6: the pre-sealed result M; FIG. 7:
    /// the sealed expected signature and the card's response for the merchant).
    fn local_confirmation(
        &self,
        txid: &str,
        t: &GwTxn,
        resp: DebitResponse,
        result_m: Vec<u8>,
        for_merchant: Option<DebitResponse>,
    ) -> Outbound {
        let new_balance = resp.new_balance;
        Outbound {
            confirmation: Confirmation {
                transaction_id: txid.into(),
                result_c: Protected::Clear(DebitResultC {
                    transaction_id: txid.into(),
                    success: true,
                    amount: t.amount,
                    new_balance,
                }),
                result_m,
                debit_response: for_merchant,
            },
            response: resp,
            new_balance: Some(new_balance),
        }
    }
}
