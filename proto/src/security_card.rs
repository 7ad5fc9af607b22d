//! The security card (PSAM) of a payment-server terminal (001 security card 218), sans-IO.
//!
//! It checks the card data carried in the draw request (the card's MAC on its INITIALIZE
//! FOR PURCHASE response), issues the debit command with its signature ([0094]), and either
//! compares the card signature itself (FIG. 4, [0084]–[0085]) or hands out the expected card
//! signature for early release (FIG. 5–7, [0095]–[0105]). It keeps its own transaction
//! counter, totals and collection records ([0044], [0086]) and reverses a transaction that
//! does not complete ([0106]).
//!
//! Totals only ever count value the card has given up, or (early release) value it will
//! have given up unless the transaction is reversed. A reversed transaction whose debit is
//! later proved by the card's signature (the box re-sends it from its journal) is counted
//! then: no value is lost either way.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::crypto::{self, Mac};
use crate::hotlist::Hotlist;
use crate::money::{Currency, Money};
use crate::purse::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum SecurityCardError {
    #[error("card data does not verify (its MAC is wrong: tampered or not a genuine card)")]
    BadCardData,
    #[error("card key version {card} is not one this security card holds ({ours})")]
    UnknownKeyVersion { card: u8, ours: u8 },
    #[error(
        "the card's currency {} is not the purchase currency {}",
        .card.alpha(),
        .purchase.alpha()
    )]
    WrongCurrency { card: Currency, purchase: Currency },
    #[error("the card expired")]
    Expired,
    #[error("the card holds {balance} but the purchase is {amount}")]
    InsufficientValue { balance: u64, amount: u64 },
    #[error("zero-value purchase")]
    ZeroAmount,
    #[error("no transaction {0} in this security card")]
    UnknownTransaction(u32),
    #[error("the card signature does not verify")]
    BadCardSignature,
    #[error("the debit response is for another transaction or amount")]
    ResponseMismatch,
    #[error("transaction {0} completed: a proved debit cannot be reversed")]
    AlreadyCompleted(u32),
    #[error("security card transaction counter exhausted")]
    CounterExhausted,
    #[error("the security card has no purchase master key loaded")]
    NoKey,
    #[error("the proof was made before the draw's INITIALIZE (a stale proof): it shows nothing")]
    StaleProof,
    /// A proof whose transaction counter moved past the debit command's: the card ran a
    /// DEBIT since (this purchase's or a later one), so the proof cannot show this one was not.
    #[error(
        "the card's counter moved on (proof {proof}, debit command {debit}): the card debited \
         since, so the proof cannot show this purchase was not debited"
    )]
    CounterMoved { proof: u32, debit: u32 },
    /// The card is on the issuer's hotlist (seed 002): no draw. Appended, like every new
    /// variant here.
    #[error("the card is blocked by its issuer (hotlist)")]
    Hotlisted { card_id: u64 },
    /// The card's key version is retired: it buys again once a load has re-keyed it.
    #[error("card key version {card} is retired: load value onto the card to update its keys")]
    RetiredKeyVersion { card: u8 },
    /// The terminal could not get a valid answer from its security card (a hardware card
    /// in a reader: the reader failed, the card was pulled, or it answered garbage). What
    /// the card did is not known from here; the payment server reverses and takes the
    /// terminal out of its pool.
    #[error("security card terminal failed: {0}")]
    Terminal(String),
    /// An authentication draw (002 FIG. 16) carries no value: only zero exists in
    /// [`Currency::AUTHENTICATION`].
    #[error("an authentication draw carries no value, but this one is for {amount}")]
    ValueInAuthentication { amount: u64 },
    /// A refund larger than what this security card has counted in its currency (its net
    /// totals would go below zero).
    #[error("a refund of {amount} is more than the {total} this security card has counted")]
    RefundExceedsTotals { total: u64, amount: u64 },
    /// A refund ([`TxnState::CreditIssued`]) is reversed only with the card's proof that
    /// it was not credited ([`SecurityCard::resolve_credit`]): reversing it blind could
    /// leave the value on the card and in the merchant's totals both.
    #[error("refund {0} was issued: only the card's proof that it was not credited reverses it")]
    CreditNeedsProof(u32),
    /// A refund for a card INITIALIZE that already has one (or for an older one): the card
    /// runs one command per session, so a second could never be credited — nor proved not
    /// credited once the first moved the card's counter.
    #[error("the card's INITIALIZE FOR CREDIT {init_count} already has a refund")]
    InitializeUsed { card_id: u64, init_count: u32 },
    /// The card's INITIALIZE no longer reaches back to the refund's session: so many
    /// credits ran since that whether this one did cannot be told from the card.
    #[error("refund {0}: the card's list of credits no longer reaches back to its session")]
    ProofUnavailable(u32),
}

