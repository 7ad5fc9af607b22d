//! A terminal with a hardware security card: the PSAM application ([`proto::psam`]) in a
//! PC/SC reader, driven over `reader-drivers`' PC/SC path with the [0093] replay script
//! (CARD ATR, then INITIALIZE; DEBIT RESPONSE for FIG. 4).
//!
//! - **A thread per terminal.** The reader is driven by a thread of its own ("psam-…") that
//!   owns the PC/SC session on a current-thread runtime; [`SecurityCardDevice`]'s calls are
//!   synchronous, so each sends its APDUs there and waits, bounded by the terminal's
//!   timeout. One command script at a time runs in one PC/SC transaction, so no other
//!   program's command comes between the replayed ATR and the INITIALIZE.
//! - **The id is checked.** At start, and every time the reader is connected again, GET
//!   STATUS must name the security card id the config gives the terminal (001 [0042]: the
//!   terminal is identified by its security card); another card is a [`SecurityCardError::
//!   Terminal`] error, never used.
//! - **Answers are checked.** A debit command that does not answer the draw (another card
//!   id, counter, amount, currency, date or security card id, or a transaction number not
//!   after the last one seen), a status word outside the interface, a refusal whose GET LAST
//!   ERROR does not match its `94xx`, or bytes that do not decode: a `Terminal` error, the
//!   operator message naming the reader and what it answered.
//! - **Nothing issued is left behind.** The card keeps its own state; the payment server
//!   journals the card's summary (GET STATUS: id, counter, totals) as the slot's snapshot.
//!   Every transaction the card numbered after the last answer this terminal saw — an
//!   INITIALIZE whose answer was lost with the reader, or one issued before a crash and
//!   never journaled (a [`SecurityCardDevice::restore`] to an older summary) — is reversed
//!   in the card the next time it answers, before anything else.

use std::collections::BTreeMap;
use std::sync::mpsc as std_mpsc;
use std::time::Duration;

use proto::apdu::{Response, StatusWord};
use proto::hotlist::Hotlist;
use proto::money::Currency;
use proto::psam::{self, PsamStatus, commands};
use proto::purse::{CreditCommand, CreditResponse, Date, DebitResponse, PurchaseInit};
use proto::security_card::{DebitAuthorization, DrawData, SecurityCard, SecurityCardError, Totals};
use reader_drivers::ReaderDriver;
use reader_drivers::api::CardSession;

use super::pool::SecurityCardDevice;
use crate::journal;

/// The most unjournaled transactions a terminal reverses on its own when its card answers
/// again; more means the card is not the one whose history this terminal knows.
pub const MAX_ORPHANS: u32 = 64;

struct Job {
    apdus: Vec<Vec<u8>>,
    reply: std_mpsc::Sender<Result<Vec<Response>, String>>,
}

/// A security card in a PC/SC reader (see the module docs).
pub struct PcscSecurityCard {
    id: u64,
    reader: String,
    timeout: Duration,
    jobs: std_mpsc::Sender<Job>,
    /// The card's transaction counter as of the last answer seen here: every number the
    /// card handed out up to it was answered; any after it is an orphan to reverse. `None`:
    /// no baseline yet (a new terminal whose card has not answered): the card's counter at
    /// its first answer is taken, nothing before it being this server's.
    seen_counter: Option<u32>,
    /// Orphans may exist (an answer was lost, or the state was rolled back).
    recover: bool,
    /// The last GET STATUS, for totals and snapshots while the reader is down.
    last_status: std::sync::Mutex<PsamStatus>,
    /// The last command script failed: snapshots and totals use [`Self::last_status`]
    /// rather than wait for a dead reader's timeout again (commands that change the card
    /// still try it).
    failing: std::sync::atomic::AtomicBool,
}

