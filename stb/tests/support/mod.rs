//! Test support: a dev PKI (rcgen), a `FakeHeadEnd` — an in-process QUIC gateway with mutual
//! TLS that answers like the real head end would, with a real `SecurityCard` signing the
//! debit commands so the virtual card really debits — and a daemon started in-process on a
//! real `VirtualCard` file behind the virtual reader driver.
//!
//! The fake is a FAKE: it answers the box's messages in the shapes the head end uses (and
//! the error codes of issue 11: `Busy`, `ProofRejected`, `AlreadyCompleted`) as [`Quirks`]
//! say, which tests change while the box runs; it keeps per-transaction counts (messages
//! received, debit responses accepted, releases, cancels, connections) so tests can check
//! "exactly once" and "no reconnect". It verifies no proof and keeps no journal. Tests
//! against the real head end are in `load_headend.rs` and `tests/tests/`.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::card::CardSpec;
use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::{Date, Expiry, IssuerKeys};
use proto::security_card::{DrawData, SecurityCard};
use quinn::crypto::rustls::QuicServerConfig;
use rand::SeedableRng;
use reader_drivers::vcard::VirtualCard;
use reader_drivers::virtual_driver::VirtualDriver;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use stb::config::Config;
use stb::daemon::event::{Event, Status};
use stb::daemon::{Handles, Io};
use tokio::sync::{mpsc, watch};

pub const PRICE: u64 = 250;

pub fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x31; 16]),
        load_master: DesKey::new([0x32; 16]),
    }
}

pub struct Pki {
    pub ca_pem: PathBuf,
    pub dev_cert: PathBuf,
    pub dev_key: PathBuf,
    pub server_chain: Vec<CertificateDer<'static>>,
    pub server_key: Vec<u8>,
    pub ca_der: CertificateDer<'static>,
}

pub fn pki(dir: &Path) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut p = CertificateParams::new(vec![]).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = p.self_signed(&ca_key).unwrap();
    let skey = KeyPair::generate().unwrap();
    let mut sp = CertificateParams::new(vec!["gateway.test".to_string()]).unwrap();
    // The gateway's role, which the box requires of the server (`[headend] server_role`).
    sp.subject_alt_names.push(rcgen::SanType::URI(
        format!("{}gateway", transport::ROLE_URI_PREFIX)
            .try_into()
            .unwrap(),
    ));
    sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let scert = sp.signed_by(&skey, &ca, &ca_key).unwrap();
    let dkey = KeyPair::generate().unwrap();
    let mut dp = CertificateParams::new(vec!["box-1.boxes.test".to_string()]).unwrap();
    dp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let dcert = dp.signed_by(&dkey, &ca, &ca_key).unwrap();
    let w = |name: &str, s: String| {
        let p = dir.join(name);
        // Key files must be owner-only (stbd refuses others); certificates may be too.
        proto::secret::write_private(&p, s.as_bytes()).unwrap();
        p
    };
    Pki {
        ca_pem: w("ca.pem", ca.pem()),
        dev_cert: w("box.pem", dcert.pem()),
        dev_key: w("box.key.pem", dkey.serialize_pem()),
        server_chain: vec![scert.der().clone()],
        server_key: skey.serialize_der(),
        ca_der: ca.der().clone(),
    }
}

/// How the fake misbehaves, per test (changeable while the box runs: [`FakeHeadEnd::set`]).
#[derive(Default, Clone)]
pub struct Quirks {
    /// The debit command asks for this much more than the offer.
    pub inflate: u64,
    /// Swallow the answer to the first debit response (the box sees a lost confirmation).
    pub lose_first_receipt: bool,
    /// Never answer draw requests (the box times out after the draw).
    pub hang_draws: bool,
    /// Never answer debit responses (nothing is recorded: the box is killed before it hears).
    pub hang_debit_responses: bool,
    /// Answer `Busy` to debit responses, cancels and load responses (nothing happens).
    pub busy: bool,
    /// Answer cancels with `ProofRejected` (nothing reversed).
    pub reject_proofs: bool,
    /// Answer cancels with `AlreadyCompleted`.
    pub already_completed: bool,
    /// Hold each answer to a debit response, cancel or load response this long.
    pub answer_delay: Duration,
}

