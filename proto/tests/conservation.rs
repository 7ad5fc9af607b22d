//! Conservation of value under random interleavings of purchases, loads, failures,
//! reversals and recoveries. The test plays the box: it knows which commands reached the
//! card, and recovers in-doubt transactions the way stbd does (from the card's log for
//! debits, from a zero-value S1 for loads).
//!
//! Invariant after every step, per purse (money in EUR, and 002's loyalty points):
//!   card balance + security-card totals + debits the security card has not yet counted
//!     == initial balance + HSM totals + loads the HSM has not yet settled
//! and once everything is recovered, both "not yet" terms are zero. Authentication draws
//! (002 FIG. 16: zero in currency 999) move neither side. Refunds (CREDIT) move value back
//! from the security card's totals (at issue) to the card; one issued but not credited is
//! a third "not yet" term until the card proves it was not credited. Unloads move value
//! from the card back to the issuer (the HSM's unloaded totals) on the card's proof; one
//! the card made whose proof the HSM has not seen is a fourth.

mod common;

use common::*;
use proptest::prelude::*;
use proto::card::{CardFault, PurseCard, commands};
use proto::hsm::{Hsm, LoadVerdict};
use proto::money::{Currency, Money};
use proto::purse::*;
use proto::security_card::SecurityCard;

#[derive(Debug, Clone)]
enum Fate {
    Complete,
    /// The card debited or loaded, but its answer never came back.
    ResponseLost,
    /// The command never reached the card (card pulled, box crashed, viewer cancelled).
    NeverSent,
}

#[derive(Debug, Clone)]
enum Op {
    Buy {
        amount: u64,
        early: bool,
        fate: Fate,
        purse: Purse,
    },
    /// An authentication draw (002 FIG. 16).
    Authenticate {
        early: bool,
        fate: Fate,
    },
    Load {
        amount: u64,
        fate: Fate,
        fault: Option<CardFault>,
        purse: Purse,
    },
    /// An unload of `amount` from the card back to the issuer.
    Unload {
        amount: u64,
        fate: Fate,
        fault: Option<CardFault>,
    },
    /// A refund (CREDIT) of `amount` from the security card's totals to the card.
    Refund {
        amount: u64,
        fate: Fate,
    },
    Recover,
}

fn purse() -> impl Strategy<Value = Purse> {
    prop_oneof![3 => Just(Purse::Money), 1 => Just(Purse::Points)]
}

/// The currency a purse's draws and loads are in.
fn currency(purse: Purse) -> Currency {
    match purse {
        Purse::Money => EUR,
        Purse::Points => Currency::POINTS,
    }
}

const PURSES: [Purse; 2] = [Purse::Money, Purse::Points];

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        3 => Just(Fate::Complete),
        1 => Just(Fate::ResponseLost),
        1 => Just(Fate::NeverSent),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..3_000, any::<bool>(), fate(), purse()).prop_map(|(amount, early, fate, purse)| Op::Buy { amount, early, fate, purse }),
        1 => (any::<bool>(), fate()).prop_map(|(early, fate)| Op::Authenticate { early, fate }),
        3 => (1u64..5_000, fate(), prop::option::weighted(0.3, prop_oneof![
            Just(CardFault::TrueNegative), Just(CardFault::FalseNegative), Just(CardFault::CounterBump)
        ]), purse()).prop_map(|(amount, fate, fault, purse)| Op::Load { amount, fate, fault, purse }),
        2 => (1u64..3_000, fate()).prop_map(|(amount, fate)| Op::Refund { amount, fate }),
        2 => (1u64..3_000, fate(), prop::option::weighted(0.3, prop_oneof![
            Just(CardFault::TrueNegative), Just(CardFault::FalseNegative), Just(CardFault::CounterBump)
        ])).prop_map(|(amount, fate, fault)| Op::Unload { amount, fate, fault }),
        1 => Just(Op::Recover),
    ]
}

struct World {
    card: PurseCard,
    security_card: SecurityCard,
    hsm: Hsm,
    /// Each purse's balance at the start.
    initial: [u64; 2],
    /// (security_card_txn, amount, currency) of debits the card made whose response the
    /// security card never saw.
    lost_debits: Vec<(u32, u64, Currency)>,
    /// (txid, amount, credited, purse) of loads the HSM has not settled.
    open_loads: Vec<(String, u64, bool, Purse)>,
    /// (security_card_txn, amount, credited) of refunds issued whose outcome the security
    /// card has not seen.
    open_refunds: Vec<(u32, u64, bool)>,
    /// (txid, amount, debited) of unloads the HSM has not settled.
    open_unloads: Vec<(String, u64, bool)>,
    n: u32,
}

