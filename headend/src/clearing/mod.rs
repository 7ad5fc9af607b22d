//! The clearing role (001 FIG. 1; [0007]–[0008], [0045], [0056], [0135]): concentration
//! point 68 and clearing and administration 110, with the acquirer's and the card issuer's
//! ledgers.
//!
//! - [`receive`]: payment servers send their collection batches
//!   ([`proto::clearing::CollectionBatch`]) over QUIC, and funders (bank, load server) their
//!   load advices ([`proto::clearing::LoadAdvice`]). Each is checked, journaled, and
//!   acknowledged; a batch id is idempotent per payment server (the identical batch gets the
//!   same acknowledgement, different content under the same id is refused), and a
//!   security-card transaction is cleared in exactly one batch.
//! - [`settle`]: a settlement run (`headend settle`) pays what was received and not yet
//!   settled: the net per acquirer (payment server) and per merchant, the issuer float
//!   debited with the settled purchases and credited with the advised loads, and a report
//!   (JSON and CSV) with totals per merchant, currency and security card.
//! - [`reconcile`]: `headend reconcile` checks the cross-ledger invariants from the raw
//!   journals and names the transaction that breaks one.

pub mod receive;
pub mod reconcile;
pub mod settle;
pub mod step;

use std::collections::BTreeSet;
use std::sync::Arc;

use proto::clearing::{CollectionBatch, LoadAdvice};
use proto::messages::{ErrorCode, Message};
use serde::{Deserialize, Serialize};

use crate::config::HeadendConfig;
use crate::journal::Journal;
use crate::quic::BoxFuture;
use crate::role::{Caller, Role, refuse};

/// A received collection batch (journal kind `cleared_batch`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Received {
    pub batch: CollectionBatch,
    /// Seconds since the epoch.
    pub received_at: u64,
    /// The settlement report that paid it, once one did.
    pub settlement: Option<String>,
}

/// A received load advice (journal kind `load_advice`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdviceRec {
    pub advice: LoadAdvice,
    /// Seconds since the epoch.
    pub received_at: u64,
    /// The settlement report that credited it to the float, once one did.
    pub settlement: Option<String>,
}

/// The clearing role on its journal.
pub struct ClearingServer {
    name: String,
    journal: Arc<Journal>,
    /// Payment servers whose batches are accepted.
    payment_servers: BTreeSet<String>,
    /// Funders whose load advices are accepted.
    funders: BTreeSet<String>,
    /// The merchants this config describes, and their payment server: when any are listed,
    /// a batch may only carry these, each from its own payment server.
    merchants: std::collections::BTreeMap<String, String>,
}

/// The journal key of batch `batch` of `payment_server`.
#[must_use]
pub fn batch_key(payment_server: &str, batch: u64) -> String {
    format!("{payment_server}/{batch:012}")
}

/// The journal key a security-card transaction is cleared under.
#[must_use]
pub fn txn_key(security_card_id: u64, security_card_txn: u32) -> String {
    format!("{security_card_id:016X}/{security_card_txn:010}")
}

/// The journal key of `funder`'s advice for load `transaction_id`.
#[must_use]
pub fn advice_key(funder: &str, transaction_id: &str) -> String {
    format!("{funder}/{transaction_id}")
}

impl ClearingServer {
    /// Opens the clearing role of `cfg` (its `[clearing]` section) on its journal
    /// (`<state_dir>/<name>.sqlite`, or PostgreSQL per `[journal]`).
    ///
    /// # Errors
    /// No `[clearing]` section, or the journal cannot be opened.
    pub fn open(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        let s = cfg.clearing.as_ref().ok_or("no [clearing] section")?;
        let journal = Arc::new(
            Journal::open_target(&cfg.journal_target(&s.name).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?,
        );
        Ok(Arc::new(Self {
            name: s.name.clone(),
            journal,
            payment_servers: s.payment_servers.iter().cloned().collect(),
            funders: s.funders.iter().cloned().collect(),
            merchants: cfg
                .merchants
                .iter()
                .map(|m| (m.id.clone(), m.payment.clone()))
                .collect(),
        }))
    }

    /// This role's name.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }
}

impl ClearingServer {
    /// A system update: the newest hotlist for a payment server or funder this clearing
    /// knows, when it is newer than the one it holds (`have`).
    fn hotlist_for(&self, caller: &Caller, have: u64) -> Message {
        let known = matches!(caller, Caller::Role(r)
            if self.payment_servers.contains(r) || self.funders.contains(r));
        if !known {
            return refuse(
                ErrorCode::Forbidden,
                "hotlists go to the payment servers and funders this clearing knows",
                None,
            );
        }
        crate::hotlist::update_for(&self.journal, have)
            .unwrap_or_else(|e| refuse(ErrorCode::Internal, format!("hotlist: {e}"), None))
    }
}

impl Role for ClearingServer {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            match msg {
                Message::CollectionBatch(batch) => self.receive_batch(&caller, *batch),
                Message::LoadAdvice(advice) => self.receive_advice(&caller, advice),
                Message::HotlistRequest { have } => self.hotlist_for(&caller, have),
                other => refuse(
                    ErrorCode::Malformed,
                    format!(
                        "clearing takes collection batches, load advices and hotlist requests, not {}",
                        other.kind()
                    ),
                    None,
                ),
            }
        })
    }
}
