//! `headend status`: what the journals in the state directory hold — journaled steps and
//! records per role, the security cards' totals, the merchant's releases — for operators
//! and the demo's summary, and what waits: the gateway's undelivered notifications and
//! releases, open offers and loads, **loads awaiting an operator** (a hold past its
//! lifetime whose load command was issued: the value may be on the card, so the hold is
//! never released blindly), the payment server's open transactions and the funders' open
//! holds. Read-only. Journals on PostgreSQL are read from their schemas
//! ([`report_config`]).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use proto::security_card::SecurityCard;

use crate::config::HeadendConfig;
use crate::journal::{self, Journal, Kind, Target};

/// A text report on every journal (`*.sqlite`) in `state_dir`.
///
/// # Errors
/// The directory or a journal cannot be read, or a record does not decode.
pub fn report(state_dir: &Path) -> Result<String, String> {
    let mut out = String::new();
    sqlite_journals(state_dir, &mut out)?;
    if out.is_empty() {
        out.push_str("no journals yet\n");
    }
    Ok(out)
}

/// A text report on every journal of the roles `cfg` runs: the SQLite files in its
/// `state_dir` (as [`report`]), then each role this config runs on PostgreSQL, read from its
/// schema (opening it brings the schema up to date, as the role itself would).
///
/// # Errors
/// As [`report`]; or a PostgreSQL journal cannot be reached.
pub fn report_config(cfg: &HeadendConfig) -> Result<String, String> {
    let mut out = String::new();
    if cfg.state_dir.exists() {
        sqlite_journals(&cfg.state_dir, &mut out)?;
    }
    let runs = |role: &str| match role {
        "gateway" => cfg.gateway.is_some(),
        "bank" => cfg.bank.is_some(),
        "load" => cfg.load.is_some(),
        r if cfg.payment.as_ref().is_some_and(|p| p.name == r) => true,
        r => cfg.merchant.as_ref().is_some_and(|m| m.name == r),
    };
    for role in cfg.role_names() {
        if !runs(&role) {
            continue;
        }
        let target = cfg.journal_target(&role).map_err(|e| e.to_string())?;
        if let Target::Postgres(pg) = &target {
            // Read-only: a schema that is not there is said, never created.
            match Journal::open_existing(&target).map_err(|e| e.to_string())? {
                Some(j) => one_journal(&j, &role, &format!("{role} ({})", j.at()), &mut out)?,
                None => out.push_str(&format!(
                    "{role}: no journal: PostgreSQL schema {} does not exist (a role not started yet, or a mistyped schema_prefix)\n",
                    pg.schema
                )),
            }
        }
    }
    if out.is_empty() {
        out.push_str("no journals yet\n");
    }
    Ok(out)
}

