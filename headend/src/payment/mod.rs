//! The payment server (001 cable head-end payment server 229 / merchant payment server 206):
//! one program for both. It takes draw requests, runs them through a security card from
//! its pool, answers with the debit command, checks the debit response, and confirms.
//!
//! Every step is journaled before it is acted on, and the transaction id is the idempotency
//! key: a retried draw request or debit response gets the stored answer, never a second
//! debit. A transaction that does not complete — timeout, bad card signature, cancel, the box
//! gone — is reversed in its security card ([0106]); a debit the card later proves (the box
//! re-sends the response from its journal) is still counted. After a restart, every open
//! transaction gets a fresh deadline and is completed or reversed.
//!
//! Who compares the card's signature (001 FIG. 4–7): FIG. 4, the security card; FIG. 5
//! ([0097]), this server itself, with the expected signature the security card handed out
//! with the debit command ([`Expected`]) — the card gets no further command for that
//! transaction, and its settled records are dropped in bulk later
//! ([`pool::SecurityCardDevice::purge_settled_except`], every [`PURGE_EVERY`] draws on a
//! card); FIG. 6/7, the gateway or the merchant, and the debit response reaches the security
//! card afterwards to settle it there.
//!
//! - [`pool`]: the security-card pool;
//! - [`collection`]: batches of settled transactions for the acquirer.

pub mod collection;
pub mod pool;
pub mod privacy;
pub mod refund;
pub mod step;
pub mod terminal;

use step::PayStep;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto::crypto::Mac;
use proto::crypto::{self, DesKey, MessageKeys};
use proto::messages::*;
use proto::money::Money;
use proto::purse::{Date, DebitCommand, DebitResponse, MasterKeys, PurchaseInit};
use proto::security_card::{DrawData, SecurityCard, SecurityCardError};
use rand::rngs::OsRng;
use serde::{Deserialize, Serialize};
use tracing::Instrument;

use crate::config::{HeadendConfig, MerchantDef};
use crate::journal::{self, Journal, Kind};
use crate::quic::BoxFuture;
use crate::role::{Caller, Role};
use crate::role::{journal_failed, open_body, refuse, repeat};
use pool::{Lease, Pool, SecurityCardDevice};
use privacy::{AtRest, CardNaming, NamesCard, PrivacyKeys};
use tokio::sync::OwnedMutexGuard;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayState {
    DebitIssued,
    Completed,
    Reversed,
}

/// FIG. 5 ([0097]): the debit command a security card issued and the card signature it
/// expects back, kept by the payment server, which compares the card's debit response with
/// them itself (journal kind `expected_signature`, [`Kind::Expected`]). The command names
/// the card as the transaction's records do ([`PayTxn::card_id`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Expected {
    pub command: DebitCommand,
    pub signature: Mac,
}

/// Every this many draws on a security card (by its transaction number), the transactions
/// this server settled without it (FIG. 5) are dropped from it in one command.
pub const PURGE_EVERY: u32 = 64;

/// The payment server's record of one transaction (journal kind `txn`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PayTxn {
    pub transaction_id: String,
    pub merchant_id: String,
    pub embodiment: Embodiment,
    pub tsk: Option<DesKey>,
    pub slot: usize,
    pub security_card_id: u64,
    pub security_card_txn: u32,
    pub amount: Money,
    /// The card: its card id, or with privacy its pseudonym in this transaction
    /// ([`privacy`]; `naming` says which).
    pub card_id: u64,
    pub naming: CardNaming,
    pub state: PayState,
    /// SHA-256 of the draw request as received, to tell a retry from a different request.
    pub draw: [u8; 32],
    /// The answer to the draw request, for a retry (sealed with privacy: it names the card).
    pub debit_command: AtRest<Message>,
    pub confirmation: Option<AtRest<Message>>,
    /// The debit response that completed the transaction, naming the card as `card_id`
    /// does: a repeat must be identical.
    pub debit_response: Option<proto::purse::DebitResponse>,
    /// Batch id once collected.
    pub batch: Option<u64>,
}

struct Merchant {
    def: MerchantDef,
    key: DesKey,
}

pub struct PaymentServer {
    name: String,
    /// The clearing role collection batches go to (`[payment] clearing`).
    clearing: Option<String>,
    /// The largest frame this deployment speaks (`[transport] max_frame`): a batch is closed
    /// small enough to travel in one.
    max_frame: usize,
    journal: Arc<Journal>,
    pool: Arc<Pool>,
    merchants: HashMap<String, Merchant>,
    /// Privacy cards' pseudonyms and sealed records ([`privacy`]).
    privacy: PrivacyKeys,
    /// FIG. 4 leases held across the round trip to the card, by transaction id, with when
    /// they were taken: a lease held past `lease_timeout` goes back to the pool (the
    /// transaction stays open until its own deadline), so a box that never answers cannot
    /// hold a terminal for long.
    held: std::sync::Mutex<HashMap<String, (Lease, Instant)>>,
    lease_timeout: Duration,
    /// Open transactions and their deadlines.
    open: std::sync::Mutex<BTreeMap<String, Instant>>,
    timeout: Duration,
    /// Serializes work per transaction id, so a retry racing the original sees its result.
    locks: std::sync::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The last position in the reversal feed (journal kind `reversal`), advanced under
    /// `feed_lock`.
    reversal_seq: std::sync::atomic::AtomicU64,
    feed_lock: tokio::sync::Mutex<()>,
    /// Sweeps run so far (idle terminals are probed every other one).
    sweeps: std::sync::atomic::AtomicU64,
    /// Per card id, the newest INITIALIZE FOR PURCHASE a draw request has used (journal kind
    /// `card_init`, key the card's tag, [`PrivacyKeys::card_tag`]): see
    /// [`PaymentServer::claim_init`].
    card_inits: std::sync::Mutex<HashMap<u64, CardInit>>,
    /// Per terminal, draws in a row whose card it refused and another terminal verified
    /// ([`DISTRUST_AFTER`] of them take it out until restart; a draw it serves clears them).
    disagreements: std::sync::Mutex<HashMap<usize, u32>>,
    /// PC/SC terminals whose baseline is still to be journaled when they first answer.
    unbaselined: std::sync::Mutex<Vec<usize>>,
}

/// The newest INITIALIZE FOR PURCHASE of one card that a draw request used, and by which
/// transaction (journal kind `card_init`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct CardInit {
    /// The card's INITIALIZE count in that response (`PurchaseInit::init_count`).
    init_count: u32,
    transaction_id: String,
}

/// A draw's claim on a card's INITIALIZE ([`PaymentServer::claim_init`]), held in memory
/// until the security card verified the response's MAC and the debit command is journaled
/// with it ([`InitClaim::kept`]). Dropped otherwise — a refused, forged or failed draw — it
/// gives the card's previous claim back: a response that does not verify is not the card's,
/// so nothing may be recorded against the card id it names (a box could otherwise name any
/// card with a huge count and block its purchases for good).
struct InitClaim<'a> {
    inits: &'a std::sync::Mutex<HashMap<u64, CardInit>>,
    card_id: u64,
    claim: CardInit,
    previous: Option<CardInit>,
    kept: bool,
}

impl InitClaim<'_> {
    /// The claim is journaled: it stays.
    fn kept(&mut self) {
        self.kept = true;
    }
}

impl Drop for InitClaim<'_> {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        let mut m = self.inits.lock().unwrap_or_else(|p| p.into_inner());
        if m.get(&self.card_id) == Some(&self.claim) {
            match self.previous.take() {
                Some(p) => m.insert(self.card_id, p),
                None => m.remove(&self.card_id),
            };
        }
    }
}