#[derive(Default)]
pub struct Books {
    pub offers: HashMap<String, Offer>,
    pub security_card_txn: HashMap<String, u32>,
    pub debit_responses: HashMap<String, u32>,
    pub released: HashMap<String, u32>,
    pub cancels: Vec<CancelMsg>,
    pub catalog_requests: u32,
    /// Debit responses, cancels and load responses received per transaction (busy or not).
    pub received: HashMap<String, u32>,
    /// Answers `Busy` given.
    pub busy_answers: u32,
    /// Load responses received per transaction.
    pub load_responses: HashMap<String, u32>,
    /// Connections accepted.
    pub connections: u32,
    /// Settling messages received and not answered yet (held by `answer_delay`).
    pub holding: u32,
    next: u32,
}

pub struct FakeHeadEnd {
    pub addr: SocketAddr,
    pub books: Arc<Mutex<Books>>,
    pub security_card: Arc<Mutex<SecurityCard>>,
    pub quirks: Arc<Mutex<Quirks>>,
    endpoint: quinn::Endpoint,
    stop: watch::Sender<bool>,
}

impl FakeHeadEnd {
    pub async fn start(pki: &Pki, quirks: Quirks) -> Self {
        Self::start_on(pki, quirks, "127.0.0.1:0".parse().unwrap()).await
    }

    /// A fake on `addr` (e.g. the port of one that was killed: a restarted head end that
    /// knows nothing of the old connections).
    pub async fn start_on(pki: &Pki, quirks: Quirks, addr: SocketAddr) -> Self {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        roots.add(pki.ca_der.clone()).unwrap();
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                pki.server_chain.clone(),
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.server_key.clone())),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"purselink/1".to_vec()];
        let cfg =
            quinn::ServerConfig::with_crypto(Arc::new(QuicServerConfig::try_from(tls).unwrap()));
        // A killed fake's socket may take a moment to let go of the port.
        let mut tries = 0;
        let endpoint = loop {
            match quinn::Endpoint::server(cfg.clone(), addr) {
                Ok(e) => break e,
                Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tries < 100 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(e) => panic!("fake head end on {addr}: {e}"),
            }
        };
        let addr = endpoint.local_addr().unwrap();
        let books = Arc::new(Mutex::new(Books::default()));
        let security_card = Arc::new(Mutex::new(SecurityCard::new(77, issuer().purchase())));
        let (stop, mut stop_rx) = watch::channel(false);
        let (b, ps) = (books.clone(), security_card.clone());
        let quirks = Arc::new(Mutex::new(quirks));
        let (ep, qs) = (endpoint.clone(), quirks.clone());
        tokio::spawn(async move {
            loop {
                let inc = tokio::select! {
                    i = ep.accept() => match i { Some(i) => i, None => break },
                    _ = stop_rx.changed() => break,
                };
                let (b, ps, q) = (b.clone(), ps.clone(), qs.clone());
                tokio::spawn(async move {
                    let Ok(conn) = inc.await else { return };
                    b.lock().unwrap().connections += 1;
                    while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                        let (b, ps, q) = (b.clone(), ps.clone(), q.clone());
                        tokio::spawn(async move {
                            let Ok(bytes) = recv.read_to_end(1 << 16).await else {
                                return;
                            };
                            let Ok(msg) = Message::from_frame(&bytes, 1 << 16) else {
                                return;
                            };
                            let settling = match &msg {
                                Message::DebitResponse(m) => Some(m.transaction_id.clone()),
                                Message::Cancel(m) => Some(m.transaction_id.clone()),
                                Message::LoadResponse(m) => Some(m.transaction_id.clone()),
                                _ => None,
                            };
                            if let Some(txid) = settling {
                                {
                                    let mut books = b.lock().unwrap();
                                    *books.received.entry(txid).or_default() += 1;
                                    books.holding += 1;
                                }
                                let delay = q.lock().unwrap().answer_delay;
                                tokio::time::sleep(delay).await;
                                b.lock().unwrap().holding -= 1;
                            }
                            let Some(answer) = answer(&b, &ps, &q, msg) else {
                                // Hang: hold the stream open until the box gives up.
                                tokio::time::sleep(Duration::from_secs(30)).await;
                                return;
                            };
                            let f = answer.to_frame(1 << 16).unwrap();
                            let _ = send.write_all(&f).await;
                            let _ = send.finish();
                            let _ = send.stopped().await;
                        });
                    }
                });
            }
            ep.close(0u32.into(), b"fake stops");
        });
        Self {
            addr,
            books,
            security_card,
            quirks,
            endpoint,
            stop,
        }
    }

    /// Changes the quirks while the box runs.
    pub fn set(&self, f: impl FnOnce(&mut Quirks)) {
        f(&mut self.quirks.lock().unwrap());
    }

    /// As SIGKILL would: the fake vanishes from its port without telling anyone (its socket
    /// moves to a throwaway port, so not even a CONNECTION_CLOSE reaches the box), and the
    /// port is free for a restarted one.
    pub fn kill(self) {
        let sink = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        self.endpoint.rebind(sink).unwrap();
        self.endpoint.set_server_config(None);
        // Dropping `self` stops the accept loop; its close goes out from the sink port.
    }

    /// Messages received for `txid` that settle it (debit responses, cancels, load
    /// responses), answered or not.
    pub fn received(&self, txid: &str) -> u32 {
        self.books
            .lock()
            .unwrap()
            .received
            .get(txid)
            .copied()
            .unwrap_or(0)
    }
    /// Settling messages the fake holds unanswered right now.
    pub fn holding(&self) -> u32 {
        self.books.lock().unwrap().holding
    }
    pub fn connections(&self) -> u32 {
        self.books.lock().unwrap().connections
    }
    pub fn offers(&self) -> u32 {
        self.books.lock().unwrap().next
    }

    pub fn released(&self, txid: &str) -> u32 {
        self.books
            .lock()
            .unwrap()
            .released
            .get(txid)
            .copied()
            .unwrap_or(0)
    }
    pub fn debit_responses(&self, txid: &str) -> u32 {
        self.books
            .lock()
            .unwrap()
            .debit_responses
            .get(txid)
            .copied()
            .unwrap_or(0)
    }
    pub fn cancels(&self) -> Vec<CancelMsg> {
        self.books.lock().unwrap().cancels.clone()
    }
}

