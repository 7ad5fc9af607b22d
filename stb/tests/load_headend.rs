//! stbd's load against the REAL head end in process (`headend::assembly::init_demo` +
//! `start(cfg, Roles::ALL)`: gateway, bank, load server with its HSM), over real QUIC with
//! mutual TLS, on a real `VirtualCard` file behind the virtual reader driver, with a real
//! SQLite journal. The viewer's keys go in through the daemon's key channel.
//!
//! Also the purchases of a card with a PIN threshold (seed 004), through the same daemon
//! and head end.
//!
//! Every load test ends with the conservation check: what left the funding accounts = what the
//! card gained = what the issuer float gained, and no hold is left `Held`.

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use headend::assembly::{self, DemoOptions, Roles, Running};
use headend::config::HeadendConfig;
use headend::funds::HoldState;
use headend::pki::OperatorCa;
use headend::quic::BoxId;
use proto::card::CardSpec;
use proto::crypto::DesKey;
use proto::messages::{LoadSource, Message};
use proto::money::Currency;
use proto::purse::IssuerKeys;
use reader_drivers::vcard::VirtualCard;
use reader_drivers::virtual_driver::{PullAt, VirtualDriver};
use stb::config::Config;
use stb::daemon::card::CardPort;
use stb::daemon::gateway::{Gateway, client_config};
use stb::journal::Journal;
use stb_flow::load::{Action, Input, Load, Step};
use support::{Box_, start_box};
use ui::{RemoteKey, ScreenId};

const START: u64 = 1_000;

struct World {
    dir: tempfile::TempDir,
    voucher: String,
    running: Running,
    pin: String,
    card: PathBuf,
    cfg: Config,
}

async fn world() -> World {
    world_with(|_| {}).await
}

/// The demo deployment, `prepare` run on its files before the head end starts.
async fn world_with(prepare: impl FnOnce(&assembly::DemoFiles)) -> World {
    let dir = tempfile::tempdir().unwrap();
    let files = assembly::init_demo(
        dir.path(),
        &DemoOptions {
            gateway_listen: ([127, 0, 0, 1], 0).into(),
            ..Default::default()
        },
    )
    .unwrap();
    prepare(&files);
    let pin = std::fs::read_to_string(&files.pin_file)
        .unwrap()
        .trim()
        .to_string();
    let hcfg = HeadendConfig::load(&files.config).unwrap();
    let running = assembly::start(&hcfg, Roles::ALL).await.unwrap();
    let addr = running.gateway_addr.unwrap();
    let ca = OperatorCa::load(&files.ca_dir).unwrap();
    let dev = ca
        .issue_device(&BoxId::new(assembly::DEMO_BOX).unwrap())
        .unwrap()
        .save(&dir.path().join("box"), assembly::DEMO_BOX)
        .unwrap();
    let card = dir.path().join("card.plvc");
    VirtualCard::create(
        &card,
        &CardSpec::demo(0xCA4D_0001, Currency::EUR, START, 50_000),
        &headend::config::load_issuer_keys(&files.issuer_keys).unwrap(),
    )
    .unwrap();
    let text = format!(
        r#"
[reader]
kind = "virtual"
card_file = "{card}"
[headend]
address = "{addr}"
server_name = "localhost"
operator_ca = "{ca}"
device_cert = "{cert}"
device_key = "{key}"
[state]
dir = "{state}"
[ui]
enabled = false
[timeouts]
network_secs = 10
reconnect_initial_ms = 50
reconnect_max_ms = 500
[load]
bank_account = "{acc}"
voucher = "{voucher}"
pin_key = "{pin_key}"
"#,
        card = card.display(),
        ca = files.ca_dir.join("ca.crt.pem").display(),
        cert = dev.cert.display(),
        key = dev.key.display(),
        state = dir.path().join("stb-state").display(),
        acc = assembly::DEMO_ACCOUNT,
        voucher = files.voucher,
        pin_key = files
            .pin_keys_dir
            .join(format!("{}.key", assembly::DEMO_BOX))
            .display(),
    );
    let cfg = Config::parse(Path::new("load-test.toml"), &text).unwrap();
    World {
        dir,
        voucher: files.voucher.clone(),
        running,
        pin,
        card,
        cfg,
    }
}

fn balance(card: &Path) -> u64 {
    VirtualCard::open(card).unwrap().state().balance
}

