//! Conservation of value under random interleavings of purchases, loads, failures,
//! reversals and recoveries. The test plays the box: it knows which commands reached the
//! card, and recovers in-doubt transactions the way stbd does (from the card's log for
//! debits, from a zero-value S1 for loads).
//!
//! Invariant after every step, per currency:
//!   card balance + security-card totals + debits the security card has not yet counted
//!     == initial balance + HSM totals + loads the HSM has not yet settled
//! and once everything is recovered, both "not yet" terms are zero.

mod common;

use common::*;
use proptest::prelude::*;
use proto::card::{CardFault, PurseCard, commands};
use proto::hsm::{Hsm, LoadVerdict};
use proto::money::Money;
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
    },
    Load {
        amount: u64,
        fate: Fate,
        fault: Option<CardFault>,
    },
    Recover,
}

fn fate() -> impl Strategy<Value = Fate> {
    prop_oneof![
        3 => Just(Fate::Complete),
        1 => Just(Fate::ResponseLost),
        1 => Just(Fate::NeverSent),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u64..3_000, any::<bool>(), fate()).prop_map(|(amount, early, fate)| Op::Buy { amount, early, fate }),
        3 => (1u64..5_000, fate(), prop::option::weighted(0.3, prop_oneof![
            Just(CardFault::TrueNegative), Just(CardFault::FalseNegative), Just(CardFault::CounterBump)
        ])).prop_map(|(amount, fate, fault)| Op::Load { amount, fate, fault }),
        1 => Just(Op::Recover),
    ]
}

struct World {
    card: PurseCard,
    security_card: SecurityCard,
    hsm: Hsm,
    initial: u64,
    /// security_card_txn of debits the card made whose response the security card never saw.
    lost_debits: Vec<(u32, u64)>,
    /// (txid, amount, credited) of loads the HSM has not settled.
    open_loads: Vec<(String, u64, bool)>,
    n: u32,
}

impl World {
    fn check(&self) -> Result<(), TestCaseError> {
        let pending_debits: u64 = self.lost_debits.iter().map(|(_, a)| a).sum();
        let pending_credits: u64 = self
            .open_loads
            .iter()
            .filter(|(_, _, c)| *c)
            .map(|(_, a, _)| a)
            .sum();
        prop_assert_eq!(
            self.card.state.balance + self.security_card.total(EUR).amount + pending_debits,
            self.initial + self.hsm.total(EUR).amount + pending_credits,
            "value not conserved"
        );
        Ok(())
    }

    fn buy(&mut self, amount: u64, early: bool, fate: Fate) {
        let d = draw(&mut self.card, amount, &format!("b{}", self.n));
        let Ok(auth) = self.security_card.issue_debit(&d, TODAY, early) else {
            return; // insufficient value: refused before anything moved
        };
        let txn = auth.command.security_card_txn;
        match fate {
            Fate::NeverSent => self.security_card.reverse(txn).unwrap(),
            Fate::ResponseLost => {
                ok(&mut self.card, &commands::debit(&auth.command));
                self.security_card.reverse(txn).unwrap(); // the payment server timed out
                self.lost_debits.push((txn, amount));
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

    fn load(&mut self, amount: u64, fate: Fate, fault: Option<CardFault>) {
        // As stbd does: an in-doubt load is resolved before another load on the card.
        self.recover_loads();
        let txid = format!("l{}", self.n);
        let Ok(init) = init_load(&mut self.card, amount, u64::from(self.n)) else {
            return; // over max balance: refused by the card
        };
        let cmd = self
            .hsm
            .authorize(&txid, &init, Money::new(amount, EUR), TODAY)
            .unwrap();
        self.card.state.fault = fault;
        match fate {
            Fate::NeverSent => {
                self.card.state.fault = None;
                self.open_loads.push((txid, amount, false));
            }
            Fate::ResponseLost => {
                let resp =
                    LoadResponse::decode(&ok(&mut self.card, &commands::load(&cmd))).unwrap();
                let credited = resp.new_balance > init.balance;
                self.open_loads.push((txid, amount, credited));
            }
            Fate::Complete => {
                let resp =
                    LoadResponse::decode(&ok(&mut self.card, &commands::load(&cmd))).unwrap();
                let credited = resp.new_balance > init.balance;
                match self.hsm.confirm(&txid, &resp).unwrap() {
                    LoadVerdict::Loaded => {}
                    LoadVerdict::NegativeNeedsProof => {
                        self.open_loads.push((txid, amount, credited))
                    }
                }
            }
        }
    }

    fn recover(&mut self) {
        // Debits: the card's log proves them; the security card counts them late.
        for (txn, _) in std::mem::take(&mut self.lost_debits) {
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

    /// Loads: the negative-result procedure on a zero-value S1.
    fn recover_loads(&mut self) {
        for (txid, _, credited) in std::mem::take(&mut self.open_loads) {
            let zero = init_load(&mut self.card, 0, 999).unwrap();
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
            card: card_with(5_000, 60_000),
            security_card: security_card(),
            hsm: hsm(),
            initial: 5_000,
            lost_debits: vec![],
            open_loads: vec![],
            n: 0,
        };
        for op in ops {
            w.n += 1;
            match op {
                Op::Buy { amount, early, fate } => w.buy(amount, early, fate),
                Op::Load { amount, fate, fault } => w.load(amount, fate, fault),
                Op::Recover => w.recover(),
            }
            w.check()?;
        }
        w.recover();
        w.check()?;
        prop_assert!(w.lost_debits.is_empty() && w.open_loads.is_empty());
        prop_assert_eq!(
            w.card.state.balance + w.security_card.total(EUR).amount,
            w.initial + w.hsm.total(EUR).amount
        );
    }
}
