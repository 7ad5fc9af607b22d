//! Refunds (issue 17; seed 004's refund to the card): a merchant gives back what a card paid
//! for a sale, with a credit command signed by the security card that counted the sale.
//!
//! 1. **Authorization.** The merchant (its operator: `headend refund --txid T [--amount A]`)
//!    authorizes the refund of sale T ([`authorize`]): one write checks that T is a
//!    completed sale of this payment server, that the amount is above zero and at most the
//!    sale's, and that T has no refund yet — the sale's id keys its refund (journal kind
//!    `refund`), so a sale is refunded at most once.
//! 2. **Delivery.** The card's box asks which refunds are due to the card
//!    ([`Message::RefundsDueRequest`]), runs INITIALIZE FOR CREDIT and sends its answer
//!    ([`Message::RefundRequest`]). The card must be the sale's card. The sale's security
//!    card verifies the card's MAC and issues the credit command, counting the refund off
//!    its totals at once; the command and the security card's state are journaled before
//!    the box gets the command, and a retry of the same request gets the same command.
//! 3. **Completion.** The card's signed credit response (from CREDIT, or from its log after
//!    a crash) completes the refund at the security card and here; a receipt goes back.
//! 4. **Recovery.** A refund whose command is out stays out until the card answers for it:
//!    its credit response, or a later INITIALIZE FOR PURCHASE of the card
//!    ([`Message::RefundProof`]), in which the card names the credit sessions it carried
//!    out ([`proto::purse::PurchaseInit::credits`]): the security card reads there whether
//!    this one ran — credited, or not (counted back, and the refund is due again) —
//!    whatever the card did since (purchases, loads, a log that rolled over). Nothing else
//!    reverses an issued refund: the card may have credited it.
//! 5. **Collection.** A credited refund goes into the next collection batch as a refund
//!    record ([`proto::clearing::CollectionBatch::refunds`]); clearing takes it off what its
//!    merchant is owed.
//!
//! Privacy: the box learns only the refunds due to the card it holds (it names the card
//! id; the credit command is useless to any other card, signed under that card's key). A
//! private sale's refund names the card as the sale does, by pseudonym, and is filed under
//! the card's tag ([`super::privacy`]).

use proto::messages::*;
use proto::money::Money;
use proto::purse::{CreditCommand, CreditResponse, PurchaseInit};
use proto::security_card::DrawData;
use serde::{Deserialize, Serialize};

use super::pool::SecurityCardDevice;
use super::privacy::{AtRest, CardNaming, NamesCard};
use super::step::PayStep;
use super::{PayState, PayTxn, PaymentServer, blocking, security_card_error, slot_key, today};
use crate::journal::{self, Journal, Kind, StoreError};
use crate::role::{journal_failed, refuse};
use tokio::sync::OwnedMutexGuard;

/// The most refunds due one card is told of at once (the rest come once these are
/// credited).
pub const MAX_DUE: usize = 16;

/// Where a refund stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefundState {
    /// Authorized by the merchant, not (or no longer) issued: due to the card.
    Authorized,
    /// The security card issued the credit command; the card's answer is awaited.
    Issued(Issued),
    /// Credited: the card's signed credit response completed it, or (`response: None`)
    /// the card's later INITIALIZE named its credit session among those it ran.
    Credited {
        issued: Issued,
        response: Option<CreditResponse>,
    },
}

/// A credit command out for a refund.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Issued {
    /// SHA-256 of the refund request as received: a retry must be identical.
    pub request: [u8; 32],
    /// The security card's transaction number of the credit command.
    pub security_card_txn: u32,
    /// The credit command, for a retry and the refunds-due list (sealed for a private
    /// sale: it names the card).
    pub command: AtRest<CreditCommand>,
}

/// The payment server's record of one refund (journal kind `refund`, keyed by the sale's
/// transaction id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefundRec {
    /// The sale's transaction id.
    pub transaction_id: String,
    pub merchant_id: String,
    /// The card the sale debited, as the sale's records name it (its card id, or its
    /// pseudonym in the sale, [`super::privacy`]): the only card the refund may credit.
    pub card_id: u64,
    /// How `card_id` names the card (the sale's naming).
    pub naming: CardNaming,
    /// The refund's key in the card's index of refunds due ([`Kind::RefundDue`]): the
    /// card's tag, `/`, the sale's transaction id.
    pub due: String,
    /// What the card is credited (minor units of the sale's currency).
    pub amount: Money,
    /// The terminal slot and security card that counted the sale (and count the refund).
    pub slot: usize,
    pub security_card_id: u64,
    pub state: RefundState,
    /// Security-card transactions of credit commands the card proved it never ran.
    pub reversed: Vec<u32>,
    /// The collection batch that carries it, once collected.
    pub batch: Option<u64>,
}