/// Draws in a row a terminal refuses and another verifies before it is taken out of the
/// pool until restart (its keys are wrong). The first only takes it out until it answers a
/// probe: a single refusal may be a glitch of its reader (the second outside attack on
/// issue 16 removed a good terminal for good with one forged `9481`).
const DISTRUST_AFTER: u32 = 2;

/// Notices per [`Message::ReversalsSince`] answer.
const REVERSAL_PAGE: usize = 100;

/// The reversal feed's journal key for position `seq`: zero-padded so key order is feed
/// order.
fn reversal_key(seq: u64) -> String {
    format!("{seq:020}")
}

/// Today's date for the security card, from the system clock.
pub fn today() -> Date {
    let d = time::OffsetDateTime::now_utc().date();
    Date::new(d.year() as u16, d.month() as u8, d.day())
}

fn security_card_error(e: &SecurityCardError) -> ErrorCode {
    match e {
        SecurityCardError::BadCardData
        | SecurityCardError::BadCardSignature
        | SecurityCardError::UnknownKeyVersion { .. } => ErrorCode::BadSignature,
        SecurityCardError::WrongCurrency { .. } => ErrorCode::WrongCurrency,
        SecurityCardError::Expired => ErrorCode::Expired,
        SecurityCardError::InsufficientValue { .. } => ErrorCode::InsufficientValue,
        SecurityCardError::ResponseMismatch => ErrorCode::AmountMismatch,
        SecurityCardError::UnknownTransaction(_) => ErrorCode::UnknownTransaction,
        SecurityCardError::StaleProof | SecurityCardError::CounterMoved { .. } => {
            ErrorCode::ProofRejected
        }
        SecurityCardError::ZeroAmount | SecurityCardError::ValueInAuthentication { .. } => {
            ErrorCode::Malformed
        }
        SecurityCardError::AlreadyCompleted(_)
        | SecurityCardError::CounterExhausted
        | SecurityCardError::NoKey => ErrorCode::Internal,
        SecurityCardError::Hotlisted { .. } => ErrorCode::CardHotlisted,
        SecurityCardError::RetiredKeyVersion { .. } => ErrorCode::KeyRetired,
        SecurityCardError::Terminal(_) => ErrorCode::Busy,
        SecurityCardError::RefundExceedsTotals { .. } => ErrorCode::AmountMismatch,
        SecurityCardError::CreditNeedsProof(_) => ErrorCode::InDoubt,
        SecurityCardError::InitializeUsed { .. } => ErrorCode::Replay,
        SecurityCardError::ProofUnavailable(_) => ErrorCode::InDoubt,
    }
}

/// Runs `f` on a security card on a blocking thread (a hardware card waits on its reader)
/// and gives the card back with the result. If the caller is gone by then (its request was
/// cancelled: the gateway dropped the connection), `on_cancel` gets the card and the result
/// instead, so a command whose outcome will never be journaled is undone rather than left.
async fn blocking<T: Send + 'static>(
    mut card: OwnedMutexGuard<Box<dyn SecurityCardDevice>>,
    f: impl FnOnce(&mut dyn SecurityCardDevice) -> T + Send + 'static,
    on_cancel: impl FnOnce(&mut dyn SecurityCardDevice, T) + Send + 'static,
) -> (OwnedMutexGuard<Box<dyn SecurityCardDevice>>, T) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::task::spawn_blocking(move || {
        let out = f(card.as_mut());
        if let Err((mut card, out)) = tx.send((card, out)) {
            tracing::warn!("security card command outlived its request: undone");
            on_cancel(card.as_mut(), out);
        }
    });
    rx.await.expect("a security card command does not panic")
}

/// The journal key of a reversal a terminal's security card owes (kind `terminal`):
/// `owed/SLOT/TXN`, beside the terminals' own entries (`down/SLOT`).
fn owed_key(slot: usize, security_card_txn: u32) -> String {
    format!("owed/{slot:04}/{security_card_txn:010}")
}

/// A terminal out of the pool, as journaled (kind `terminal`, key `down/SLOT`) for `headend
/// status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TerminalDown {
    pub slot: usize,
    pub security_card_id: u64,
    pub why: String,
}

/// A debit command a card refused, by the terminal whose security card signed it (kind
/// `terminal`, key `refused/SLOT/TXID`), for `headend status`: the box's cancel named the
/// card's status word, and its proof showed nothing was debited. `6982` is the security
/// card's signature failing in the card: a security card whose commands cards keep
/// refusing has the wrong keys or is failing. Counted, not acted on: the status word is the
/// box's word.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RefusedCommand {
    pub security_card_id: u64,
    pub sw: proto::apdu::StatusWord,
}

impl PaymentServer {
    /// Opens the journal, restores the security cards from their snapshots (or makes new
    /// ones), and re-arms every open transaction.
    pub fn open(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        Self::open_as(cfg, false)
    }

    /// For an offline command (`headend collect`, `ack-batch`) beside the running daemon: the
    /// journal only. The PC/SC terminals are not opened — their readers are the daemon's,
    /// and opening one reverses the numbers past the journal, which would undo a draw the
    /// daemon has in flight — nor is anything sent to a security card.
    pub fn open_offline(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        Self::open_as(cfg, true)
    }

