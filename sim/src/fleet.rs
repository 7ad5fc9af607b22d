//! The chaos run's simulated fleet: boxes in this process, each a [`crate::sim_box::SimBox`]
//! (device certificate, `stbd`'s gateway client, which connects again by itself when the
//! gateway went away, the real `proto` purse card) connected by
//! [`crate::loadgen::fleet::Fleet::connect`]. Unlike the load generator's boxes, these
//! script each step of a purchase or load themselves (the box core's flows have no place
//! to stop and lose power between two steps, which this fleet's outages need); that
//! scripting is the one copy of the box's steps left outside `stb-flow`.
//!
//! Each box behaves as a box must under faults (issue 11's "right behaviour"), so that what
//! the audit finds is the head end's doing and not the simulator's:
//! - it remembers its one open transaction before each step that can move value (the
//!   in-process equivalent of the box journal);
//! - a purchase whose DEBIT ran is settled by re-sending the card's debit response until
//!   the head end answers with a receipt; one whose DEBIT never ran is cancelled with the
//!   card's proof (a fresh INITIALIZE FOR PURCHASE) until the head end answers;
//! - a load whose LOAD ran re-sends the card's S3 until confirmed; one whose LOAD never ran
//!   is settled with a zero-value S1 (001 [0130]);
//! - no new transaction starts on a card with an open one; a recovery pass retries open
//!   transactions on a timer, whether or not the connection broke.
//!
//! The cards' logs are kept as seen after every step, and at the end every card is written
//! as a `vcard` file with that history, for the audit to read.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::loadgen::fleet::{BoxIdentity, ConnectPlan, Fleet};
use crate::sim_box::{SimBox, today};
use proto::apdu::CardApplication;
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::*;
use rand::Rng;
use tokio::sync::Mutex;

use crate::audit::{History, SimPending, write_history};
use crate::deploy::{BoxSpec, Layout, MerchantSpec};
use crate::record::{Outcome, Pacer, Recorder, TxKind, TxRecord};

/// A box's one open transaction.
#[derive(Debug, Clone)]
pub enum Open {
    /// The draw request went out; `debit` is the card's response once DEBIT ran; `proof`
    /// the INITIALIZE a cancel carries once one was sent (a retry sends the same).
    Purchase {
        offer: Offer,
        debit: Option<DebitResponseMsg>,
        proof: Option<PurchaseInit>,
    },
    /// The load request went out; `response` is the card's answer once LOAD ran; `zero` the
    /// zero-value S1 once one was sent (a retry sends the same).
    Load {
        offer: LoadOffer,
        response: Option<LoadResponse>,
        zero: Option<LoadInit>,
    },
}

impl Open {
    pub fn txid(&self) -> &str {
        match self {
            Open::Purchase { offer, .. } => &offer.transaction_id,
            Open::Load { offer, .. } => &offer.transaction_id,
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Open::Purchase { debit: Some(_), .. } => {
                "purchase: card debited, debit response not confirmed".into()
            }
            Open::Purchase { debit: None, .. } => {
                "purchase: drawn, DEBIT never ran; cancel not answered".into()
            }
            Open::Load {
                response: Some(_), ..
            } => "load: card answered LOAD, not confirmed".into(),
            Open::Load { response: None, .. } => {
                "load: requested, LOAD never ran; zero-value proof not answered".into()
            }
        }
    }
}

pub struct Device {
    pub spec: BoxSpec,
    pub sim: SimBox,
    pub open: Option<Open>,
    /// Every card log record seen, by counter.
    pub history: BTreeMap<u32, LogRecord>,
    /// A simulated power loss: the box does nothing (no retry, no new transaction) until then.
    pub asleep_until: Option<Instant>,
}

/// A simulated power loss of a box in the middle of a transaction: it comes back after a
/// while and settles what it holds, as a box does from its journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outage {
    /// The debit command came; the box dies before DEBIT.
    BeforeDebit,
    /// DEBIT ran; the box dies before sending the card's response.
    AfterDebit,
    /// LOAD ran; the box dies before sending the card's S3.
    AfterLoad,
}