/// The draw request's card part, as the security card sees it ([0077], [0093]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrawData {
    pub merchant_id: String,
    pub transaction_id: String,
    pub amount: Money,
    pub init: PurchaseInit,
}

/// What the security card hands back at the "draw amount" state ([0094], [0095]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebitAuthorization {
    pub command: DebitCommand,
    /// Present for the early-release embodiments (FIG. 5–7).
    pub expected_card_signature: Option<Mac>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnState {
    /// FIG. 4: the debit command is out; the card's response is awaited.
    Awaiting,
    /// FIG. 5–7: counted at issue, the expected signature handed out.
    EarlyRecorded,
    /// The card's signature was verified here.
    Completed,
    Reversed,
    // Appended (postcard indices above stay put): refunds (CREDIT).
    /// A refund's credit command is out; counted off the totals at issue.
    CreditIssued,
    /// The card's signature on the refund was verified.
    CreditCompleted,
    /// Proved not credited (the card's proof): counted back.
    CreditReversed,
}

impl TxnState {
    /// Whether this is a refund's state.
    pub fn is_credit(self) -> bool {
        matches!(
            self,
            TxnState::CreditIssued | TxnState::CreditCompleted | TxnState::CreditReversed
        )
    }

    /// Whether the outcome is final and recorded (a sale counted and proved, or a refund
    /// credited or proved not credited): the card may forget it.
    fn settled(self) -> bool {
        matches!(
            self,
            TxnState::Completed
                | TxnState::EarlyRecorded
                | TxnState::CreditCompleted
                | TxnState::CreditReversed
        )
    }
}

/// A collection record for the acquirer ([0086], [0045]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectionRecord {
    pub security_card_id: u64,
    pub security_card_txn: u32,
    pub merchant_id: String,
    pub transaction_id: String,
    pub card_id: u64,
    pub atc: u32,
    pub amount: Money,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub draw: DrawData,
    pub command: DebitCommand,
    pub state: TxnState,
    expected: Mac,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    pub count: u64,
    pub amount: u64,
}

/// The software security card. Its state is serializable, so the payment server can journal
/// it; its purchase master key is not (`#[serde(skip)]`): a snapshot holds state only, and
/// the key is given again from the key store when the card is restored ([`Self::with_key`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SecurityCard {
    pub id: u64,
    #[serde(skip)]
    master: Option<MasterKeys>,
    pub txn_counter: u32,
    pub txns: BTreeMap<u32, Txn>,
    pub totals: BTreeMap<Currency, Totals>,
    /// The issuer's hotlist, given to the card like its key (not in a snapshot: the payment
    /// server loads its newest at every start and on every update).
    #[serde(skip)]
    hotlist: Hotlist,
    /// In an exported state (a snapshot the payment server journals) only: the
    /// transactions of cards whose holder chose privacy (seed 004;
    /// [`PurchaseInit::privacy`]), sealed by whoever exported it
    /// ([`Self::exported`]), so the card id stays inside the security card. Empty in a
    /// working card ([`Self::import_sealed`]).
    pub sealed: BTreeMap<u32, Vec<u8>>,
}