    fn open_as(cfg: &HeadendConfig, offline: bool) -> Result<Arc<Self>, String> {
        let section = cfg.payment.as_ref().ok_or("no [payment] section")?;
        let master =
            crate::config::read_master_key("[payment] purchase_keys", &section.purchase_keys)
                .map_err(|e| e.to_string())?;
        let journal = Arc::new(
            Journal::open_target(
                &cfg.journal_target(&section.name)
                    .map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?,
        );
        let merchants = cfg
            .merchants
            .iter()
            .filter(|m| m.payment == section.name)
            .map(|m| {
                Ok((
                    m.id.clone(),
                    Merchant {
                        def: m.clone(),
                        key: m.key().map_err(|e| e.to_string())?,
                    },
                ))
            })
            .collect::<Result<HashMap<_, _>, String>>()?;
        let hotlist = crate::hotlist::held_at_start(cfg, &journal)?;
        let server = Self::with_parts(
            &section.name,
            journal,
            master,
            section.terminals().map_err(|e| e.to_string())?,
            merchants,
            Duration::from_secs(section.transaction_timeout_secs),
            Duration::from_secs(section.lease_timeout_secs),
            (section.clearing.clone(), cfg.transport.max_frame),
            offline,
        )?;
        if let Some(list) = hotlist {
            for slot in 0..server.pool.len() {
                if let Some(mut card) = server.pool.try_card(slot) {
                    card.set_hotlist(&list);
                }
            }
        }
        // Reversals a card still owes from before the restart come first.
        for slot in 0..server.pool.len() {
            if let Some(mut card) = server.pool.try_card(slot) {
                if !server.settle_owed(slot, card.as_mut()) {
                    server
                        .pool
                        .mark_down(slot, "owed reversals not yet done".into());
                }
            }
        }
        server.sync_terminals();
        Ok(server)
    }

    /// Gives every security card of the pool the issuer's hotlist
    /// ([`crate::hotlist::run_refresh`]).
    pub async fn apply_hotlist(&self, list: proto::hotlist::Hotlist) {
        for slot in 0..self.pool.len() {
            if let Some(mut card) = self.pool.card(slot).await {
                card.set_hotlist(&list);
            }
        }
    }

    /// This payment server's name (`[payment] name`).
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    #[allow(clippy::too_many_arguments)]
    fn with_parts(
        name: &str,
        journal: Arc<Journal>,
        master: MasterKeys,
        terminals: Vec<crate::config::TerminalDef>,
        merchants: HashMap<String, Merchant>,
        timeout: Duration,
        lease_timeout: Duration,
        (clearing, max_frame): (Option<String>, usize),
        offline: bool,
    ) -> Result<Arc<Self>, String> {
        let mut security_cards = Vec::new();
        let mut down_at_start = Vec::new();
        // PC/SC terminals down at start with no summary in the journal: their baseline is
        // journaled when they first answer (`sync_terminals`).
        let mut unbaselined = Vec::new();
        for (slot, def) in terminals.iter().enumerate() {
            let snapshot = journal
                .get(Kind::SecurityCard, &slot_key(slot))
                .map_err(|e| e.to_string())?;
            let id = def.id();
            let device: Box<dyn SecurityCardDevice> = match def {
                crate::config::TerminalDef::Software { .. } => {
                    let card = match &snapshot {
                        Some(b) => pool::software_card(b, &master)?,
                        None => SecurityCard::new(id, master.clone()),
                    };
                    if card.id != id {
                        return Err(terminal_moved(slot, card.id, id));
                    }
                    Box::new(card)
                }
                // Offline: the journaled summary stands in for the card (read only).
                crate::config::TerminalDef::Pcsc { .. } if offline => {
                    let card = match &snapshot {
                        Some(b) => pool::software_card(b, &master)?,
                        None => SecurityCard::new(id, master.clone()),
                    };
                    Box::new(card)
                }
                crate::config::TerminalDef::Pcsc {
                    reader, timeout_ms, ..
                } => {
                    let mut t = terminal::PcscSecurityCard::open(
                        id,
                        reader,
                        Duration::from_millis(*timeout_ms),
                    )
                    .map_err(|e| format!("[payment] security_cards, terminal {slot}: {e}"))?;
                    if let Some(b) = &snapshot {
                        let mut journaled: SecurityCard = journal::decode(b)?;
                        if journaled.id != id {
                            return Err(terminal_moved(slot, journaled.id, id));
                        }
                        // Every transaction journaled on this slot is this server's, whatever
                        // the summary beside it says: only numbers past them all are orphans.
                        for (_, bytes) in journal.all(Kind::Txn).map_err(|e| e.to_string())? {
                            let t: PayTxn = journal::decode(&bytes)?;
                            if t.slot == slot && t.security_card_id == id {
                                journaled.txn_counter =
                                    journaled.txn_counter.max(t.security_card_txn);
                            }
                        }
                        t.restore(&journal::encode(&journaled)).map_err(|e| {
                            format!("[payment] security_cards, terminal {slot}: {e}")
                        })?;
                    }
                    match t.probe() {
                        Err(e) => {
                            if snapshot.is_none() {
                                unbaselined.push(slot);
                            }
                            down_at_start.push((slot, e.to_string()));
                        }
                        // The card answered (and reversed the orphans it had, if any): its
                        // summary now is journaled at once — for a terminal new to this
                        // journal, the baseline (a number handed out after it that no journal
                        // holds, a crash mid-draw, is an orphan at the next start); after
                        // orphans, so that the next start does not reverse them again.
                        Ok(()) => {
                            journal
                                .put(Kind::SecurityCard, &slot_key(slot), &t.snapshot())
                                .map_err(|e| e.to_string())?;
                        }
                    }
                    Box::new(t)
                }
            };
            security_cards.push(device);
        }
        let mut open = BTreeMap::new();
        let deadline = Instant::now() + timeout;
        for (txid, bytes) in journal.all(Kind::Txn).map_err(|e| e.to_string())? {
            let t: PayTxn = journal::decode(&bytes)?;
            if t.state == PayState::DebitIssued {
                tracing::info!(
                    txid,
                    "open transaction after restart: awaiting the debit response or the deadline"
                );
                open.insert(txid, deadline);
            }
        }
        let reversal_seq = journal
            .last_key(Kind::Reversal)
            .map_err(|e| e.to_string())?
            .map(|k| {
                k.parse::<u64>()
                    .map_err(|e| format!("reversal feed key {k}: {e}"))
            })
            .transpose()?
            .unwrap_or(0);
        let pool = Pool::new(security_cards);
        for (slot, why) in down_at_start {
            tracing::error!(
                slot,
                why,
                "security card terminal down at start: out of the pool"
            );
            pool.mark_down(slot, why);
        }
        Ok(Arc::new(Self {
            name: name.into(),
            clearing,
            max_frame,
            journal,
            pool,
            merchants,
            privacy: PrivacyKeys::new(&master),
            held: Default::default(),
            lease_timeout,
            open: std::sync::Mutex::new(open),
            timeout,
            locks: Default::default(),
            reversal_seq: reversal_seq.into(),
            feed_lock: tokio::sync::Mutex::new(()),
            sweeps: Default::default(),
            card_inits: Default::default(),
            disagreements: Default::default(),
            unbaselined: std::sync::Mutex::new(unbaselined),
        }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.journal
    }

    pub fn pool(&self) -> &Arc<Pool> {
        &self.pool
    }

    /// The transaction record, if any.
    pub fn txn(&self, txid: &str) -> Option<PayTxn> {
        let b = self.journal.get(Kind::Txn, txid).ok()??;
        journal::decode(&b).ok()
    }

    /// Security-card totals summed over the pool, per currency minor units.
    pub async fn totals(&self) -> BTreeMap<proto::money::Currency, u64> {
        let mut out = BTreeMap::new();
        for slot in 0..self.pool.len() {
            let card = self.pool.card(slot).await.expect("slot exists");
            for (c, t) in &card.totals() {
                *out.entry(*c).or_default() += t.amount;
            }
        }
        out
    }

    fn lock_for(&self, txid: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        l.entry(txid.to_string()).or_default().clone()
    }

    fn unlock_done(&self, txid: &str) {
        let mut l = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        if l.get(txid).is_some_and(|m| Arc::strong_count(m) == 1) {
            l.remove(txid);
        }
    }

    /// Claims the card's INITIALIZE FOR PURCHASE response for transaction `txid`.
    ///
    /// A card raises its INITIALIZE count on every INITIALIZE (`PurchaseInit::init_count`),
    /// and a genuine new draw always comes from a fresh one, so a new transaction whose
    /// response is not newer than the newest already used for that card replays a captured
    /// response: its DEBIT can never run (the card ended that session), but each such draw
    /// would take a security card until its lease times out, and a few certificates holding
    /// one old response could keep the whole pool busy. The same transaction may present the
    /// same response again (a retry after `Busy`).
    ///
    /// Returns the claim, to journal with the debit command once the security card verified
    /// the response (`None` when it is already the newest). Until then it is only held in
    /// memory ([`InitClaim`]).
    ///
    /// # Errors
    /// The newest count already used, when the response is not newer than it.
    fn claim_init(&self, init: &PurchaseInit, txid: &str) -> Result<Option<InitClaim<'_>>, u32> {
        let mut seen = self.card_inits.lock().unwrap_or_else(|p| p.into_inner());
        let newest = match seen.get(&init.card_id) {
            Some(c) => Some(c.clone()),
            None => self
                .journal
                .get(
                    Kind::CardInit,
                    &self.privacy.current_tag(init.privacy, init.card_id),
                )
                .ok()
                .flatten()
                .and_then(|b| journal::decode::<CardInit>(&b).ok()),
        };
        // A private card's index names no transaction: a digest of its id.
        let claim = CardInit {
            init_count: init.init_count,
            transaction_id: if init.privacy {
                hex::encode(privacy::digest(txid.as_bytes()))
            } else {
                txid.to_string()
            },
        };
        match &newest {
            Some(n) if *n == claim => return Ok(None),
            Some(n) if n.init_count >= init.init_count => return Err(n.init_count),
            _ => {}
        }
        seen.insert(init.card_id, claim.clone());
        Ok(Some(InitClaim {
            inits: &self.card_inits,
            card_id: init.card_id,
            claim,
            previous: newest,
            kept: false,
        }))
    }

    async fn draw(&self, req: DrawRequest) -> Message {
        let txid = req.transaction_id.clone();
        if txid.is_empty() || txid.len() > 64 {
            return refuse(
                ErrorCode::Malformed,
                "transaction id must be 1 to 64 characters",
                Some(&txid),
            );
        }
        let Some(m) = self.merchants.get(&req.merchant_id) else {
            return refuse(
                ErrorCode::UnknownMerchant,
                format!(
                    "merchant {} is not known to payment server {}",
                    req.merchant_id, self.name
                ),
                Some(&txid),
            );
        };
        let raw = privacy::digest(&journal::encode(&req));
        if let Some(prev) = self.txn(&txid) {
            return if prev.draw == raw {
                tracing::info!(txid, "retried draw request: same answer");
                self.privacy.open(&prev.debit_command).unwrap_or_else(|e| {
                    refuse(
                        ErrorCode::Internal,
                        format!("the answer kept for this draw request: {e}"),
                        Some(&txid),
                    )
                })
            } else {
                refuse(
                    ErrorCode::Replay,
                    "transaction id already used for another draw request",
                    Some(&txid),
                )
            };
        }
        let derived = MessageKeys::derived(&m.key, &req.merchant_id, &txid);
        let tsk = if m.def.message_layer {
            let Some(etsk) = &req.etsk else {
                return refuse(
                    ErrorCode::Malformed,
                    "message layer on but no ETSK",
                    Some(&txid),
                );
            };
            match MessageKeys::open_etsk(&derived, etsk) {
                Ok(k) => Some(k),
                Err(e) => {
                    return refuse(
                        ErrorCode::BadSignature,
                        format!("ETSK does not open: {e}"),
                        Some(&txid),
                    );
                }
            }
        } else {
            None
        };
        let body = match open_body(&req.body, tsk.as_ref(), "draw request body", &txid) {
            Ok(b) => b,
            Err(e) => return e,
        };
        // The card's ATR is replayed to the security card ([0093]): one that is not an ATR
        // is the box's error, refused here — not a fault of the terminal.
        if !(2..=33).contains(&body.atr.len()) || !matches!(body.atr[0], 0x3B | 0x3F) {
            return refuse(
                ErrorCode::Malformed,
                format!(
                    "the draw request's ATR ({} bytes) is not an answer to reset (2-33 bytes, TS 3B or 3F)",
                    body.atr.len()
                ),
                Some(&txid),
            );
        }
        // The card chose privacy (under its MAC, checked by the security card below): its
        // records name it by pseudonym.
        let naming = self.privacy.naming(body.init.privacy, body.init.card_id);
        let card_name = match self.privacy.name(&naming, body.init.card_id, &txid) {
            Ok(n) => n,
            Err(e) => return refuse(ErrorCode::Internal, e, Some(&txid)),
        };
        let mut claim = match self.claim_init(&body.init, &txid) {
            Ok(c) => c,
            Err(newest) => {
                return refuse(
                    ErrorCode::Replay,
                    format!(
                        "the card's INITIALIZE response (count {}) is not newer than one \
                         already used (count {newest}): a draw needs a fresh INITIALIZE",
                        body.init.init_count
                    ),
                    Some(&txid),
                );
            }
        };
        if let Err(e) = self.journal.step(
            &txid,
            &PayStep::DrawRequestReceived,
            &format!("{} {}", req.merchant_id, body.amount),
        ) {
            return journal_failed(e, Some(&txid));
        }
        let early = m.def.embodiment != Embodiment::SecurityCard;
        let draw = DrawData {
            merchant_id: req.merchant_id.clone(),
            transaction_id: txid.clone(),
            amount: body.amount,
            init: body.init.clone(),
        };
        // A terminal that fails here leaves the pool; the draw goes to the next one.
        let mut failed_terminals = 0;
        // A terminal that refused the card's signature, held (so the next acquire is
        // another terminal) until a second one gives its opinion.
        let mut suspect: Option<(Lease, SecurityCardError)> = None;
        let (lease, mut card, before, auth) = loop {
            let wait = Duration::from_secs(if suspect.is_some() { 1 } else { 5 });
            let Some(lease) = self.pool.acquire(wait).await else {
                if let Some((_, e)) = suspect {
                    // No second opinion to be had: the first one stands.
                    return refuse(security_card_error(&e), e.to_string(), Some(&txid));
                }
                let down = self.pool.down().len();
                let why = if down > 0 {
                    format!(
                        "no security card terminal is free ({down} out of the pool); retry shortly"
                    )
                } else {
                    "every security card is busy; retry shortly".into()
                };
                self.sync_terminals();
                return refuse(ErrorCode::Busy, why, Some(&txid));
            };
            let mut card = lease.card().await;
            // A terminal first does the reversals its card owes (kind `terminal`).
            if !self.settle_owed(lease.slot, card.as_mut()) {
                failed_terminals += 1;
                self.pool
                    .mark_down(lease.slot, "owed reversals not yet done".into());
                if failed_terminals > self.pool.len() {
                    return refuse(
                        ErrorCode::Busy,
                        "no security card terminal answers; retry shortly",
                        Some(&txid),
                    );
                }
                continue;
            }
            let (atr, d) = (body.atr.clone(), draw.clone());
            let (card, (before, issued)) = blocking(
                card,
                move |c| {
                    let before = c.snapshot();
                    let r = c.issue_debit(&atr, &d, today(), early);
                    (before, r)
                },
                |c, (before, r)| {
                    if let Ok(a) = r {
                        c.undo_issue(&before, a.command.security_card_txn);
                    }
                },
            )
            .await;
            match issued {
                Ok(a) => {
                    match suspect.take() {
                        Some((s, e @ SecurityCardError::UnknownKeyVersion { .. })) => {
                            // Not wrong, only behind (a key rollover reaching the
                            // terminals one by one): it stays.
                            tracing::warn!(
                                txid,
                                slot = s.slot,
                                served_by = lease.slot,
                                error = %e,
                                "security card lacks the card's key version: another terminal served it"
                            );
                        }
                        Some((s, e)) => {
                            self.distrust(s.slot, lease.slot, card_name, &e, &txid);
                        }
                        None => {}
                    }
                    self.disagreements
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&lease.slot);
                    break (lease, card, before, a);
                }
                // The security card found the card's data or signature wrong. Either the
                // card is not genuine — or this security card holds the wrong keys, and
                // would refuse every viewer (B6). Another terminal verifies the same bytes:
                // if it accepts them, this one leaves the pool. A security card without the
                // card's key version gets a second opinion too (it stays in the pool).
                Err(
                    e @ (SecurityCardError::BadCardSignature
                    | SecurityCardError::BadCardData
                    | SecurityCardError::UnknownKeyVersion { .. }),
                ) if suspect.is_none() && self.pool.len() - self.pool.down().len() > 1 => {
                    tracing::warn!(
                        txid,
                        slot = lease.slot,
                        error = %e,
                        "the security card refused the card's signature: asking another terminal"
                    );
                    suspect = Some((lease, e));
                }
                Err(SecurityCardError::Terminal(why)) if failed_terminals < self.pool.len() => {
                    failed_terminals += 1;
                    tracing::error!(
                        txid,
                        slot = lease.slot,
                        why,
                        "security card terminal failed at the draw: trying another"
                    );
                    self.sync_terminals();
                }
                Err(e) => {
                    self.sync_terminals();
                    return refuse(security_card_error(&e), e.to_string(), Some(&txid));
                }
            }
        };
        let expected = auth.expected_card_signature;
        // FIG. 5: this server compares the card's signature itself ([0097]).
        let here = (m.def.embodiment == Embodiment::PaymentServer)
            .then_some(())
            .and(expected)
            .map(|signature| Expected {
                command: auth.command.kept(card_name, naming.is_private()),
                signature,
            });
        if auth.command.security_card_txn % PURGE_EVERY == 0 {
            let mut open = self.open_on(lease.slot);
            open.extend(self.owed_on(lease.slot));
            open.push(auth.command.security_card_txn);
            let n = card.purge_settled_except(&open);
            tracing::debug!(
                slot = lease.slot,
                kept = open.len(),
                dropped = n,
                "security card: settled records dropped"
            );
        }
        let mut rng = OsRng;
        // The expected signature and result M go to the gateway alone (FIG. 6/7): a box that
        // saw the expected signature could answer without debiting its card.
        let gateway = GatewayCopy {
            expected_card_signature: (m.def.embodiment == Embodiment::Gateway)
                .then_some(())
                .and(expected),
            sealed_expected_signature: (m.def.embodiment == Embodiment::Merchant)
                .then(|| expected.map(|e| crypto::seal(&derived, &e, &mut rng)))
                .flatten(),
            presealed_result_m: (m.def.embodiment == Embodiment::Gateway).then(|| {
                result_m(
                    &derived,
                    &txid,
                    &req.merchant_id,
                    body.amount,
                    auth.command.card_id,
                    card.id(),
                    auth.command.security_card_txn,
                    &mut rng,
                )
            }),
        };
        let answer = Message::RoutedDebitCommand {
            command: DebitCommandMsg {
                transaction_id: txid.clone(),
                body: Protected::new(
                    DebitCommandBody {
                        command: auth.command.clone(),
                    },
                    tsk.as_ref(),
                    &mut rng,
                ),
            },
            gateway,
        };
        let record = PayTxn {
            transaction_id: txid.clone(),
            merchant_id: req.merchant_id.clone(),
            embodiment: m.def.embodiment,
            tsk,
            slot: lease.slot,
            security_card_id: card.id(),
            security_card_txn: auth.command.security_card_txn,
            amount: body.amount,
            card_id: card_name,
            debit_command: self.privacy.keep(&naming, answer.clone()),
            naming,
            state: PayState::DebitIssued,
            draw: raw,
            confirmation: None,
            debit_response: None,
            batch: None,
        };
        let snapshot = card.snapshot();
        let saved = self.journal.atomically(|b| {
            // The INITIALIZE is the card's (the security card verified its MAC): now it is
            // used, with the debit command it gave.
            if let Some(c) = &claim {
                b.put(
                    Kind::CardInit,
                    &self
                        .privacy
                        .current_tag(body.init.privacy, body.init.card_id),
                    &journal::encode(&c.claim),
                )?;
            }
            b.put(Kind::SecurityCard, &slot_key(lease.slot), &snapshot)?;
            b.put(Kind::Txn, &txid, &journal::encode(&record))?;
            if let Some(e) = &here {
                b.put(Kind::Expected, &txid, &journal::encode(e))?;
            }
            b.step(
                &txid,
                &PayStep::DebitCommandIssued,
                &format!("psam {:X} txn {}", card.id(), record.security_card_txn),
            )
        });
        if let Err(e) = saved {
            // Not journaled means not done.
            card.undo_issue(&before, record.security_card_txn);
            return journal_failed(e, Some(&txid));
        }
        if let Some(c) = claim.as_mut() {
            c.kept();
        }
        drop(card);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(txid.clone(), Instant::now() + self.timeout);
        if early {
            tracing::info!(txid, slot = lease.slot, "security card released early");
        } else {
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(txid.clone(), (lease, Instant::now()));
        }
        tracing::info!(txid, merchant = %req.merchant_id, amount = %body.amount, "debit command issued");
        answer
    }

    async fn debit_response(&self, msg: DebitResponseMsg) -> Message {
        let txid = msg.transaction_id.clone();
        let Some(mut rec) = self.txn(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(&txid),
            );
        };
        let resp = match open_body(&msg.body, rec.tsk.as_ref(), "debit response body", &txid) {
            Ok(r) => r,
            Err(e) => return e,
        };
        // The response as this transaction's records name the card.
        let kept = match self.privacy.name(&rec.naming, resp.card_id, &txid) {
            Ok(name) => resp.kept(name, rec.naming.is_private()),
            Err(e) => return refuse(ErrorCode::Internal, e, Some(&txid)),
        };
        if let (PayState::Completed, Some(c)) = (rec.state, &rec.confirmation) {
            return match self.privacy.open(c) {
                Ok(c) => repeat(
                    rec.debit_response.as_ref(),
                    &kept,
                    &c,
                    "debit response",
                    &txid,
                ),
                Err(e) => refuse(ErrorCode::Internal, e, Some(&txid)),
            };
        }
        if let Err(e) = self.journal.step(
            &txid,
            &PayStep::DebitResponseReceived,
            &format!("card signature {}", hex::encode(resp.card_signature)),
        ) {
            return journal_failed(e, Some(&txid));
        }
        if rec.state == PayState::DebitIssued {
            if let Some(e) = self.expected(&txid) {
                return self.compare_here(rec, resp, kept, e).await;
            }
        }
        let Some(mut card) = self.pool.card(rec.slot).await else {
            return refuse(
                ErrorCode::Internal,
                "security card slot missing",
                Some(&txid),
            );
        };
        if !self.settle_owed(rec.slot, card.as_mut()) {
            return refuse(
                ErrorCode::Busy,
                "the security card of this transaction's terminal does not answer; retry later",
                Some(&txid),
            );
        }
        let r2 = resp.clone();
        let n = rec.security_card_txn;
        // Cancelled after the card counted it: the journal still says issued, and the
        // repeat (the gateway asks again) is idempotent in the card.
        let (mut card, (before, completed)) = blocking(
            card,
            move |c| {
                let before = c.snapshot();
                (before, c.complete(n, &r2))
            },
            |_, _| {},
        )
        .await;
        match completed {
            Ok(_) => {
                let confirmation = self.confirmation(&rec, &resp);
                rec.state = PayState::Completed;
                rec.confirmation = Some(self.privacy.keep(&rec.naming, confirmation.clone()));
                rec.debit_response = Some(kept);
                // Settled: our record answers any repeat, so the card need not keep it.
                card.forget(rec.security_card_txn);
                let snapshot = card.snapshot();
                let saved = self.journal.atomically(|b| {
                    b.put(Kind::SecurityCard, &slot_key(rec.slot), &snapshot)?;
                    b.put(Kind::Txn, &txid, &journal::encode(&rec))?;
                    b.step(&txid, &PayStep::Confirmed, "card signature verified")
                });
                if let Err(e) = saved {
                    let _ = card.restore(&before);
                    return journal_failed(e, Some(&txid));
                }
                drop(card);
                self.finish(&txid);
                tracing::info!(txid, amount = %rec.amount, "purchase confirmed");
                confirmation
            }
            Err(e) => {
                drop(card);
                let code = security_card_error(&e);
                match &e {
                    SecurityCardError::BadCardSignature | SecurityCardError::ResponseMismatch => {
                        self.reverse(&txid, "bad card signature").await;
                    }
                    // The card's signature cannot be checked ([0106]): reversed. A debit
                    // the card did make is proved later (the box keeps its response) and
                    // counted then.
                    SecurityCardError::Terminal(why) => {
                        self.sync_terminals();
                        self.reverse(&txid, &format!("security card terminal failed: {why}"))
                            .await;
                    }
                    _ => {}
                }
                refuse(code, format!("debit response refused: {e}"), Some(&txid))
            }
        }
    }

