//! A deterministic in-process pair (issue 14, item 4), in the style of quinn-proto's
//! `tests/util.rs` `Pair`: the REAL box core on one side, the REAL head end's roles on the
//! other, and between them a message queue the pair owns, so a test decides the order of
//! every delivery and can lose, duplicate or delay any of them, or crash the box, between
//! two steps. No sockets, no QUIC, no background tasks.
//!
//! - **The box**: [`stb_flow`]'s purchase and load flows and its recovery decisions, with
//!   an in-process purse card ([`proto::card::PurseCard`], personalised under the
//!   deployment's issuer keys) and `stbd`'s own SQLite journal ([`stb::journal::Journal`]).
//!   The pair is the flows' shell, as `stbd`'s executor (`stb/src/daemon/exec.rs`) is:
//!   journal writes run at once, in order, before the actions they guard; card commands and
//!   gateway requests go into the queue; what to show and how a flow ended are kept for the
//!   test ([`Pair::shows`], [`Pair::outcomes`]). The recovery round is `stbd`'s own,
//!   [`stb_flow::recovery::round::Round`] (which `stb/src/daemon/recover.rs` executes
//!   asynchronously), executed here synchronously: its card commands run inline, as
//!   `stbd`'s do, its journal writes at once, and its messages go through the queue. Like
//!   `stbd`, the pair gives the round the card for a zero-value proof that an answer asks
//!   for only while no flow holds it and the card is in the reader.
//! - **The head end**: gateway, payment, merchant, bank and load roles of an `init-demo`
//!   deployment in a temp dir, each on its own temp SQLite journal, wired as
//!   `headend::assembly::start` wires all-in-one but without binding any socket: the box's
//!   requests enter through the gateway's [`Role`] entry point. The gateway's background
//!   deliveries (FIG. 6/7 notifications, releases, the reversal feed) run only when the
//!   pair says so ([`Pair::head_end_background`], and at the end of every
//!   [`Pair::drive`]). Each role call runs to completion on a current-thread runtime
//!   before the next step: the roles spawn nothing and wait on nothing, so the order of
//!   journal writes is the order of the steps.
//!
//! **Faults**, between any two steps, on the item at the front of the queue:
//! [`Pair::lose`] (the requester hears the transport's or reader's failure),
//! [`Pair::fail`] (the same, with the failure the test names: a card pulled mid-command, a
//! network timeout, ...),
//! [`Pair::vanish`] (nobody hears anything), [`Pair::duplicate`], [`Pair::delay`],
//! [`Pair::tamper`]; and on the parties: [`Pair::crash`] (the box), [`Pair::remove_card`] /
//! [`Pair::insert_card`], [`Pair::set_down`] (a back end answers the gateway `Busy`, as an
//! unreachable remote role does), [`Pair::restart_head_end`] (every role reopened from its
//! journal). [`Pair::step_until`] finds the moment. The pair does not play `stbd`'s
//! runner: it does not hold a new flow back while an older transaction of the card is in
//! doubt; the test decides when recovery runs ([`Pair::recover`]).
//!
//! **Time.** The box side is virtual: nothing in it reads a clock (the flows take the date
//! as an input; the recovery timer is [`Pair::recover`], called when the test says). The
//! head end's time is NOT virtual: its offer and hold lifetimes, the payment server's
//! transaction deadline and its time stamps read the system clock, and making them virtual
//! would need a clock threaded through every role. The tests therefore stay far inside
//! those lifetimes (the demo's are 30 s and more) and never wait on them; nothing expires
//! during a test, so the real clock does not change any outcome. The one exception is a
//! test of the payment server's deadline, which sets it to 1 s
//! ([`PairOptions::transaction_timeout_secs`]) and sleeps past it. The head end's randoms
//! (transaction ids, keys, security-card nonces) are not seeded either: the same inputs give
//! the same sequence of steps and message kinds ([`Pair::trace`]), not the same bytes.
//!
//! **Journals** live on `/dev/shm` when it exists: a crash here is a reopen of the journal,
//! not a power cut, so fsyncs would buy nothing (and cost most of a test's time).
//!
//! **Determinism.** [`Pair::step`] delivers the item at the front of the queue and puts
//! whatever it causes at the back; [`Pair::drive`] steps until the queue is empty. The
//! flows' and recovery's randoms are seeded from [`PairOptions::seed`].
//!
//! **Crash.** [`Pair::crash`] kills the box between two steps: the flow and recovery's
//! in-memory state are gone, the journal is closed and opened again, the card is reset (a
//! power cycle keeps its purse and log). What the box had put on the wire (requests to the
//! gateway in the queue) still arrives, but no answer reaches the restarted box; card
//! commands not yet given to the reader are lost. The restarted box runs a recovery round,
//! as `stbd` does at start-up.

#![warn(missing_docs)]

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

use headend::assembly::{self, DemoOptions};
use headend::bank::BankServer;
use headend::config::HeadendConfig;
use headend::funds::HoldState;
use headend::gateway::{Gateway, Lifetimes};
use headend::load::LoadServer;
use headend::merchant::MerchantServer;
use headend::payment::{PayState, PaymentServer};
use headend::role::{Caller, Role};
use proto::apdu::CardApplication;
use proto::card::{PurseCard, commands};
use proto::crypto::DesKey;
use proto::messages::{LoadSource, Message};
use proto::money::Currency;
use proto::purse::{Date, PurseInfo};
use proto::secret::Secret;
use stb::journal::Journal as BoxJournal;
use stb_flow::load::{self, Load};
use stb_flow::purchase::{self, Purchase};
use stb_flow::recovery::round::{self, Round};
use stb_flow::show::Show;
use stb_flow::{Action, CardFailure, CardReply, JournalFailure, NetworkFailure, split_sw};

/// The box's id: the demo deployment's box, which owns the demo bank account and voucher.
pub const BOX_ID: &str = assembly::DEMO_BOX;

/// The demo bank account the box may load from.
pub const ACCOUNT: &str = assembly::DEMO_ACCOUNT;

/// The card's currency (the demo's prices and accounts are in euro cents).
pub const EUR: Currency = Currency::EUR;

/// The most steps [`Pair::drive`] takes before it decides the pair will never be quiet.
pub const MAX_STEPS: usize = 10_000;

/// How to build a [`Pair`].
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Who compares the card's signature, for both demo merchants: `"security-card"` (FIG.
    /// 4), `"payment-server"` (FIG. 5), `"gateway"` (FIG. 6) or `"merchant"` (FIG. 7).
    pub embodiment: String,
    /// The FIG. 8 message layer (TSK/ETSK) on or off.
    pub message_layer: bool,
    /// The card's balance at the start, in euro cents.
    pub balance: u64,
    /// The card's maximum balance, in euro cents.
    pub max_balance: u64,
    /// Seeds the box's randoms (the flows' sealing, recovery's sealing, the card's randoms).
    pub seed: u64,
    /// The payment server's deadline for a debit response, in seconds of REAL time (the
    /// head end's clock is not virtual): past it, [`Pair::head_end_sweep`] reverses the
    /// purchase.
    pub transaction_timeout_secs: u64,
}

