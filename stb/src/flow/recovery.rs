//! Resolving an in-doubt transaction from the card's own log (001 [0106]; DESIGN "No value
//! lost"). Sans-IO: the shell reads the log (READ LOG 1..n) and asks [`decide`].
//!
//! A journaled transaction is in doubt once its draw request may have reached the payment
//! server and no receipt closed it. The card's log is the truth about value: if it holds a
//! debit for this transaction (same security card and its transaction number, or the same
//! card transaction counter, which a card uses for exactly one debit), the debit response is
//! rebuilt from the log and re-sent — the head end answers a repeated response with the same
//! receipt. If not, the card never ran the DEBIT, and a fresh INITIALIZE FOR PURCHASE
//! response proves it: `Cancel { NotDebited, proof }` lets the security card reverse. The
//! viewer is never asked to pay again.

use proto::purse::{DebitResponse, LogKind, LogRecord};

/// What the journal knows of an in-doubt transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InDoubt {
    pub transaction_id: String,
    pub card_id: u64,
    /// The card transaction counter of the INITIALIZE FOR PURCHASE the draw carried.
    pub atc: u32,
    /// Known once the debit command arrived.
    pub psam: Option<(u64, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The card in the reader is another card: wait for the right one.
    OtherCard,
    /// The card debited: re-send this debit response.
    ResendDebitResponse(DebitResponse),
    /// The card did not debit: prove it with a fresh INITIALIZE FOR PURCHASE and cancel.
    ProveNotDebited,
}

/// Decides from the card's id and its log (any order).
pub fn decide(txn: &InDoubt, card_id: u64, log: &[LogRecord]) -> Decision {
    if card_id != txn.card_id {
        return Decision::OtherCard;
    }
    let found = log.iter().find(|r| {
        r.kind == LogKind::Debit
            && match txn.psam {
                Some((id, n)) => r.counterparty == id && r.counterparty_txn == n,
                None => r.atc == txn.atc,
            }
    });
    match found.and_then(|r| r.debit_response(card_id)) {
        Some(resp) => Decision::ResendDebitResponse(resp),
        None => Decision::ProveNotDebited,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::money::Currency;
    use proto::purse::Date;

    fn rec(kind: LogKind, atc: u32, psam: u64, n: u32) -> LogRecord {
        LogRecord {
            kind,
            atc,
            amount: 250,
            currency: Currency::EUR,
            balance_after: 750,
            date: Date::new(2026, 11, 21),
            counterparty: psam,
            counterparty_txn: n,
            signature: [7; 8],
        }
    }

    fn txn(psam: Option<(u64, u32)>) -> InDoubt {
        InDoubt {
            transaction_id: "t1".into(),
            card_id: 9,
            atc: 4,
            psam,
        }
    }

    #[test]
    fn another_card_waits() {
        assert_eq!(decide(&txn(None), 10, &[]), Decision::OtherCard);
    }

    #[test]
    fn debit_found_by_psam_is_resent_from_the_log() {
        let log = [rec(LogKind::Debit, 3, 1, 1), rec(LogKind::Debit, 4, 1, 2)];
        match decide(&txn(Some((1, 2))), 9, &log) {
            Decision::ResendDebitResponse(r) => {
                assert_eq!(
                    (r.card_id, r.atc, r.psam_txn, r.card_signature),
                    (9, 4, 2, [7; 8])
                );
                assert_eq!(r.new_balance, 750);
            }
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn debit_found_by_atc_when_no_debit_command_was_journaled() {
        let log = [rec(LogKind::Debit, 4, 1, 2)];
        assert!(matches!(
            decide(&txn(None), 9, &log),
            Decision::ResendDebitResponse(_)
        ));
    }

    #[test]
    fn no_matching_debit_proves_not_debited() {
        // A load with the same counter, and a debit for another security-card transaction.
        let log = [rec(LogKind::Load, 4, 0, 0), rec(LogKind::Debit, 5, 1, 3)];
        assert_eq!(
            decide(&txn(Some((1, 2))), 9, &log),
            Decision::ProveNotDebited
        );
        assert_eq!(decide(&txn(None), 9, &log[..1]), Decision::ProveNotDebited);
        assert_eq!(decide(&txn(None), 9, &[]), Decision::ProveNotDebited);
    }
}
