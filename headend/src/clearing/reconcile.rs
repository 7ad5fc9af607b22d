//! `headend reconcile`: the cross-ledger invariants, checked from the raw journals (the
//! SQLite files each role writes), each break naming the transaction (or batch, report,
//! security card) that breaks it:
//!
//! - card-reported debits (the debit responses the payment servers completed on) = the
//!   security cards' totals = the batched records = the settled amounts; the refunds
//!   (issue 17) the same way, as negatives: a security card's totals are its purchases
//!   less the refunds it issued, and a merchant is paid its purchases less its refunds;
//! - each (security card id, security card transaction) is in exactly one batch, and every
//!   batch clearing received is byte for byte the one its payment server journaled;
//! - loads captured by each funder = its float credits = the load advices clearing holds,
//!   and clearing's issuer float = advised loads − advised unloads − settled purchases +
//!   settled refunds; a funder's float also less the unloads it holds reserved.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use proto::money::Currency;
use proto::security_card::SecurityCard;

use super::settle::Report;
use super::{AdviceRec, Received, advice_key};
use crate::config::HeadendConfig;
use crate::funds::{Hold, HoldState};
use crate::journal::{self, Journal, Kind, Target};
use crate::payment::collection::ClosedBatch;
use crate::payment::refund::{RefundRec, RefundState};
use crate::payment::{PayState, PayTxn};

/// One broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Break {
    /// What it is about: a transaction id, `batch <ps>/<n>`, `report <id>`, `security card <id>`.
    pub subject: String,
    pub what: String,
}

impl std::fmt::Display for Break {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.subject, self.what)
    }
}

/// The journals to read: clearing's, each payment server's and each funder's, by role
/// name. A party clearing names but whose journal is not found is reported as a break.
pub struct Journals {
    pub clearing: Journal,
    pub payment: BTreeMap<String, Journal>,
    pub funders: BTreeMap<String, Journal>,
}

impl Journals {
    /// Opens the journals of clearing (`cfg`'s `[clearing]`), of each payment server and of
    /// each funder it names: where `cfg`'s `[journal]` puts that role — a PostgreSQL schema,
    /// or `<name>.sqlite` in the first of `dirs` that holds it (`dirs` empty: `cfg`'s state
    /// directory). A party whose journal is not found is left out (and reported as a break).
    ///
    /// # Errors
    /// No `[clearing]` section, clearing's own journal is not found, or a journal cannot be
    /// opened.
    pub fn find(cfg: &HeadendConfig, dirs: &[PathBuf]) -> Result<Self, String> {
        let s = cfg.clearing.as_ref().ok_or("no [clearing] section")?;
        let dirs: Vec<PathBuf> = if dirs.is_empty() {
            vec![cfg.state_dir.clone()]
        } else {
            dirs.to_vec()
        };
        let open = |name: &str| -> Result<Option<Journal>, String> {
            match cfg.journal_target(name).map_err(|e| e.to_string())? {
                Target::Sqlite(_) => dirs
                    .iter()
                    .map(|d| d.join(format!("{name}.sqlite")))
                    .find(|p| p.exists())
                    .map(|p| Journal::open(&p).map_err(|e| e.to_string()))
                    .transpose(),
                t => Journal::open_existing(&t).map_err(|e| e.to_string()),
            }
        };
        let mut out = Journals {
            clearing: open(&s.name)?
                .ok_or_else(|| format!("no journal of {} in {dirs:?}", s.name))?,
            payment: BTreeMap::new(),
            funders: BTreeMap::new(),
        };
        for p in &s.payment_servers {
            if let Some(j) = open(p)? {
                out.payment.insert(p.clone(), j);
            }
        }
        for f in &s.funders {
            if let Some(j) = open(f)? {
                out.funders.insert(f.clone(), j);
            }
        }
        Ok(out)
    }
}

fn all<T: serde::de::DeserializeOwned>(
    j: &Journal,
    kind: Kind,
) -> Result<Vec<(String, T)>, String> {
    j.all(kind)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(k, v)| Ok((k, journal::decode(&v)?)))
        .collect()
}

