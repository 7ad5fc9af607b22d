//! A settlement run (001 [0008], [0056], [0135]): everything received and not yet settled
//! is paid in one journal write — the net per acquirer (the payment server whose terminals
//! collected it) and per merchant, the issuer float debited with the settled purchases and
//! credited with the advised loads — and the report of that write is what the JSON and CSV
//! files show. Batches and advices are marked with the report's id in the same write, so a
//! second run (or a second clearing instance on the same journal) never settles one twice.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proto::clearing::SecurityCardTotal;
use proto::money::Currency;
use serde::{Deserialize, Serialize};

use super::step::ClearingStep;
use super::{AdviceRec, ClearingServer, Received};
use crate::journal::{self, Kind, StoreError};

/// What one merchant is paid, through one acquirer, in one currency.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payable {
    pub merchant_id: String,
    /// The payment server (acquirer) whose batches carried the purchases.
    pub acquirer: String,
    pub currency: Currency,
    pub count: u64,
    /// Minor units: the purchases.
    pub amount: u64,
    /// Refunds the merchant gave to cards (issue 17), taken off `amount`: the merchant is
    /// paid `amount - refunded` (owes the difference when negative).
    pub refund_count: u64,
    /// Minor units.
    pub refunded: u64,
}

/// What one acquirer receives in one currency (the sum of its merchants).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcquirerNet {
    pub acquirer: String,
    pub currency: Currency,
    pub count: u64,
    /// Minor units: the purchases.
    pub amount: u64,
    /// Its merchants' refunds, taken off `amount`.
    pub refund_count: u64,
    /// Minor units.
    pub refunded: u64,
}

/// The issuer float in one currency across the run, in signed minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FloatMove {
    pub currency: Currency,
    pub opening: i64,
    /// Advised loads credited, less advised unloads (issue 17).
    pub loads: i64,
    /// Settled purchases debited, less settled refunds (value back on cards).
    pub purchases: i64,
    pub closing: i64,
}

/// One settlement run's report (journal kind `settlement`, key its number).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    /// `S<number, 6 digits>`.
    pub id: String,
    /// The UTC day of the run, `YYYY-MM-DD`.
    pub day: String,
    /// The batches settled (`<payment server>/<batch>`).
    pub batches: Vec<String>,
    /// The load advices credited (`<funder>/<transaction id>`).
    pub advices: Vec<String>,
    pub merchants: Vec<Payable>,
    pub acquirers: Vec<AcquirerNet>,
    pub security_cards: Vec<SecurityCardTotal>,
    pub float: Vec<FloatMove>,
}

/// Count and amount of purchases, and of refunds (minor units).
#[derive(Default)]
struct Sums {
    count: u64,
    amount: u64,
    refund_count: u64,
    refunded: u64,
}

impl Sums {
    fn add(&mut self, t: &proto::clearing::MerchantTotal, refund: bool) {
        let (count, amount) = if refund {
            (&mut self.refund_count, &mut self.refunded)
        } else {
            (&mut self.count, &mut self.amount)
        };
        *count += t.count;
        *amount = amount.saturating_add(t.amount);
    }
}

/// Every record of `kind` not yet settled, as this transaction holds it.
fn unsettled<T: serde::de::DeserializeOwned>(
    b: &journal::Batch,
    kind: Kind,
    settlement: impl Fn(&T) -> &Option<String>,
) -> Result<Vec<(String, T)>, StoreError> {
    let mut out = Vec::new();
    for (k, v) in b.all_for_update(kind)? {
        let r: T = journal::decode(&v).map_err(StoreError::Aborted)?;
        if settlement(&r).is_none() {
            out.push((k, r));
        }
    }
    Ok(out)
}

fn today() -> String {
    let d = time::OffsetDateTime::now_utc().date();
    format!("{:04}-{:02}-{:02}", d.year(), u8::from(d.month()), d.day())
}

