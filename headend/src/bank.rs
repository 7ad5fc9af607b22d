//! The bank server (001 bank server 860): accounts in minor units linked to a set-top box
//! (and optionally a card), the PIN, the maximum load, and holds.
//!
//! A load never debits an account up front. The bank places a HOLD for the load amount
//! when the load request passes the PIN and the limits; the hold is CAPTURED when the load
//! server's sealed confirmation says the card was loaded — the amount then moves to the card
//! issuer's float account (001 [0135]) — and RELEASED when it says the card was not. This
//! settles the seed's debit-before-load ordering (step 875 against [0134]).
//!
//! The PIN travels only sealed end to end, box → bank, under a per-box PIN key derived from
//! the bank's PIN master key by box id. The bank keeps a PIN verification value (a MAC),
//! never the PIN. `pin_tries` wrong PINs in a row lock the account until an operator runs
//! `headend bank-unlock`.
//!
//! State lives only in the journal (accounts, offers, holds, float), read and written under
//! one lock per operation, so the operator command can change it while the bank runs.
//!
//! The hold discipline itself (accounts, offers, holds, float on one journal) is
//! [`crate::funds::Funds`], which the load server runs too, for pre-funded accounts; this
//! module holds the bank's own parts: its PIN keys and the bank role.

use std::sync::Arc;

use proto::crypto::{self, DesKey};
use proto::messages::*;
use tracing::Instrument;

use crate::config::{HeadendConfig, read_key_file};
use crate::funds::{Account, Funds, FundsSpec};
use crate::journal::Journal;
use crate::quic::BoxFuture;
use crate::role::refuse;
use crate::role::{Caller, Role};

/// The per-box PIN key the box is provisioned with (a key file), derived from the bank PIN
/// master key by box id.
pub fn box_pin_key(pin_master: &DesKey, box_id: &str) -> DesKey {
    pin_master.derive(b"PURSELINK PIN KEY", box_id.as_bytes())
}

/// The PIN verification value the bank stores for an account: a MAC over the account id
/// and the PIN under a key derived from the PIN master key.
pub fn pin_verification_value(pin_master: &DesKey, account: &str, pin: &str) -> String {
    let pvk = pin_master.derive(b"PURSELINK PVK", b"");
    let mut fields = account.as_bytes().to_vec();
    fields.push(0);
    fields.extend_from_slice(pin.as_bytes());
    hex::encode_upper(crypto::sign(&pvk, b"PVV1", &fields))
}

/// Seconds since the epoch: the load server time stamp S1 covers.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The bank role.
pub struct BankServer {
    pub funds: Funds,
}

impl BankServer {
    pub fn open(cfg: &HeadendConfig) -> Result<Arc<Self>, String> {
        let s = cfg.bank.as_ref().ok_or("no [bank] section")?;
        let journal = Arc::new(
            Journal::open_target(&cfg.journal_target("bank").map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?,
        );
        let accounts = cfg
            .bank_accounts
            .iter()
            .map(|d| Account {
                id: d.id.clone(),
                box_id: Some(d.box_id.clone()),
                card_id: d.card_id,
                currency: d.currency(),
                opening_balance: d.opening_balance,
                balance: d.opening_balance,
                held: 0,
                pvv: Some(d.pin_verification_value.clone()),
                wrong_pins: 0,
                locked: false,
                day: None,
                used_today: 0,
            })
            .collect();
        let spec = FundsSpec {
            who: "bank",
            confirmation_key: read_key_file(
                "[bank] confirmation_key_file",
                &s.confirmation_key_file,
            )
            .map_err(|e| e.to_string())?,
            pin_master: Some(
                read_key_file("[bank] pin_master_file", &s.pin_master_file)
                    .map_err(|e| e.to_string())?,
            ),
            pin_tries: s.pin_tries,
            daily_limit: s.daily_limit,
            float_account: s.float_account.clone(),
            offer_lifetime_secs: s.offer_lifetime_secs,
            funder: crate::gateway::load::BANK,
            clearing: s.clearing.clone(),
        };
        let funds = Funds::open(spec, journal, accounts)?;
        Ok(Arc::new(Self { funds }))
    }

    pub fn journal(&self) -> &Arc<Journal> {
        &self.funds.journal
    }
}

impl Role for BankServer {
    fn handle(&self, caller: Caller, msg: Message) -> BoxFuture<'_, Message> {
        Box::pin(async move {
            if let Caller::Box(b) = &caller {
                return refuse(
                    ErrorCode::NotYourAccount,
                    format!("box {b}: set-top boxes reach the bank through the gateway"),
                    None,
                );
            }
            match msg {
                Message::RoutedLoadOfferRequest { box_id, request } => {
                    let (LoadSource::Bank { account } | LoadSource::Unload { account }) =
                        &request.source
                    else {
                        return refuse(
                            ErrorCode::UnknownRoute,
                            "the bank holds bank accounts, not vouchers",
                            None,
                        );
                    };
                    let span = tracing::info_span!("bank", %box_id, %account);
                    self.funds
                        .offer(&box_id, account, &request.card, request.source.is_unload())
                        .instrument(span)
                        .await
                }
                Message::HoldRequest(r) => {
                    let span = tracing::info_span!("bank", txid = %r.transaction_id);
                    self.funds.place_hold(r).instrument(span).await
                }
                Message::LoadConfirmation(c) => {
                    let span = tracing::info_span!("bank", txid = %c.transaction_id);
                    self.funds.settle(c).instrument(span).await
                }
                other => refuse(
                    ErrorCode::Malformed,
                    format!("the bank does not take {}", other.kind()),
                    None,
                ),
            }
        })
    }
}
