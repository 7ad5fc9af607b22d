//! ui-demo: the TV UI with canned data and a pretend daemon, for trying it out in a terminal
//! or in tmux. Every intent the UI emits is appended to a log file, one per line (`Debug`
//! form; PINs show as `Pin(n digits)`).
//!
//! Usage: ui-demo [--log PATH] [--offer-timeout SECS] [--tick-ms MS] [--keymap TOML]
//!
//! `--tick-ms` is how long one UI "second" lasts, so tests can run the countdown fast.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::time::Duration;
use ui::model::*;
use ui::{App, AppConfig, Currency, Intent, Keymap, Money, UiEvent, UiUpdate, terminal};

struct Args {
    log: String,
    offer_timeout: u32,
    tick_ms: u64,
    keymap: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        log: "ui-demo-intents.log".into(),
        offer_timeout: 30,
        tick_ms: 1000,
        keymap: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut val = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--log" => a.log = val()?,
            "--offer-timeout" => a.offer_timeout = val()?.parse().map_err(|e| format!("{e}"))?,
            "--tick-ms" => a.tick_ms = val()?.parse().map_err(|e| format!("{e}"))?,
            "--keymap" => a.keymap = Some(val()?),
            "-h" | "--help" => {
                return Err(
                    "usage: ui-demo [--log PATH] [--offer-timeout SECS] [--tick-ms MS] [--keymap TOML]"
                        .into(),
                );
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

const EUR: Currency = Currency::EUR;
const TODAY: Date = Date::new(2025, 6, 14);

fn item(id: &str, title: &str, detail: &str, minor: i64) -> CatalogItem {
    CatalogItem {
        id: CatalogId(id.into()),
        title: title.into(),
        price: Money::new(minor, EUR),
        detail: detail.into(),
    }
}

fn catalog() -> Catalog {
    Catalog {
        pay_per_view: vec![
            item("ppv-1", "Cup Final: Nord vs Sued", "Sat 20:30", 1250),
            item("ppv-2", "Metropolis (restored)", "Tonight 22:15", 499),
            item("ppv-3", "Live at the Harbour", "Sun 21:00", 990),
        ],
        shopping: vec![
            item(
                "shop-1",
                "Spare remote control",
                "delivered in 2 days",
                1995,
            ),
            item("shop-2", "HDMI cable 2 m", "delivered in 2 days", 750),
        ],
    }
}

/// The pretend daemon: answers intents with scripted updates, one per tick, so the progress
/// steps are visible.
struct Sim {
    balance: i64,
    max_balance: i64,
    offer_timeout: u32,
    tx: u32,
    pending_offer: Option<(TxId, CatalogItem)>,
    pending_load: i64,
    history: Vec<HistoryEntry>,
    queue: VecDeque<UiUpdate>,
    privacy: bool,
}

impl Sim {
    fn card(&self) -> CardSummary {
        CardSummary {
            provider: "Kabel Nord".into(),
            balance: Money::new(self.balance, EUR),
            expiry: Date::new(2027, 12, 31),
            status: CardStatus::Active,
            points: 0,
            bad_keys: (0, 10),
            privacy: self.privacy,
        }
    }

    fn next_tx(&mut self) -> TxId {
        self.tx += 1;
        TxId(format!("tx-{:04}", self.tx))
    }

    fn on_intent(&mut self, intent: &Intent) -> Vec<UiUpdate> {
        let mut now = Vec::new();
        match intent {
            Intent::ShowCatalog => now.push(UiUpdate::CatalogLoaded(catalog())),
            Intent::SelectCatalogItem(id) => {
                let c = catalog();
                let found = c
                    .pay_per_view
                    .iter()
                    .chain(&c.shopping)
                    .find(|i| i.id == *id);
                self.queue
                    .push_back(UiUpdate::Progress(ProgressStep::ReadingCard));
                match found {
                    Some(i) if i.price.minor > self.balance => {
                        self.queue.push_back(UiUpdate::Error(UiError {
                            kind: ErrorKind::InsufficientValue,
                            detail: None,
                        }))
                    }
                    Some(i) => {
                        let txid = self.next_tx();
                        self.queue.push_back(UiUpdate::Offer(Offer {
                            txid: txid.clone(),
                            item: i.title.clone(),
                            merchant: "Kabel Nord PPV".into(),
                            price: i.price,
                            balance: Money::new(self.balance, EUR),
                            balance_after: Money::new(self.balance - i.price.minor, EUR),
                            timeout_secs: self.offer_timeout,
                        }));
                        self.pending_offer = Some((txid, i.clone()));
                    }
                    None => self.queue.push_back(UiUpdate::Error(UiError {
                        kind: ErrorKind::Other,
                        detail: Some(format!("unknown item {}", id.0)),
                    })),
                }
            }
            Intent::AcceptOffer(txid) => {
                if let Some((tx, item)) = self.pending_offer.take().filter(|(t, _)| t == txid) {
                    self.balance -= item.price.minor;
                    self.history.insert(
                        0,
                        HistoryEntry {
                            date: TODAY,
                            kind: TxKind::Purchase,
                            amount: item.price,
                            balance_after: Money::new(self.balance, EUR),
                        },
                    );
                    for s in [
                        ProgressStep::ContactingServer,
                        ProgressStep::DebitingCard,
                        ProgressStep::Confirming,
                    ] {
                        self.queue.push_back(UiUpdate::Progress(s));
                    }
                    self.queue.push_back(UiUpdate::Receipt(Receipt {
                        txid: tx,
                        kind: TxKind::Purchase,
                        item: item.title,
                        merchant: "Kabel Nord PPV".into(),
                        amount: item.price,
                        balance_after: Money::new(self.balance, EUR),
                        date: TODAY,
                    }));
                    self.queue.push_back(UiUpdate::CardInserted(self.card()));
                }
            }
            Intent::CancelOffer { .. } => self.pending_offer = None,
            Intent::SetPrivacy { on } => {
                self.privacy = *on;
                self.queue.push_back(UiUpdate::PrivacyChanged(*on));
            }
            Intent::StartLoad { .. } => self.queue.push_back(UiUpdate::LoadMax(Money::new(
                (self.max_balance - self.balance).clamp(0, 10_000),
                EUR,
            ))),
            Intent::SubmitLoadAmount(m) => {
                self.pending_load = *m;
                self.queue.push_back(UiUpdate::PinRequest(PinRequest {
                    min_len: 4,
                    max_len: 6,
                    attempts_left: Some(3),
                }));
            }
            Intent::SubmitPin(_) => {
                let amount = std::mem::take(&mut self.pending_load);
                self.balance += amount;
                let txid = self.next_tx();
                self.history.insert(
                    0,
                    HistoryEntry {
                        date: TODAY,
                        kind: TxKind::Load,
                        amount: Money::new(amount, EUR),
                        balance_after: Money::new(self.balance, EUR),
                    },
                );
                for s in [
                    ProgressStep::ReadingCard,
                    ProgressStep::ContactingServer,
                    ProgressStep::LoadingCard,
                    ProgressStep::Confirming,
                ] {
                    self.queue.push_back(UiUpdate::Progress(s));
                }
                self.queue.push_back(UiUpdate::Receipt(Receipt {
                    txid,
                    kind: TxKind::Load,
                    item: "Bank account".into(),
                    merchant: "Sparkasse Demo".into(),
                    amount: Money::new(amount, EUR),
                    balance_after: Money::new(self.balance, EUR),
                    date: TODAY,
                }));
                self.queue.push_back(UiUpdate::CardInserted(self.card()));
            }
            Intent::CancelLoad | Intent::CancelPin => self.pending_load = 0,
            // Card to card, canned: the demo's "other card" is always there.
            Intent::StartReceive => self.queue.push_back(UiUpdate::ReceiveMax(Money::new(
                (self.max_balance - self.balance).clamp(0, 10_000),
                EUR,
            ))),
            Intent::ReceiveAmount(m) => {
                self.queue.push_back(UiUpdate::TransferCode {
                    code: "48213907".into(),
                    amount: Money::new(*m, EUR),
                });
            }
            Intent::JoinTransfer(_) => {
                self.queue
                    .push_back(UiUpdate::TransferTerms(ui::model::TransferTerms {
                        amount: Money::new(500, EUR),
                        to_card: "700002".into(),
                    }))
            }
            Intent::ConfirmTransfer => {
                self.balance -= 500;
                let txid = self.next_tx();
                self.queue
                    .push_back(UiUpdate::Progress(ProgressStep::DebitingCard));
                self.queue.push_back(UiUpdate::Receipt(Receipt {
                    txid,
                    kind: TxKind::TransferOut,
                    item: ui::strings::transfer_party(true, "700002"),
                    merchant: String::new(),
                    amount: Money::new(500, EUR),
                    balance_after: Money::new(self.balance, EUR),
                    date: TODAY,
                }));
                self.queue.push_back(UiUpdate::CardInserted(self.card()));
            }
            Intent::CancelTransfer => {}
            Intent::ShowHistory => now.push(UiUpdate::History(self.history.clone())),
            Intent::Quit | Intent::HighlightCatalogItem(_) => {}
        }
        now
    }
}

fn canned_history() -> Vec<HistoryEntry> {
    let e = |m, d, kind, amount, after| HistoryEntry {
        date: Date::new(2025, m, d),
        kind,
        amount: Money::new(amount, EUR),
        balance_after: Money::new(after, EUR),
    };
    vec![
        e(6, 10, TxKind::Purchase, 499, 5000),
        e(6, 7, TxKind::Purchase, 1250, 5499),
        e(6, 1, TxKind::Load, 5000, 6749),
        e(5, 28, TxKind::Purchase, 990, 1749),
        e(5, 20, TxKind::Purchase, 750, 2739),
        e(5, 12, TxKind::Purchase, 1995, 3489),
    ]
}

fn log_line(log: &mut File, line: &str) {
    // A demo: a failed log write is reported on stderr after exit, not fatal.
    if let Err(e) = writeln!(log, "{line}").and_then(|_| log.flush()) {
        eprintln!("ui-demo: log write failed: {e}");
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let keymap = match &args.keymap {
        Some(path) => match std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|t| Keymap::from_toml_str(&t).map_err(|e| e.to_string()))
        {
            Ok(k) => k,
            Err(e) => {
                eprintln!("ui-demo: keymap {path}: {e}");
                std::process::exit(2);
            }
        },
        None => Keymap::default(),
    };
    let mut log = match OpenOptions::new().create(true).append(true).open(&args.log) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ui-demo: cannot open log {}: {e}", args.log);
            std::process::exit(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ui-demo: runtime: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = rt.block_on(run(args, keymap, &mut log)) {
        eprintln!("ui-demo: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args, keymap: Keymap, log: &mut File) -> std::io::Result<()> {
    let mut sim = Sim {
        balance: 5000,
        max_balance: 15_000,
        offer_timeout: args.offer_timeout,
        tx: 0,
        pending_offer: None,
        pending_load: 0,
        history: canned_history(),
        queue: VecDeque::new(),
        privacy: false,
    };
    let mut app = App::new(AppConfig {
        offer_timeout_secs: args.offer_timeout,
    });
    let mut pending: VecDeque<UiEvent> = VecDeque::from([
        UiEvent::Update(UiUpdate::Reader(ReaderState::Ready {
            name: "Virtual reader 0".into(),
        })),
        UiEvent::Update(UiUpdate::CardInserted(sim.card())),
        UiEvent::Update(UiUpdate::CatalogLoaded(catalog())),
    ]);

    let mut tui = terminal::Tui::enter()?;
    let mut keys = terminal::spawn_key_reader(keymap);
    let mut tick = tokio::time::interval(Duration::from_millis(args.tick_ms.max(10)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    log_line(log, "ui-demo started");

    loop {
        while let Some(ev) = pending.pop_front() {
            for intent in app.handle(ev) {
                log_line(log, &format!("intent: {intent:?}"));
                if intent == Intent::Quit {
                    drop(tui);
                    return Ok(());
                }
                pending.extend(sim.on_intent(&intent).into_iter().map(UiEvent::Update));
            }
        }
        tui.draw(&app)?;
        tokio::select! {
            k = keys.recv() => match k {
                Some(ev) => pending.push_back(ev),
                None => return Ok(()), // terminal gone
            },
            _ = tick.tick() => {
                pending.push_back(UiEvent::Tick);
                if let Some(u) = sim.queue.pop_front() {
                    pending.push_back(UiEvent::Update(u));
                }
            }
        }
    }
}
