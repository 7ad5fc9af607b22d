//! The load server (001 load server 862) with its host security module (HSM 864), and the
//! pre-funded accounts of the second load embodiment ([0141]–[0160]).
//!
//! - Load request: a syntax check, a journal entry, then the HSM verifies S1 and issues S2
//!   and the load command ([0137]–[0138]). A refused request is journaled as refused for
//!   good — its transaction id can never be authorized later — and answered with a sealed
//!   no-load confirmation so the funder can release its hold.
//! - Load response: the HSM verifies S3 ([0128]); a negative result (or no response: the
//!   card was pulled) runs the zero-value procedure of [0129]–[0132] on the fresh S1. The
//!   answer is a confirmation sealed under a key shared with the bank, so only the bank can
//!   read it ([0133]); the gateway relays it.
//! - Pre-funded accounts: vouchers held here, with the same hold / capture / release
//!   discipline as the bank ([`crate::funds::Funds`] on this server's journal).
//!
//! The HSM is [`proto::hsm::Hsm`] (software) behind the [`SecurityModule`] seam, snapshotted
//! into the journal in the same SQLite transaction as each load record, so a load server
//! killed between S2 and S3 comes back knowing the load command it issued.

pub mod step;
pub mod token;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use step::LoadStep;

use proto::crypto;
use proto::hsm::{Hsm, HsmError, LoadVerdict, NegativeVerdict};
use proto::messages::*;
use proto::money::Money;
use proto::purse::{Date, LoadCommand, LoadInit, LoadResponse};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::config::{HeadendConfig, read_key_file, read_master_key};
use crate::funds::{Account, Funds, FundsSpec, confirmation_key};
use crate::journal::{self, Journal, Kind};
use crate::quic::BoxFuture;
use crate::role::{Caller, Role};
use crate::role::{journal_failed, refuse, repeat};

