//! The shell around [`stb_flow::load`]: the `[load]` settings, one load at a time driven
//! from the runner's UI intents and gateway answers. In-doubt loads are recovered with the
//! purchases by [`super::recover`] (at start, on reconnect, on every card insertion, on the
//! recovery timer, and before a new load or purchase on the same card: 001's
//! negative-result procedure needs an in-doubt load resolved before the card loads again).

use std::collections::VecDeque;

use proto::crypto::DesKey;
use proto::messages::{LoadSource, Message};
use stb_flow::show::{Doubt, Flow, Refusal};
use tracing::Instrument;
use ui::UiUpdate;
use ui::model::{ErrorKind, UiError};

use super::recover::Deferred;
use super::runner::{Event, Runner};
use crate::config::LoadConfig;
use stb_flow::load::{Action, Input, Load, Outcome, Step};

/// Load answers come back as `Event::Answer` with a flow id from this range, apart from
/// the purchase flows' ids.
const LOAD_IDS: u64 = 1 << 62;

/// What the config says about loads, with the PIN key read.
#[derive(Clone, Default)]
pub struct LoadSettings {
    pub bank_account: Option<String>,
    pub voucher: Option<String>,
    pub pin_key: Option<DesKey>,
}

impl std::fmt::Debug for LoadSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadSettings")
            .field("bank_account", &self.bank_account)
            .field("voucher", &self.voucher)
            .field("pin_key", &self.pin_key.as_ref().map(|_| "<set>"))
            .finish()
    }
}

impl LoadSettings {
    /// The configured source the viewer chose, if this box has one.
    pub fn source(&self, choice: ui::model::LoadSource) -> Option<LoadSource> {
        match choice {
            ui::model::LoadSource::Bank => self
                .bank_account
                .clone()
                .map(|account| LoadSource::Bank { account }),
            ui::model::LoadSource::Voucher => self.voucher.clone().map(LoadSource::voucher),
        }
    }

    /// Reads the PIN key file (hex, as provisioning writes it).
    pub fn from_config(c: &LoadConfig) -> Result<Self, String> {
        let pin_key = match &c.pin_key {
            None => None,
            Some(p) => {
                proto::secret::check_private(p).map_err(|e| format!("load.pin_key: {e}"))?;
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("load.pin_key {}: {e}", p.display()))?;
                let raw = hex::decode(text.trim())
                    .map_err(|e| format!("load.pin_key {}: not a hex key ({e})", p.display()))?;
                Some(
                    DesKey::from_slice(&raw)
                        .map_err(|e| format!("load.pin_key {}: {e}", p.display()))?,
                )
            }
        };
        Ok(Self {
            bank_account: c.bank_account.clone(),
            voucher: c.voucher.clone(),
            pin_key,
        })
    }
}

struct ActiveLoad {
    id: u64,
    flow: Load,
    span: tracing::Span,
    txid_recorded: bool,
}

/// The runner's load slot.
#[derive(Default)]
pub struct LoadSlot {
    pub settings: LoadSettings,
    active: Option<ActiveLoad>,
    next_id: u64,
    /// The last load's outcome and how many loads ended (for tests and logs).
    pub last: Option<Outcome>,
    pub done: u64,
    /// In-doubt loads resolved by recovery.
    pub recovered: u64,
}

impl LoadSlot {
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub fn owns(&self, flow: u64) -> bool {
        self.active.as_ref().map(|a| a.id) == Some(flow)
    }
}

fn ui_err(kind: ErrorKind, detail: impl Into<String>) -> UiUpdate {
    UiUpdate::Error(UiError {
        kind,
        detail: Some(detail.into()),
    })
}

impl Runner {
    /// "Load card" → a source: starts a load, after settling any in-doubt purchase or load
    /// of the same card (see [`super::recover`]).
    pub async fn start_load(&mut self, source: ui::model::LoadSource) {
        if self.busy() {
            self.update(UiUpdate::Error(super::show::refused(&Refusal::Busy)))
                .await;
            return;
        }
        if self.load.settings.source(source).is_none() {
            let what = match source {
                ui::model::LoadSource::Bank => ui::strings::LOAD_NO_BANK_ACCOUNT,
                ui::model::LoadSource::Voucher => ui::strings::LOAD_NO_VOUCHER,
            };
            self.update(ui_err(ErrorKind::Other, what)).await;
            return;
        }
        if !self.card.has_card() {
            self.update(ui_err(ErrorKind::NoCard, ui::strings::LOAD_INSERT_CARD))
                .await;
            return;
        }
        if let Some(Deferred::Load { source }) = self.gate(Deferred::Load { source }).await {
            self.start_load_now(source).await;
        }
    }

