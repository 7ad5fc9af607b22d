//! The host security module of the load server (001 HSM 864), sans-IO.
//!
//! It verifies S1 and issues the load command with S2 ([0125], [0160]), verifies S3
//! ([0127]–[0128]), and runs the negative-result procedure of [0129]–[0132]:
//!
//! 1. The card answered LOAD with a negative result code (or never answered: the card was
//!    pulled). The box runs a new INITIALIZE FOR LOAD for zero value, which yields a new S1.
//! 2. The new S1 must be a genuine card S1 over the values the box reports, made after the
//!    load's own INITIALIZE (a higher INITIALIZE count: that ended the load's session, so
//!    its LOAD ran before the proof or never will).
//! 3. Whether the load ran: the seed compares the S1 the card would give had the load
//!    failed (the original balance and counters) with the new one. Any other load or
//!    unload of the card since — in another box, at another HSM — moves those counters
//!    too and would pass for this one. So the card names, under S1, the INITIALIZE counts
//!    of the last [`RECENT_RUNS`] load and unload sessions it carried out
//!    ([`LoadInit::runs`]): this session among them means loaded (a false negative); not
//!    among them, while they reach back before it, means not loaded. When so many ran
//!    since that they do not reach back, the proof cannot tell ([`HsmError::ProofUnavailable`]).
//! 4. Not loaded with the transaction counter unmoved is branch A ([0131], a true
//!    negative); moved, branch B ([0132], an accidental counter bump).
//!
//! Unloads ([`Direction::Unload`]) run the same procedure in reverse, under their own
//! labels.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, DesKey};
use crate::hotlist::Hotlist;
use crate::money::{Currency, Money};
use crate::purse::*;
use crate::security_card::Totals;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum HsmError {
    #[error("S1 does not verify: not a genuine card, or the request was altered")]
    BadS1,
    #[error("S3 does not verify: the load response was altered or forged")]
    BadS3,
    #[error("card key version {card} is not one this HSM holds ({ours})")]
    UnknownKeyVersion { card: u8, ours: u8 },
    #[error(
        "the card's currency {} is not the load currency {}",
        .card.alpha(),
        .load.alpha()
    )]
    WrongCurrency { card: Currency, load: Currency },
    #[error("the card expired")]
    Expired,
    #[error("the load of {amount} would take the card over its maximum balance {max}")]
    OverMaxBalance { amount: u64, max: u64 },
    #[error("the load request is for {requested} but S1 covers {signed}")]
    AmountMismatch { requested: u64, signed: u64 },
    #[error("zero-value load")]
    ZeroAmount,
    #[error("no load transaction {0}")]
    UnknownTransaction(String),
    #[error("transaction {0} is already in use for another load request")]
    DuplicateTransaction(String),
    #[error("the load response is for another card, counter or amount")]
    ResponseMismatch,
    #[error("transaction {0} is not waiting for this step")]
    WrongState(String),
    #[error("the zero-value request does not match the original (card, currency or amount)")]
    BadZeroValueRequest,
    #[error("the HSM has no load master key loaded")]
    NoKey,
    #[error(
        "the zero-value proof was made before the load's INITIALIZE (a stale proof): it shows nothing"
    )]
    StaleProof,
    /// The card is on the issuer's hotlist (seed 002): no load. Appended.
    #[error("card {card_id} is blocked by its issuer (hotlist)")]
    Hotlisted { card_id: u64 },
    /// The key store (a hardware token) failed to derive a card key. Appended.
    #[error("the HSM's key store failed: {0}")]
    KeyStore(String),
    /// An unload of more than the card holds (S1 covers the balance).
    #[error("the unload of {amount} is more than the card's balance {balance}")]
    InsufficientValue { balance: u64, amount: u64 },
    /// The passbook uploaded with a bank load is not the one the card's S1 covers (records
    /// left out, added or changed).
    #[error("the uploaded passbook is not the card's (its digest differs from the one S1 covers)")]
    PassbookMismatch,
    /// The card carried out so many loads and unloads since the one in doubt that its S1
    /// no longer names the sessions back to it: the proof cannot tell; an operator settles
    /// it from the card's log and the journals.
    #[error(
        "the card ran too many loads or unloads since this one for its proof to tell whether \
         this one ran; settle it from the card's log"
    )]
    ProofUnavailable,
    /// An S1 of a card session this HSM already authorized (under another transaction id),
    /// or of an older one: one card session is one load or unload, counted once.
    #[error("card {card_id}'s INITIALIZE {init_count} (or a later one) was already authorized")]
    SessionUsed { card_id: u64, init_count: u32 },
}