/// The seam for a hardware HSM: the three operations the load server needs. The software
/// [`Hsm`] implements it; a PKCS#11 or network HSM would too.
pub trait SecurityModule: Send {
    fn id(&self) -> u64;
    fn authorize(
        &mut self,
        txid: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
    ) -> Result<LoadCommand, HsmError>;
    /// A bank load with the card's passbook ([`Hsm::authorize_with_passbook`]).
    fn authorize_with_passbook(
        &mut self,
        txid: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
        passbook: &[proto::purse::LogRecord],
    ) -> Result<LoadCommand, HsmError>;
    fn confirm(&mut self, txid: &str, resp: &LoadResponse) -> Result<LoadVerdict, HsmError>;
    /// An unload (issue 17): S1 of INITIALIZE FOR UNLOAD verified, the unload command
    /// ([`Hsm::authorize_unload`]).
    fn authorize_unload(
        &mut self,
        txid: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
    ) -> Result<LoadCommand, HsmError>;
    /// S3 of the card's answer to UNLOAD ([`Hsm::confirm_unload`]).
    fn confirm_unload(&mut self, txid: &str, resp: &LoadResponse) -> Result<LoadVerdict, HsmError>;
    /// The negative-result procedure in reverse ([`Hsm::resolve_unload_negative`]).
    fn resolve_unload_negative(
        &mut self,
        txid: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError>;
    fn resolve_negative(
        &mut self,
        txid: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError>;
    /// An open load or unload settled from the card's INITIALIZE of a later session
    /// ([`Hsm::resolve_from_later`]): whether it is an unload, and the verdict.
    fn resolve_from_later(
        &mut self,
        txid: &str,
        later: &LoadInit,
        later_is_unload: bool,
    ) -> Result<(bool, NegativeVerdict), HsmError>;
    /// The module's state for the journal (a hardware HSM keeps its own: empty).
    /// Drops a settled load from the module's working set (the load record answers repeats).
    fn forget(&mut self, txid: &str);
    /// Loads the issuer's hotlist (an older version than the module holds is ignored).
    fn set_hotlist(&mut self, hotlist: &proto::hotlist::Hotlist);
    fn snapshot(&self) -> Vec<u8>;
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String>;
    /// The sealed key update for this load's card, if it is on an older key version
    /// ([`Hsm::key_update`]); none by default.
    fn key_update(&self, _init: &LoadInit) -> Option<Vec<u8>> {
        None
    }
    /// The sealed UNBLOCK for this load's card ([`Hsm::unblock`]); none by default.
    fn unblock(&self, _init: &LoadInit) -> Option<Vec<u8>> {
        None
    }
    /// The current application key sealed for this load's card ([`Hsm::app_key_push`]);
    /// none by default.
    fn app_key_push(&self, _init: &LoadInit) -> Option<Vec<u8>> {
        None
    }
}

impl SecurityModule for Hsm {
    fn id(&self) -> u64 {
        self.id
    }
    fn authorize(
        &mut self,
        txid: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
    ) -> Result<LoadCommand, HsmError> {
        Hsm::authorize(self, txid, init, amount, today)
    }
    fn authorize_with_passbook(
        &mut self,
        txid: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
        passbook: &[proto::purse::LogRecord],
    ) -> Result<LoadCommand, HsmError> {
        Hsm::authorize_with_passbook(self, txid, init, amount, today, passbook)
    }
    fn confirm(&mut self, txid: &str, resp: &LoadResponse) -> Result<LoadVerdict, HsmError> {
        Hsm::confirm(self, txid, resp)
    }
    fn resolve_negative(
        &mut self,
        txid: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError> {
        Hsm::resolve_negative(self, txid, zero)
    }
    fn authorize_unload(
        &mut self,
        txid: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
    ) -> Result<LoadCommand, HsmError> {
        Hsm::authorize_unload(self, txid, init, amount, today)
    }
    fn confirm_unload(&mut self, txid: &str, resp: &LoadResponse) -> Result<LoadVerdict, HsmError> {
        Hsm::confirm_unload(self, txid, resp)
    }
    fn resolve_unload_negative(
        &mut self,
        txid: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError> {
        Hsm::resolve_unload_negative(self, txid, zero)
    }
    fn resolve_from_later(
        &mut self,
        txid: &str,
        later: &LoadInit,
        later_is_unload: bool,
    ) -> Result<(bool, NegativeVerdict), HsmError> {
        Hsm::resolve_from_later(self, txid, later, later_is_unload)
    }
    fn forget(&mut self, txid: &str) {
        Hsm::forget(self, txid);
    }
    fn set_hotlist(&mut self, hotlist: &proto::hotlist::Hotlist) {
        Hsm::set_hotlist(self, hotlist);
    }
    fn snapshot(&self) -> Vec<u8> {
        journal::encode(self)
    }
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), String> {
        self.restore_state(journal::decode(snapshot)?);
        Ok(())
    }
    fn key_update(&self, init: &LoadInit) -> Option<Vec<u8>> {
        Hsm::key_update(self, init)
    }
    fn unblock(&self, init: &LoadInit) -> Option<Vec<u8>> {
        Hsm::unblock(self, init)
    }
    fn app_key_push(&self, init: &LoadInit) -> Option<Vec<u8>> {
        Hsm::app_key_push(self, init)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadState {
    /// S2 issued; the card's answer is awaited.
    Authorized,
    /// Negative result code; the zero-value S1 is awaited.
    NegativePending,
    Loaded,
    NotLoaded,
    /// Refused before any S2: never authorized, and never will be under this id.
    Refused,
}

/// The load server's record of one load (journal kind `load`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadRec {
    pub transaction_id: String,
    pub amount: Money,
    pub card_id: u64,
    /// The load request as received, to tell a retry from another request.
    pub request: Vec<u8>,
    pub state: LoadState,
    /// The load command, or the refusal.
    pub answer: Message,
    pub verdict: Option<String>,
    pub confirmation: Option<Message>,
    /// The load response (postcard) that produced the confirmation: a repeat must be it.
    pub response: Option<Vec<u8>>,
}

pub struct LoadServer {
    hsm: tokio::sync::Mutex<Box<dyn SecurityModule>>,
    journal: Arc<Journal>,
    confirmation_key: proto::crypto::DesKey,
    /// Pre-funded accounts.
    pub prefunded: Funds,
    /// `[load] unblock_with_bank_loads`: bank loads carry the issuer's UNBLOCK.
    unblock_with_bank_loads: bool,
    /// Per card, its loads and unloads authorised and not settled (from the journal at
    /// start, then kept): the card's next load or unload request settles them first
    /// ([`LoadServer::settle_open_sessions`]).
    open_by_card: std::sync::Mutex<HashMap<u64, BTreeSet<String>>>,
}

fn hsm_code(e: &HsmError) -> ErrorCode {
    match e {
        HsmError::BadS1 | HsmError::BadS3 | HsmError::UnknownKeyVersion { .. } => {
            ErrorCode::BadSignature
        }
        HsmError::WrongCurrency { .. } => ErrorCode::WrongCurrency,
        HsmError::Expired => ErrorCode::Expired,
        HsmError::OverMaxBalance { .. } => ErrorCode::OverMaxBalance,
        HsmError::InsufficientValue { .. } => ErrorCode::InsufficientValue,
        HsmError::PassbookMismatch => ErrorCode::BadSignature,
        HsmError::ProofUnavailable => ErrorCode::InDoubt,
        HsmError::SessionUsed { .. } => ErrorCode::Replay,
        HsmError::AmountMismatch { .. } | HsmError::ResponseMismatch => ErrorCode::AmountMismatch,
        HsmError::ZeroAmount | HsmError::BadZeroValueRequest => ErrorCode::Malformed,
        HsmError::UnknownTransaction(_) => ErrorCode::UnknownTransaction,
        HsmError::DuplicateTransaction(_) => ErrorCode::Replay,
        HsmError::WrongState(_) => ErrorCode::Replay,
        HsmError::NoKey => ErrorCode::Internal,
        HsmError::StaleProof => ErrorCode::ProofRejected,
        HsmError::Hotlisted { .. } => ErrorCode::CardHotlisted,
        HsmError::KeyStore(_) => ErrorCode::Internal,
    }
}

/// What a confirmation is about; `loaded` and `basis` to be filled in.
fn subject(txid: &str, amount: Money, card_id: u64, hsm_id: u64) -> LoadConfirmationBody {
    LoadConfirmationBody {
        transaction_id: txid.into(),
        loaded: false,
        amount,
        card_id,
        hsm_id,
        basis: String::new(),
        passbook: Vec::new(),
    }
}

impl LoadServer {
    pub fn open(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        let s = cfg.load.as_ref().ok_or("no [load] section")?;
        let store: Arc<dyn proto::hsm::LoadKeyStore> = match (&s.load_keys, &s.token) {
            (Some(path), None) => {
                Arc::new(read_master_key("[load] load_keys", path).map_err(|e| e.to_string())?)
            }
            (None, Some(def)) => Arc::new(token::TokenLoadKeys::open(def)?),
            _ => {
                return Err(
                    "[load]: give `load_keys` (a key file) or `token` (a PKCS#11 token), one of them"
                        .into(),
                );
            }
        };
        let journal = Arc::new(
            Journal::open_target(&cfg.journal_target("load").map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?,
        );
        let mut soft = Hsm::with_key_store(s.hsm_id, store);
        if let Some(p) = &s.rekey_purchase_keys {
            soft = soft.with_rekey(
                read_master_key("[load] rekey_purchase_keys", p).map_err(|e| e.to_string())?,
            );
        }
        match (&s.app_key_file, s.app_epoch) {
            (Some(p), Some(epoch)) => {
                let master = read_key_file("[load] app_key_file", p).map_err(|e| e.to_string())?;
                soft = soft.with_app_key(&master, epoch);
            }
            (None, None) => {}
            _ => return Err("[load]: `app_key_file` and `app_epoch` go together".into()),
        }
        let mut hsm: Box<dyn SecurityModule> = Box::new(soft);
        if let Some(snap) = journal.get(Kind::Hsm, "0").map_err(|e| e.to_string())? {
            hsm.restore(&snap)?;
            tracing::info!("HSM state restored from the journal");
        }
        if let Some(list) = crate::hotlist::held_at_start(cfg, &journal)? {
            hsm.set_hotlist(&list);
        }
        let key = read_key_file("[load] confirmation_key_file", &s.confirmation_key_file)
            .map_err(|e| e.to_string())?;
        let accounts = cfg
            .all_vouchers()
            .map_err(|e| e.to_string())?
            .iter()
            .map(|v| Account {
                // Known by its reference: the code itself is kept nowhere but the config.
                id: proto::messages::voucher_ref(&v.code),
                box_id: v.box_id.clone(),
                card_id: None,
                currency: v.currency(),
                opening_balance: v.amount,
                balance: v.amount,
                held: 0,
                pvv: None,
                wrong_pins: 0,
                locked: false,
                day: None,
                used_today: 0,
            })
            .collect();
        let spec = FundsSpec {
            who: "load server",
            confirmation_key: key.clone(),
            pin_master: None,
            pin_tries: u8::MAX,
            daily_limit: s.daily_limit,
            float_account: s.float_account.clone(),
            offer_lifetime_secs: s.offer_lifetime_secs,
            funder: crate::gateway::load::LOAD,
            clearing: s.clearing.clone(),
        };
        let prefunded = Funds::open(spec, journal.clone(), accounts)?;
        let mut open_by_card: HashMap<u64, BTreeSet<String>> = HashMap::new();
        for (txid, b) in journal.all(Kind::Load).map_err(|e| e.to_string())? {
            let r: LoadRec = journal::decode(&b)?;
            if matches!(r.state, LoadState::Authorized | LoadState::NegativePending) {
                tracing::info!(txid, state = ?r.state, "in-doubt load after restart: awaiting the load response, the zero-value S1, or the card's next request");
                open_by_card.entry(r.card_id).or_default().insert(txid);
            }
        }
        Ok(Arc::new(Self {
            hsm: tokio::sync::Mutex::new(hsm),
            journal,
            confirmation_key: key,
            prefunded,
            unblock_with_bank_loads: s.unblock_with_bank_loads,
            open_by_card: std::sync::Mutex::new(open_by_card),
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn record(&self, txid: &str) -> Option<LoadRec> {
        journal::decode(&self.journal.get(Kind::Load, txid).ok()??).ok()
    }

    /// Loads the HSM settled as loaded, per currency (count and amount from its totals).
    /// Gives the HSM the issuer's hotlist ([`crate::hotlist::run_refresh`]).
    pub async fn apply_hotlist(&self, list: proto::hotlist::Hotlist) {
        self.hsm.lock().await.set_hotlist(&list);
    }

    pub async fn hsm_loaded(&self, currency: proto::money::Currency) -> u64 {
        let snap = self.hsm.lock().await.snapshot();
        journal::decode::<Hsm>(&snap)
            .map(|h| h.total(currency).amount)
            .unwrap_or(0)
    }

    /// Seals `body` for the funder.
    fn confirmation(
        &self,
        body: LoadConfirmationBody,
        new_balance: Option<u64>,
    ) -> LoadConfirmation {
        let (txid, loaded) = (body.transaction_id.clone(), body.loaded);
        let sealed = crypto::seal(
            &confirmation_key(&self.confirmation_key, &txid),
            &journal::encode(&body),
            &mut OsRng,
        );
        LoadConfirmation {
            transaction_id: txid,
            loaded,
            new_balance,
            sealed,
        }
    }

    /// Journals a refusal for good and answers with it and a sealed no-load confirmation.
    /// `subject` names the load (its `loaded` and `basis` are filled in here).
    fn refuse_for_good(
        &self,
        req_raw: Vec<u8>,
        subject: LoadConfirmationBody,
        code: ErrorCode,
        reason: String,
    ) -> Message {
        let txid = subject.transaction_id.clone();
        let txid = txid.as_str();
        let (amount, card_id) = (subject.amount, subject.card_id);
        tracing::warn!(txid, ?code, %reason, "load request refused");
        let error = ErrorMsg {
            code,
            reason: reason.clone(),
            transaction_id: Some(txid.into()),
        };
        let conf = self.confirmation(
            LoadConfirmationBody {
                loaded: false,
                basis: format!("never authorized: {reason}"),
                ..subject
            },
            None,
        );
        let answer = Message::LoadRefused(LoadRefusal {
            error,
            confirmation: conf.clone(),
        });
        let rec = LoadRec {
            transaction_id: txid.into(),
            amount,
            card_id,
            request: req_raw,
            state: LoadState::Refused,
            answer: answer.clone(),
            verdict: Some(reason),
            confirmation: Some(Message::LoadConfirmation(conf)),
            response: None,
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Load, txid, &journal::encode(&rec))?;
            b.step(txid, &LoadStep::LoadRequestRefused, &format!("{code:?}"))
        }) {
            return journal_failed(e, Some(txid));
        }
        answer
    }

    /// A load request with its funder's hold (001 [0137]–[0138]): the hold must carry the
    /// funder's MAC and be for exactly this transaction, amount and card — the load server
    /// never authorises more than the funder holds.
    async fn load_request(&self, req: LoadRequest, hold: HoldPlaced) -> Message {
        let txid = req.transaction_id.clone();
        // An unload's hold is MACed as one: a load's never authorises an unload, nor the
        // other way.
        let unload = req.source.is_unload();
        if !crate::funds::hold_verifies(&self.confirmation_key, &hold, unload) {
            return refuse(
                ErrorCode::Forbidden,
                "the hold does not carry its funder's MAC; nothing authorised",
                Some(&txid),
            );
        }
        if hold.transaction_id != txid
            || hold.amount != req.amount
            || hold.card_id != req.init.card_id
        {
            return refuse(
                ErrorCode::AmountMismatch,
                format!(
                    "the load request ({} card {:X}) is not what the funder holds ({} card {:X} for {})",
                    req.amount, req.init.card_id, hold.amount, hold.card_id, hold.transaction_id
                ),
                Some(&txid),
            );
        }
        // Syntax check ([0137]).
        if txid.is_empty() || txid.len() > 64 {
            return refuse(
                ErrorCode::Malformed,
                "transaction id must be 1 to 64 characters",
                Some(&txid),
            );
        }
        let raw = journal::encode(&req);
        let mut hsm = self.hsm.lock().await;
        if let Some(prev) = self.record(&txid) {
            return if prev.request == raw {
                tracing::info!(txid, "retried load request: same answer");
                prev.answer
            } else {
                refuse(
                    ErrorCode::Replay,
                    "transaction id already used for another load request",
                    Some(&txid),
                )
            };
        }
        if let Err(e) = self.journal.step(
            &txid,
            &LoadStep::LoadRequestReceived,
            &format!("card {:X} {}", req.init.card_id, req.amount),
        ) {
            return journal_failed(e, Some(&txid));
        }
        let hsm_id = hsm.id();
        self.settle_open_sessions(&mut hsm, &req.init, unload, &txid);
        let before = hsm.snapshot();
        // Seed 004 PASSBOOK: a bank load carries the card's passbook (exactly what its S1
        // covers); nothing else does.
        let today = crate::payment::today();
        let authorized = match &req.source {
            LoadSource::Bank { .. } => {
                hsm.authorize_with_passbook(&txid, &req.init, req.amount, today, &req.passbook)
            }
            _ if !req.passbook.is_empty() => {
                return refuse(
                    ErrorCode::Malformed,
                    "a passbook rides with a bank load only",
                    Some(&txid),
                );
            }
            LoadSource::Unload { .. } => hsm.authorize_unload(&txid, &req.init, req.amount, today),
            LoadSource::Voucher { .. } => hsm.authorize(&txid, &req.init, req.amount, today),
        };
        let cmd = match authorized {
            Ok(c) => c,
            // The token failed: nothing was decided, the request may come again.
            Err(e @ HsmError::KeyStore(_)) => {
                return refuse(
                    ErrorCode::Internal,
                    format!("host security module: {e}"),
                    Some(&txid),
                );
            }
            Err(e) => {
                return self.refuse_for_good(
                    raw,
                    subject(&txid, req.amount, req.init.card_id, hsm_id),
                    hsm_code(&e),
                    format!("host security module: {e}"),
                );
            }
        };
        let answer = Message::LoadCommand(LoadCommandMsg {
            transaction_id: txid.clone(),
            // Key updates and UNBLOCK ride with a LOAD only.
            key_update: (!unload).then(|| hsm.key_update(&req.init)).flatten(),
            // Seed 004: the issuer unblocks a card (its bad-signature lock, its PIN's
            // tries) only inside a bank load — the cardholder proved the account's PIN.
            unblock: (self.unblock_with_bank_loads
                && matches!(req.source, LoadSource::Bank { .. }))
            .then(|| hsm.unblock(&req.init))
            .flatten(),
            // Seed 004 FIG. 5: keys come down from the bank, so a bank load brings the
            // current application key.
            app_key: matches!(req.source, LoadSource::Bank { .. })
                .then(|| hsm.app_key_push(&req.init))
                .flatten(),
            command: cmd,
        });
        let rec = LoadRec {
            transaction_id: txid.clone(),
            amount: req.amount,
            card_id: req.init.card_id,
            request: raw,
            state: LoadState::Authorized,
            answer: answer.clone(),
            verdict: None,
            confirmation: None,
            response: None,
        };
        let snap = hsm.snapshot();
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Hsm, "0", &snap)?;
            b.put(Kind::Load, &txid, &journal::encode(&rec))?;
            b.step(&txid, &LoadStep::S1VerifiedLoadCommandIssued, "")
        }) {
            let _ = hsm.restore(&before); // not journaled means not done
            return journal_failed(e, Some(&txid));
        }
        self.open_by_card
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(req.init.card_id)
            .or_default()
            .insert(txid.clone());
        tracing::info!(txid, amount = %req.amount, card = format!("{:X}", req.init.card_id), "S1 verified: load command issued");
        answer
    }

    /// Settles the card's open loads and unloads at this HSM from the INITIALIZE of its new
    /// request `txid` (`later`, an unload's when `unload`), before that is authorised (the
    /// second outside attack on issue 17, U1): the card's list of the sessions it ran, under
    /// the new S1, says whether each open one ran ([`Hsm::resolve_from_later`]) — loaded or
    /// not, sealed for its funder like any confirmation, which the gateway's sweep delivers.
    /// Without this a card could run more sessions elsewhere than its list keeps, and an
    /// open session's hold could never be proved either way. One that cannot be settled so
    /// (the new S1 does not verify, a stale INITIALIZE) stays open as before.
    fn settle_open_sessions(
        &self,
        hsm: &mut Box<dyn SecurityModule>,
        later: &LoadInit,
        unload: bool,
        txid: &str,
    ) {
        let open: Vec<String> = self
            .open_by_card
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&later.card_id)
            .map(|s| s.iter().filter(|t| *t != txid).cloned().collect())
            .unwrap_or_default();
        for t in open {
            let Some(rec) = self
                .record(&t)
                .filter(|r| matches!(r.state, LoadState::Authorized | LoadState::NegativePending))
            else {
                self.closed(later.card_id, &t);
                continue;
            };
            let before = hsm.snapshot();
            match hsm.resolve_from_later(&t, later, unload) {
                Ok((was_unload, v)) => {
                    let basis = format!(
                        "settled from the card's next {} request {txid}: {v:?}",
                        if unload { "unload" } else { "load" }
                    );
                    tracing::info!(
                        txid = t,
                        unload = was_unload,
                        loaded = v.loaded(),
                        by = txid,
                        "open session settled from the card's next request"
                    );
                    let _ = self.seal_verdict(hsm, rec, (v.loaded(), basis), None, None, &before);
                }
                Err(e) => {
                    let _ = hsm.restore(&before);
                    tracing::warn!(txid = t, by = txid, error = %e, "open session not settled from the card's next request");
                }
            }
        }
    }

    /// `txid` of `card_id` is settled: no longer open.
    fn closed(&self, card_id: u64, txid: &str) {
        let mut m = self.open_by_card.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = m.get_mut(&card_id) {
            s.remove(txid);
            if s.is_empty() {
                m.remove(&card_id);
            }
        }
    }

    async fn load_response(&self, msg: LoadResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let mut hsm = self.hsm.lock().await;
        let hsm_id = hsm.id();
        let Some(mut rec) = self.record(&txid) else {
            // No load request ever reached the HSM under this id (the load server was
            // unreachable): record it as refused so it can never be authorized, and
            // confirm the no-load so the hold is released.
            if msg.zero_value.is_some() && msg.response.is_none() {
                let card = msg.zero_value.as_ref().map(|z| z.card_id).unwrap_or(0);
                let currency = msg
                    .zero_value
                    .as_ref()
                    .map(|z| z.currency)
                    .unwrap_or(proto::money::Currency::EUR);
                return match self.refuse_for_good(
                    Vec::new(),
                    subject(&txid, Money::zero(currency), card, hsm_id),
                    ErrorCode::UnknownTransaction,
                    "no load request reached the load server".into(),
                ) {
                    Message::LoadRefused(r) => Message::LoadConfirmation(r.confirmation),
                    other => other,
                };
            }
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no load transaction {txid}"),
                Some(&txid),
            );
        };
        let raw = journal::encode(&msg);
        if let Some(c) = &rec.confirmation {
            // A repeat must be the response that produced the confirmation (a refusal for
            // good has none: any answer gets its no-load).
            return repeat(rec.response.as_ref(), &raw, c, "load response", &txid);
        }
        if let Err(e) = self.journal.step(
            &txid,
            &LoadStep::LoadResponseReceived,
            match (&msg.response, &msg.zero_value) {
                (Some(r), _) if r.is_loaded() => "S3, loaded",
                (Some(_), Some(_)) => "S3, negative result, zero-value S1",
                (Some(_), None) => "S3, negative result",
                (None, Some(_)) => {
                    "no load response (LOAD not run, or its answer lost), zero-value S1"
                }
                (None, None) => "empty",
            },
        ) {
            return journal_failed(e, Some(&txid));
        }
        let before = hsm.snapshot();
        let mut new_balance = None;
        let mut verdict: Option<(bool, String)> = None;
        let unload = is_unload(&rec);
        if let Some(resp) = &msg.response {
            let confirmed = if unload {
                hsm.confirm_unload(&txid, resp)
            } else {
                hsm.confirm(&txid, resp)
            };
            match confirmed {
                Ok(LoadVerdict::Loaded) => {
                    new_balance = Some(resp.new_balance);
                    verdict = Some((
                        true,
                        if unload {
                            "S3 verified: unloaded".into()
                        } else {
                            "S3 verified: loaded".into()
                        },
                    ));
                }
                Ok(LoadVerdict::NegativeNeedsProof) => {
                    rec.state = LoadState::NegativePending;
                }
                Err(e) => {
                    return refuse(hsm_code(&e), format!("load response: {e}"), Some(&txid));
                }
            }
        }
        if verdict.is_none() {
            let resolved = |hsm: &mut Box<dyn SecurityModule>, zero: &LoadInit| {
                if unload {
                    hsm.resolve_unload_negative(&txid, zero)
                } else {
                    hsm.resolve_negative(&txid, zero)
                }
            };
            match &msg.zero_value {
                Some(zero) => match resolved(&mut hsm, zero) {
                    Ok(v) => {
                        if !v.loaded() {
                            new_balance = Some(zero.balance);
                        }
                        verdict = Some((v.loaded(), format!("negative result: {v:?}")));
                    }
                    Err(e) => {
                        let _ = hsm.restore(&before);
                        return refuse(hsm_code(&e), format!("zero-value proof: {e}"), Some(&txid));
                    }
                },
                None => {
                    // Keep the negative result; the zero-value S1 must follow.
                    let snap = hsm.snapshot();
                    let _ = self.journal.atomically(|b| {
                        b.put(Kind::Hsm, "0", &snap)?;
                        b.put(Kind::Load, &txid, &journal::encode(&rec))?;
                        b.step(&txid, &LoadStep::NegativeResultZeroValueS1Awaited, "")
                    });
                    return refuse(
                        ErrorCode::Malformed,
                        if unload {
                            "negative result: send a zero-value INITIALIZE FOR UNLOAD (new S1) with it"
                        } else {
                            "negative result: send a zero-value INITIALIZE FOR LOAD (new S1) with it"
                        },
                        Some(&txid),
                    );
                }
            }
        }
        let verdict = verdict.expect("set above");
        self.seal_verdict(&mut hsm, rec, verdict, new_balance, Some(raw), &before)
    }

    /// Seals the funder's confirmation of `rec`'s verdict (`loaded`, and its basis), with
    /// the card's `new_balance` when known, and journals it with the HSM's state and the
    /// load `response` that decided it (a repeat must be it; `None`: any repeat gets it).
    /// On a failed journal write the HSM goes back to `before`.
    fn seal_verdict(
        &self,
        hsm: &mut Box<dyn SecurityModule>,
        mut rec: LoadRec,
        (loaded, basis): (bool, String),
        new_balance: Option<u64>,
        response: Option<Vec<u8>>,
        before: &[u8],
    ) -> Message {
        let txid = rec.transaction_id.clone();
        let hsm_id = hsm.id();
        // The passbook the HSM verified goes to the bank with a load that went through.
        let passbook = journal::decode::<LoadRequest>(&rec.request)
            .map(|r| r.passbook)
            .unwrap_or_default();
        let conf = self.confirmation(
            LoadConfirmationBody {
                loaded,
                basis: basis.clone(),
                passbook: if loaded { passbook } else { Vec::new() },
                ..subject(&txid, rec.amount, rec.card_id, hsm_id)
            },
            new_balance,
        );
        rec.state = if loaded {
            LoadState::Loaded
        } else {
            LoadState::NotLoaded
        };
        rec.verdict = Some(basis.clone());
        rec.confirmation = Some(Message::LoadConfirmation(conf.clone()));
        rec.response = response;
        hsm.forget(&txid);
        let snap = hsm.snapshot();
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Hsm, "0", &snap)?;
            b.put(Kind::Load, &txid, &journal::encode(&rec))?;
            b.step(&txid, &LoadStep::ConfirmationSealed, &basis)
        }) {
            let _ = hsm.restore(before);
            return journal_failed(e, Some(&txid));
        }
        self.closed(rec.card_id, &txid);
        tracing::info!(txid, loaded, %basis, "load confirmation sealed for the funder");
        Message::LoadConfirmation(conf)
    }
}

