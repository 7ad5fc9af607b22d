//! The chaos run itself: deploy, drive, inject faults, quiesce, audit, report.
//!
//! 1. A split head end ([`crate::deploy`]) with five role processes; `stbd` boxes in tmux
//!    ([`crate::stbd`]); a simulated fleet in this process ([`crate::fleet`]).
//! 2. Transactions at a steady rate up to a total, shared by every driver: purchases from
//!    all eight merchants, bank and voucher loads.
//! 3. Faults spread evenly over the planned duration: SIGKILLs of role processes (each role
//!    at least once; restarted at once with the same configuration) and of `stbd` boxes just
//!    after the viewer's OK (restarted; they recover from their journal).
//! 4. After each role restart, probes (two reserved simulated boxes) make purchases (or
//!    loads, for the bank and the load server) back to back; the recovery time is from the
//!    restarted role's READY=1 to the first transaction of that kind, started after it by
//!    any box, that completes end to end.
//! 5. Quiesce: no new transactions; every role up; the boxes settle what they hold open;
//!    waits until nothing is open anywhere, or the deadline.
//! 6. Every process stopped; the audit ([`crate::audit`]) from the journals and card files.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;

use crate::audit::{AuditReport, Sources, audit};
use crate::bins::Bins;
use crate::deploy::{self, HeadEnd, RoleName, Spec};
use crate::fleet::{SimFleet, Timing};
use crate::record::{Event, Outcome, Pacer, Recorder, TxKind, TxRecord, tally};
use crate::stbd::{Histories, StbBox, StbDriver, Tmux};

/// What to run.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Where everything goes (kept); a temporary directory (removed) if `None`.
    pub dir: Option<PathBuf>,
    pub stbd_boxes: usize,
    pub sim_boxes: usize,
    /// Transactions started by the regular drivers (probes come on top).
    pub transactions: u64,
    /// SIGKILLs in all: role processes and stbd boxes.
    pub kills: usize,
    /// Of `kills`, how many hit stbd boxes (the rest: roles, each at least once).
    pub box_kills: usize,
    /// Transactions started per second.
    pub rate: f64,
    pub sim_workers: usize,
    /// Share of loads among the transactions.
    pub load_share: f64,
    /// Share of simulated transactions in which the box loses power mid-way for 35–45 s
    /// (before DEBIT, after DEBIT, after LOAD), then settles from what it kept.
    pub outage_share: f64,
    /// Share of stbd purchases the viewer declines with BACK.
    pub back_share: f64,
    /// How long the quiesce phase may wait for everything to settle.
    pub quiesce: Duration,
    pub timing: Timing,
    /// The payment server's reversal timeout.
    pub transaction_timeout_secs: u64,
    /// At half the quiesce deadline, restart stbd boxes that still hold open work (they
    /// resolve their journal at start). Off by default: it would hide boxes that never
    /// retry on a live connection.
    pub nudge_boxes: bool,
    /// Print progress lines to stderr.
    pub verbose: bool,
}

impl Plan {
    /// The short CI version.
    pub fn ci() -> Self {
        Self {
            dir: None,
            stbd_boxes: 3,
            sim_boxes: 24,
            transactions: 360,
            kills: 10,
            box_kills: 3,
            rate: 3.0,
            sim_workers: 6,
            load_share: 0.25,
            outage_share: 0.03,
            back_share: 0.05,
            quiesce: Duration::from_secs(75),
            timing: Timing::default(),
            transaction_timeout_secs: 30,
            nudge_boxes: false,
            verbose: true,
        }
    }

    /// The long version: 10,000 transactions, 100 kills.
    pub fn long() -> Self {
        Self {
            stbd_boxes: 10,
            sim_boxes: 50,
            transactions: 10_000,
            kills: 100,
            box_kills: 30,
            rate: 8.0,
            sim_workers: 12,
            quiesce: Duration::from_secs(180),
            ..Self::ci()
        }
    }