    /// The confirmation of a sale whose card signature was verified: result C for the box,
    /// result M for the merchant ([0085], [0097]).
    fn confirmation(&self, rec: &PayTxn, resp: &DebitResponse) -> Message {
        let txid = &rec.transaction_id;
        let m = &self.merchants[&rec.merchant_id];
        let derived = MessageKeys::derived(&m.key, &rec.merchant_id, txid);
        let mut rng = OsRng;
        let result_c = DebitResultC {
            transaction_id: txid.clone(),
            success: true,
            amount: rec.amount,
            new_balance: resp.new_balance,
        };
        Message::Confirmation(Confirmation {
            transaction_id: txid.clone(),
            result_c: Protected::new(result_c, rec.tsk.as_ref(), &mut rng),
            result_m: result_m(
                &derived,
                txid,
                &rec.merchant_id,
                rec.amount,
                resp.card_id,
                rec.security_card_id,
                rec.security_card_txn,
                &mut rng,
            ),
            debit_response: None,
        })
    }

    /// FIG. 5's comparison record of `txid`, if this server keeps one.
    fn expected(&self, txid: &str) -> Option<Expected> {
        journal::decode(&self.journal.get(Kind::Expected, txid).ok()??).ok()
    }

    /// FIG. 5 ([0097]): compares the card's debit response with the debit command and the
    /// expected signature kept at the draw, here, without the security card (which counted
    /// the sale when it issued the command). A match confirms; a mismatch reverses. `kept`
    /// is `resp` naming the card as the records do (the expected signature covers `resp`).
    async fn compare_here(
        &self,
        mut rec: PayTxn,
        resp: DebitResponse,
        kept: DebitResponse,
        e: Expected,
    ) -> Message {
        let txid = rec.transaction_id.clone();
        let refused = if !kept.answers(&e.command) {
            Some(SecurityCardError::ResponseMismatch)
        } else if !SecurityCard::signatures_match(&e.signature, &resp) {
            Some(SecurityCardError::BadCardSignature)
        } else {
            None
        };
        if let Some(err) = refused {
            self.reverse(&txid, "bad card signature").await;
            return refuse(
                security_card_error(&err),
                format!("debit response refused: {err}"),
                Some(&txid),
            );
        }
        let confirmation = self.confirmation(&rec, &resp);
        rec.state = PayState::Completed;
        rec.confirmation = Some(self.privacy.keep(&rec.naming, confirmation.clone()));
        rec.debit_response = Some(kept);
        let saved = self.journal.atomically(|b| {
            b.put(Kind::Txn, &txid, &journal::encode(&rec))?;
            b.delete(Kind::Expected, &txid)?;
            b.step(
                &txid,
                &PayStep::Confirmed,
                "card signature verified by the payment server (FIG. 5)",
            )
        });
        if let Err(e) = saved {
            return journal_failed(e, Some(&txid));
        }
        self.finish(&txid);
        tracing::info!(txid, amount = %rec.amount, "purchase confirmed (FIG. 5: compared here)");
        confirmation
    }

