//! The chaos run's simulated fleet: boxes in this process, each a [`crate::sim_box::SimBox`]
//! — the box core (`stb-flow`'s purchase and load flows and its recovery round) with
//! `stbd`'s gateway client and journal and the real `proto` purse card — connected by
//! [`crate::loadgen::fleet::Fleet::connect`].
//!
//! Each box behaves as `stbd` does under faults, because it runs `stbd`'s core:
//! - every step that can move value is journaled before the action it guards;
//! - what ends in doubt is settled by recovery rounds (a debit response in the journal is
//!   re-sent until a receipt; a purchase whose DEBIT never ran is cancelled with the card's
//!   proof; a load whose LOAD ran re-sends the S3, one that never ran is settled with a
//!   zero-value S1, 001 [0130]);
//! - no new transaction starts on a card with one in doubt; a recovery pass runs every box's
//!   round on a timer, whether or not the connection broke.
//!
//! Outages ([`Outage`]): a box loses power right after journaling a step
//! ([`crate::sim_box::Crash`]), stays dark 35–45 s, then settles from its journal.
//!
//! The cards' logs are kept as seen after every transaction and round, and at the end every
//! card is written as a `vcard` file with that history, for the audit to read.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::loadgen::fleet::{BoxIdentity, ConnectPlan, Fleet};
use crate::sim_box::{LoadViewer, Ran, SimBox};
use proto::card::{CardSpec, CardState, PurseCard};
use proto::crypto::DesKey;
use proto::messages::LoadSource;
use proto::money::Currency;
use proto::purse::{IssuerKeys, LogRecord};
use proto::secret::Secret;
use rand::Rng;
use stb_flow::show::Refusal;
use stb_flow::{load, purchase};
use tokio::sync::Mutex;

use crate::audit::{History, SimPending, write_history};
use crate::deploy::{BoxSpec, Layout, MerchantSpec};
use crate::record::{Outcome, Pacer, Recorder, TxKind, TxRecord};

/// One simulated box of the chaos fleet.
pub struct Device {
    pub spec: BoxSpec,
    pub sim: SimBox,
    /// Every card log record seen, by counter.
    pub history: BTreeMap<u32, LogRecord>,
    /// A simulated power loss: the box does nothing (no retry, no new transaction) until then.
    pub asleep_until: Option<Instant>,
}

/// A simulated power loss of a box in the middle of a transaction: it comes back after a
/// while and settles what it holds, as a box does from its journal.
pub type Outage = crate::sim_box::Crash;

/// Timing knobs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// One exchange with the gateway.
    pub step: Duration,
    /// Pause between recovery passes over open transactions.
    pub recovery_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            step: Duration::from_secs(2),
            recovery_every: Duration::from_secs(2),
        }
    }
}

fn trim(e: &str) -> String {
    e.chars().take(120).collect()
}

/// A purchase's outcome as the run records it.
fn purchase_outcome(o: purchase::Outcome) -> (Option<String>, Outcome) {
    use purchase::Outcome as P;
    match o {
        P::Paid {
            transaction_id,
            receipt,
        } => (
            Some(transaction_id),
            if receipt.released {
                Outcome::Completed
            } else {
                Outcome::Refused(format!("not released: {}", trim(&receipt.text)))
            },
        ),
        P::Cancelled {
            transaction_id,
            reason,
        } => (
            transaction_id,
            Outcome::Refused(format!("cancelled: {reason:?}")),
        ),
        P::Failed {
            transaction_id,
            refusal,
        } => (transaction_id, refused(refusal)),
        P::InDoubt {
            transaction_id,
            doubt,
        } => (
            Some(transaction_id),
            Outcome::InDoubt(trim(&format!("{doubt:?}"))),
        ),
    }
}