    /// Starts the load flow (the source and the card checked again: time may have passed).
    pub(crate) async fn start_load_now(&mut self, source: ui::model::LoadSource) {
        if self.load.is_active() || self.purchase_active() {
            return;
        }
        let Some(src) = self.load.settings.source(source) else {
            return;
        };
        if !self.card.has_card() {
            self.update(ui_err(ErrorKind::NoCard, ui::strings::LOAD_INSERT_CARD))
                .await;
            return;
        }
        self.load.next_id += 1;
        let id = LOAD_IDS + self.load.next_id;
        let (flow, actions) = Load::start(
            src.clone(),
            self.load.settings.pin_key.clone(),
            rand::random(),
        );
        let kind = match src {
            LoadSource::Bank { .. } => "bank",
            LoadSource::Voucher { .. } => "voucher",
        };
        let span = tracing::info_span!(
            "load",
            flow = id - LOAD_IDS,
            transaction_id = tracing::field::Empty,
            source = kind
        );
        span.in_scope(|| tracing::info!("load started"));
        self.load.active = Some(ActiveLoad {
            id,
            flow,
            span,
            txid_recorded: false,
        });
        self.execute_load(actions).await;
    }

    /// A viewer decision or a card event for the active load.
    pub async fn load_input(&mut self, input: Input) {
        let Some(a) = self.load.active.as_mut() else {
            return;
        };
        if matches!(input, Input::CardRemoved) && !a.flow.holds_card() {
            return;
        }
        let actions = a.span.in_scope(|| a.flow.handle(input));
        self.execute_load(actions).await;
    }

    /// A gateway answer for flow `flow`, if it is the active load's.
    pub async fn load_answer(&mut self, flow: u64, result: Result<Message, String>) {
        if !self.load.owns(flow) {
            return;
        }
        let input = match result {
            Ok(m) => Input::Answer(m),
            Err(e) => Input::NetworkFailed(e),
        };
        self.load_input(input).await;
    }

    async fn execute_load(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(active) = self.load.active.as_mut() else {
                return;
            };
            let span = active.span.clone();
            if !active.txid_recorded {
                if let Some(t) = active.flow.transaction_id() {
                    span.record("transaction_id", t);
                    active.txid_recorded = true;
                }
            }
            match action {
                Action::Journal {
                    transaction_id,
                    step,
                } => {
                    if let Err(e) = self.journal.record_load(&transaction_id, &step) {
                        // Not journaled means not done: stop before the action it guards.
                        span.in_scope(
                            || tracing::error!(error = %e, "journal write failed; load stopped"),
                        );
                        let error = e.to_string();
                        let refusal = Refusal::NotRecorded {
                            flow: Flow::Load,
                            error: error.clone(),
                        };
                        let shown = UiUpdate::Error(super::show::refused(&refusal));
                        let outcome = match step {
                            // The request never went out: nothing is held.
                            Step::RequestSent { .. } => Outcome::Failed {
                                transaction_id: Some(transaction_id),
                                refusal,
                            },
                            _ => Outcome::InDoubt {
                                transaction_id,
                                doubt: Doubt::LoadNotRecorded { error },
                            },
                        };
                        self.update(shown).await;
                        self.finish_load(outcome).await;
                        return;
                    }
                    span.in_scope(|| tracing::debug!(step = step_name(&step), "journaled"));
                }
                Action::Apdu(apdu) => {
                    let reply = self.card.transmit(&apdu).await;
                    if let Err(e) = &reply {
                        span.in_scope(|| tracing::warn!(error = %e, "card command failed"));
                    }
                    let active = self.load.active.as_mut().expect("checked");
                    let more = span.in_scope(|| active.flow.handle(Input::Card(reply)));
                    queue.extend(more);
                }
                Action::Send(msg) => {
                    let gw = self.gateway.clone();
                    let tx = self.events.clone();
                    let id = active.id;
                    span.in_scope(|| {
                        tracing::info!(message = stb_flow::name(&msg), "to the gateway")
                    });
                    tokio::spawn(
                        async move {
                            let result = gw.call(&msg).await.map_err(|e| e.to_string());
                            if let Err(e) = &result {
                                tracing::warn!(error = %e, "gateway request failed");
                            }
                            let _ = tx.send(Event::Answer { flow: id, result }).await;
                        }
                        .instrument(span.clone()),
                    );
                }
                Action::Show(s) => self.update(super::show::update(s)).await,
                Action::Done(outcome) => {
                    span.in_scope(|| tracing::info!(outcome = ?outcome, "load finished"));
                    self.finish_load(outcome).await;
                    return;
                }
            }
        }
        // Between two card sequences (the viewer types, the network answers) other programs
        // may use the card.
        if let Some(a) = &self.load.active {
            if !a.flow.card_sequence_open() {
                self.card.end_sequence().await;
            }
        }
    }

    async fn finish_load(&mut self, outcome: Outcome) {
        self.load.active = None;
        self.load.done += 1;
        self.load.last = Some(outcome);
        self.card.release().await;
        if self.card.has_card() {
            self.refresh_card().await;
        }
        self.recovery_after_flow().await;
    }
}

fn step_name(s: &Step) -> &'static str {
    match s {
        Step::RequestSent { .. } => "load request sent",
        Step::CommandReceived { .. } => "load command received",
        Step::LoadSent => "LOAD sent",
        Step::Responded { .. } => "card answered LOAD",
        Step::ZeroValue { .. } => "zero-value proof",
        Step::Completed { .. } => "completed",
        Step::Ended { .. } => "ended",
    }
}
