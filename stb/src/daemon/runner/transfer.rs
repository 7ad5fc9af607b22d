//! The runner's card-to-card slot (issue 18; seed 004 FIG. 4): the TV's "Send to another
//! card" and "Receive from another card", driving [`stb_flow::transfer::Transfer`] — card
//! commands inline, gateway messages as tasks whose answers come back as
//! [`Event::Transfer`] — and the box's journal of each transfer:
//!
//! - `transfer_started` before the first card command of the transfer;
//! - `transfer_committing` before the APDU that commits the card (P1 to the payee's card,
//!   P2 P3 to the payer's);
//! - `transfer_committed` with R2 once the card's STATUS named it, before the next post;
//! - `transfer_over` once the flow settled it, or ended with nothing pending on the card.
//!
//! A transfer left committing or committed (the box died, the card was pulled, the other
//! box never answered) is resumed from the journal and the card's STATUS
//! ([`stb_flow::transfer::Transfer::resume`]) once the card is in the reader again and no
//! other flow runs: after each recovery round.

use proto::messages::Message;
use proto::money::Money;
use stb_flow::transfer::{JournalState, Journaled, Next, Outcome, Transfer};
use ui::UiUpdate;
use ui::model::{ErrorKind, ProgressStep, TxId, TxKind};

use super::super::card::today;
use super::super::event::Event;
use super::super::gateway::GatewayError;
use super::super::show::{ui_date, ui_money};
use super::{Runner, error};

/// Transfer answers come back with flow ids from this range.
const TRANSFER_IDS: u64 = 1 << 60;

/// The transfer in flight.
pub struct ActiveTransfer {
    flow: Transfer,
    id: u64,
    card_id: u64,
    /// The journal's state for it (`None` until `transfer_started` is written).
    journaled: Option<JournalState>,
    /// Waiting for the viewer's OK on the terms.
    confirming: bool,
    /// The viewer cancelled: the flow's "nothing moved" is not shown as an error.
    cancelled: bool,
    /// Resumed from the journal: the viewer did not start it and sees only its end.
    resumed: bool,
    span: tracing::Span,
}

/// The runner's transfer state.
#[derive(Default)]
pub struct TransferSlot {
    active: Option<ActiveTransfer>,
    flows: u64,
    /// Transfers resumed since the last trigger (start, reconnection, card insertion): a
    /// resumed flow that ends with its card still waiting is not resumed again until the
    /// next one.
    tried: Vec<String>,
}

impl TransferSlot {
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// A recovery trigger: every open transfer may be resumed again.
    pub fn retry_all(&mut self) {
        self.tried.clear();
    }

    /// Whether an answer with this flow id is the active transfer's.
    pub fn owns(&self, flow: u64) -> bool {
        self.active.as_ref().is_some_and(|a| a.id == flow)
    }
}

impl Runner {
    /// "Receive from another card": the most the card can take (its maximum balance less
    /// its balance) opens the amount entry.
    pub(super) async fn start_receive(&mut self) {
        if !self.transfer_may_start().await {
            return;
        }
        let read = self.parts.card.read_purse().await;
        self.parts.card.release().await;
        match read {
            Ok(info) => {
                let room = info.max_balance.saturating_sub(info.balance);
                self.update(UiUpdate::ReceiveMax(ui_money(Money::new(
                    room,
                    info.currency,
                ))))
                .await;
            }
            Err(e) => {
                self.update(error(
                    ErrorKind::Other,
                    &format!("cannot read the card: {e}"),
                ))
                .await
            }
        }
    }

    /// The amount to receive: RECEIVE on the card, the invite, the code for the TV.
    pub(super) async fn receive_amount(&mut self, minor: i64) {
        if !self.transfer_may_start().await {
            return;
        }
        let Some(box_id) = self.box_id.clone() else {
            self.update(error(
                ErrorKind::Other,
                "this box's certificate names no box id; transfers need one",
            ))
            .await;
            return;
        };
        let info = self.parts.card.read_purse().await;
        self.parts.card.release().await;
        let info = match info {
            Ok(i) => i,
            Err(e) => {
                return self
                    .update(error(
                        ErrorKind::Other,
                        &format!("cannot read the card: {e}"),
                    ))
                    .await;
            }
        };
        let Ok(minor) = u64::try_from(minor) else {
            return;
        };
        let amount = Money::new(minor, info.currency);
        let transfer_id = format!("{box_id}/{:016x}", rand::random::<u64>());
        let flow = Transfer::receive(transfer_id, amount, today());
        self.begin_transfer(flow, info.card_id, None).await;
    }