impl Default for PairOptions {
    fn default() -> Self {
        Self {
            embodiment: "security-card".into(),
            message_layer: true,
            balance: 10_000,
            max_balance: 100_000,
            seed: 1,
            transaction_timeout_secs: 30,
        }
    }
}

/// What an item in flight is.
#[derive(Debug, Clone, PartialEq)]
pub enum Leg {
    /// A command APDU from the box to its card.
    ToCard(Vec<u8>),
    /// The card's reply (or what the reader saw) back to the box.
    FromCard(Result<CardReply, CardFailure>),
    /// A request from the box to the gateway.
    ToGateway(Message),
    /// The gateway's answer (or what the transport saw) back to the box.
    FromGateway(Result<Message, NetworkFailure>),
}

/// Which part of the box an item belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Party {
    /// The purchase or load flow with this number (flows are numbered from 1 as they start).
    Flow(u64),
    /// The recovery of this transaction id.
    Recovery(String),
}

/// One pending delivery in the pair's queue.
#[derive(Debug, Clone, PartialEq)]
pub struct InFlight {
    /// What it is and where it goes.
    pub leg: Leg,
    /// Whose request it is (or answers).
    pub party: Party,
    /// The box's life it belongs to: [`Pair::crash`] starts a new one, and answers to an
    /// earlier life reach nobody.
    pub epoch: u64,
}

impl InFlight {
    /// A request from the box to the gateway of this message kind (see
    /// [`Message::kind`]), e.g. `"a debit response"`.
    #[must_use]
    pub fn is_request(&self, kind: &str) -> bool {
        matches!(&self.leg, Leg::ToGateway(m) if m.kind() == kind)
    }

    /// An answer from the gateway of this message kind (`"a receipt"`, `"an error"`, ...).
    #[must_use]
    pub fn is_answer(&self, kind: &str) -> bool {
        matches!(&self.leg, Leg::FromGateway(Ok(m)) if m.kind() == kind)
    }

    /// A command APDU to the card with this instruction byte (`proto::card::INS_*`).
    #[must_use]
    pub fn is_card_command(&self, ins: u8) -> bool {
        matches!(&self.leg, Leg::ToCard(a) if a.get(1) == Some(&ins))
    }

    /// The card's reply to a command (any command: replies do not say which).
    #[must_use]
    pub fn is_card_reply(&self) -> bool {
        matches!(&self.leg, Leg::FromCard(_))
    }

    /// One line for the trace: direction and kind, no bytes.
    #[must_use]
    pub fn describe(&self) -> String {
        let who = match &self.party {
            Party::Flow(n) => format!("flow {n}"),
            Party::Recovery(_) => "recovery".to_string(),
        };
        match &self.leg {
            Leg::ToCard(a) => format!("{who}: box → card: {}", apdu_name(a)),
            Leg::FromCard(Ok(r)) => match split_sw(&r.response) {
                Some((_, sw)) => format!("{who}: card → box: {sw}"),
                None => format!("{who}: card → box: no status word"),
            },
            Leg::FromCard(Err(_)) => format!("{who}: card → box: reader error"),
            Leg::ToGateway(m) => format!("{who}: box → gateway: {}", m.kind()),
            Leg::FromGateway(Ok(Message::Error(e))) => {
                format!("{who}: gateway → box: an error ({:?})", e.code)
            }
            Leg::FromGateway(Ok(m)) => format!("{who}: gateway → box: {}", m.kind()),
            Leg::FromGateway(Err(_)) => format!("{who}: gateway → box: transport failure"),
        }
    }
}

fn apdu_name(apdu: &[u8]) -> &'static str {
    use proto::card::*;
    match apdu.get(1).copied() {
        Some(INS_SELECT) => "SELECT",
        Some(INS_READ_PURSE) => "READ PURSE",
        Some(INS_INITIALIZE) => "INITIALIZE",
        Some(INS_DEBIT) => "DEBIT",
        Some(INS_LOAD) => "LOAD",
        Some(INS_READ_LOG) => "READ LOG",
        _ => "another command",
    }
}

/// How a flow ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Ended {
    /// A purchase flow's outcome.
    Purchase(purchase::Outcome),
    /// A load flow's outcome.
    Load(load::Outcome),
    /// A journal write failed and stopped the flow before the action it guarded.
    NotRecorded(JournalFailure),
}

/// What a viewer does on the TV while a flow waits for them.
#[derive(Debug, Clone, PartialEq)]
pub enum Viewer {
    /// OK on the offer popup.
    Accept,
    /// BACK on the offer popup (`timeout`: the countdown ran out instead).
    Decline {
        /// The countdown ran out rather than BACK.
        timeout: bool,
    },
    /// The amount to load, in euro cents.
    Amount(i64),
    /// The PIN, as typed.
    Pin(String),
    /// BACK on the amount or PIN screen.
    CancelLoad,
}

enum Flow {
    Purchase(Purchase),
    Load(Load),
}

/// The head end's roles, in process (no sockets): the test may look at any of them.
pub struct HeadEnd {
    /// The configuration the roles were built from.
    pub cfg: HeadendConfig,
    /// The gateway: the box's requests enter through its [`Role`] entry point.
    pub gateway: Arc<Gateway>,
    /// The payment server with its security-card pool.
    pub payment: Arc<PaymentServer>,
    /// The merchant role (cable catalog and internet merchant).
    pub merchant: Arc<MerchantServer>,
    /// The bank server (accounts, PIN, holds, issuer float).
    pub bank: Arc<BankServer>,
    /// The load server with its HSM and the pre-funded (voucher) accounts.
    pub load: Arc<LoadServer>,
    links: Links,
}

/// A back-end role behind the gateway, which a test can take down ([`Pair::set_down`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum BackEnd {
    /// The payment server.
    Payment,
    /// The merchant role.
    Merchant,
    /// The bank server.
    Bank,
    /// The load server.
    Load,
}

/// The gateway's links to its back ends: whether each is down.
#[derive(Default)]
struct Links(std::sync::Mutex<BTreeMap<BackEnd, Arc<std::sync::atomic::AtomicBool>>>);

impl Links {
    fn flag(&self, b: BackEnd) -> Arc<std::sync::atomic::AtomicBool> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(b)
            .or_default()
            .clone()
    }
}

/// A back end as the gateway sees it: while down, every call gets what an unreachable
/// remote role gives (`Busy`, as `headend::role::RemoteRole` answers), and the role itself
/// sees nothing.
struct Link {
    role: Arc<dyn Role>,
    down: Arc<std::sync::atomic::AtomicBool>,
    name: BackEnd,
}

