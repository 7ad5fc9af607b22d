//! Collection batches and load advices: what leaves the payment terminals and the funders
//! for clearing (001 FIG. 1; [0007]–[0008], [0045], [0056], [0135]).
//!
//! - A payment server's security-card terminals collect their completed purchases into a
//!   [`CollectionBatch`] ([0045]: "batches of purchase transactions"), numbered per payment
//!   server. The concentration point passes it to clearing and administration, which
//!   answers with a batch acknowledgement ([0007]); the acknowledgement lowers what the
//!   security cards still have to settle ([0044]: they "secure the payment and collection
//!   totals").
//! - A funder (bank server, or the load server for pre-funded accounts) sends a
//!   [`LoadAdvice`] for each captured load: the value moved to the card issuer's float
//!   ([0135]), which settled purchases later draw down ([0056]).
//!
//! [`CollectionBatch::check`] is the receiver's first line: a batch whose stated totals do
//! not add up to its records, or that names one security-card transaction twice, is refused
//! as a whole.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::money::{Currency, Money};

/// One purchase in a batch: the security card's collection record ([0086]) as the payment
/// server completed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub transaction_id: String,
    pub merchant_id: String,
    /// The security card (terminal) that issued the debit command.
    pub security_card_id: u64,
    /// That security card's own transaction number: with `security_card_id`, the key a
    /// purchase is cleared under (in exactly one batch).
    pub security_card_txn: u32,
    /// The purse card debited.
    pub card_id: u64,
    pub amount: Money,
}

/// Count and sum (minor units) of one merchant's purchases in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MerchantTotal {
    pub merchant_id: String,
    pub currency: Currency,
    pub count: u64,
    pub amount: u64,
}

/// Count and sum (minor units) of one security card's purchases in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityCardTotal {
    pub security_card_id: u64,
    pub currency: Currency,
    pub count: u64,
    pub amount: u64,
}

/// A payment server's collection batch: its records and the totals it states for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionBatch {
    /// The payment server (its role name) whose terminals collected the batch.
    pub payment_server: String,
    /// Per payment server, 1, 2, …: the idempotency key of the batch.
    pub batch: u64,
    /// The UTC day the batch was closed, `YYYY-MM-DD`: the business day it settles in.
    pub closed_on: String,
    pub totals: Vec<MerchantTotal>,
    pub security_cards: Vec<SecurityCardTotal>,
    pub records: Vec<BatchRecord>,
    /// Refunds credited to cards (issue 17): each a [`BatchRecord`] whose `transaction_id`
    /// is the sale's, whose security-card transaction is the credit's, and whose `amount`
    /// is what the card was credited — taken off what its merchant is owed.
    pub refunds: Vec<BatchRecord>,
    /// The refunds' count and sum per merchant and currency.
    pub refund_totals: Vec<MerchantTotal>,
    /// The refunds' count and sum per security card and currency.
    pub refund_security_cards: Vec<SecurityCardTotal>,
}

/// A funder's advice of a captured load: `amount` left the funder's account for the card
/// issuer's float ([0135]); of an unload (`unload`), the other way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadAdvice {
    /// The funder (its role name: `bank`, `load`).
    pub funder: String,
    /// The load's transaction id: one advice per load.
    pub transaction_id: String,
    /// The funding account (a bank account or a pre-funded account).
    pub account: String,
    /// The purse card loaded.
    pub card_id: u64,
    pub amount: Money,
    /// The UTC day the hold was captured, `YYYY-MM-DD`.
    pub captured_on: String,
    /// An unload (issue 17): `amount` went from the issuer's float back to the account.
    pub unload: bool,
}

/// The most one record or advice may carry, in minor units (2^48: far above any purse's
/// maximum balance, and small enough that no sum of them a clearing run makes can overflow).
pub const MAX_AMOUNT: u64 = 1 << 48;

/// The largest minor-unit exponent a currency has (ISO 4217 uses 0 to 4).
pub const MAX_EXPONENT: u8 = 4;

/// Why a batch is refused as a whole.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BatchError {
    #[error("batch {0} has no records")]
    Empty(u64),
    #[error("batch 0 is not a batch number (they start at 1)")]
    ZeroNumber,
    #[error("transaction {0} has a zero amount")]
    ZeroAmount(String),
    #[error("transaction {0}'s amount is beyond any purse (more than {MAX_AMOUNT} minor units)")]
    AmountTooLarge(String),
    #[error("transaction {0}'s currency has a minor-unit exponent above {MAX_EXPONENT}")]
    BadCurrency(String),
    #[error("transaction {0} appears twice in the batch")]
    DuplicateTransaction(String),
    #[error(
        "security card {security_card_id:X} transaction {security_card_txn} appears twice in \
         the batch"
    )]
    DuplicateRecord {
        security_card_id: u64,
        security_card_txn: u32,
    },
    #[error(
        "the batch's totals for {what} do not add up: it states {stated:?}, its records make \
         {computed:?}"
    )]
    TotalsDoNotAdd {
        what: &'static str,
        stated: Vec<String>,
        computed: Vec<String>,
    },
}