impl RefundRec {
    /// The credit command out or credited, if any.
    #[must_use]
    pub fn issued(&self) -> Option<&Issued> {
        match &self.state {
            RefundState::Authorized => None,
            RefundState::Issued(i) | RefundState::Credited { issued: i, .. } => Some(i),
        }
    }

    /// The state's name for operators.
    #[must_use]
    pub fn state_name(&self) -> &'static str {
        match self.state {
            RefundState::Authorized => "authorized",
            RefundState::Issued(_) => "issued",
            RefundState::Credited { .. } => "credited",
        }
    }
}

/// The merchant's authorization of the refund of sale `txid` in the payment server's
/// journal: `amount` in minor units of the sale's currency, the sale's whole amount when
/// `None`. The running payment server takes it from the journal at the card's next
/// refunds-due request. `server` may be opened offline ([`PaymentServer::open_offline`]):
/// only its journal and its privacy keys are used (a private sale's refund is filed under
/// the card's tag, from the card id its record holds sealed).
///
/// # Errors
/// No such sale; a sale not completed (or an authentication, which moved no value); a zero
/// amount or one above the sale's; a sale refunded (or authorized) already; a private
/// sale's sealed card id that does not open; the journal.
pub fn authorize(
    server: &PaymentServer,
    txid: &str,
    amount: Option<u64>,
) -> Result<RefundRec, String> {
    let journal: &Journal = server.journal();
    let outcome = journal.atomically(|b| {
        let Some(raw) = b.get_for_update(Kind::Txn, txid)? else {
            return Ok(Err(format!("no sale {txid} at this payment server")));
        };
        let sale: PayTxn = journal::decode(&raw).map_err(StoreError::Aborted)?;
        if sale.state != PayState::Completed {
            return Ok(Err(format!(
                "sale {txid} is {:?}, not completed: only what a card paid is refunded",
                sale.state
            )));
        }
        if sale.amount.is_authentication() {
            return Ok(Err(format!(
                "{txid} is an authentication: it moved no value to refund"
            )));
        }
        if proto::purse::Purse::of(sale.amount.currency) != proto::purse::Purse::Money {
            return Ok(Err(format!(
                "{txid} redeemed points: the card's CREDIT refunds its money purse only"
            )));
        }
        let minor = amount.unwrap_or(sale.amount.minor);
        if minor == 0 || minor > sale.amount.minor {
            return Ok(Err(format!(
                "a refund of sale {txid} is above zero and at most its {}: {} asked",
                sale.amount,
                Money::new(minor, sale.amount.currency)
            )));
        }
        if let Some(prev) = b.get_for_update(Kind::Refund, txid)? {
            let prev: RefundRec = journal::decode(&prev).map_err(StoreError::Aborted)?;
            return Ok(Err(format!(
                "sale {txid} has a refund already ({} of {}): a sale is refunded once",
                prev.state_name(),
                prev.amount
            )));
        }
        let tag = match (&sale.naming, server.privacy.card_of(&sale.naming)) {
            (CardNaming::Clear, _) => server.privacy.card_tag(None, sale.card_id),
            (CardNaming::Pseudonym { key_version, .. }, Ok(Some(card))) => {
                server.privacy.card_tag(Some(*key_version), card)
            }
            (_, Ok(None)) => Err("a pseudonym without a sealed card id".into()),
            (_, Err(e)) => Err(e),
        };
        let tag = match tag {
            Ok(t) => t,
            Err(e) => return Ok(Err(format!("sale {txid}'s card cannot be named: {e}"))),
        };
        let rec = RefundRec {
            transaction_id: txid.into(),
            merchant_id: sale.merchant_id.clone(),
            card_id: sale.card_id,
            naming: sale.naming.clone(),
            due: format!("{tag}/{txid}"),
            amount: Money::new(minor, sale.amount.currency),
            slot: sale.slot,
            security_card_id: sale.security_card_id,
            state: RefundState::Authorized,
            reversed: Vec::new(),
            batch: None,
        };
        b.put(Kind::Refund, txid, &journal::encode(&rec))?;
        b.put(Kind::RefundDue, &rec.due, &[])?;
        b.step(txid, &PayStep::RefundAuthorized, &rec.amount.to_string())?;
        Ok(Ok(rec))
    });
    outcome.map_err(|e| e.to_string())?
}

