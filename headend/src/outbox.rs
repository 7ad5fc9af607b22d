//! What one role must deliver to another, journaled before it is sent: the message goes
//! into the journal in the same write as the state that makes it (a closed collection
//! batch, a captured load), and is sent — and after a failure or a restart sent again, the
//! identical message — until the receiver acknowledges it. The receiver de-duplicates by
//! the message's own id (batch number, transaction id), so a repeat changes nothing there.
//!
//! Used by the payment server for its collection batches and by the bank and the load
//! server for their load advices, all to clearing (001 [0007], [0045], [0135]).

use std::sync::Arc;
use std::time::Duration;

use proto::messages::{ErrorCode, Message};
use serde::{Deserialize, Serialize};

use crate::journal::{self, Journal, JournalError, Kind, StepText, StoreError};
use crate::role::{Caller, Role};

/// Failures in a row that end a delivery round (the receiver is likely down).
const FAILURES_PER_ROUND: usize = 3;

/// A message on its way, and where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outgoing {
    pub message: Message,
    pub state: OutState,
}

/// Where an outgoing message stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutState {
    /// Journaled; not yet acknowledged (sent or not).
    Pending,
    /// The receiver acknowledged it: never sent again.
    Acknowledged,
    /// The receiver refused it for good (`reason`, as it said): never sent again; an
    /// operator must look (`headend status` lists it).
    Refused { reason: String },
}

/// The outbox's journal steps, keyed `<destination>/<id>` (apart from the transaction's
/// own steps, which the delivery never interleaves).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutboxStep {
    Queued,
    Acknowledged,
    Refused,
}

impl StepText for OutboxStep {
    fn text(&self) -> std::borrow::Cow<'static, str> {
        match self {
            OutboxStep::Queued => "queued for delivery",
            OutboxStep::Acknowledged => "acknowledged by the receiver",
            OutboxStep::Refused => "refused by the receiver",
        }
        .into()
    }
}

/// The journal key of message `id` for `to`.
#[must_use]
pub fn key(to: &str, id: &str) -> String {
    format!("{to}/{id}")
}

/// Whether `answer` acknowledges `sent`: a batch acknowledgement naming the same payment
/// server and batch, or an `Ack` of the same transaction id.
#[must_use]
pub fn acknowledges(sent: &Message, answer: &Message) -> bool {
    match (sent, answer) {
        (
            Message::CollectionBatch(b),
            Message::BatchAck {
                payment_server,
                batch,
            },
        ) => *payment_server == b.payment_server && *batch == b.batch,
        (Message::LoadAdvice(a), Message::Ack { transaction_id }) => {
            *transaction_id == a.transaction_id
        }
        _ => false,
    }
}

/// One role's outbox to one receiver.
pub struct Outbox {
    journal: Arc<Journal>,
    /// This role's name (the caller the receiver sees in process; over QUIC its
    /// certificate says it).
    me: String,
    /// The receiver's name (an `[endpoints]` key, or a local role's name).
    to: String,
    receiver: Arc<dyn Role>,
    nudge: tokio::sync::Notify,
    on_ack: Option<OnAck>,
}

/// Writes that go with an acknowledgement, in the same journal write (see [`Outbox::on_ack`]).
type OnAck = Box<dyn Fn(&journal::Batch, &Message) -> Result<(), StoreError> + Send + Sync>;

/// What one delivery round did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    pub acknowledged: usize,
    pub refused: usize,
    /// Still pending: the receiver could not take them now.
    pub pending: usize,
}

impl Outbox {
    /// `me`'s outbox to `to`, which `receiver` reaches.
    #[must_use]
    pub fn new(journal: Arc<Journal>, me: &str, to: &str, receiver: Arc<dyn Role>) -> Self {
        Self {
            journal,
            me: me.into(),
            to: to.into(),
            receiver,
            nudge: tokio::sync::Notify::new(),
            on_ack: None,
        }
    }

    /// Also writes `f`'s records when a message is acknowledged, in the same journal write
    /// as the delivery record (so the sender's own state follows the acknowledgement
    /// exactly once).
    #[must_use]
    pub fn on_ack(
        mut self,
        f: impl Fn(&journal::Batch, &Message) -> Result<(), StoreError> + Send + Sync + 'static,
    ) -> Self {
        self.on_ack = Some(Box::new(f));
        self
    }

    /// Queues `message` (id `id`) for `to` inside the caller's journal write: it is sent
    /// only once that write committed.
    ///
    /// # Errors
    /// The journal's.
    pub fn queue(
        b: &journal::Batch,
        to: &str,
        id: &str,
        message: &Message,
    ) -> Result<(), StoreError> {
        b.put(
            Kind::Outbox,
            &key(to, id),
            &journal::encode(&Outgoing {
                message: message.clone(),
                state: OutState::Pending,
            }),
        )?;
        b.step(&key(to, id), &OutboxStep::Queued, "")
    }