    pub fn planned(&self) -> Duration {
        Duration::from_secs_f64(self.transactions as f64 / self.rate.max(0.01))
    }
}

/// One role kill as measured.
#[derive(Debug, Clone)]
pub struct Recovery {
    pub role: RoleName,
    /// From the SIGKILL to the restarted process's READY=1.
    pub restart: Option<Duration>,
    /// From READY=1 to the end of the first transaction of the role's kind, started after
    /// READY, that completed.
    pub to_success: Option<Duration>,
    /// Whether that success came after the next fault (the figure then includes it).
    pub overlapped: bool,
}

/// Everything the run measured.
pub struct ChaosReport {
    pub plan: Plan,
    pub dir: PathBuf,
    pub elapsed: Duration,
    pub run_phase: Duration,
    pub quiesce_phase: Duration,
    pub quiesce_left: usize,
    pub txs: Vec<TxRecord>,
    /// Start slots no simulated box could take.
    pub shed: u64,
    pub events: Vec<Event>,
    pub recoveries: Vec<Recovery>,
    pub audit: AuditReport,
    pub nudged: Vec<String>,
    /// The temporary directory, removed with the report unless kept.
    tmp: Option<TmpDir>,
}

fn ms(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn relevant(role: RoleName, kind: TxKind) -> bool {
    match role {
        RoleName::Gateway | RoleName::Payment | RoleName::Merchant => kind == TxKind::Purchase,
        RoleName::Bank => kind == TxKind::BankLoad,
        RoleName::Load => kind.is_load(),
    }
}

fn probe_kind(role: RoleName) -> TxKind {
    match role {
        RoleName::Gateway | RoleName::Payment | RoleName::Merchant => TxKind::Purchase,
        RoleName::Bank => TxKind::BankLoad,
        RoleName::Load => TxKind::VoucherLoad,
    }
}

fn recoveries(txs: &[TxRecord], events: &[Event]) -> Vec<Recovery> {
    let kills: Vec<(RoleName, Instant, Option<Instant>)> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoleKilled { role, at, ready } => Some((*role, *at, *ready)),
            _ => None,
        })
        .collect();
    let faults: Vec<Instant> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoleKilled { at, .. } | Event::BoxKilled { at, .. } => Some(*at),
            _ => None,
        })
        .collect();
    kills
        .iter()
        .map(|(role, at, ready)| {
            let next_fault = faults.iter().filter(|f| *f > at).min().copied();
            let success = ready.and_then(|r| {
                txs.iter()
                    .filter(|t| {
                        relevant(*role, t.kind) && t.outcome == Outcome::Completed && t.started >= r
                    })
                    .map(|t| t.ended)
                    .min()
            });
            Recovery {
                role: *role,
                restart: ready.map(|r| r - *at),
                to_success: match (ready, success) {
                    (Some(r), Some(s)) => Some(s - *r),
                    _ => None,
                },
                overlapped: matches!((success, next_fault), (Some(s), Some(f)) if s > f),
            }
        })
        .collect()
}

/// (median, max) of the present values.
pub fn median_max(v: &[Duration]) -> Option<(Duration, Duration)> {
    if v.is_empty() {
        return None;
    }
    let mut v = v.to_vec();
    v.sort();
    let n = v.len();
    let med = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2
    };
    Some((med, v[n - 1]))
}

impl ChaosReport {
    /// Keeps the run's directory (journals, card files, logs) after the report is dropped.
    pub fn keep_dir(&mut self) {
        if let Some(t) = self.tmp.take() {
            std::mem::forget(t);
        }
    }

    /// The audit holds: value conserved, nothing left in doubt.
    pub fn holds(&self) -> bool {
        self.audit.holds()
    }

    pub fn kills_per_role(&self) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for e in &self.events {
            match e {
                Event::RoleKilled { role, .. } => *out.entry(role.to_string()).or_default() += 1,
                Event::BoxKilled { .. } => *out.entry("stbd box".to_string()).or_default() += 1,
                _ => {}
            }
        }
        out
    }
}