/// Every refund in `journal`, by sale.
///
/// # Errors
/// The journal cannot be read or holds a corrupt record.
pub fn all(journal: &Journal) -> Result<Vec<RefundRec>, String> {
    journal
        .all(Kind::Refund)
        .map_err(|e| e.to_string())?
        .into_iter()
        .map(|(_, raw)| journal::decode(&raw))
        .collect()
}

impl PaymentServer {
    /// The refund of sale `txid`, if one was authorized.
    pub fn refund(&self, txid: &str) -> Option<RefundRec> {
        self.journal
            .get(Kind::Refund, txid)
            .ok()
            .flatten()
            .and_then(|b| journal::decode(&b).ok())
    }

    fn save_refund(
        &self,
        rec: &RefundRec,
        step: PayStep,
        detail: &str,
        snapshot: Option<&[u8]>,
    ) -> Result<(), crate::journal::JournalError> {
        self.journal.atomically(|b| {
            if let Some(s) = snapshot {
                b.put(Kind::SecurityCard, &slot_key(rec.slot), s)?;
            }
            b.put(Kind::Refund, &rec.transaction_id, &journal::encode(rec))?;
            if matches!(rec.state, RefundState::Credited { .. }) {
                b.delete(Kind::RefundDue, &rec.due)?;
            }
            b.step(&rec.transaction_id, &step, detail)
        })
    }

    /// The refunds due to card `card_id`: authorized and not credited (read through the
    /// card's index, [`Kind::RefundDue`]; at most [`MAX_DUE`]). One whose credit command
    /// is out is listed too, so the card's box can finish it (with the card's credit
    /// response) or settle it (with the card's later INITIALIZE).
    pub(super) fn refunds_due(&self, card_id: u64) -> Message {
        // Filed under the card's id, or (private sales) under its tag of each key version.
        let mut due = Vec::new();
        for tag in self.privacy.card_tags(card_id) {
            let prefix = format!("{tag}/");
            let keys = match self.journal.range_after(Kind::RefundDue, &prefix, MAX_DUE) {
                Ok(k) => k,
                Err(e) => {
                    return refuse(
                        ErrorCode::Internal,
                        format!("refunds cannot be read: {e}"),
                        None,
                    );
                }
            };
            due.extend(
                keys.into_iter()
                    .filter_map(|(k, _)| k.strip_prefix(&prefix).map(str::to_string))
                    .filter_map(|txid| self.refund(&txid))
                    .filter(|r| {
                        self.names(r, card_id) && !matches!(r.state, RefundState::Credited { .. })
                    })
                    .map(|r| RefundDue {
                        issued: r.issued().and_then(|i| self.privacy.open(&i.command).ok()),
                        transaction_id: r.transaction_id,
                        merchant_id: r.merchant_id,
                        amount: r.amount,
                    }),
            );
        }
        due.truncate(MAX_DUE);
        Message::RefundsDue(due)
    }

    /// Whether refund `rec` is due to card `card_id` (the card its sale debited).
    fn names(&self, rec: &RefundRec, card_id: u64) -> bool {
        self.privacy
            .name(&rec.naming, card_id, &rec.transaction_id)
            .is_ok_and(|n| n == rec.card_id)
    }

    /// The security card that counted the sale (and counts its refund), from its slot.
    async fn sale_terminal(
        &self,
        rec: &RefundRec,
    ) -> Result<OwnedMutexGuard<Box<dyn SecurityCardDevice>>, Box<Message>> {
        let txid = Some(rec.transaction_id.as_str());
        let Some(card) = self.pool.card(rec.slot).await else {
            return Err(Box::new(refuse(
                ErrorCode::Internal,
                format!("terminal {} of the sale is not configured", rec.slot),
                txid,
            )));
        };
        if card.id() != rec.security_card_id {
            return Err(Box::new(refuse(
                ErrorCode::Internal,
                format!(
                    "terminal {} now holds security card {:X}, not the sale's {:X}: an \
                     operator moves the refund",
                    rec.slot,
                    card.id(),
                    rec.security_card_id
                ),
                txid,
            )));
        }
        Ok(card)
    }

    fn due_or_refuse(&self, txid: &str, card_id: u64) -> Result<RefundRec, Box<Message>> {
        let Some(rec) = self.refund(txid) else {
            return Err(Box::new(refuse(
                ErrorCode::UnknownTransaction,
                format!("no refund of sale {txid} is authorized"),
                Some(txid),
            )));
        };
        if !self.names(&rec, card_id) {
            return Err(Box::new(refuse(
                ErrorCode::NotYourAccount,
                format!("the refund of sale {txid} is due to another card than {card_id:X}"),
                Some(txid),
            )));
        }
        Ok(rec)
    }

