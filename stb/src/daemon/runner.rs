//! The daemon's one event loop: UI keys and ticks, reader events, gateway answers, local app
//! requests and shutdown go in; it drives the purchase flow and executes its actions in
//! order (journal first, then card, network, UI).
//!
//! Card commands run inline (they take milliseconds and the card is the flow's only
//! resource); gateway requests — the flows' and recovery's ([`super::recover`]) — run as
//! tasks whose answers come back as events, so the UI keeps answering the remote meanwhile.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use proto::messages::Message;
use reader_drivers::ReaderEvent;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::Instrument;
use ui::model::{CardStatus, CardSummary, Catalog, CatalogId, CatalogItem, ReaderState};
use ui::{App, Intent, ScreenId, UiEvent, UiUpdate};

use super::card::{CardPort, Removal, today};
use super::gateway::Gateway;
use super::recover::{Deferred, RecoverySlot};
use crate::flow::load::Input as LoadInput;
use crate::flow::purchase::{Action, Input, Outcome, Purchase};
use crate::flow::{ui_date, ui_money};
use crate::journal::Journal;

/// What the loop reacts to.
pub enum Event {
    Ui(UiEvent),
    Reader(ReaderEvent),
    /// The answer to the flow's outstanding request (`flow` says which flow asked).
    Answer {
        flow: u64,
        result: Result<Message, String>,
    },
    Catalog(Result<Message, String>),
    /// A local app asks for a payment.
    Pay {
        merchant_id: String,
        item_id: String,
        reply: oneshot::Sender<Outcome>,
    },
    /// The gateway connection came (back) up.
    Connected,
    /// The answer to a recovery message for an in-doubt transaction.
    Recovery {
        transaction_id: String,
        result: Result<Message, String>,
    },
}

/// Attempts at reading a freshly inserted card, and the pause between them.
const CARD_READ_RETRIES: usize = 3;
const CARD_READ_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// A snapshot for tests, the local API and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub screen: ScreenId,
    pub offer: Option<String>,
    pub card_balance: Option<i64>,
    pub last_outcome: Option<Outcome>,
    pub flows_done: u64,
    /// In-doubt transactions (purchases and loads) closed by recovery.
    pub recovered: u64,
    /// Purchases recovery journaled `unresolvable`.
    pub unresolvable: u64,
    /// Recovery messages awaiting the head end's answer.
    pub recovery_calls: usize,
}

struct Active {
    id: u64,
    flow: Purchase,
    reply: Option<oneshot::Sender<Outcome>>,
    span: tracing::Span,
    /// The span has its transaction id (recorded once: the fmt layer appends every record).
    txid_recorded: bool,
}

pub struct Runner {
    pub app: App,
    pub journal: Journal,
    pub card: CardPort,
    pub gateway: Arc<Gateway>,
    pub events: mpsc::Sender<Event>,
    pub provider: String,
    pub offer_timeout: Duration,
    pub status: watch::Sender<Status>,
    /// Viewers can confirm (a UI or a key source exists); without one, local requests are refused.
    pub has_viewer: bool,
    active: Option<Active>,
    next_id: u64,
    catalog: HashMap<String, (String, String)>,
    offer_deadline: Option<tokio::time::Instant>,
    flows_done: u64,
    last_outcome: Option<Outcome>,
    /// The load flow's slot (see [`super::load`]).
    pub load: super::load::LoadSlot,
    /// Recovery of in-doubt work: the timer, the round out, a deferred start.
    pub recovery: RecoverySlot,
    /// The id of the card in the reader, as last read.
    pub(crate) card_id: Option<u64>,
}

/// The test hook's environment variable and the values it acts on.
pub const TEST_HOOK_ENV: &str = "STBD_TEST_HOOK";
/// Freeze after journaling the card's debit response, before sending it.
pub const TEST_HOOK_PAUSE_AFTER_DEBIT: &str = "pause-after-debit-journaled";
/// Freeze after journaling `DebitSent`, before DEBIT goes to the card.
pub const TEST_HOOK_PAUSE_BEFORE_DEBIT: &str = "pause-before-debit";
/// With this set to a file path, the hook holds the daemon only until that file exists, then
/// lets it go on (instead of freezing it until it is killed).
pub const TEST_HOOK_RELEASE_ENV: &str = "STBD_TEST_HOOK_RELEASE";