/// Where the HSM's load masters live and derive card keys: in memory ([`MasterKeys`], the
/// software HSM) or in a hardware token (the head end's PKCS#11 store), where the masters
/// never leave it. A card's load key is the master of its version diversified by card id
/// ([`DesKey::diversify`]: E(d) ‖ E(¬d), two-key triple DES).
pub trait LoadKeyStore: std::fmt::Debug + Send + Sync {
    /// Card `card_id`'s load key of key `version`.
    ///
    /// # Errors
    /// `UnknownKeyVersion` for a version the store does not hold; `KeyStore` when a token
    /// fails.
    fn card_key(&self, version: u8, card_id: u64) -> Result<DesKey, HsmError>;
    /// The newest active version: what a key update moves a card to.
    fn newest_version(&self) -> u8;
}

impl LoadKeyStore for MasterKeys {
    fn card_key(&self, version: u8, card_id: u64) -> Result<DesKey, HsmError> {
        self.get(version)
            .map(|m| m.card_key(card_id))
            .ok_or(HsmError::UnknownKeyVersion {
                card: version,
                ours: self.newest().key_version,
            })
    }
    fn newest_version(&self) -> u8 {
        self.newest().key_version
    }
}

/// Where a load transaction stands in the HSM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadState {
    /// S2 issued; the card's answer is awaited.
    Authorized,
    /// The card answered negative; the zero-value proof is awaited.
    NegativePending {
        response: LoadResponse,
    },
    Loaded,
    NotLoaded,
}

/// The outcome of the negative-result procedure, with the branch it took.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NegativeVerdict {
    /// Branch A, S1 as expected: the card was not loaded.
    TrueNegative,
    /// Branch B, S1 as expected once the counter is lowered: not loaded, counter bumped.
    CounterBumped,
    /// Either branch, S1 not as expected: the card was loaded after all.
    FalseNegative,
}

impl NegativeVerdict {
    pub fn loaded(self) -> bool {
        self == Self::FalseNegative
    }
}

/// The result of verifying the card's answer to LOAD.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LoadVerdict {
    Loaded,
    /// Negative result code: run [`Hsm::resolve_negative`] with a zero-value S1.
    NegativeNeedsProof,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadTxn {
    pub init: LoadInit,
    pub command: LoadCommand,
    pub state: LoadState,
}

/// The software HSM. Its state is serializable, so the load server can journal it; its load
/// master key is not (`#[serde(skip)]`): a snapshot holds state only, and the key is given
/// again from the key store at start ([`Self::with_key`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Hsm {
    pub id: u64,
    #[serde(skip)]
    master: Option<std::sync::Arc<dyn LoadKeyStore>>,
    pub txns: BTreeMap<String, LoadTxn>,
    pub totals: BTreeMap<Currency, Totals>,
    /// Unloads (issue 17, [`Direction::Unload`]), by transaction id, apart from the loads.
    pub unloads: BTreeMap<String, LoadTxn>,
    /// What cards proved they gave back, per currency.
    pub unloaded: BTreeMap<Currency, Totals>,
    /// Per card, the newest INITIALIZE count (load or unload session) authorized here: an
    /// S1 is authorized once, under one transaction id, even after the load is forgotten.
    pub sessions: BTreeMap<u64, u32>,
    /// The issuer's hotlist, given to the HSM like its key (not in a snapshot: the load
    /// server loads its newest at every start and on every update).
    #[serde(skip)]
    hotlist: Hotlist,
    /// The purchase masters, given only to re-key cards ([`Self::key_update`]); none: no
    /// key updates.
    #[serde(skip)]
    rekey: Option<MasterKeys>,
    /// The scheme's current application key (seed 004 KEY_NUMBER), pushed to every card a
    /// bank load reaches ([`Self::app_key_push`]); none: no pushes.
    #[serde(skip)]
    app_key: Option<crate::transfer::AppKey>,
}

