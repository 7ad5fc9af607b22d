//! Card to card across two boxes (issue 18; seed 004 FIG. 4, the reader ports 141 and 143
//! joined by the gateway): a journaled mailbox per transfer.
//!
//! The payee's box opens the transfer (`TransferInvite`, after its card's RECEIVE) and its
//! TV shows the code the gateway gives it; the payer's holder types that code
//! (`TransferJoin`), and from then on the two boxes post their cards' packets
//! (`TransferPost`) and fetch the other's (`TransferFetch`): P1 from the payer, P2 P3 from
//! the payee, P4 from the payer, the payee's settlement (receipt or cancellation). The
//! gateway cannot read or make a packet (they are sealed under the cards' application
//! keys); it journals each before it acknowledges it, so a gateway killed at any step
//! answers the same packets after its restart, and each packet is the one its box posted
//! first (a different one for the same step is refused: a retry must be identical). Who
//! posts which step is fixed ([`TransferStep::payer_posts`]), and only the two boxes of a
//! transfer read it (any other box is told there is no such transfer). A transfer id starts
//! with its payee box's id and `/`, so boxes cannot take each other's ids. Every invite
//! costs the box a token of its refused-steps budget (a box cannot open transfers without
//! limit), and a settlement comes only after P1 (before P2 P3 it is the payee card's
//! cancellation, and the payer is told there is nothing to send).

use std::collections::BTreeMap;

use proto::messages::*;
use rand::Rng;
use serde::{Deserialize, Serialize};

use super::Gateway;
use crate::journal::{self, Kind};
use crate::role::refuse;

/// The most a posted packet may hold (the largest, P2 ‖ P3, is under 200 bytes).
pub const MAX_PACKET: usize = 512;

/// How long a code may be joined (seconds): as long as the payee's box waits for the payer
/// (`stb_flow::transfer::MAX_POLLS` asks, ten minutes). An expired code is freed, and the
/// payee's box is told when it next asks for P1.
pub const CODE_LIFETIME_SECS: u64 = 600;

/// A transfer's mailbox (journal kind [`Kind::Transfer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRec {
    pub terms: TransferTerms,
    pub payee_box: String,
    /// The box that joined with the code; `None` until one did.
    pub payer_box: Option<String>,
    pub packets: BTreeMap<TransferStep, Vec<u8>>,
    /// When the payee's box opened it (unix seconds): its code lives
    /// [`CODE_LIFETIME_SECS`] unless a payer joined.
    pub opened_at: u64,
}

impl TransferRec {
    /// No payer joined within the code's lifetime: the transfer is over (nothing moved).
    pub fn expired(&self, now: u64) -> bool {
        self.payer_box.is_none() && now >= self.opened_at.saturating_add(CODE_LIFETIME_SECS)
    }

    /// Over without a settlement: withdrawn by the payee, or its code expired.
    pub fn abandoned(&self, now: u64) -> bool {
        self.packets.contains_key(&TransferStep::Withdrawn) || self.expired(now)
    }
}

/// What a save does with the transfer's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Code {
    /// A new transfer: its code is taken.
    Take,
    Keep,
    /// Withdrawn, expired or settled: its code is free again.
    Free,
}

fn not_found(transfer_id: &str) -> Message {
    refuse(
        ErrorCode::UnknownTransaction,
        format!("no transfer {transfer_id} at this gateway"),
        Some(transfer_id),
    )
}

impl Gateway {
    fn transfer(&self, transfer_id: &str) -> Result<Option<TransferRec>, Box<Message>> {
        let raw = self.journal.get(Kind::Transfer, transfer_id).map_err(|e| {
            Box::new(refuse(
                ErrorCode::Internal,
                e.to_string(),
                Some(transfer_id),
            ))
        })?;
        raw.map(|b| journal::decode(&b))
            .transpose()
            .map_err(|e| Box::new(refuse(ErrorCode::Internal, e, Some(transfer_id))))
    }