/// TEST HOOK, for the end-to-end tests only (tests/tests/e2e_purchase.rs,
/// sim/tests/scenarios.rs); no config key reaches it and a box never sets it. With
/// `STBD_TEST_HOOK` set to one of the values above the daemon freezes (the whole
/// single-threaded runtime) right after journaling that step, and says so on stderr, so the
/// test can SIGKILL it exactly in that window — or, with `STBD_TEST_HOOK_RELEASE` naming a
/// file, act on the head end (stop a role) in that window and let the daemon go on by
/// creating the file.
fn test_hook_after_journal(step: &crate::flow::purchase::Step) {
    use crate::flow::purchase::Step;
    let hook = match step {
        Step::DebitResponded { .. } => TEST_HOOK_PAUSE_AFTER_DEBIT,
        Step::DebitSent => TEST_HOOK_PAUSE_BEFORE_DEBIT,
        _ => return,
    };
    if std::env::var(TEST_HOOK_ENV).as_deref() == Ok(hook) {
        if let Some(release) = std::env::var_os(TEST_HOOK_RELEASE_ENV) {
            let release = std::path::PathBuf::from(release);
            eprintln!(
                "stbd: TEST HOOK {hook}: {step:?} journaled; held until {} exists",
                release.display()
            );
            while !release.exists() {
                std::thread::sleep(Duration::from_millis(20));
            }
            eprintln!("stbd: TEST HOOK {hook}: released");
            return;
        }
        eprintln!("stbd: TEST HOOK {hook}: {step:?} journaled; frozen until killed");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

impl Runner {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        app: App,
        journal: Journal,
        card: CardPort,
        gateway: Arc<Gateway>,
        events: mpsc::Sender<Event>,
        provider: String,
        offer_timeout: Duration,
        status: watch::Sender<Status>,
        has_viewer: bool,
    ) -> Self {
        Self {
            app,
            journal,
            card,
            gateway,
            events,
            provider,
            offer_timeout,
            status,
            has_viewer,
            active: None,
            next_id: 0,
            catalog: HashMap::new(),
            offer_deadline: None,
            flows_done: 0,
            last_outcome: None,
            load: super::load::LoadSlot::default(),
            recovery: RecoverySlot::default(),
            card_id: None,
        }
    }

    /// When the offer countdown (the daemon's own, besides the UI's) runs out.
    pub fn offer_deadline(&self) -> Option<tokio::time::Instant> {
        self.offer_deadline
    }

    pub fn publish(&self) {
        let s = Status {
            screen: self.app.screen(),
            offer: self.app.open_offer().map(|(t, _)| t.0.clone()),
            card_balance: self.app.card().map(|c| c.balance.minor),
            last_outcome: self.last_outcome.clone(),
            flows_done: self.flows_done,
            recovered: self.recovery.resolved,
            unresolvable: self.recovery.unresolvable,
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
                let gw = self.gateway.clone();
                let tx = self.events.clone();
                tokio::spawn(async move {
                    let r = gw
                        .call(&Message::CatalogRequest)
                        .await
                        .map_err(|e| e.to_string());
                    let _ = tx.send(Event::Catalog(r)).await;
                });
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
            Intent::SubmitLoadAmount(minor) => self.load_input(LoadInput::Amount(minor)).await,
            Intent::SubmitPin(pin) => self.load_input(LoadInput::Pin(pin)).await,
            Intent::CancelLoad | Intent::CancelPin => self.load_input(LoadInput::Cancel).await,
        }
        true
    }

    pub async fn event(&mut self, ev: Event) -> bool {
        match ev {
            Event::Ui(u) => return self.ui(u).await,
            Event::Reader(r) => self.reader(r).await,
            Event::Answer { flow, result } => {
                if self.active.as_ref().map(|a| a.id) == Some(flow) {
                    let input = match result {
                        Ok(m) => Input::Answer(m),
                        Err(e) => Input::NetworkFailed(e),
                    };
                    self.flow_input(input).await;
                } else {
                    self.load_answer(flow, result).await;
                }
            }
            Event::Catalog(r) => self.catalog_loaded(r).await,
            Event::Pay {
                merchant_id,
                item_id,
                reply,
            } => {
                if !self.has_viewer {
                    let _ = reply.send(Outcome::Failed {
                        transaction_id: None,
                        kind: ui::model::ErrorKind::Other,
                        reason: "no TV UI on this box to confirm the payment".into(),
                    });
                } else if self.busy() {
                    let _ = reply.send(Outcome::Failed {
                        transaction_id: None,
                        kind: ui::model::ErrorKind::Other,
                        reason: "another payment is in progress; try again".into(),
                    });
                } else {
                    self.start(&merchant_id, &item_id, Some(reply)).await;
                }
            }
            Event::Connected => self.recover().await,
            Event::Recovery {
                transaction_id,
                result,
            } => self.recovery_answer(transaction_id, result).await,
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
                if self.card.matches(&reader) && !self.card.has_card() =>
            {
                self.update(UiUpdate::Reader(ReaderState::Ready { name: reader }))
                    .await
            }
            ReaderEvent::ReaderDetached { reader } if self.card.matches(&reader) => {
                if self.card.card_removed(&reader) == Removal::NotInUse {
                    if !self.card.has_card() {
                        self.update(UiUpdate::Reader(ReaderState::Missing)).await;
                    }
                    return;
                }
                tracing::info!(%reader, "the reader in use went away");
                self.card_in_use_gone().await;
                if !self.card.has_card() {
                    self.update(UiUpdate::Reader(ReaderState::Missing)).await;
                }
            }
            ReaderEvent::CardInserted { reader, .. } if self.card.matches(&reader) => {
                if !self.card.card_inserted(&reader) {
                    tracing::info!(%reader, in_use = ?self.card.reader(), "card inserted in another reader; kept in case the card in use goes");
                    return;
                }
                tracing::info!(%reader, "card inserted");
                self.card_id = None;
                self.refresh_card().await;
                self.recover().await;
            }
            ReaderEvent::CardRemoved { reader } if self.card.matches(&reader) => {
                if self.card.card_removed(&reader) == Removal::NotInUse {
                    tracing::info!(%reader, in_use = ?self.card.reader(), "card removed from a reader not in use; nothing changes");
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
        self.load_input(LoadInput::CardRemoved).await;
        if let Some(r) = self.card.reader().map(str::to_string) {
            tracing::info!(reader = %r, "using the card in another reader");
            // A flow that ended on the removal has read it already (finish → refresh).
            if self.card_id.is_none() {
                self.refresh_card().await;
                self.recover().await;
            }
        }
    }

    /// Whether a purchase is in flight.
    pub(crate) fn purchase_active(&self) -> bool {
        self.active.is_some()
    }

    /// A purchase or load is in flight, or one waits for a recovery round.
    pub(crate) fn busy(&self) -> bool {
        self.active.is_some() || self.load.is_active() || self.recovery.has_deferred()
    }

    pub(crate) async fn refresh_card(&mut self) {
        if self.active.is_some() || self.load.is_active() {
            return;
        }
        // Just after an insertion pcscd may still report the card as mute while it powers it
        // up; a few spaced attempts ride that out instead of leaving "insert your card".
        let mut read = self.card.read_purse().await;
        for _ in 0..CARD_READ_RETRIES {
            if read.is_ok() || !self.card.has_card() {
                break;
            }
            self.card.release().await;
            tokio::time::sleep(CARD_READ_RETRY_DELAY).await;
            read = self.card.read_purse().await;
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
                };
                self.update(UiUpdate::CardInserted(summary)).await;
            }
            Err(e) => tracing::warn!(error = %e, "cannot read the card"),
        }
        self.card.release().await;
    }

    async fn show_history(&mut self) {
        if self.active.is_some() || self.load.is_active() || !self.card.has_card() {
            return;
        }
        let entries = async {
            let info = self.card.read_purse().await?;
            let log = self.card.read_log().await?;
            Ok::<_, String>(
                log.into_iter()
                    .map(|r| ui::model::HistoryEntry {
                        date: ui_date(r.date),
                        kind: match r.kind {
                            proto::purse::LogKind::Debit => ui::model::TxKind::Purchase,
                            proto::purse::LogKind::Load => ui::model::TxKind::Load,
                        },
                        amount: ui_money(proto::money::Money::new(r.amount, r.currency)),
                        balance_after: ui_money(proto::money::Money::new(
                            r.balance_after,
                            info.currency,
                        )),
                    })
                    .collect::<Vec<_>>(),
            )
        }
        .await;
        self.card.release().await;
        match entries {
            Ok(h) => self.update(UiUpdate::History(h)).await,
            Err(e) => tracing::warn!(error = %e, "cannot read the card's history"),
        }
    }

    async fn catalog_loaded(&mut self, r: Result<Message, String>) {
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
                    detail: Some(e),
                }))
                .await
            }
        }
    }

    /// A new purchase: after any in-doubt transaction of the same card is settled
    /// ([`Runner::gate`]).
    async fn start(
        &mut self,
        merchant_id: &str,
        item_id: &str,
        reply: Option<oneshot::Sender<Outcome>>,
    ) {
        if self.busy() {
            if let Some(r) = reply {
                let _ = r.send(Outcome::Failed {
                    transaction_id: None,
                    kind: ui::model::ErrorKind::Other,
                    reason: "another payment is in progress; try again".into(),
                });
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
    pub(crate) async fn start_now(
        &mut self,
        merchant_id: &str,
        item_id: &str,
        reply: Option<oneshot::Sender<Outcome>>,
    ) {
        if self.active.is_some() || self.load.is_active() {
            return;
        }
        self.next_id += 1;
        let (flow, actions) = Purchase::start(merchant_id, item_id, today(), rand::random());
        let span = tracing::info_span!("purchase", flow = self.next_id, transaction_id = tracing::field::Empty, %merchant_id, %item_id);
        span.in_scope(|| tracing::info!("purchase started"));
        self.active = Some(Active {
            id: self.next_id,
            flow,
            reply,
            span,
            txid_recorded: false,
        });
        self.execute(actions).await;
    }

    async fn flow_input(&mut self, input: Input) {
        let Some(a) = self.active.as_mut() else {
            return;
        };
        if matches!(input, Input::CardRemoved) && !a.flow.holds_card() {
            return;
        }
        let actions = a.span.in_scope(|| a.flow.handle(input));
        self.execute(actions).await;
    }

    /// Executes actions in order; a card reply feeds straight back into the flow.
    async fn execute(&mut self, actions: Vec<Action>) {
        let mut queue: VecDeque<Action> = actions.into();
        while let Some(action) = queue.pop_front() {
            let Some(active) = self.active.as_mut() else {
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
                    if let Err(e) = self.journal.record(&transaction_id, &step) {
                        // Not journaled means not done: stop here, before the action it guards.
                        span.in_scope(|| tracing::error!(error = %e, ?step, "journal write failed; transaction stopped"));
                        self.finish(Outcome::Failed {
                            transaction_id: Some(transaction_id),
                            kind: ui::model::ErrorKind::Other,
                            reason: format!("the box could not record the transaction: {e}"),
                        })
                        .await;
                        self.update(UiUpdate::Error(ui::model::UiError {
                            kind: ui::model::ErrorKind::Other,
                            detail: Some("the box could not record the transaction".into()),
                        }))
                        .await;
                        return;
                    }
                    span.in_scope(|| tracing::debug!(?step, "journaled"));
                    test_hook_after_journal(&step);
                }
                Action::Apdu(apdu) => {
                    let reply = self.card.transmit(&apdu).await;
                    if let Err(e) = &reply {
                        span.in_scope(|| tracing::warn!(error = %e, "card command failed"));
                    }
                    let active = self.active.as_mut().expect("checked");
                    let more = span.in_scope(|| active.flow.handle(Input::Card(reply)));
                    queue.extend(more);
                }
                Action::Send(msg) => {
                    let gw = self.gateway.clone();
                    let tx = self.events.clone();
                    let id = active.id;
                    span.in_scope(|| {
                        tracing::info!(
                            message = crate::flow::purchase::name(&msg),
                            "to the gateway"
                        )
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
                Action::Ui(u) => {
                    if matches!(u, UiUpdate::Offer(_)) {
                        self.offer_deadline =
                            Some(tokio::time::Instant::now() + self.offer_timeout);
                    }
                    self.update(u).await;
                }
                Action::Done(outcome) => {
                    span.in_scope(|| tracing::info!(outcome = ?outcome, "purchase finished"));
                    self.finish(outcome).await;
                    return;
                }
            }
        }
        if let Some(a) = &self.active {
            if !a.flow.awaiting_viewer() {
                self.offer_deadline = None;
            }
            // Between two card sequences (the viewer decides, the network answers) other
            // programs may use the card.
            if !a.flow.card_sequence_open() {
                self.card.end_sequence().await;
            }
        }
    }

    async fn finish(&mut self, outcome: Outcome) {
        self.offer_deadline = None;
        if let Some(a) = self.active.take() {
            if let Some(r) = a.reply {
                let _ = r.send(outcome.clone());
            }
        }
        self.flows_done += 1;
        self.last_outcome = Some(outcome);
        self.card.release().await;
        if self.card.has_card() {
            self.refresh_card().await;
        }
        self.recovery_after_flow().await;
    }
}