impl SecurityCard {
    pub fn new(id: u64, master: impl Into<MasterKeys>) -> Self {
        Self {
            id,
            master: Some(master.into()),
            txn_counter: 0,
            txns: BTreeMap::new(),
            totals: BTreeMap::new(),
            hotlist: Hotlist::default(),
            sealed: BTreeMap::new(),
        }
    }

    /// A hardware security card's summary as the payment server journals it: id, counter
    /// and totals, no transactions and no key (the card keeps those itself).
    pub fn summary(id: u64, txn_counter: u32, totals: BTreeMap<Currency, Totals>) -> Self {
        Self {
            id,
            master: None,
            txn_counter,
            txns: BTreeMap::new(),
            totals,
            hotlist: Hotlist::default(),
            sealed: BTreeMap::new(),
        }
    }

    /// Loads the issuer's hotlist (a newer one replaces it; an older one is ignored).
    pub fn set_hotlist(&mut self, hotlist: &Hotlist) {
        self.hotlist.update(hotlist);
    }

    /// The hotlist the card holds.
    pub fn hotlist(&self) -> &Hotlist {
        &self.hotlist
    }

    /// The newest active key version the card holds (`None`: no key loaded).
    pub fn newest_key_version(&self) -> Option<u8> {
        self.master.as_ref().map(|k| k.newest().key_version)
    }

    /// The version of the hotlist the card holds (0: none).
    pub fn hotlist_version(&self) -> u64 {
        self.hotlist.version
    }

    /// This card (restored from a snapshot, which holds no key) with its purchase master.
    pub fn with_key(mut self, master: impl Into<MasterKeys>) -> Self {
        self.master = Some(master.into());
        self
    }

    /// The purchase masters the card holds (`None`: none loaded).
    pub fn master_keys(&self) -> Option<&MasterKeys> {
        self.master.as_ref()
    }

    /// Whether [`Self::exported`] seals `t`: a privacy card's transaction, or a refund.
    pub fn kept_sealed(t: &Txn) -> bool {
        t.draw.init.privacy || t.state.is_credit()
    }

    /// Whether [`Self::exported`] has anything to seal.
    pub fn has_sealed(&self) -> bool {
        self.txns.values().any(Self::kept_sealed)
    }

    /// This card's state for export: every transaction of a privacy card, and every refund
    /// (its card may have chosen privacy after the sale, or before it and not since: the
    /// sale's choice is the payment server's to know, so refunds are all kept sealed),
    /// moved out of [`Self::txns`] into [`Self::sealed`] by `seal` (the caller's cipher:
    /// this crate does no IO and draws no randomness of its own).
    pub fn exported(&self, seal: impl Fn(&Txn) -> Vec<u8>) -> SecurityCard {
        let mut out = self.clone();
        out.txns.retain(|n, t| {
            if Self::kept_sealed(t) {
                out.sealed.insert(*n, seal(t));
                false
            } else {
                true
            }
        });
        out
    }

    /// Takes an exported state's sealed transactions back into [`Self::txns`] with `open`.
    ///
    /// # Errors
    /// `open`'s, for the first that does not open (the state is left as it was).
    pub fn import_sealed(
        &mut self,
        open: impl Fn(&[u8]) -> Result<Txn, String>,
    ) -> Result<(), String> {
        let mut opened = Vec::with_capacity(self.sealed.len());
        for (n, s) in &self.sealed {
            opened.push((
                *n,
                open(s).map_err(|e| format!("security card transaction {n}: {e}"))?,
            ));
        }
        self.sealed.clear();
        self.txns.extend(opened);
        Ok(())
    }

    /// Takes `state`'s transactions, counter and totals (a snapshot, rolled back to) and
    /// keeps this card's key and hotlist.
    pub fn restore_state(&mut self, state: SecurityCard) {
        let master = self.master.take();
        let hotlist = std::mem::take(&mut self.hotlist);
        *self = state;
        self.master = master;
        self.hotlist = hotlist;
    }