impl Hsm {
    pub fn new(id: u64, master: impl Into<MasterKeys>) -> Self {
        Self {
            id,
            master: Some(std::sync::Arc::new(master.into())),
            txns: BTreeMap::new(),
            totals: BTreeMap::new(),
            unloads: BTreeMap::new(),
            unloaded: BTreeMap::new(),
            sessions: BTreeMap::new(),
            hotlist: Hotlist::default(),
            rekey: None,
            app_key: None,
        }
    }

    /// This HSM with the scheme's application master and current epoch, so that it pushes
    /// that epoch's key with the bank loads it authorizes ([`Self::app_key_push`]).
    pub fn with_app_key(mut self, app_master: &DesKey, epoch: u8) -> Self {
        self.app_key = Some(crate::transfer::app_key(app_master, epoch));
        self
    }

    /// The current application key sealed for this load's card
    /// ([`crate::transfer::AppKeyPush`]), if this HSM has one and the load is a money
    /// load. The card takes it only if it is newer than its newest. Deterministic for one
    /// load, so a repeated request gets the same bytes.
    pub fn app_key_push(&self, init: &LoadInit) -> Option<Vec<u8>> {
        use rand::SeedableRng;
        let key = self.app_key.as_ref()?;
        if Purse::of(init.currency) != Purse::Money {
            return None;
        }
        let current = self.card_load_key(init.key_version, init.card_id).ok()?;
        let mut iv =
            rand::rngs::StdRng::seed_from_u64(init.card_id.rotate_left(17) ^ u64::from(init.atc));
        Some(crypto::seal(
            &crate::transfer::AppKeyPush::session(&current, &init.s1),
            &crate::transfer::AppKeyPush::encode(key),
            &mut iv,
        ))
    }

    /// This HSM with the issuer's purchase masters, so that it re-keys every card it loads
    /// that is on an older key version than its newest ([`Self::key_update`]).
    pub fn with_rekey(mut self, purchase: MasterKeys) -> Self {
        self.rekey = Some(purchase);
        self
    }

    /// The sealed key update for a load of `init`'s card (001 [0044]): the card's keys of
    /// the newest version both the load and the purchase masters hold, if the card is on an
    /// older one. Deterministic for one load, so a repeated request gets the same bytes.
    pub fn key_update(&self, init: &LoadInit) -> Option<Vec<u8>> {
        use rand::SeedableRng;
        let (load, purchase) = (self.master.as_ref()?, self.rekey.as_ref()?);
        // Issuer items ride in money loads only (the card refuses them in a points load).
        if Purse::of(init.currency) != Purse::Money {
            return None;
        }
        let newest = load.newest_version();
        if init.key_version >= newest {
            return None;
        }
        let update = KeyUpdate {
            key_version: newest,
            keys: CardKeys {
                purchase: purchase.get(newest)?.card_key(init.card_id),
                load: load.card_key(newest, init.card_id).ok()?,
            },
        };
        let current = self.card_load_key(init.key_version, init.card_id).ok()?;
        let mut iv = rand::rngs::StdRng::seed_from_u64(init.card_id ^ u64::from(init.atc));
        Some(crypto::seal(
            &KeyUpdate::session(&current, &init.s1),
            &update.encode(),
            &mut iv,
        ))
    }

    /// The issuer's sealed UNBLOCK ([`Unblock`]: the bad-signature lock and the PIN's
    /// tries) for this load's card, under its current load key. The load server gives it
    /// only with a bank load ([load] unblock_with_bank_loads). Deterministic for a given
    /// load, so a retried load request gets the same answer.
    pub fn unblock(&self, init: &LoadInit) -> Option<Vec<u8>> {
        use rand::SeedableRng;
        if Purse::of(init.currency) != Purse::Money {
            return None;
        }
        let current = self.card_load_key(init.key_version, init.card_id).ok()?;
        let mut iv = rand::rngs::StdRng::seed_from_u64(!(init.card_id ^ u64::from(init.atc)));
        Some(crypto::seal(
            &Unblock::session(&current, &init.s1),
            &Unblock {
                flags: Unblock::LOCK | Unblock::PIN,
            }
            .encode(),
            &mut iv,
        ))
    }

    /// Loads the issuer's hotlist (a newer one replaces it; an older one is ignored).
    pub fn set_hotlist(&mut self, hotlist: &Hotlist) {
        self.hotlist.update(hotlist);
    }