impl PcscSecurityCard {
    /// Opens the terminal on `reader` for security card `id` and reads its status. A
    /// reader that does not answer is not an error here (the terminal starts down: see
    /// [`Self::is_up`]); a card that answers with another id is.
    ///
    /// # Errors
    /// The reader holds a security card other than `id`.
    pub fn open(id: u64, reader: &str, timeout: Duration) -> Result<Self, String> {
        let (jobs, rx) = std_mpsc::channel::<Job>();
        let name = reader.to_string();
        std::thread::Builder::new()
            .name(format!("psam-{id:x}"))
            .spawn(move || worker(name, id, rx, timeout))
            .map_err(|e| format!("cannot start the terminal thread for {reader}: {e}"))?;
        let mut me = Self {
            id,
            reader: reader.into(),
            timeout,
            jobs,
            seen_counter: None,
            recover: false,
            last_status: std::sync::Mutex::new(PsamStatus {
                security_card_id: id,
                txn_counter: 0,
                newest_key_version: 0,
                hotlist_version: 0,
                totals: BTreeMap::new(),
            }),
            failing: Default::default(),
        };
        match me.status() {
            Ok(s) => me.seen_counter = Some(s.txn_counter),
            Err(SecurityCardError::Terminal(why)) if why.contains("holds security card") => {
                return Err(why);
            }
            Err(e) => {
                tracing::error!(reader, security_card_id = id, error = %e, "security card terminal down at start");
                me.recover = true;
            }
        }
        Ok(me)
    }

