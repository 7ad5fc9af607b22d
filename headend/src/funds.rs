//! What the bank and the load server share: the hold discipline of a funder (001 [0134]–
//! [0135], [0141]–[0157]). [`Funds`] keeps accounts, load offers, holds and the issuer float on
//! one journal, and places, captures and releases holds; the bank server
//! ([`crate::bank::BankServer`]) runs one for bank accounts (with a PIN), the load server
//! ([`crate::load::LoadServer`]) one for its pre-funded vouchers (no PIN).
//!
//! Also shared between a funder and the load server: the keys derived from the secret they
//! share — the per-transaction key a load confirmation is sealed under
//! ([`confirmation_key`]) and the MAC over a hold ([`hold_placed`], [`hold_verifies`]), so the
//! load server authorises no more than the funder held.

// A refusal is the answer message itself, built once per request: boxing it would buy
// nothing.
#![allow(clippy::result_large_err)]

pub mod step;

use step::FundsStep;

use std::collections::BTreeMap;
use std::sync::Arc;

use proto::clearing::{LoadAdvice, day_text};
use proto::crypto::{self, DesKey};
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::{Date, PurseInfo};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::bank::{box_pin_key, now_secs, pin_verification_value};
use crate::journal::{self, Journal, Kind};
use crate::outbox::Outbox;
use crate::role::{journal_failed, refuse, repeat};

/// The per-transaction key a load confirmation is sealed under.
pub fn confirmation_key(shared: &DesKey, txid: &str) -> DesKey {
    shared.derive(b"PURSELINK LOAD CONFIRMATION", txid.as_bytes())
}

/// The per-transaction key a funder MACs its hold under ([`HoldPlaced::mac`]), derived from
/// the key it shares with the load server.
pub fn hold_key(shared: &DesKey, txid: &str) -> DesKey {
    shared.derive(b"PURSELINK LOAD HOLD", txid.as_bytes())
}

/// The funder's hold as the load server receives it: MACed so nobody on the way can change
/// the amount, the card, the transaction or its direction (`unload`).
pub fn hold_placed(
    shared: &DesKey,
    txid: &str,
    amount: Money,
    card_id: u64,
    unload: bool,
) -> HoldPlaced {
    let mac = crypto::sign(
        &hold_key(shared, txid),
        b"HOLD",
        &HoldPlaced::mac_fields(txid, amount, card_id, unload),
    );
    HoldPlaced {
        transaction_id: txid.into(),
        amount,
        card_id,
        mac,
    }
}

/// Whether `hold` carries its funder's MAC under `shared` for a load (`unload` false) or an
/// unload (see [`hold_placed`]).
pub fn hold_verifies(shared: &DesKey, hold: &HoldPlaced, unload: bool) -> bool {
    crypto::verify(
        &hold_key(shared, &hold.transaction_id),
        b"HOLD",
        &HoldPlaced::mac_fields(&hold.transaction_id, hold.amount, hold.card_id, unload),
        &hold.mac,
    )
}

/// An account that funds loads: a bank account or a pre-funded voucher.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub id: String,
    pub box_id: Option<String>,
    pub card_id: Option<u64>,
    pub currency: Currency,
    pub opening_balance: u64,
    /// Booked balance: captured loads are gone from it.
    pub balance: u64,
    /// Sum of open holds.
    pub held: u64,
    /// PIN verification value (hex); `None` for a voucher (the code is the secret).
    pub pvv: Option<String>,
    pub wrong_pins: u8,
    pub locked: bool,
    /// The day `used_today` counts for.
    pub day: Option<Date>,
    /// Held or captured today (released holds give theirs back).
    pub used_today: u64,
}