    /// The version of the hotlist the HSM holds (0: none).
    pub fn hotlist_version(&self) -> u64 {
        self.hotlist.version
    }

    /// This HSM (restored from a snapshot, which holds no key) with its load master.
    pub fn with_key(mut self, master: impl Into<MasterKeys>) -> Self {
        self.master = Some(std::sync::Arc::new(master.into()));
        self
    }

    /// An HSM whose load masters are in `store` (a hardware token).
    pub fn with_key_store(id: u64, store: std::sync::Arc<dyn LoadKeyStore>) -> Self {
        Self {
            id,
            master: Some(store),
            txns: BTreeMap::new(),
            totals: BTreeMap::new(),
            unloads: BTreeMap::new(),
            unloaded: BTreeMap::new(),
            sessions: BTreeMap::new(),
            hotlist: Hotlist::default(),
            rekey: None,
            app_key: None,
        }
    }

    /// Takes `state`'s transactions and totals (a snapshot, rolled back to) and keeps this
    /// HSM's keys (load masters, re-key masters, application key) and hotlist.
    pub fn restore_state(&mut self, state: Hsm) {
        let master = self.master.take();
        let hotlist = std::mem::take(&mut self.hotlist);
        let rekey = self.rekey.take();
        let app_key = self.app_key.take();
        *self = state;
        self.rekey = rekey;
        self.app_key = app_key;
        self.master = master;
        self.hotlist = hotlist;
    }

    /// A card's load key, from the load master of its key `version` (a retired version
    /// still loads: a load is how a card is re-keyed).
    fn card_load_key(&self, version: u8, card_id: u64) -> Result<DesKey, HsmError> {
        self.master
            .as_ref()
            .ok_or(HsmError::NoKey)?
            .card_key(version, card_id)
    }

    /// The load key of the purse `init` is for (its currency: money, or the points purse,
    /// 002 [0166]), under which S1, S2 and S3 of that load are made.
    fn purse_load_key(&self, init: &LoadInit) -> Result<DesKey, HsmError> {
        let card = self.card_load_key(init.key_version, init.card_id)?;
        Ok(Purse::of(init.currency).key(&card))
    }

    fn check_s1(&self, init: &LoadInit, dir: Direction) -> Result<(), HsmError> {
        let key = self.purse_load_key(init)?;
        if crypto::verify(&key, dir.labels().0, &init.signed_fields(), &init.s1) {
            Ok(())
        } else {
            Err(HsmError::BadS1)
        }
    }

    /// Verifies S1 and issues the load command with S2. Idempotent per transaction id.
    pub fn authorize(
        &mut self,
        transaction_id: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
    ) -> Result<LoadCommand, HsmError> {
        self.authorize_in(Direction::Load, transaction_id, init, amount, today, None)
    }

    /// A bank load with the card's passbook uploaded (seed 004 PASSBOOK): `passbook` must
    /// be exactly the records the card's S1 covers ([`passbook_digest`]; none for a card
    /// with privacy on or nothing new), and the load command tells the card it may clear
    /// them (`passbook_through`: the newest uploaded record's transaction number). The
    /// caller keeps the records for the bank, journaled with the load.
    ///
    /// # Errors
    /// As [`Self::authorize`]; `PassbookMismatch`.
    pub fn authorize_with_passbook(
        &mut self,
        transaction_id: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
        passbook: &[LogRecord],
    ) -> Result<LoadCommand, HsmError> {
        self.authorize_in(
            Direction::Load,
            transaction_id,
            init,
            amount,
            today,
            Some(passbook),
        )
    }

    /// An unload (issue 17; 004 card-to-bank): verifies the card's S1 of INITIALIZE FOR
    /// UNLOAD and issues the unload command with S2, both under the unload labels. The
    /// value is the issuer's again only when [`Self::confirm_unload`] (the card's S3) or
    /// [`Self::resolve_unload_negative`] proves the card gave it up. Idempotent per
    /// transaction id.
    ///
    /// # Errors
    /// As [`Self::authorize`]; `InsufficientValue` for more than the card holds.
    pub fn authorize_unload(
        &mut self,
        transaction_id: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
    ) -> Result<LoadCommand, HsmError> {
        self.authorize_in(Direction::Unload, transaction_id, init, amount, today, None)
    }