impl World {
    fn journal(&self) -> Journal {
        Journal::open(&self.dir.path().join("stb-state")).unwrap()
    }

    /// Holds of a transaction, in the bank and the load server's pre-funded accounts.
    fn holds(&self, txid: &str) -> Vec<HoldState> {
        let mut out = Vec::new();
        if let Some(b) = &self.running.bank {
            out.extend(b.funds.holds());
        }
        if let Some(l) = &self.running.load {
            out.extend(l.prefunded.holds());
        }
        out.into_iter()
            .filter(|h| h.transaction_id == txid)
            .map(|h| h.state)
            .collect()
    }

    /// Conservation: accounts debited = card gained = issuer float gained; nothing held.
    fn conservation(&self) -> u64 {
        let (mut debits, mut float) = (0, 0);
        for f in [
            self.running.bank.as_ref().map(|b| &b.funds),
            self.running.load.as_ref().map(|l| &l.prefunded),
        ]
        .into_iter()
        .flatten()
        {
            for a in f.accounts() {
                debits += a.opening_balance - a.balance;
                assert_eq!(a.held, 0, "account {} still has {} held", a.id, a.held);
            }
            for h in f.holds() {
                assert_ne!(
                    h.state,
                    HoldState::Held,
                    "hold {} left dangling",
                    h.transaction_id
                );
            }
            float += f.float().values().sum::<u64>();
        }
        let gained = balance(&self.card) - START;
        assert_eq!(
            debits, gained,
            "accounts debited {debits}, card gained {gained}"
        );
        assert_eq!(
            debits, float,
            "accounts debited {debits}, float gained {float}"
        );
        gained
    }
}

async fn keys(b: &Box_, ks: &[RemoteKey]) {
    for k in ks {
        b.key(*k).await;
    }
}

fn digits(s: &str) -> Vec<RemoteKey> {
    s.chars()
        .map(|c| RemoteKey::Digit(c.to_digit(10).unwrap() as u8))
        .collect()
}

/// F2 → source → amount (→ PIN) → OK, as the viewer does it.
async fn load_by_remote(b: &mut Box_, source_key: RemoteKey, amount: &str, pin: Option<&str>) {
    b.until("card on the home screen", |s| s.card_balance.is_some())
        .await;
    b.key(RemoteKey::Green).await;
    b.until("Load from:", |s| s.screen == ScreenId::LoadSource)
        .await;
    b.key(source_key).await;
    b.until("the maximum", |s| s.screen == ScreenId::LoadAmount)
        .await;
    keys(b, &digits(amount)).await;
    b.key(RemoteKey::Ok).await;
    if let Some(p) = pin {
        b.until("the PIN entry", |s| s.screen == ScreenId::Pin)
            .await;
        keys(b, &digits(p)).await;
        b.key(RemoteKey::Ok).await;
    }
}