/// A load's outcome as the run records it.
fn load_outcome(o: load::Outcome) -> (Option<String>, Outcome) {
    use load::Outcome as L;
    match o {
        L::Loaded { transaction_id, .. } => (Some(transaction_id), Outcome::Completed),
        L::NotLoaded { transaction_id } => (
            Some(transaction_id),
            Outcome::Refused("confirmed not loaded".into()),
        ),
        L::Cancelled { transaction_id } => (transaction_id, Outcome::Refused("cancelled".into())),
        L::Failed {
            transaction_id,
            refusal,
        } => (transaction_id, refused(refusal)),
        L::InDoubt {
            transaction_id,
            doubt,
        } => (
            Some(transaction_id),
            Outcome::InDoubt(trim(&format!("{doubt:?}"))),
        ),
    }
}

/// Nothing moved: the head end unreachable is a failure, anything else a refusal.
fn refused(r: Refusal) -> Outcome {
    match r {
        Refusal::Unreachable { error } => Outcome::Failed(trim(&error.to_string())),
        other => Outcome::Refused(trim(&format!("{other:?}"))),
    }
}

impl Device {
    fn note_log(&mut self) {
        for r in &self.sim.card.state.log {
            self.history.insert(r.atc, r.clone());
        }
    }

    /// Whether the box holds a transaction in doubt.
    pub fn has_open(&self) -> bool {
        self.sim.has_doubt()
    }

    /// One recovery round (none while the box is dark); true when nothing is in doubt.
    pub async fn settle(&mut self) -> bool {
        if let Some(t) = self.asleep_until {
            if Instant::now() < t {
                return false;
            }
            self.asleep_until = None;
        }
        let end = self.sim.recover().await;
        self.note_log();
        !end.retry
    }

    fn dark(&mut self, outage: Option<(Outage, Duration)>) -> Duration {
        let d = outage.map(|(_, d)| d).unwrap_or_default();
        self.asleep_until = Some(Instant::now() + d);
        d
    }

    /// One purchase of `item` from `merchant`, the viewer saying OK; with `outage`, the
    /// box loses power at that point for that long.
    pub async fn purchase(
        &mut self,
        merchant: &str,
        item: &str,
        outage: Option<(Outage, Duration)>,
    ) -> (Option<String>, Outcome) {
        let (ran, _) = self
            .sim
            .run_purchase(merchant, item, outage.map(|(c, _)| c))
            .await;
        self.note_log();
        match ran {
            Ran::Ended(o) => purchase_outcome(o),
            Ran::Crashed { transaction_id } => {
                let d = self.dark(outage);
                (
                    Some(transaction_id),
                    Outcome::InDoubt(format!("simulated power loss ({} s)", d.as_secs())),
                )
            }
        }
    }

    /// One load of `amount` (at most what the offer allows) from the box's bank account
    /// (with its PIN) or its voucher; with `outage`, the box loses power at that point.
    pub async fn load(
        &mut self,
        bank: bool,
        amount: u64,
        outage: Option<(Outage, Duration)>,
    ) -> (Option<String>, Outcome) {
        let (source, pin) = if bank {
            (
                LoadSource::Bank {
                    account: self.spec.account.clone(),
                },
                Some(Secret::new(self.spec.pin.clone())),
            )
        } else {
            (LoadSource::voucher(self.spec.voucher.clone()), None)
        };
        let viewer = LoadViewer {
            amount: i64::try_from(amount).unwrap_or(i64::MAX),
            pin,
        };
        let (ran, _) = self
            .sim
            .run_load(source, viewer, outage.map(|(c, _)| c))
            .await;
        self.note_log();
        match ran {
            Ran::Ended(o) => load_outcome(o),
            Ran::Crashed { transaction_id } => {
                let d = self.dark(outage);
                (
                    Some(transaction_id),
                    Outcome::InDoubt(format!(
                        "simulated power loss after LOAD ({} s)",
                        d.as_secs()
                    )),
                )
            }
        }
    }
}