    fn book(&self, dir: Direction) -> &BTreeMap<String, LoadTxn> {
        match dir {
            Direction::Load => &self.txns,
            Direction::Unload => &self.unloads,
        }
    }

    fn book_mut(&mut self, dir: Direction) -> &mut BTreeMap<String, LoadTxn> {
        match dir {
            Direction::Load => &mut self.txns,
            Direction::Unload => &mut self.unloads,
        }
    }

    fn authorize_in(
        &mut self,
        dir: Direction,
        transaction_id: &str,
        init: &LoadInit,
        amount: Money,
        today: Date,
        passbook: Option<&[LogRecord]>,
    ) -> Result<LoadCommand, HsmError> {
        if let Some(t) = self.book(dir).get(transaction_id) {
            return if t.init == *init {
                Ok(t.command.clone())
            } else {
                Err(HsmError::DuplicateTransaction(transaction_id.into()))
            };
        }
        self.check_s1(init, dir)?;
        // One card session, one load or unload: its S1 under a second transaction id would
        // be confirmed by the card's one S3 twice (an outside attack counted an unload twice).
        if self
            .sessions
            .get(&init.card_id)
            .is_some_and(|n| *n >= init.init_count)
        {
            return Err(HsmError::SessionUsed {
                card_id: init.card_id,
                init_count: init.init_count,
            });
        }
        // The id is the genuine card's (S1 verified): now the issuer's block applies.
        if self.hotlist.blocks(init.card_id) {
            return Err(HsmError::Hotlisted {
                card_id: init.card_id,
            });
        }
        if init.currency != amount.currency {
            return Err(HsmError::WrongCurrency {
                card: init.currency,
                load: amount.currency,
            });
        }
        if init.amount != amount.minor {
            return Err(HsmError::AmountMismatch {
                requested: amount.minor,
                signed: init.amount,
            });
        }
        if amount.minor == 0 {
            return Err(HsmError::ZeroAmount);
        }
        if init.expiry.is_expired_on(today) {
            return Err(HsmError::Expired);
        }
        match dir {
            Direction::Load => match init.balance.checked_add(amount.minor) {
                Some(b) if b <= init.max_balance => {}
                _ => {
                    return Err(HsmError::OverMaxBalance {
                        amount: amount.minor,
                        max: init.max_balance,
                    });
                }
            },
            Direction::Unload if init.balance < amount.minor => {
                return Err(HsmError::InsufficientValue {
                    balance: init.balance,
                    amount: amount.minor,
                });
            }
            Direction::Unload => {}
        }
        // The uploaded passbook is the card's (S1 verified covers its digest).
        let passbook_through = match passbook {
            None => 0,
            Some(records) if passbook_digest(records) == init.passbook => {
                records.iter().map(|r| r.atc).max().unwrap_or(0)
            }
            Some(_) => return Err(HsmError::PassbookMismatch),
        };
        let key = self.purse_load_key(init)?;
        let mut command = LoadCommand {
            hsm_id: self.id,
            card_id: init.card_id,
            atc: init.atc,
            amount: amount.minor,
            currency: amount.currency,
            passbook_through,
            s2: [0; 8],
        };
        command.s2 = crypto::sign(&key, dir.labels().1, &command.signed_fields(&init.s1));
        self.sessions.insert(init.card_id, init.init_count);
        self.book_mut(dir).insert(
            transaction_id.into(),
            LoadTxn {
                init: init.clone(),
                command: command.clone(),
                state: LoadState::Authorized,
            },
        );
        Ok(command)
    }

    fn txn(&self, id: &str, dir: Direction) -> Result<&LoadTxn, HsmError> {
        self.book(dir)
            .get(id)
            .ok_or_else(|| HsmError::UnknownTransaction(id.into()))
    }

    /// Settles `id`: the value moved (counted in the direction's totals) or it did not.
    fn settle(&mut self, id: &str, loaded: bool, dir: Direction) {
        let t = self.book_mut(dir).get_mut(id).expect("caller looked it up");
        t.state = if loaded {
            LoadState::Loaded
        } else {
            LoadState::NotLoaded
        };
        let c = t.command.clone();
        if loaded {
            let totals = match dir {
                Direction::Load => &mut self.totals,
                Direction::Unload => &mut self.unloaded,
            };
            let tot = totals.entry(c.currency).or_default();
            tot.count += 1;
            tot.amount += c.amount;
        }
    }

