//! The daemon's one event loop's state and what it does with each event: UI keys and ticks,
//! reader events, gateway answers, local app requests. It holds the flow slots (a purchase,
//! a load, a check of the card's refunds), runs their actions through the one executor ([`super::exec`]), shows
//! what they ask for ([`super::show`]), and keeps the guard that only one transaction runs at
//! a time and none starts on a card with older work in doubt. Recovery ([`super::recover`])
//! runs through the same parts and reports back here.
//!
//! Card commands run inline (they take milliseconds and the card is the flow's only
//! resource); gateway requests — the flows' and recovery's — run as tasks whose answers come
//! back as events, so the UI keeps answering the remote meanwhile.
//!
//! The modules below this one (event, parts, exec, recover, load, show, card, gateway) never
//! name the runner: the daemon's modules import one way only.

use std::collections::HashMap;
use std::time::Duration;

use proto::messages::{LoadSource, Message};
use proto::secret::Secret;
use reader_drivers::ReaderEvent;
use stb_flow::JournalFailure;
use stb_flow::load::{self, Load};
use stb_flow::purchase::{Input, Outcome, Purchase};
use stb_flow::refund::{self, Refund};
use stb_flow::show::{Flow, Refusal, Show};
use tokio::sync::{oneshot, watch};
use ui::model::{CardStatus, CardSummary, Catalog, CatalogId, CatalogItem, ReaderState};
use ui::{App, Intent, UiEvent, UiUpdate};

use super::card::{Removal, today};
use super::event::{Event, Status};
use super::exec::{Driven, Ran, Slot};
use super::gateway::GatewayError;
use super::load::LoadSettings;
use super::parts::Parts;
use super::recover::{RecoverySlot, RoundEnd};
use super::show::{self, ui_date, ui_money};

mod transfer;

/// Load answers come back as `Event::Answer` with a flow id from this range, apart from
/// the purchase flows' ids.
const LOAD_IDS: u64 = 1 << 62;
/// Refund answers: a third range.
const REFUND_IDS: u64 = 1 << 61;

/// Attempts at reading a freshly inserted card, and the pause between them.
const CARD_READ_RETRIES: usize = 3;
const CARD_READ_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// A new purchase or load that waits for a recovery round (an older transaction of the same
/// card was in doubt).
pub enum Deferred {
    Purchase {
        merchant_id: String,
        item_id: String,
        reply: Option<oneshot::Sender<Outcome>>,
    },
    Load {
        source: ui::model::LoadSource,
    },
}

pub struct Runner {
    pub app: App,
    /// Journal, card, gateway, and the loop's event channel.
    pub parts: Parts,
    pub provider: String,
    pub offer_timeout: Duration,
    pub status: watch::Sender<Status>,
    /// Viewers can confirm (a UI or a key source exists); without one, local requests are refused.
    pub has_viewer: bool,
    /// What the config says about loads.
    pub load_settings: LoadSettings,
    /// Recovery of in-doubt work: the timer and the round out.
    pub recovery: RecoverySlot,
    purchase: Slot<Purchase>,
    /// The local app that asked for the active purchase, if one did.
    purchase_reply: Option<oneshot::Sender<Outcome>>,
    load: Slot<Load>,
    /// The check of the refunds due to the card in the reader (issue 17).
    refund: Slot<Refund>,
    /// The card whose refunds were checked since it was inserted (or the head end was
    /// reconnected): checked once per insertion, after its recovery round.
    refunds_checked: Option<u64>,
    /// A purchase or load that waits for a recovery round.
    deferred: Option<Deferred>,
    catalog: HashMap<String, (String, String)>,
    offer_deadline: Option<tokio::time::Instant>,
    flows_done: u64,
    last_outcome: Option<Outcome>,
    /// The id of the card in the reader, as last read.
    pub(crate) card_id: Option<u64>,
    /// The privacy switch waits for the card's PIN: turn privacy on (`true`) or off.
    privacy_pending: Option<bool>,
    /// Card to card ([`transfer`]).
    transfer: transfer::TransferSlot,
    /// This box's id, from its device certificate (a transfer's id begins with it).
    pub box_id: Option<String>,
}