    /// The purchase master of a card's key `version`: an unknown version is refused, and a
    /// retired one too when the card is `buying`.
    fn master(&self, version: u8, buying: bool) -> Result<&MasterKey, SecurityCardError> {
        let keys = self.master.as_ref().ok_or(SecurityCardError::NoKey)?;
        let key = keys
            .get(version)
            .ok_or(SecurityCardError::UnknownKeyVersion {
                card: version,
                ours: keys.newest().key_version,
            })?;
        if buying && keys.is_retired(version) {
            return Err(SecurityCardError::RetiredKeyVersion { card: version });
        }
        Ok(key)
    }

    /// Processes the draw request up to the "draw amount" state and issues the debit
    /// command. `early_release` also returns the expected card signature and records the
    /// transaction now (FIG. 5–7).
    pub fn issue_debit(
        &mut self,
        draw: &DrawData,
        today: Date,
        early_release: bool,
    ) -> Result<DebitAuthorization, SecurityCardError> {
        let init = &draw.init;
        let master = self.master(init.key_version, true)?;
        // The purse the card answered for (its currency, under the MAC checked next): money,
        // or the points purse (002 [0164]), each with its own key.
        let purse = Purse::of(init.currency);
        let sk = master.purse_purchase_session(purse, init.card_id, init.atc);
        if !crypto::verify(&sk, b"IPUR", &init.signed_fields(), &init.card_mac) {
            return Err(SecurityCardError::BadCardData);
        }
        // The id is the genuine card's (its MAC verified): now the issuer's block applies.
        if self.hotlist.blocks(init.card_id) {
            return Err(SecurityCardError::Hotlisted {
                card_id: init.card_id,
            });
        }
        // An authentication draw (002 FIG. 16) is zero in its own currency, whatever the
        // card's: its "draw amount" state is zero.
        let authentication =
            draw.amount.currency == Currency::AUTHENTICATION && purse == Purse::Money;
        if init.currency != draw.amount.currency && !authentication {
            return Err(SecurityCardError::WrongCurrency {
                card: init.currency,
                purchase: draw.amount.currency,
            });
        }
        if init.expiry.is_expired_on(today) {
            return Err(SecurityCardError::Expired);
        }
        if authentication && draw.amount.minor != 0 {
            return Err(SecurityCardError::ValueInAuthentication {
                amount: draw.amount.minor,
            });
        }
        if draw.amount.minor == 0 && !authentication {
            return Err(SecurityCardError::ZeroAmount);
        }
        let new_balance = init.balance.checked_sub(draw.amount.minor).ok_or(
            SecurityCardError::InsufficientValue {
                balance: init.balance,
                amount: draw.amount.minor,
            },
        )?;
        let (command, expected) = self.issue(draw, today, new_balance, &sk, (b"DCMD", b"DRSP"))?;
        let security_card_txn = command.security_card_txn;
        let state = if early_release {
            TxnState::EarlyRecorded
        } else {
            TxnState::Awaiting
        };
        self.txns.insert(
            security_card_txn,
            Txn {
                draw: draw.clone(),
                command: command.clone(),
                state,
                expected,
            },
        );
        if early_release {
            self.count(draw.amount, 1);
        }
        Ok(DebitAuthorization {
            command,
            expected_card_signature: early_release.then_some(expected),
        })
    }

    /// The next transaction number's command for `data` (a debit command, or a credit
    /// command's fields), signed under `sk` with `labels.0`, and the card's expected
    /// signature on its answer (`new_balance` after it) under `labels.1`.
    fn issue(
        &mut self,
        data: &DrawData,
        today: Date,
        new_balance: u64,
        sk: &crate::crypto::DesKey,
        labels: (&[u8; 4], &[u8; 4]),
    ) -> Result<(DebitCommand, Mac), SecurityCardError> {
        let init = &data.init;
        let security_card_txn = self
            .txn_counter
            .checked_add(1)
            .ok_or(SecurityCardError::CounterExhausted)?;
        self.txn_counter = security_card_txn;
        let mut command = DebitCommand {
            security_card_id: self.id,
            security_card_txn,
            card_id: init.card_id,
            atc: init.atc,
            amount: data.amount.minor,
            currency: data.amount.currency,
            date: today,
            security_card_signature: [0; 8],
        };
        command.security_card_signature =
            crypto::sign(sk, labels.0, &command.signed_fields(&init.card_random));
        let mut expected_response = DebitResponse {
            card_id: init.card_id,
            atc: init.atc,
            amount: data.amount.minor,
            currency: data.amount.currency,
            new_balance,
            security_card_id: self.id,
            security_card_txn,
            card_signature: [0; 8],
        };
        expected_response.card_signature = crypto::sign(
            sk,
            labels.1,
            &expected_response.signed_fields(&init.card_random),
        );
        // The expected signature bound to the whole expected response.
        Ok((command, expected_response.check_value()))
    }