/// Timing knobs.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// One exchange with the gateway.
    pub step: Duration,
    /// Pause between recovery passes over open transactions.
    pub recovery_every: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            step: Duration::from_secs(2),
            recovery_every: Duration::from_secs(2),
        }
    }
}

fn code_of(m: &Message) -> String {
    match m {
        Message::Error(e) => format!("{:?}", e.code),
        other => format!("unexpected {}", other.kind()),
    }
}

fn reason_of(m: &Message) -> String {
    match m {
        Message::Error(e) => format!("{:?} ({})", e.code, e.reason),
        other => format!("unexpected {}", other.kind()),
    }
}

impl Device {
    fn note_log(&mut self) {
        for r in &self.sim.card.state.log {
            self.history.insert(r.atc, r.clone());
        }
    }

    /// One exchange, bounded by `step` (the client's own deadline is the run's too); a
    /// dead connection is made again by the client on the next exchange.
    async fn call(&mut self, msg: &Message, step: Duration) -> Result<Message, String> {
        match tokio::time::timeout(step, self.sim.gateway.call(msg)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} ms", step.as_millis())),
        }
    }

    /// Card read for the offer with the checks of 001 [0075], and the draw request of
    /// [0077].
    pub(crate) fn draw_request(&mut self, offer: &Offer) -> Result<DrawRequest, String> {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_purchase(today()));
        if !r.sw.is_ok() {
            return Err(format!("card refused INITIALIZE FOR PURCHASE: {}", r.sw));
        }
        let init = PurchaseInit::decode(&r.data).map_err(|e| e.to_string())?;
        if init.currency != offer.amount.currency {
            return Err("[0075] the card holds another currency".into());
        }
        if init.balance < offer.amount.minor {
            return Err("[0075] not enough value on the card".into());
        }
        let body = DrawBody {
            amount: offer.amount,
            atr: self.sim.card.atr(),
            init,
        };
        Ok(DrawRequest {
            transaction_id: offer.transaction_id.clone(),
            merchant_id: offer.merchant_id.clone(),
            etsk: offer.etsk.clone(),
            body: Protected::new(body, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
        })
    }

    /// The debit command, opened and checked against the offer's amount (001 [0082]).
    fn open_debit_command(offer: &Offer, msg: &Message) -> Result<DebitCommand, String> {
        let Message::DebitCommand(dc) = msg else {
            return Err(format!("expected a debit command, got {}", msg.kind()));
        };
        let body = dc
            .body
            .open(offer.tsk.as_ref())
            .map_err(|e| e.to_string())?;
        if body.command.amount_money() != offer.amount {
            return Err(format!(
                "[0082] debit command for {} but the offer is {}",
                body.command.amount_money(),
                offer.amount
            ));
        }
        Ok(body.command)
    }

    /// DEBIT on the card; the debit response message for the gateway.
    fn debit(&mut self, offer: &Offer, cmd: &DebitCommand) -> Result<DebitResponseMsg, String> {
        let r = self.apdu(&commands::debit(cmd));
        if !r.sw.is_ok() {
            return Err(format!("card refused DEBIT: {}", r.sw));
        }
        let resp = DebitResponse::decode(&r.data).map_err(|e| e.to_string())?;
        Ok(DebitResponseMsg {
            transaction_id: offer.transaction_id.clone(),
            body: Protected::new(resp, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
        })
    }

    fn apdu(&mut self, apdu: &[u8]) -> proto::apdu::Response {
        let r = self.sim.apdu(apdu);
        self.note_log();
        r
    }

    /// A fresh INITIALIZE FOR PURCHASE: the card's proof that a DEBIT did not run.
    fn proof(&mut self) -> Option<PurchaseInit> {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_purchase(today()));
        r.sw.is_ok()
            .then(|| PurchaseInit::decode(&r.data).ok())
            .flatten()
    }

    /// A zero-value INITIALIZE FOR LOAD for `offer`: the card's proof of its load state.
    fn zero_value(&mut self, offer: &LoadOffer) -> Option<LoadInit> {
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_load(&LoadInitRequest {
            amount: 0,
            currency: offer.max_amount.currency,
            timestamp: offer.timestamp,
            date: offer.date,
        }));
        r.sw.is_ok()
            .then(|| LoadInit::decode(&r.data).ok())
            .flatten()
    }

    /// Tries once to settle the open transaction; true when nothing is open any more.
    pub async fn settle(&mut self, step: Duration) -> bool {
        let Some(open) = self.open.clone() else {
            return true;
        };
        if let Some(t) = self.asleep_until {
            if Instant::now() < t {
                return false;
            }
            self.asleep_until = None;
        }
        let txid = open.txid().to_string();
        let settled = match open {
            Open::Purchase {
                debit: Some(resp), ..
            } => match self.call(&Message::DebitResponse(resp), step).await {
                Ok(Message::Receipt(r)) => {
                    if !r.released {
                        tracing::warn!(txid, text = %r.text, "debit response re-sent: receipt without release");
                    }
                    true
                }
                Ok(other) => {
                    tracing::info!(txid, answer = %reason_of(&other), "debit response re-sent: not settled yet");
                    false
                }
                Err(e) => {
                    tracing::debug!(txid, error = %e, "debit response re-send failed");
                    false
                }
            },
            Open::Purchase {
                debit: None,
                proof,
                offer,
            } => {
                // The proof is taken once and kept: a retry is the same message.
                let proof = proof.or_else(|| self.proof());
                self.open = Some(Open::Purchase {
                    offer,
                    debit: None,
                    proof: proof.clone(),
                });
                let msg = Message::Cancel(CancelMsg {
                    transaction_id: txid.clone(),
                    reason: CancelReason::NotDebited,
                    proof,
                });
                match self.call(&msg, step).await {
                    Ok(Message::Receipt(_)) => true,
                    Ok(Message::Error(e)) if e.code == ErrorCode::UnknownTransaction => true,
                    Ok(Message::Error(e)) if e.code == ErrorCode::AlreadyCompleted => {
                        // The card never ran this DEBIT: a head end that says the sale
                        // completed is wrong. Kept open for the audit to see.
                        tracing::error!(txid, reason = %e.reason, "cancel answered AlreadyCompleted for a sale the card never paid");
                        false
                    }
                    Ok(other) => {
                        tracing::warn!(txid, answer = %reason_of(&other), "cancel with proof not settled");
                        false
                    }
                    Err(e) => {
                        tracing::debug!(txid, error = %e, "cancel failed");
                        false
                    }
                }
            }
            Open::Load {
                offer,
                response,
                zero,
            } => {
                let zero = if response.as_ref().is_some_and(|r| r.is_loaded()) {
                    None
                } else {
                    // Taken once and kept: a retry is the same load response.
                    zero.or_else(|| self.zero_value(&offer))
                };
                self.open = Some(Open::Load {
                    offer: offer.clone(),
                    response: response.clone(),
                    zero: zero.clone(),
                });
                let msg = Message::LoadResponse(LoadResponseMsg {
                    transaction_id: txid.clone(),
                    response,
                    zero_value: zero,
                });
                match self.call(&msg, step).await {
                    Ok(Message::LoadConfirmation(c)) if c.transaction_id == txid => true,
                    Ok(other) => {
                        tracing::warn!(txid, answer = %reason_of(&other), "load response re-sent: not settled");
                        false
                    }
                    Err(e) => {
                        tracing::debug!(txid, error = %e, "load response re-send failed");
                        false
                    }
                }
            }
        };
        if settled {
            self.open = None;
        }
        settled
    }

    /// One purchase of `item` from `merchant`.
    pub async fn purchase(
        &mut self,
        merchant: &str,
        item: &str,
        step: Duration,
        outage: Option<(Outage, Duration)>,
    ) -> (Option<String>, Outcome) {
        let offer = match self
            .call(
                &Message::OfferRequest {
                    merchant_id: merchant.into(),
                    item_id: item.into(),
                },
                step,
            )
            .await
        {
            Ok(Message::Offer(o)) => o,
            Ok(other) => {
                return (
                    None,
                    Outcome::Refused(format!("offer: {}", code_of(&other))),
                );
            }
            Err(e) => return (None, Outcome::Failed(format!("offer: {}", trim(&e)))),
        };
        let txid = offer.transaction_id.clone();
        let draw = match self.draw_request(&offer) {
            Ok(d) => d,
            Err(e) => {
                self.note_log();
                return (Some(txid), Outcome::Refused(format!("card: {}", trim(&e))));
            }
        };
        self.note_log();
        // Remembered before it goes: from here value may move.
        self.open = Some(Open::Purchase {
            offer: offer.clone(),
            debit: None,
            proof: None,
        });
        let answer = match self.call(&Message::DrawRequest(draw), step).await {
            Ok(a) => a,
            Err(e) => {
                return (
                    Some(txid),
                    self.after_failure(step, format!("draw: {}", trim(&e)))
                        .await,
                );
            }
        };
        let cmd = match Self::open_debit_command(&offer, &answer) {
            Ok(c) => c,
            Err(_) => {
                let why = format!("draw: {}", code_of(&answer));
                // Whatever the head end holds for it, the card did not pay: cancel now.
                let settled = self.settle(step).await;
                return (
                    Some(txid),
                    if settled {
                        Outcome::Refused(why)
                    } else {
                        Outcome::InDoubt(format!("{why}; cancel not answered"))
                    },
                );
            }
        };
        if let Some((Outage::BeforeDebit, d)) = outage {
            self.asleep_until = Some(Instant::now() + d);
            return (
                Some(txid),
                Outcome::InDoubt(format!(
                    "simulated power loss before DEBIT ({} s)",
                    d.as_secs()
                )),
            );
        }
        let resp = match self.debit(&offer, &cmd) {
            Ok(r) => r,
            Err(e) => {
                self.note_log();
                let why = format!("card: {}", trim(&e));
                let settled = self.settle(step).await;
                return (
                    Some(txid),
                    if settled {
                        Outcome::Refused(why)
                    } else {
                        Outcome::InDoubt(format!("{why}; cancel not answered"))
                    },
                );
            }
        };
        self.note_log();
        self.open = Some(Open::Purchase {
            offer,
            debit: Some(resp.clone()),
            proof: None,
        });
        if let Some((Outage::AfterDebit, d)) = outage {
            self.asleep_until = Some(Instant::now() + d);
            return (
                Some(txid),
                Outcome::InDoubt(format!(
                    "simulated power loss after DEBIT ({} s)",
                    d.as_secs()
                )),
            );
        }
        match self.call(&Message::DebitResponse(resp), step).await {
            Ok(Message::Receipt(r)) => {
                self.open = None;
                if r.released {
                    (Some(txid), Outcome::Completed)
                } else {
                    (
                        Some(txid),
                        Outcome::Refused(format!("receipt without release: {}", r.text)),
                    )
                }
            }
            Ok(other) => (
                Some(txid),
                Outcome::InDoubt(format!("debit response: {}", code_of(&other))),
            ),
            Err(e) => (
                Some(txid),
                Outcome::InDoubt(format!("debit response: {}", trim(&e))),
            ),
        }
    }

    /// After a failed exchange with a transaction open: one immediate settle attempt.
    async fn after_failure(&mut self, step: Duration, why: String) -> Outcome {
        if self.settle(step).await {
            Outcome::Failed(format!("{why}; settled"))
        } else {
            Outcome::InDoubt(why)
        }
    }

    /// One load from the box's bank account (with its PIN) or its voucher.
    pub async fn load(
        &mut self,
        bank: bool,
        amount: u64,
        step: Duration,
        outage: Option<(Outage, Duration)>,
    ) -> (Option<String>, Outcome) {
        let source = if bank {
            LoadSource::Bank {
                account: self.spec.account.clone(),
            }
        } else {
            LoadSource::voucher(self.spec.voucher.clone())
        };
        self.apdu(&commands::select());
        let purse = self.apdu(&commands::read_purse());
        let Ok(card) = PurseInfo::decode(&purse.data) else {
            return (None, Outcome::Failed("card: READ PURSE".into()));
        };
        let offer = match self
            .call(
                &Message::LoadOfferRequest(LoadOfferRequest {
                    source: source.clone(),
                    card,
                }),
                step,
            )
            .await
        {
            Ok(Message::LoadOffer(o)) => o,
            Ok(other) => {
                return (
                    None,
                    Outcome::Refused(format!("load offer: {}", code_of(&other))),
                );
            }
            Err(e) => return (None, Outcome::Failed(format!("load offer: {}", trim(&e)))),
        };
        let txid = offer.transaction_id.clone();
        let amount = amount.min(offer.max_amount.minor);
        if amount == 0 {
            return (Some(txid), Outcome::Refused("nothing can be loaded".into()));
        }
        self.apdu(&commands::select());
        let r = self.apdu(&commands::init_load(&LoadInitRequest {
            amount,
            currency: offer.max_amount.currency,
            timestamp: offer.timestamp,
            date: offer.date,
        }));
        let Some(init) =
            r.sw.is_ok()
                .then(|| LoadInit::decode(&r.data).ok())
                .flatten()
        else {
            return (Some(txid), Outcome::Refused(format!("card: {}", r.sw)));
        };
        let sealed_pin = bank.then(|| seal_pin(&self.spec.pin_key, &txid, &self.spec.pin));
        let req = LoadRequest {
            transaction_id: txid.clone(),
            // The funder's name for the source (a voucher's reference, never its code).
            source: offer.source.clone(),
            amount: Money::new(amount, init.currency),
            init,
            sealed_pin,
        };
        self.open = Some(Open::Load {
            offer: offer.clone(),
            response: None,
            zero: None,
        });
        let cmd = match self.call(&Message::LoadRequest(req), step).await {
            Ok(Message::LoadCommand(c)) => c.command,
            Ok(Message::Error(e)) if !ambiguous(e.code) => {
                // A refusal: no hold stands (the gateway settled it), the card loaded nothing.
                self.open = None;
                return (
                    Some(txid),
                    Outcome::Refused(format!("load request: {:?}", e.code)),
                );
            }
            Ok(other) => {
                let why = format!("load request: {}", code_of(&other));
                return (Some(txid), self.after_failure(step, why).await);
            }
            Err(e) => {
                let why = format!("load request: {}", trim(&e));
                return (Some(txid), self.after_failure(step, why).await);
            }
        };
        let r = self.apdu(&commands::load(&cmd));
        let resp = match r
            .sw
            .is_ok()
            .then(|| LoadResponse::decode(&r.data).ok())
            .flatten()
        {
            Some(resp) => resp,
            None => {
                let why = format!("card refused LOAD: {}", r.sw);
                return (Some(txid), self.after_failure(step, why).await);
            }
        };
        self.open = Some(Open::Load {
            offer,
            response: Some(resp.clone()),
            zero: None,
        });
        if let Some((Outage::AfterLoad, d)) = outage {
            self.asleep_until = Some(Instant::now() + d);
            return (
                Some(txid),
                Outcome::InDoubt(format!(
                    "simulated power loss after LOAD ({} s)",
                    d.as_secs()
                )),
            );
        }
        let msg = Message::LoadResponse(LoadResponseMsg {
            transaction_id: txid.clone(),
            response: Some(resp),
            zero_value: None,
        });
        match self.call(&msg, step).await {
            Ok(Message::LoadConfirmation(c)) if c.transaction_id == txid => {
                self.open = None;
                if c.loaded {
                    (Some(txid), Outcome::Completed)
                } else {
                    (Some(txid), Outcome::Refused("confirmed not loaded".into()))
                }
            }
            Ok(other) => (
                Some(txid),
                Outcome::InDoubt(format!("load response: {}", code_of(&other))),
            ),
            Err(e) => (
                Some(txid),
                Outcome::InDoubt(format!("load response: {}", trim(&e))),
            ),
        }
    }
}