/// Whether a load record is an unload's (its request names [`LoadSource::Unload`]).
fn is_unload(rec: &LoadRec) -> bool {
    journal::decode::<LoadRequest>(&rec.request).is_ok_and(|r| r.source.is_unload())
}

impl LoadServer {
    /// The gateway's [`Message::LoadExpire`]: a load never authorised is refused for good
    /// and its sealed no-load returned (the funder releases the hold); one already settled
    /// returns its confirmation; one authorised and unresolved is `InDoubt` — the card may
    /// hold the value, so nothing is released blindly.
    async fn expire(&self, txid: String) -> Message {
        let _hsm = self.hsm.lock().await;
        let hsm_id = _hsm.id();
        match self.record(&txid) {
            None => match self.refuse_for_good(
                Vec::new(),
                subject(&txid, Money::zero(proto::money::Currency::EUR), 0, hsm_id),
                ErrorCode::OfferExpired,
                "the hold's lifetime ended before any load request reached the load server".into(),
            ) {
                Message::LoadRefused(r) => Message::LoadConfirmation(r.confirmation),
                other => other,
            },
            Some(rec) => match (&rec.confirmation, rec.state) {
                (Some(c), _) => c.clone(),
                (None, state) => refuse(
                    ErrorCode::InDoubt,
                    format!(
                        "load command issued ({state:?}): the card may hold the value; the hold waits for the box's proof"
                    ),
                    Some(&txid),
                ),
            },
        }
    }
}

