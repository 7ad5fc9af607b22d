//! The box's journal: every step of every transaction, in SQLite (`journal.sqlite` in the
//! state directory), written and synced before the step's action runs.
//!
//! Two tables: `steps` (append-only: transaction id, step name, postcard detail, time) and
//! `txns` (one row per transaction: the offer with its TSK, the card id and transaction
//! counter of the draw, the security card's ids once known, and the current state). A
//! step's name and a transaction's state are the same text, named once by the flows
//! ([`JournalState`], [`LoadState`]: the text on disk never changes for a variant); the
//! queries below are built from those, and what they read back is the enum. A
//! transaction is in doubt from `draw_sent` until `completed` or `ended`;
//! [`Journal::in_doubt`] lists those for recovery, with what recovery needs from the steps
//! (whether DEBIT was sent, the card's debit response). A purchase recovery cannot settle
//! from this box is `unresolvable` ([`Journal::unresolvable`]): out of the in-doubt list,
//! never ended.
//!
//! A third table, `transfers`, keeps each card-to-card transfer ([`Journal::transfers`]):
//! its side, card, amount, R2 once the card committed, and its state.
//!
//! The file holds transaction session keys: it is created mode 0600 in a 0700 directory.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use proto::messages::{CancelReason, Offer};
use proto::purse::DebitResponse;
use rusqlite::{Connection, OptionalExtension, params};

use stb_flow::load::{JournalState as LoadState, PendingLoad, Step as LoadStep};
use stb_flow::purchase::{JournalState, Step};
use stb_flow::recovery::InDoubt;
use stb_flow::transfer::{JournalState as TransferState, Journaled as TransferRecord};

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {detail}")]
    Open { path: PathBuf, detail: String },
    #[error("journal: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("journal: transaction {0} is not in the journal")]
    Unknown(String),
    #[error("journal: transaction {txid}: stored {what} is unreadable: {detail}")]
    Corrupt {
        txid: String,
        what: &'static str,
        detail: String,
    },
}

/// A journal error as the flows and recovery take it (in words: they stop on any of them).
impl From<JournalError> for stb_flow::JournalFailure {
    fn from(e: JournalError) -> Self {
        stb_flow::JournalFailure(e.to_string())
    }
}

/// A journaled purchase awaiting resolution: the recovery round's own input type.
pub use stb_flow::recovery::round::PendingPurchase as Pending;