    /// Takes a refund off the net totals' amount (`issued`), or puts it back (proved not
    /// credited). The count stays the number of sales. The caller checked the amount is
    /// there ([`SecurityCardError::RefundExceedsTotals`]).
    fn count_refund(&mut self, amount: Money, issued: bool) {
        let t = self.totals.entry(amount.currency).or_default();
        if issued {
            t.amount = t.amount.saturating_sub(amount.minor);
        } else {
            t.amount = t.amount.saturating_add(amount.minor);
        }
    }

    /// Counts a sale into (or, reversed, out of) the totals. An authentication counts
    /// nowhere: it is no payment ([0161]: no payment record).
    fn count(&mut self, amount: Money, sign: i8) {
        if amount.currency == Currency::AUTHENTICATION {
            return;
        }
        let t = self.totals.entry(amount.currency).or_default();
        // Saturating: the callers keep the totals from going below zero (a refund never
        // takes what may still be reversed); a security card never panics on its input.
        if sign > 0 {
            t.count = t.count.saturating_add(1);
            t.amount = t.amount.saturating_add(amount.minor);
        } else {
            t.count = t.count.saturating_sub(1);
            t.amount = t.amount.saturating_sub(amount.minor);
        }
    }

    /// FIG. 4: verifies the card signature on the debit response and records the sale.
    /// Also accepts the late proof of a debit on a reversed transaction (the box re-sends
    /// it from its journal). Idempotent: a repeated response gets the same record.
    pub fn complete(
        &mut self,
        security_card_txn: u32,
        resp: &DebitResponse,
    ) -> Result<CollectionRecord, SecurityCardError> {
        let txn = self
            .txns
            .get(&security_card_txn)
            .ok_or(SecurityCardError::UnknownTransaction(security_card_txn))?;
        if txn.state.is_credit() || !resp.answers(&txn.command) {
            return Err(SecurityCardError::ResponseMismatch);
        }
        if !Self::signatures_match(&txn.expected, resp) {
            return Err(SecurityCardError::BadCardSignature);
        }
        let (state, amount) = (txn.state, txn.draw.amount);
        if matches!(state, TxnState::Awaiting | TxnState::Reversed) {
            self.count(amount, 1);
        }
        let txn = self
            .txns
            .get_mut(&security_card_txn)
            .expect("looked up above");
        if txn.state != TxnState::EarlyRecorded {
            txn.state = TxnState::Completed;
        }
        Ok(self.record(security_card_txn).expect("present"))
    }

    /// The comparison of a card's signature in its debit response with the expected card
    /// signature (001 [0085] FIG. 4, [0097] FIG. 5, [0101] FIG. 6, [0105] FIG. 7):
    /// the security card's own check, and the one whoever holds the expected signature runs
    /// in its place (the head end's `gateway::embodiment::card_signature_matches`, the
    /// merchant's FIG. 7 routine). `expected` is the expected response's check value
    /// ([`DebitResponse::check_value`]): the card's signature and every field it signs —
    /// a response with the genuine signature and another new balance does not match (an
    /// outside attack had one accepted and journaled). Constant time.
    pub fn signatures_match(expected: &Mac, resp: &DebitResponse) -> bool {
        crypto::mac_eq(expected, &resp.check_value())
    }