/// A day as clearing writes it: `YYYY-MM-DD`.
#[must_use]
pub fn day_text(d: crate::purse::Date) -> String {
    format!("{:04}-{:02}-{:02}", d.year, d.month, d.day)
}

type Sums<K> = BTreeMap<K, (u64, u64)>;

fn sums<K: Ord>(records: &[BatchRecord], key: impl Fn(&BatchRecord) -> K) -> Sums<K> {
    let mut out: Sums<K> = BTreeMap::new();
    for r in records {
        let e = out.entry(key(r)).or_default();
        e.0 += 1;
        e.1 = e.1.saturating_add(r.amount.minor);
    }
    out
}

fn merchant_totals(records: &[BatchRecord]) -> Vec<MerchantTotal> {
    sums(records, |r| (r.merchant_id.clone(), r.amount.currency))
        .into_iter()
        .map(|((merchant_id, currency), (count, amount))| MerchantTotal {
            merchant_id,
            currency,
            count,
            amount,
        })
        .collect()
}

fn security_card_totals(records: &[BatchRecord]) -> Vec<SecurityCardTotal> {
    sums(records, |r| (r.security_card_id, r.amount.currency))
        .into_iter()
        .map(
            |((security_card_id, currency), (count, amount))| SecurityCardTotal {
                security_card_id,
                currency,
                count,
                amount,
            },
        )
        .collect()
}

impl CollectionBatch {
    /// A batch of `records` with the totals computed from them.
    #[must_use]
    pub fn build(
        payment_server: &str,
        batch: u64,
        closed_on: &str,
        records: Vec<BatchRecord>,
    ) -> Self {
        Self {
            payment_server: payment_server.into(),
            batch,
            closed_on: closed_on.into(),
            totals: merchant_totals(&records),
            security_cards: security_card_totals(&records),
            records,
            refunds: Vec::new(),
            refund_totals: Vec::new(),
            refund_security_cards: Vec::new(),
        }
    }

    /// The batch with `refunds` (and their totals) in it.
    #[must_use]
    pub fn with_refunds(mut self, refunds: Vec<BatchRecord>) -> Self {
        self.refund_totals = merchant_totals(&refunds);
        self.refund_security_cards = security_card_totals(&refunds);
        self.refunds = refunds;
        self
    }

    /// Every record, sales then refunds, each with whether it is a refund.
    pub fn all_records(&self) -> impl Iterator<Item = (&BatchRecord, bool)> {
        self.records
            .iter()
            .map(|r| (r, false))
            .chain(self.refunds.iter().map(|r| (r, true)))
    }

    /// Checks that the batch is whole: numbered, not empty, every amount above zero and at
    /// most [`MAX_AMOUNT`] in a currency with a sane exponent, no transaction and no
    /// security-card transaction twice, and its stated merchant and security-card totals
    /// exactly what its records add up to (same order, as [`CollectionBatch::build`] makes
    /// them).
    ///
    /// # Errors
    /// The first [`BatchError`] found.
    pub fn check(&self) -> Result<(), BatchError> {
        if self.batch == 0 {
            return Err(BatchError::ZeroNumber);
        }
        if self.records.is_empty() && self.refunds.is_empty() {
            return Err(BatchError::Empty(self.batch));
        }
        let mut seen = BTreeSet::new();
        let mut ids = BTreeSet::new();
        for (r, refund) in self.all_records() {
            if r.amount.minor == 0 {
                return Err(BatchError::ZeroAmount(r.transaction_id.clone()));
            }
            if r.amount.minor > MAX_AMOUNT {
                return Err(BatchError::AmountTooLarge(r.transaction_id.clone()));
            }
            if r.amount.currency.exponent > MAX_EXPONENT {
                return Err(BatchError::BadCurrency(r.transaction_id.clone()));
            }
            if !ids.insert((refund, r.transaction_id.as_str())) {
                return Err(BatchError::DuplicateTransaction(r.transaction_id.clone()));
            }
            if !seen.insert((r.security_card_id, r.security_card_txn)) {
                return Err(BatchError::DuplicateRecord {
                    security_card_id: r.security_card_id,
                    security_card_txn: r.security_card_txn,
                });
            }
        }
        let show_m = |t: &[MerchantTotal]| {
            t.iter()
                .map(|t| format!("{} {}×{}", t.merchant_id, t.count, t.amount))
                .collect::<Vec<_>>()
        };
        let computed = merchant_totals(&self.records);
        if computed != self.totals {
            return Err(BatchError::TotalsDoNotAdd {
                what: "merchants",
                stated: show_m(&self.totals),
                computed: show_m(&computed),
            });
        }
        let show_s = |t: &[SecurityCardTotal]| {
            t.iter()
                .map(|t| format!("{:X} {}×{}", t.security_card_id, t.count, t.amount))
                .collect::<Vec<_>>()
        };
        let computed = security_card_totals(&self.records);
        if computed != self.security_cards {
            return Err(BatchError::TotalsDoNotAdd {
                what: "security cards",
                stated: show_s(&self.security_cards),
                computed: show_s(&computed),
            });
        }
        let computed = merchant_totals(&self.refunds);
        if computed != self.refund_totals {
            return Err(BatchError::TotalsDoNotAdd {
                what: "merchants' refunds",
                stated: show_m(&self.refund_totals),
                computed: show_m(&computed),
            });
        }
        let computed = security_card_totals(&self.refunds);
        if computed != self.refund_security_cards {
            return Err(BatchError::TotalsDoNotAdd {
                what: "security cards' refunds",
                stated: show_s(&self.refund_security_cards),
                computed: show_s(&computed),
            });
        }
        Ok(())
    }