impl fmt::Display for ChaosReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = &self.plan;
        writeln!(f, "==== Purselink chaos run ({})", self.dir.display())?;
        writeln!(
            f,
            "deployment: split head end (gateway, payment, merchant, bank, load: one process each, QUIC between), {} stbd boxes (virtual cards, TV in tmux), {} simulated boxes; 8 merchants (FIG. 4-7 x FIG. 8 on/off)",
            p.stbd_boxes, p.sim_boxes
        )?;
        writeln!(
            f,
            "plan: {} transactions at {}/s, {} kills ({} of stbd boxes), load share {:.0}%, simulated power losses {:.0}%, viewer BACK {:.0}%, quiesce deadline {}",
            p.transactions,
            p.rate,
            p.kills,
            p.box_kills,
            p.load_share * 100.0,
            p.outage_share * 100.0,
            p.back_share * 100.0,
            ms(p.quiesce)
        )?;
        writeln!(
            f,
            "wall time: {} (run {}, quiesce {}{})",
            ms(self.elapsed),
            ms(self.run_phase),
            ms(self.quiesce_phase),
            if self.quiesce_left > 0 {
                format!(", {} item(s) still open at the deadline", self.quiesce_left)
            } else {
                String::new()
            }
        )?;
        writeln!(f, "transactions (as the boxes saw them):")?;
        let tallies = tally(&self.txs);
        let mut totals: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for ((source, kind), m) in &tallies {
            let n: u64 = m.values().sum();
            let ok = m.get("completed").copied().unwrap_or(0);
            let e = totals.entry(source.clone()).or_default();
            e.0 += n;
            e.1 += ok;
            writeln!(
                f,
                "  {source} {}: {n} attempted, {ok} completed",
                kind.as_str()
            )?;
            for (label, c) in m {
                if label != "completed" {
                    writeln!(f, "      {c:>5}  {label}")?;
                }
            }
        }
        for (s, (n, ok)) in &totals {
            writeln!(f, "  {s} total: {n} attempted, {ok} completed")?;
        }
        let all: u64 = totals.values().map(|t| t.0).sum();
        let ok: u64 = totals.values().map(|t| t.1).sum();
        writeln!(f, "  all: {all} attempted, {ok} completed")?;
        if self.shed > 0 {
            writeln!(
                f,
                "  {} start slot(s) shed: every simulated box was busy or held an open transaction for 1 s",
                self.shed
            )?;
        }
        // The fleet after each gateway restart: how many simulated boxes completed a
        // transaction again before the next gateway restart (they must reconnect).
        let gw: Vec<Instant> = self
            .events
            .iter()
            .filter_map(|e| match e {
                Event::RoleKilled {
                    role: RoleName::Gateway,
                    ready: Some(r),
                    ..
                } => Some(*r),
                _ => None,
            })
            .collect();
        for (i, r) in gw.iter().enumerate() {
            let until = gw.get(i + 1).copied();
            let boxes: std::collections::BTreeSet<&str> = self
                .txs
                .iter()
                .filter(|t| {
                    t.source != "stbd"
                        && t.outcome == Outcome::Completed
                        && t.started >= *r
                        && until.is_none_or(|u| t.started < u)
                })
                .map(|t| t.box_id.as_str())
                .collect();
            writeln!(
                f,
                "  after gateway restart #{}: {} of {} simulated boxes completed a transaction again",
                i + 1,
                boxes.len(),
                self.plan.sim_boxes
            )?;
        }
        let kills: Vec<String> = self
            .kills_per_role()
            .iter()
            .map(|(r, n)| format!("{r} {n}"))
            .collect();
        writeln!(f, "kills: {}", kills.join(", "))?;
        for e in &self.events {
            match e {
                Event::RoleExited { role, status, .. } => {
                    writeln!(f, "  ! {role} exited by itself: {status}")?
                }
                Event::BoxKilled {
                    box_id,
                    up: None,
                    during,
                    ..
                } => writeln!(
                    f,
                    "  ! {box_id} (killed during {during}) did not come back to its home screen"
                )?,
                Event::Note(n) => writeln!(f, "  note: {n}")?,
                _ => {}
            }
        }
        if !self.nudged.is_empty() {
            writeln!(
                f,
                "  nudged (restarted during quiesce to resolve their journal): {}",
                self.nudged.join(", ")
            )?;
        }
        writeln!(
            f,
            "recovery after a role SIGKILL (READY=1 -> next {{purchase | load}} completed end to end; goal <= 3 s):"
        )?;
        for role in RoleName::ALL {
            let rs: Vec<&Recovery> = self.recoveries.iter().filter(|r| r.role == role).collect();
            if rs.is_empty() {
                continue;
            }
            let ok: Vec<Duration> = rs.iter().filter_map(|r| r.to_success).collect();
            let restart: Vec<Duration> = rs.iter().filter_map(|r| r.restart).collect();
            let never = rs.iter().filter(|r| r.to_success.is_none()).count();
            let overlapped = rs.iter().filter(|r| r.overlapped).count();
            let list: Vec<String> = rs
                .iter()
                .map(|r| match r.to_success {
                    Some(d) => format!("{}{}", ms(d), if r.overlapped { "*" } else { "" }),
                    None => "never".into(),
                })
                .collect();
            writeln!(
                f,
                "  {:<8} kills {:>2}: median {} max {}{}{} | restart to READY median {} | each: {}",
                role.as_str(),
                rs.len(),
                median_max(&ok).map(|m| ms(m.0)).unwrap_or("-".into()),
                median_max(&ok).map(|m| ms(m.1)).unwrap_or("-".into()),
                if never > 0 {
                    format!(", {never} never recovered before the run ended")
                } else {
                    String::new()
                },
                if overlapped > 0 {
                    format!(", {overlapped} after the next fault (*)")
                } else {
                    String::new()
                },
                median_max(&restart).map(|m| ms(m.0)).unwrap_or("-".into()),
                list.join(" ")
            )?;
        }
        write!(f, "{}", self.audit)
    }
}