    /// Checks a box's proof that the card never ran the DEBIT: a fresh INITIALIZE FOR
    /// PURCHASE response, MAC'd by the card, made after the draw's (a higher INITIALIZE
    /// count: that ended the draw's session, so the DEBIT can never run afterwards), whose
    /// transaction number is still the one the debit command was for (a debit would have
    /// moved it on).
    pub fn verify_not_debited(
        &self,
        security_card_txn: u32,
        proof: &PurchaseInit,
    ) -> Result<(), SecurityCardError> {
        let txn = self
            .txns
            .get(&security_card_txn)
            .ok_or(SecurityCardError::UnknownTransaction(security_card_txn))?;
        let sk = self
            .master(proof.key_version, false)?
            .purse_purchase_session(Purse::of(proof.currency), proof.card_id, proof.atc);
        if proof.card_id != txn.command.card_id
            || !crypto::verify(&sk, b"IPUR", &proof.signed_fields(), &proof.card_mac)
        {
            return Err(SecurityCardError::BadCardData);
        }
        if proof.init_count <= txn.draw.init.init_count {
            return Err(SecurityCardError::StaleProof);
        }
        if proof.atc == txn.command.atc {
            Ok(())
        } else {
            Err(SecurityCardError::CounterMoved {
                proof: proof.atc,
                debit: txn.command.atc,
            })
        }
    }

    /// Reverses a transaction that did not complete ([0106]). Idempotent.
    pub fn reverse(&mut self, security_card_txn: u32) -> Result<(), SecurityCardError> {
        let txn = self
            .txns
            .get(&security_card_txn)
            .ok_or(SecurityCardError::UnknownTransaction(security_card_txn))?;
        match txn.state {
            TxnState::Reversed => Ok(()),
            TxnState::Completed => Err(SecurityCardError::AlreadyCompleted(security_card_txn)),
            TxnState::CreditIssued | TxnState::CreditCompleted | TxnState::CreditReversed => {
                Err(SecurityCardError::CreditNeedsProof(security_card_txn))
            }
            TxnState::Awaiting => {
                self.txns
                    .get_mut(&security_card_txn)
                    .expect("present")
                    .state = TxnState::Reversed;
                Ok(())
            }
            TxnState::EarlyRecorded => {
                let amount = txn.draw.amount;
                self.count(amount, -1);
                self.txns
                    .get_mut(&security_card_txn)
                    .expect("present")
                    .state = TxnState::Reversed;
                Ok(())
            }
        }
    }

    /// Drops a settled transaction (its sale counted and proved) from the card's working set,
    /// keeping the totals. The caller must have recorded the outcome durably first: afterwards
    /// this card no longer knows the transaction, so repeats are answered from that record.
    /// Without this the card's state — journaled after every step — would grow with every
    /// sale. Open and reversed transactions are kept (a late proof may still come).
    pub fn forget(&mut self, security_card_txn: u32) -> bool {
        let settled = self
            .txns
            .get(&security_card_txn)
            .is_some_and(|t| t.state.settled());
        if settled {
            self.txns.remove(&security_card_txn);
        }
        settled
    }

    /// Drops every counted transaction (early-recorded or completed) but those in `open`,
    /// in one command: the payment server's housekeeping for the transactions it settled
    /// without the card (FIG. 5, [0097]: it compared the signature itself), so no command
    /// names them one by one. `open` are the ones the payment server may still reverse; they
    /// stay, as do those awaiting the card's comparison and reversed ones (a late proof is
    /// checked against them). The number dropped.
    pub fn purge_settled_except(&mut self, open: &[u32]) -> usize {
        let before = self.txns.len();
        self.txns
            .retain(|n, t| open.contains(n) || !t.state.settled());
        before - self.txns.len()
    }