/// A personalised card for a box spec.
pub fn card_for(layout: &Layout, b: &BoxSpec) -> PurseCard {
    let spec = CardSpec::demo(b.card_id, b.currency, b.card_balance, b.card_max);
    PurseCard::new(
        CardState::personalise(&spec, &layout.issuer),
        rand::random(),
    )
}

/// The simulated fleet.
pub struct SimFleet {
    pub devices: Vec<Arc<Mutex<Device>>>,
    merchants: Vec<MerchantSpec>,
    pub timing: Timing,
    /// Share of the regular transactions in which the box loses power mid-way ([`Outage`])
    /// for 35–45 s (longer than the payment server's reversal timeout).
    pub outages: f64,
}

impl SimFleet {
    /// Issues device certificates, connects every box, personalises its card.
    pub async fn connect(layout: &Layout, timing: Timing) -> Result<Self, String> {
        let specs = layout.sim_boxes.clone();
        if specs.is_empty() {
            return Ok(Self {
                devices: Vec::new(),
                merchants: layout.merchants.clone(),
                timing,
                outages: 0.0,
            });
        }
        let ca = headend::pki::OperatorCa::load(&layout.ca_dir).map_err(|e| e.to_string())?;
        let ca_certs = headend::quic::load_certs(&layout.ca_dir.join("ca.crt.pem"))
            .map_err(|e| e.to_string())?;
        let ids: Vec<BoxIdentity> = specs
            .iter()
            .map(|s| {
                let issued = ca
                    .issue_device(&headend::quic::BoxId::new(&s.box_id).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                Ok(BoxIdentity {
                    box_id: s.box_id.clone(),
                    tls: headend::quic::ClientTls::new(
                        ca_certs.clone(),
                        issued.tls_identity(),
                        "gateway",
                    ),
                })
            })
            .collect::<Result<_, String>>()?;
        let fleet = Fleet::connect(
            &ids,
            &layout.issuer,
            layout.gateway_addr(),
            ConnectPlan {
                per_endpoint: 64,
                parallel: 8,
                balance: 1,
                request_timeout: timing.step,
                journal_dir: Some(layout.dir.join("sim-box-journals")),
            },
            0,
        )
        .await?;
        if fleet.len() != specs.len() {
            return Err(format!(
                "{} of {} simulated boxes connected: {}",
                fleet.len(),
                specs.len(),
                fleet.connect_errors
            ));
        }
        let mut fleet = fleet;
        let boxes = std::mem::take(&mut fleet.boxes);
        let mut devices = Vec::new();
        for (i, b) in boxes.into_iter().enumerate() {
            let mut sim = Arc::try_unwrap(b)
                .map_err(|_| "a simulated box is still shared".to_string())?
                .into_inner();
            sim.card = card_for(layout, &specs[i]);
            sim.pin_key = Some(specs[i].pin_key.clone());
            devices.push(Arc::new(Mutex::new(Device {
                spec: specs[i].clone(),
                sim,
                history: BTreeMap::new(),
                asleep_until: None,
            })));
        }
        Ok(Self {
            devices,
            merchants: layout.merchants.clone(),
            timing,
            outages: 0.0,
        })
    }

    /// Items a card in `c` can buy: (merchant, item).
    fn items(&self, c: Currency) -> Vec<(String, String)> {
        self.merchants
            .iter()
            .flat_map(|m| {
                m.items
                    .iter()
                    .filter(move |i| i.currency == c)
                    .map(move |i| (m.id.clone(), i.id.clone()))
            })
            .collect()
    }

    /// Picks a transaction for `d`: a purchase, or with `load_share` a bank or voucher load.
    fn pick(&self, d: &Device, load_share: f64) -> (TxKind, u64, (String, String)) {
        let mut rng = rand::thread_rng();
        let load = rng.gen_bool(load_share.clamp(0.0, 1.0));
        let bank = rng.gen_bool(0.5);
        let amount = rng.gen_range(1..=40) * 50;
        let items = self.items(d.spec.currency);
        let pick = items[rng.gen_range(0..items.len())].clone();
        let kind = match (load, bank) {
            (false, _) => TxKind::Purchase,
            (true, true) => TxKind::BankLoad,
            (true, false) => TxKind::VoucherLoad,
        };
        (kind, amount, pick)
    }

    /// One transaction of `kind` on `d`, recorded under `source`.
    #[allow(clippy::too_many_arguments)]
    pub async fn transact(
        &self,
        d: &mut Device,
        kind: TxKind,
        amount: u64,
        pick: &(String, String),
        source: &'static str,
        rec: &Recorder,
        outage: Option<(Outage, Duration)>,
    ) -> Outcome {
        let started = Instant::now();
        let (txid, outcome) = match kind {
            TxKind::Purchase => d.purchase(&pick.0, &pick.1, outage).await,
            TxKind::BankLoad => d.load(true, amount, outage).await,
            TxKind::VoucherLoad => d.load(false, amount, outage).await,
        };
        rec.tx(TxRecord {
            source,
            box_id: d.spec.box_id.clone(),
            kind,
            txid,
            started,
            ended: Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// Runs `workers` drivers taking start slots from `pacer` until it runs dry; each slot
    /// is one transaction on a free box of `boxes` (indices) without an open transaction (a
    /// purchase, or with `load_share` a bank or voucher load).
    pub async fn drive(
        self: &Arc<Self>,
        boxes: Vec<usize>,
        pacer: Arc<Pacer>,
        rec: Arc<Recorder>,
        workers: usize,
        load_share: f64,
    ) {
        let boxes = Arc::new(boxes);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers.max(1) {
            let (me, pacer, rec, boxes) = (self.clone(), pacer.clone(), rec.clone(), boxes.clone());
            tasks.spawn(async move {
                let mut cursor = w;
                while let Some(slot) = pacer.next() {
                    tokio::time::sleep_until(slot.into()).await;
                    // A box with nothing open; wait up to a second for one.
                    let mut free = me.free(&boxes, &mut cursor);
                    let until = tokio::time::Instant::now() + Duration::from_secs(1);
                    while free.is_none() && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        free = me.free(&boxes, &mut cursor);
                    }
                    let Some(mut d) = free else {
                        rec.shed();
                        continue;
                    };
                    let (kind, amount, pick) = me.pick(&d, load_share);
                    let outage = {
                        let mut rng = rand::thread_rng();
                        rng.gen_bool(me.outages.clamp(0.0, 1.0)).then(|| {
                            let what = match kind {
                                TxKind::Purchase if rng.gen_bool(0.5) => Outage::BeforeDebit,
                                TxKind::Purchase => Outage::AfterDebit,
                                _ => Outage::AfterLoad,
                            };
                            (what, Duration::from_secs(rng.gen_range(35..=45)))
                        })
                    };
                    me.transact(&mut d, kind, amount, &pick, "sim", &rec, outage)
                        .await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// A free box of `boxes` with nothing open, round robin from `cursor`.
    fn free(
        &self,
        boxes: &[usize],
        cursor: &mut usize,
    ) -> Option<tokio::sync::OwnedMutexGuard<Device>> {
        let n = boxes.len();
        for _ in 0..n {
            let d = self.devices[boxes[*cursor % n]].clone();
            *cursor += 1;
            if let Ok(g) = d.try_lock_owned() {
                if !g.has_open() {
                    return Some(g);
                }
            }
        }
        None
    }

    /// Transactions of `kind` back to back — on the boxes `boxes`, or when none of them is
    /// free, on any free box — until one completes or `until` passes; the completion instant.
    pub async fn probe(
        &self,
        boxes: &[usize],
        kind: TxKind,
        rec: &Recorder,
        until: tokio::time::Instant,
    ) -> Option<Instant> {
        let all: Vec<usize> = (0..self.devices.len()).collect();
        let (mut cursor, mut any) = (0, 0);
        while tokio::time::Instant::now() < until {
            let found = self
                .free(boxes, &mut cursor)
                .or_else(|| self.free(&all, &mut any));
            let Some(mut d) = found else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (_, amount, pick) = self.pick(&d, 0.0);
            if self
                .transact(&mut d, kind, amount, &pick, "probe", rec, None)
                .await
                == Outcome::Completed
            {
                return Some(Instant::now());
            }
            drop(d);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// One recovery pass: every idle box with an open transaction tries to settle it.
    /// Returns how many are still open.
    pub async fn recover_once(&self) -> usize {
        let mut left = 0;
        for d in &self.devices {
            let Ok(mut g) = d.try_lock() else {
                continue;
            };
            if g.has_open() && !g.settle().await {
                left += 1;
            }
        }
        left
    }

    /// Recovery passes every `timing.recovery_every` until `stop` says so.
    pub async fn recover_forever(self: Arc<Self>, stop: Arc<std::sync::atomic::AtomicBool>) {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            self.recover_once().await;
            tokio::time::sleep(self.timing.recovery_every).await;
        }
    }

    /// Transactions in doubt now, from each box's journal (boxes busy in a transaction are
    /// counted as they were when it started).
    pub async fn open(&self) -> Vec<SimPending> {
        let mut out = Vec::new();
        for d in &self.devices {
            let g = d.lock().await;
            let box_id = g.spec.box_id.clone();
            match g.sim.journal.in_doubt() {
                Ok(ps) => out.extend(ps.into_iter().map(|p| SimPending {
                    box_id: box_id.clone(),
                    transaction_id: p.txn.transaction_id.clone(),
                    what: format!("purchase, journal state {}", p.state),
                })),
                Err(e) => out.push(SimPending {
                    box_id: box_id.clone(),
                    transaction_id: String::new(),
                    what: format!("journal unreadable: {e}"),
                }),
            }
            if let Ok(ls) = g.sim.journal.loads_in_doubt() {
                out.extend(ls.into_iter().map(|l| SimPending {
                    box_id: box_id.clone(),
                    transaction_id: l.transaction_id.clone(),
                    what: format!("load, journal state {}", l.state),
                }));
            }
        }
        out
    }

    /// Writes every card as a `vcard` file with its history into `dir`, and the open
    /// transactions to `pending`; returns the card files.
    pub async fn write_cards(
        &self,
        dir: &Path,
        pending: &Path,
    ) -> Result<Vec<std::path::PathBuf>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut files = Vec::new();
        for d in &self.devices {
            let mut g = d.lock().await;
            g.note_log();
            let path = dir.join(format!("{}.plvc", g.spec.box_id));
            let _ = std::fs::remove_file(&path);
            let state = g.sim.card.state.clone();
            let spec = CardSpec {
                card_id: state.card_id,
                provider_id: state.provider_id,
                currency: state.currency,
                balance: state.balance,
                max_balance: state.max_balance,
                expiry: state.expiry,
            };
            let issuer = IssuerKeys {
                key_version: state.key_version,
                purchase_master: DesKey::new([0; 16]),
                load_master: DesKey::new([0; 16]),
            };
            let mut vc = reader_drivers::vcard::VirtualCard::create(&path, &spec, &issuer)
                .map_err(|e| e.to_string())?;
            vc.update(|s| *s = state).map_err(|e| e.to_string())?;
            write_history(
                &path,
                &History {
                    opening_balance: Some(g.spec.card_balance),
                    records: g.history.values().cloned().collect(),
                },
            )?;
            files.push(path);
        }
        let open = self.open().await;
        let text = serde_json::to_string_pretty(&open).map_err(|e| e.to_string())?;
        std::fs::write(pending, text).map_err(|e| format!("{}: {e}", pending.display()))?;
        Ok(files)
    }

    /// Closes every connection.
    pub async fn close(&self) {
        for d in &self.devices {
            let g = d.lock().await;
            g.sim.gateway.close("chaos done");
        }
    }
}