    /// The batch's value per currency (minor units): its sales less its refunds (negative
    /// when it carries more refunds than sales).
    #[must_use]
    pub fn value(&self) -> BTreeMap<Currency, i128> {
        let mut out = BTreeMap::new();
        for t in &self.totals {
            *out.entry(t.currency).or_default() += i128::from(t.amount);
        }
        for t in &self.refund_totals {
            *out.entry(t.currency).or_default() -= i128::from(t.amount);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(txid: &str, merchant: &str, sc: u64, n: u32, minor: u64) -> BatchRecord {
        BatchRecord {
            transaction_id: txid.into(),
            merchant_id: merchant.into(),
            security_card_id: sc,
            security_card_txn: n,
            card_id: 7,
            amount: Money::new(minor, Currency::EUR),
        }
    }

    fn batch() -> CollectionBatch {
        CollectionBatch::build(
            "payment",
            1,
            "2026-11-30",
            vec![
                rec("t1", "CABLE", 0x5A, 1, 499),
                rec("t2", "CABLE", 0x5A, 2, 1250),
                rec("t3", "SHOP", 0x5B, 1, 100),
            ],
        )
    }

    #[test]
    fn a_built_batch_checks_and_sums_per_merchant_and_security_card() {
        let b = batch();
        assert_eq!(b.check(), Ok(()));
        assert_eq!(b.totals.len(), 2);
        assert_eq!((b.totals[0].count, b.totals[0].amount), (2, 1749));
        assert_eq!(b.security_cards[1].amount, 100);
        assert_eq!(b.value().get(&Currency::EUR), Some(&1849));
    }

    #[test]
    fn totals_that_do_not_add_up_are_refused() {
        let mut b = batch();
        b.totals[0].amount += 1;
        assert!(matches!(
            b.check(),
            Err(BatchError::TotalsDoNotAdd {
                what: "merchants",
                ..
            })
        ));
        let mut b = batch();
        b.records[2].amount = Money::new(101, Currency::EUR);
        b.totals = merchant_totals(&b.records);
        assert!(matches!(
            b.check(),
            Err(BatchError::TotalsDoNotAdd {
                what: "security cards",
                ..
            })
        ));
    }

    #[test]
    fn a_security_card_transaction_twice_zero_amounts_and_empty_batches_are_refused() {
        let mut b = batch();
        b.records[1].security_card_txn = 1;
        let b = CollectionBatch::build("payment", 1, "2026-11-30", b.records);
        assert!(matches!(b.check(), Err(BatchError::DuplicateRecord { .. })));
        // The same transaction under two security-card transactions.
        let mut b = batch();
        b.records[1].transaction_id = "t1".into();
        let b = CollectionBatch::build("payment", 1, "2026-11-30", b.records);
        assert_eq!(
            b.check(),
            Err(BatchError::DuplicateTransaction("t1".into()))
        );
        // Amounts that would overflow the sums, and absurd currencies.
        let mut b = batch();
        b.records[0].amount = Money::new(u64::MAX, Currency::EUR);
        let b = CollectionBatch::build("payment", 1, "2026-11-30", b.records);
        assert_eq!(b.check(), Err(BatchError::AmountTooLarge("t1".into())));
        let mut b = batch();
        b.records[2].amount = Money::new(5, Currency::new(999, 255));
        let b = CollectionBatch::build("payment", 1, "2026-11-30", b.records);
        assert_eq!(b.check(), Err(BatchError::BadCurrency("t3".into())));
        let mut b = batch();
        b.records[1].security_card_txn = 1;
        let b = CollectionBatch::build("payment", 1, "2026-11-30", b.records);
        assert!(matches!(
            b.check(),
            Err(BatchError::DuplicateRecord {
                security_card_txn: 1,
                ..
            })
        ));
        let b = CollectionBatch::build(
            "payment",
            1,
            "2026-11-30",
            vec![rec("t0", "CABLE", 1, 1, 0)],
        );
        assert_eq!(b.check(), Err(BatchError::ZeroAmount("t0".into())));
        let b = CollectionBatch::build("payment", 2, "2026-11-30", Vec::new());
        assert_eq!(b.check(), Err(BatchError::Empty(2)));
        let b = CollectionBatch::build("payment", 0, "2026-11-30", batch().records);
        assert_eq!(b.check(), Err(BatchError::ZeroNumber));
    }
}