    /// Issues a refund's credit command (issue 17: a merchant refunds a purchase to the
    /// card) for the card's INITIALIZE FOR CREDIT answer in `credit.init` (its MAC under
    /// [`CreditCommand::INIT_LABEL`]), `credit.amount` in the card's currency. The refund
    /// is counted off this card's totals at once — the card may credit as soon as it has
    /// the command — and counted back only on the card's proof that it was not credited
    /// ([`Self::resolve_credit`]). Which sale it refunds, and that it is refunded once and
    /// not above its price, is the payment server's record to keep.
    ///
    /// # Errors
    /// `BadCardData` (the MAC), `Hotlisted`, `WrongCurrency`, `Expired`, `ZeroAmount`,
    /// `RefundExceedsTotals`, key version and counter errors.
    pub fn issue_credit(
        &mut self,
        credit: &DrawData,
        today: Date,
    ) -> Result<CreditCommand, SecurityCardError> {
        let init = &credit.init;
        let sk = self
            .master(init.key_version, false)?
            .purchase_session(init.card_id, init.atc);
        if !crypto::verify(
            &sk,
            CreditCommand::INIT_LABEL,
            &init.signed_fields(),
            &init.card_mac,
        ) {
            return Err(SecurityCardError::BadCardData);
        }
        if self.hotlist.blocks(init.card_id) {
            return Err(SecurityCardError::Hotlisted {
                card_id: init.card_id,
            });
        }
        let amount = credit.amount;
        if init.currency != amount.currency {
            return Err(SecurityCardError::WrongCurrency {
                card: init.currency,
                purchase: amount.currency,
            });
        }
        if init.expiry.is_expired_on(today) {
            return Err(SecurityCardError::Expired);
        }
        if amount.minor == 0 {
            return Err(SecurityCardError::ZeroAmount);
        }
        // One refund per card session ([`SecurityCardError::InitializeUsed`]).
        if self.txns.values().any(|t| {
            t.state.is_credit()
                && t.command.card_id == init.card_id
                && t.draw.init.init_count >= init.init_count
        }) {
            return Err(SecurityCardError::InitializeUsed {
                card_id: init.card_id,
                init_count: init.init_count,
            });
        }
        // Only what is settled can be refunded: an early-recorded sale (FIG. 5-7) may still
        // be reversed, which would take it off the totals a second time.
        let reversible: u64 = self
            .txns
            .values()
            .filter(|t| {
                t.state == TxnState::EarlyRecorded && t.draw.amount.currency == amount.currency
            })
            .map(|t| t.draw.amount.minor)
            .sum();
        let total = self
            .total(amount.currency)
            .amount
            .saturating_sub(reversible);
        if total < amount.minor {
            return Err(SecurityCardError::RefundExceedsTotals {
                total,
                amount: amount.minor,
            });
        }
        let new_balance = init.balance.saturating_add(amount.minor);
        let (command, expected) = self.issue(
            credit,
            today,
            new_balance,
            &sk,
            (CreditCommand::LABEL, CreditResponse::LABEL),
        )?;
        let security_card_txn = command.security_card_txn;
        self.txns.insert(
            security_card_txn,
            Txn {
                draw: credit.clone(),
                command: command.clone(),
                state: TxnState::CreditIssued,
                expected,
            },
        );
        self.count_refund(amount, true);
        Ok(CreditCommand(command))
    }

    /// Verifies the card's signature on its credit response: the refund is credited.
    /// Idempotent.
    ///
    /// # Errors
    /// `UnknownTransaction`, `ResponseMismatch` (another refund, or not a refund),
    /// `BadCardSignature`; `AlreadyCompleted` for a refund proved not credited (it cannot
    /// have been: the card's proof ended its session).
    pub fn complete_credit(
        &mut self,
        security_card_txn: u32,
        resp: &CreditResponse,
    ) -> Result<(), SecurityCardError> {
        let txn = self
            .txns
            .get_mut(&security_card_txn)
            .ok_or(SecurityCardError::UnknownTransaction(security_card_txn))?;
        if !txn.state.is_credit() || !resp.0.answers(&txn.command) {
            return Err(SecurityCardError::ResponseMismatch);
        }
        if !Self::signatures_match(&txn.expected, &resp.0) {
            return Err(SecurityCardError::BadCardSignature);
        }
        match txn.state {
            TxnState::CreditReversed => Err(SecurityCardError::AlreadyCompleted(security_card_txn)),
            _ => {
                txn.state = TxnState::CreditCompleted;
                Ok(())
            }
        }
    }