    /// The security-card transactions still open on `slot` (debit issued, not yet settled
    /// or reversed): [`SecurityCardDevice::purge_settled_except`] keeps them.
    fn owed_on(&self, slot: usize) -> Vec<u32> {
        let prefix = format!("owed/{slot:04}/");
        self.journal
            .range_after(Kind::Terminal, &prefix, 10_000)
            .unwrap_or_default()
            .iter()
            .filter_map(|(k, _)| k.strip_prefix(&prefix)?.parse().ok())
            .collect()
    }

    fn open_on(&self, slot: usize) -> Vec<u32> {
        let open: Vec<String> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect();
        open.iter()
            .filter_map(|txid| self.txn(txid))
            .filter(|t| t.slot == slot && t.state == PayState::DebitIssued)
            .map(|t| t.security_card_txn)
            .collect()
    }

    fn finish(&self, txid: &str) {
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(txid);
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(txid);
    }

    /// Reverses a transaction in its security card. Idempotent; a completed one stays.
    pub async fn reverse(&self, txid: &str, why: &str) -> bool {
        let Some(mut rec) = self.txn(txid) else {
            return false;
        };
        if rec.state != PayState::DebitIssued {
            self.finish(txid);
            return rec.state == PayState::Reversed;
        }
        if let Err(e) = self.journal.step(txid, &PayStep::Reversing, why) {
            tracing::error!(txid, error = %e, "journal write failed; reversal postponed");
            return false;
        }
        let Some(card) = self.pool.card(rec.slot).await else {
            return false;
        };
        let n = rec.security_card_txn;
        // Cancelled after the card reversed it: the sweep reverses again (idempotent).
        let (mut card, (before, reversed)) = blocking(
            card,
            move |c| {
                let before = c.snapshot();
                (before, c.reverse(n))
            },
            |_, _| {},
        )
        .await;
        let owed = matches!(reversed, Err(SecurityCardError::Terminal(_)));
        match reversed {
            Ok(()) => {}
            // The terminal is out of the pool: the transaction is reversed here now, and in
            // the card when it answers again (a reversal it owes, journaled).
            Err(SecurityCardError::Terminal(why)) => {
                tracing::error!(
                    txid,
                    slot = rec.slot,
                    why,
                    "security card unreachable: reversed here, the card's reversal owed"
                );
                if let Err(e) =
                    self.journal
                        .put(Kind::Terminal, &owed_key(rec.slot, n), txid.as_bytes())
                {
                    tracing::error!(txid, error = %e, "journal write failed; reversal postponed");
                    return false;
                }
                self.sync_terminals();
            }
            Err(e) => {
                tracing::error!(txid, error = %e, "security card refused the reversal");
                return false;
            }
        }
        rec.state = PayState::Reversed;
        // One writer at a time takes the next feed position (the per-transaction lock does
        // not cover two transactions reversing at once).
        let _feed = self.feed_lock.lock().await;
        let seq = self.reversal_seq.load(std::sync::atomic::Ordering::Acquire) + 1;
        let notice = ReversalNotice {
            seq,
            transaction_id: txid.into(),
            merchant_id: rec.merchant_id.clone(),
            reason: why.into(),
        };
        let snapshot = card.snapshot();
        let saved = self.journal.atomically(|b| {
            b.put(Kind::SecurityCard, &slot_key(rec.slot), &snapshot)?;
            b.put(Kind::Txn, txid, &journal::encode(&rec))?;
            b.put(
                Kind::Reversal,
                &reversal_key(seq),
                &journal::encode(&notice),
            )?;
            // A late proof is checked by the security card (it re-counts the sale).
            b.delete(Kind::Expected, txid)?;
            b.step(txid, &PayStep::Reversed, why)
        });
        if saved.is_err() {
            let _ = card.restore(&before);
            return false;
        }
        self.reversal_seq
            .store(seq, std::sync::atomic::Ordering::Release);
        drop(_feed);
        drop(card);
        self.finish(txid);
        if owed {
            tracing::info!(
                txid,
                reason = why,
                "transaction reversed; the security card's own reversal is owed until it answers"
            );
        } else {
            tracing::info!(
                txid,
                reason = why,
                "transaction reversed in the security card"
            );
        }
        true
    }