impl Account {
    pub fn available(&self) -> u64 {
        self.balance - self.held
    }
    fn used_on(&self, today: Date) -> u64 {
        if self.day == Some(today) {
            self.used_today
        } else {
            0
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldState {
    Held,
    Captured,
    Released,
}

/// One hold (journal kind `hold`, keyed by transaction id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    pub transaction_id: String,
    pub account: String,
    pub amount: Money,
    pub card_id: u64,
    pub day: Date,
    pub state: HoldState,
    /// The hold request as received (postcard): a retry must be identical.
    pub request: Vec<u8>,
    pub settled: Option<Message>,
    /// The sealed confirmation that settled it: a repeat must be identical.
    pub confirmation: Option<Vec<u8>>,
    /// An unload (issue 17): `amount` is reserved out of the issuer float, not held on the
    /// account; captured, it is credited to the account; released, back to the float.
    pub unload: bool,
}

/// An offer made (journal kind `offer`): who may use the transaction id, for which account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OfferRec {
    pub box_id: String,
    pub account: String,
    pub card_id: u64,
    pub offer: LoadOffer,
}

/// Failed attempts at naming an account or voucher in a load offer request (guessing
/// voucher codes), counted per box and in all. After [`FREE_FAILURES`] failures a box
/// backs off for 2, 4, 8 … seconds (at most an hour) and its requests are refused with
/// `RateLimited` meanwhile, without being looked at; past [`GLOBAL_FAILURES_PER_MIN`]
/// failures a minute across all boxes, every box that has failed at all waits at least
/// [`GLOBAL_BACKOFF`]. A success clears the box's count. Kept in memory: a restart of the
/// funder is not something a guesser can cause.
#[derive(Default)]
struct Guessing {
    per_box: std::collections::HashMap<String, (u32, std::time::Instant)>,
    recent: std::collections::VecDeque<std::time::Instant>,
}

/// Failed attempts a box gets before it backs off.
pub const FREE_FAILURES: u32 = 5;
/// Failures a minute, across all boxes, above which every failing box backs off.
pub const GLOBAL_FAILURES_PER_MIN: usize = 60;
/// The least back-off while the global rate is exceeded.
pub const GLOBAL_BACKOFF: std::time::Duration = std::time::Duration::from_secs(10);

impl Guessing {
    /// How long `box_id` must still wait, if at all.
    fn wait(&mut self, box_id: &str, now: std::time::Instant) -> Option<std::time::Duration> {
        let minute = std::time::Duration::from_secs(60);
        while self
            .recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > minute)
        {
            self.recent.pop_front();
        }
        let (n, last) = *self.per_box.get(box_id)?;
        let mut backoff = if n >= FREE_FAILURES {
            std::time::Duration::from_secs(1u64 << (n - FREE_FAILURES + 1).min(12))
                .min(std::time::Duration::from_secs(3600))
        } else {
            std::time::Duration::ZERO
        };
        if self.recent.len() > GLOBAL_FAILURES_PER_MIN {
            backoff = backoff.max(GLOBAL_BACKOFF);
        }
        let until = last + backoff;
        (until > now).then(|| until - now)
    }

    fn failed(&mut self, box_id: &str, now: std::time::Instant) {
        let e = self.per_box.entry(box_id.to_string()).or_insert((0, now));
        *e = (e.0.saturating_add(1), now);
        self.recent.push_back(now);
    }

    fn succeeded(&mut self, box_id: &str) {
        self.per_box.remove(box_id);
    }
}

/// The settings of a [`Funds`].
pub struct FundsSpec {
    /// "bank" or "load server", for messages.
    pub who: &'static str,
    pub confirmation_key: DesKey,
    /// The PIN master key; `None` for pre-funded accounts (no PIN).
    pub pin_master: Option<DesKey>,
    pub pin_tries: u8,
    pub daily_limit: u64,
    pub float_account: String,
    /// Seconds a load offer may wait for its hold request.
    pub offer_lifetime_secs: u64,
    /// This role's name for clearing (`bank`, `load`): the funder in its load advices.
    pub funder: &'static str,
    /// The clearing role load advices go to (config `clearing`); none: none are made.
    pub clearing: Option<String>,
}

/// Accounts, offers, holds and the issuer float on one journal: the hold discipline shared
/// by the bank and the load server's pre-funded accounts.
pub struct Funds {
    /// "bank" or "load server", for messages.
    pub who: &'static str,
    pub journal: Arc<Journal>,
    pub confirmation_key: DesKey,
    /// The PIN master key; `None` for pre-funded accounts (no PIN).
    pub pin_master: Option<DesKey>,
    pub pin_tries: u8,
    pub daily_limit: u64,
    pub float_account: String,
    pub offer_lifetime_secs: u64,
    /// See [`FundsSpec::funder`].
    pub funder: &'static str,
    /// See [`FundsSpec::clearing`].
    pub clearing: Option<String>,
    lock: tokio::sync::Mutex<()>,
    guessing: std::sync::Mutex<Guessing>,
}