/// Refusals after which the head end may still hold something for the load (a hold placed,
/// an S2 issued): the box settles those with its proof.
fn ambiguous(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Busy | ErrorCode::Internal | ErrorCode::Timeout | ErrorCode::InDoubt
    )
}

fn trim(e: &str) -> String {
    e.chars().take(120).collect()
}

pub fn seal_pin(key: &DesKey, txid: &str, pin: &str) -> Vec<u8> {
    let block = PinBlock {
        transaction_id: txid.into(),
        pin: proto::secret::Secret::new(pin.to_string()),
    };
    proto::crypto::seal(
        key,
        &postcard::to_allocvec(&block).expect("in-memory serialization"),
        &mut rand::rngs::OsRng,
    )
}

/// A personalised card for a box spec.
pub fn card_for(layout: &Layout, b: &BoxSpec) -> PurseCard {
    let spec = CardSpec {
        card_id: b.card_id,
        provider_id: 7,
        currency: b.currency,
        balance: b.card_balance,
        max_balance: b.card_max,
        expiry: Expiry {
            year: 2099,
            month: 12,
        },
    };
    PurseCard::new(
        CardState::personalise(&spec, &layout.issuer),
        rand::random(),
    )
}

/// The simulated fleet.
pub struct SimFleet {
    pub devices: Vec<Arc<Mutex<Device>>>,
    merchants: Vec<MerchantSpec>,
    pub timing: Timing,
    /// Share of the regular transactions in which the box loses power mid-way ([`Outage`])
    /// for 35–45 s (longer than the payment server's reversal timeout).
    pub outages: f64,
}