    /// A cancel from the box. It reverses only on a proof that verifies — a fresh
    /// INITIALIZE FOR PURCHASE from the same card, MACed by it, whose transaction counter is
    /// still the one the debit command was for — and answers `Receipt { released: false }`.
    /// Without such a proof nothing is reversed: `ProofRejected`, and the transaction stays
    /// open until its debit response or its deadline (a reversal at the deadline still
    /// counts a debit the card proves later). A completed purchase answers
    /// `AlreadyCompleted`: the box re-sends its debit response for the receipt.
    async fn cancel(&self, c: CancelMsg) -> Message {
        let txid = c.transaction_id.clone();
        let Some(rec) = self.txn(&txid) else {
            return refuse(
                ErrorCode::UnknownTransaction,
                format!("no transaction {txid}"),
                Some(&txid),
            );
        };
        let cancelled = || {
            Message::Receipt(Receipt {
                transaction_id: txid.clone(),
                released: false,
                text: format!("Cancelled ({:?}); nothing was charged", c.reason),
                entitlement: None,
                new_balance: None,
            })
        };
        match rec.state {
            PayState::Completed => {
                return refuse(
                    ErrorCode::AlreadyCompleted,
                    "the card's debit was proved; a completed purchase cannot be cancelled: re-send the debit response",
                    Some(&txid),
                );
            }
            PayState::Reversed => return cancelled(),
            PayState::DebitIssued => {}
        }
        let verdict = match &c.proof {
            Some(p) if self.privacy.name(&rec.naming, p.card_id, &txid) == Ok(rec.card_id) => {
                let Some(card) = self.pool.card(rec.slot).await else {
                    return refuse(
                        ErrorCode::Internal,
                        "security card slot missing",
                        Some(&txid),
                    );
                };
                card.verify_not_debited(rec.security_card_txn, p)
                    .map_err(|e| format!("the proof does not verify: {e}"))
            }
            Some(_) => Err("the proof is from another card".to_string()),
            None => Err("no proof that the card did not debit".to_string()),
        };
        if let Err(why) = verdict {
            let _ = self.journal.step(&txid, &PayStep::CancelRefused, &why);
            return refuse(
                ErrorCode::ProofRejected,
                format!("{why}; nothing reversed, the transaction stays open"),
                Some(&txid),
            );
        }
        let why = match c.reason {
            CancelReason::DebitRefused { sw } => {
                // Counted before the reversal (idempotent per transaction): a retried
                // cancel after a failed reversal counts it once.
                let refused = RefusedCommand {
                    security_card_id: rec.security_card_id,
                    sw,
                };
                tracing::error!(
                    txid,
                    slot = rec.slot,
                    security_card = format_args!("{:#X}", rec.security_card_id),
                    security_card_txn = rec.security_card_txn,
                    %sw,
                    "the card refused the debit command this terminal's security card signed"
                );
                if let Err(e) = self.journal.put(
                    Kind::Terminal,
                    &format!("refused/{:04}/{txid}", rec.slot),
                    &journal::encode(&refused),
                ) {
                    tracing::error!(txid, error = %e, "refused debit command not journaled");
                }
                format!(
                    "cancelled by the box: the card refused the debit command of security card \
                     {:#X} (terminal {}) with {sw} (card counter proves no debit)",
                    rec.security_card_id, rec.slot
                )
            }
            reason => format!("cancelled by the box: {reason:?} (card counter proves no debit)"),
        };
        if !self.reverse(&txid, &why).await {
            // Completed meanwhile, or the journal failed: the box asks again.
            return match self.txn(&txid).map(|r| r.state) {
                Some(PayState::Completed) => refuse(
                    ErrorCode::AlreadyCompleted,
                    "the card's debit was proved; re-send the debit response",
                    Some(&txid),
                ),
                _ => refuse(
                    ErrorCode::Internal,
                    "the reversal could not be journaled; nothing reversed, retry",
                    Some(&txid),
                ),
            };
        }
        cancelled()
    }