/// Runs the plan against the binaries in `bins`.
pub async fn run(plan: Plan, bins: &Bins) -> Result<ChaosReport, String> {
    let t_begin = Instant::now();
    let (tmp, dir) = match &plan.dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()))?;
            (None, d.clone())
        }
        None => {
            let t = tempfile_dir()?;
            let p = t.0.clone();
            (Some(t), p)
        }
    };
    let say = |s: String| {
        if plan.verbose {
            eprintln!("chaos [{:>6.1}s] {s}", t_begin.elapsed().as_secs_f64());
        }
    };
    let layout = deploy::generate(
        &dir,
        &Spec {
            stbd_boxes: plan.stbd_boxes,
            sim_boxes: plan.sim_boxes,
            transaction_timeout_secs: plan.transaction_timeout_secs,
            ..Default::default()
        },
    )?;
    say(format!("deployment generated in {}", dir.display()));
    let headend = Arc::new(Mutex::new(HeadEnd::start(&layout, &bins.headend)?));
    say("head end up: 5 role processes ready".into());

    let rec = Arc::new(Recorder::new());
    let tmux = Arc::new(Tmux::new("run", &dir)?);
    let mut stb_boxes = Vec::new();
    for spec in &layout.stbd_boxes {
        let b = StbBox::prepare(&layout, spec, &bins.stbd)?;
        b.start(&tmux)?;
        stb_boxes.push(b);
    }
    say(format!(
        "{} stbd boxes at their home screen",
        stb_boxes.len()
    ));
    let mut fleet = SimFleet::connect(&layout, plan.timing).await?;
    fleet.outages = plan.outage_share;
    let fleet = Arc::new(fleet);
    say(format!("{} simulated boxes connected", fleet.devices.len()));

    // Two boxes (EUR) probe after each role restart; the rest is the regular fleet.
    let eur: Vec<usize> = (0..fleet.devices.len())
        .filter(|i| layout.sim_boxes[*i].currency == proto::money::Currency::EUR)
        .collect();
    let probes: Vec<usize> = eur.iter().rev().take(2).copied().collect();
    let regular: Vec<usize> = (0..fleet.devices.len())
        .filter(|i| !probes.contains(i))
        .collect();

    let pacer = Arc::new(Pacer::new(plan.rate, plan.transactions));
    let stop_recovery = Arc::new(AtomicBool::new(false));
    let recovery_task = tokio::spawn(fleet.clone().recover_forever(stop_recovery.clone()));
    let drive_task = {
        let (fleet, pacer, rec) = (fleet.clone(), pacer.clone(), rec.clone());
        let (workers, share) = (plan.sim_workers, plan.load_share);
        tokio::spawn(async move { fleet.drive(regular, pacer, rec, workers, share).await })
    };
    let mut kill_flags = Vec::new();
    let mut stb_threads = Vec::new();
    for b in &stb_boxes {
        let mut d = StbDriver::new(
            b.clone(),
            tmux.clone(),
            rec.clone(),
            &layout.merchants,
            plan.load_share,
        );
        d.back_share = plan.back_share;
        kill_flags.push((b.spec.box_id.clone(), d.kill_next.clone()));
        let pacer = pacer.clone();
        stb_threads.push(
            std::thread::Builder::new()
                .name(format!("drive-{}", b.spec.box_id))
                .spawn(move || d.run(pacer))
                .map_err(|e| e.to_string())?,
        );
    }
    let histories = Arc::new(Histories::default());
    for b in &stb_boxes {
        histories.opening(&b.card, b.spec.card_balance);
    }
    let stop_sampler = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (h, stop) = (histories.clone(), stop_sampler.clone());
        let cards: Vec<PathBuf> = stb_boxes.iter().map(|b| b.card.clone()).collect();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                h.sample(&cards);
                std::thread::sleep(Duration::from_millis(150));
            }
            h.sample(&cards);
        })
    };

    // Probes: after each role restart, back-to-back transactions of its kind.
    let (probe_tx, mut probe_rx) = tokio::sync::mpsc::unbounded_channel::<RoleName>();
    let probe_task = {
        let (fleet, rec) = (fleet.clone(), rec.clone());
        tokio::spawn(async move {
            while let Some(role) = probe_rx.recv().await {
                let until = tokio::time::Instant::now() + Duration::from_secs(120);
                let kind = probe_kind(role);
                tokio::select! {
                    _ = fleet.probe(&probes, kind, &rec, until) => {}
                    // A newer restart takes over.
                    _ = async { while probe_rx.is_empty() { tokio::time::sleep(Duration::from_millis(50)).await } } => {}
                }
            }
        })
    };

    // The fault schedule.
    let mut faults: Vec<Option<RoleName>> = Vec::new();
    let box_kills = if stb_boxes.is_empty() {
        0
    } else {
        plan.box_kills.min(plan.kills)
    };
    let role_kills = plan.kills - box_kills;
    {
        let mut rng = rand::thread_rng();
        let mut roles: Vec<RoleName> = RoleName::ALL.to_vec();
        roles.shuffle(&mut rng);
        roles.truncate(role_kills);
        while roles.len() < role_kills {
            roles.push(RoleName::ALL[rng.gen_range(0..RoleName::ALL.len())]);
        }
        faults.extend(roles.into_iter().map(Some));
        faults.extend(std::iter::repeat_n(None, box_kills));
        faults.shuffle(&mut rng);
    }
    let planned = plan.planned();
    let controller = {
        let (headend, rec, verbose) = (headend.clone(), rec.clone(), plan.verbose);
        let kill_flags = kill_flags.clone();
        let t0 = Instant::now();
        let n = faults.len();
        std::thread::spawn(move || {
            for (k, fault) in faults.into_iter().enumerate() {
                let due = t0 + planned.mul_f64((k + 1) as f64 / (n + 1) as f64);
                while Instant::now() < due {
                    watch_roles(&headend, &rec);
                    std::thread::sleep(Duration::from_millis(100));
                }
                match fault {
                    Some(role) => {
                        let mut he = headend.lock().unwrap_or_else(|p| p.into_inner());
                        let p = he.role(role);
                        let at = p.kill();
                        let ready = p
                            .start()
                            .and_then(|before| p.wait_ready(before, Duration::from_secs(60)));
                        drop(he);
                        if verbose {
                            eprintln!(
                                "chaos [{:>6.1}s] SIGKILL {role}; restarted, {}",
                                rec.secs(at),
                                match &ready {
                                    Ok(r) => format!("READY after {}", ms(*r - at)),
                                    Err(e) => format!("NOT READY: {e}"),
                                }
                            );
                        }
                        let ready = ready.ok();
                        rec.event(Event::RoleKilled { role, at, ready });
                        if ready.is_some() {
                            let _ = probe_tx.send(role);
                        }
                    }
                    None => {
                        let i = rand::thread_rng().gen_range(0..kill_flags.len());
                        let (box_id, flag) = &kill_flags[i];
                        flag.store(true, Ordering::SeqCst);
                        if verbose {
                            eprintln!(
                                "chaos [{:>6.1}s] {box_id}: SIGKILL at its next OK",
                                rec.secs(Instant::now())
                            );
                        }
                    }
                }
            }
            probe_tx
        })
    };

    // Run until every slot is taken and every fault done.
    let probe_tx = tokio::task::spawn_blocking(move || controller.join())
        .await
        .map_err(|e| e.to_string())?
        .map_err(|_| "fault controller panicked".to_string())?;
    say("all faults injected".into());
    while !pacer.stopped() {
        tokio::time::sleep(Duration::from_millis(200)).await;
        watch_roles(&headend, &rec);
    }
    let _ = drive_task.await;
    for t in stb_threads {
        let _ = tokio::task::spawn_blocking(move || t.join()).await;
    }
    for (box_id, flag) in &kill_flags {
        if flag.swap(false, Ordering::SeqCst) {
            rec.event(Event::Note(format!(
                "{box_id}: a kill was scheduled but the box started no transaction before the end"
            )));
        }
    }
    let run_phase = t_begin.elapsed();
    say(format!(
        "run phase over: {} transactions started; quiescing",
        pacer.issued()
    ));

    // Quiesce.
    let t_q = Instant::now();
    let deadline = t_q + plan.quiesce;
    let mut nudged = Vec::new();
    let sources_now = |with_sim: bool| Sources {
        gateway: layout.journal(RoleName::Gateway),
        gateway_postgres: layout.gateway_journal.clone(),
        payment: layout.journal(RoleName::Payment),
        merchant: layout.journal(RoleName::Merchant),
        bank: layout.journal(RoleName::Bank),
        load: layout.journal(RoleName::Load),
        boxes: stb_boxes
            .iter()
            .map(|b| (b.spec.box_id.clone(), b.journal()))
            .collect(),
        cards: stb_boxes.iter().map(|b| b.card.clone()).collect(),
        sim_pending: with_sim.then(|| dir.join("sim-pending.json")),
        role_configs: layout.configs.values().cloned().collect(),
        as_of: None,
    };
    let mut left;
    loop {
        watch_roles(&headend, &rec);
        let sim_open = fleet.open().await.len();
        let he_open = audit(&sources_now(false))
            .map(|r| r.open.len())
            .unwrap_or(usize::MAX);
        left = sim_open + he_open;
        if left == 0 || Instant::now() >= deadline {
            break;
        }
        if plan.nudge_boxes && nudged.is_empty() && Instant::now() >= t_q + plan.quiesce / 2 {
            if let Ok(r) = audit(&sources_now(false)) {
                for b in &stb_boxes {
                    let ledger = format!("box {} journal", b.spec.box_id);
                    if r.open.iter().any(|o| o.ledger.starts_with(&ledger)) {
                        let d = StbDriver::new(
                            b.clone(),
                            tmux.clone(),
                            rec.clone(),
                            &layout.merchants,
                            0.0,
                        );
                        tokio::task::spawn_blocking(move || d.kill_and_restart("quiesce (nudge)"))
                            .await
                            .map_err(|e| e.to_string())?;
                        nudged.push(b.spec.box_id.clone());
                    }
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let quiesce_phase = t_q.elapsed();
    say(format!(
        "quiesce over after {}: {left} item(s) open",
        ms(quiesce_phase)
    ));

    // Stop everything, then audit.
    stop_recovery.store(true, Ordering::Relaxed);
    let _ = recovery_task.await;
    drop(probe_tx);
    probe_task.abort();
    stop_sampler.store(true, Ordering::Relaxed);
    let _ = tokio::task::spawn_blocking(move || sampler.join()).await;
    for b in &stb_boxes {
        if let Some(pid) = tmux.pane_pid(b.session()) {
            if !tmux.pane_dead(b.session()) {
                // SAFETY: kill(2) on the stbd this run started.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
    }
    let end = Instant::now() + Duration::from_secs(10);
    while stb_boxes.iter().any(|b| !tmux.pane_dead(b.session())) && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    histories.sample(&stb_boxes.iter().map(|b| b.card.clone()).collect::<Vec<_>>());
    histories.write()?;
    fleet.close().await;
    let stopped_at = std::time::SystemTime::now();
    {
        let he = headend.clone();
        tokio::task::spawn_blocking(move || he.lock().unwrap_or_else(|p| p.into_inner()).stop())
            .await
            .map_err(|e| e.to_string())?;
    }
    let sim_cards = fleet
        .write_cards(&dir.join("sim-cards"), &dir.join("sim-pending.json"))
        .await?;
    let mut sources = sources_now(true);
    sources.cards.extend(sim_cards);
    sources.as_of = Some(stopped_at);
    let report = audit(&sources).map_err(|e| e.to_string())?;
    let txs = rec.txs();
    let events = rec.events();
    let recs = recoveries(&txs, &events);
    let out = ChaosReport {
        plan: plan.clone(),
        dir: dir.clone(),
        elapsed: t_begin.elapsed(),
        run_phase,
        quiesce_phase,
        quiesce_left: left,
        txs,
        shed: rec.shed_count(),
        events,
        recoveries: recs,
        audit: report,
        nudged,
        tmp,
    };
    drop(tmux);
    Ok(out)
}

/// Restarts any role that exited by itself, recording it.
fn watch_roles(headend: &Mutex<HeadEnd>, rec: &Recorder) {
    let mut he = headend.lock().unwrap_or_else(|p| p.into_inner());
    for role in RoleName::ALL {
        let p = he.role(role);
        if let Some(st) = p.exited() {
            rec.event(Event::RoleExited {
                role,
                at: Instant::now(),
                status: st.to_string(),
            });
            if let Ok(before) = p.start() {
                let _ = p.wait_ready(before, Duration::from_secs(60));
            }
        }
    }
}

/// A temporary directory removed on drop unless `PURSELINK_CHAOS_KEEP=1`.
pub struct TmpDir(pub PathBuf);

fn tempfile_dir() -> Result<TmpDir, String> {
    let base = std::env::temp_dir();
    for _ in 0..100 {
        let p = base.join(format!(
            "purselink-chaos-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        if std::fs::create_dir(&p).is_ok() {
            return Ok(TmpDir(p));
        }
    }
    Err("cannot create a temporary directory".into())
}

impl Drop for TmpDir {
    fn drop(&mut self) {
        if std::env::var("PURSELINK_CHAOS_KEEP").as_deref() == Ok("1") {
            eprintln!("chaos: kept {}", self.0.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