impl ClearingServer {
    /// Settles everything received and not yet settled (see the module doc). `None` when
    /// there is nothing to settle.
    ///
    /// # Errors
    /// The journal cannot be read or written, or holds a corrupt record (nothing is then
    /// settled).
    pub fn settle(&self) -> Result<Option<Report>, String> {
        let day = today();
        let report = self
            .journal
            .atomically(|b| {
                let batches: Vec<(String, Received)> =
                    unsettled(b, Kind::ClearedBatch, |r: &Received| &r.settlement)?;
                let advices: Vec<(String, AdviceRec)> =
                    unsettled(b, Kind::Advice, |r: &AdviceRec| &r.settlement)?;
                if batches.is_empty() && advices.is_empty() {
                    return Ok(None);
                }
                let number = b.all_for_update(Kind::Settlement)?.len() as u64 + 1;
                let id = format!("S{number:06}");
                let mut merchants: BTreeMap<(String, String, Currency), Sums> = BTreeMap::new();
                let mut acquirers: BTreeMap<(String, Currency), Sums> = BTreeMap::new();
                let mut cards: BTreeMap<(u64, Currency), (u64, u64)> = BTreeMap::new();
                // Sums in i128: amounts are at most 2^48 each (checked on receipt), so no
                // run's sum overflows; the float's i64 is checked below all the same.
                let mut purchases: BTreeMap<Currency, i128> = BTreeMap::new();
                let mut loads: BTreeMap<Currency, i128> = BTreeMap::new();
                for (_, r) in &batches {
                    let acquirer = &r.batch.payment_server;
                    let totals = r.batch.totals.iter().map(|t| (t, false));
                    for (t, refund) in totals.chain(r.batch.refund_totals.iter().map(|t| (t, true)))
                    {
                        merchants
                            .entry((t.merchant_id.clone(), acquirer.clone(), t.currency))
                            .or_default()
                            .add(t, refund);
                        acquirers
                            .entry((acquirer.clone(), t.currency))
                            .or_default()
                            .add(t, refund);
                        let sign = if refund { -1 } else { 1 };
                        *purchases.entry(t.currency).or_default() += sign * i128::from(t.amount);
                    }
                    for t in &r.batch.security_cards {
                        let c = cards.entry((t.security_card_id, t.currency)).or_default();
                        c.0 += t.count;
                        c.1 = c.1.saturating_add(t.amount);
                    }
                }
                for (_, a) in &advices {
                    // An unload's value went from the float back to a bank account.
                    let sign = if a.advice.unload { -1 } else { 1 };
                    *loads.entry(a.advice.amount.currency).or_default() +=
                        sign * i128::from(a.advice.amount.minor);
                }
                let mut float = Vec::new();
                let currencies: std::collections::BTreeSet<Currency> =
                    purchases.keys().chain(loads.keys()).copied().collect();
                for c in currencies {
                    let key = c.code.to_string();
                    let opening = match b.get_for_update(Kind::Float, &key)? {
                        Some(v) => i64::from_be_bytes(v.try_into().unwrap_or([0; 8])),
                        None => 0,
                    };
                    let too_big = || {
                        StoreError::Aborted(format!(
                            "the issuer float in {} would leave the i64 range; nothing settled",
                            c.code
                        ))
                    };
                    let l = i64::try_from(loads.get(&c).copied().unwrap_or(0))
                        .map_err(|_| too_big())?;
                    let p = i64::try_from(purchases.get(&c).copied().unwrap_or(0))
                        .map_err(|_| too_big())?;
                    let closing = opening
                        .checked_add(l)
                        .and_then(|x| x.checked_sub(p))
                        .ok_or_else(too_big)?;
                    b.put(Kind::Float, &key, &closing.to_be_bytes())?;
                    float.push(FloatMove {
                        currency: c,
                        opening,
                        loads: l,
                        purchases: p,
                        closing,
                    });
                }
                let report = Report {
                    id: id.clone(),
                    day: day.clone(),
                    batches: batches.iter().map(|(k, _)| k.clone()).collect(),
                    advices: advices.iter().map(|(k, _)| k.clone()).collect(),
                    merchants: merchants
                        .into_iter()
                        .map(|((merchant_id, acquirer, currency), m)| Payable {
                            merchant_id,
                            acquirer,
                            currency,
                            count: m.count,
                            amount: m.amount,
                            refund_count: m.refund_count,
                            refunded: m.refunded,
                        })
                        .collect(),
                    acquirers: acquirers
                        .into_iter()
                        .map(|((acquirer, currency), a)| AcquirerNet {
                            acquirer,
                            currency,
                            count: a.count,
                            amount: a.amount,
                            refund_count: a.refund_count,
                            refunded: a.refunded,
                        })
                        .collect(),
                    security_cards: cards
                        .into_iter()
                        .map(
                            |((security_card_id, currency), (count, amount))| SecurityCardTotal {
                                security_card_id,
                                currency,
                                count,
                                amount,
                            },
                        )
                        .collect(),
                    float,
                };
                for (k, mut r) in batches {
                    r.settlement = Some(id.clone());
                    b.put(Kind::ClearedBatch, &k, &journal::encode(&r))?;
                }
                for (k, mut r) in advices {
                    r.settlement = Some(id.clone());
                    b.put(Kind::Advice, &k, &journal::encode(&r))?;
                }
                // The report number is claimed, never overwritten: of two runs that
                // counted the same reports, one gets it and the other rolls back.
                if !b.insert_new(
                    Kind::Settlement,
                    &format!("{number:06}"),
                    &journal::encode(&report),
                )? {
                    return Err(StoreError::Aborted(format!(
                        "settlement {id} was taken by another run; run again"
                    )));
                }
                b.step(
                    &id,
                    &ClearingStep::Settled,
                    &format!(
                        "{} batches, {} load advices",
                        report.batches.len(),
                        report.advices.len()
                    ),
                )?;
                Ok(Some(report))
            })
            .map_err(|e| e.to_string())?;
        if let Some(r) = &report {
            tracing::info!(report = %r.id, batches = r.batches.len(), advices = r.advices.len(), "settled");
        }
        Ok(report)
    }