    /// A box's refund request: the credit command (see the module doc).
    pub(super) async fn refund_request(&self, req: RefundRequest) -> Message {
        let txid = req.transaction_id.clone();
        let mut rec = match self.due_or_refuse(&txid, req.init.card_id) {
            Ok(r) => r,
            Err(m) => return *m,
        };
        let raw = super::privacy::digest(&journal::encode(&req));
        match &rec.state {
            RefundState::Authorized => {}
            RefundState::Issued(i) if i.request == raw => {
                tracing::info!(txid, "retried refund request: same credit command");
                return match self.privacy.open(&i.command) {
                    Ok(c) => command_msg(&txid, &c),
                    Err(e) => refuse(ErrorCode::Internal, e, Some(&txid)),
                };
            }
            RefundState::Issued(i) => {
                return refuse(
                    ErrorCode::InDoubt,
                    format!(
                        "a credit command for this refund is out (security card {:X} \
                         transaction {}): send the card's credit response, or its proof that \
                         it did not credit",
                        rec.security_card_id, i.security_card_txn
                    ),
                    Some(&txid),
                );
            }
            RefundState::Credited { .. } => {
                return refuse(
                    ErrorCode::AlreadyCompleted,
                    format!("the refund of sale {txid} is credited already"),
                    Some(&txid),
                );
            }
        }
        if let Err(e) = self.journal.step(&txid, &PayStep::RefundRequested, "") {
            return journal_failed(e, Some(&txid));
        }
        let card = match self.sale_terminal(&rec).await {
            Ok(c) => c,
            Err(m) => return *m,
        };
        let credit = DrawData {
            merchant_id: rec.merchant_id.clone(),
            transaction_id: txid.clone(),
            amount: rec.amount,
            init: req.init.clone(),
        };
        let atr = req.atr.clone();
        // The security card refunds only what it has counted and can no longer reverse:
        // sales it recorded early (FIG. 5-7) that this server has settled are dropped from
        // it first, as every PURGE_EVERY draws do (a FIG. 5 sale is never settled in the
        // security card otherwise, and its refund would wait for the next purge).
        let mut open = self.open_on(rec.slot);
        open.extend(self.owed_on(rec.slot));
        let (mut card, (before, issued)) = blocking(
            card,
            move |c| {
                let before = c.snapshot();
                c.purge_settled_except(&open);
                (before, c.issue_credit(&atr, &credit, today()))
            },
            |c, (before, r)| {
                if let Ok(cmd) = r {
                    c.undo_issue(&before, cmd.0.security_card_txn);
                }
            },
        )
        .await;
        let command = match issued {
            Ok(c) => c,
            Err(e) => return refuse(security_card_error(&e), e.to_string(), Some(&txid)),
        };
        rec.state = RefundState::Issued(Issued {
            request: raw,
            security_card_txn: command.0.security_card_txn,
            command: self.privacy.keep(&rec.naming, command.clone()),
        });
        let snapshot = card.snapshot();
        let detail = format!(
            "psam {:X} txn {}",
            rec.security_card_id, command.0.security_card_txn
        );
        if let Err(e) = self.save_refund(&rec, PayStep::CreditIssued, &detail, Some(&snapshot)) {
            // Not journaled means not done: the box never gets this command.
            card.undo_issue(&before, command.0.security_card_txn);
            return journal_failed(e, Some(&txid));
        }
        tracing::info!(txid, amount = %rec.amount, "credit command issued");
        command_msg(&txid, &command)
    }