pub struct Journal {
    conn: Connection,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn blob<T: serde::Serialize>(t: &T) -> Vec<u8> {
    postcard::to_allocvec(t).expect("in-memory serialization")
}

/// `states` as an SQL list of their texts on disk (`'draw_sent','debit_command',...`). The
/// texts are the enums' own (lower-case letters and underscores): nothing to quote.
fn sql_list<S: Copy>(states: &[S], text: impl Fn(S) -> &'static str) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", text(*s)))
        .collect::<Vec<_>>()
        .join(",")
}

/// A state read back from the journal: one of the enum's texts, or the journal is corrupt.
fn state_of<S>(
    txid: &str,
    text: &str,
    parse: impl Fn(&str) -> Option<S>,
) -> Result<S, JournalError> {
    parse(text).ok_or_else(|| JournalError::Corrupt {
        txid: txid.into(),
        what: "state",
        detail: format!("unknown state {text:?}"),
    })
}

impl Journal {
    /// Opens (creating) the journal in `dir`.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let open_err = |detail: String| JournalError::Open {
            path: dir.join("journal.sqlite"),
            detail,
        };
        if !dir.exists() {
            std::fs::create_dir_all(dir)
                .map_err(|e| open_err(format!("cannot create the state directory: {e}")))?;
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
        }
        let path = dir.join("journal.sqlite");
        let conn = Connection::open(&path).map_err(|e| open_err(e.to_string()))?;
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| open_err(format!("cannot restrict its mode: {e}")))?;
        }
        // WAL + synchronous=FULL: a committed step survives a crash or power cut.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        Self::with_schema(conn)
    }

    /// A journal that lives in this process's memory only: the same records and queries,
    /// nothing on disk, no file descriptors. For simulated boxes by the thousand (`sim`'s
    /// load generator), whose process is never power-cut; a box's journal is
    /// [`Journal::open`].
    ///
    /// # Errors
    ///
    /// SQLite's, when the in-memory database cannot be made.
    pub fn open_in_memory() -> Result<Self, JournalError> {
        let conn = Connection::open_in_memory().map_err(|e| JournalError::Open {
            path: ":memory:".into(),
            detail: e.to_string(),
        })?;
        Self::with_schema(conn)
    }

    fn with_schema(conn: Connection) -> Result<Self, JournalError> {
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS txns (
                transaction_id TEXT PRIMARY KEY,
                merchant_id TEXT NOT NULL,
                item_id TEXT NOT NULL,
                amount INTEGER NOT NULL,
                currency INTEGER NOT NULL,
                offer BLOB NOT NULL,
                card_id INTEGER NOT NULL,
                atc INTEGER NOT NULL,
                psam_id INTEGER,
                psam_txn INTEGER,
                state TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS steps (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                transaction_id TEXT NOT NULL,
                step TEXT NOT NULL,
                detail BLOB,
                at INTEGER NOT NULL
            );
            CREATE INDEX IF NOT EXISTS steps_txn ON steps(transaction_id);
            CREATE TABLE IF NOT EXISTS loads (
                transaction_id TEXT PRIMARY KEY,
                amount INTEGER NOT NULL,
                currency INTEGER NOT NULL,
                offer BLOB NOT NULL,
                init BLOB NOT NULL,
                card_id INTEGER NOT NULL,
                command BLOB,
                response BLOB,
                zero BLOB,
                state TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            );
            CREATE TABLE IF NOT EXISTS transfers (
                transfer_id TEXT PRIMARY KEY,
                sending INTEGER NOT NULL,
                card_id INTEGER NOT NULL,
                amount INTEGER NOT NULL,
                currency INTEGER NOT NULL,
                exponent INTEGER NOT NULL,
                to_card INTEGER,
                random BLOB,
                state TEXT NOT NULL,
                created_at INTEGER NOT NULL,
                updated_at INTEGER NOT NULL
            );",
        )?;
        Ok(Self { conn })
    }

    /// Writes one step (and the transaction's new state) in one SQLite transaction.
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Unknown`] for a step of a transaction never accepted.
    pub fn record(&mut self, txid: &str, step: &Step) -> Result<(), JournalError> {
        let name = step.state().as_str();
        let detail: Option<Vec<u8>> = match step {
            Step::OfferAccepted { .. } | Step::DrawSent | Step::DebitSent => None,
            Step::DebitCommandReceived { command } => Some(blob(command)),
            Step::DebitResponded { response } => Some(blob(response)),
            Step::CancelPending { reason } => Some(blob(reason)),
            Step::Completed { receipt } => Some(blob(receipt)),
            Step::Ended { why } | Step::Unresolvable { why } => Some(why.as_bytes().to_vec()),
        };
        let t = now();
        let tx = self.conn.transaction()?;
        if let Step::OfferAccepted { offer, init } = step {
            tx.execute(
                "INSERT INTO txns (transaction_id, merchant_id, item_id, amount, currency, offer,
                    card_id, atc, state, created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?10, ?9, ?9)",
                params![
                    txid,
                    offer.merchant_id,
                    offer.item_id,
                    offer.amount.minor as i64,
                    offer.amount.currency.code,
                    blob(offer),
                    init.card_id as i64,
                    init.atc,
                    t,
                    name
                ],
            )?;
        } else {
            let n = tx.execute(
                "UPDATE txns SET state = ?2, updated_at = ?3 WHERE transaction_id = ?1",
                params![txid, name, t],
            )?;
            if n == 0 {
                return Err(JournalError::Unknown(txid.to_string()));
            }
            if let Step::DebitCommandReceived { command } = step {
                tx.execute(
                    "UPDATE txns SET psam_id = ?2, psam_txn = ?3 WHERE transaction_id = ?1",
                    params![
                        txid,
                        command.security_card_id as i64,
                        command.security_card_txn
                    ],
                )?;
            }
        }
        tx.execute(
            "INSERT INTO steps (transaction_id, step, detail, at) VALUES (?1, ?2, ?3, ?4)",
            params![txid, name, detail, t],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A transaction's current state, as the text on disk ([`JournalState::as_str`]).
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn state(&self, txid: &str) -> Result<Option<String>, JournalError> {
        Ok(self
            .conn
            .query_row(
                "SELECT state FROM txns WHERE transaction_id = ?1",
                [txid],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// The step names of a transaction, oldest first.
    pub fn steps(&self, txid: &str) -> Result<Vec<String>, JournalError> {
        let mut st = self
            .conn
            .prepare("SELECT step FROM steps WHERE transaction_id = ?1 ORDER BY id")?;
        let rows = st.query_map([txid], |r| r.get::<_, String>(0))?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// The debit response journaled for `txid`, if the card answered DEBIT.
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Corrupt`] when the journaled response does not decode.
    pub fn debit_response(&self, txid: &str) -> Result<Option<DebitResponse>, JournalError> {
        let b: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT detail FROM steps WHERE transaction_id = ?1 AND step = ?2
                 ORDER BY id DESC LIMIT 1",
                params![txid, JournalState::DebitResponded.as_str()],
                |r| r.get(0),
            )
            .optional()?;
        b.map(|b| {
            postcard::from_bytes(&b).map_err(|e| JournalError::Corrupt {
                txid: txid.into(),
                what: "debit response",
                detail: e.to_string(),
            })
        })
        .transpose()
    }

    /// Closes transactions accepted but whose draw never went out (a crash between the two
    /// journal writes): nothing reached the payment server.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn close_unsent(&mut self) -> Result<usize, JournalError> {
        let ids: Vec<String> = {
            let mut st = self
                .conn
                .prepare("SELECT transaction_id FROM txns WHERE state = ?1")?;
            st.query_map([JournalState::Accepted.as_str()], |r| r.get(0))?
                .collect::<Result<_, _>>()?
        };
        for id in &ids {
            self.record(
                id,
                &Step::Ended {
                    why: "draw request never sent (restart)".into(),
                },
            )?;
        }
        Ok(ids.len())
    }

    /// Writes one load step (and the load's new state) in one SQLite transaction. The
    /// `loads` table keeps what recovery needs: the offer, S1, the load command, the card's
    /// answer and the zero-value proof. No PIN, sealed or not, is ever written.
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Unknown`] for a step of a load never requested.
    pub fn record_load(&mut self, txid: &str, step: &LoadStep) -> Result<(), JournalError> {
        let name = step.state().as_str();
        let detail: Option<Vec<u8>> = match step {
            LoadStep::RequestSent { .. } | LoadStep::LoadSent => None,
            LoadStep::CommandReceived { command } => Some(blob(command)),
            LoadStep::Responded { response } => Some(blob(response)),
            LoadStep::ZeroValue { zero } => Some(blob(zero)),
            LoadStep::Completed { confirmation } => Some(blob(confirmation)),
            LoadStep::Ended { why } => Some(why.as_bytes().to_vec()),
        };
        let t = now();
        let tx = self.conn.transaction()?;
        if let LoadStep::RequestSent { offer, init } = step {
            tx.execute(
                "INSERT INTO loads (transaction_id, amount, currency, offer, init, card_id, state,
                    created_at, updated_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8)",
                params![
                    txid,
                    init.amount as i64,
                    init.currency.code,
                    blob(offer),
                    blob(init),
                    init.card_id as i64,
                    name,
                    t
                ],
            )?;
        } else {
            let column = match step {
                LoadStep::CommandReceived { .. } => Some("command"),
                LoadStep::Responded { .. } => Some("response"),
                LoadStep::ZeroValue { .. } => Some("zero"),
                _ => None,
            };
            let n = match column {
                Some(c) => tx.execute(
                    &format!(
                        "UPDATE loads SET state = ?2, updated_at = ?3, {c} = ?4
                         WHERE transaction_id = ?1"
                    ),
                    params![txid, name, t, detail],
                )?,
                None => tx.execute(
                    "UPDATE loads SET state = ?2, updated_at = ?3 WHERE transaction_id = ?1",
                    params![txid, name, t],
                )?,
            };
            if n == 0 {
                return Err(JournalError::Unknown(txid.to_string()));
            }
        }
        tx.execute(
            "INSERT INTO steps (transaction_id, step, detail, at) VALUES (?1, ?2, ?3, ?4)",
            params![txid, name, detail, t],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A load's current state, as the text on disk ([`LoadState::as_str`]).
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn load_state(&self, txid: &str) -> Result<Option<String>, JournalError> {
        Ok(self
            .conn
            .query_row(
                "SELECT state FROM loads WHERE transaction_id = ?1",
                [txid],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// Every load in doubt ([`LoadState::IN_DOUBT`]), oldest first.
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Corrupt`] for a record that does not decode.
    pub fn loads_in_doubt(&self) -> Result<Vec<PendingLoad>, JournalError> {
        let q = format!(
            "SELECT transaction_id, offer, init, command, response, zero, state FROM loads
             WHERE state IN ({}) ORDER BY created_at, rowid",
            sql_list(&LoadState::IN_DOUBT, LoadState::as_str)
        );
        let mut st = self.conn.prepare(&q)?;
        type Row = (
            String,
            Vec<u8>,
            Vec<u8>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            Option<Vec<u8>>,
            String,
        );
        let rows = st.query_map([], |r| {
            Ok::<Row, rusqlite::Error>((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (txid, offer, init, command, response, zero, state) = row?;
            fn de<T: serde::de::DeserializeOwned>(
                txid: &str,
                what: &'static str,
                b: &[u8],
            ) -> Result<T, JournalError> {
                postcard::from_bytes(b).map_err(|e| JournalError::Corrupt {
                    txid: txid.into(),
                    what,
                    detail: e.to_string(),
                })
            }
            out.push(PendingLoad {
                state: state_of(&txid, &state, LoadState::from_text)?,
                offer: de(&txid, "load offer", &offer)?,
                init: de(&txid, "S1", &init)?,
                command: command.map(|b| de(&txid, "load command", &b)).transpose()?,
                response: response
                    .map(|b| de(&txid, "load response", &b))
                    .transpose()?,
                zero: zero.map(|b| de(&txid, "zero-value S1", &b)).transpose()?,
                transaction_id: txid,
            });
        }
        Ok(out)
    }

    /// A card-to-card transfer begins ([`stb_flow::transfer`]): one row, state
    /// `transfer_started`. A repeat of an id is refused ([`JournalError::Sql`]: the key).
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn transfer_started(&mut self, t: &TransferRecord) -> Result<(), JournalError> {
        let now = now();
        let name = TransferState::Started.as_str();
        let tx = self.conn.transaction()?;
        tx.execute(
            "INSERT INTO transfers (transfer_id, sending, card_id, amount, currency, exponent,
                to_card, state, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?9, ?6, ?7, ?8, ?8)",
            params![
                t.transfer_id,
                t.sending,
                t.card_id as i64,
                t.amount.minor as i64,
                t.amount.currency.code,
                t.to_card.map(|c| c as i64),
                name,
                now,
                t.amount.currency.exponent
            ],
        )?;
        tx.execute(
            "INSERT INTO steps (transaction_id, step, detail, at) VALUES (?1, ?2, NULL, ?3)",
            params![t.transfer_id, name, now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// A transfer's next state, with R2 once known and why it ended (`transfer_over`).
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Unknown`] for a transfer never started.
    pub fn transfer_step(
        &mut self,
        transfer_id: &str,
        state: TransferState,
        random: Option<[u8; 8]>,
        why: Option<&str>,
    ) -> Result<(), JournalError> {
        let now = now();
        let tx = self.conn.transaction()?;
        let n = tx.execute(
            "UPDATE transfers SET state = ?2, updated_at = ?3, random = COALESCE(?4, random)
             WHERE transfer_id = ?1",
            params![transfer_id, state.as_str(), now, random.map(|r| r.to_vec())],
        )?;
        if n == 0 {
            return Err(JournalError::Unknown(transfer_id.to_string()));
        }
        tx.execute(
            "INSERT INTO steps (transaction_id, step, detail, at) VALUES (?1, ?2, ?3, ?4)",
            params![transfer_id, state.as_str(), why.map(str::as_bytes), now],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The transfers of `card_id` in `states`, oldest first.
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Corrupt`] for a row that does not read back.
    pub fn transfers(
        &self,
        card_id: u64,
        states: &[TransferState],
    ) -> Result<Vec<TransferRecord>, JournalError> {
        let q = format!(
            "SELECT transfer_id, sending, amount, currency, exponent, to_card, random, state
             FROM transfers
             WHERE card_id = ?1 AND state IN ({}) ORDER BY created_at, rowid",
            sql_list(states, TransferState::as_str)
        );
        let mut st = self.conn.prepare(&q)?;
        type Row = (
            String,
            bool,
            i64,
            u16,
            u8,
            Option<i64>,
            Option<Vec<u8>>,
            String,
        );
        let rows = st.query_map([card_id as i64], |r| {
            Ok::<Row, rusqlite::Error>((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
                r.get(6)?,
                r.get(7)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, sending, amount, code, exponent, to_card, random, state) = row?;
            let corrupt = |what: &'static str, detail: String| JournalError::Corrupt {
                txid: id.clone(),
                what,
                detail,
            };
            let currency = proto::money::Currency::new(code, exponent);
            let random = random
                .map(|r| <[u8; 8]>::try_from(r.as_slice()))
                .transpose()
                .map_err(|_| corrupt("R2", "not 8 bytes".into()))?;
            out.push(TransferRecord {
                state: state_of(&id, &state, TransferState::from_text)?,
                sending,
                card_id,
                amount: proto::money::Money::new(amount as u64, currency),
                to_card: to_card.map(|c| c as u64),
                random,
                transfer_id: id,
            });
        }
        Ok(out)
    }

    /// Purchases recovery could not settle from this box: (transaction id, reason), oldest
    /// first.
    ///
    /// # Errors
    ///
    /// SQLite's.
    pub fn unresolvable(&self) -> Result<Vec<(String, String)>, JournalError> {
        let mut st = self.conn.prepare(
            "SELECT t.transaction_id,
                    (SELECT s.detail FROM steps s WHERE s.transaction_id = t.transaction_id
                       AND s.step = ?1 ORDER BY s.id DESC LIMIT 1)
             FROM txns t WHERE t.state = ?1 ORDER BY t.created_at, t.rowid",
        )?;
        let rows = st.query_map([JournalState::Unresolvable.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<Vec<u8>>>(1)?
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default(),
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Every transaction in doubt ([`JournalState::IN_DOUBT`]), oldest first, with whether
    /// DEBIT was sent and the journaled debit response (if any).
    ///
    /// # Errors
    ///
    /// SQLite's; [`JournalError::Corrupt`] for a record that does not decode.
    pub fn in_doubt(&self) -> Result<Vec<Pending>, JournalError> {
        let q = format!(
            "SELECT t.transaction_id, t.offer, t.card_id, t.atc, t.psam_id, t.psam_txn, t.state,
                    EXISTS (SELECT 1 FROM steps s WHERE s.transaction_id = t.transaction_id
                              AND s.step = ?1),
                    (SELECT s.detail FROM steps s WHERE s.transaction_id = t.transaction_id
                       AND s.step = ?2 ORDER BY s.id DESC LIMIT 1),
                    (SELECT s.detail FROM steps s WHERE s.transaction_id = t.transaction_id
                       AND s.step = ?3 ORDER BY s.id DESC LIMIT 1)
             FROM txns t WHERE t.state IN ({}) ORDER BY t.created_at, t.rowid",
            sql_list(&JournalState::IN_DOUBT, JournalState::as_str)
        );
        let mut st = self.conn.prepare(&q)?;
        let steps = [
            JournalState::DebitSent.as_str(),
            JournalState::DebitResponded.as_str(),
            JournalState::CancelPending.as_str(),
        ];
        let rows = st.query_map(steps, |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Vec<u8>>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, Option<i64>>(4)?,
                r.get::<_, Option<u32>>(5)?,
                r.get::<_, String>(6)?,
                r.get::<_, bool>(7)?,
                r.get::<_, Option<Vec<u8>>>(8)?,
                r.get::<_, Option<Vec<u8>>>(9)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (
                txid,
                offer,
                card_id,
                atc,
                security_card_id,
                security_card_txn,
                state,
                debit_sent,
                response,
                cancel_reason,
            ) = row?;
            let state = state_of(&txid, &state, JournalState::from_text)?;
            let offer: Offer = postcard::from_bytes(&offer).map_err(|e| JournalError::Corrupt {
                txid: txid.clone(),
                what: "offer",
                detail: e.to_string(),
            })?;
            let response = response
                .map(|b| {
                    postcard::from_bytes::<DebitResponse>(&b).map_err(|e| JournalError::Corrupt {
                        txid: txid.clone(),
                        what: "debit response",
                        detail: e.to_string(),
                    })
                })
                .transpose()?;
            let cancel_reason = cancel_reason
                .map(|b| {
                    postcard::from_bytes::<CancelReason>(&b).map_err(|e| JournalError::Corrupt {
                        txid: txid.clone(),
                        what: "cancel reason",
                        detail: e.to_string(),
                    })
                })
                .transpose()?;
            out.push(Pending {
                txn: InDoubt {
                    transaction_id: txid,
                    card_id: card_id as u64,
                    atc,
                    amount: offer.amount,
                    security_card: security_card_id
                        .zip(security_card_txn)
                        .map(|(i, n)| (i as u64, n)),
                    debit_sent,
                    response,
                    cancel_reason,
                },
                offer,
                state,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::messages::{Embodiment, Receipt};
    use proto::money::{Currency, Money};
    use proto::purse::{Date, DebitCommand, Expiry, PurchaseInit};

    /// The texts on disk: existing journals hold them, and `stbd`'s queries, the tests and
    /// the operators read them. They never change for a variant.
    #[test]
    fn states_keep_their_text_on_disk() {
        use JournalState as P;
        use LoadState as L;
        let purchase = [
            (P::Accepted, "accepted"),
            (P::DrawSent, "draw_sent"),
            (P::DebitCommand, "debit_command"),
            (P::DebitSent, "debit_sent"),
            (P::DebitResponded, "debit_responded"),
            (P::CancelPending, "cancel_pending"),
            (P::Completed, "completed"),
            (P::Ended, "ended"),
            (P::Unresolvable, "unresolvable"),
        ];
        assert_eq!(purchase.len(), P::ALL.len());
        for (s, text) in purchase {
            assert_eq!(s.as_str(), text);
            assert_eq!(P::from_text(text), Some(s));
        }
        let load = [
            (L::RequestSent, "load_request_sent"),
            (L::Command, "load_command"),
            (L::LoadSent, "load_sent"),
            (L::Responded, "load_responded"),
            (L::ZeroValue, "load_zero_value"),
            (L::Completed, "load_completed"),
            (L::Ended, "load_ended"),
        ];
        assert_eq!(load.len(), L::ALL.len());
        for (s, text) in load {
            assert_eq!(s.as_str(), text);
            assert_eq!(L::from_text(text), Some(s));
        }
        // In doubt: from the request that may have reached the head end until it settled.
        assert_eq!(
            sql_list(&P::IN_DOUBT, P::as_str),
            "'draw_sent','debit_command','debit_sent','debit_responded','cancel_pending'"
        );
        assert_eq!(
            sql_list(&L::IN_DOUBT, L::as_str),
            "'load_request_sent','load_command','load_sent','load_responded','load_zero_value'"
        );
        assert_eq!(P::from_text("draw sent"), None);
    }

    /// A journal written before the states were an enum (the state column set by hand, as
    /// any older `stbd` left it) reads back as the same states.
    #[test]
    fn a_state_on_disk_reads_back_as_its_variant() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        j.record(
            "t1",
            &Step::OfferAccepted {
                offer: offer("t1"),
                init: init(),
            },
        )
        .unwrap();
        j.conn
            .execute(
                "UPDATE txns SET state = 'cancel_pending' WHERE transaction_id = 't1'",
                [],
            )
            .unwrap();
        let p = j.in_doubt().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].state, JournalState::CancelPending);
        j.conn
            .execute(
                "UPDATE txns SET state = 'completed' WHERE transaction_id = 't1'",
                [],
            )
            .unwrap();
        assert!(j.in_doubt().unwrap().is_empty(), "completed is settled");
        assert_eq!(j.state("t1").unwrap().as_deref(), Some("completed"));
    }

    pub(crate) fn offer(txid: &str) -> Offer {
        Offer {
            transaction_id: txid.into(),
            merchant_id: "cable".into(),
            item_id: "ppv-1".into(),
            title: "Film".into(),
            amount: Money::new(250, Currency::EUR),
            payment_route: "pay".into(),
            status_route: "status".into(),
            embodiment: Embodiment::SecurityCard,
            tsk: None,
            etsk: None,
        }
    }

    fn init() -> PurchaseInit {
        PurchaseInit {
            provider_id: 1,
            card_id: 9,
            algorithm: 1,
            expiry: Expiry {
                year: 2030,
                month: 1,
            },
            balance: 1000,
            currency: Currency::EUR,
            auth_mode: 1,
            atc: 4,
            init_count: 1,
            key_version: 1,
            credits: Default::default(),
            privacy: false,
            card_random: [0; 8],
            card_mac: [0; 8],
        }
    }

    #[test]
    fn steps_persist_and_in_doubt_follows_the_state() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path()).unwrap();
            j.record(
                "t1",
                &Step::OfferAccepted {
                    offer: offer("t1"),
                    init: init(),
                },
            )
            .unwrap();
            assert!(j.in_doubt().unwrap().is_empty());
            j.record("t1", &Step::DrawSent).unwrap();
            let cmd = DebitCommand {
                security_card_id: 7,
                security_card_txn: 3,
                card_id: 9,
                atc: 4,
                amount: 250,
                currency: Currency::EUR,
                date: Date::new(2026, 11, 21),
                security_card_signature: [0; 8],
            };
            j.record("t1", &Step::DebitCommandReceived { command: cmd })
                .unwrap();
            j.record("t1", &Step::DebitSent).unwrap();
            j.record(
                "t2",
                &Step::OfferAccepted {
                    offer: offer("t2"),
                    init: init(),
                },
            )
            .unwrap();
        }
        // Reopened: the same file, as after a restart.
        let mut j = Journal::open(dir.path()).unwrap();
        let p = j.in_doubt().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].txn.security_card, Some((7, 3)));
        assert_eq!((p[0].txn.card_id, p[0].txn.atc), (9, 4));
        assert_eq!(p[0].state, JournalState::DebitSent);
        assert_eq!(p[0].offer, offer("t1"));
        assert_eq!(j.close_unsent().unwrap(), 1);
        assert_eq!(j.state("t2").unwrap().as_deref(), Some("ended"));
        j.record(
            "t1",
            &Step::Completed {
                receipt: Receipt {
                    transaction_id: "t1".into(),
                    released: true,
                    text: "ok".into(),
                    entitlement: None,
                    new_balance: Some(750),
                },
            },
        )
        .unwrap();
        assert!(j.in_doubt().unwrap().is_empty());
        assert_eq!(
            j.steps("t1").unwrap(),
            [
                "accepted",
                "draw_sent",
                "debit_command",
                "debit_sent",
                "completed"
            ]
        );
    }

    #[test]
    fn in_doubt_says_whether_debit_was_sent_and_carries_the_response_and_unresolvable_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        let cmd = DebitCommand {
            security_card_id: 7,
            security_card_txn: 3,
            card_id: 9,
            atc: 4,
            amount: 250,
            currency: Currency::EUR,
            date: Date::new(2026, 11, 21),
            security_card_signature: [0; 8],
        };
        let response = DebitResponse {
            card_id: 9,
            atc: 4,
            amount: 250,
            currency: Currency::EUR,
            new_balance: 750,
            security_card_id: 7,
            security_card_txn: 3,
            card_signature: [5; 8],
        };
        for t in ["drawn", "commanded", "sent", "responded"] {
            j.record(
                t,
                &Step::OfferAccepted {
                    offer: offer(t),
                    init: init(),
                },
            )
            .unwrap();
            j.record(t, &Step::DrawSent).unwrap();
        }
        for t in ["commanded", "sent", "responded"] {
            j.record(
                t,
                &Step::DebitCommandReceived {
                    command: cmd.clone(),
                },
            )
            .unwrap();
        }
        for t in ["sent", "responded"] {
            j.record(t, &Step::DebitSent).unwrap();
        }
        j.record(
            "responded",
            &Step::DebitResponded {
                response: response.clone(),
            },
        )
        .unwrap();
        // A cancel after DEBIT keeps the evidence that DEBIT went out.
        j.record(
            "sent",
            &Step::CancelPending {
                reason: CancelReason::DebitRefused {
                    sw: proto::apdu::StatusWord::BAD_SIGNATURE,
                },
            },
        )
        .unwrap();
        let p = j.in_doubt().unwrap();
        let by = |t: &str| {
            p.iter()
                .find(|x| x.txn.transaction_id == t)
                .unwrap()
                .clone()
        };
        assert_eq!(
            (by("drawn").txn.debit_sent, by("drawn").txn.security_card),
            (false, None)
        );
        assert_eq!(
            (
                by("commanded").txn.debit_sent,
                by("commanded").txn.security_card
            ),
            (false, Some((7, 3)))
        );
        assert!(by("sent").txn.debit_sent && by("sent").txn.response.is_none());
        assert_eq!(by("sent").state, JournalState::CancelPending);
        assert_eq!(
            by("sent").txn.cancel_reason,
            Some(CancelReason::DebitRefused {
                sw: proto::apdu::StatusWord::BAD_SIGNATURE
            }),
            "the journaled reason, for recovery to send again"
        );
        assert_eq!(by("responded").txn.cancel_reason, None);
        assert_eq!(by("responded").txn.response, Some(response));
        assert_eq!(by("drawn").txn.amount, offer("drawn").amount);

        j.record(
            "sent",
            &Step::Unresolvable {
                why: "proof rejected".into(),
            },
        )
        .unwrap();
        assert_eq!(j.in_doubt().unwrap().len(), 3, "no longer in doubt");
        assert_eq!(j.state("sent").unwrap().as_deref(), Some("unresolvable"));
        assert_eq!(
            j.unresolvable().unwrap(),
            [("sent".to_string(), "proof rejected".to_string())]
        );
    }

    #[test]
    fn unknown_transaction_and_cancel_pending() {
        let dir = tempfile::tempdir().unwrap();
        let mut j = Journal::open(dir.path()).unwrap();
        assert!(matches!(
            j.record("nope", &Step::DrawSent),
            Err(JournalError::Unknown(_))
        ));
        j.record(
            "t",
            &Step::OfferAccepted {
                offer: offer("t"),
                init: init(),
            },
        )
        .unwrap();
        j.record(
            "t",
            &Step::CancelPending {
                reason: CancelReason::AmountMismatch,
            },
        )
        .unwrap();
        assert_eq!(j.in_doubt().unwrap().len(), 1);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("journal.sqlite"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn load_steps_persist_and_in_doubt_loads_follow_the_state() {
        use proto::messages::{LoadConfirmation, LoadOffer, LoadSource};
        use proto::purse::{LoadCommand, LoadInit};
        use stb_flow::load::Step as L;
        let offer = LoadOffer {
            transaction_id: "ld".into(),
            source: LoadSource::Voucher { code: "V-1".into() },
            max_amount: Money::new(900, Currency::EUR),
            limited_by: "funds".into(),
            timestamp: 7,
            date: Date::new(2026, 11, 21),
            pin_required: false,
        };
        let init = LoadInit {
            card_id: 9,
            expiry: Expiry {
                year: 2030,
                month: 1,
            },
            balance: 100,
            max_balance: 1000,
            currency: Currency::EUR,
            atc: 3,
            load_count: 1,
            init_count: 1,
            key_version: 1,
            amount: 500,
            timestamp: 7,
            passbook: [0; 8],
            runs: [(0, 0); proto::purse::RECENT_RUNS],
            card_random: [1; 8],
            s1: [2; 8],
        };
        let cmd = LoadCommand {
            hsm_id: 5,
            card_id: 9,
            atc: 3,
            amount: 500,
            currency: Currency::EUR,
            passbook_through: 0,
            s2: [3; 8],
        };
        let dir = tempfile::tempdir().unwrap();
        {
            let mut j = Journal::open(dir.path()).unwrap();
            assert!(matches!(
                j.record_load("ld", &L::LoadSent),
                Err(JournalError::Unknown(_))
            ));
            j.record_load(
                "ld",
                &L::RequestSent {
                    offer: offer.clone(),
                    init: init.clone(),
                },
            )
            .unwrap();
            j.record_load(
                "ld",
                &L::CommandReceived {
                    command: cmd.clone(),
                },
            )
            .unwrap();
            j.record_load("ld", &L::LoadSent).unwrap();
        }
        let mut j = Journal::open(dir.path()).unwrap();
        let p = j.loads_in_doubt().unwrap();
        assert_eq!(p.len(), 1);
        assert_eq!(
            (&p[0].offer, &p[0].init, &p[0].command, &p[0].state.as_str()),
            (&offer, &init, &Some(cmd), &"load_sent")
        );
        assert!(p[0].response.is_none() && p[0].zero.is_none());
        assert!(j.in_doubt().unwrap().is_empty(), "purchases are apart");
        j.record_load("ld", &L::ZeroValue { zero: init.clone() })
            .unwrap();
        assert_eq!(j.loads_in_doubt().unwrap()[0].zero, Some(init));
        j.record_load(
            "ld",
            &L::Completed {
                confirmation: LoadConfirmation {
                    transaction_id: "ld".into(),
                    loaded: false,
                    new_balance: Some(100),
                    sealed: vec![],
                },
            },
        )
        .unwrap();
        assert!(j.loads_in_doubt().unwrap().is_empty());
        assert_eq!(
            j.load_state("ld").unwrap().as_deref(),
            Some("load_completed")
        );
        assert_eq!(
            j.steps("ld").unwrap(),
            [
                "load_request_sent",
                "load_command",
                "load_sent",
                "load_zero_value",
                "load_completed"
            ]
        );
    }
}