impl SimFleet {
    /// Issues device certificates, connects every box, personalises its card.
    pub async fn connect(layout: &Layout, timing: Timing) -> Result<Self, String> {
        let specs = layout.sim_boxes.clone();
        if specs.is_empty() {
            return Ok(Self {
                devices: Vec::new(),
                merchants: layout.merchants.clone(),
                timing,
                outages: 0.0,
            });
        }
        let ca = headend::pki::OperatorCa::load(&layout.ca_dir).map_err(|e| e.to_string())?;
        let ca_certs = headend::quic::load_certs(&layout.ca_dir.join("ca.crt.pem"))
            .map_err(|e| e.to_string())?;
        let ids: Vec<BoxIdentity> = specs
            .iter()
            .map(|s| {
                let issued = ca
                    .issue_device(&headend::quic::BoxId::new(&s.box_id).map_err(|e| e.to_string())?)
                    .map_err(|e| e.to_string())?;
                Ok(BoxIdentity {
                    box_id: s.box_id.clone(),
                    tls: headend::quic::ClientTls::new(
                        ca_certs.clone(),
                        issued.tls_identity(),
                        "gateway",
                    ),
                })
            })
            .collect::<Result<_, String>>()?;
        let fleet = Fleet::connect(
            &ids,
            &layout.issuer,
            layout.gateway_addr(),
            ConnectPlan {
                per_endpoint: 64,
                parallel: 8,
                balance: 1,
                request_timeout: timing.step,
                journal_dir: Some(layout.dir.join("sim-box-journals")),
            },
            0,
        )
        .await?;
        if fleet.len() != specs.len() {
            return Err(format!(
                "{} of {} simulated boxes connected: {}",
                fleet.len(),
                specs.len(),
                fleet.connect_errors
            ));
        }
        let mut fleet = fleet;
        let boxes = std::mem::take(&mut fleet.boxes);
        let mut devices = Vec::new();
        for (i, b) in boxes.into_iter().enumerate() {
            let mut sim = Arc::try_unwrap(b)
                .map_err(|_| "a simulated box is still shared".to_string())?
                .into_inner();
            sim.card = card_for(layout, &specs[i]);
            devices.push(Arc::new(Mutex::new(Device {
                spec: specs[i].clone(),
                sim,
                open: None,
                history: BTreeMap::new(),
                asleep_until: None,
            })));
        }
        Ok(Self {
            devices,
            merchants: layout.merchants.clone(),
            timing,
            outages: 0.0,
        })
    }