fn sqlite_journals(state_dir: &Path, out: &mut String) -> Result<(), String> {
    let mut names: Vec<_> = std::fs::read_dir(state_dir)
        .map_err(|e| format!("{}: {e}", state_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sqlite"))
        .collect();
    names.sort();
    for path in names {
        let role = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let j = Journal::open(&path).map_err(|e| e.to_string())?;
        one_journal(&j, &role, &role, out)?;
    }
    Ok(())
}

/// The report on one journal: `role` is the role's name, `title` what the report calls it.
fn one_journal(j: &Journal, role: &str, title: &str, out: &mut String) -> Result<(), String> {
    let steps = j.count_steps().map_err(|e| e.to_string())?;
    let kinds = j.kind_counts().map_err(|e| e.to_string())?;
    let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}={n}")).collect();
    let _ = writeln!(
        out,
        "{title}: {steps} journaled steps; records: {}",
        kinds.join(", ")
    );
    waiting(j, role, out)?;
    if let Ok(cards) = j.all(Kind::SecurityCard) {
        let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (_, b) in cards {
            let card: SecurityCard = journal::decode(&b)?;
            for (c, t) in &card.totals {
                let e = totals.entry(c.alpha()).or_default();
                e.0 += t.count;
                e.1 += t.amount;
            }
        }
        // [0044]: what the security cards still have to settle — their totals less the
        // batches clearing (or the acquirer) acknowledged.
        // Refunds are netted: they came off the totals when issued.
        let mut acknowledged: BTreeMap<String, i128> = BTreeMap::new();
        for (_, b) in j.all(Kind::Batch).unwrap_or_default() {
            if let Ok(cb) = journal::decode::<crate::payment::collection::ClosedBatch>(&b) {
                if cb.state == crate::payment::collection::BatchState::Acknowledged {
                    for t in &cb.batch.security_cards {
                        *acknowledged.entry(t.currency.alpha()).or_default() +=
                            i128::from(t.amount);
                    }
                    for t in &cb.batch.refund_security_cards {
                        *acknowledged.entry(t.currency.alpha()).or_default() -=
                            i128::from(t.amount);
                    }
                }
            }
        }
        for (c, (n, minor)) in totals {
            let left = i128::from(minor) - acknowledged.get(&c).copied().unwrap_or(0);
            let _ = writeln!(
                out,
                "  security cards: {n} sales, {minor} minor units {c}; {left} remaining to settle"
            );
        }
    }
    refunds(j, out);
    terminals(j, out);
    Ok(())
}

/// The payment server's refunds (issue 17) by state; those whose credit command is out are
/// named: each waits for its card's credit response or proof.
fn refunds(j: &Journal, out: &mut String) {
    let Ok(all) = crate::payment::refund::all(j) else {
        return;
    };
    if all.is_empty() {
        return;
    }
    let mut by_state: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &all {
        *by_state.entry(r.state_name()).or_default() += 1;
    }
    let states: Vec<String> = by_state.iter().map(|(s, n)| format!("{n} {s}")).collect();
    let _ = writeln!(out, "  refunds: {}", states.join(", "));
    for r in all.iter().filter(|r| r.state_name() == "issued") {
        let _ = writeln!(
            out,
            "    refund of {} ({} to card {:X}): credit command out, awaiting the card",
            r.transaction_id, r.amount, r.card_id
        );
    }
}

/// The payment server's terminals out of the pool, and the reversals their security cards
/// still owe (kind `terminal`).
fn terminals(j: &Journal, out: &mut String) {
    let entries = j.all(Kind::Terminal).unwrap_or_default();
    let owed = entries
        .iter()
        .filter(|(k, _)| k.starts_with("owed/"))
        .count();
    for (key, b) in &entries {
        if !key.starts_with("down/") {
            continue;
        }
        match journal::decode::<crate::payment::TerminalDown>(b) {
            Ok(t) => {
                let _ = writeln!(
                    out,
                    "  terminal {} (security card {:#X}) DOWN, out of the pool: {}",
                    t.slot, t.security_card_id, t.why
                );
            }
            Err(e) => {
                let _ = writeln!(out, "  terminal entry {key} unreadable: {e}");
            }
        }
    }
    refused_commands(&entries, out);
    for (key, why) in entries.iter().filter(|(k, _)| k.starts_with("disputed/")) {
        let _ = writeln!(
            out,
            "  RECONCILE security card transaction {}: reversed here, but the card {}",
            key.trim_start_matches("disputed/"),
            String::from_utf8_lossy(why)
        );
    }
    if owed > 0 {
        let _ = writeln!(
            out,
            "  security cards owe {owed} reversals (done when their terminals answer again)"
        );
    }
}

/// Per terminal, the debit commands cards refused (`refused/SLOT/TXID`): how many, with
/// which status words, and the newest transaction.
fn refused_commands(entries: &[(String, Vec<u8>)], out: &mut String) {
    use std::collections::BTreeMap;
    // slot → (security card, status word → count, last txid)
    let mut by_slot: BTreeMap<&str, (u64, BTreeMap<u16, usize>, &str)> = BTreeMap::new();
    for (key, b) in entries {
        let Some(rest) = key.strip_prefix("refused/") else {
            continue;
        };
        let Some((slot, txid)) = rest.split_once('/') else {
            continue;
        };
        match journal::decode::<crate::payment::RefusedCommand>(b) {
            Ok(r) => {
                let e = by_slot
                    .entry(slot)
                    .or_insert((r.security_card_id, BTreeMap::new(), txid));
                *e.1.entry(r.sw.0).or_default() += 1;
                e.2 = txid;
            }
            Err(e) => {
                let _ = writeln!(out, "  terminal entry {key} unreadable: {e}");
            }
        }
    }
    for (slot, (id, sws, last)) in by_slot {
        let n: usize = sws.values().sum();
        let sws: Vec<String> = sws
            .iter()
            .map(|(sw, k)| format!("{} x{k}", proto::apdu::StatusWord(*sw)))
            .collect();
        let _ = writeln!(
            out,
            "  terminal {} (security card {id:#X}): cards refused {n} of its debit commands ({}), last {last}{}",
            slot.parse::<usize>()
                .map_or_else(|_| slot.to_string(), |s| s.to_string()),
            sws.join(", "),
            if sws.iter().any(|s| s.starts_with("6982")) {
                "; 6982: its signature did not verify in the card: check its keys"
            } else {
                ""
            }
        );
    }
}

/// The gateway's card-to-card mailboxes not settled ([`crate::gateway::transfer`]): counted
/// by what they wait for, and each one whose payer's card was debited (P4 posted) listed —
/// its value is on neither card until the payee's box takes P4 or cancels.
fn transfers(j: &Journal, out: &mut String) -> Result<(), String> {
    use proto::messages::TransferStep;
    let (mut joining, mut exchanging) = (0, 0);
    let mut debited = Vec::new();
    for (id, b) in j.all(Kind::Transfer).unwrap_or_default() {
        let t: crate::gateway::transfer::TransferRec = journal::decode(&b)?;
        let has = |s| t.packets.contains_key(&s);
        if has(TransferStep::Settlement) || t.abandoned(crate::gateway::now_secs()) {
            continue;
        }
        if has(TransferStep::P4) {
            debited.push((id, t));
        } else if t.payer_box.is_none() {
            joining += 1;
        } else {
            exchanging += 1;
        }
    }
    if joining + exchanging + debited.len() > 0 {
        let _ = writeln!(
            out,
            "  transfers: {joining} waiting for a payer, {exchanging} exchanging, {} with the payer debited",
            debited.len()
        );
    }
    for (id, t) in debited {
        let _ = writeln!(
            out,
            "  TRANSFER {id}: {} from box {} debited; box {} has not credited or cancelled it",
            t.terms.invite.amount,
            t.payer_box.as_deref().unwrap_or("?"),
            t.payee_box
        );
    }
    Ok(())
}

/// What waits in one journal (`role`: its file's stem): counts, and the operator's queue by
/// transaction. Kind `release` is the gateway's queue of releases still to deliver; in the
/// merchant's journal the same kind records entitlements already released, which wait for
/// nothing.
fn waiting(j: &Journal, role: &str, out: &mut String) -> Result<(), String> {
    let count = |kind: Kind| j.all(kind).map(|v| v.len()).unwrap_or(0);
    let notify = count(Kind::Notify);
    let release = if role == "merchant" {
        0
    } else {
        count(Kind::Release)
    };
    if notify + release > 0 {
        let _ = writeln!(
            out,
            "  waiting: {notify} debit responses for the payment server, {release} confirmations for the merchant"
        );
    }
    let open = crate::gateway::open_counts(j);
    if !open.is_empty() {
        let open: Vec<String> = open.iter().map(|(k, n)| format!("{n} {k}")).collect();
        let _ = writeln!(out, "  open: {}", open.join(", "));
    }
    transfers(j, out)?;
    for (txid, b) in j.all(Kind::GwLoad).unwrap_or_default() {
        let t: crate::gateway::load::GwLoad = journal::decode(&b)?;
        if t.awaiting_operator && t.is_open() {
            let amount = t
                .hold
                .as_ref()
                .map_or_else(|| "no hold".to_string(), |h| h.amount.to_string());
            let _ = writeln!(
                out,
                "  OPERATOR: load {txid} (box {}, {amount}) is past its hold lifetime with a load command issued; waiting for the box's proof",
                t.box_id
            );
        }
    }
    let open_txns = j
        .all(Kind::Txn)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, b)| journal::decode::<crate::payment::PayTxn>(&b).ok())
        .filter(|t| t.state == crate::payment::PayState::DebitIssued)
        .count();
    if open_txns > 0 {
        let _ = writeln!(
            out,
            "  open: {open_txns} transactions awaiting their debit response or deadline"
        );
    }
    let held: Vec<crate::funds::Hold> = j
        .all(Kind::Hold)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, b)| journal::decode::<crate::funds::Hold>(&b).ok())
        .filter(|h| h.state == crate::funds::HoldState::Held)
        .collect();
    if !held.is_empty() {
        let sum: u64 = held.iter().map(|h| h.amount.minor).sum();
        let _ = writeln!(out, "  open: {} holds ({sum} minor units)", held.len());
    }
    // The outbox (collection batches, load advices): what waits for its receiver, and what
    // the receiver refused for good.
    let mut pending: BTreeMap<String, usize> = BTreeMap::new();
    for (key, b) in j.all(Kind::Outbox).unwrap_or_default() {
        let o: crate::outbox::Outgoing = journal::decode(&b)?;
        let to = key.split('/').next().unwrap_or("?").to_string();
        match o.state {
            crate::outbox::OutState::Pending => *pending.entry(to).or_default() += 1,
            crate::outbox::OutState::Refused { reason } => {
                let _ = writeln!(
                    out,
                    "  OPERATOR: {} {key} was refused by its receiver: {reason}",
                    o.message.kind()
                );
            }
            crate::outbox::OutState::Acknowledged => {}
        }
    }
    for (to, n) in pending {
        let _ = writeln!(
            out,
            "  waiting: {n} messages for {to} (batches, load advices)"
        );
    }
    // Clearing: received and not yet settled.
    let unsettled = j
        .all(Kind::ClearedBatch)
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(_, b)| journal::decode::<crate::clearing::Received>(&b).ok())
        .filter(|r| r.settlement.is_none())
        .count();
    if unsettled > 0 {
        let _ = writeln!(out, "  open: {unsettled} batches received, not yet settled");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_goods_at_the_merchant_wait_for_nothing_but_the_gateways_queue_does() {
        let dir = tempfile::tempdir().unwrap();
        for role in ["gateway", "merchant"] {
            let j = Journal::open(&dir.path().join(format!("{role}.sqlite"))).unwrap();
            j.put(Kind::Release, "tx-1", b"x").unwrap();
        }
        let report = report(dir.path()).unwrap();
        let waiting: Vec<&str> = report.lines().filter(|l| l.contains("waiting:")).collect();
        assert_eq!(
            waiting,
            [
                "  waiting: 0 debit responses for the payment server, 1 confirmations for the merchant"
            ],
            "{report}"
        );
        let gateway_block = report.split("merchant:").next().unwrap();
        assert!(gateway_block.contains("1 confirmations"), "{report}");
    }

    #[test]
    fn unsettled_transfers_are_counted_and_a_debited_one_is_listed() {
        use proto::messages::{TransferInvite, TransferStep, TransferTerms};
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("gateway.sqlite")).unwrap();
        let rec = |id: &str, steps: &[TransferStep]| crate::gateway::transfer::TransferRec {
            terms: TransferTerms {
                invite: TransferInvite {
                    transfer_id: id.into(),
                    amount: proto::money::Money::new(500, proto::money::Currency::EUR),
                    payee_card: 2,
                    payee_epochs: [1, 2, 3, 4],
                    payee_challenge: [0; 8],
                },
                code: "12345678".into(),
            },
            payee_box: "box-2".into(),
            payer_box: (!steps.is_empty()).then(|| "box-1".into()),
            packets: steps.iter().map(|s| (*s, vec![1])).collect(),
            opened_at: crate::gateway::now_secs(),
        };
        use TransferStep::*;
        for (id, steps) in [
            ("t-new", &[][..]),
            ("t-mid", &[P1, P23][..]),
            ("t-debited", &[P1, P23, P4][..]),
            ("t-done", &[P1, P23, P4, Settlement][..]),
            ("t-withdrawn", &[Withdrawn][..]),
        ] {
            j.put(Kind::Transfer, id, &journal::encode(&rec(id, steps)))
                .unwrap();
        }
        // A code no payer joined within its lifetime: over, not waiting.
        let mut expired = rec("t-expired", &[]);
        expired.opened_at = 0;
        assert!(expired.expired(crate::gateway::now_secs()));
        assert!(!rec("t-fresh", &[]).expired(crate::gateway::now_secs()));
        j.put(Kind::Transfer, "t-expired", &journal::encode(&expired))
            .unwrap();
        let report = report(dir.path()).unwrap();
        assert!(
            report.contains(
                "transfers: 1 waiting for a payer, 1 exchanging, 1 with the payer debited"
            ),
            "{report}"
        );
        let listed: Vec<&str> = report.lines().filter(|l| l.contains("TRANSFER ")).collect();
        assert_eq!(
            listed,
            [
                "  TRANSFER t-debited: 5.00 EUR from box box-1 debited; box box-2 has not credited or cancelled it"
            ],
            "{report}"
        );
    }

    #[test]
    fn the_outbox_waiting_and_refused_and_unsettled_batches_are_listed() {
        use crate::outbox::{OutState, Outgoing};
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("payment.sqlite")).unwrap();
        let msg = |n| proto::messages::Message::BatchAck {
            payment_server: "payment".into(),
            batch: n,
        };
        let rec = |n, state| {
            journal::encode(&Outgoing {
                message: msg(n),
                state,
            })
        };
        j.put(
            Kind::Outbox,
            "clearing/batch-000001",
            &rec(1, OutState::Acknowledged),
        )
        .unwrap();
        j.put(
            Kind::Outbox,
            "clearing/batch-000002",
            &rec(2, OutState::Pending),
        )
        .unwrap();
        let refused = OutState::Refused {
            reason: "batch payment/2 was received with other content".into(),
        };
        j.put(Kind::Outbox, "clearing/batch-000003", &rec(3, refused))
            .unwrap();
        let report = report(dir.path()).unwrap();
        assert!(
            report.contains("  waiting: 1 messages for clearing (batches, load advices)"),
            "{report}"
        );
        assert!(
            report.contains("OPERATOR: a batch acknowledgement clearing/batch-000003 was refused by its receiver: batch payment/2 was received with other content"),
            "{report}"
        );
    }
}