    fn save_transfer(&self, rec: &TransferRec, code: Code) -> Result<(), Box<Message>> {
        let id = &rec.terms.invite.transfer_id;
        // A code freed (and taken by a newer transfer since) is not this one's to delete.
        let ours = match code {
            Code::Free => self
                .journal
                .get(Kind::TransferCode, &rec.terms.code)
                .ok()
                .flatten()
                .is_some_and(|v| v == id.as_bytes()),
            _ => false,
        };
        self.journal
            .atomically(|b| {
                b.put(Kind::Transfer, id, &journal::encode(rec))?;
                match code {
                    Code::Take => b.put(Kind::TransferCode, &rec.terms.code, id.as_bytes())?,
                    Code::Free if ours => b.delete(Kind::TransferCode, &rec.terms.code)?,
                    _ => {}
                }
                Ok(())
            })
            .map_err(|e| Box::new(refuse(ErrorCode::Internal, e.to_string(), Some(id))))
    }

    /// `TransferInvite`: a new mailbox and its code, or (a retry) the same terms again.
    pub(super) async fn transfer_invite(&self, box_id: &str, invite: TransferInvite) -> Message {
        let id = invite.transfer_id.clone();
        let own = id
            .strip_prefix(box_id)
            .and_then(|r| r.strip_prefix('/'))
            .is_some_and(|r| !r.is_empty());
        if !own || id.len() > 96 {
            return refuse(
                ErrorCode::Malformed,
                format!("a transfer id is the box's id, `/` and up to 64 characters ({box_id}/…)"),
                None,
            );
        }
        if let Err(wait) = self.rates.take(
            box_id,
            crate::limits::Kind::Refused,
            std::time::Instant::now(),
        ) {
            return refuse(
                ErrorCode::RateLimited,
                format!(
                    "too many transfers opened by this box; retry in {} ms",
                    wait.as_millis().max(1)
                ),
                None,
            );
        }
        if invite.amount.minor == 0 {
            return refuse(
                ErrorCode::AmountMismatch,
                "a transfer of nothing",
                Some(&id),
            );
        }
        let _lock = match self.lock_for_box(&format!("x/{id}")).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        match self.transfer(&id) {
            Err(e) => return *e,
            Ok(Some(rec)) if rec.payee_box == box_id && rec.terms.invite == invite => {
                return Message::TransferTerms(rec.terms);
            }
            Ok(Some(_)) => {
                return refuse(
                    ErrorCode::Replay,
                    format!(
                        "transfer {id} was opened with other terms or by another box: a retry must be identical"
                    ),
                    Some(&id),
                );
            }
            Ok(None) => {}
        }
        // A code no open transfer has (eight digits: guessing one is rate-limited with the
        // box's other refused steps).
        let mut code = None;
        for _ in 0..16 {
            let c = format!("{:08}", rand::thread_rng().gen_range(0..100_000_000u32));
            match self.journal.get(Kind::TransferCode, &c) {
                Ok(None) => {
                    code = Some(c);
                    break;
                }
                Ok(Some(_)) => {}
                Err(e) => return refuse(ErrorCode::Internal, e.to_string(), Some(&id)),
            }
        }
        let Some(code) = code else {
            return refuse(
                ErrorCode::Busy,
                "no free transfer code now; try again later",
                Some(&id),
            );
        };
        let rec = TransferRec {
            terms: TransferTerms { invite, code },
            payee_box: box_id.to_string(),
            payer_box: None,
            packets: BTreeMap::new(),
            opened_at: super::now_secs(),
        };
        if let Err(e) = self.save_transfer(&rec, Code::Take) {
            return *e;
        }
        tracing::info!(transfer_id = %id, payee_box = %box_id, "transfer opened");
        Message::TransferTerms(rec.terms)
    }