/// Checks every invariant (see the module doc); the breaks found, none when all hold.
///
/// # Errors
/// A journal cannot be read or holds a corrupt record.
pub fn reconcile(
    j: &Journals,
    payment_servers: &[String],
    funders: &[String],
) -> Result<Vec<Break>, String> {
    let mut breaks = Vec::new();
    let mut brk = |subject: String, what: String| breaks.push(Break { subject, what });
    let received: Vec<(String, Received)> = all(&j.clearing, Kind::ClearedBatch)?;
    let advices: Vec<(String, AdviceRec)> = all(&j.clearing, Kind::Advice)?;
    let reports: Vec<(String, Report)> = all(&j.clearing, Kind::Settlement)?;

    for ps in payment_servers {
        let Some(pj) = j.payment.get(ps) else {
            brk(
                format!("payment server {ps}"),
                "its journal was not found".into(),
            );
            continue;
        };
        let txns: BTreeMap<String, PayTxn> = all(pj, Kind::Txn)?.into_iter().collect();
        let batches: Vec<(String, ClosedBatch)> = all(pj, Kind::Batch)?;
        // Card-reported debits: a completed purchase is the debit response the card signed.
        for (txid, t) in &txns {
            if t.state != PayState::Completed {
                continue;
            }
            match &t.debit_response {
                Some(r)
                    if r.amount == t.amount.minor
                        && r.currency == t.amount.currency
                        && r.card_id == t.card_id
                        && r.security_card_id == t.security_card_id
                        && r.security_card_txn == t.security_card_txn => {}
                Some(r) => brk(
                    txid.clone(),
                    format!(
                        "the card reported {} but the payment server completed {}",
                        proto::money::Money::new(r.amount, r.currency),
                        t.amount
                    ),
                ),
                None => brk(
                    txid.clone(),
                    "completed without the card's debit response".into(),
                ),
            }
        }
        // Batched records = completed purchases, each in the batch it says.
        let mut batched: BTreeSet<&str> = BTreeSet::new();
        for (_, cb) in &batches {
            let n = cb.batch.batch;
            if let Err(e) = cb.batch.check() {
                brk(format!("batch {ps}/{n}"), format!("not whole: {e}"));
            }
            for r in &cb.batch.records {
                batched.insert(&r.transaction_id);
                match txns.get(&r.transaction_id) {
                    Some(t)
                        if t.state == PayState::Completed
                            && t.batch == Some(n)
                            && t.amount == r.amount
                            && t.security_card_id == r.security_card_id
                            && t.security_card_txn == r.security_card_txn
                            && t.card_id == r.card_id => {}
                    Some(t) => brk(
                        r.transaction_id.clone(),
                        format!(
                            "batch {ps}/{n} has {} for it, the payment journal {} ({:?}, batch {:?})",
                            r.amount, t.amount, t.state, t.batch
                        ),
                    ),
                    None => brk(
                        r.transaction_id.clone(),
                        format!("in batch {ps}/{n} but not a transaction of {ps}"),
                    ),
                }
            }
        }
        for (txid, t) in &txns {
            if let Some(n) = t.batch {
                if !batched.contains(txid.as_str()) {
                    brk(txid.clone(), format!("marked batch {n} but not in it"));
                }
            }
        }
        // Batched refunds = credited refunds, each in the batch it says, with the credit
        // command's security-card transaction.
        let refunds: BTreeMap<String, RefundRec> = all(pj, Kind::Refund)?.into_iter().collect();
        let mut refunds_batched: BTreeSet<&str> = BTreeSet::new();
        for (_, cb) in &batches {
            let n = cb.batch.batch;
            for r in &cb.batch.refunds {
                refunds_batched.insert(&r.transaction_id);
                match refunds.get(&r.transaction_id) {
                    Some(f)
                        if matches!(f.state, RefundState::Credited { .. })
                            && f.batch == Some(n)
                            && f.amount == r.amount
                            && f.card_id == r.card_id
                            && f.security_card_id == r.security_card_id
                            && f.issued().map(|i| i.security_card_txn)
                                == Some(r.security_card_txn) => {}
                    Some(f) => brk(
                        r.transaction_id.clone(),
                        format!(
                            "batch {ps}/{n} has a refund of {} for it, the payment journal {} \
                             ({}, batch {:?})",
                            r.amount,
                            f.amount,
                            f.state_name(),
                            f.batch
                        ),
                    ),
                    None => brk(
                        r.transaction_id.clone(),
                        format!("refunded in batch {ps}/{n} but no refund of {ps}"),
                    ),
                }
            }
        }
        for (txid, f) in &refunds {
            if let Some(n) = f.batch {
                if !refunds_batched.contains(txid.as_str()) {
                    brk(
                        txid.clone(),
                        format!("refund marked batch {n} but not in it"),
                    );
                }
            }
        }
        // Security-card totals = the purchases they counted (completed, or issued with an
        // early release and still open).
        // A refund comes off them when its credit command is issued, back only on the
        // card's proof.
        let mut counted: BTreeMap<(u64, Currency), i128> = BTreeMap::new();
        for t in txns.values() {
            let early_open = t.state == PayState::DebitIssued
                && t.embodiment != proto::messages::Embodiment::SecurityCard;
            if t.state == PayState::Completed || early_open {
                *counted
                    .entry((t.security_card_id, t.amount.currency))
                    .or_default() += i128::from(t.amount.minor);
            }
        }
        for f in refunds.values().filter(|f| f.issued().is_some()) {
            *counted
                .entry((f.security_card_id, f.amount.currency))
                .or_default() -= i128::from(f.amount.minor);
        }
        let mut totals: BTreeMap<(u64, Currency), i128> = BTreeMap::new();
        for (_, raw) in pj.all(Kind::SecurityCard).map_err(|e| e.to_string())? {
            let card: SecurityCard = journal::decode(&raw)?;
            for (c, t) in &card.totals {
                *totals.entry((card.id, *c)).or_default() += i128::from(t.amount);
            }
        }
        let keys: BTreeSet<_> = counted.keys().chain(totals.keys()).copied().collect();
        for k in keys {
            let (a, b) = (
                totals.get(&k).copied().unwrap_or(0),
                counted.get(&k).copied().unwrap_or(0),
            );
            if a != b {
                brk(
                    format!("security card {:X}", k.0),
                    format!(
                        "its totals say {a} ({}) but the payment journal's purchases less \
                         refunds make {b}",
                        k.1.code
                    ),
                );
            }
        }
        // What clearing received is what this payment server journaled.
        let own: BTreeMap<u64, &ClosedBatch> =
            batches.iter().map(|(_, b)| (b.batch.batch, b)).collect();
        for (key, r) in received
            .iter()
            .filter(|(_, r)| &r.batch.payment_server == ps)
        {
            match own.get(&r.batch.batch) {
                Some(cb) if cb.batch == r.batch => {}
                Some(cb) => {
                    // Name every purchase on either side that the other does not hold: a
                    // purchase the card paid and clearing never took is stranded.
                    let mut named = false;
                    for x in cb
                        .batch
                        .records
                        .iter()
                        .filter(|x| !r.batch.records.contains(x))
                    {
                        named = true;
                        brk(
                            x.transaction_id.clone(),
                            format!(
                                "in {ps}'s batch {} but not in clearing's batch {key}: not cleared",
                                cb.batch.batch
                            ),
                        );
                    }
                    for x in r
                        .batch
                        .records
                        .iter()
                        .filter(|x| !cb.batch.records.contains(x))
                    {
                        named = true;
                        brk(
                            x.transaction_id.clone(),
                            format!("in clearing's batch {key} but not in {ps}'s journal"),
                        );
                    }
                    if !named {
                        brk(
                            format!("batch {key}"),
                            format!("clearing's batch {key} differs from {ps}'s journal"),
                        );
                    }
                }
                None => brk(
                    format!("batch {key}"),
                    format!("received by clearing but not in {ps}'s journal"),
                ),
            }
        }
    }

    // A batch its payment server closed that clearing refused for good: every purchase in it
    // was paid by its card and will never be settled.
    for ps in payment_servers {
        let Some(pj) = j.payment.get(ps) else {
            continue;
        };
        let outbox = crate::outbox::Outbox::list(pj, "clearing").unwrap_or_default();
        for (_, cb) in all::<ClosedBatch>(pj, Kind::Batch)? {
            let id = crate::payment::collection::batch_id(cb.batch.batch);
            if let Some((_, o)) = outbox.iter().find(|(i, _)| *i == id) {
                if let crate::outbox::OutState::Refused { reason } = &o.state {
                    for x in &cb.batch.records {
                        brk(
                            x.transaction_id.clone(),
                            format!(
                                "in {ps}'s batch {}, which clearing refused ({reason}): not cleared",
                                cb.batch.batch
                            ),
                        );
                    }
                }
            }
        }
    }
    // Each security-card transaction in exactly one received batch.
    let mut seen: BTreeMap<(u64, u32), &str> = BTreeMap::new();
    for (key, r) in &received {
        for (x, _) in r.batch.all_records() {
            if let Some(first) = seen.insert((x.security_card_id, x.security_card_txn), key) {
                brk(
                    x.transaction_id.clone(),
                    format!("cleared in two batches: {first} and {key}"),
                );
            }
        }
    }
    // Settled amounts = the batches each report settled.
    let mut purchases: BTreeMap<Currency, i64> = BTreeMap::new();
    let mut loads: BTreeMap<Currency, i64> = BTreeMap::new();
    for (_, rep) in &reports {
        // Net of refunds: (merchant, currency) → purchases − refunds.
        let mut batch_sum: BTreeMap<(String, Currency), i128> = BTreeMap::new();
        for (key, r) in received
            .iter()
            .filter(|(_, r)| r.settlement.as_ref() == Some(&rep.id))
        {
            if !rep.batches.contains(key) {
                brk(
                    format!("batch {key}"),
                    format!("marked settled by {} but not in it", rep.id),
                );
            }
            for t in &r.batch.totals {
                *batch_sum
                    .entry((t.merchant_id.clone(), t.currency))
                    .or_default() += i128::from(t.amount);
                *purchases.entry(t.currency).or_default() += t.amount as i64;
            }
            for t in &r.batch.refund_totals {
                *batch_sum
                    .entry((t.merchant_id.clone(), t.currency))
                    .or_default() -= i128::from(t.amount);
                *purchases.entry(t.currency).or_default() -= t.amount as i64;
            }
        }
        let mut paid: BTreeMap<(String, Currency), i128> = BTreeMap::new();
        for m in &rep.merchants {
            *paid.entry((m.merchant_id.clone(), m.currency)).or_default() +=
                i128::from(m.amount) - i128::from(m.refunded);
        }
        if paid != batch_sum {
            brk(
                format!("report {}", rep.id),
                format!("pays merchants {paid:?} but its batches add up to {batch_sum:?}"),
            );
        }
        for (_, a) in advices
            .iter()
            .filter(|(_, a)| a.settlement.as_ref() == Some(&rep.id))
        {
            let sign = if a.advice.unload { -1 } else { 1 };
            *loads.entry(a.advice.amount.currency).or_default() +=
                sign * a.advice.amount.minor as i64;
        }
    }
    // Clearing's float = advised loads settled − purchases settled.
    for (code, raw) in j.clearing.all(Kind::Float).map_err(|e| e.to_string())? {
        let float = i64::from_be_bytes(raw.try_into().unwrap_or([0; 8]));
        let c = purchases
            .keys()
            .chain(loads.keys())
            .find(|c| c.code.to_string() == code)
            .copied();
        let want = c.map_or(0, |c| {
            loads.get(&c).copied().unwrap_or(0) - purchases.get(&c).copied().unwrap_or(0)
        });
        if float != want {
            brk(
                format!("issuer float {code}"),
                format!("is {float} but settled loads − purchases make {want}"),
            );
        }
    }
    // Funders: captured loads = their float = clearing's advices.
    for f in funders {
        let Some(fj) = j.funders.get(f) else {
            brk(format!("funder {f}"), "its journal was not found".into());
            continue;
        };
        let holds: Vec<(String, Hold)> = all(fj, Kind::Hold)?;
        // Its float: captured loads, less unloads (reserved at their hold, gone to the
        // account at the capture, back on a release).
        let mut captured: BTreeMap<Currency, i128> = BTreeMap::new();
        for (txid, h) in &holds {
            if h.unload && h.state == HoldState::Held {
                *captured.entry(h.amount.currency).or_default() -= i128::from(h.amount.minor);
            }
            if h.state != HoldState::Captured {
                continue;
            }
            let sign = if h.unload { -1 } else { 1 };
            *captured.entry(h.amount.currency).or_default() += sign * i128::from(h.amount.minor);
            match advices.iter().find(|(k, _)| *k == advice_key(f, txid)) {
                Some((_, a))
                    if a.advice.amount == h.amount
                        && a.advice.card_id == h.card_id
                        && a.advice.unload == h.unload => {}
                Some((_, a)) => brk(
                    txid.clone(),
                    format!("captured {} but advised {}", h.amount, a.advice.amount),
                ),
                None => brk(
                    txid.clone(),
                    format!("captured by {f} but not advised to clearing"),
                ),
            }
        }
        // And the other way: every advice is a load this funder captured (a funder's
        // certificate alone must not be able to make float).
        let prefix = format!("{f}/");
        for (key, a) in advices.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let txid = &key[prefix.len()..];
            match holds.iter().find(|(t, _)| t == txid) {
                Some((_, h))
                    if h.state == HoldState::Captured
                        && h.amount == a.advice.amount
                        && h.card_id == a.advice.card_id
                        && h.unload == a.advice.unload => {}
                Some((_, h)) => brk(
                    txid.to_string(),
                    format!(
                        "advised by {f} as {} but its hold is {:?} {}",
                        a.advice.amount, h.state, h.amount
                    ),
                ),
                None => brk(
                    txid.to_string(),
                    format!(
                        "advised by {f} ({}), but {f} captured no such load",
                        a.advice.amount
                    ),
                ),
            }
        }
        let float: BTreeMap<Currency, i128> = all::<proto::money::Money>(fj, Kind::Float)?
            .into_iter()
            .map(|(_, m)| (m.currency, i128::from(m.minor)))
            .collect();
        let differ = float
            .keys()
            .chain(captured.keys())
            .any(|c| float.get(c).copied().unwrap_or(0) != captured.get(c).copied().unwrap_or(0));
        if differ {
            brk(
                format!("funder {f}"),
                format!("its float {float:?} is not its captured loads {captured:?}"),
            );
        }
    }
    Ok(breaks)
}