    /// The reversal feed after position `after`, at most a page, oldest first.
    fn reversals_since(&self, after: u64) -> Message {
        let notices = self
            .journal
            .range_after(Kind::Reversal, &reversal_key(after), REVERSAL_PAGE)
            .map(|rows| {
                rows.into_iter()
                    .filter_map(|(_, b)| journal::decode::<ReversalNotice>(&b).ok())
                    .collect()
            });
        match notices {
            Ok(n) => Message::Reversals(n),
            Err(e) => journal_failed(e, None),
        }
    }

    /// Reverses every open transaction past its deadline, and gives back FIG. 4 leases held
    /// past the lease timeout. Run periodically.
    pub async fn sweep(&self) -> usize {
        let now = Instant::now();
        self.held
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|txid, (_, at)| {
                let keep = now.duration_since(*at) < self.lease_timeout;
                if !keep {
                    tracing::info!(txid, "security card lease timed out: back to the pool; the transaction stays open");
                }
                keep
            });
        let due: Vec<String> = self
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|(_, d)| **d <= now)
            .map(|(t, _)| t.clone())
            .collect();
        let mut n = 0;
        for txid in due {
            // One step of a transaction at a time: a debit response being completed now
            // must not be overwritten by this reversal.
            let lock = self.lock_for(&txid);
            let reversed = {
                let _g = lock.lock().await;
                self.reverse(&txid, "timeout: no debit response").await
            };
            drop(lock);
            self.unlock_done(&txid);
            if reversed {
                n += 1;
            }
        }
        // Idle terminals are checked every other pass; those out of the pool are asked
        // again, and the ones back do what they owe.
        let pass = self
            .sweeps
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if pass % 2 == 1 {
            self.pool.probe_idle().await;
        }
        for slot in self.pool.probe_down().await {
            if let Some(card) = self.pool.try_card(slot) {
                let me_slot = slot;
                let owed_left = {
                    let mut card = card;
                    !self.settle_owed(me_slot, card.as_mut())
                };
                if owed_left {
                    self.pool
                        .mark_down(slot, "owed reversals not yet done".into());
                }
            }
        }
        self.sync_terminals();
        n
    }

    /// `slot`'s terminal refused card `card_id`'s signature (`e`), which `verified_by`'s
    /// security card verified. The [`DISTRUST_AFTER`]th time in a row its keys are taken to
    /// be wrong: out of the pool until restart. Before that, out until it answers a probe.
    fn distrust(
        &self,
        slot: usize,
        verified_by: usize,
        card_id: u64,
        e: &SecurityCardError,
        txid: &str,
    ) {
        let n = {
            let mut d = self.disagreements.lock().unwrap_or_else(|p| p.into_inner());
            let n = d.entry(slot).or_default();
            *n += 1;
            *n
        };
        let refused = format!(
            "it refused card {card_id:#X} ({e}) that terminal {verified_by} (security card \
             {:#X}) verified",
            self.pool.id(verified_by).unwrap_or(0)
        );
        if n >= DISTRUST_AFTER {
            let why =
                format!("{refused}, {n} draws in a row: its purchase keys are not the issuer's");
            tracing::error!(
                txid,
                slot,
                verified_by,
                why,
                "security card terminal out of the pool until restart"
            );
            self.pool.distrust(slot, why);
        } else {
            let why = format!(
                "{refused} ({n} of {DISTRUST_AFTER} in a row before it leaves the pool until restart)"
            );
            tracing::warn!(
                txid,
                slot,
                verified_by,
                why,
                "security card terminal out of the pool until it answers"
            );
            self.pool.mark_down(slot, why);
        }
        self.sync_terminals();
    }

    /// Journals which terminals are out of the pool (kind `terminal`, `down/SLOT`) for
    /// `headend status`, and has every terminal in the pool do the reversals it owes. A
    /// PC/SC terminal that was down at start with no summary in the journal, and has answered
    /// since, gets its baseline journaled.
    pub fn sync_terminals(&self) {
        let down = self.pool.down();
        self.unbaselined
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&slot| {
                if down.iter().any(|(d, _)| *d == slot) {
                    return true;
                }
                let Some(card) = self.pool.try_card(slot) else {
                    return true;
                };
                match self
                    .journal
                    .put(Kind::SecurityCard, &slot_key(slot), &card.snapshot())
                {
                    Ok(()) => false,
                    Err(e) => {
                        tracing::error!(slot, error = %e, "terminal baseline not journaled");
                        true
                    }
                }
            });
        let journaled = self
            .journal
            .range_after(Kind::Terminal, "down/", 10_000)
            .unwrap_or_default();
        for (slot, why) in &down {
            let key = format!("down/{slot:04}");
            let id = self.pool.id(*slot).unwrap_or(0);
            let rec = TerminalDown {
                slot: *slot,
                security_card_id: id,
                why: why.clone(),
            };
            let same = journaled.iter().any(|(k, v)| {
                *k == key && journal::decode::<TerminalDown>(v).ok() == Some(rec.clone())
            });
            if !same {
                if let Err(e) = self
                    .journal
                    .put(Kind::Terminal, &key, &journal::encode(&rec))
                {
                    tracing::error!(slot, error = %e, "terminal state not journaled");
                }
            }
        }
        for (key, _) in journaled.iter().filter(|(k, _)| k.starts_with("down/")) {
            let slot = key.trim_start_matches("down/").parse::<usize>().ok();
            if !down.iter().any(|(s, _)| Some(*s) == slot) {
                let _ = self.journal.atomically(|b| b.delete(Kind::Terminal, key));
            }
        }
    }

    /// Sends a terminal's security card the reversals it owes (kind `terminal`,
    /// `owed/SLOT/TXN`: reversed here while it was unreachable), before anything else is
    /// asked of it. `false`: the card still does not answer.
    fn settle_owed(&self, slot: usize, card: &mut dyn SecurityCardDevice) -> bool {
        let prefix = format!("owed/{slot:04}/");
        let owed = self
            .journal
            .range_after(Kind::Terminal, &prefix, 10_000)
            .unwrap_or_default();
        for (key, txid) in owed.iter().filter(|(k, _)| k.starts_with(&prefix)) {
            let Ok(n) = key[prefix.len()..].parse::<u32>() else {
                continue;
            };
            let outcome = card.reverse(n);
            if let Err(
                e @ (SecurityCardError::AlreadyCompleted(_)
                | SecurityCardError::UnknownTransaction(_)),
            ) = &outcome
            {
                // The card proved (or no longer knows) a sale this server reversed: its
                // totals and the journal disagree until an operator reconciles them.
                tracing::error!(slot, security_card_txn = n, error = %e, "owed reversal refused by the security card: reconcile");
                let _ = self.journal.put(
                    Kind::Terminal,
                    &format!("disputed/{slot:04}/{n:010}"),
                    e.to_string().as_bytes(),
                );
            }
            match outcome {
                Ok(())
                | Err(
                    SecurityCardError::AlreadyCompleted(_)
                    | SecurityCardError::UnknownTransaction(_),
                ) => {
                    if outcome.is_ok() {
                        tracing::info!(slot, security_card_txn = n, txid = %String::from_utf8_lossy(txid), "owed reversal done in the security card");
                    }
                    if let Err(e) = self
                        .journal
                        .put(Kind::SecurityCard, &slot_key(slot), &card.snapshot())
                        .and_then(|_| self.journal.atomically(|b| b.delete(Kind::Terminal, key)))
                    {
                        tracing::error!(slot, error = %e, "owed reversal done but not journaled; it is sent again (idempotent)");
                    }
                }
                Err(_) => return false,
            }
        }
        true
    }

    /// Runs the reversal sweep every second until `shutdown`.
    pub async fn run_sweeper(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = tick.tick() => { self.sweep().await; }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// The journal's security card for `slot` is not the one the config names there.
fn terminal_moved(slot: usize, journaled: u64, configured: u64) -> String {
    format!(
        "[payment] security_cards: terminal {slot} is security card {configured:#X} in the \
         config, but the journal holds security card {journaled:#X} there (terminals keep \
         their place in the list: restore the order, or give the new card a slot of its own)"
    )
}

fn slot_key(slot: usize) -> String {
    format!("{slot:04}")
}

/// "Debit result M", sealed under the derived key so only the merchant can read it; for an
/// authentication draw (002 FIG. 16), "authentication OK" ([`AuthenticationOk`]) instead,
/// naming the card.
#[allow(clippy::too_many_arguments)]
fn result_m(
    derived: &DesKey,
    txid: &str,
    merchant_id: &str,
    amount: Money,
    card_id: u64,
    security_card_id: u64,
    security_card_txn: u32,
    rng: &mut OsRng,
) -> Vec<u8> {
    let plain = if amount.currency == proto::money::Currency::AUTHENTICATION {
        journal::encode(&AuthenticationOk {
            transaction_id: txid.into(),
            merchant_id: merchant_id.into(),
            card_id,
            security_card_id,
            security_card_txn,
        })
    } else {
        journal::encode(&DebitResultM {
            transaction_id: txid.into(),
            merchant_id: merchant_id.into(),
            amount,
            success: true,
            security_card_id,
            security_card_txn,
        })
    };
    crypto::seal(derived, &plain, rng)
}

impl Role for PaymentServer {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            if let Caller::Box(b) = &caller {
                return refuse(
                    ErrorCode::NotYourAccount,
                    format!("box {b}: set-top boxes reach the payment server through the gateway"),
                    None,
                );
            }
            if let Message::ReversalsSince { after } = &msg {
                return self.reversals_since(*after);
            }
            if let Message::RefundsDueRequest { card_id } = &msg {
                return self.refunds_due(*card_id);
            }
            let txid = match &msg {
                Message::DrawRequest(r) => r.transaction_id.clone(),
                Message::DebitResponse(r) => r.transaction_id.clone(),
                Message::Cancel(c) => c.transaction_id.clone(),
                // A refund's steps key on its sale's id: "refund/" keeps their lock apart
                // from the sale's own.
                Message::RefundRequest(r) => format!("refund/{}", r.transaction_id),
                Message::RefundResponse(r) => format!("refund/{}", r.transaction_id),
                Message::RefundProof(r) => format!("refund/{}", r.transaction_id),
                other => {
                    return Message::error(
                        ErrorCode::Malformed,
                        format!("the payment server does not take {}", other.kind()),
                        None,
                    );
                }
            };
            let span = tracing::info_span!("payment", txid = %txid, ?caller);
            let lock = self.lock_for(&txid);
            let answer = async {
                let _g = lock.lock().await;
                match msg {
                    Message::DrawRequest(r) => self.draw(r).await,
                    Message::DebitResponse(r) => self.debit_response(r).await,
                    Message::Cancel(c) => self.cancel(c).await,
                    Message::RefundRequest(r) => self.refund_request(r).await,
                    Message::RefundResponse(r) => self.refund_response(r).await,
                    Message::RefundProof(r) => self.refund_proof(r).await,
                    _ => unreachable!("filtered above"),
                }
            }
            .instrument(span)
            .await;
            drop(lock);
            self.unlock_done(&txid);
            answer
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request cancelled while its security card command runs (the gateway dropped the
    /// connection) must not leave the command's outcome unjournaled and un-undone: the
    /// command finishes on its thread and `on_cancel` gets it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_security_card_command_outliving_its_request_is_undone() {
        let card: Box<dyn SecurityCardDevice> = Box::new(SecurityCard::new(
            7,
            proto::purse::MasterKey::new(1, DesKey::new([1; 16])),
        ));
        let slot = Arc::new(tokio::sync::Mutex::new(card));
        let undone = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let seen = undone.clone();
        let guard = slot.clone().lock_owned().await;
        let call = blocking(
            guard,
            |c| {
                std::thread::sleep(Duration::from_millis(200));
                c.id()
            },
            move |_, id| seen.store(id, std::sync::atomic::Ordering::SeqCst),
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call)
                .await
                .is_err(),
            "cancelled mid-command"
        );
        let _again = slot.lock().await; // the card comes back once the command ends
        assert_eq!(undone.load(std::sync::atomic::Ordering::SeqCst), 7);
        // Not cancelled: the result comes back and nothing is undone.
        undone.store(0, std::sync::atomic::Ordering::SeqCst);
        drop(_again);
        let seen = undone.clone();
        let (_, id) = blocking(
            slot.clone().lock_owned().await,
            |c| c.id(),
            move |_, id| seen.store(id, std::sync::atomic::Ordering::SeqCst),
        )
        .await;
        assert_eq!(
            (id, undone.load(std::sync::atomic::Ordering::SeqCst)),
            (7, 0)
        );
    }
}