impl Role for Link {
    fn handle(&self, caller: Caller, msg: Message) -> headend::quic::BoxFuture<'_, Message> {
        if self.down.load(std::sync::atomic::Ordering::SeqCst) {
            let name = self.name;
            return Box::pin(async move {
                Message::error(
                    proto::messages::ErrorCode::Busy,
                    format!("{name:?} is unreachable (the pair took it down); try again"),
                    None,
                )
            });
        }
        self.role.handle(caller, msg)
    }
}

impl HeadEnd {
    /// Builds every role of `cfg` and wires the gateway's routes to them in process, as
    /// all-in-one does, with no server bound and no background task started.
    fn build(cfg: HeadendConfig) -> Result<Self, String> {
        let payment = PaymentServer::open(&cfg)?;
        let merchant = MerchantServer::open(&cfg)?;
        let bank = BankServer::open(&cfg)?;
        let load = LoadServer::open(&cfg)?;
        let mut roles: std::collections::HashMap<String, Arc<dyn Role>> = Default::default();
        let payment_name = cfg.payment.as_ref().ok_or("no [payment]")?.name.clone();
        let merchant_name = cfg.merchant.as_ref().ok_or("no [merchant]")?.name.clone();
        let links = Links::default();
        let mut link = |name: String, back: BackEnd, role: Arc<dyn Role>| {
            roles.insert(
                name,
                Arc::new(Link {
                    role,
                    down: links.flag(back),
                    name: back,
                }),
            );
        };
        link(payment_name, BackEnd::Payment, payment.clone());
        link(merchant_name, BackEnd::Merchant, merchant.clone());
        link(
            headend::gateway::load::BANK.into(),
            BackEnd::Bank,
            bank.clone(),
        );
        link(
            headend::gateway::load::LOAD.into(),
            BackEnd::Load,
            load.clone(),
        );
        let section = cfg.gateway.as_ref().ok_or("no [gateway]")?;
        let journal = Arc::new(
            headend::journal::Journal::open(&cfg.state_dir.join("gateway.sqlite"))
                .map_err(|e| e.to_string())?,
        );
        let lifetimes = Lifetimes {
            offer: std::time::Duration::from_secs(section.offer_lifetime_secs),
            hold: std::time::Duration::from_secs(section.hold_lifetime_secs),
            limits: section.limits,
        };
        let gateway = Gateway::new(journal, &cfg.merchants, roles, lifetimes)?;
        Ok(Self {
            links,
            cfg,
            gateway,
            payment,
            merchant,
            bank,
            load,
        })
    }
}

/// What recovery has done since the pair was built (over every life of the box).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecoveryCounts {
    /// Rounds run.
    pub rounds: u64,
    /// Transactions closed (completed or ended) by recovery.
    pub resolved: u64,
    /// Purchases journaled `unresolvable`.
    pub unresolvable: u64,
    /// Times a transaction was left in doubt for a later round (an answer that settled
    /// nothing, no proof from the card, a failed journal write, ...).
    pub retries: u64,
}

/// The conservation figures, in euro cents ([`Pair::ledger`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// The card's balance when the pair was built.
    pub card_start: u64,
    /// The card's balance now.
    pub card_now: u64,
    /// What the load server's HSM settled as loaded onto cards.
    pub loaded: u64,
    /// What the funding accounts (bank accounts, vouchers) gave: opening − balance.
    pub funders_debited: u64,
    /// What the issuer floats (bank and pre-funded) gained.
    pub float: u64,
    /// Value still held on funding accounts.
    pub held: u64,
    /// Holds neither captured nor released.
    pub open_holds: Vec<String>,
    /// The security cards' totals: what they counted as sold.
    pub sold: u64,
    /// The amounts of the purchases whose goods the merchant released.
    pub released: u64,
    /// Purchases the payment server still has open (debit command issued, neither proved
    /// nor reversed).
    pub open_purchases: Vec<String>,
    /// Purchases whose release and security-card state disagree (released but not
    /// completed, or completed but not released).
    pub mismatched: Vec<String>,
    /// Transactions the box's journal still holds in doubt (purchases and loads).
    pub box_in_doubt: Vec<String>,
}

impl Ledger {
    /// Checks that value is conserved and everything is settled: the card's balance moved
    /// by exactly what was loaded minus what the security cards counted as sold; the goods
    /// released are what was sold, purchase by purchase; what the funding accounts gave is
    /// what the HSM loaded and what the floats gained; nothing is held, open or in doubt.
    ///
    /// # Panics
    /// On the first figure that does not add up, naming it.
    pub fn assert_conserved(&self) {
        assert_eq!(
            self.card_start + self.loaded,
            self.card_now + self.sold,
            "card: start {} + loaded {} ≠ now {} + sold {} ({self:?})",
            self.card_start,
            self.loaded,
            self.card_now,
            self.sold
        );
        assert_eq!(
            self.released, self.sold,
            "merchant released {} but the security cards sold {} ({self:?})",
            self.released, self.sold
        );
        assert_eq!(
            self.funders_debited, self.loaded,
            "funding accounts gave {} but the HSM loaded {} ({self:?})",
            self.funders_debited, self.loaded
        );
        assert_eq!(
            self.float, self.loaded,
            "the floats gained {} but the HSM loaded {} ({self:?})",
            self.float, self.loaded
        );
        assert_eq!(self.held, 0, "value still held ({self:?})");
        assert!(self.open_holds.is_empty(), "holds left open ({self:?})");
        assert!(
            self.open_purchases.is_empty(),
            "purchases open at the payment server ({self:?})"
        );
        assert!(
            self.mismatched.is_empty(),
            "release and sale disagree ({self:?})"
        );
        assert!(
            self.box_in_doubt.is_empty(),
            "the box still holds transactions in doubt ({self:?})"
        );
    }
}

/// The pair: the box core with its card on one side, the head end in process on the other,
/// and the queue between them. See the module docs.
pub struct Pair {
    rt: tokio::runtime::Runtime,
    /// The demo deployment and every journal (head end and box) live here.
    dir: tempfile::TempDir,
    /// The head end's roles.
    pub head_end: HeadEnd,
    /// The box's card (in the reader for the whole test).
    pub card: PurseCard,
    /// Whether the card is in the reader ([`Pair::remove_card`], [`Pair::insert_card`]).
    card_present: bool,
    card_start: u64,
    journal: BoxJournal,
    journal_dir: PathBuf,
    pin_key: DesKey,
    pin: String,
    voucher: String,
    today: Date,
    seed: u64,
    flow: Option<(u64, Flow)>,
    flows_started: u64,
    /// The box's card id (the card of every transaction).
    card_id: u64,
    /// The recovery round and its messages out (a crash starts a new one).
    recovery: Round,
    /// What the rounds of the box's earlier lives did.
    past_counts: round::Counts,
    /// A round was asked for while a flow held the card: it runs when the flow ends.
    round_waits: bool,
    /// Recovery rounds run, over every life of the box.
    rounds: u64,
    queue: VecDeque<InFlight>,
    epoch: u64,
    trace: Vec<String>,
    shows: Vec<Show>,
    outcomes: Vec<Ended>,
    /// Every purchase transaction id the box saw an offer for.
    purchases: Vec<String>,
}