impl Funds {
    /// Opens the funds on `journal`, adding the accounts the journal does not hold yet.
    pub fn open(
        spec: FundsSpec,
        journal: Arc<Journal>,
        accounts: Vec<Account>,
    ) -> Result<Self, String> {
        for a in accounts {
            if journal
                .get(Kind::Account, &a.id)
                .map_err(|e| e.to_string())?
                .is_none()
            {
                journal
                    .atomically(|b| {
                        b.put(Kind::Account, &a.id, &journal::encode(&a))?;
                        b.step(
                            &a.id,
                            &FundsStep::AccountOpened,
                            &a.opening_balance.to_string(),
                        )
                    })
                    .map_err(|e| e.to_string())?;
            }
        }
        Ok(Self {
            who: spec.who,
            journal,
            confirmation_key: spec.confirmation_key,
            pin_master: spec.pin_master,
            pin_tries: spec.pin_tries,
            daily_limit: spec.daily_limit,
            float_account: spec.float_account,
            offer_lifetime_secs: spec.offer_lifetime_secs,
            funder: spec.funder,
            clearing: spec.clearing,
            lock: tokio::sync::Mutex::new(()),
            guessing: Default::default(),
        })
    }

    pub fn account(&self, id: &str) -> Option<Account> {
        journal::decode(&self.journal.get(Kind::Account, id).ok()??).ok()
    }