    /// Items a card in `c` can buy: (merchant, item).
    fn items(&self, c: Currency) -> Vec<(String, String)> {
        self.merchants
            .iter()
            .flat_map(|m| {
                m.items
                    .iter()
                    .filter(move |i| i.currency == c)
                    .map(move |i| (m.id.clone(), i.id.clone()))
            })
            .collect()
    }

    /// Picks a transaction for `d`: a purchase, or with `load_share` a bank or voucher load.
    fn pick(&self, d: &Device, load_share: f64) -> (TxKind, u64, (String, String)) {
        let mut rng = rand::thread_rng();
        let load = rng.gen_bool(load_share.clamp(0.0, 1.0));
        let bank = rng.gen_bool(0.5);
        let amount = rng.gen_range(1..=40) * 50;
        let items = self.items(d.spec.currency);
        let pick = items[rng.gen_range(0..items.len())].clone();
        let kind = match (load, bank) {
            (false, _) => TxKind::Purchase,
            (true, true) => TxKind::BankLoad,
            (true, false) => TxKind::VoucherLoad,
        };
        (kind, amount, pick)
    }

    /// One transaction of `kind` on `d`, recorded under `source`.
    #[allow(clippy::too_many_arguments)]
    pub async fn transact(
        &self,
        d: &mut Device,
        kind: TxKind,
        amount: u64,
        pick: &(String, String),
        source: &'static str,
        rec: &Recorder,
        outage: Option<(Outage, Duration)>,
    ) -> Outcome {
        let step = self.timing.step;
        let started = Instant::now();
        let (txid, outcome) = match kind {
            TxKind::Purchase => d.purchase(&pick.0, &pick.1, step, outage).await,
            TxKind::BankLoad => d.load(true, amount, step, outage).await,
            TxKind::VoucherLoad => d.load(false, amount, step, outage).await,
        };
        rec.tx(TxRecord {
            source,
            box_id: d.spec.box_id.clone(),
            kind,
            txid,
            started,
            ended: Instant::now(),
            outcome: outcome.clone(),
        });
        outcome
    }