impl Pair {
    /// A new pair: an `init-demo` deployment in a fresh temp dir (on `/dev/shm` when it
    /// exists) with the embodiment and FIG. 8 layer of `opts`, every role on its own SQLite journal there, and a box with an
    /// empty journal and a new card of `opts.balance`.
    ///
    /// # Panics
    /// When the deployment or a journal cannot be made (a broken temp dir): a test fixture.
    #[must_use]
    pub fn new(opts: PairOptions) -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a current-thread runtime");
        // On tmpfs when there is one: a crash here is a reopen of the journals, not a power
        // cut, so their fsyncs buy nothing and would cost most of a test's time.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm).or_else(|_| tempfile::tempdir())
        } else {
            tempfile::tempdir()
        }
        .expect("temp dir");
        let files = assembly::init_demo(
            dir.path(),
            &DemoOptions {
                // Never bound: the pair calls the gateway in process.
                gateway_listen: ([127, 0, 0, 1], 0).into(),
                embodiment: opts.embodiment.clone(),
                message_layer: opts.message_layer,
                transaction_timeout_secs: opts.transaction_timeout_secs,
                split: None,
                // The pair runs no clearing role.
                clearing: false,
            },
        )
        .expect("init-demo deployment");
        let cfg = HeadendConfig::load(&files.config).expect("demo config");
        let head_end = {
            let _in_rt = rt.enter();
            HeadEnd::build(cfg).expect("head-end roles")
        };
        let issuer = headend::config::load_issuer_keys(&files.issuer_keys).expect("issuer keys");
        let card_id = 0xCA4D_0000_0000 + (opts.seed & 0xFFFF);
        let mut card = crate::sim_box::new_card(&issuer, card_id, opts.balance, opts.max_balance);
        // The card's own randoms from the pair's seed.
        card = PurseCard::new(card.state, opts.seed);
        let pin = std::fs::read_to_string(&files.pin_file)
            .expect("demo PIN")
            .trim()
            .to_string();
        let pin_key = headend::config::hex_key(
            "pin key file",
            &std::fs::read_to_string(files.pin_keys_dir.join(format!("{BOX_ID}.key")))
                .expect("the box's PIN key"),
        )
        .expect("PIN key");
        let journal_dir = dir.path().join("box");
        let journal = BoxJournal::open(&journal_dir).expect("box journal");
        Self {
            rt,
            head_end,
            card,
            card_present: true,
            card_start: opts.balance,
            journal,
            journal_dir,
            pin_key,
            pin,
            voucher: files.voucher,
            today: headend::payment::today(),
            seed: opts.seed,
            flow: None,
            flows_started: 0,
            card_id,
            recovery: Round::new(recovery_seed(opts.seed, 0)),
            past_counts: round::Counts::default(),
            round_waits: false,
            rounds: 0,
            queue: VecDeque::new(),
            epoch: 0,
            trace: Vec::new(),
            shows: Vec::new(),
            outcomes: Vec::new(),
            purchases: Vec::new(),
            dir,
        }
    }

    /// A pair with the default options but this embodiment and FIG. 8 layer.
    #[must_use]
    pub fn with(embodiment: &str, message_layer: bool) -> Self {
        Self::new(PairOptions {
            embodiment: embodiment.into(),
            message_layer,
            ..Default::default()
        })
    }

    // ---- what the test can see ----

    /// The deployment's directory (configs, keys, every journal).
    #[must_use]
    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }

    /// The demo bank account's PIN.
    #[must_use]
    pub fn pin(&self) -> &str {
        &self.pin
    }

    /// The demo voucher's code.
    #[must_use]
    pub fn voucher(&self) -> &str {
        &self.voucher
    }

    /// The box's journal.
    #[must_use]
    pub fn journal(&self) -> &BoxJournal {
        &self.journal
    }

    /// The items in flight, front (next to be delivered) first.
    #[must_use]
    pub fn in_flight(&self) -> &VecDeque<InFlight> {
        &self.queue
    }

    /// The next item to be delivered.
    #[must_use]
    pub fn peek(&self) -> Option<&InFlight> {
        self.queue.front()
    }

    /// Every delivery, fault and crash so far, one line each, in order.
    #[must_use]
    pub fn trace(&self) -> &[String] {
        &self.trace
    }

    /// What the flows asked the TV to show, in order.
    #[must_use]
    pub fn shows(&self) -> &[Show] {
        &self.shows
    }

    /// How the flows ended, in order.
    #[must_use]
    pub fn outcomes(&self) -> &[Ended] {
        &self.outcomes
    }

    /// How the last flow ended, if one has.
    #[must_use]
    pub fn last_outcome(&self) -> Option<&Ended> {
        self.outcomes.last()
    }

    /// Whether a purchase or load flow is running.
    #[must_use]
    pub fn flow_active(&self) -> bool {
        self.flow.is_some()
    }

    /// What recovery has done so far.
    #[must_use]
    pub fn recovery_counts(&self) -> RecoveryCounts {
        let now = self.recovery.counts();
        let past = self.past_counts;
        RecoveryCounts {
            rounds: self.rounds,
            resolved: past.resolved + now.resolved,
            unresolvable: past.unresolvable + now.unresolvable,
            retries: past.retries + now.retries,
        }
    }

    /// The card's balance (READ PURSE, straight on the card: not through the queue).
    #[must_use]
    pub fn card_balance(&mut self) -> u64 {
        self.purse().balance
    }

    fn purse(&mut self) -> PurseInfo {
        self.card.process_apdu(&commands::select());
        let r = self.card.process_apdu(&commands::read_purse());
        let (data, _) = split_sw(&r).expect("status word");
        PurseInfo::decode(data).expect("READ PURSE")
    }

    /// The journal state of a purchase (`completed`, `ended`, `debit_sent`, ...).
    #[must_use]
    pub fn purchase_state(&self, txid: &str) -> Option<String> {
        self.journal.state(txid).expect("box journal")
    }

    /// The journal state of a load (`load_completed`, `load_sent`, ...).
    #[must_use]
    pub fn load_state(&self, txid: &str) -> Option<String> {
        self.journal.load_state(txid).expect("box journal")
    }

    /// Runs `f` on the pair's runtime (for the roles' async accessors).
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    // ---- the viewer ----

    /// Starts a purchase of `item` from `merchant` (the viewer pressed OK on the catalog).
    ///
    /// # Panics
    /// If a flow is already running (the box runs one at a time).
    pub fn start_purchase(&mut self, merchant: &str, item: &str) {
        assert!(self.flow.is_none(), "a flow is already running");
        self.flows_started += 1;
        let seed = self.seed.wrapping_mul(1_000_003) + self.flows_started;
        let (p, first) = Purchase::start(merchant, item, self.today, seed);
        self.flow = Some((self.flows_started, Flow::Purchase(p)));
        self.trace
            .push(format!("flow {}: purchase of {item}", self.flows_started));
        self.execute(actions(first));
    }

    /// Starts a load from `source` (the box's PIN key is given for a bank account's PIN).
    ///
    /// # Panics
    /// If a flow is already running.
    pub fn start_load(&mut self, source: LoadSource) {
        assert!(self.flow.is_none(), "a flow is already running");
        self.flows_started += 1;
        let seed = self.seed.wrapping_mul(1_000_003) + self.flows_started;
        let (l, first) = Load::start(source, Some(self.pin_key.clone()), seed);
        self.flow = Some((self.flows_started, Flow::Load(l)));
        self.trace
            .push(format!("flow {}: load", self.flows_started));
        self.execute(actions(first));
    }

    /// The demo bank account as a load source.
    #[must_use]
    pub fn bank_source() -> LoadSource {
        LoadSource::Bank {
            account: ACCOUNT.into(),
        }
    }

    /// The demo voucher as a load source.
    #[must_use]
    pub fn voucher_source(&self) -> LoadSource {
        LoadSource::Voucher {
            code: Secret::new(self.voucher.clone()),
        }
    }

    /// The viewer acts; ignored (as the flow would) when no flow waits for it.
    pub fn viewer(&mut self, v: Viewer) {
        self.trace.push(format!("viewer: {}", viewer_name(&v)));
        let actions: Vec<FlowAction> = match (&mut self.flow, v) {
            (Some((_, Flow::Purchase(p))), Viewer::Accept) => {
                actions(p.handle(purchase::Input::Accept))
            }
            (Some((_, Flow::Purchase(p))), Viewer::Decline { timeout }) => {
                actions(p.handle(purchase::Input::Decline { timeout }))
            }
            (Some((_, Flow::Load(l))), Viewer::Amount(a)) => {
                actions(l.handle(load::Input::Amount(a)))
            }
            (Some((_, Flow::Load(l))), Viewer::Pin(pin)) => {
                actions(l.handle(load::Input::Pin(Secret::new(pin))))
            }
            (Some((_, Flow::Load(l))), Viewer::CancelLoad) => {
                actions(l.handle(load::Input::Cancel))
            }
            _ => Vec::new(),
        };
        self.execute(actions);
    }

    /// A whole purchase with a viewer who says OK: start, drive, accept, drive. The
    /// outcome, if the flow ended.
    pub fn buy(&mut self, merchant: &str, item: &str) -> Option<Ended> {
        self.start_purchase(merchant, item);
        self.drive();
        self.viewer(Viewer::Accept);
        self.drive();
        self.finished()
    }

    /// A whole load with a viewer who enters `amount` (and the PIN when asked): start,
    /// drive, amount, PIN, drive. The outcome, if the flow ended.
    pub fn load(&mut self, source: LoadSource, amount: i64) -> Option<Ended> {
        let bank = matches!(source, LoadSource::Bank { .. });
        self.start_load(source);
        self.drive();
        self.viewer(Viewer::Amount(amount));
        if bank {
            let pin = self.pin.clone();
            self.viewer(Viewer::Pin(pin));
        }
        self.drive();
        self.finished()
    }

    /// The last outcome, when no flow is running any more.
    fn finished(&self) -> Option<Ended> {
        if self.flow.is_some() {
            None
        } else {
            self.outcomes.last().cloned()
        }
    }

    // ---- stepping ----

    /// Delivers the item at the front of the queue; whatever it causes goes to the back.
    /// False when nothing was in flight.
    pub fn step(&mut self) -> bool {
        let Some(item) = self.queue.pop_front() else {
            return false;
        };
        self.trace.push(item.describe());
        let InFlight { leg, party, epoch } = item;
        match leg {
            Leg::ToCard(apdu) => {
                if epoch != self.epoch {
                    self.trace
                        .push("  the box died before the reader got it".into());
                    return true;
                }
                let reply = if self.card_present {
                    Ok(CardReply {
                        atr: self.card.atr(),
                        response: self.card.process_apdu(&apdu),
                    })
                } else {
                    Err(CardFailure::NoCard)
                };
                self.queue.push_back(InFlight {
                    leg: Leg::FromCard(reply),
                    party,
                    epoch,
                });
            }
            Leg::ToGateway(msg) => {
                // On the wire: it arrives whatever happened to the box since.
                let answer = self.rt.block_on(
                    self.head_end
                        .gateway
                        .handle(Caller::Box(BOX_ID.into()), msg),
                );
                self.queue.push_back(InFlight {
                    leg: Leg::FromGateway(Ok(answer)),
                    party,
                    epoch,
                });
            }
            Leg::FromCard(reply) => {
                if epoch != self.epoch {
                    self.trace
                        .push("  nobody listens: the box restarted".into());
                    return true;
                }
                self.deliver_to_box(party, Delivery::Card(reply));
            }
            Leg::FromGateway(answer) => {
                if epoch != self.epoch {
                    self.trace
                        .push("  nobody listens: the box restarted".into());
                    return true;
                }
                self.deliver_to_box(party, Delivery::Gateway(answer));
            }
        }
        true
    }

    /// Steps until nothing is in flight, then runs the gateway's background deliveries once
    /// ([`Pair::head_end_background`]). Returns the number of steps.
    ///
    /// # Panics
    /// After [`MAX_STEPS`] steps: the pair is not converging.
    pub fn drive(&mut self) -> usize {
        let mut n = 0;
        while self.step() {
            n += 1;
            assert!(n < MAX_STEPS, "the pair is not quiet after {n} steps");
        }
        self.head_end_background();
        n
    }

    /// Steps until the front item satisfies `pred` (not delivering it). False when the
    /// queue ran dry first.
    pub fn step_until(&mut self, mut pred: impl FnMut(&InFlight) -> bool) -> bool {
        for _ in 0..MAX_STEPS {
            match self.queue.front() {
                None => return false,
                Some(i) if pred(i) => return true,
                Some(_) => {
                    self.step();
                }
            }
        }
        panic!("step_until: not found in {MAX_STEPS} steps");
    }

    /// The gateway's background work, once: FIG. 6/7 notifications to the payment server,
    /// releases to the merchant, the reversal feed (see
    /// [`Gateway::background_pass`]). True when something is left to retry.
    pub fn head_end_background(&mut self) -> bool {
        self.trace.push("head end: background pass".into());
        self.rt.block_on(self.head_end.gateway.background_pass())
    }

    /// The roles' sweeps, once (offer, hold and transaction lifetimes, read on the real
    /// clock: nothing is due in a short test).
    pub fn head_end_sweep(&mut self) {
        self.trace.push("head end: sweep".into());
        let he = &self.head_end;
        self.rt.block_on(async {
            let _ = he.gateway.sweep().await;
            let _ = he.payment.sweep().await;
            let _ = he.merchant.sweep();
        });
    }

    // ---- faults ----

    /// The viewer pulls the card: commands to it fail from now on (the reader's error), the
    /// flow hears of the removal, and recovery waits for the card.
    pub fn remove_card(&mut self) {
        self.trace.push("box: card removed".into());
        self.card_present = false;
        self.card.reset();
        let actions: Vec<FlowAction> = match &mut self.flow {
            Some((_, Flow::Purchase(p))) => actions(p.handle(purchase::Input::CardRemoved)),
            Some((_, Flow::Load(l))) => actions(l.handle(load::Input::CardRemoved)),
            None => Vec::new(),
        };
        self.execute(actions);
    }

    /// The viewer puts the card back: a recovery round runs, as `stbd` runs one on every
    /// insertion.
    pub fn insert_card(&mut self) {
        self.trace.push("box: card inserted".into());
        self.card_present = true;
        self.recover();
    }

    /// Kills every head-end role and starts them again from their journals, as a restart
    /// of all-in-one does, between two steps: whatever a role held only in memory is gone.
    /// Requests in flight reach the new gateway; every back end is up again.
    ///
    /// # Panics
    /// When a role cannot reopen its journal or keys.
    pub fn restart_head_end(&mut self) {
        self.trace.push("head end: restart".into());
        let cfg = self.head_end.cfg.clone();
        let _in_rt = self.rt.enter();
        self.head_end = HeadEnd::build(cfg).expect("the roles restart from their journals");
    }

    /// Takes a back end down (`true`) or brings it back: while down, the gateway's calls to
    /// it get `Busy`, as from an unreachable remote role.
    pub fn set_down(&mut self, back: BackEnd, down: bool) {
        self.trace.push(format!(
            "head end: {back:?} {}",
            if down { "down" } else { "up" }
        ));
        self.head_end
            .links
            .flag(back)
            .store(down, std::sync::atomic::Ordering::SeqCst);
    }

    fn take_front(&mut self, what: &str) -> InFlight {
        let item = self
            .queue
            .pop_front()
            .unwrap_or_else(|| panic!("{what}: nothing in flight"));
        self.trace
            .push(format!("fault: {what}: {}", item.describe()));
        item
    }

    /// Loses the front item, and the box sees its request fail as its transport or reader
    /// would report it (a network timeout for a gateway leg, a reader fault for a card leg):
    /// the failure is queued for the requester. A lost request to the gateway never reached
    /// it; a lost answer was acted on by the gateway; a lost card reply was acted on by the
    /// card.
    ///
    /// # Panics
    /// If nothing is in flight.
    pub fn lose(&mut self) {
        let failure = match self.queue.front().map(|i| &i.leg) {
            Some(Leg::ToGateway(_) | Leg::FromGateway(_)) => {
                Failure::Network(NetworkFailure::Timeout(LOST_AFTER))
            }
            _ => Failure::Card(CardFailure::Reader(
                "the reader failed during the command".into(),
            )),
        };
        self.fail(failure);
    }

    /// As [`Pair::lose`], with the failure the box is told: a [`Failure::Card`] for a card
    /// leg (a command that never reached the card, or a reply lost after the card acted on
    /// it: the card pulled mid-command, a reader fault, ...), a [`Failure::Network`] for a
    /// gateway leg (a request that never reached the gateway, or an answer lost after the
    /// gateway acted on it: a timeout, a reset, the head end unreachable, ...).
    ///
    /// # Panics
    /// If nothing is in flight, or the failure is not of the front item's kind.
    pub fn fail(&mut self, failure: Failure) {
        let item = self.take_front("lost, the box is told");
        let leg = match (&item.leg, failure) {
            (Leg::ToGateway(_) | Leg::FromGateway(_), Failure::Network(f)) => {
                self.trace.push(format!("  the box is told: {f}"));
                Leg::FromGateway(Err(f))
            }
            (Leg::ToCard(_) | Leg::FromCard(_), Failure::Card(f)) => {
                self.trace.push(format!("  the box is told: {f}"));
                Leg::FromCard(Err(f))
            }
            (leg, f) => panic!("fail: {f:?} cannot stand for {leg:?}"),
        };
        self.queue.push_back(InFlight { leg, ..item });
    }

    /// Loses the front item with no report at all: the box keeps waiting for it (until a
    /// [`Pair::crash`]).
    ///
    /// # Panics
    /// If nothing is in flight.
    pub fn vanish(&mut self) -> InFlight {
        self.take_front("vanished")
    }

    /// Delivers the front item twice: a copy goes right behind it.
    ///
    /// # Panics
    /// If nothing is in flight.
    pub fn duplicate(&mut self) {
        let item = self
            .queue
            .front()
            .cloned()
            .expect("duplicate: nothing in flight");
        self.trace
            .push(format!("fault: duplicated: {}", item.describe()));
        self.queue.insert(1, item);
    }

    /// Moves the front item to the back of the queue, behind everything in flight now.
    ///
    /// # Panics
    /// If nothing is in flight.
    pub fn delay(&mut self) {
        let item = self.take_front("delayed");
        self.queue.push_back(item);
    }

    /// Changes the front item in flight (a corrupted APDU, a forged answer).
    ///
    /// # Panics
    /// If nothing is in flight.
    pub fn tamper(&mut self, f: impl FnOnce(&mut Leg)) {
        let item = self.queue.front_mut().expect("tamper: nothing in flight");
        f(&mut item.leg);
        let d = item.describe();
        self.trace.push(format!("fault: tampered: {d}"));
    }

    /// Kills the box and starts it again (see the module docs): the flow and recovery's
    /// state are gone, the journal is reopened, the card is reset; card commands not yet at
    /// the reader are dropped; requests already on the wire still reach the gateway, their
    /// answers reach nobody. The restarted box then runs a recovery round, as `stbd` does
    /// at start-up.
    pub fn crash(&mut self) {
        self.trace.push("box: crash and restart".into());
        self.flow = None;
        let past = self.recovery.counts();
        self.past_counts.resolved += past.resolved;
        self.past_counts.unresolvable += past.unresolvable;
        self.past_counts.retries += past.retries;
        self.round_waits = false;
        self.epoch += 1;
        self.recovery = Round::new(recovery_seed(self.seed, self.epoch));
        let epoch = self.epoch;
        self.queue
            .retain(|i| i.epoch == epoch || matches!(i.leg, Leg::ToGateway(_)));
        // Closing the journal and opening it again: only what was committed survives.
        self.journal = BoxJournal::open(&self.journal_dir).expect("box journal reopens");
        self.card.reset();
        self.recover();
    }

    // ---- the box's shell ----

    fn deliver_to_box(&mut self, party: Party, d: Delivery) {
        match party {
            Party::Flow(n) => {
                let Some((active, flow)) = self.flow.as_mut() else {
                    self.trace.push("  no flow is waiting: dropped".into());
                    return;
                };
                if *active != n {
                    self.trace.push("  for an earlier flow: dropped".into());
                    return;
                }
                let actions: Vec<FlowAction> = match (flow, d) {
                    (Flow::Purchase(p), Delivery::Card(r)) => {
                        actions(p.handle(purchase::Input::Card(r)))
                    }
                    (Flow::Purchase(p), Delivery::Gateway(Ok(m))) => {
                        actions(p.handle(purchase::Input::Answer(m)))
                    }
                    (Flow::Purchase(p), Delivery::Gateway(Err(e))) => {
                        actions(p.handle(purchase::Input::NetworkFailed(e)))
                    }
                    (Flow::Load(l), Delivery::Card(r)) => actions(l.handle(load::Input::Card(r))),
                    (Flow::Load(l), Delivery::Gateway(Ok(m))) => {
                        actions(l.handle(load::Input::Answer(m)))
                    }
                    (Flow::Load(l), Delivery::Gateway(Err(e))) => {
                        actions(l.handle(load::Input::NetworkFailed(e)))
                    }
                };
                self.execute(actions);
            }
            Party::Recovery(txid) => match d {
                Delivery::Gateway(answer) => self.recovery_answer(txid, answer),
                Delivery::Card(_) => self.trace.push("  recovery reads the card inline".into()),
            },
        }
    }

    /// Executes a flow's actions in order, as `stbd`'s executor does.
    fn execute(&mut self, actions: Vec<FlowAction>) {
        for action in actions {
            let Some((n, flow)) = self.flow.as_ref() else {
                return;
            };
            let n = *n;
            if let Some(t) = flow_txid(flow) {
                if matches!(flow, Flow::Purchase(_)) && !self.purchases.iter().any(|p| p == t) {
                    self.purchases.push(t.to_string());
                }
            }
            match action {
                FlowAction::Purchase(Action::Journal {
                    transaction_id,
                    step,
                }) => {
                    if let Err(e) = self.journal.record(&transaction_id, &step) {
                        return self.flow_ended(Ended::NotRecorded(e.into()));
                    }
                    self.trace
                        .push(format!("  journal: {}", purchase_step(&step)));
                }
                FlowAction::Load(Action::Journal {
                    transaction_id,
                    step,
                }) => {
                    if let Err(e) = self.journal.record_load(&transaction_id, &step) {
                        return self.flow_ended(Ended::NotRecorded(e.into()));
                    }
                    self.trace.push(format!("  journal: {}", load_step(&step)));
                }
                FlowAction::Purchase(Action::Apdu(a)) | FlowAction::Load(Action::Apdu(a)) => {
                    self.queue.push_back(InFlight {
                        leg: Leg::ToCard(a),
                        party: Party::Flow(n),
                        epoch: self.epoch,
                    });
                }
                FlowAction::Purchase(Action::Send(m)) | FlowAction::Load(Action::Send(m)) => {
                    self.queue.push_back(InFlight {
                        leg: Leg::ToGateway(m),
                        party: Party::Flow(n),
                        epoch: self.epoch,
                    });
                }
                FlowAction::Purchase(Action::Show(s)) | FlowAction::Load(Action::Show(s)) => {
                    self.shows.push(s);
                }
                FlowAction::Purchase(Action::Done(o)) => {
                    return self.flow_ended(Ended::Purchase(o));
                }
                FlowAction::Load(Action::Done(o)) => return self.flow_ended(Ended::Load(o)),
            }
        }
    }

    fn flow_ended(&mut self, e: Ended) {
        self.trace.push(format!("  flow ended: {}", ended_name(&e)));
        self.flow = None;
        self.outcomes.push(e);
        if std::mem::take(&mut self.round_waits) {
            self.recover();
        }
    }

    // ---- recovery ----

    /// One recovery round (the recovery timer fired, or the box started): reads the journal
    /// and runs `stbd`'s round over it ([`Round`]): its card commands inline, its journal
    /// writes at once, its messages into the queue, for each in-doubt load, then purchase.
    /// Their answers settle them as they are delivered. A round asked for while a flow runs
    /// waits for the flow to end; one asked for while answers of the last are still out
    /// leaves the transactions those answers are for to them.
    pub fn recover(&mut self) {
        if self.flow.is_some() {
            self.trace.push("recovery: waits for the flow".into());
            self.round_waits = true;
            return;
        }
        self.trace.push("recovery: round".into());
        self.rounds += 1;
        self.journal.close_unsent().expect("box journal");
        let purchases = self.journal.in_doubt().map_err(JournalFailure::from);
        let loads = self.journal.loads_in_doubt().map_err(JournalFailure::from);
        let actions = self
            .recovery
            .start(purchases, loads, self.card_present, self.today);
        self.run_recovery(actions);
    }

    /// Executes the round's actions in order, as `stbd`'s recovery shell does: card
    /// commands inline (straight on the card, not through the queue), journal writes at
    /// once, messages to the gateway into the queue.
    fn run_recovery(&mut self, actions: Vec<round::Action>) {
        let mut todo = VecDeque::from(actions);
        while let Some(action) = todo.pop_front() {
            match action {
                round::Action::Apdu(apdu) => {
                    self.trace.push(format!(
                        "  recovery: box → card: {} (inline)",
                        apdu_name(&apdu)
                    ));
                    let reply = if self.card_present {
                        Ok(CardReply {
                            atr: self.card.atr(),
                            response: self.card.process_apdu(&apdu),
                        })
                    } else {
                        Err(CardFailure::NoCard)
                    };
                    todo.extend(self.recovery.handle(round::Input::Card(reply)));
                }
                round::Action::Journal {
                    transaction_id,
                    step,
                } => {
                    let (written, line) = match &step {
                        round::Step::Purchase(s) => (
                            self.journal.record(&transaction_id, s),
                            match s {
                                purchase::Step::DebitResponded { .. } => {
                                    "debit_responded (the card's log holds the debit)"
                                }
                                s => purchase_step(s),
                            },
                        ),
                        round::Step::Load(s) => (
                            self.journal.record_load(&transaction_id, s),
                            match s {
                                load::Step::Responded { .. } => {
                                    "load_responded (the card's log holds the load)"
                                }
                                s => load_step(s),
                            },
                        ),
                    };
                    self.trace.push(format!("  recovery journal: {line}"));
                    let result = written.map_err(JournalFailure::from);
                    todo.extend(self.recovery.handle(round::Input::Journaled(result)));
                }
                round::Action::Send {
                    transaction_id,
                    message,
                } => self.queue.push_back(InFlight {
                    leg: Leg::ToGateway(message),
                    party: Party::Recovery(transaction_id),
                    epoch: self.epoch,
                }),
                round::Action::ReleaseCard => self.card.reset(),
                round::Action::Ended(end) => {
                    for txid in &end.waiting_for_card {
                        self.trace
                            .push(format!("  recovery: {txid} waits for its card"));
                    }
                    self.trace.push(format!(
                        "  recovery: round ended (progressed: {}, retry: {})",
                        end.progressed, end.retry
                    ));
                }
            }
        }
    }

    fn recovery_answer(&mut self, txid: String, result: Result<Message, NetworkFailure>) {
        if !self.recovery.awaits(&txid) {
            self.trace
                .push("  recovery is not waiting for it: dropped".into());
            return;
        }
        // The card is free for a zero-value proof only while no flow holds it.
        let card = (self.flow.is_none() && self.card_present).then_some(self.card_id);
        let input = match result {
            Ok(message) => round::Input::Answer {
                transaction_id: txid,
                message,
                card,
            },
            Err(error) => round::Input::NetworkFailed {
                transaction_id: txid,
                error,
            },
        };
        let actions = self.recovery.handle(input);
        self.run_recovery(actions);
    }

    // ---- conservation ----

    /// The conservation figures now (see [`Ledger::assert_conserved`]). Runs nothing: call
    /// [`Pair::drive`] first.
    pub fn ledger(&mut self) -> Ledger {
        let card_now = self.card_balance();
        let he = &self.head_end;
        let (loaded, sold) = self.rt.block_on(async {
            (
                he.load.hsm_loaded(EUR).await,
                he.payment.totals().await.get(&EUR).copied().unwrap_or(0),
            )
        });
        let mut l = Ledger {
            card_start: self.card_start,
            card_now,
            loaded,
            sold,
            ..Default::default()
        };
        for funds in [&he.bank.funds, &he.load.prefunded] {
            for a in funds.accounts() {
                l.funders_debited += a.opening_balance - a.balance;
                l.held += a.held;
            }
            for h in funds.holds() {
                if h.state == HoldState::Held {
                    l.open_holds.push(h.transaction_id);
                }
            }
            l.float += funds.float().values().sum::<u64>();
        }
        for txid in &self.purchases {
            let released = he.merchant.releases(txid) == 1;
            let pay = he.payment.txn(txid);
            if released {
                let amount = he
                    .merchant
                    .offer_record(txid)
                    .map_or(0, |r| r.offer.amount.minor);
                l.released += amount;
            }
            match pay.map(|t| t.state) {
                Some(PayState::DebitIssued) => l.open_purchases.push(txid.clone()),
                Some(PayState::Completed) if !released => l.mismatched.push(txid.clone()),
                Some(PayState::Reversed) | None if released => l.mismatched.push(txid.clone()),
                _ => {}
            }
        }
        let journal = &self.journal;
        l.box_in_doubt.extend(
            journal
                .in_doubt()
                .expect("box journal")
                .into_iter()
                .map(|p| p.txn.transaction_id),
        );
        l.box_in_doubt.extend(
            journal
                .loads_in_doubt()
                .expect("box journal")
                .into_iter()
                .map(|p| p.transaction_id),
        );
        l
    }

    /// Drives the pair quiet, then checks conservation ([`Ledger::assert_conserved`]) and
    /// returns the figures.
    ///
    /// # Panics
    /// When value is not conserved or something is left open.
    pub fn assert_conserved(&mut self) -> Ledger {
        self.drive();
        let l = self.ledger();
        l.assert_conserved();
        l
    }
}