impl Runner {
    pub fn new(
        app: App,
        parts: Parts,
        provider: String,
        offer_timeout: Duration,
        status: watch::Sender<Status>,
        has_viewer: bool,
    ) -> Self {
        Self {
            app,
            parts,
            provider,
            offer_timeout,
            status,
            has_viewer,
            load_settings: LoadSettings::default(),
            recovery: RecoverySlot::default(),
            purchase: Slot::new(0),
            purchase_reply: None,
            load: Slot::new(LOAD_IDS),
            refund: Slot::new(REFUND_IDS),
            refunds_checked: None,
            deferred: None,
            catalog: HashMap::new(),
            offer_deadline: None,
            flows_done: 0,
            last_outcome: None,
            card_id: None,
            privacy_pending: None,
            transfer: transfer::TransferSlot::default(),
            box_id: None,
        }
    }

    /// When the offer countdown (the daemon's own, besides the UI's) runs out.
    pub fn offer_deadline(&self) -> Option<tokio::time::Instant> {
        self.offer_deadline
    }

    /// When an offer prefetch is due ([`super::prefetch`]), if one waits.
    pub fn prefetch_deadline(&self) -> Option<tokio::time::Instant> {
        self.parts.prefetch.deadline()
    }

    /// Sends the offer prefetch that is due; none while a transaction runs.
    pub fn prefetch_due(&mut self) {
        if self.busy() {
            self.parts.prefetch.stop_wanting();
            return;
        }
        let Some(request) = self.parts.prefetch.due(tokio::time::Instant::now()) else {
            return;
        };
        let span = tracing::info_span!("offer_prefetch");
        span.in_scope(|| tracing::debug!(message = request.kind(), "offer prefetch"));
        let sent = request.clone();
        self.parts
            .call(sent, span, move |result| Event::Prefetched {
                request: Box::new(request),
                result,
            });
    }

    /// When the recovery timer fires next, if it is armed.
    pub fn recovery_deadline(&self) -> Option<tokio::time::Instant> {
        self.recovery.due()
    }

    pub fn publish(&self) {
        let s = Status {
            screen: self.app.screen(),
            offer: self.app.open_offer().map(|(t, _)| t.0.clone()),
            card_balance: self.app.card().map(|c| c.balance.minor),
            last_outcome: self.last_outcome.clone(),
            flows_done: self.flows_done,
            recovered: self.recovery.resolved(),
            unresolvable: self.recovery.unresolvable(),
            recovery_calls: self.recovery.outstanding(),
        };
        self.status.send_replace(s);
    }

    /// Feeds the UI; acts on its intents.
    pub async fn ui(&mut self, ev: UiEvent) -> bool {
        let intents = self.app.handle(ev);
        for i in intents {
            if !self.intent(i).await {
                return false;
            }
        }
        true
    }

    pub(crate) async fn update(&mut self, u: UiUpdate) {
        // Updates produce no intents but keep the code path single.
        let _ = Box::pin(self.ui(UiEvent::Update(u))).await;
    }

    /// Returns false to stop the daemon.
    async fn intent(&mut self, i: Intent) -> bool {
        tracing::debug!(intent = ?i, "viewer intent");
        match i {
            Intent::Quit => return false,
            Intent::ShowCatalog => {
                self.parts.call(
                    Message::CatalogRequest,
                    tracing::Span::current(),
                    Event::Catalog,
                );
            }
            Intent::HighlightCatalogItem(CatalogId(id)) => {
                if let (Some((m, item)), false) = (self.catalog.get(&id), self.busy()) {
                    let ask = Message::OfferRequest {
                        merchant_id: m.clone(),
                        item_id: item.clone(),
                    };
                    self.parts
                        .prefetch
                        .highlighted(ask, tokio::time::Instant::now());
                }
            }
            Intent::SelectCatalogItem(CatalogId(id)) => {
                if let Some((m, item)) = self.catalog.get(&id).cloned() {
                    self.start(&m, &item, None).await;
                }
            }
            Intent::AcceptOffer(_) => self.flow_input(Input::Accept).await,
            Intent::CancelOffer { reason, .. } => {
                let timeout = reason == ui::CancelReason::Timeout;
                self.flow_input(Input::Decline { timeout }).await
            }
            Intent::ShowHistory => self.show_history().await,
            Intent::StartLoad { source } => self.start_load(source).await,
            Intent::SubmitLoadAmount(minor) => self.load_input(load::Input::Amount(minor)).await,
            Intent::SetPrivacy { on } => self.set_privacy(on, None).await,
            Intent::SubmitPin(pin) => {
                let pin = Secret::new(pin.expose().to_string());
                if let Some(on) = self.privacy_pending.take() {
                    self.set_privacy(on, Some(pin)).await
                } else if self.transfer_awaits_pin() {
                    self.transfer_pin(pin).await
                } else if self.purchase_awaits_pin() {
                    self.flow_input(Input::Pin(pin)).await
                } else {
                    self.load_input(load::Input::Pin(pin)).await
                }
            }
            Intent::CancelPin if self.privacy_pending.is_some() => self.privacy_pending = None,
            Intent::CancelPin if self.transfer_awaits_pin() => self.cancel_transfer().await,
            Intent::CancelPin if self.purchase_awaits_pin() => {
                self.flow_input(Input::Decline { timeout: false }).await
            }
            Intent::CancelLoad | Intent::CancelPin => self.load_input(load::Input::Cancel).await,
            Intent::StartReceive => self.start_receive().await,
            Intent::ReceiveAmount(minor) => self.receive_amount(minor).await,
            Intent::JoinTransfer(code) => self.join_transfer(code).await,
            Intent::ConfirmTransfer => self.confirm_transfer().await,
            Intent::CancelTransfer => self.cancel_transfer().await,
        }
        true
    }

