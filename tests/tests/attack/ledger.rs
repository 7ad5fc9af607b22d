//! Where value lives, read from the files the processes write: the roles' SQLite journals
//! (tables `steps` and `state(kind, key, value)`, postcard records decoded with the
//! `headend` types) and the card files. A test takes a [`Ledger`] before and after an attack
//! and checks that only the honest boxes' purchases and loads moved anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proto::money::{Currency, Money};

use super::boxes::Purchase;
use super::deploy::HeadEnd;
use crate::support::query;

/// `(key, value)` of one kind in a journal's state table.
pub fn state(journal: &Path, kind: &str) -> Vec<(String, Vec<u8>)> {
    query(
        journal,
        &format!("SELECT key, value FROM state WHERE kind = '{kind}' ORDER BY key"),
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Every `(txid, step, detail)` of a journal, oldest first.
pub fn steps(journal: &Path) -> Vec<(String, String, String)> {
    query(
        journal,
        "SELECT txid, step, detail FROM steps ORDER BY id",
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// Rows in a journal: steps and state entries.
pub fn size(journal: &Path) -> (usize, usize) {
    let n = |sql: &str| -> usize {
        query(journal, sql, |r| r.get::<_, i64>(0))
            .first()
            .copied()
            .unwrap_or(0) as usize
    };
    (
        n("SELECT COUNT(*) FROM steps"),
        n("SELECT COUNT(*) FROM state"),
    )
}

fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> T {
    headend::journal::decode(b).expect("a journal record")
}

/// A snapshot of every place value is counted.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ledger {
    /// Security cards: sales counted (count, EUR minor units), summed over the pool.
    pub security_card: (u64, u64),
    /// Payment transactions: txid → state.
    pub payments: BTreeMap<String, String>,
    /// Merchant releases (goods handed out): txid → entitlement.
    pub releases: BTreeMap<String, String>,
    /// Bank accounts: id → (balance, held); bank holds: txid → state; the issuer float.
    pub bank_accounts: BTreeMap<String, (u64, u64)>,
    pub bank_holds: BTreeMap<String, String>,
    pub bank_float: BTreeMap<u16, u64>,
    /// The load server's HSM: loads counted (count, EUR minor units); load records.
    pub hsm: (u64, u64),
    pub loads: BTreeMap<String, String>,
    /// Pre-funded accounts at the load server, their holds and float.
    pub prefunded: BTreeMap<String, (u64, u64)>,
    pub prefunded_holds: BTreeMap<String, String>,
    pub prefunded_float: BTreeMap<u16, u64>,
    /// Card files: name → (balance, transaction counter, load count).
    pub cards: BTreeMap<String, (u64, u32, u32)>,
}

fn accounts(journal: &Path) -> BTreeMap<String, (u64, u64)> {
    state(journal, "account")
        .into_iter()
        .map(|(k, v)| {
            let a: headend::funds::Account = decode(&v);
            (k, (a.balance, a.held))
        })
        .collect()
}

fn holds(journal: &Path) -> BTreeMap<String, String> {
    state(journal, "hold")
        .into_iter()
        .map(|(k, v)| {
            let h: headend::funds::Hold = decode(&v);
            (k, format!("{:?} {}", h.state, h.amount))
        })
        .collect()
}

fn float(journal: &Path) -> BTreeMap<u16, u64> {
    state(journal, "float")
        .into_iter()
        .map(|(_, v)| {
            let m: Money = decode(&v);
            (m.currency.code, m.minor)
        })
        .collect()
}

impl Ledger {
    /// Reads every journal of `he` and the named card files.
    pub fn read(he: &HeadEnd, cards: &[(&str, &Path)]) -> Ledger {
        let pay = he.journal("payment");
        let security_card = state(&pay, "psam").iter().fold((0, 0), |acc, (_, b)| {
            let c: proto::security_card::SecurityCard = decode(b);
            let t = c.total(Currency::EUR);
            (acc.0 + t.count, acc.1 + t.amount)
        });
        let payments = state(&pay, "txn")
            .into_iter()
            .map(|(k, v)| {
                let t: headend::payment::PayTxn = decode(&v);
                (k, format!("{:?}", t.state))
            })
            .collect();
        let releases = state(&he.journal("merchant"), "release")
            .into_iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
            .collect();
        let bank = he.journal("bank");
        let load = he.journal("load");
        let hsm = state(&load, "hsm")
            .first()
            .map(|(_, b)| {
                let h: proto::hsm::Hsm = decode(b);
                let t = h.total(Currency::EUR);
                (t.count, t.amount)
            })
            .unwrap_or_default();
        let loads = state(&load, "load")
            .into_iter()
            .map(|(k, v)| {
                let r: headend::load::LoadRec = decode(&v);
                (k, format!("{:?} {}", r.state, r.amount))
            })
            .collect();
        let cards = cards
            .iter()
            .map(|(name, p)| {
                let c = reader_drivers::vcard::VirtualCard::open(p).expect("card file");
                let s = c.state();
                (name.to_string(), (s.balance, s.atc, s.load_count))
            })
            .collect();
        Ledger {
            security_card,
            payments,
            releases,
            bank_accounts: accounts(&bank),
            bank_holds: holds(&bank),
            bank_float: float(&bank),
            hsm,
            loads,
            prefunded: accounts(&load),
            prefunded_holds: holds(&load),
            prefunded_float: float(&load),
            cards,
        }
    }

    /// Asserts that from `self` to `after` value moved only through `honest` purchases
    /// (each on the card named in the pair): each is counted once by the security cards,
    /// completed once at the payment server, released once by the merchant, and debited
    /// from its card; nothing else changed anywhere (loads, holds, floats, other cards).
    pub fn assert_only(&self, after: &Ledger, honest: &[(&str, &Purchase)], what: &str) {
        let sum: u64 = honest.iter().map(|(_, p)| p.offer.amount.minor).sum();
        let txids: BTreeSet<String> = honest
            .iter()
            .map(|(_, p)| p.offer.transaction_id.clone())
            .collect();
        assert_eq!(
            after.security_card,
            (
                self.security_card.0 + honest.len() as u64,
                self.security_card.1 + sum
            ),
            "{what}: the security cards counted something besides the honest purchases"
        );
        let new_completed: BTreeSet<String> = after
            .payments
            .iter()
            .filter(|(k, s)| s.as_str() == "Completed" && self.payments.get(*k) != Some(s))
            .map(|(k, _)| k.clone())
            .collect();
        assert_eq!(
            new_completed, txids,
            "{what}: payment transactions completed besides the honest purchases"
        );
        let new_releases: BTreeSet<String> = after
            .releases
            .keys()
            .filter(|k| !self.releases.contains_key(*k))
            .cloned()
            .collect();
        assert_eq!(
            new_releases, txids,
            "{what}: goods released besides the honest purchases"
        );
        for (k, v) in &self.releases {
            assert_eq!(
                after.releases.get(k),
                Some(v),
                "{what}: release {k} changed"
            );
        }
        assert_eq!(
            (&self.bank_accounts, &self.bank_holds, &self.bank_float),
            (&after.bank_accounts, &after.bank_holds, &after.bank_float),
            "{what}: the bank's accounts, holds or float moved"
        );
        assert_eq!(
            (self.hsm, &self.loads),
            (after.hsm, &after.loads),
            "{what}: the HSM counted a load, or a load record changed"
        );
        assert_eq!(
            (
                &self.prefunded,
                &self.prefunded_holds,
                &self.prefunded_float
            ),
            (
                &after.prefunded,
                &after.prefunded_holds,
                &after.prefunded_float
            ),
            "{what}: a pre-funded account, hold or float moved"
        );
        for (name, before) in &self.cards {
            let spent: u64 = honest
                .iter()
                .filter(|(c, _)| c == name)
                .map(|(_, p)| p.offer.amount.minor)
                .sum();
            let n = honest.iter().filter(|(c, _)| c == name).count() as u32;
            assert_eq!(
                after.cards.get(name),
                Some(&(before.0 - spent, before.1 + n, before.2)),
                "{what}: card {name} moved besides its honest purchases"
            );
        }
    }
}