// One per step, consumed at once: boxing the message would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Delivery {
    Card(Result<CardReply, CardFailure>),
    Gateway(Result<Message, NetworkFailure>),
}

/// What the box is told instead of the answer it waits for ([`Pair::fail`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// For a card leg: what the reader saw.
    Card(CardFailure),
    /// For a gateway leg: what the transport saw.
    Network(NetworkFailure),
}

/// The request deadline a lost gateway leg reports ([`Pair::lose`]): `stbd`'s default.
pub const LOST_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// A flow's action, whichever flow.
enum FlowAction {
    Purchase(purchase::Action),
    Load(load::Action),
}

impl From<purchase::Action> for FlowAction {
    fn from(a: purchase::Action) -> Self {
        Self::Purchase(a)
    }
}

impl From<load::Action> for FlowAction {
    fn from(a: load::Action) -> Self {
        Self::Load(a)
    }
}

fn actions<A: Into<FlowAction>>(v: Vec<A>) -> Vec<FlowAction> {
    v.into_iter().map(Into::into).collect()
}

/// The recovery round's seed for the box's life `epoch` (a crash starts a new life).
fn recovery_seed(seed: u64, epoch: u64) -> u64 {
    seed ^ 0x5EC0_7E27 ^ epoch.rotate_left(32)
}