    pub async fn event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Ui(u) => return self.ui(u).await,
            Event::Reader(r) => self.reader(r).await,
            Event::Answer { flow, result } => {
                if self.purchase.owns(flow) {
                    self.flow_input(Purchase::answer_input(result)).await;
                } else if self.load.owns(flow) {
                    self.load_input(Load::answer_input(result)).await;
                } else if self.refund.owns(flow) {
                    self.refund_input(Refund::answer_input(result)).await;
                }
            }
            Event::Catalog(r) => self.catalog_loaded(r).await,
            Event::Prefetched { request, result } => {
                let now = tokio::time::Instant::now();
                if let Some((flow, result)) = self.parts.prefetch.arrived(&request, result, now) {
                    if self.purchase.owns(flow) {
                        self.flow_input(Purchase::answer_input(result)).await;
                    }
                }
            }
            Event::Pay {
                merchant_id,
                item_id,
                reply,
            } => {
                if !self.has_viewer {
                    let _ = reply.send(Outcome::Failed {
                        transaction_id: None,
                        refusal: Refusal::NoViewer,
                    });
                } else if self.busy_for_viewer() {
                    let _ = reply.send(Outcome::Failed {
                        transaction_id: None,
                        refusal: Refusal::Busy,
                    });
                } else {
                    self.start(&merchant_id, &item_id, Some(reply)).await;
                }
            }
            Event::Connected => {
                // The head end is back: the card's refunds are asked for again.
                self.refunds_checked = None;
                self.recover().await
            }
            Event::Recovery {
                transaction_id,
                result,
            } => self.recovery_answer(transaction_id, result).await,
            Event::Transfer { flow, result } => {
                if self.transfer.owns(flow) {
                    self.transfer_answer(result).await
                }
            }
        }
        true
    }

    pub async fn offer_timed_out(&mut self) {
        self.offer_deadline = None;
        self.flow_input(Input::Decline { timeout: true }).await;
    }

    async fn reader(&mut self, r: ReaderEvent) {
        match r {
            // Another matching reader coming while a card is in use changes nothing on screen.
            ReaderEvent::ReaderAttached { reader }
                if self.parts.card.matches(&reader) && !self.parts.card.has_card() =>
            {
                self.update(UiUpdate::Reader(ReaderState::Ready { name: reader }))
                    .await
            }
            ReaderEvent::ReaderDetached { reader } if self.parts.card.matches(&reader) => {
                if self.parts.card.card_removed(&reader) == Removal::NotInUse {
                    if !self.parts.card.has_card() {
                        self.update(UiUpdate::Reader(ReaderState::Missing)).await;
                    }
                    return;
                }
                tracing::info!(%reader, "the reader in use went away");
                self.card_in_use_gone().await;
                if !self.parts.card.has_card() {
                    self.update(UiUpdate::Reader(ReaderState::Missing)).await;
                }
            }
            ReaderEvent::CardInserted { reader, .. } if self.parts.card.matches(&reader) => {
                if !self.parts.card.card_inserted(&reader) {
                    tracing::info!(%reader, in_use = ?self.parts.card.reader(), "card inserted in another reader; kept in case the card in use goes");
                    return;
                }
                tracing::info!(%reader, "card inserted");
                self.card_id = None;
                self.refunds_checked = None;
                self.refresh_card().await;
                self.recover().await;
            }
            ReaderEvent::CardRemoved { reader } if self.parts.card.matches(&reader) => {
                if self.parts.card.card_removed(&reader) == Removal::NotInUse {
                    tracing::info!(%reader, in_use = ?self.parts.card.reader(), "card removed from a reader not in use; nothing changes");
                    return;
                }
                tracing::info!(%reader, "card removed");
                self.card_in_use_gone().await;
            }
            ReaderEvent::ServiceLost { reason } => {
                tracing::warn!(%reason, "reader service lost");
                self.update(UiUpdate::Reader(ReaderState::Missing)).await;
            }
            _ => {}
        }
    }

    /// The card in use went (card pulled, reader gone): the flows hear of it, and if another
    /// matching reader holds a card, the box carries on with that one.
    async fn card_in_use_gone(&mut self) {
        self.card_id = None;
        self.update(UiUpdate::CardRemoved).await;
        self.flow_input(Input::CardRemoved).await;
        self.load_input(load::Input::CardRemoved).await;
        self.refund_input(refund::Input::CardRemoved).await;
        self.transfer_card_gone().await;
        self.refunds_checked = None;
        if let Some(r) = self.parts.card.reader().map(str::to_string) {
            tracing::info!(reader = %r, "using the card in another reader");
            // A flow that ended on the removal has read it already (finish → refresh).
            if self.card_id.is_none() {
                self.refresh_card().await;
                self.recover().await;
            }
        }
    }

    /// A purchase, load, refund or transfer flow is in flight (it may hold the card).
    fn flow_active(&self) -> bool {
        self.purchase.is_active()
            || self.load.is_active()
            || self.refund.is_active()
            || self.transfer.is_active()
    }

    /// Whether the purchase in flight waits for the card's PIN (the TV's PIN entry is
    /// then the purchase's, not a load's).
    fn purchase_awaits_pin(&self) -> bool {
        self.purchase
            .active()
            .is_some_and(|a| a.flow.awaiting_pin())
    }

    /// A purchase or load is in flight, or one waits for a recovery round.
    fn busy(&self) -> bool {
        self.flow_active() || self.deferred.is_some()
    }

    /// [`Self::busy`] for what the viewer starts: a refund check that is only waiting for
    /// the head end (it does not hold the card) yields first — it is dropped, its answer
    /// ignored, and it runs again after the next recovery round.
    fn busy_for_viewer(&mut self) -> bool {
        if self.refund.active().is_some_and(|a| !a.flow.holds_card()) {
            tracing::info!("refund check yields to the viewer; it runs again later");
            self.refund.abandon();
            self.refunds_checked = None;
        }
        self.busy()
    }

    pub(crate) async fn refresh_card(&mut self) {
        if self.flow_active() {
            return;
        }
        // Just after an insertion pcscd may still report the card as mute while it powers it
        // up; a few spaced attempts ride that out instead of leaving "insert your card".
        let mut read = self.parts.card.read_purse().await;
        for _ in 0..CARD_READ_RETRIES {
            if read.is_ok() || !self.parts.card.has_card() {
                break;
            }
            self.parts.card.release().await;
            tokio::time::sleep(CARD_READ_RETRY_DELAY).await;
            read = self.parts.card.read_purse().await;
        }
        match read {
            Ok(info) => {
                self.card_id = Some(info.card_id);
                let expired = info.expiry.is_expired_on(today());
                let status = if info.is_blocked() {
                    CardStatus::Blocked
                } else if expired {
                    CardStatus::Expired
                } else {
                    CardStatus::Active
                };
                let summary = CardSummary {
                    provider: self.provider.clone(),
                    balance: ui_money(info.balance_money()),
                    expiry: ui::model::Date::new(info.expiry.year, info.expiry.month, 1),
                    status,
                    points: info.points,
                    bad_keys: (info.bad_key_count, info.bad_key_limit),
                    privacy: info.privacy,
                };
                self.update(UiUpdate::CardInserted(summary)).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the card"),
        }
        self.parts.card.release().await;
    }

    /// The privacy switch (seed 004): SELECT, VERIFY with `pin` when given, SET PRIVACY
    /// ([`stb_flow::privacy`]). The card's PIN, when it asks for one, is asked on the TV and
    /// the switch runs again with it. Not while a transaction runs.
    async fn set_privacy(&mut self, on: bool, pin: Option<Secret<String>>) {
        if self.busy_for_viewer() {
            self.update(UiUpdate::Error(show::refused(&Refusal::Busy)))
                .await;
            return;
        }
        let mut f = stb_flow::privacy::SetPrivacy::new(on, pin);
        let mut next = f.start();
        while let stb_flow::privacy::Next::Apdu(apdu) = next {
            next = match self.parts.card.transmit(&apdu).await {
                Ok(r) => match stb_flow::split_sw(&r.response) {
                    Some((_, sw)) => f.card(sw),
                    None => stb_flow::privacy::Next::Refused(Refusal::NoStatusWord),
                },
                Err(error) => stb_flow::privacy::Next::Refused(Refusal::CardUnreadable { error }),
            };
        }
        self.parts.card.release().await;
        match next {
            stb_flow::privacy::Next::Done { on } => {
                tracing::info!(on, "privacy switched on the card");
                self.update(UiUpdate::PrivacyChanged(on)).await;
            }
            stb_flow::privacy::Next::NeedsPin { min, max } => {
                self.privacy_pending = Some(on);
                self.update(UiUpdate::PinRequest(ui::model::PinRequest {
                    min_len: min,
                    max_len: max,
                    attempts_left: None,
                }))
                .await;
            }
            stb_flow::privacy::Next::Refused(r) => {
                tracing::info!(reason = %show::refusal_reason(&r), "privacy switch not taken");
                self.update(UiUpdate::Error(show::refused(&r))).await;
            }
            stb_flow::privacy::Next::Apdu(_) => unreachable!("the loop runs every APDU"),
        }
    }

    async fn show_history(&mut self) {
        if self.flow_active() || !self.parts.card.has_card() {
            return;
        }
        let entries = async {
            let info = self.parts.card.read_purse().await?;
            let log = self.parts.card.read_log().await?;
            Ok::<_, String>(
                log.into_iter()
                    .map(|r| ui::model::HistoryEntry {
                        date: ui_date(r.date),
                        kind: match r.kind {
                            proto::purse::LogKind::Debit => ui::model::TxKind::Purchase,
                            proto::purse::LogKind::Load => ui::model::TxKind::Load,
                            proto::purse::LogKind::Credit => ui::model::TxKind::Refund,
                            proto::purse::LogKind::Unload => ui::model::TxKind::Unload,
                            proto::purse::LogKind::TransferOut => ui::model::TxKind::TransferOut,
                            proto::purse::LogKind::TransferIn => ui::model::TxKind::TransferIn,
                            proto::purse::LogKind::TransferBack => ui::model::TxKind::TransferBack,
                        },
                        amount: ui_money(proto::money::Money::new(r.amount, r.currency)),
                        // The purse the record moved: points, or money (an authentication's
                        // balance is the money's).
                        balance_after: ui_money(proto::money::Money::new(
                            r.balance_after,
                            if r.currency == proto::money::Currency::AUTHENTICATION {
                                info.currency
                            } else {
                                r.currency
                            },
                        )),
                    })
                    .collect::<Vec<_>>(),
            )
        }
        .await;
        self.parts.card.release().await;
        match entries {
            Ok(h) => self.update(UiUpdate::History(h)).await,
            Err(e) => tracing::warn!(error = %e, "cannot read the card's history"),
        }
    }

    async fn catalog_loaded(&mut self, r: Result<Message, GatewayError>) {
        match r {
            Ok(Message::Catalog(items)) => {
                let mut c = Catalog::default();
                self.catalog.clear();
                for it in items {
                    let id = format!("{}/{}", it.merchant_id, it.item_id);
                    self.catalog
                        .insert(id.clone(), (it.merchant_id.clone(), it.item_id.clone()));
                    let entry = CatalogItem {
                        id: CatalogId(id),
                        title: it.title,
                        price: ui_money(it.amount),
                        detail: it.detail,
                    };
                    if it.kind == "ppv" {
                        c.pay_per_view.push(entry);
                    } else {
                        c.shopping.push(entry);
                    }
                }
                self.update(UiUpdate::CatalogLoaded(c)).await;
            }
            Ok(other) => {
                tracing::warn!(answer = ?other, "unexpected answer to the catalog request")
            }
            Err(e) => {
                tracing::warn!(error = %e, "catalog unavailable");
                self.update(UiUpdate::Error(ui::model::UiError {
                    kind: ui::model::ErrorKind::HeadEndUnreachable,
                    detail: Some(e.to_string()),
                }))
                .await
            }
        }
    }

    // ---- the purchase slot

    /// A new purchase: after any in-doubt transaction of the same card is settled
    /// ([`Runner::gate`]).
    async fn start(
        &mut self,
        merchant_id: &str,
        item_id: &str,
        reply: Option<oneshot::Sender<Outcome>>,
    ) {
        if self.busy_for_viewer() {
            match reply {
                Some(r) => {
                    let _ = r.send(Outcome::Failed {
                        transaction_id: None,
                        refusal: Refusal::Busy,
                    });
                }
                // The viewer chose it on the TV, which now shows progress: it is told why
                // nothing happens (a transfer may run unseen, resumed from the journal).
                None => {
                    self.update(UiUpdate::Error(show::refused(&Refusal::Busy)))
                        .await
                }
            }
            return;
        }
        let d = Deferred::Purchase {
            merchant_id: merchant_id.into(),
            item_id: item_id.into(),
            reply,
        };
        if let Some(Deferred::Purchase {
            merchant_id,
            item_id,
            reply,
        }) = self.gate(d).await
        {
            self.start_now(&merchant_id, &item_id, reply).await;
        }
    }

    /// Starts the purchase flow.
    async fn start_now(
        &mut self,
        merchant_id: &str,
        item_id: &str,
        reply: Option<oneshot::Sender<Outcome>>,
    ) {
        if self.flow_active() {
            return;
        }
        let (flow, actions) = Purchase::start(merchant_id, item_id, today(), rand::random());
        self.purchase_reply = reply;
        let ran = self
            .purchase
            .start(&mut self.parts, flow, actions, |n| {
                let span = tracing::info_span!("purchase", flow = n, transaction_id = tracing::field::Empty, %merchant_id, %item_id);
                span.in_scope(|| tracing::info!("purchase started"));
                span
            })
            .await;
        self.purchase_ran(ran).await;
    }

    /// An input for the active purchase (none: nothing happens).
    async fn flow_input(&mut self, input: Input) {
        let holds_card = self.purchase.active().is_some_and(|a| a.flow.holds_card());
        if matches!(input, Input::CardRemoved) && !holds_card {
            return;
        }
        let ran = self.purchase.feed(&mut self.parts, input).await;
        self.purchase_ran(ran).await;
    }

    /// Shows what the purchase asked for; the daemon's own offer countdown runs while the
    /// viewer is asked.
    async fn purchase_ran(&mut self, ran: Ran<Outcome>) {
        for s in ran.shows {
            if matches!(s, Show::Offer(_)) {
                self.offer_deadline = Some(tokio::time::Instant::now() + self.offer_timeout);
            }
            self.update(show::update(s)).await;
        }
        match ran.done {
            Some(outcome) => self.purchase_finished(outcome).await,
            None => {
                let asking = self
                    .purchase
                    .active()
                    .is_some_and(|a| a.flow.awaiting_viewer());
                if !asking {
                    self.offer_deadline = None;
                }
            }
        }
    }

    async fn purchase_finished(&mut self, outcome: Outcome) {
        self.offer_deadline = None;
        if let Some(r) = self.purchase_reply.take() {
            let _ = r.send(outcome.clone());
        }
        self.flows_done += 1;
        self.last_outcome = Some(outcome);
        self.flow_finished().await;
    }

    /// After either flow: the card is free again, its balance read, and recovery runs what
    /// waited for the flow.
    async fn flow_finished(&mut self) {
        self.parts.card.release().await;
        if self.parts.card.has_card() {
            self.refresh_card().await;
        }
        Box::pin(self.recovery_after_flow()).await;
    }

    // ---- the load slot

    /// "Load card" → a source: starts a load, after settling any in-doubt purchase or load
    /// of the same card (the runner's guard).
    pub async fn start_load(&mut self, source: ui::model::LoadSource) {
        if self.busy_for_viewer() {
            self.update(UiUpdate::Error(show::refused(&Refusal::Busy)))
                .await;
            return;
        }
        if self.load_settings.source(source).is_none() {
            let what = match source {
                ui::model::LoadSource::Bank => ui::strings::LOAD_NO_BANK_ACCOUNT,
                ui::model::LoadSource::Voucher => ui::strings::LOAD_NO_VOUCHER,
                ui::model::LoadSource::Unload => ui::strings::LOAD_NO_BANK_ACCOUNT,
            };
            self.update(error(ui::model::ErrorKind::Other, what)).await;
            return;
        }
        if !self.parts.card.has_card() {
            self.update(error(
                ui::model::ErrorKind::NoCard,
                ui::strings::LOAD_INSERT_CARD,
            ))
            .await;
            return;
        }
        if let Some(Deferred::Load { source }) = self.gate(Deferred::Load { source }).await {
            self.start_load_now(source).await;
        }
    }

    /// Starts the load flow (the source and the card checked again: time may have passed).
    async fn start_load_now(&mut self, source: ui::model::LoadSource) {
        if self.flow_active() {
            return;
        }
        let Some(src) = self.load_settings.source(source) else {
            return;
        };
        if !self.parts.card.has_card() {
            self.update(error(
                ui::model::ErrorKind::NoCard,
                ui::strings::LOAD_INSERT_CARD,
            ))
            .await;
            return;
        }
        let kind = match src {
            LoadSource::Bank { .. } => "bank",
            LoadSource::Voucher { .. } => "voucher",
            LoadSource::Unload { .. } => "unload",
        };
        let (flow, actions) = Load::start(src, self.load_settings.pin_key.clone(), rand::random());
        let ran = self
            .load
            .start(&mut self.parts, flow, actions, |n| {
                let span = tracing::info_span!(
                    "load",
                    flow = n,
                    transaction_id = tracing::field::Empty,
                    source = kind
                );
                span.in_scope(|| tracing::info!("load started"));
                span
            })
            .await;
        self.load_ran(ran).await;
    }

    /// A viewer decision, a card event or a gateway answer for the active load.
    async fn load_input(&mut self, input: load::Input) {
        let holds_card = self.load.active().is_some_and(|a| a.flow.holds_card());
        if matches!(input, load::Input::CardRemoved) && !holds_card {
            return;
        }
        let ran = self.load.feed(&mut self.parts, input).await;
        self.load_ran(ran).await;
    }

    async fn load_ran(&mut self, ran: Ran<load::Outcome>) {
        for s in ran.shows {
            self.update(show::update(s)).await;
        }
        if ran.done.is_some() {
            self.flow_finished().await;
        }
    }

    // ---- the refund slot

    /// Once per card insertion (and reconnection), after its recovery round and while no
    /// other flow runs: the refunds due to the card are credited (see
    /// [`stb_flow::refund`]).
    async fn check_refunds(&mut self) {
        if self.busy() || !self.parts.card.has_card() {
            return;
        }
        let Some(card_id) = self.card_id else {
            return;
        };
        if self.refunds_checked == Some(card_id) {
            return;
        }
        self.refunds_checked = Some(card_id);
        let (flow, actions) = Refund::start(card_id, today());
        let ran = self
            .refund
            .start(&mut self.parts, flow, actions, |n| {
                tracing::info_span!(
                    "refund",
                    flow = n,
                    transaction_id = tracing::field::Empty,
                    card_id = %format_args!("{card_id:X}")
                )
            })
            .await;
        self.refund_ran(ran).await;
    }

    async fn refund_input(&mut self, input: refund::Input) {
        let holds_card = self.refund.active().is_some_and(|a| a.flow.holds_card());
        if matches!(input, refund::Input::CardRemoved) && !holds_card {
            return;
        }
        let ran = self.refund.feed(&mut self.parts, input).await;
        self.refund_ran(ran).await;
    }

    async fn refund_ran(&mut self, ran: Ran<refund::Outcome>) {
        for s in ran.shows {
            self.update(show::update(s)).await;
        }
        match ran.done {
            // Nothing was due (or the head end did not answer): the card was not touched,
            // so it is not read again — another program may be using it.
            Some(
                refund::Outcome::Done { ref credited }
                | refund::Outcome::Stopped {
                    ref credited,
                    transaction_id: None,
                    ..
                },
            ) if credited.is_empty() => Box::pin(self.recovery_after_flow()).await,
            Some(_) => self.flow_finished().await,
            None => {}
        }
    }

    // ---- the guard: one transaction at a time, none on a card with older work in doubt

    /// The in-doubt transaction (purchase or load, not `unresolvable`) of the card in the
    /// reader that a new one must wait for; `Err` when the journal cannot tell.
    async fn blocking_transaction(&mut self) -> Result<Option<String>, JournalFailure> {
        if !self.parts.card.has_card() {
            return Ok(None);
        }
        let card_id = match self.card_id {
            Some(id) => id,
            None => {
                let r = self.parts.card.read_purse().await;
                self.parts.card.release().await;
                match r {
                    Ok(info) => {
                        self.card_id = Some(info.card_id);
                        info.card_id
                    }
                    // The flow will find out about the card itself.
                    Err(_) => return Ok(None),
                }
            }
        };
        let purchases = self.parts.journal.in_doubt()?;
        if let Some(p) = purchases.iter().find(|p| p.txn.card_id == card_id) {
            return Ok(Some(p.txn.transaction_id.clone()));
        }
        let loads = self.parts.journal.loads_in_doubt()?;
        Ok(loads
            .iter()
            .find(|p| p.init.card_id == card_id)
            .map(|p| p.transaction_id.clone()))
    }

    /// Before a new purchase or load: `Some(d)` to start it now; `None` when it waits for a
    /// recovery round (older in-doubt work on this card) or was refused.
    async fn gate(&mut self, d: Deferred) -> Option<Deferred> {
        match self.blocking_transaction().await {
            Ok(None) => Some(d),
            Ok(Some(txid)) => {
                tracing::info!(blocking = %txid, "an earlier transaction on this card is in doubt; settling it first");
                self.deferred = Some(d);
                self.update(UiUpdate::Progress(
                    ui::model::ProgressStep::ContactingServer,
                ))
                .await;
                self.recover().await;
                None
            }
            Err(error) => {
                self.refuse(d, Refusal::JournalUnreadable { error }).await;
                None
            }
        }
    }

    /// After a round: start what waited for it, or tell the viewer why not.
    async fn resume_deferred(&mut self) {
        let Some(d) = self.deferred.take() else {
            return;
        };
        match self.blocking_transaction().await {
            Ok(None) => match d {
                Deferred::Purchase {
                    merchant_id,
                    item_id,
                    reply,
                } => self.start_now(&merchant_id, &item_id, reply).await,
                Deferred::Load { source } => self.start_load_now(source).await,
            },
            Ok(Some(txid)) => {
                tracing::warn!(blocking = %txid, "new transaction refused: an earlier one on this card is still in doubt");
                let flow = match d {
                    Deferred::Purchase { .. } => Flow::Purchase,
                    Deferred::Load { .. } => Flow::Load,
                };
                let refusal = Refusal::EarlierInDoubt {
                    transaction_id: txid,
                    flow,
                };
                self.refuse(d, refusal).await
            }
            Err(error) => self.refuse(d, Refusal::JournalUnreadable { error }).await,
        }
    }

    async fn refuse(&mut self, d: Deferred, refusal: Refusal) {
        let shown = UiUpdate::Error(show::refused(&refusal));
        if let Deferred::Purchase {
            reply: Some(reply), ..
        } = d
        {
            let _ = reply.send(Outcome::Failed {
                transaction_id: None,
                refusal,
            });
        }
        self.update(shown).await;
    }

    // ---- recovery (the rounds themselves are super::recover's)

    /// A trigger (start, reconnect, card insertion): the schedule starts over and a round
    /// runs now (or as soon as the running one or the active flow ends).
    pub async fn recover(&mut self) {
        self.recovery.restart();
        self.transfer.retry_all();
        self.recovery_round().await;
    }

    /// The recovery timer fired.
    pub async fn recovery_timer(&mut self) {
        self.recovery.timer_fired();
        self.recovery_round().await;
    }

    async fn recovery_round(&mut self) {
        let flow_active = self.flow_active();
        if let Some(end) = self.recovery.round(&mut self.parts, flow_active).await {
            self.round_ended(end).await;
        }
    }

    /// After a purchase or load flow ended: a round that waited for it runs now; a flow
    /// that left its transaction in doubt arms the timer.
    async fn recovery_after_flow(&mut self) {
        let flow_active = self.flow_active();
        if let Some(end) = self.recovery.after_flow(&mut self.parts, flow_active).await {
            self.round_ended(end).await;
        } else {
            // A transfer that waited for this flow (each is tried once per trigger).
            Box::pin(self.resume_transfers()).await;
        }
    }

    /// The gateway's answer to a recovery message.
    async fn recovery_answer(&mut self, txid: String, result: Result<Message, GatewayError>) {
        let flow_active = self.flow_active();
        let end = self
            .recovery
            .answer(&mut self.parts, txid, result, flow_active, self.card_id)
            .await;
        if let Some(end) = end {
            self.round_ended(end).await;
        }
    }

    /// A round ended: show the balance it may have changed, then start what waited for it.
    async fn round_ended(&mut self, end: RoundEnd) {
        if end.progressed {
            self.refresh_card().await;
            self.update(UiUpdate::Settled).await;
        }
        Box::pin(self.resume_deferred()).await;
        Box::pin(self.check_refunds()).await;
        Box::pin(self.resume_transfers()).await;
    }
}

fn error(kind: ui::model::ErrorKind, detail: &str) -> UiUpdate {
    UiUpdate::Error(ui::model::UiError {
        kind,
        detail: Some(detail.into()),
    })
}