    /// The card's credit response: the refund is credited (see the module doc).
    pub(super) async fn refund_response(&self, msg: RefundResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let mut rec = match self.due_or_refuse(&txid, msg.response.0.card_id) {
            Ok(r) => r,
            Err(m) => return *m,
        };
        let issued = match &rec.state {
            RefundState::Authorized => {
                return refuse(
                    ErrorCode::UnknownTransaction,
                    format!("no credit command is out for the refund of sale {txid}"),
                    Some(&txid),
                );
            }
            RefundState::Credited {
                response: Some(response),
                ..
            } if *response == msg.response.kept(rec.card_id, rec.naming.is_private()) => {
                return receipt(&rec, Some(msg.response.0.new_balance));
            }
            RefundState::Credited { .. } => {
                return refuse(
                    ErrorCode::Replay,
                    format!("the refund of sale {txid} was credited with another response"),
                    Some(&txid),
                );
            }
            RefundState::Issued(i) => i.clone(),
        };
        let card = match self.sale_terminal(&rec).await {
            Ok(c) => c,
            Err(m) => return *m,
        };
        let (txn, resp) = (issued.security_card_txn, msg.response.clone());
        let (card, done) = blocking(card, move |c| c.complete_credit(txn, &resp), |_, _| {}).await;
        if let Err(e) = done {
            return refuse(security_card_error(&e), e.to_string(), Some(&txid));
        }
        rec.state = RefundState::Credited {
            issued,
            response: Some(msg.response.kept(rec.card_id, rec.naming.is_private())),
        };
        let snapshot = card.snapshot();
        drop(card);
        if let Err(e) = self.save_refund(
            &rec,
            PayStep::Credited,
            &format!("balance {}", msg.response.0.new_balance),
            Some(&snapshot),
        ) {
            // The security card keeps it completed; a retry of the same response completes
            // it here (idempotent there).
            return journal_failed(e, Some(&txid));
        }
        tracing::info!(txid, amount = %rec.amount, "refund credited");
        receipt(&rec, Some(msg.response.0.new_balance))
    }

    /// The card's later INITIALIZE FOR PURCHASE for an issued refund: the security card
    /// reads in it whether the card ran the refund's credit session
    /// ([`proto::security_card::SecurityCard::resolve_credit`]) — credited, or not (counted
    /// back, due afresh) — whatever the card did since. See the module doc.
    pub(super) async fn refund_proof(&self, msg: RefundProofMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let mut rec = match self.due_or_refuse(&txid, msg.proof.card_id) {
            Ok(r) => r,
            Err(m) => return *m,
        };
        let issued = match &rec.state {
            RefundState::Authorized => return receipt(&rec, None),
            RefundState::Credited { response, .. } => {
                return receipt(
                    &rec,
                    Some(
                        // A private refund's record keeps no balance: the card's, now.
                        response
                            .as_ref()
                            .filter(|_| !rec.naming.is_private())
                            .map_or(msg.proof.balance, |r| r.0.new_balance),
                    ),
                );
            }
            RefundState::Issued(i) => i.clone(),
        };
        let card = match self.sale_terminal(&rec).await {
            Ok(c) => c,
            Err(m) => return *m,
        };
        let txn = issued.security_card_txn;
        let later: PurchaseInit = msg.proof.clone();
        let (card, done) = blocking(card, move |c| c.resolve_credit(txn, &later), |_, _| {}).await;
        let credited = match done {
            Ok(c) => c,
            Err(e) => return refuse(security_card_error(&e), e.to_string(), Some(&txid)),
        };
        let step = if credited {
            rec.state = RefundState::Credited {
                issued,
                response: None,
            };
            PayStep::Credited
        } else {
            rec.state = RefundState::Authorized;
            rec.reversed.push(txn);
            PayStep::CreditReversed
        };
        let snapshot = card.snapshot();
        drop(card);
        if let Err(e) = self.save_refund(
            &rec,
            step,
            &format!(
                "psam {:X} txn {txn}, the card's INITIALIZE {}",
                rec.security_card_id, msg.proof.init_count
            ),
            Some(&snapshot),
        ) {
            return journal_failed(e, Some(&txid));
        }
        if credited {
            tracing::info!(
                txid,
                "the card's INITIALIZE names the credit session: credited"
            );
            receipt(&rec, Some(msg.proof.balance))
        } else {
            tracing::info!(
                txid,
                "the card never ran the credit: the refund is due again"
            );
            receipt(&rec, None)
        }
    }
}

fn command_msg(txid: &str, command: &CreditCommand) -> Message {
    Message::RefundCommand(RefundCommandMsg {
        transaction_id: txid.into(),
        command: command.clone(),
    })
}

/// The box's receipt: credited, with the card's balance after (`Some`: from its credit
/// response, or from the later INITIALIZE that proved the credit), or not credited
/// (`None`: it stays due).
fn receipt(rec: &RefundRec, credited: Option<u64>) -> Message {
    Message::Receipt(Receipt {
        transaction_id: rec.transaction_id.clone(),
        released: credited.is_some(),
        text: match credited {
            Some(_) => format!("Refund of {} credited to your card", rec.amount),
            None => format!("Refund of {} not credited: it stays due", rec.amount),
        },
        entitlement: None,
        new_balance: credited,
    })
}
