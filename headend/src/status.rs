//! `headend status`: what the journals in the state directory hold — journaled steps and
//! records per role, the security cards' totals, the merchant's releases — for operators
//! and the demo's summary. Read-only.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::Path;

use proto::security_card::SecurityCard;

use crate::journal::{self, Journal};

/// A text report on every journal (`*.sqlite`) in `state_dir`.
pub fn report(state_dir: &Path) -> Result<String, String> {
    let mut names: Vec<_> = std::fs::read_dir(state_dir)
        .map_err(|e| format!("{}: {e}", state_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sqlite"))
        .collect();
    names.sort();
    let mut out = String::new();
    for path in names {
        let role = path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let j = Journal::open(&path).map_err(|e| e.to_string())?;
        let steps = j.count_steps().map_err(|e| e.to_string())?;
        let mut kinds = BTreeMap::new();
        for kind in j.kinds().map_err(|e| e.to_string())? {
            kinds.insert(kind.clone(), j.all(&kind).map_err(|e| e.to_string())?.len());
        }
        let kinds: Vec<String> = kinds.iter().map(|(k, n)| format!("{k}={n}")).collect();
        let _ = writeln!(
            out,
            "{role}: {steps} journaled steps; records: {}",
            kinds.join(", ")
        );
        if let Ok(cards) = j.all("psam") {
            let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
            for (_, b) in cards {
                let card: SecurityCard = journal::decode(&b)?;
                for (c, t) in &card.totals {
                    let e = totals.entry(c.alpha()).or_default();
                    e.0 += t.count;
                    e.1 += t.amount;
                }
            }
            for (c, (n, minor)) in totals {
                let _ = writeln!(out, "  security cards: {n} sales, {minor} minor units {c}");
            }
        }
    }
    if out.is_empty() {
        out.push_str("no journals yet\n");
    }
    Ok(out)
}