    /// `TransferJoin`: the box that types the code is the transfer's payer (once).
    pub(super) async fn transfer_join(&self, box_id: &str, code: String) -> Message {
        let unknown = || {
            refuse(
                ErrorCode::UnknownTransaction,
                "no transfer has this code",
                None,
            )
        };
        let id = match self.journal.get(Kind::TransferCode, &code) {
            Ok(Some(id)) => String::from_utf8_lossy(&id).into_owned(),
            Ok(None) => return unknown(),
            Err(e) => return refuse(ErrorCode::Internal, e.to_string(), None),
        };
        let _lock = match self.lock_for_box(&format!("x/{id}")).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let mut rec = match self.transfer(&id) {
            Ok(Some(r)) => r,
            Ok(None) => return unknown(),
            Err(e) => return *e,
        };
        if rec.payee_box == box_id {
            return refuse(
                ErrorCode::Forbidden,
                "the receiving box cannot also send this transfer",
                Some(&id),
            );
        }
        if rec.packets.contains_key(&TransferStep::Withdrawn) {
            return withdrawn(&id);
        }
        if rec.expired(super::now_secs()) {
            let _ = self.save_transfer(&rec, Code::Free);
            return code_expired(&id);
        }
        match &rec.payer_box {
            Some(b) if b == box_id => Message::TransferTerms(rec.terms),
            Some(_) => refuse(
                ErrorCode::Forbidden,
                "another box is sending this transfer",
                Some(&id),
            ),
            None => {
                rec.payer_box = Some(box_id.to_string());
                if let Err(e) = self.save_transfer(&rec, Code::Keep) {
                    return *e;
                }
                tracing::info!(transfer_id = %id, payer_box = %box_id, "transfer joined");
                Message::TransferTerms(rec.terms)
            }
        }
    }

    /// The transfer `id` if `box_id` is one of its two boxes, and whether it is the payer.
    fn party(&self, box_id: &str, id: &str) -> Result<(TransferRec, bool), Box<Message>> {
        let rec = self.transfer(id)?.ok_or_else(|| Box::new(not_found(id)))?;
        if rec.payer_box.as_deref() == Some(box_id) {
            Ok((rec, true))
        } else if rec.payee_box == box_id {
            Ok((rec, false))
        } else {
            // The same answer as for no transfer at all: ids are not to be probed.
            Err(Box::new(not_found(id)))
        }
    }

    /// `TransferPost`: journaled before it is acknowledged; its step must be this box's and
    /// come after the step before it.
    pub(super) async fn transfer_post(&self, box_id: &str, p: TransferPacket) -> Message {
        let id = p.transfer_id.clone();
        if p.data.is_empty() || p.data.len() > MAX_PACKET {
            return refuse(
                ErrorCode::Malformed,
                format!("a transfer packet is 1 to {MAX_PACKET} bytes"),
                Some(&id),
            );
        }
        let _lock = match self.lock_for_box(&format!("x/{id}")).await {
            Ok(l) => l,
            Err(busy) => return busy,
        };
        let (mut rec, payer) = match self.party(box_id, &id) {
            Ok(r) => r,
            Err(e) => return *e,
        };
        if p.step.payer_posts() != payer {
            return refuse(
                ErrorCode::Forbidden,
                format!(
                    "the {} box does not post {:?}",
                    if payer { "sending" } else { "receiving" },
                    p.step
                ),
                Some(&id),
            );
        }
        // A settlement is the payee card's word on the R2 of its P2 P3.
        let before = match p.step {
            TransferStep::P1 | TransferStep::Withdrawn => None,
            TransferStep::P23 => Some(TransferStep::P1),
            TransferStep::P4 => Some(TransferStep::P23),
            // The payee card's word needs its P1 (before P2 P3 reached the mailbox it can
            // only be a cancellation: the payer was never debited and is told so).
            TransferStep::Settlement => Some(TransferStep::P1),
        };
        // After a settlement without P2 P3 (the payee cancelled first), nothing more.
        if p.step == TransferStep::P23
            && rec.packets.contains_key(&TransferStep::Settlement)
            && !rec.packets.contains_key(&TransferStep::P23)
        {
            return cancelled_first(&id);
        }
        // A withdrawal only before the payee's card answered P1; nothing after one but a
        // repeat of it.
        if p.step == TransferStep::Withdrawn && rec.packets.contains_key(&TransferStep::P23) {
            return refuse(
                ErrorCode::Forbidden,
                "the receiving card answered P1: it cancels on the card (a settlement), not by withdrawal",
                Some(&id),
            );
        }
        if p.step != TransferStep::Withdrawn && rec.packets.contains_key(&TransferStep::Withdrawn) {
            return withdrawn(&id);
        }
        if let Some(b) = before.filter(|b| !rec.packets.contains_key(b)) {
            return refuse(
                ErrorCode::Malformed,
                format!("{:?} before {b:?}", p.step),
                Some(&id),
            );
        }
        let ack = Message::Ack {
            transaction_id: id.clone(),
        };
        match rec.packets.get(&p.step) {
            Some(d) if *d == p.data => return ack,
            Some(_) => {
                return refuse(
                    ErrorCode::Replay,
                    format!(
                        "another {:?} was posted for transfer {id}: a retry must be identical",
                        p.step
                    ),
                    Some(&id),
                );
            }
            None => {}
        }
        let code = match p.step {
            TransferStep::Withdrawn | TransferStep::Settlement => Code::Free,
            _ => Code::Keep,
        };
        rec.packets.insert(p.step, p.data);
        if let Err(e) = self.save_transfer(&rec, code) {
            return *e;
        }
        tracing::debug!(transfer_id = %id, step = ?p.step, "transfer packet posted");
        ack
    }