    /// Wakes [`Outbox::run`] (something was queued).
    pub fn nudge(&self) {
        self.nudge.notify_one();
    }

    /// Every message of `journal`'s outbox for `to`, by id, in id order.
    ///
    /// # Errors
    /// The journal cannot be read, or holds a corrupt record.
    pub fn list(journal: &Journal, to: &str) -> Result<Vec<(String, Outgoing)>, String> {
        let prefix = format!("{to}/");
        journal
            .all(Kind::Outbox)
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|id| (id.to_string(), v)))
            .map(|(id, v)| Ok((id, journal::decode(&v)?)))
            .collect()
    }

    /// Sends every pending message, oldest id first, and journals each answer: an
    /// acknowledgement or a definite refusal ends it; anything else (the receiver is down,
    /// busy, or its journal failed, or the message cannot travel) leaves it pending for the
    /// next round, and the round goes on with the next message until three fail in a row.
    ///
    /// # Errors
    /// The journal cannot be read or written (nothing sent is then lost: it stays pending).
    pub async fn deliver(&self) -> Result<Delivered, String> {
        let mut out = Delivered::default();
        let list = Self::list(&self.journal, &self.to)?;
        let mut pending = list
            .into_iter()
            .filter(|(_, o)| o.state == OutState::Pending)
            .peekable();
        // One message the receiver cannot take must not hold up the others; a receiver that
        // is down fails them all, so the round ends after a few failures in a row.
        let mut failures_in_a_row = 0;
        while let Some((id, o)) = pending.next() {
            let answer = self
                .receiver
                .handle(Caller::Role(self.me.clone()), o.message.clone())
                .await;
            let (state, step, detail) = if acknowledges(&o.message, &answer) {
                (
                    OutState::Acknowledged,
                    OutboxStep::Acknowledged,
                    self.to.clone(),
                )
            } else {
                match &answer {
                    Message::Error(e) if definite(e.code) => (
                        OutState::Refused {
                            reason: e.reason.clone(),
                        },
                        OutboxStep::Refused,
                        format!("{}: {:?}: {}", self.to, e.code, e.reason),
                    ),
                    other => {
                        tracing::warn!(id, to = %self.to, answer = other.kind(), detail = ?error_reason(other), "not delivered; kept for the next round");
                        out.pending += 1;
                        failures_in_a_row += 1;
                        if failures_in_a_row >= FAILURES_PER_ROUND {
                            out.pending += pending.count();
                            return Ok(out);
                        }
                        continue;
                    }
                }
            };
            failures_in_a_row = 0;
            let k = key(&self.to, &id);
            let rec = journal::encode(&Outgoing {
                message: o.message.clone(),
                state: state.clone(),
            });
            let acked = state == OutState::Acknowledged;
            if acked {
                crate::test_hook::freeze_at(
                    crate::test_hook::OUTBOX_PAUSE_BEFORE_JOURNALING_ACK,
                    || format!("{id} acknowledged, not journaled"),
                );
            }
            self.journal
                .atomically(|b| {
                    b.put(Kind::Outbox, &k, &rec)?;
                    if let (true, Some(f)) = (acked, &self.on_ack) {
                        f(b, &o.message)?;
                    }
                    b.step(&k, &step, &detail)
                })
                .map_err(|e: JournalError| e.to_string())?;
            match state {
                OutState::Acknowledged => {
                    tracing::info!(id, to = %self.to, "delivered and acknowledged");
                    out.acknowledged += 1;
                }
                _ => {
                    tracing::error!(id, to = %self.to, %detail, "refused by the receiver for good; an operator must look");
                    out.refused += 1;
                }
            }
        }
        Ok(out)
    }

    /// Delivers at once, then whenever something is queued and every `every` (to retry
    /// what the receiver could not take), until `shutdown`.
    pub async fn run(
        self: Arc<Self>,
        every: Duration,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            if let Err(e) = self.deliver().await {
                tracing::error!(to = %self.to, error = %e, "outbox: journal failed; retrying later");
            }
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = self.nudge.notified() => {}
                _ = tokio::time::sleep(every) => {}
            }
        }
    }
}

/// A refusal that a repeat cannot change: the message itself is wrong for the receiver.
fn definite(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Malformed
            | ErrorCode::Replay
            | ErrorCode::Forbidden
            | ErrorCode::UnknownRoute
            | ErrorCode::AmountMismatch
    )
}

fn error_reason(m: &Message) -> Option<&str> {
    match m {
        Message::Error(e) => Some(&e.reason),
        _ => None,
    }
}