impl World {
    fn check(&self) -> Result<(), TestCaseError> {
        for (i, purse) in PURSES.into_iter().enumerate() {
            let c = currency(purse);
            let pending_debits: u64 = self
                .lost_debits
                .iter()
                .filter(|d| d.2 == c)
                .map(|d| d.1)
                .sum();
            let pending_credits: u64 = self
                .open_loads
                .iter()
                .filter(|l| l.2 && l.3 == purse)
                .map(|l| l.1)
                .sum();
            // Issued, counted off, not on the card.
            let uncredited: u64 = if purse == Purse::Money {
                self.open_refunds.iter().filter(|r| !r.2).map(|r| r.1).sum()
            } else {
                0
            };
            // Given up by the card, not yet counted back by the HSM.
            let unloaded_pending: u64 = if purse == Purse::Money {
                self.open_unloads.iter().filter(|u| u.2).map(|u| u.1).sum()
            } else {
                0
            };
            prop_assert_eq!(
                self.card.state.purse(purse).0
                    + self.security_card.total(c).amount
                    + pending_debits
                    + uncredited
                    + unloaded_pending
                    + self.hsm.total_unloaded(c).amount,
                self.initial[i] + self.hsm.total(c).amount + pending_credits,
                "value not conserved in {:?}",
                purse
            );
        }
        // An authentication is never counted.
        prop_assert_eq!(self.security_card.total(Currency::AUTHENTICATION).count, 0);
        Ok(())
    }

    /// SELECT + INITIALIZE FOR PURCHASE of `purse`, as a draw of `amount`.
    fn draw_in(&mut self, purse: Purse, amount: Money) -> proto::security_card::DrawData {
        select(&mut self.card);
        let init = PurchaseInit::decode(&ok(
            &mut self.card,
            &commands::init_purchase_of(purse, TODAY),
        ))
        .unwrap();
        proto::security_card::DrawData {
            merchant_id: "M".into(),
            transaction_id: format!("b{}", self.n),
            amount,
            init,
        }
    }

    fn buy(&mut self, amount: Money, purse: Purse, early: bool, fate: Fate) {
        let d = self.draw_in(purse, amount);
        let Ok(auth) = self.security_card.issue_debit(&d, TODAY, early) else {
            return; // insufficient value: refused before anything moved
        };
        let txn = auth.command.security_card_txn;
        match fate {
            Fate::NeverSent => self.security_card.reverse(txn).unwrap(),
            Fate::ResponseLost => {
                ok(&mut self.card, &commands::debit(&auth.command));
                self.security_card.reverse(txn).unwrap(); // the payment server timed out
                self.lost_debits.push((txn, amount.minor, amount.currency));
            }
            Fate::Complete => {
                let resp =
                    DebitResponse::decode(&ok(&mut self.card, &commands::debit(&auth.command)))
                        .unwrap();
                if let Some(expected) = auth.expected_card_signature {
                    assert!(SecurityCard::signatures_match(&expected, &resp));
                }
                self.security_card.complete(txn, &resp).unwrap();
            }
        }
    }

    /// INITIALIZE FOR LOAD of `purse` (its currency names it).
    fn init_load_in(&mut self, purse: Purse, amount: u64, ts: u64) -> Result<LoadInit, ()> {
        select(&mut self.card);
        let r = send(
            &mut self.card,
            &commands::init_load(&LoadInitRequest {
                amount,
                currency: currency(purse),
                timestamp: ts,
                date: TODAY,
            }),
        );
        if r.sw.is_ok() {
            Ok(LoadInit::decode(&r.data).unwrap())
        } else {
            Err(())
        }
    }