fn assert_nothing_in_doubt(j: &Journal) {
    let pending = j.loads_in_doubt().unwrap();
    assert!(pending.is_empty(), "loads left in doubt: {pending:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bank_load_with_the_right_pin_then_a_wrong_pin_is_refused() {
    let w = world().await;
    let mut b = start_box(w.cfg.clone(), &w.card).await;
    load_by_remote(&mut b, RemoteKey::Ok, "500", Some(&w.pin)).await;
    let s = b
        .until("the receipt", |s| {
            matches!(s.screen, ScreenId::Receipt | ScreenId::Error)
        })
        .await;
    assert_eq!(s.screen, ScreenId::Receipt, "{s:?}");
    assert_eq!(balance(&w.card), START + 500);
    b.until("new balance on the card summary", |s| {
        s.card_balance == Some((START + 500) as i64)
    })
    .await;

    // A wrong PIN: refused, nothing moves.
    b.key(RemoteKey::Ok).await; // receipt → home
    let wrong = if w.pin == "0000" { "1111" } else { "0000" };
    load_by_remote(&mut b, RemoteKey::Ok, "300", Some(wrong)).await;
    b.until("the error", |s| s.screen == ScreenId::Error).await;
    assert_eq!(balance(&w.card), START + 500);
    b.stop().await;

    let j = w.journal();
    assert_nothing_in_doubt(&j);
    assert_eq!(w.conservation(), 500);
    let bank = w.running.bank.as_ref().unwrap();
    let acc = bank
        .funds
        .accounts()
        .into_iter()
        .find(|a| a.id == assembly::DEMO_ACCOUNT)
        .unwrap();
    assert_eq!(acc.opening_balance - acc.balance, 500);
    assert_eq!(acc.wrong_pins, 1, "the bank counted the wrong PIN");
    let holds = bank.funds.holds();
    assert_eq!(holds.len(), 1, "the wrong PIN placed no hold: {holds:?}");
    assert_eq!(holds[0].state, HoldState::Captured);
    let txid = holds[0].transaction_id.clone();
    assert_eq!(
        j.load_state(&txid).unwrap().as_deref(),
        Some("load_completed")
    );
    assert_eq!(
        j.steps(&txid).unwrap(),
        [
            "load_request_sent",
            "load_command",
            "load_sent",
            "load_responded",
            "load_completed"
        ]
    );
    // The PIN is nowhere in the journal file.
    let raw = std::fs::read(w.dir.path().join("stb-state/journal.sqlite")).unwrap();
    assert!(!raw.windows(w.pin.len()).any(|x| x == w.pin.as_bytes()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voucher_load_needs_no_pin() {
    let w = world().await;
    let mut b = start_box(w.cfg.clone(), &w.card).await;
    load_by_remote(&mut b, RemoteKey::Digit(2), "700", None).await;
    let s = b
        .until("the receipt", |s| {
            matches!(s.screen, ScreenId::Receipt | ScreenId::Error)
        })
        .await;
    assert_eq!(s.screen, ScreenId::Receipt, "{s:?}");
    b.stop().await;
    assert_eq!(balance(&w.card), START + 700);
    assert_eq!(w.conservation(), 700);
    let l = w.running.load.as_ref().unwrap();
    let v = l
        .prefunded
        .accounts()
        .into_iter()
        .find(|a| a.id == proto::messages::voucher_ref(&w.voucher))
        .unwrap();
    assert_eq!(v.opening_balance - v.balance, 700);
}

/// Issue 17: an unload by the remote, through the real daemon, head end and card — a bank
/// load first (the issuer float at the bank holds what an unload pays out), then "Unload to
/// bank account" (key 3), an amount, the PIN: the card gives the value up, the bank credits
/// the account only on the card's S3, the TV shows "Value unloaded", and the value is
/// conserved: the account is back by the unload, the float by it less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unload_by_the_remote_credits_the_bank_account() {
    let w = world().await;
    let mut b = start_box(w.cfg.clone(), &w.card).await;
    load_by_remote(&mut b, RemoteKey::Ok, "800", Some(&w.pin)).await;
    b.until("the load's receipt", |s| s.screen == ScreenId::Receipt)
        .await;
    b.key(RemoteKey::Ok).await;
    let bank = w.running.bank.as_ref().unwrap();
    let account = |id: &str| {
        bank.funds
            .accounts()
            .into_iter()
            .find(|a| a.id == id)
            .unwrap()
            .balance
    };
    let before = account(assembly::DEMO_ACCOUNT);
    load_by_remote(&mut b, RemoteKey::Digit(3), "300", Some(&w.pin)).await;
    let s = b
        .until("the unload's receipt", |s| {
            matches!(s.screen, ScreenId::Receipt | ScreenId::Error)
        })
        .await;
    assert_eq!(s.screen, ScreenId::Receipt, "{s:?}");
    b.stop().await;
    assert_eq!(
        balance(&w.card),
        START + 800 - 300,
        "unloaded from the card"
    );
    assert_eq!(account(assembly::DEMO_ACCOUNT), before + 300, "credited");
    assert_eq!(bank.funds.float().values().sum::<u64>(), 800 - 300);
    let unload = bank
        .funds
        .holds()
        .into_iter()
        .find(|h| h.unload)
        .expect("the unload's hold");
    assert_eq!(unload.state, HoldState::Captured);
    let j = w.journal();
    assert_nothing_in_doubt(&j);
    assert_eq!(
        j.load_state(&unload.transaction_id).unwrap().as_deref(),
        Some("load_completed")
    );
}

/// Where the simulated kill falls.
#[derive(Clone, Copy, Debug)]
enum KillAt {
    /// After LOAD and the journaled S3, before the load response went out.
    AfterS3Journaled,
    /// After LOAD ran on the card, before its S3 was journaled (only the card log has it).
    BeforeS3Journaled,
    /// After the load request went out, before the load command came back.
    BeforeLoadCommand,
}

/// Runs the real load flow on the real card, journal and gateway up to `at`, then drops
/// everything, as SIGKILL would. Returns the transaction id.
async fn load_until_killed(w: &World, at: KillAt) -> String {
    let mut journal = w.journal();
    let driver = VirtualDriver::with_card("virtual", VirtualCard::open(&w.card).unwrap());
    let mut port = CardPort::new(Arc::new(driver), "virtual".into(), Duration::from_secs(5));
    port.card_inserted("virtual");
    let s = stb::daemon::gateway_settings(&w.cfg);
    let gw = Gateway::new(
        client_config(
            &w.cfg.headend.operator_ca,
            &w.cfg.headend.device_cert,
            &w.cfg.headend.device_key,
            &s,
        )
        .unwrap(),
        s,
    )
    .unwrap();
    let source = LoadSource::Voucher {
        code: w.voucher.clone().into(),
    };
    let (mut l, actions) = Load::start(source, None, 9);
    let mut queue: std::collections::VecDeque<Action> = actions.into();
    while let Some(a) = queue.pop_front() {
        match a {
            Action::Journal {
                transaction_id,
                step,
            } => {
                if matches!(
                    (at, &step),
                    (KillAt::BeforeS3Journaled, Step::Responded { .. })
                ) {
                    return transaction_id;
                }
                journal.record_load(&transaction_id, &step).unwrap();
            }
            Action::Apdu(apdu) => {
                let r = port.transmit(&apdu).await;
                queue.extend(l.handle(Input::Card(r)));
            }
            Action::Send(m) => {
                let txid = l.transaction_id().unwrap_or_default().to_string();
                match (at, &m) {
                    (KillAt::AfterS3Journaled, Message::LoadResponse(_)) => return txid,
                    (KillAt::BeforeLoadCommand, Message::LoadRequest(_)) => {
                        // It reaches the head end; the answer is lost with the box.
                        let answer = gw.call(&m).await.unwrap();
                        assert!(matches!(answer, Message::LoadCommand(_)), "{answer:?}");
                        return txid;
                    }
                    _ => {}
                }
                let answer = gw.call(&m).await.unwrap();
                queue.extend(l.handle(Input::Answer(answer)));
            }
            Action::Show(stb_flow::show::Show::LoadMax(_)) => {
                queue.extend(l.handle(Input::Amount(400)))
            }
            Action::Show(_) => {}
            Action::Done(o) => panic!("the load ended before the kill: {o:?}"),
        }
    }
    panic!("the flow stopped without a request")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_between_load_and_confirmation_is_resolved_exactly_once_on_restart() {
    for (at, loaded) in [
        (KillAt::AfterS3Journaled, true),
        (KillAt::BeforeS3Journaled, true),
        (KillAt::BeforeLoadCommand, false),
    ] {
        let w = world().await;
        let txid = load_until_killed(&w, at).await;
        assert_eq!(
            balance(&w.card),
            if loaded { START + 400 } else { START },
            "{at:?}"
        );
        assert_eq!(w.holds(&txid), [HoldState::Held], "{at:?}: the hold waits");

        // Restart: the daemon on the same journal and card file settles it by itself.
        let mut b = start_box(w.cfg.clone(), &w.card).await;
        b.until("the in-doubt load resolved", |s| s.recovered >= 1)
            .await;
        b.stop().await;
        let expect = if loaded {
            HoldState::Captured
        } else {
            HoldState::Released
        };
        assert_eq!(w.holds(&txid), [expect], "{at:?}");
        assert_eq!(
            w.journal().load_state(&txid).unwrap().as_deref(),
            Some("load_completed"),
            "{at:?}"
        );

        // A second restart finds nothing to do: resolved exactly once.
        let mut b = start_box(w.cfg.clone(), &w.card).await;
        b.until("card", |s| s.card_balance.is_some()).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(b.status.borrow().recovered, 0, "{at:?}");
        b.stop().await;
        assert_eq!(
            balance(&w.card),
            if loaded { START + 400 } else { START },
            "{at:?}: loaded at most once"
        );
        assert_eq!(w.holds(&txid), [expect]);
        assert_eq!(w.conservation(), if loaded { 400 } else { 0 }, "{at:?}");
    }
}

/// The issuer on key version 2 (version 1 retired for purchases, still loadable), the load
/// server re-keying version-1 cards with each load (`rekey_purchase_keys`, 001 [0044]).
/// The card is personalised on version 1.
fn rekeyed(files: &assembly::DemoFiles) {
    let v1 = headend::config::load_issuer_keys(&files.issuer_keys).unwrap();
    let v2 = IssuerKeys {
        key_version: 2,
        purchase_master: DesKey::new([0x5C; 16]),
        load_master: DesKey::new([0x6D; 16]),
    };
    for (file, a, b, retire) in [
        ("load-keys.toml", &v1.load_master, &v2.load_master, false),
        (
            "purchase-keys.toml",
            &v1.purchase_master,
            &v2.purchase_master,
            true,
        ),
    ] {
        let text = format!(
            "[[keys]]\nkey_version = 1\nmaster = \"{}\"\nretired = {retire}\n\n[[keys]]\nkey_version = 2\nmaster = \"{}\"\n",
            hex::encode_upper(a.bytes()),
            hex::encode_upper(b.bytes()),
        );
        proto::secret::write_private(&files.keys_dir.join(file), text.as_bytes()).unwrap();
    }
    let config = std::fs::read_to_string(&files.config).unwrap();
    let line = config
        .lines()
        .find(|l| l.starts_with("load_keys = "))
        .expect("the demo's [load] load_keys")
        .to_string();
    let rekey = line
        .replace("load_keys", "rekey_purchase_keys")
        .replace("load-keys", "purchase-keys");
    let config = config.replace(&line, &format!("{line}\n{rekey}"));
    proto::secret::write_private(&files.config, config.as_bytes()).unwrap();
}

fn key_version(card: &Path) -> u8 {
    VirtualCard::open(card).unwrap().state().key_version
}

/// 001 [0044] with the card pulled mid-LOAD, through the daemon: the LOAD that would credit
/// and re-key the card is interrupted by a pull before the card runs it, or after it ran
/// (its answer lost). Either way the card is left usable under one key version — version 1
/// and not credited, or version 2 and credited — the box settles the load with the head end
/// when the card is back (no value lost or made), and the next load works (and re-keys, if
/// it had not).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_card_pulled_mid_re_keying_load_is_left_usable_under_one_version() {
    for at in [PullAt::Before, PullAt::After] {
        let w = world_with(rekeyed).await;
        assert_eq!(key_version(&w.card), 1);
        let mut b = start_box(w.cfg.clone(), &w.card).await;
        b.driver.pull_during(proto::card::INS_LOAD, at);
        load_by_remote(&mut b, RemoteKey::Ok, "400", Some(&w.pin)).await;
        b.until("the card pulled", |s| s.card_balance.is_none())
            .await;
        let credited = at == PullAt::After;
        assert_eq!(
            (balance(&w.card), key_version(&w.card)),
            if credited {
                (START + 400, 2)
            } else {
                (START, 1)
            },
            "{at:?}: all of the LOAD or none of it"
        );
        // The card goes back in: the box settles the load from the card's log.
        b.driver.insert(VirtualCard::open(&w.card).unwrap());
        b.until("the in-doubt load resolved", |s| s.recovered >= 1)
            .await;
        assert_nothing_in_doubt(&w.journal());
        assert_eq!(w.conservation(), if credited { 400 } else { 0 }, "{at:?}");
        // Usable: the next load verifies under the card's version, and leaves it on 2.
        if b.status.borrow().screen != ScreenId::Home {
            b.key(RemoteKey::Ok).await; // the pull's message → home
        }
        b.until("home", |s| s.screen == ScreenId::Home).await;
        load_by_remote(&mut b, RemoteKey::Ok, "100", Some(&w.pin)).await;
        let s = b
            .until("the receipt", |s| {
                matches!(s.screen, ScreenId::Receipt | ScreenId::Error)
            })
            .await;
        assert_eq!(s.screen, ScreenId::Receipt, "{at:?}: {s:?}");
        b.stop().await;
        let gained = if credited { 500 } else { 100 };
        assert_eq!(
            (balance(&w.card), key_version(&w.card)),
            (START + gained, 2),
            "{at:?}"
        );
        assert_eq!(w.conservation(), gained, "{at:?}");
    }
}

/// Asks the daemon to buy `item` of the demo's CABLE merchant, as a local app does.
async fn pay(b: &Box_, item: &str) -> tokio::sync::oneshot::Receiver<stb_flow::purchase::Outcome> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    b.events
        .send(stb::daemon::event::Event::Pay {
            merchant_id: "CABLE".into(),
            item_id: item.into(),
            reply: tx,
        })
        .await
        .unwrap();
    rx
}

/// Seed 004's PIN threshold through the daemon, its TV model and the real head end: the
/// card (PIN 4711, threshold 5.00) buys the 4.99 event on OK alone; the 29.95 knife set
/// makes the TV ask for the PIN; three wrong PINs block PIN purchases, not the 4.99 one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn above_the_card_s_pin_threshold_the_tv_asks_for_the_pin() {
    use stb_flow::purchase::Outcome;
    use stb_flow::show::Refusal;
    let w = world().await;
    std::fs::remove_file(&w.card).unwrap();
    let issuer = headend::config::load_issuer_keys(&w.dir.path().join("issuer-keys.toml")).unwrap();
    let state = proto::card::CardState::personalise(
        &CardSpec::demo(0xCA4D_0001, Currency::EUR, 10_000, 50_000),
        &issuer,
    )
    .with_pin("4711", 500)
    .unwrap();
    VirtualCard::create_with(&w.card, state).unwrap();
    let mut b = start_box(w.cfg.clone(), &w.card).await;
    b.until("card on the home screen", |s| {
        s.card_balance == Some(10_000)
    })
    .await;

    // 4.99: OK alone.
    let rx = pay(&b, "ppv-1001").await;
    b.until("the offer", |s| s.offer.is_some()).await;
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(balance(&w.card), 10_000 - 499);
    b.until("the receipt", |s| s.screen == ScreenId::Receipt)
        .await;
    b.key(RemoteKey::Ok).await;

    // 29.95: the TV asks for the PIN.
    let rx = pay(&b, "shop-2001").await;
    b.until("the offer", |s| s.offer.is_some()).await;
    b.key(RemoteKey::Ok).await;
    b.until("the PIN entry", |s| s.screen == ScreenId::Pin)
        .await;
    keys(&b, &digits("4711")).await;
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    assert_eq!(balance(&w.card), 10_000 - 499 - 2_995);
    b.until("the receipt", |s| s.screen == ScreenId::Receipt)
        .await;
    b.key(RemoteKey::Ok).await;

    // Three wrong PINs: each refused before the draw, the last one blocks.
    for want in [
        Refusal::WrongPin { tries_left: 2 },
        Refusal::WrongPin { tries_left: 1 },
        Refusal::PinBlocked,
    ] {
        let rx = pay(&b, "shop-2001").await;
        b.until("the offer", |s| s.offer.is_some()).await;
        b.key(RemoteKey::Ok).await;
        b.until("the PIN entry", |s| s.screen == ScreenId::Pin)
            .await;
        keys(&b, &digits("0000")).await;
        b.key(RemoteKey::Ok).await;
        let out = rx.await.unwrap();
        assert!(
            matches!(&out, Outcome::Failed { refusal, .. } if *refusal == want),
            "{out:?}"
        );
        b.until("the error", |s| s.screen == ScreenId::Error).await;
        b.key(RemoteKey::Ok).await;
    }
    // Blocked: the OK is refused at once, without a PIN entry.
    let rx = pay(&b, "shop-2001").await;
    b.until("the offer", |s| s.offer.is_some()).await;
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(
        matches!(
            &out,
            Outcome::Failed {
                refusal: Refusal::PinBlocked,
                ..
            }
        ),
        "{out:?}"
    );
    b.until("the error", |s| s.screen == ScreenId::Error).await;
    b.key(RemoteKey::Ok).await;
    // Under the threshold it still buys.
    let rx = pay(&b, "ppv-1001").await;
    b.until("the offer", |s| s.offer.is_some()).await;
    b.key(RemoteKey::Ok).await;
    let out = rx.await.unwrap();
    assert!(matches!(out, Outcome::Paid { .. }), "{out:?}");
    b.stop().await;
    assert_eq!(balance(&w.card), 10_000 - 499 - 2_995 - 499);
    // The head end counted exactly the three purchases the card paid.
    let payment = w.running.payment.as_ref().unwrap();
    let sold: u64 = payment.totals().await.values().sum();
    assert_eq!(sold, 499 + 2_995 + 499);
}