    /// Runs `apdus` in one PC/SC transaction; each must answer (any status word).
    fn run(&self, apdus: Vec<Vec<u8>>) -> Result<Vec<Response>, SecurityCardError> {
        let (reply, rx) = std_mpsc::channel();
        self.jobs
            .send(Job { apdus, reply })
            .map_err(|_| self.failed("the terminal thread ended"))?;
        let out = match rx.recv_timeout(self.timeout + Duration::from_secs(1)) {
            Ok(r) => r.map_err(|e| self.failed(&e)),
            Err(_) => {
                Err(self.failed(&format!("no answer within {} ms", self.timeout.as_millis())))
            }
        };
        self.failing
            .store(out.is_err(), std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// Whether the card must be checked before the next command (an earlier command
    /// failed: the card may have been pulled, swapped, or answered without being heard).
    fn must_verify(&self) -> bool {
        self.recover || self.failing.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// GET STATUS, or the last one while the reader is failing.
    fn status_or_last(&self) -> PsamStatus {
        let cached = || {
            self.last_status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        };
        if self.failing.load(std::sync::atomic::Ordering::Relaxed) {
            return cached();
        }
        self.status().unwrap_or_else(|_| cached())
    }

    fn failed(&self, what: &str) -> SecurityCardError {
        SecurityCardError::Terminal(format!(
            "reader {:?}, security card {:#X}: {what}",
            self.reader, self.id
        ))
    }

    /// One command that must answer `9000` or a refusal.
    fn command(&self, apdu: Vec<u8>) -> Result<Vec<u8>, SecurityCardError> {
        let r = self.run(vec![apdu])?.remove(0);
        self.outcome(r)
    }

    /// `9000`'s data, or the refusal (its fields from GET LAST ERROR), or a `Terminal` error
    /// for anything else.
    fn outcome(&self, r: Response) -> Result<Vec<u8>, SecurityCardError> {
        if r.sw == StatusWord::OK {
            return Ok(r.data);
        }
        if r.sw.sw1() == 0x94 {
            let detail = self.run(vec![commands::get_last_error()])?.remove(0);
            let err: Option<SecurityCardError> = (detail.sw == StatusWord::OK)
                .then(|| postcard::from_bytes(&detail.data).ok())
                .flatten();
            return match err {
                Some(e) if psam::status_word(&e) == r.sw => Err(e),
                _ => Err(self.failed(&format!(
                    "refusal {} without a matching GET LAST ERROR (answered {})",
                    r.sw,
                    hex::encode_upper(detail.to_bytes())
                ))),
            };
        }
        Err(self.failed(&format!("answered {}", r.sw)))
    }

    fn status(&self) -> Result<PsamStatus, SecurityCardError> {
        let data = self.command(commands::get_status())?;
        let s = PsamStatus::decode(&data)
            .map_err(|e| self.failed(&format!("GET STATUS answer does not decode: {e}")))?;
        if s.security_card_id != self.id {
            return Err(self.failed(&format!(
                "the reader holds security card {:#X}, the config names {:#X} for this terminal",
                s.security_card_id, self.id
            )));
        }
        *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = s.clone();
        Ok(s)
    }

    /// Reverses every transaction the card numbered after [`Self::seen_counter`] (see the
    /// module docs). A number the card does not know, or one it completed, is left.
    fn recover_orphans(&mut self) -> Result<(), SecurityCardError> {
        if !self.must_verify() {
            return Ok(());
        }
        self.recover = true;
        let s = self.status()?;
        let Some(seen) = self.seen_counter else {
            self.seen_counter = Some(s.txn_counter);
            self.recover = false;
            return Ok(());
        };
        // A card whose counter is behind the last one seen is not the card this terminal
        // used (replaced, or restored from a backup): its numbers would repeat ones already
        // collected. Never used.
        if s.txn_counter < seen {
            return Err(self.failed(&format!(
                "the card's transaction counter is {}, behind the {seen} this terminal already \
                 used: not the same card (replaced, or restored from a backup) — put the \
                 terminal's own card back, or give a new card a new id and slot",
                s.txn_counter
            )));
        }
        // A card whose counter is far past the last one seen is not this terminal's card
        // history (swapped, or restored from elsewhere): nothing is reversed blindly.
        if s.txn_counter.saturating_sub(seen) > MAX_ORPHANS {
            return Err(self.failed(&format!(
                "the card's transaction counter is {}, the last this terminal saw {seen}: \
                 more than {MAX_ORPHANS} unjournaled transactions — reconcile the card by hand",
                s.txn_counter
            )));
        }
        for n in seen.saturating_add(1)..=s.txn_counter {
            match self.command(commands::reverse(n)) {
                Ok(_) => tracing::warn!(
                    reader = %self.reader,
                    security_card_txn = n,
                    "security card transaction never journaled: reversed in the card"
                ),
                Err(
                    SecurityCardError::UnknownTransaction(_)
                    | SecurityCardError::AlreadyCompleted(_),
                ) => {}
                // A refund's credit command whose journal write failed: it never left this
                // server, but the security card reverses a credit only on the card's proof.
                // It stays counted off (reconcile names the security card) — the terminal
                // is not held up for it.
                Err(SecurityCardError::CreditNeedsProof(_)) => tracing::error!(
                    reader = %self.reader,
                    security_card_txn = n,
                    "a credit command never journaled stays counted off the security card's totals: an operator reconciles it"
                ),
                Err(e) => return Err(e),
            }
        }
        self.seen_counter = Some(s.txn_counter);
        self.recover = false;
        Ok(())
    }

    /// Whether the card answers now (with its own id), orphans reversed: what brings a
    /// terminal that was taken out of the pool back.
    pub fn probe(&mut self) -> Result<(), SecurityCardError> {
        self.recover = true;
        self.recover_orphans()
    }

    /// Keeps the status a DEBIT RESPONSE or REVERSE answered with, so the summary journaled
    /// next counts it even if the reader dies before another GET STATUS.
    fn remember(&self, status: &[u8]) {
        match PsamStatus::decode(status) {
            Ok(s) if s.security_card_id == self.id => {
                *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = s;
            }
            _ => {
                tracing::warn!(reader = %self.reader, answer = %hex::encode_upper(status), "status in the answer does not decode; next GET STATUS refreshes it")
            }
        }
    }

    /// Whether a debit command answers the draw it was issued for.
    fn answers_draw(&self, a: &DebitAuthorization, draw: &DrawData, today: Date) -> bool {
        let c = &a.command;
        c.security_card_id == self.id
            && c.card_id == draw.init.card_id
            && c.atc == draw.init.atc
            && c.amount == draw.amount.minor
            && c.currency == draw.amount.currency
            && c.date == today
            && self
                .seen_counter
                .is_none_or(|seen| c.security_card_txn > seen)
    }
}

impl SecurityCardDevice for PcscSecurityCard {
    fn id(&self) -> u64 {
        self.id
    }

    fn issue_debit(
        &mut self,
        atr: &[u8],
        draw: &DrawData,
        today: Date,
        early_release: bool,
    ) -> Result<DebitAuthorization, SecurityCardError> {
        self.recover_orphans()?;
        let Some(init) = commands::initialize(draw, today, early_release) else {
            return Err(SecurityCardError::Terminal(
                "the draw's merchant or transaction id is too long for INITIALIZE".into(),
            ));
        };
        // From here an answer lost with the reader may leave a numbered transaction.
        self.recover = true;
        let mut out = self.run(vec![commands::card_atr(atr), init])?;
        let (atr_answer, init_answer) = (out.remove(0), out.remove(0));
        if atr_answer.sw == StatusWord::BAD_DATA {
            self.recover = false;
            return Err(SecurityCardError::BadCardData);
        }
        self.outcome(atr_answer)?;
        let data = match self.outcome(init_answer) {
            Ok(d) => d,
            Err(SecurityCardError::Terminal(e)) => return Err(SecurityCardError::Terminal(e)),
            Err(refused) => {
                // Refused: the card numbered nothing.
                self.recover = false;
                return Err(refused);
            }
        };
        let auth = commands::decode_authorization(&data, early_release)
            .ok()
            .filter(|a| self.answers_draw(a, draw, today))
            .ok_or_else(|| {
                self.failed(&format!(
                    "INITIALIZE answered a debit command that does not answer the draw: {}",
                    hex::encode_upper(&data)
                ))
            })?;
        self.seen_counter = Some(auth.command.security_card_txn);
        self.recover = false;
        // The summary journaled with this transaction must already count it, even if the
        // next GET STATUS fails (an older one would make it look unjournaled).
        {
            let mut last = self.last_status.lock().unwrap_or_else(|p| p.into_inner());
            last.txn_counter = auth.command.security_card_txn;
            if early_release {
                let t = last.totals.entry(draw.amount.currency).or_default();
                t.count += 1;
                t.amount += draw.amount.minor;
            }
        }
        Ok(auth)
    }

    fn complete(
        &mut self,
        security_card_txn: u32,
        resp: &DebitResponse,
    ) -> Result<(), SecurityCardError> {
        self.recover_orphans()?;
        let after = self.command(commands::debit_response(security_card_txn, resp))?;
        self.remember(&after);
        Ok(())
    }

    fn reverse(&mut self, security_card_txn: u32) -> Result<(), SecurityCardError> {
        self.recover_orphans()?;
        let after = self.command(commands::reverse(security_card_txn))?;
        self.remember(&after);
        Ok(())
    }

    fn verify_not_debited(
        &self,
        security_card_txn: u32,
        proof: &PurchaseInit,
    ) -> Result<(), SecurityCardError> {
        self.command(commands::verify_not_debited(security_card_txn, proof))
            .map(|_| ())
    }

    fn issue_credit(
        &mut self,
        atr: &[u8],
        credit: &DrawData,
        today: Date,
    ) -> Result<CreditCommand, SecurityCardError> {
        self.recover_orphans()?;
        let Some(init) = commands::initialize_credit(credit, today) else {
            return Err(SecurityCardError::Terminal(
                "the refund's merchant or transaction id is too long for INITIALIZE CREDIT".into(),
            ));
        };
        let mut out = self.run(vec![commands::card_atr(atr), init])?;
        let (atr_answer, init_answer) = (out.remove(0), out.remove(0));
        if atr_answer.sw == StatusWord::BAD_DATA {
            return Err(SecurityCardError::BadCardData);
        }
        self.outcome(atr_answer)?;
        let data = self.outcome(init_answer)?;
        let command = CreditCommand::decode(&data)
            .ok()
            .filter(|c| {
                c.0.card_id == credit.init.card_id
                    && c.0.amount == credit.amount.minor
                    && c.0.security_card_id == self.id
            })
            .ok_or_else(|| {
                self.failed(&format!(
                    "INITIALIZE CREDIT answered a credit command that does not answer the refund: {}",
                    hex::encode_upper(&data)
                ))
            })?;
        self.seen_counter = Some(command.0.security_card_txn);
        {
            let mut last = self.last_status.lock().unwrap_or_else(|p| p.into_inner());
            last.txn_counter = command.0.security_card_txn;
            let t = last.totals.entry(credit.amount.currency).or_default();
            t.amount = t.amount.saturating_sub(credit.amount.minor);
        }
        Ok(command)
    }

    fn complete_credit(
        &mut self,
        security_card_txn: u32,
        resp: &CreditResponse,
    ) -> Result<(), SecurityCardError> {
        self.recover_orphans()?;
        let after = self.command(commands::credit_response(security_card_txn, resp))?;
        self.remember(&after);
        Ok(())
    }

    fn resolve_credit(
        &mut self,
        security_card_txn: u32,
        later: &PurchaseInit,
    ) -> Result<bool, SecurityCardError> {
        self.recover_orphans()?;
        let answer = self.command(commands::resolve_credit(security_card_txn, later))?;
        let Some((&credited, after)) = answer.split_first().filter(|(f, _)| **f <= 1) else {
            return Err(self.failed(&format!(
                "RESOLVE CREDIT answered {}",
                hex::encode_upper(&answer)
            )));
        };
        self.remember(after);
        Ok(credited == 1)
    }

    fn forget(&mut self, security_card_txn: u32) -> bool {
        match self.command(commands::forget(security_card_txn)) {
            Ok(d) => d == [1],
            Err(e) => {
                tracing::warn!(reader = %self.reader, error = %e, "FORGET failed; the card keeps the record");
                false
            }
        }
    }

    fn purge_settled_except(&mut self, open: &[u32]) -> usize {
        let blocks = commands::purge_settled(open);
        let answered = self.run(blocks).and_then(|mut rs| {
            let last = rs.pop().ok_or_else(|| self.failed("no answer"))?;
            for r in rs {
                self.outcome(r)?;
            }
            self.outcome(last)
        });
        match answered {
            Ok(d) if d.len() == 4 => u32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize,
            Ok(d) => {
                tracing::warn!(reader = %self.reader, answer = %hex::encode_upper(d), "PURGE SETTLED answer malformed");
                0
            }
            Err(e) => {
                tracing::warn!(reader = %self.reader, error = %e, "PURGE SETTLED failed");
                0
            }
        }
    }

    fn set_hotlist(&mut self, hotlist: &Hotlist) {
        // One block per command script: a long list is many blocks, each within the timeout.
        let answered = commands::load_hotlist(hotlist)
            .into_iter()
            .try_for_each(|block| self.command(block).map(|_| ()));
        if let Err(e) = answered {
            tracing::error!(reader = %self.reader, version = hotlist.version, error = %e, "LOAD HOTLIST failed; the terminal keeps its older list");
        }
    }

    fn totals(&self) -> BTreeMap<Currency, Totals> {
        self.status_or_last().totals
    }

    /// The card's summary (GET STATUS), as a [`SecurityCard`] with no transactions: what
    /// `headend status` and reconciliation read from the slot's journal entry.
    fn snapshot(&self) -> Vec<u8> {
        let s = self.status_or_last();
        journal::encode(&SecurityCard::summary(
            s.security_card_id,
            s.txn_counter,
            s.totals,
        ))
    }

    /// Rolls back to a journaled summary: every transaction numbered after it is reversed
    /// in the card (now, or when the reader answers again).
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        let s: SecurityCard = journal::decode(snapshot)?;
        if s.id != self.id {
            return Err(format!(
                "the journal's security card for this terminal is {:#X}, the config names {:#X}",
                s.id, self.id
            ));
        }
        self.seen_counter = Some(s.txn_counter);
        // Until the card answers, the summary journaled is the journal's own.
        {
            let mut last = self.last_status.lock().unwrap_or_else(|p| p.into_inner());
            if last.txn_counter <= s.txn_counter {
                last.txn_counter = s.txn_counter;
                last.totals = s.totals.clone();
            }
        }
        self.recover = true;
        if let Err(e) = self.recover_orphans() {
            tracing::error!(reader = %self.reader, error = %e, "security card not reachable; its unjournaled transactions are reversed when it answers");
        }
        Ok(())
    }

    fn probe(&mut self) -> Result<(), SecurityCardError> {
        PcscSecurityCard::probe(self)
    }

    /// Reverses exactly the transaction never journaled (now, or when the card answers).
    fn undo_issue(&mut self, _before: &[u8], security_card_txn: u32) {
        self.seen_counter = Some(security_card_txn.saturating_sub(1));
        self.recover = true;
        if let Err(e) = self.recover_orphans() {
            tracing::error!(reader = %self.reader, security_card_txn, error = %e, "unjournaled transaction not yet reversed in the card; done when it answers");
        }
    }
}

/// The terminal thread: connects (and SELECTs the PSAM) on demand, runs each job in one
/// PC/SC transaction, and drops the session on any reader error so the next job connects
/// again.
fn worker(reader: String, id: u64, jobs: std_mpsc::Receiver<Job>, timeout: Duration) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(reader, error = %e, "terminal thread cannot start its runtime");
            return;
        }
    };
    let driver = reader_drivers::pcsc::PcscDriver::new()
        .with_transmit_timeout(timeout)
        .with_connect_timeout(timeout);
    let mut session: Option<Box<dyn CardSession>> = None;
    while let Ok(job) = jobs.recv() {
        let out = rt.block_on(async {
            if session.is_none() {
                let (mut s, _atr) = driver.connect(&reader).await.map_err(|e| e.to_string())?;
                let sel = reader_drivers::transmit_whole(s.as_mut(), &commands::select())
                    .await
                    .map_err(|e| e.to_string())?;
                if Response::parse(&sel).map(|r| r.sw) != Ok(StatusWord::OK) {
                    return Err(format!(
                        "the card in the reader is not a Purselink security card (SELECT of the \
                         PSAM application answered {})",
                        hex::encode_upper(&sel)
                    ));
                }
                // Whatever card is in the reader now must be this terminal's before anything
                // is sent to it (a card swapped while the reader was away).
                let st = reader_drivers::transmit_whole(s.as_mut(), &commands::get_status())
                    .await
                    .map_err(|e| e.to_string())?;
                let found = Response::parse(&st)
                    .ok()
                    .filter(|r| r.sw == StatusWord::OK)
                    .and_then(|r| PsamStatus::decode(&r.data).ok())
                    .map(|s| s.security_card_id);
                if found != Some(id) {
                    return Err(match found {
                        Some(other) => format!(
                            "the reader holds security card {other:#X}, the config names {id:#X} for this terminal"
                        ),
                        None => format!(
                            "the security card does not answer GET STATUS ({})",
                            hex::encode_upper(&st)
                        ),
                    });
                }
                session = Some(s);
            }
            let s = session.as_mut().expect("connected above");
            let r = script(s.as_mut(), &job.apdus).await;
            // A reader error, or a card that lost its selection (reset, or a card that
            // could not persist and started over): connect and SELECT again next time.
            let lost = r.as_ref().map_or(true, |rs| {
                rs.iter()
                    .any(|x| x.sw == StatusWord::WRONG_STATE || x.sw == StatusWord::APP_NOT_FOUND)
            });
            if lost {
                session = None;
            }
            r
        });
        let _ = job.reply.send(out);
    }
}

async fn script(s: &mut dyn CardSession, apdus: &[Vec<u8>]) -> Result<Vec<Response>, String> {
    let reset = s.begin_transaction().await.map_err(|e| e.to_string())?;
    if reset {
        let _ = s.end_transaction().await;
        return Err("the security card was reset by another program: its session is gone".into());
    }
    let mut out = Vec::with_capacity(apdus.len());
    let mut failed = None;
    for a in apdus {
        match reader_drivers::transmit_whole(s, a).await {
            Ok(bytes) => match Response::parse(&bytes) {
                Ok(r) => out.push(r),
                Err(e) => {
                    failed = Some(format!("answer without a status word ({e})"));
                    break;
                }
            },
            Err(e) => {
                failed = Some(e.to_string());
                break;
            }
        }
    }
    let _ = s.end_transaction().await;
    match failed {
        Some(e) => Err(e),
        None => Ok(out),
    }
}