    fn unload(&mut self, amount: u64, fate: Fate, fault: Option<CardFault>) {
        // Loads and unloads share the card's load counter, the witness of both proofs: an
        // in-doubt one is resolved before the next.
        self.recover_loads();
        let txid = format!("u{}", self.n);
        select(&mut self.card);
        let r = send(
            &mut self.card,
            &commands::init_unload(&LoadInitRequest {
                amount,
                currency: EUR,
                timestamp: u64::from(self.n),
                date: TODAY,
            }),
        );
        if !r.sw.is_ok() {
            return; // more than the card holds
        }
        let init = LoadInit::decode(&r.data).unwrap();
        let cmd = self
            .hsm
            .authorize_unload(&txid, &init, Money::new(amount, EUR), TODAY)
            .unwrap();
        self.card.state.fault = fault;
        match fate {
            Fate::NeverSent => {
                self.card.state.fault = None;
                self.open_unloads.push((txid, amount, false));
            }
            Fate::ResponseLost | Fate::Complete => {
                let resp =
                    LoadResponse::decode(&ok(&mut self.card, &commands::unload(&cmd))).unwrap();
                let debited = resp.new_balance < init.balance;
                let settled = matches!(fate, Fate::Complete)
                    && self.hsm.confirm_unload(&txid, &resp).unwrap() == LoadVerdict::Loaded;
                if !settled {
                    self.open_unloads.push((txid, amount, debited));
                }
            }
        }
    }

    fn load(&mut self, amount: u64, purse: Purse, fate: Fate, fault: Option<CardFault>) {
        // As stbd does: an in-doubt load is resolved before another load on the card.
        self.recover_loads();
        let txid = format!("l{}", self.n);
        let Ok(init) = self.init_load_in(purse, amount, u64::from(self.n)) else {
            return; // over max balance: refused by the card
        };
        let cmd = self
            .hsm
            .authorize(&txid, &init, Money::new(amount, currency(purse)), TODAY)
            .unwrap();
        self.card.state.fault = fault;
        match fate {
            Fate::NeverSent => {
                self.card.state.fault = None;
                self.open_loads.push((txid, amount, false, purse));
            }
            Fate::ResponseLost => {
                let resp =
                    LoadResponse::decode(&ok(&mut self.card, &commands::load(&cmd))).unwrap();
                let credited = resp.new_balance > init.balance;
                self.open_loads.push((txid, amount, credited, purse));
            }
            Fate::Complete => {
                let resp =
                    LoadResponse::decode(&ok(&mut self.card, &commands::load(&cmd))).unwrap();
                let credited = resp.new_balance > init.balance;
                match self.hsm.confirm(&txid, &resp).unwrap() {
                    LoadVerdict::Loaded => {}
                    LoadVerdict::NegativeNeedsProof => {
                        self.open_loads.push((txid, amount, credited, purse))
                    }
                }
            }
        }
    }

    fn refund(&mut self, amount: u64, fate: Fate) {
        select(&mut self.card);
        let init =
            PurchaseInit::decode(&ok(&mut self.card, &commands::init_credit(TODAY))).unwrap();
        let credit = proto::security_card::DrawData {
            merchant_id: "M".into(),
            transaction_id: format!("r{}", self.n),
            amount: Money::new(amount, EUR),
            init,
        };
        let Ok(cc) = self.security_card.issue_credit(&credit, TODAY) else {
            return; // more than the totals hold: refused before anything moved
        };
        let txn = cc.0.security_card_txn;
        match fate {
            Fate::NeverSent => self.open_refunds.push((txn, amount, false)),
            Fate::ResponseLost | Fate::Complete => {
                let r = send(&mut self.card, &commands::credit(&cc));
                let credited = r.sw.is_ok(); // or over the card's maximum
                if credited && matches!(fate, Fate::Complete) {
                    let resp = CreditResponse::decode(&r.data).unwrap();
                    self.security_card.complete_credit(txn, &resp).unwrap();
                } else {
                    self.open_refunds.push((txn, amount, credited));
                }
            }
        }
    }

    /// As the box does: a refund in doubt is settled before the card's next transaction —
    /// a proof of "not credited" must be made before the card's counter moves on (after
    /// that, only a credit's own log record proves anything).
    fn settle_refunds(&mut self) {
        if self.open_refunds.iter().any(|r| !r.2) {
            self.recover_refunds();
        }
    }

    fn recover(&mut self) {
        self.recover_refunds();
        self.recover_debits_and_loads();
    }

    /// Refunds: the card's log proves a credit; a fresh proof INITIALIZE one it never made.
    fn recover_refunds(&mut self) {
        for (txn, _, credited) in std::mem::take(&mut self.open_refunds) {
            if credited {
                let rec = self
                    .card
                    .state
                    .log
                    .iter()
                    .find(|r| r.kind == LogKind::Credit && r.counterparty_txn == txn)
                    .expect("a credit the card made is in its log")
                    .clone();
                let resp = rec.credit_response(self.card.state.card_id).unwrap();
                self.security_card.complete_credit(txn, &resp).unwrap();
            } else {
                select(&mut self.card);
                let proof = PurchaseInit::decode(&ok(
                    &mut self.card,
                    &commands::init_purchase_proof(TODAY),
                ))
                .unwrap();
                assert!(!self.security_card.resolve_credit(txn, &proof).unwrap());
            }
        }
    }