    pub fn accounts(&self) -> Vec<Account> {
        self.journal
            .all(Kind::Account)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, b)| journal::decode(&b).ok())
            .collect()
    }

    pub fn hold(&self, txid: &str) -> Option<Hold> {
        journal::decode(&self.journal.get(Kind::Hold, txid).ok()??).ok()
    }

    /// The passbook records the bank keeps for `card_id` (seed 004), in transaction order.
    pub fn passbook(&self, card_id: u64) -> Vec<proto::purse::LogRecord> {
        let prefix = format!("{card_id:016X}/");
        self.journal
            .all(Kind::Passbook)
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .filter_map(|(_, b)| journal::decode(&b).ok())
            .collect()
    }

    pub fn holds(&self) -> Vec<Hold> {
        self.journal
            .all(Kind::Hold)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, b)| journal::decode(&b).ok())
            .collect()
    }

    /// The issuer float per currency: what captured loads moved to the card issuer.
    pub fn float(&self) -> BTreeMap<Currency, u64> {
        self.journal
            .all(Kind::Float)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|(_, b)| journal::decode::<Money>(&b).ok())
            .map(|m| (m.currency, m.minor))
            .collect()
    }

    fn offer_rec(&self, txid: &str) -> Option<OfferRec> {
        journal::decode(&self.journal.get(Kind::Offer, txid).ok()??).ok()
    }

    /// Unlocks an account after wrong PINs (the operator command).
    pub fn unlock(&self, account: &str) -> Result<(), String> {
        let mut a = self
            .account(account)
            .ok_or_else(|| format!("no account {account}"))?;
        a.locked = false;
        a.wrong_pins = 0;
        self.journal
            .atomically(|b| {
                b.put(Kind::Account, account, &journal::encode(&a))?;
                b.step(account, &FundsStep::UnlockedByTheOperator, "")
            })
            .map_err(|e| e.to_string())?;
        tracing::info!(account, "account unlocked by the operator");
        Ok(())
    }

    /// The account a source names, checked against the asking box (and card). "No such
    /// account", "another box's" and "another card's" get one and the same refusal, which
    /// never repeats the name (a voucher's code is its secret): nothing to tell a guesser.
    fn owned_account(
        &self,
        box_id: &str,
        id: &str,
        card_id: u64,
        txid: Option<&str>,
    ) -> Result<Account, Message> {
        let not_yours = || {
            refuse(
                ErrorCode::NotYourAccount,
                format!(
                    "the {} holds no such account or voucher for this box and card",
                    self.who
                ),
                txid,
            )
        };
        let Some(a) = self.account(id) else {
            return Err(not_yours());
        };
        if a.box_id.as_deref().is_some_and(|b| b != box_id)
            || a.card_id.is_some_and(|c| c != card_id)
        {
            return Err(not_yours());
        }
        if a.locked {
            return Err(refuse(
                ErrorCode::AccountLocked,
                "the account is locked after wrong PINs; the bank must unlock it",
                txid,
            ));
        }
        Ok(a)
    }

    /// The most that may be loaded now, and which limit sets it.
    fn maximum(&self, a: &Account, card_room: u64, today: Date) -> (u64, &'static str) {
        let daily = self.daily_limit.saturating_sub(a.used_on(today));
        let mut best = (card_room, "card");
        if a.available() < best.0 {
            best = (a.available(), "funds");
        }
        if daily < best.0 {
            best = (daily, "daily limit");
        }
        best
    }

    /// The limit an amount breaks, if any, as a refusal.
    fn check_limits(
        &self,
        a: &Account,
        amount: u64,
        card_room: u64,
        today: Date,
        txid: &str,
    ) -> Result<(), Message> {
        if amount > card_room {
            return Err(refuse(
                ErrorCode::OverMaxBalance,
                format!(
                    "a load of {amount} would take the card over its maximum balance (room for {card_room})"
                ),
                Some(txid),
            ));
        }
        if amount > a.available() {
            return Err(refuse(
                ErrorCode::InsufficientFunds,
                format!(
                    "account {} has {} available, not {amount}",
                    a.id,
                    a.available()
                ),
                Some(txid),
            ));
        }
        let left = self.daily_limit.saturating_sub(a.used_on(today));
        if amount > left {
            return Err(refuse(
                ErrorCode::OverDailyLimit,
                format!(
                    "account {} may load {left} more today (daily limit {})",
                    a.id, self.daily_limit
                ),
                Some(txid),
            ));
        }
        Ok(())
    }

    /// A load offer (an unload offer with `unload`): the maximum, a new transaction id and
    /// the server time stamp.
    pub async fn offer(
        &self,
        box_id: &str,
        account: &str,
        card: &PurseInfo,
        unload: bool,
    ) -> Message {
        let _g = self.lock.lock().await;
        let now = std::time::Instant::now();
        let wait = self
            .guessing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .wait(box_id, now);
        if let Some(w) = wait {
            return refuse(
                ErrorCode::RateLimited,
                format!(
                    "too many failed attempts from this box; retry in {} s",
                    w.as_secs().max(1)
                ),
                None,
            );
        }
        let a = match self.owned_account(box_id, account, card.card_id, None) {
            Ok(a) => {
                self.guessing
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .succeeded(box_id);
                a
            }
            Err(e) => {
                if matches!(&e, Message::Error(m) if m.code == ErrorCode::NotYourAccount) {
                    self.guessing
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .failed(box_id, now);
                }
                return e;
            }
        };
        // The account's currency names the purse: the card's money, or its points (002
        // [0166]: points loaded "much in the same way that currency is loaded").
        let Some((balance, max_balance)) = card.purse_for(a.currency) else {
            return refuse(
                ErrorCode::WrongCurrency,
                format!(
                    "the card holds {} but account {} is in {}",
                    card.currency.alpha(),
                    a.id,
                    a.currency.alpha()
                ),
                None,
            );
        };
        // A card locked by bad signatures (seed 004) opens only with the issuer's UNBLOCK,
        // which comes with a bank load of money — the cardholder proves the account's PIN —
        // so a bank makes it an offer; pre-funded accounts (no PIN) and points do not.
        let points = a.currency == proto::money::Currency::POINTS;
        if card.is_blocked() && (self.pin_master.is_none() || points) {
            return refuse(
                ErrorCode::BadSignature,
                "the card is blocked: only a load from a bank account can unblock it",
                None,
            );
        }
        let today = crate::payment::today();
        let room = max_balance.saturating_sub(balance);
        let (max, limited_by) = if unload {
            // Value goes back to a bank account (PIN-checked), from the card's money.
            if a.pvv.is_none() || points {
                return refuse(
                    ErrorCode::NotYourAccount,
                    "value is unloaded to a bank account, from the card's money only",
                    None,
                );
            }
            if balance == 0 {
                return refuse(
                    ErrorCode::InsufficientValue,
                    "nothing on the card to unload",
                    None,
                );
            }
            (balance, "card")
        } else {
            self.maximum(&a, room, today)
        };
        if max == 0 {
            let (code, why) = match limited_by {
                "card" => (
                    ErrorCode::OverMaxBalance,
                    "the card is at its maximum balance",
                ),
                "funds" => (ErrorCode::InsufficientFunds, "no funds available"),
                _ => (ErrorCode::OverDailyLimit, "today's load limit is used up"),
            };
            return refuse(code, format!("nothing can be loaded: {why}"), None);
        }
        let mut raw = [0u8; 8];
        rand::rngs::OsRng.fill_bytes(&mut raw);
        let txid = format!("LD-{}", hex::encode_upper(raw));
        let offer = LoadOffer {
            transaction_id: txid.clone(),
            source: if unload {
                LoadSource::Unload {
                    account: a.id.clone(),
                }
            } else if a.pvv.is_some() {
                LoadSource::Bank {
                    account: a.id.clone(),
                }
            } else {
                LoadSource::voucher(a.id.clone())
            },
            max_amount: Money::new(max, a.currency),
            limited_by: limited_by.into(),
            timestamp: now_secs(),
            date: today,
            pin_required: a.pvv.is_some(),
        };
        let rec = OfferRec {
            box_id: box_id.into(),
            account: a.id.clone(),
            card_id: card.card_id,
            offer: offer.clone(),
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Offer, &txid, &journal::encode(&rec))?;
            b.step(
                &txid,
                &FundsStep::LoadOfferMade,
                &format!("{} max {max} ({limited_by})", a.id),
            )
        }) {
            return journal_failed(e, Some(&txid));
        }
        tracing::info!(txid, account = %a.id, box_id, max, limited_by, "load offer made");
        Message::LoadOffer(offer)
    }

    /// Verifies the PIN (if the account has one) and places a hold. Idempotent per
    /// transaction id.
    pub async fn place_hold(&self, req: HoldRequest) -> Message {
        let _g = self.lock.lock().await;
        let txid = req.transaction_id.clone();
        let t = Some(txid.as_str());
        let raw = journal::encode(&req);
        if let Some(h) = self.hold(&txid) {
            return if h.request == raw && h.state == HoldState::Held {
                tracing::info!(txid, "retried hold request: same hold");
                Message::HoldPlaced(hold_placed(
                    &self.confirmation_key,
                    &txid,
                    h.amount,
                    h.card_id,
                    h.unload,
                ))
            } else if h.request != raw {
                refuse(
                    ErrorCode::Replay,
                    format!("transaction {txid} already has a hold for another request"),
                    t,
                )
            } else {
                refuse(
                    ErrorCode::Replay,
                    format!(
                        "transaction {txid}'s hold is already settled ({:?})",
                        h.state
                    ),
                    t,
                )
            };
        }
        let Some(offer) = self.offer_rec(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("{} made no load offer {txid}", self.who),
                t,
            );
        };
        if now_secs() >= offer.offer.timestamp + self.offer_lifetime_secs {
            return refuse(
                ErrorCode::OfferExpired,
                format!("load offer {txid} expired; ask for a new one"),
                t,
            );
        }
        let named = match &req.source {
            LoadSource::Bank { account } | LoadSource::Unload { account } => account,
            LoadSource::Voucher { code } => code.expose(),
        };
        let unload = req.source.is_unload();
        if offer.box_id != req.box_id
            || *named != offer.account
            || unload != offer.offer.source.is_unload()
        {
            return refuse(
                ErrorCode::NotYourAccount,
                format!("load offer {txid} was made to another box or account"),
                t,
            );
        }
        let mut a = match self.owned_account(&req.box_id, &offer.account, req.card_id, t) {
            Ok(a) => a,
            Err(e) => return e,
        };
        if req.amount.currency != a.currency {
            return refuse(
                ErrorCode::WrongCurrency,
                format!(
                    "load in {} from account {} in {}",
                    req.amount.currency.alpha(),
                    a.id,
                    a.currency.alpha()
                ),
                t,
            );
        }
        if req.amount.minor == 0 {
            return refuse(ErrorCode::Malformed, "zero-value load request", t);
        }
        if let Err(e) = self
            .journal
            .step(&txid, &FundsStep::HoldRequested, &req.amount.to_string())
        {
            return journal_failed(e, t);
        }
        if let (Some(pvv), Some(master)) = (a.pvv.clone(), &self.pin_master) {
            match self.check_pin(&mut a, &pvv, master, &req) {
                Ok(()) => {}
                Err(refusal) => return refusal,
            }
        }
        let today = crate::payment::today();
        let room = req.card_max_balance.saturating_sub(req.card_balance);
        // An unload is paid out of the issuer float this bank holds: reserved now, credited
        // to the account on the card's proof, back to the float otherwise.
        let mut float = self
            .float()
            .get(&req.amount.currency)
            .copied()
            .unwrap_or_default();
        if unload {
            // One open unload per card: each would reserve up to the card's whole balance,
            // so a card could hold the float many times over (the second outside attack on
            // unloads, U2). Its box finishes or proves the open one first.
            let open = self
                .holds()
                .into_iter()
                .find(|h| h.unload && h.state == HoldState::Held && h.card_id == req.card_id);
            let refusal = if let Some(h) = open {
                Some((
                    ErrorCode::InDoubt,
                    format!(
                        "an unload of this card ({}) is still open: its box finishes or proves it first",
                        h.transaction_id
                    ),
                ))
            } else if req.amount.minor > req.card_balance {
                Some((
                    ErrorCode::InsufficientValue,
                    format!(
                        "an unload of {} but the card holds {}",
                        req.amount.minor, req.card_balance
                    ),
                ))
            } else if req.amount.minor > float {
                Some((
                    ErrorCode::InsufficientFunds,
                    format!(
                        "the issuer float at {} holds {float}, not {}",
                        self.who, req.amount.minor
                    ),
                ))
            } else {
                None
            };
            if let Some((code, why)) = refusal {
                let _ = self.journal.put(Kind::Account, &a.id, &journal::encode(&a));
                return refuse(code, why, t);
            }
            float -= req.amount.minor;
        } else {
            if let Err(e) = self.check_limits(&a, req.amount.minor, room, today, &txid) {
                // A right PIN still resets the count even when a limit refuses the amount.
                let _ = self.journal.put(Kind::Account, &a.id, &journal::encode(&a));
                return e;
            }
            if a.day != Some(today) {
                a.day = Some(today);
                a.used_today = 0;
            }
            a.held += req.amount.minor;
            a.used_today += req.amount.minor;
        }
        let hold = Hold {
            transaction_id: txid.clone(),
            account: a.id.clone(),
            amount: req.amount,
            card_id: req.card_id,
            day: today,
            state: HoldState::Held,
            request: raw,
            settled: None,
            confirmation: None,
            unload,
        };
        let step = if unload {
            FundsStep::UnloadHoldPlaced
        } else {
            FundsStep::HoldPlaced
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Account, &a.id, &journal::encode(&a))?;
            b.put(Kind::Hold, &txid, &journal::encode(&hold))?;
            if unload {
                b.put(
                    Kind::Float,
                    &req.amount.currency.code.to_string(),
                    &journal::encode(&Money::new(float, req.amount.currency)),
                )?;
            }
            b.step(&txid, &step, &format!("{} {}", a.id, req.amount))
        }) {
            return journal_failed(e, t);
        }
        tracing::info!(txid, account = %a.id, amount = %req.amount, unload, "{}", step.as_str());
        Message::HoldPlaced(hold_placed(
            &self.confirmation_key,
            &txid,
            req.amount,
            req.card_id,
            unload,
        ))
    }

    /// Opens the sealed PIN block and compares its verification value; counts wrong PINs.
    fn check_pin(
        &self,
        a: &mut Account,
        pvv: &str,
        master: &DesKey,
        req: &HoldRequest,
    ) -> Result<(), Message> {
        let txid = req.transaction_id.as_str();
        let Some(sealed) = &req.sealed_pin else {
            return Err(refuse(
                ErrorCode::WrongPin,
                "this account needs the PIN",
                Some(txid),
            ));
        };
        let key = box_pin_key(master, &req.box_id);
        let block: PinBlock = match crypto::open(&key, sealed)
            .map_err(|e| e.to_string())
            .and_then(|raw| journal::decode(&raw))
        {
            Ok(b) => b,
            Err(e) => {
                return Err(refuse(
                    ErrorCode::BadSignature,
                    format!("the PIN block does not open under this box's PIN key: {e}"),
                    Some(txid),
                ));
            }
        };
        if block.transaction_id != txid {
            return Err(refuse(
                ErrorCode::Replay,
                "the PIN block was sealed for another transaction",
                Some(txid),
            ));
        }
        let right = pin_verification_value(master, &a.id, block.pin.expose());
        if right.eq_ignore_ascii_case(pvv) {
            a.wrong_pins = 0;
            return Ok(());
        }
        a.wrong_pins = a.wrong_pins.saturating_add(1);
        a.locked = a.wrong_pins >= self.pin_tries;
        let step = if a.locked {
            FundsStep::WrongPINAccountLocked
        } else {
            FundsStep::WrongPIN
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Account, &a.id, &journal::encode(&*a))?;
            b.step(txid, &step, &a.wrong_pins.to_string())
        }) {
            return Err(journal_failed(e, Some(txid)));
        }
        Err(if a.locked {
            refuse(
                ErrorCode::AccountLocked,
                format!(
                    "wrong PIN {} times: account {} is locked until the bank unlocks it",
                    a.wrong_pins, a.id
                ),
                Some(txid),
            )
        } else {
            refuse(
                ErrorCode::WrongPin,
                format!("wrong PIN; {} tries left", self.pin_tries - a.wrong_pins),
                Some(txid),
            )
        })
    }

    /// Captures or releases the hold on the load server's sealed confirmation. Idempotent.
    pub async fn settle(&self, c: LoadConfirmation) -> Message {
        let _g = self.lock.lock().await;
        let txid = c.transaction_id.clone();
        let t = Some(txid.as_str());
        let Some(mut hold) = self.hold(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("{} holds nothing for {txid}", self.who),
                t,
            );
        };
        if let Some(done) = &hold.settled {
            return repeat(
                hold.confirmation.as_ref(),
                &c.sealed,
                done,
                "load confirmation",
                &txid,
            );
        }
        // Only the load server can have sealed this: the relay cannot forge a no-load.
        let body: LoadConfirmationBody =
            match crypto::open(&confirmation_key(&self.confirmation_key, &txid), &c.sealed)
                .map_err(|e| e.to_string())
                .and_then(|raw| journal::decode(&raw))
            {
                Ok(b) => b,
                Err(e) => {
                    return refuse(
                        ErrorCode::BadSignature,
                        format!("the load confirmation does not open: {e}"),
                        t,
                    );
                }
            };
        // A no-load moves nothing, so only a capture must match the held amount (a
        // load server that never saw the request cannot know it).
        if body.transaction_id != txid || (body.loaded && body.amount != hold.amount) {
            return refuse(
                ErrorCode::AmountMismatch,
                format!(
                    "the confirmation is for {} {} but the hold is {txid} {}",
                    body.transaction_id, body.amount, hold.amount
                ),
                t,
            );
        }
        let Some(mut a) = self.account(&hold.account) else {
            return refuse(ErrorCode::Internal, "the held account is gone", t);
        };
        let amount = hold.amount;
        let mut float = self
            .float()
            .get(&amount.currency)
            .copied()
            .unwrap_or_default();
        let float_moves = if hold.unload {
            // Reserved out of the float at the hold: to the account, or back.
            if body.loaded {
                a.balance += amount.minor;
                hold.state = HoldState::Captured;
                false
            } else {
                float += amount.minor;
                hold.state = HoldState::Released;
                true
            }
        } else {
            a.held -= amount.minor;
            if body.loaded {
                a.balance -= amount.minor;
                float += amount.minor;
                hold.state = HoldState::Captured;
            } else {
                if a.day == Some(hold.day) {
                    a.used_today = a.used_today.saturating_sub(amount.minor);
                }
                hold.state = HoldState::Released;
            }
            body.loaded
        };
        let answer = Message::HoldSettled(HoldSettled {
            transaction_id: txid.clone(),
            captured: body.loaded,
            amount,
        });
        hold.settled = Some(answer.clone());
        hold.confirmation = Some(c.sealed.clone());
        let step = match (hold.unload, body.loaded) {
            (false, true) => FundsStep::HoldCapturedMovedToTheIssuerFloat,
            (false, false) => FundsStep::HoldReleased,
            (true, true) => FundsStep::UnloadCreditedToTheAccount,
            (true, false) => FundsStep::UnloadReleased,
        };
        if let Err(e) = self.journal.atomically(|b| {
            b.put(Kind::Account, &a.id, &journal::encode(&a))?;
            b.put(Kind::Hold, &txid, &journal::encode(&hold))?;
            if float_moves {
                b.put(
                    Kind::Float,
                    &amount.currency.code.to_string(),
                    &journal::encode(&Money::new(float, amount.currency)),
                )?;
            }
            if body.loaded {
                // Seed 004: the card's passbook, uploaded with the bank load, kept with
                // the capture (the card clears it with the credit).
                for r in &body.passbook {
                    b.put(
                        Kind::Passbook,
                        &passbook_key(body.card_id, r.atc),
                        &journal::encode(r),
                    )?;
                }
                // The load advice for clearing, in the same write as the capture.
                if let Some(to) = &self.clearing {
                    let advice = Message::LoadAdvice(LoadAdvice {
                        funder: self.funder.into(),
                        transaction_id: txid.clone(),
                        account: a.id.clone(),
                        card_id: hold.card_id,
                        amount,
                        captured_on: day_text(hold.day),
                        unload: hold.unload,
                    });
                    Outbox::queue(b, to, &txid, &advice)?;
                }
            }
            b.step(&txid, &step, &body.basis)
        }) {
            return journal_failed(e, t);
        }
        tracing::info!(txid, account = %a.id, %amount, captured = body.loaded, basis = %body.basis, "{}", step.as_str());
        answer
    }
}