    /// The code the viewer typed: the terms from the gateway, for the viewer to confirm.
    pub(super) async fn join_transfer(&mut self, code: String) {
        if !self.transfer_may_start().await {
            return;
        }
        let Some(card_id) = self.card_id else {
            return self
                .update(error(ErrorKind::NoCard, ui::strings::LOAD_INSERT_CARD))
                .await;
        };
        let flow = Transfer::send(code, None, today());
        self.begin_transfer(flow, card_id, None).await;
    }

    /// OK on the terms: the card sends (journaled first).
    pub(super) async fn confirm_transfer(&mut self) {
        let Some(a) = self.transfer.active.as_mut().filter(|a| a.confirming) else {
            return;
        };
        a.confirming = false;
        let next = match self.journal_started() {
            Ok(()) => self.transfer.active.as_mut().expect("active").flow.go_on(),
            Err(why) => self.stop_transfer(why),
        };
        self.drive_transfer(next).await;
    }

    /// Whether the TV's PIN entry is the transfer's (the sender's card asked for its PIN).
    pub(super) fn transfer_awaits_pin(&self) -> bool {
        self.transfer
            .active
            .as_ref()
            .is_some_and(|a| a.flow.awaiting_pin())
    }

    /// The card's PIN for the sender's card.
    pub(super) async fn transfer_pin(&mut self, pin: proto::secret::Secret<String>) {
        let Some(a) = self.transfer.active.as_mut() else {
            return;
        };
        let next = a.flow.pin(pin);
        self.drive_transfer(next).await;
    }

    /// BACK or MENU while a transfer waits: the flow cancels (what it can still cancel).
    pub(super) async fn cancel_transfer(&mut self) {
        let Some(a) = self.transfer.active.as_mut() else {
            return;
        };
        a.cancelled = true;
        a.confirming = false;
        let next = a.flow.cancel();
        self.drive_transfer(next).await;
    }

    /// The gateway's answer for the active transfer.
    pub(super) async fn transfer_answer(&mut self, result: Result<Message, GatewayError>) {
        let Some(a) = self.transfer.active.as_mut() else {
            return;
        };
        let next = match result {
            Ok(m) => a.flow.answer(m),
            Err(e) => {
                a.span.in_scope(
                    || tracing::debug!(error = %e, "transfer message not answered; again"),
                );
                a.flow.failed()
            }
        };
        self.drive_transfer(next).await;
    }