    /// Verifies S3 on the card's answer to LOAD. Idempotent for a repeated answer.
    pub fn confirm(&mut self, id: &str, resp: &LoadResponse) -> Result<LoadVerdict, HsmError> {
        self.confirm_in(Direction::Load, id, resp)
    }

    /// Verifies S3 (the unload label) on the card's answer to UNLOAD: `Loaded` — the card
    /// gave the value up, counted in [`Self::total_unloaded`] — or a negative result for
    /// [`Self::resolve_unload_negative`]. Idempotent for a repeated answer.
    ///
    /// # Errors
    /// As [`Self::confirm`].
    pub fn confirm_unload(
        &mut self,
        id: &str,
        resp: &LoadResponse,
    ) -> Result<LoadVerdict, HsmError> {
        self.confirm_in(Direction::Unload, id, resp)
    }

    fn confirm_in(
        &mut self,
        dir: Direction,
        id: &str,
        resp: &LoadResponse,
    ) -> Result<LoadVerdict, HsmError> {
        let t = self.txn(id, dir)?;
        let c = &t.command;
        if resp.card_id != c.card_id
            || resp.atc != c.atc
            || resp.amount != c.amount
            || resp.currency != c.currency
        {
            return Err(HsmError::ResponseMismatch);
        }
        let key = self.purse_load_key(&t.init)?;
        if !crypto::verify(&key, dir.labels().2, &resp.signed_fields(&c.s2), &resp.s3) {
            return Err(HsmError::BadS3);
        }
        match (&t.state, resp.is_loaded()) {
            (LoadState::Loaded, true) => Ok(LoadVerdict::Loaded),
            (LoadState::NegativePending { response }, false) if response == resp => {
                Ok(LoadVerdict::NegativeNeedsProof)
            }
            (LoadState::Authorized, true) => {
                self.settle(id, true, dir);
                Ok(LoadVerdict::Loaded)
            }
            (LoadState::Authorized, false) => {
                self.book_mut(dir).get_mut(id).expect("present").state =
                    LoadState::NegativePending {
                        response: resp.clone(),
                    };
                Ok(LoadVerdict::NegativeNeedsProof)
            }
            _ => Err(HsmError::WrongState(id.into())),
        }
    }