    /// Runs `workers` drivers taking start slots from `pacer` until it runs dry; each slot
    /// is one transaction on a free box of `boxes` (indices) without an open transaction (a
    /// purchase, or with `load_share` a bank or voucher load).
    pub async fn drive(
        self: &Arc<Self>,
        boxes: Vec<usize>,
        pacer: Arc<Pacer>,
        rec: Arc<Recorder>,
        workers: usize,
        load_share: f64,
    ) {
        let boxes = Arc::new(boxes);
        let mut tasks = tokio::task::JoinSet::new();
        for w in 0..workers.max(1) {
            let (me, pacer, rec, boxes) = (self.clone(), pacer.clone(), rec.clone(), boxes.clone());
            tasks.spawn(async move {
                let mut cursor = w;
                while let Some(slot) = pacer.next() {
                    tokio::time::sleep_until(slot.into()).await;
                    // A box with nothing open; wait up to a second for one.
                    let mut free = me.free(&boxes, &mut cursor);
                    let until = tokio::time::Instant::now() + Duration::from_secs(1);
                    while free.is_none() && tokio::time::Instant::now() < until {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        free = me.free(&boxes, &mut cursor);
                    }
                    let Some(mut d) = free else {
                        rec.shed();
                        continue;
                    };
                    let (kind, amount, pick) = me.pick(&d, load_share);
                    let outage = {
                        let mut rng = rand::thread_rng();
                        rng.gen_bool(me.outages.clamp(0.0, 1.0)).then(|| {
                            let what = match kind {
                                TxKind::Purchase if rng.gen_bool(0.5) => Outage::BeforeDebit,
                                TxKind::Purchase => Outage::AfterDebit,
                                _ => Outage::AfterLoad,
                            };
                            (what, Duration::from_secs(rng.gen_range(35..=45)))
                        })
                    };
                    me.transact(&mut d, kind, amount, &pick, "sim", &rec, outage)
                        .await;
                }
            });
        }
        while tasks.join_next().await.is_some() {}
    }