    /// Settles an issued refund on the card's own word: `later` is an INITIALIZE FOR
    /// PURCHASE the card answered after the refund's INITIALIZE FOR CREDIT (a higher count:
    /// that ended the credit session, so its CREDIT ran before it or never will), MACed by
    /// the card. The card names in it the last credit sessions it carried out, with the
    /// security card whose command ran ([`PurchaseInit::credits`]): this session with this
    /// security card among them — credited (`Ok(true)`, the refund stays counted off);
    /// not among them while the list still reaches back to it — not credited (`Ok(false)`,
    /// counted back into the totals). Whatever the card did in between (purchases, loads,
    /// more refunds, a log that rolled over) does not change the answer. Idempotent.
    ///
    /// # Errors
    /// `BadCardData` (not the card's, or not its MAC), `StaleProof` (not later than the
    /// credit's INITIALIZE), `ProofUnavailable` (so many credits ran since that the list no
    /// longer reaches back: an operator settles it); `ResponseMismatch` for a sale.
    pub fn resolve_credit(
        &mut self,
        security_card_txn: u32,
        later: &PurchaseInit,
    ) -> Result<bool, SecurityCardError> {
        let txn = self
            .txns
            .get(&security_card_txn)
            .ok_or(SecurityCardError::UnknownTransaction(security_card_txn))?;
        match txn.state {
            TxnState::CreditReversed => return Ok(false),
            TxnState::CreditCompleted => return Ok(true),
            TxnState::CreditIssued => {}
            _ => return Err(SecurityCardError::ResponseMismatch),
        }
        let sk = self
            .master(later.key_version, false)?
            .purse_purchase_session(Purse::of(later.currency), later.card_id, later.atc);
        if later.card_id != txn.command.card_id
            || !crypto::verify(&sk, b"IPUR", &later.signed_fields(), &later.card_mac)
        {
            return Err(SecurityCardError::BadCardData);
        }
        let session = txn.draw.init.init_count;
        if later.init_count <= session {
            return Err(SecurityCardError::StaleProof);
        }
        let ran = later.credits.contains(&(session, self.id));
        let window_full = later.credits.iter().all(|r| r.0 != 0);
        if !ran && window_full && later.credits.iter().all(|r| r.0 > session) {
            return Err(SecurityCardError::ProofUnavailable(security_card_txn));
        }
        let txn = self
            .txns
            .get_mut(&security_card_txn)
            .expect("looked up above");
        if ran {
            txn.state = TxnState::CreditCompleted;
        } else {
            txn.state = TxnState::CreditReversed;
            let amount = txn.draw.amount;
            self.count_refund(amount, false);
        }
        Ok(ran)
    }

    /// The collection record of a counted transaction.
    pub fn record(&self, security_card_txn: u32) -> Option<CollectionRecord> {
        let t = self.txns.get(&security_card_txn)?;
        // Refunds are the payment server's records; the card's net totals carry them.
        matches!(t.state, TxnState::Completed | TxnState::EarlyRecorded).then(|| CollectionRecord {
            security_card_id: self.id,
            security_card_txn,
            merchant_id: t.draw.merchant_id.clone(),
            transaction_id: t.draw.transaction_id.clone(),
            card_id: t.command.card_id,
            atc: t.command.atc,
            amount: t.draw.amount,
        })
    }

    /// Every counted transaction, for the collection file: the sales, not the
    /// authentications (002 FIG. 16: "authentication OK", no payment record).
    pub fn collection(&self) -> Vec<CollectionRecord> {
        self.txns
            .keys()
            .filter_map(|k| self.record(*k))
            .filter(|r| !r.amount.is_authentication())
            .collect()
    }

    pub fn total(&self, currency: Currency) -> Totals {
        self.totals.get(&currency).copied().unwrap_or_default()
    }
}