    /// Every settlement report, oldest first.
    ///
    /// # Errors
    /// The journal cannot be read or a record is corrupt.
    pub fn reports(&self) -> Result<Vec<Report>, String> {
        self.journal
            .all(Kind::Settlement)
            .map_err(|e| e.to_string())?
            .into_iter()
            .map(|(_, v)| journal::decode(&v))
            .collect()
    }
}

/// The report as CSV (RFC 4180, written by the `csv` crate: a field holding a comma, a quote
/// or a line break is quoted, so no party's name can forge a row): `report, section, party,
/// acquirer, currency, count, amount` rows for merchants, their refunds (`merchant
/// refunds`), acquirers, security cards and the float's closing balance, amounts in minor
/// units.
///
/// # Errors
/// The writer's (it writes to memory: none expected).
pub fn csv(r: &Report) -> Result<String, String> {
    let mut w = ::csv::Writer::from_writer(Vec::new());
    let mut row = |fields: [&str; 7]| w.write_record(fields).map_err(|e| e.to_string());
    row([
        "report", "section", "party", "acquirer", "currency", "count", "amount",
    ])?;
    let id = r.id.as_str();
    for m in &r.merchants {
        row([
            id,
            "merchant",
            &m.merchant_id,
            &m.acquirer,
            &m.currency.code.to_string(),
            &m.count.to_string(),
            &m.amount.to_string(),
        ])?;
    }
    for m in r.merchants.iter().filter(|m| m.refund_count > 0) {
        row([
            id,
            "merchant refunds",
            &m.merchant_id,
            &m.acquirer,
            &m.currency.code.to_string(),
            &m.refund_count.to_string(),
            &m.refunded.to_string(),
        ])?;
    }
    for a in &r.acquirers {
        row([
            id,
            "acquirer",
            &a.acquirer,
            &a.acquirer,
            &a.currency.code.to_string(),
            &a.count.to_string(),
            &a.amount.to_string(),
        ])?;
    }
    for s in &r.security_cards {
        row([
            id,
            "security card",
            &format!("{:X}", s.security_card_id),
            "",
            &s.currency.code.to_string(),
            &s.count.to_string(),
            &s.amount.to_string(),
        ])?;
    }
    for f in &r.float {
        row([
            id,
            "float closing",
            "issuer",
            "",
            &f.currency.code.to_string(),
            "",
            &f.closing.to_string(),
        ])?;
    }
    let bytes = w.into_inner().map_err(|e| e.to_string())?;
    String::from_utf8(bytes).map_err(|e| e.to_string())
}

/// Writes `dir/settlement-<id>.json` and `.csv` (the same bytes however often).
///
/// # Errors
/// A file cannot be written.
pub fn write(r: &Report, dir: &Path) -> Result<(PathBuf, PathBuf), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let json = dir.join(format!("settlement-{}-{}.json", r.day, r.id));
    let csv_path = json.with_extension("csv");
    let text = serde_json::to_string_pretty(r).map_err(|e| e.to_string())?;
    std::fs::write(&json, text).map_err(|e| format!("{}: {e}", json.display()))?;
    std::fs::write(&csv_path, csv(r)?).map_err(|e| format!("{}: {e}", csv_path.display()))?;
    Ok((json, csv_path))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A party's name with a comma, a quote and a line break stays one field of one row
    /// (an outside tester forged a settlement row through a merchant id before).
    #[test]
    fn a_name_with_commas_quotes_and_newlines_cannot_forge_a_row() {
        let evil = "EVIL,\"x\"\nS999999,merchant,INJECTED,payment,978,1,99999999";
        let r = Report {
            id: "S000001".into(),
            day: "2026-11-30".into(),
            batches: vec!["payment/000000000001".into()],
            advices: Vec::new(),
            merchants: vec![Payable {
                merchant_id: evil.into(),
                acquirer: "payment".into(),
                currency: Currency::EUR,
                count: 1,
                amount: 5,
                refund_count: 0,
                refunded: 0,
            }],
            acquirers: Vec::new(),
            security_cards: Vec::new(),
            float: Vec::new(),
        };
        let text = csv(&r).unwrap();
        let rows: Vec<::csv::StringRecord> = ::csv::Reader::from_reader(text.as_bytes())
            .records()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows.len(), 1, "{text}");
        assert_eq!(&rows[0][2], evil);
        assert_eq!(&rows[0][6], "5");
    }
}