    /// A free box of `boxes` with nothing open, round robin from `cursor`.
    fn free(
        &self,
        boxes: &[usize],
        cursor: &mut usize,
    ) -> Option<tokio::sync::OwnedMutexGuard<Device>> {
        let n = boxes.len();
        for _ in 0..n {
            let d = self.devices[boxes[*cursor % n]].clone();
            *cursor += 1;
            if let Ok(g) = d.try_lock_owned() {
                if g.open.is_none() {
                    return Some(g);
                }
            }
        }
        None
    }

    /// Transactions of `kind` back to back — on the boxes `boxes`, or when none of them is
    /// free, on any free box — until one completes or `until` passes; the completion instant.
    pub async fn probe(
        &self,
        boxes: &[usize],
        kind: TxKind,
        rec: &Recorder,
        until: tokio::time::Instant,
    ) -> Option<Instant> {
        let all: Vec<usize> = (0..self.devices.len()).collect();
        let (mut cursor, mut any) = (0, 0);
        while tokio::time::Instant::now() < until {
            let found = self
                .free(boxes, &mut cursor)
                .or_else(|| self.free(&all, &mut any));
            let Some(mut d) = found else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let (_, amount, pick) = self.pick(&d, 0.0);
            if self
                .transact(&mut d, kind, amount, &pick, "probe", rec, None)
                .await
                == Outcome::Completed
            {
                return Some(Instant::now());
            }
            drop(d);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// One recovery pass: every idle box with an open transaction tries to settle it.
    /// Returns how many are still open.
    pub async fn recover_once(&self) -> usize {
        let mut left = 0;
        for d in &self.devices {
            let Ok(mut g) = d.try_lock() else {
                continue;
            };
            if g.open.is_some() && !g.settle(self.timing.step).await {
                left += 1;
            }
        }
        left
    }

    /// Recovery passes every `timing.recovery_every` until `stop` says so.
    pub async fn recover_forever(self: Arc<Self>, stop: Arc<std::sync::atomic::AtomicBool>) {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            self.recover_once().await;
            tokio::time::sleep(self.timing.recovery_every).await;
        }
    }

    /// Open transactions now (boxes busy in a transaction are not counted).
    pub async fn open(&self) -> Vec<SimPending> {
        let mut out = Vec::new();
        for d in &self.devices {
            let g = d.lock().await;
            if let Some(o) = &g.open {
                out.push(SimPending {
                    box_id: g.spec.box_id.clone(),
                    transaction_id: o.txid().to_string(),
                    what: o.describe(),
                });
            }
        }
        out
    }

    /// Writes every card as a `vcard` file with its history into `dir`, and the open
    /// transactions to `pending`; returns the card files.
    pub async fn write_cards(
        &self,
        dir: &Path,
        pending: &Path,
    ) -> Result<Vec<std::path::PathBuf>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let mut files = Vec::new();
        for d in &self.devices {
            let mut g = d.lock().await;
            g.note_log();
            let path = dir.join(format!("{}.plvc", g.spec.box_id));
            let _ = std::fs::remove_file(&path);
            let state = g.sim.card.state.clone();
            let spec = CardSpec {
                card_id: state.card_id,
                provider_id: state.provider_id,
                currency: state.currency,
                balance: state.balance,
                max_balance: state.max_balance,
                expiry: state.expiry,
            };
            let issuer = IssuerKeys {
                key_version: state.key_version,
                purchase_master: DesKey::new([0; 16]),
                load_master: DesKey::new([0; 16]),
            };
            let mut vc = reader_drivers::vcard::VirtualCard::create(&path, &spec, &issuer)
                .map_err(|e| e.to_string())?;
            vc.update(|s| *s = state).map_err(|e| e.to_string())?;
            write_history(
                &path,
                &History {
                    opening_balance: Some(g.spec.card_balance),
                    records: g.history.values().cloned().collect(),
                },
            )?;
            files.push(path);
        }
        let open = self.open().await;
        let text = serde_json::to_string_pretty(&open).map_err(|e| e.to_string())?;
        std::fs::write(pending, text).map_err(|e| format!("{}: {e}", pending.display()))?;
        Ok(files)
    }

    /// Closes every connection.
    pub async fn close(&self) {
        for d in &self.devices {
            let g = d.lock().await;
            g.sim.gateway.close("chaos done");
        }
    }
}