    /// After a recovery round, with no flow running: a transfer of the card in the reader
    /// that the journal holds as committing or committed is resumed; one only started
    /// (its card never committed) is closed.
    pub(super) async fn resume_transfers(&mut self) {
        if self.busy() || !self.parts.card.has_card() {
            return;
        }
        let Some(card_id) = self.card_id else {
            return;
        };
        let started = self
            .parts
            .journal
            .transfers(card_id, &[JournalState::Started]);
        for t in started.unwrap_or_default() {
            let _ = self.parts.journal.transfer_step(
                &t.transfer_id,
                JournalState::Over,
                None,
                Some("the card never committed; nothing moved"),
            );
        }
        let open = match self
            .parts
            .journal
            .transfers(card_id, &JournalState::IN_DOUBT)
        {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(error = %e, "journal: cannot list open transfers");
                return;
            }
        };
        let Some(t) = open
            .into_iter()
            .find(|t| !self.transfer.tried.contains(&t.transfer_id))
        else {
            return;
        };
        self.transfer.tried.push(t.transfer_id.clone());
        let Journaled {
            transfer_id,
            sending,
            amount,
            to_card,
            random,
            state,
            ..
        } = t;
        tracing::info!(%transfer_id, sending, state = state.as_str(), "resuming a transfer the box did not see through");
        let flow = Transfer::resume(transfer_id, sending, random, amount, to_card, today());
        self.begin_transfer(flow, card_id, Some(state)).await;
    }

    /// Whether a new transfer may start now (nothing else runs, a card is in); says why
    /// not on the TV.
    async fn transfer_may_start(&mut self) -> bool {
        if self.busy_for_viewer() {
            self.update(UiUpdate::Error(super::show::refused(
                &stb_flow::show::Refusal::Busy,
            )))
            .await;
            return false;
        }
        if !self.parts.card.has_card() {
            self.update(error(ErrorKind::NoCard, ui::strings::LOAD_INSERT_CARD))
                .await;
            return false;
        }
        true
    }

    /// Starts `flow` for the card `card_id`; `resumed` is the journal's state of a transfer
    /// resumed from it (its row exists), `None` for a new one.
    async fn begin_transfer(
        &mut self,
        mut flow: Transfer,
        card_id: u64,
        resumed: Option<JournalState>,
    ) {
        self.transfer.flows += 1;
        let id = TRANSFER_IDS + self.transfer.flows;
        let span = tracing::info_span!("transfer", flow = id, sending = flow.sending(), card_id = %format_args!("{card_id:X}"));
        let next = flow.start();
        self.transfer.active = Some(ActiveTransfer {
            flow,
            id,
            card_id,
            journaled: resumed,
            confirming: false,
            cancelled: false,
            resumed: resumed.is_some(),
            span,
        });
        // The payee's first card command is RECEIVE: journaled before it.
        let next = if resumed.is_none() && !self.active_transfer().flow.sending() {
            match self.journal_started() {
                Ok(()) => next,
                Err(why) => self.stop_transfer(why),
            }
        } else {
            next
        };
        self.drive_transfer(next).await;
    }

    fn active_transfer(&mut self) -> &mut ActiveTransfer {
        self.transfer.active.as_mut().expect("a transfer is active")
    }

    fn stop_transfer(&mut self, why: String) -> Next {
        self.active_transfer().flow.stop(why)
    }

    /// Writes `transfer_started` for the active transfer.
    fn journal_started(&mut self) -> Result<(), String> {
        let a = self.transfer.active.as_ref().expect("a transfer is active");
        let rec = Journaled {
            transfer_id: a.flow.transfer_id().to_string(),
            sending: a.flow.sending(),
            card_id: a.card_id,
            amount: a
                .flow
                .amount()
                .unwrap_or(Money::new(0, proto::money::Currency::EUR)),
            to_card: a.flow.to_card(),
            random: None,
            state: JournalState::Started,
        };
        self.parts
            .journal
            .transfer_started(&rec)
            .map_err(|e| format!("the box could not record the transfer: {e}"))?;
        self.active_transfer().journaled = Some(JournalState::Started);
        Ok(())
    }

    /// Writes the active transfer's next state (if it has a journal row).
    fn journal_transfer(
        &mut self,
        state: JournalState,
        random: Option<[u8; 8]>,
        why: Option<&str>,
    ) -> Result<(), String> {
        let a = self.transfer.active.as_ref().expect("a transfer is active");
        if a.journaled.is_none() {
            return Ok(());
        }
        let id = a.flow.transfer_id().to_string();
        self.parts
            .journal
            .transfer_step(&id, state, random, why)
            .map_err(|e| format!("the box could not record the transfer: {e}"))?;
        self.active_transfer().journaled = Some(state);
        Ok(())
    }

    /// Runs the flow's steps until it waits (for the gateway or the viewer) or ends.
    async fn drive_transfer(&mut self, mut next: Next) {
        loop {
            next = match next {
                Next::Apdu(apdu) => {
                    let a = self.active_transfer();
                    if a.flow.committing() {
                        let step = if a.flow.sending() {
                            ProgressStep::DebitingCard
                        } else {
                            ProgressStep::LoadingCard
                        };
                        if let Err(why) =
                            self.journal_transfer(JournalState::Committing, None, None)
                        {
                            next = self.stop_transfer(why);
                            continue;
                        }
                        super::super::exec::test_hook(
                            super::super::exec::TEST_HOOK_PAUSE_BEFORE_TRANSFER_COMMIT,
                            JournalState::Committing.as_str(),
                        );
                        if !self.active_transfer().resumed {
                            self.update(UiUpdate::Progress(step)).await;
                        }
                    }
                    let reply = self.parts.card.transmit(&apdu).await;
                    let a = self.active_transfer();
                    let next = match reply {
                        Ok(r) => a.flow.card(&r.response),
                        Err(e) => a.flow.stop(format!("the card did not answer: {e:?}")),
                    };
                    // The card committed and named R2: journaled before the next post.
                    let a = self.active_transfer();
                    if let (Some(r2), Some(JournalState::Committing)) =
                        (a.flow.random(), a.journaled)
                    {
                        match self.journal_transfer(JournalState::Committed, Some(r2), None) {
                            Ok(()) => super::super::exec::test_hook(
                                super::super::exec::TEST_HOOK_PAUSE_AFTER_TRANSFER_COMMIT,
                                JournalState::Committed.as_str(),
                            ),
                            // The card has committed: the row stays `committing`, which a
                            // resumed flow settles without R2.
                            Err(e) => tracing::error!(error = %e, "journal: cannot record R2"),
                        }
                    }
                    next
                }
                Next::Send(m, wait) => {
                    // Gateway messages are tasks. The card's transaction ends meanwhile
                    // (other programs may use it) but it stays powered and selected: the
                    // payer card's SEND session lives until its P2 P3, and a reset or a
                    // SELECT would end it (the card then refuses P2 P3; nothing moves).
                    self.parts.card.end_sequence().await;
                    // A new id per message: the answer to one the flow has moved past
                    // (the viewer cancelled while it was out) is dropped.
                    self.transfer.flows += 1;
                    let flow = TRANSFER_IDS + self.transfer.flows;
                    let a = self.active_transfer();
                    a.id = flow;
                    let span = a.span.clone();
                    self.parts
                        .call_after(wait, m, span, move |result| Event::Transfer {
                            flow,
                            result,
                        });
                    return;
                }
                Next::ShowCode(code) => {
                    let a = self.active_transfer();
                    let amount = a.flow.amount().map(ui_money);
                    a.span.in_scope(|| {
                        tracing::info!(
                            transfer_id = a.flow.transfer_id(),
                            "code shown for the sender"
                        )
                    });
                    if let Some(amount) = amount {
                        self.update(UiUpdate::TransferCode { code, amount }).await;
                    }
                    self.active_transfer().flow.go_on()
                }
                Next::Confirm(t) => {
                    self.active_transfer().confirming = true;
                    self.parts.card.end_sequence().await;
                    self.update(UiUpdate::TransferTerms(ui::model::TransferTerms {
                        amount: ui_money(t.invite.amount),
                        to_card: t.invite.payee_card.to_string(),
                    }))
                    .await;
                    return;
                }
                Next::NeedsPin { min, max } => {
                    // The card stays selected while the viewer types: VERIFY then SEND.
                    self.parts.card.end_sequence().await;
                    self.update(UiUpdate::PinRequest(ui::model::PinRequest {
                        min_len: min,
                        max_len: max,
                        attempts_left: None,
                    }))
                    .await;
                    return;
                }
                Next::Done(outcome) => return self.transfer_done(Ok(outcome)).await,
                Next::Refused(why) => return self.transfer_done(Err(why)).await,
            };
        }
    }

    /// The flow ended: the journal closed unless the card may still wait for it, the card
    /// read again, the receipt or the reason shown.
    async fn transfer_done(&mut self, end: Result<Outcome, String>) {
        let pending = self.active_transfer().flow.pending();
        let disputed = self.active_transfer().flow.disputed();
        let why = match &end {
            Ok(o) => format!("{o:?}"),
            Err(w) => w.clone(),
        };
        let close = if disputed {
            Some(JournalState::Disputed)
        } else if !pending {
            Some(JournalState::Over)
        } else {
            None
        };
        if let Some(state) = close {
            if let Err(e) = self.journal_transfer(state, None, Some(&why)) {
                tracing::error!(error = %e, "journal: cannot close the transfer");
            }
        }
        let a = self.transfer.active.take().expect("a transfer is active");
        a.span.in_scope(|| match &end {
            Ok(o) => tracing::info!(outcome = ?o, transfer_id = a.flow.transfer_id(), "transfer done"),
            Err(w) => tracing::info!(reason = %w, pending, transfer_id = a.flow.transfer_id(), "transfer ended"),
        });
        self.parts.card.release().await;
        if self.parts.card.has_card() {
            self.refresh_card().await;
        }
        let balance = self.app.card().map(|c| c.balance);
        match end {
            Ok(o) => {
                let (kind, amount, item) = match o {
                    Outcome::Received { amount } => (
                        TxKind::TransferIn,
                        amount,
                        ui::strings::RECEIVE_TITLE.to_string(),
                    ),
                    // The payee cancelled (its card refused P4, or the sender's box never
                    // answered): nothing came in.
                    Outcome::Declined { .. } => {
                        if a.cancelled {
                            self.update(UiUpdate::TransferCancelled).await;
                        } else {
                            self.update(error(ErrorKind::Other, ui::strings::TRANSFER_CANCELLED))
                                .await;
                        }
                        return Box::pin(self.recovery_after_flow()).await;
                    }
                    Outcome::Sent { amount, to_card } => (
                        TxKind::TransferOut,
                        amount,
                        ui::strings::transfer_party(true, &to_card.to_string()),
                    ),
                    Outcome::Returned { amount, to_card } => (
                        TxKind::TransferBack,
                        amount,
                        ui::strings::transfer_party(true, &to_card.to_string()),
                    ),
                };
                let amount = ui_money(amount);
                self.update(UiUpdate::Receipt(ui::model::Receipt {
                    txid: TxId(a.flow.transfer_id().to_string()),
                    kind,
                    item,
                    merchant: String::new(),
                    amount,
                    balance_after: balance.unwrap_or(amount),
                    date: ui_date(today()),
                }))
                .await;
            }
            Err(_) if a.cancelled && !pending => self.update(UiUpdate::TransferCancelled).await,
            Err(why) => {
                let kind = if pending {
                    ErrorKind::Pending
                } else {
                    ErrorKind::Other
                };
                if !a.resumed || pending {
                    self.update(error(kind, &why)).await;
                }
            }
        }
        Box::pin(self.recovery_after_flow()).await;
    }

    /// The card in use went: a transfer waiting on the gateway stops now (its journal
    /// stays if the card committed, and the transfer resumes when the card is back).
    pub(super) async fn transfer_card_gone(&mut self) {
        if let Some(a) = self.transfer.active.as_mut() {
            let next = a.flow.stop("the card was removed");
            self.drive_transfer(next).await;
        }
    }
}