fn flow_txid(f: &Flow) -> Option<&str> {
    match f {
        Flow::Purchase(p) => p.transaction_id(),
        Flow::Load(l) => l.transaction_id(),
    }
}

fn viewer_name(v: &Viewer) -> String {
    match v {
        Viewer::Accept => "OK".into(),
        Viewer::Decline { timeout: false } => "BACK".into(),
        Viewer::Decline { timeout: true } => "the countdown ran out".into(),
        Viewer::Amount(a) => format!("amount {a}"),
        Viewer::Pin(_) => "PIN".into(),
        Viewer::CancelLoad => "BACK".into(),
    }
}

fn ended_name(e: &Ended) -> String {
    match e {
        Ended::Purchase(o) => match o {
            purchase::Outcome::Paid { receipt, .. } => {
                format!("paid (released: {})", receipt.released)
            }
            purchase::Outcome::Cancelled { reason, .. } => format!("cancelled ({reason:?})"),
            purchase::Outcome::Failed { refusal, .. } => format!("failed ({refusal:?})"),
            purchase::Outcome::InDoubt { doubt, .. } => format!("in doubt ({doubt:?})"),
        },
        Ended::Load(o) => match o {
            load::Outcome::Loaded { amount, .. } => format!("loaded {}", amount.minor),
            load::Outcome::NotLoaded { .. } => "not loaded".into(),
            load::Outcome::Cancelled { .. } => "cancelled".into(),
            load::Outcome::Failed { refusal, .. } => format!("failed ({refusal:?})"),
            load::Outcome::InDoubt { doubt, .. } => format!("in doubt ({doubt:?})"),
        },
        Ended::NotRecorded(e) => format!("not recorded ({e})"),
    }
}

fn purchase_step(s: &purchase::Step) -> &'static str {
    use purchase::Step::*;
    match s {
        OfferAccepted { .. } => "offer accepted",
        DrawSent => "draw sent",
        DebitCommandReceived { .. } => "debit command received",
        DebitSent => "debit sent",
        DebitResponded { .. } => "debit responded",
        CancelPending { .. } => "cancel pending",
        Completed { .. } => "completed",
        Ended { .. } => "ended",
        Unresolvable { .. } => "unresolvable",
    }
}

fn load_step(s: &load::Step) -> &'static str {
    use load::Step::*;
    match s {
        RequestSent { .. } => "load request sent",
        CommandReceived { .. } => "load command received",
        LoadSent => "load sent",
        Responded { .. } => "load responded",
        ZeroValue { .. } => "zero value",
        Completed { .. } => "load completed",
        Ended { .. } => "load ended",
    }
}