impl Drop for FakeHeadEnd {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

const TODAY: Date = Date::new(2026, 11, 22);

fn answer(
    books: &Mutex<Books>,
    security_card: &Mutex<SecurityCard>,
    quirks: &Mutex<Quirks>,
    msg: Message,
) -> Option<Message> {
    let mut b = books.lock().unwrap();
    let mut rng = rand::rngs::StdRng::from_entropy();
    let q = quirks.lock().unwrap().clone();
    let settling = matches!(
        msg,
        Message::DebitResponse(_) | Message::Cancel(_) | Message::LoadResponse(_)
    );
    if settling && q.busy {
        b.busy_answers += 1;
        return Some(Message::error(
            ErrorCode::Busy,
            "the fake head end is busy",
            None,
        ));
    }
    Some(match msg {
        Message::CatalogRequest => {
            b.catalog_requests += 1;
            Message::Catalog(vec![CatalogItem {
                merchant_id: "cable".into(),
                item_id: "ppv-7".into(),
                title: "Big Match".into(),
                kind: "ppv".into(),
                detail: "20:15".into(),
                amount: Money::new(PRICE, Currency::EUR),
            }])
        }
        Message::OfferRequest {
            merchant_id,
            item_id,
        } => {
            b.next += 1;
            let txid = format!("tx-{}", b.next);
            let offer = Offer {
                transaction_id: txid.clone(),
                merchant_id,
                item_id: item_id.clone(),
                title: format!("Event {item_id}"),
                amount: Money::new(PRICE, Currency::EUR),
                payment_route: "payment".into(),
                status_route: "merchant".into(),
                embodiment: Embodiment::SecurityCard,
                tsk: Some(DesKey::random(&mut rng)),
                etsk: None,
            };
            b.offers.insert(txid, offer.clone());
            Message::Offer(offer)
        }
        Message::DrawRequest(d) => {
            if quirks.lock().unwrap().hang_draws {
                return None;
            }
            let offer = b.offers.get(&d.transaction_id)?.clone();
            let body = d.body.open(offer.tsk.as_ref()).ok()?;
            let auth = security_card
                .lock()
                .unwrap()
                .issue_debit(
                    &DrawData {
                        merchant_id: d.merchant_id,
                        transaction_id: d.transaction_id.clone(),
                        amount: body.amount,
                        init: body.init,
                    },
                    TODAY,
                    false,
                )
                .map_err(|e| e.to_string());
            let mut command = match auth {
                Ok(a) => a.command,
                Err(e) => {
                    return Some(Message::error(
                        ErrorCode::BadSignature,
                        e,
                        Some(&d.transaction_id),
                    ));
                }
            };
            command.amount += quirks.lock().unwrap().inflate;
            b.security_card_txn
                .insert(d.transaction_id.clone(), command.security_card_txn);
            Message::DebitCommand(DebitCommandMsg {
                transaction_id: d.transaction_id,
                body: Protected::new(DebitCommandBody { command }, offer.tsk.as_ref(), &mut rng),
            })
        }
        Message::DebitResponse(r) => {
            if q.hang_debit_responses {
                return None;
            }
            let offer = b.offers.get(&r.transaction_id)?.clone();
            let resp = r.body.open(offer.tsk.as_ref()).ok()?;
            let n = *b.security_card_txn.get(&r.transaction_id)?;
            *b.debit_responses
                .entry(r.transaction_id.clone())
                .or_default() += 1;
            let rec = security_card.lock().unwrap().complete(n, &resp);
            if rec.is_err() {
                return Some(Message::error(
                    ErrorCode::BadSignature,
                    "card signature",
                    Some(&r.transaction_id),
                ));
            }
            // The merchant releases once per transaction, however often the response comes.
            let released = b.released.entry(r.transaction_id.clone()).or_default();
            if *released == 0 {
                *released = 1;
            }
            let mut q = quirks.lock().unwrap();
            if q.lose_first_receipt {
                q.lose_first_receipt = false;
                return None;
            }
            Message::Receipt(Receipt {
                transaction_id: r.transaction_id,
                released: true,
                text: "enjoy the match".into(),
                entitlement: Some(format!("ent-{}", offer.item_id)),
                new_balance: Some(resp.new_balance),
            })
        }
        Message::Cancel(c) if q.reject_proofs => Message::error(
            ErrorCode::ProofRejected,
            "the fake rejects the proof",
            Some(&c.transaction_id),
        ),
        Message::Cancel(c) if q.already_completed => Message::error(
            ErrorCode::AlreadyCompleted,
            "a completed purchase cannot be cancelled",
            Some(&c.transaction_id),
        ),
        Message::LoadResponse(l) => {
            *b.load_responses
                .entry(l.transaction_id.clone())
                .or_default() += 1;
            Message::LoadConfirmation(LoadConfirmation {
                transaction_id: l.transaction_id.clone(),
                loaded: l.response.as_ref().is_some_and(|r| r.is_loaded()),
                new_balance: None,
                sealed: vec![],
            })
        }
        Message::Cancel(c) => {
            if let Some(n) = b.security_card_txn.get(&c.transaction_id).copied() {
                let _ = security_card.lock().unwrap().reverse(n);
            }
            b.cancels.push(c.clone());
            Message::Receipt(Receipt {
                transaction_id: c.transaction_id,
                released: false,
                text: "cancelled".into(),
                entitlement: None,
                new_balance: None,
            })
        }
        other => Message::error(
            ErrorCode::Malformed,
            format!("fake cannot answer {other:?}"),
            None,
        ),
    })
}

/// A card file with 10.00 EUR.
pub fn card_file(dir: &Path) -> PathBuf {
    let p = dir.join("card.plvc");
    VirtualCard::create(
        &p,
        &CardSpec {
            card_id: 4242,
            provider_id: 1,
            currency: Currency::EUR,
            balance: 1_000,
            max_balance: 100_000,
            expiry: Expiry {
                year: 2035,
                month: 12,
            },
        },
        &issuer(),
    )
    .unwrap();
    p
}

pub fn balance(card: &Path) -> u64 {
    VirtualCard::open(card).unwrap().state().balance
}

pub fn config(dir: &Path, pki: &Pki, addr: SocketAddr, card: &Path, network_secs: u64) -> Config {
    let text = format!(
        r#"
[reader]
kind = "virtual"
card_file = "{card}"
[headend]
address = "{addr}"
server_name = "gateway.test"
operator_ca = "{ca}"
device_cert = "{cert}"
device_key = "{key}"
[state]
dir = "{state}"
[ui]
enabled = false
[timeouts]
network_secs = {network_secs}
offer_secs = 5
reconnect_initial_ms = 50
reconnect_max_ms = 500
recovery_initial_ms = 200
recovery_max_ms = 800
"#,
        card = card.display(),
        ca = pki.ca_pem.display(),
        cert = pki.dev_cert.display(),
        key = pki.dev_key.display(),
        state = dir.join("state").display(),
    );
    Config::parse(Path::new("test.toml"), &text).unwrap()
}

/// A daemon running in-process: keys go in through `keys`, the status comes out.
pub struct Box_ {
    pub keys: mpsc::Sender<ui::UiEvent>,
    pub events: mpsc::Sender<Event>,
    pub status: watch::Receiver<Status>,
    pub driver: VirtualDriver,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

pub async fn start_box(cfg: Config, card: &Path) -> Box_ {
    let driver = VirtualDriver::with_card("virtual", VirtualCard::open(card).unwrap());
    let (ktx, krx) = mpsc::channel(16);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (htx, hrx) = tokio::sync::oneshot::channel::<Handles>();
    let io = Io {
        driver: Arc::new(driver.clone()),
        reader_pattern: "virtual".into(),
        keys: Some(krx),
        draw: false,
    };
    let task = tokio::spawn(async move {
        stb::daemon::run(
            cfg,
            io,
            async {
                let _ = stop_rx.await;
            },
            |h| {
                let _ = htx.send(h);
            },
        )
        .await
        .unwrap();
    });
    let h = hrx.await.unwrap();
    Box_ {
        keys: ktx,
        events: h.events,
        status: h.status,
        driver,
        stop: Some(stop_tx),
        task,
    }
}

impl Box_ {
    /// Waits (up to 10 s) until the status satisfies `f`.
    pub async fn until(&mut self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        let r = tokio::time::timeout(Duration::from_secs(10), self.status.wait_for(|s| f(s)))
            .await
            .map(|r| r.map(|s| s.clone()));
        match r {
            Ok(Ok(s)) => s,
            _ => panic!(
                "timed out waiting for {what}; status {:?}",
                *self.status.borrow()
            ),
        }
    }