    /// `TransferFetch`: the other box's packet of a step, once posted.
    pub(super) fn transfer_fetch(&self, box_id: &str, id: String, step: TransferStep) -> Message {
        let (rec, payer) = match self.party(box_id, &id) {
            Ok(r) => r,
            Err(e) => return *e,
        };
        if step.payer_posts() == payer {
            return refuse(
                ErrorCode::Forbidden,
                format!("{step:?} is this box's own to post"),
                Some(&id),
            );
        }
        if rec.packets.contains_key(&TransferStep::Withdrawn) {
            return withdrawn(&id);
        }
        if rec.expired(super::now_secs()) {
            return code_expired(&id);
        }
        if step == TransferStep::P23
            && rec.packets.contains_key(&TransferStep::Settlement)
            && !rec.packets.contains_key(&TransferStep::P23)
        {
            return cancelled_first(&id);
        }
        match rec.packets.get(&step) {
            Some(data) => Message::TransferPacket(TransferPacket {
                transfer_id: id,
                step,
                data: data.clone(),
            }),
            // Not a refusal but "ask again": boxes poll for it, so it is not logged as one.
            None => {
                tracing::trace!(transfer_id = %id, ?step, "packet not come yet");
                Message::error(
                    ErrorCode::Busy,
                    format!("{step:?} of transfer {id} has not come yet"),
                    Some(&id),
                )
            }
        }
    }
}

/// The answer once the receiving box withdrew the transfer.
fn withdrawn(id: &str) -> Message {
    refuse(
        ErrorCode::UnknownTransaction,
        "the receiver withdrew this transfer: nothing moved",
        Some(id),
    )
}

/// The answer once a transfer's code expired unjoined.
fn code_expired(id: &str) -> Message {
    refuse(
        ErrorCode::OfferExpired,
        format!(
            "the code expired: no sender joined within {} minutes; nothing moved",
            CODE_LIFETIME_SECS / 60
        ),
        Some(id),
    )
}

/// The answer once the payee's card cancelled before its P2 P3 reached the mailbox.
fn cancelled_first(id: &str) -> Message {
    refuse(
        ErrorCode::UnknownTransaction,
        "the receiver's card cancelled this transfer before answering: nothing moved",
        Some(id),
    )
}