/// The journal key of a card's passbook record at the bank: `<card id, 16 hex digits>/<its
/// transaction number, 10 digits>` (key order: per card, in transaction order).
#[must_use]
pub fn passbook_key(card_id: u64, atc: u32) -> String {
    format!("{card_id:016X}/{atc:010}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn guessing_backs_a_box_off_after_its_free_failures_and_a_success_clears_it() {
        let mut g = Guessing::default();
        let t0 = Instant::now();
        for i in 0..FREE_FAILURES {
            assert_eq!(g.wait("box-1", t0), None, "attempt {i} is free");
            g.failed("box-1", t0);
        }
        // 5 failures: 2 s, then 4 s, doubling.
        assert_eq!(g.wait("box-1", t0), Some(Duration::from_secs(2)));
        g.failed("box-1", t0);
        assert_eq!(g.wait("box-1", t0), Some(Duration::from_secs(4)));
        assert_eq!(g.wait("box-1", t0 + Duration::from_secs(5)), None);
        assert_eq!(g.wait("box-2", t0), None, "another box is not held back");
        g.succeeded("box-1");
        assert_eq!(g.wait("box-1", t0), None);
    }

    #[test]
    fn a_global_flood_of_failures_slows_every_failing_box() {
        let mut g = Guessing::default();
        let t0 = Instant::now();
        for i in 0..=GLOBAL_FAILURES_PER_MIN {
            g.failed(&format!("box-{i}"), t0);
        }
        // One failure each, under the free count, but the global rate is exceeded.
        assert_eq!(g.wait("box-3", t0), Some(GLOBAL_BACKOFF));
        assert_eq!(g.wait("box-never-failed", t0), None);
        // A minute later the window has emptied.
        assert_eq!(g.wait("box-3", t0 + Duration::from_secs(61)), None);
    }
}