    /// The negative-result procedure of 001 [0130]–[0132]. `zero` is the card's answer to
    /// a zero-value INITIALIZE FOR LOAD made after the negative result. Also used when the
    /// card never answered LOAD (pulled out): the transaction is still `Authorized` then.
    pub fn resolve_negative(
        &mut self,
        id: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError> {
        self.resolve_negative_in(Direction::Load, id, zero)
    }

    /// The negative-result procedure in reverse, for an unload whose card said "not
    /// unloaded" or never answered: `zero` is its answer to a zero-value INITIALIZE FOR
    /// UNLOAD made after it. `loaded()` of the verdict: the card did give the value up.
    ///
    /// # Errors
    /// As [`Self::resolve_negative`].
    pub fn resolve_unload_negative(
        &mut self,
        id: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError> {
        self.resolve_negative_in(Direction::Unload, id, zero)
    }

    fn resolve_negative_in(
        &mut self,
        dir: Direction,
        id: &str,
        zero: &LoadInit,
    ) -> Result<NegativeVerdict, HsmError> {
        if zero.amount != 0 {
            return Err(HsmError::BadZeroValueRequest);
        }
        self.resolve_by(dir, id, zero, dir, true)
    }

    /// Settles the open load or unload `id` (issue 17, the second outside attack's U1) from
    /// the card's INITIALIZE FOR LOAD or UNLOAD of a *later* session, of any amount (`later`,
    /// an unload's when `later_is_unload`): the card's list of the sessions it ran, under the
    /// later S1, says whether `id`'s ran — exactly as the negative-result procedure's
    /// zero-value proof does. The load server settles a card's open sessions so from the
    /// card's next load or unload request, before authorising it: a card then never has more
    /// sessions since an open one than its list keeps, and no hold is stranded because its
    /// session can no longer be proved. The later session may be of the card's other purse
    /// (money or points): the list is the card's, whichever purse ran, and the later S1 is
    /// checked under its own purse's key (an outside attack found points loads pushing an
    /// open money unload off the list while never settling it). Returns whether `id` is an
    /// unload, and the verdict.
    ///
    /// # Errors
    /// As [`Self::resolve_negative`] (another card or currency: `BadZeroValueRequest`).
    pub fn resolve_from_later(
        &mut self,
        id: &str,
        later: &LoadInit,
        later_is_unload: bool,
    ) -> Result<(bool, NegativeVerdict), HsmError> {
        let later_dir = if later_is_unload {
            Direction::Unload
        } else {
            Direction::Load
        };
        let dir = if self.unloads.contains_key(id) {
            Direction::Unload
        } else {
            Direction::Load
        };
        let v = self.resolve_by(dir, id, later, later_dir, false)?;
        Ok((dir == Direction::Unload, v))
    }

    /// `same_purse`: the proof must be of the session's own purse (the zero-value proof of
    /// [0130] is).
    fn resolve_by(
        &mut self,
        dir: Direction,
        id: &str,
        zero: &LoadInit,
        proof_dir: Direction,
        same_purse: bool,
    ) -> Result<NegativeVerdict, HsmError> {
        let t = self.txn(id, dir)?;
        match &t.state {
            LoadState::Authorized | LoadState::NegativePending { .. } => {}
            LoadState::Loaded => return Ok(NegativeVerdict::FalseNegative),
            LoadState::NotLoaded => return Err(HsmError::WrongState(id.into())),
        }
        let orig = &t.init;
        if zero.card_id != orig.card_id || (same_purse && zero.currency != orig.currency) {
            return Err(HsmError::BadZeroValueRequest);
        }
        // The new S1 must be the card's own, over what the box reports, and made after the
        // load's own INITIALIZE: that ended the load's session, so its LOAD ran before this
        // proof (and shows in its counters) or never will.
        self.check_s1(zero, proof_dir)?;
        if zero.init_count <= orig.init_count {
            return Err(HsmError::StaleProof);
        }
        // Whether this very session ran: the card names, under the S1 just verified, the
        // last sessions whose LOAD or UNLOAD it carried out. A session after ours ended it
        // (the proof's count is higher), so ours ran before the proof or never will. (The
        // card's load counter alone cannot tell: any other load or unload, at any HSM,
        // moves it too — an outside attack on the unload found that, and the load's own
        // procedure had the same gap.)
        // This session, with this HSM's command: another HSM's command for the same session
        // (the same S1 authorized there too) is not ours.
        let session = orig.init_count;
        let ran = zero.runs.contains(&(session, self.id));
        let window_full = zero.runs.iter().all(|r| r.0 != 0);
        if !ran && window_full && zero.runs.iter().all(|r| r.0 > session) {
            // So many sessions ran since that ours may have left the card's list.
            return Err(HsmError::ProofUnavailable);
        }
        // Branch A or B ([0131] / [0132]): not carried out, and the counter unmoved or
        // moved by accident.
        let verdict = match (ran, zero.atc == orig.atc) {
            (true, _) => NegativeVerdict::FalseNegative,
            (false, true) => NegativeVerdict::TrueNegative,
            (false, false) => NegativeVerdict::CounterBumped,
        };
        self.settle(id, verdict.loaded(), dir);
        Ok(verdict)
    }

    /// Drops a settled load (loaded or not) from the working set, keeping the totals; see
    /// [`crate::security_card::SecurityCard::forget`]. Open loads are kept.
    pub fn forget(&mut self, id: &str) -> bool {
        [Direction::Load, Direction::Unload].into_iter().any(|dir| {
            let book = self.book_mut(dir);
            let settled = book
                .get(id)
                .is_some_and(|t| matches!(t.state, LoadState::Loaded | LoadState::NotLoaded));
            if settled {
                book.remove(id);
            }
            settled
        })
    }

    pub fn total(&self, currency: Currency) -> Totals {
        self.totals.get(&currency).copied().unwrap_or_default()
    }

    /// What cards proved they unloaded, in `currency`.
    pub fn total_unloaded(&self, currency: Currency) -> Totals {
        self.unloaded.get(&currency).copied().unwrap_or_default()
    }
}