    fn recover_debits_and_loads(&mut self) {
        // Debits: the card's log proves them; the security card counts them late.
        for (txn, _, _) in std::mem::take(&mut self.lost_debits) {
            select(&mut self.card);
            let proof = (1..=proto::card::LOG_CAPACITY as u8)
                .filter_map(|n| {
                    let r = send(&mut self.card, &commands::read_log(n));
                    r.sw.is_ok().then(|| LogRecord::decode(&r.data).unwrap())
                })
                .find(|r| r.kind == LogKind::Debit && r.counterparty_txn == txn)
                .expect("a debit the card made is in its log");
            let resp = proof.debit_response(self.card.state.card_id).unwrap();
            self.security_card.complete(txn, &resp).unwrap();
        }
        self.recover_loads();
    }

    /// Loads and unloads: the negative-result procedure (in reverse for an unload) on a
    /// zero-value S1.
    fn recover_loads(&mut self) {
        for (txid, _, debited) in std::mem::take(&mut self.open_unloads) {
            select(&mut self.card);
            let zero = LoadInit::decode(&ok(
                &mut self.card,
                &commands::init_unload(&LoadInitRequest {
                    amount: 0,
                    currency: EUR,
                    timestamp: 999,
                    date: TODAY,
                }),
            ))
            .unwrap();
            let verdict = self.hsm.resolve_unload_negative(&txid, &zero).unwrap();
            assert_eq!(
                verdict.loaded(),
                debited,
                "HSM verdict matches what the card did"
            );
        }
        for (txid, _, credited, purse) in std::mem::take(&mut self.open_loads) {
            let zero = self.init_load_in(purse, 0, 999).unwrap();
            let verdict = self.hsm.resolve_negative(&txid, &zero).unwrap();
            assert_eq!(
                verdict.loaded(),
                credited,
                "HSM verdict matches what the card did"
            );
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn random_interleavings_conserve_value(ops in proptest::collection::vec(op(), 1..40)) {
        let mut w = World {
            card: {
                let mut c = card_with(5_000, 60_000);
                c.state.points = 3_000;
                c
            },
            security_card: security_card(),
            hsm: hsm(),
            initial: [5_000, 3_000],
            lost_debits: vec![],
            open_loads: vec![],
            open_refunds: vec![],
            open_unloads: vec![],
            n: 0,
        };
        for op in ops {
            w.n += 1;
            if !matches!(op, Op::Recover) {
                w.settle_refunds();
            }
            match op {
                Op::Buy { amount, early, fate, purse } => {
                    w.buy(Money::new(amount, currency(purse)), purse, early, fate)
                }
                Op::Authenticate { early, fate } => {
                    let atc = w.card.state.atc;
                    let balances = (w.card.state.balance, w.card.state.points);
                    let completes = matches!(fate, Fate::Complete | Fate::ResponseLost);
                    w.buy(Money::authentication(), Purse::Money, early, fate);
                    prop_assert_eq!((w.card.state.balance, w.card.state.points), balances);
                    prop_assert_eq!(w.card.state.atc, atc + u32::from(completes));
                }
                Op::Load { amount, fate, fault, purse } => w.load(amount, purse, fate, fault),
                Op::Refund { amount, fate } => w.refund(amount, fate),
                Op::Unload { amount, fate, fault } => w.unload(amount, fate, fault),
                Op::Recover => w.recover(),
            }
            w.check()?;
        }
        w.recover();
        w.check()?;
        prop_assert!(
            w.lost_debits.is_empty()
                && w.open_loads.is_empty()
                && w.open_refunds.is_empty()
                && w.open_unloads.is_empty()
        );
        for (i, purse) in PURSES.into_iter().enumerate() {
            let c = currency(purse);
            prop_assert_eq!(
                w.card.state.purse(purse).0
                    + w.security_card.total(c).amount
                    + w.hsm.total_unloaded(c).amount,
                w.initial[i] + w.hsm.total(c).amount
            );
        }
    }
}