    pub async fn key(&self, k: ui::RemoteKey) {
        self.keys.send(ui::UiEvent::Key(k)).await.unwrap();
    }

    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }

    /// Kills the daemon task without a clean shutdown (as SIGKILL would, for in-process state),
    /// and returns once it is gone. An abort lands only at the task's next await, and a card
    /// command already handed to a blocking thread still finishes: without the wait, a test
    /// that then uses the card file itself raced the dying box for it (a lost update). The
    /// real-process SIGKILL tests are in `tests/` and `sim/`.
    pub async fn kill(self) {
        self.task.abort();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
        // A blocking card command in flight when the task died: let it land.
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// Polls `f` every 20 ms for up to `secs` seconds; panics with `what` if it never holds.
pub async fn eventually<T>(what: &str, secs: u64, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {secs} s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The box journal's state of `txid` (read through a second SQLite connection).
pub fn state_of(dir: &Path, txid: &str) -> Option<String> {
    stb::journal::Journal::open(&dir.join("state"))
        .unwrap()
        .state(txid)
        .unwrap()
}

/// `n` purchases of `amount` on the card file, made elsewhere (another box with its own
/// security card 88): SELECT, INITIALIZE, the security card's debit command, DEBIT.
pub fn purchases_elsewhere(card: &Path, n: u32, amount: u64) {
    use proto::apdu::CardApplication;
    use proto::card::commands;
    use proto::purse::PurchaseInit;
    let mut c = VirtualCard::open(card).unwrap();
    let mut security_card = SecurityCard::new(88, issuer().purchase());
    let data = |r: Vec<u8>| {
        assert!(r.ends_with(&[0x90, 0x00]), "card refused: {r:02X?}");
        r[..r.len() - 2].to_vec()
    };
    for i in 0..n {
        data(c.process_apdu(&commands::select()));
        let init =
            PurchaseInit::decode(&data(c.process_apdu(&commands::init_purchase(TODAY)))).unwrap();
        let auth = security_card
            .issue_debit(
                &DrawData {
                    merchant_id: "elsewhere".into(),
                    transaction_id: format!("elsewhere-{i}"),
                    amount: Money::new(amount, Currency::EUR),
                    init,
                },
                TODAY,
                false,
            )
            .unwrap();
        data(c.process_apdu(&commands::debit(&auth.command)));
    }
}

/// Journals an in-doubt voucher load of `card_id` whose zero-value proof was journaled
/// (state `load_zero_value`): recovery re-sends it from the journal alone.
pub fn journal_pending_load(dir: &Path, txid: &str, card_id: u64) {
    use proto::purse::LoadInit;
    use stb_flow::load::Step;
    let mut j = stb::journal::Journal::open(&dir.join("state")).unwrap();
    let offer = LoadOffer {
        transaction_id: txid.into(),
        source: LoadSource::Voucher { code: "V-1".into() },
        max_amount: Money::new(900, Currency::EUR),
        limited_by: "funds".into(),
        timestamp: 7,
        date: TODAY,
        pin_required: false,
    };
    let init = LoadInit {
        card_id,
        expiry: Expiry {
            year: 2035,
            month: 12,
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
    j.record_load(
        txid,
        &Step::RequestSent {
            offer,
            init: init.clone(),
        },
    )
    .unwrap();
    j.record_load(
        txid,
        &Step::ZeroValue {
            zero: LoadInit { amount: 0, ..init },
        },
    )
    .unwrap();
}

/// Journals a purchase of card 4242 (counter 1, [`PRICE`]) that went in doubt after the
/// draw: with `debit_sent`, the debit command (security card 77, transaction `security_card_txn`) came
/// and DEBIT went to the card, but the card's answer was never journaled.
pub fn journal_pending_purchase(dir: &Path, txid: &str, debit_sent: bool, security_card_txn: u32) {
    use proto::purse::{DebitCommand, PurchaseInit};
    use stb_flow::purchase::Step;
    let mut j = stb::journal::Journal::open(&dir.join("state")).unwrap();
    let offer = Offer {
        transaction_id: txid.into(),
        merchant_id: "cable".into(),
        item_id: "ppv-7".into(),
        title: "Event ppv-7".into(),
        amount: Money::new(PRICE, Currency::EUR),
        payment_route: "payment".into(),
        status_route: "merchant".into(),
        embodiment: Embodiment::SecurityCard,
        tsk: None,
        etsk: None,
    };
    let init = PurchaseInit {
        provider_id: 1,
        card_id: 4242,
        algorithm: 1,
        expiry: Expiry {
            year: 2035,
            month: 12,
        },
        balance: 1_000,
        currency: Currency::EUR,
        auth_mode: 1,
        atc: 1,
        init_count: 1,
        key_version: 1,
        credits: Default::default(),
        privacy: false,
        card_random: [0; 8],
        card_mac: [0; 8],
    };
    j.record(txid, &Step::OfferAccepted { offer, init })
        .unwrap();
    j.record(txid, &Step::DrawSent).unwrap();
    if debit_sent {
        let command = DebitCommand {
            security_card_id: 77,
            security_card_txn,
            card_id: 4242,
            atc: 1,
            amount: PRICE,
            currency: Currency::EUR,
            date: TODAY,
            security_card_signature: [0; 8],
        };
        j.record(txid, &Step::DebitCommandReceived { command })
            .unwrap();
        j.record(txid, &Step::DebitSent).unwrap();
    }
}