impl Role for LoadServer {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            if let Caller::Box(b) = &caller {
                return refuse(
                    ErrorCode::NotYourAccount,
                    format!("box {b}: set-top boxes reach the load server through the gateway"),
                    None,
                );
            }
            match msg {
                Message::RoutedLoadRequest { request, hold } => {
                    let span = tracing::info_span!("load", txid = %request.transaction_id);
                    self.load_request(request, hold).instrument(span).await
                }
                Message::LoadRequest(r) => refuse(
                    ErrorCode::Forbidden,
                    "load requests reach the load server only through the gateway, with the funder's hold",
                    Some(&r.transaction_id),
                ),
                Message::LoadExpire { transaction_id } => {
                    let span = tracing::info_span!("load", txid = %transaction_id);
                    self.expire(transaction_id).instrument(span).await
                }
                Message::LoadResponse(r) => {
                    let span = tracing::info_span!("load", txid = %r.transaction_id);
                    self.load_response(r).instrument(span).await
                }
                // Pre-funded accounts: this server is the funder.
                Message::RoutedLoadOfferRequest { box_id, request } => {
                    let LoadSource::Voucher { code } = &request.source else {
                        return refuse(
                            ErrorCode::UnknownRoute,
                            "the load server holds pre-funded accounts, not bank accounts",
                            None,
                        );
                    };
                    let span = tracing::info_span!("load", %box_id);
                    // Only the code opens a voucher. Its reference names it in every later
                    // message, journal and log line, so it must not open one too: offered in
                    // place of a code it names no account (the same refusal as a wrong code,
                    // counted as a failed attempt).
                    let account = if code.expose().starts_with(VOUCHER_REF_PREFIX) {
                        String::new()
                    } else {
                        voucher_ref(code.expose())
                    };
                    self.prefunded
                        .offer(&box_id, &account, &request.card, false)
                        .instrument(span)
                        .await
                }
                Message::HoldRequest(r) => {
                    let span = tracing::info_span!("load", txid = %r.transaction_id);
                    self.prefunded.place_hold(r).instrument(span).await
                }
                Message::LoadConfirmation(c) => {
                    let span = tracing::info_span!("load", txid = %c.transaction_id);
                    self.prefunded.settle(c).instrument(span).await
                }
                other => refuse(
                    ErrorCode::Malformed,
                    format!("the load server does not take {}", other.kind()),
                    None,
                ),
            }
        })
    }
}
