//! Shared by the handshake-flood tests and benchmark: an in-memory operator CA, a real server
//! on loopback, honest boxes with device certificates, and three outsiders who attack the
//! handshake the way anyone on the network could:
//!
//! - [`initial_flood`]: genuine QUIC Initial packets (each a new connection attempt with fresh
//!   connection ids, built by a quinn-proto client state machine) sent from one UDP socket at a
//!   set rate, never answering anything;
//! - [`stalled_handshakes`]: clients that answer the server's Retry (so their address is
//!   validated) and then never finish the handshake;
//! - [`anonymous_flood`]: ordinary quinn clients with no certificate, which complete their side
//!   of the handshake and are refused.
//!
//! Source addresses: Linux routes all of 127.0.0.0/8 to loopback, so binding a client to
//! 127.0.0.N gives it its own source IP, i.e. its own "source" for the per-source limits.

#![allow(dead_code)] // each test target uses part of it

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use rustls_pki_types::CertificateDer;
use transport::{
    BoxId, ClientTls, QuicError, Revocations, Server, ServerStats, ServerTls, Service, TlsIdentity,
    TransportSettings,
};

pub const SERVER_NAME: &str = "gateway.purselink.test";

pub struct Pki {
    ca: transport::pki::OperatorCa,
    pub server: TlsIdentity,
}

impl Pki {
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.ca.cert_der()
    }

    pub fn ca_pem(&self) -> String {
        self.ca.cert_pem().to_string()
    }

    /// A device certificate as `headend pki issue-device` makes it ([`transport::pki`]).
    pub fn device(&self, id: &str) -> TlsIdentity {
        self.ca
            .issue_device(&BoxId::new(id).unwrap())
            .unwrap()
            .tls_identity()
    }
}

/// A fresh operator CA and a gateway certificate (role `gateway`) for [`SERVER_NAME`]; also returns the server
/// certificate and key as PEM (for a server run in a child process).
pub fn pki_with_pem() -> (Pki, String, String) {
    let ca = transport::pki::OperatorCa::generate().unwrap();
    let server = ca
        .issue_role("gateway", &[SERVER_NAME.to_string()], false)
        .unwrap();
    let pki = Pki {
        server: server.tls_identity(),
        ca,
    };
    (pki, server.cert_pem, server.key_pem)
}

pub fn pki() -> Pki {
    pki_with_pem().0
}

/// An honest box: the operator CA as root and its own device certificate.
pub fn device_tls(pki: &Pki, id: &str) -> ClientTls {
    ClientTls::new(vec![pki.ca_der()], pki.device(id), "gateway")
}

/// An outsider: trusts the operator CA (the server's chain is public), shows no certificate.
pub fn anonymous_tls(pki: &Pki) -> ClientTls {
    ClientTls {
        operator_ca: vec![pki.ca_der()],
        server_role: "gateway".into(),
        identity: None,
        alpn: vec![transport::ALPN.to_vec()],
        early_data: false,
    }
}

/// The quinn-proto client configuration the raw attackers use (no client certificate).
pub fn attacker_config(pki: &Pki) -> quinn_proto::ClientConfig {
    transport::client_config(&anonymous_tls(pki), &TransportSettings::default()).unwrap()
}

/// Echoes the request behind the peer's box id.
pub fn echo() -> Arc<dyn Service> {
    Arc::new(|peer: Arc<transport::Peer>, request: Vec<u8>| async move {
        let mut out = format!("{:?}|", peer.box_id().map(|b| b.as_str().to_owned())).into_bytes();
        out.extend_from_slice(&request);
        Ok(out)
    })
}

pub struct Running {
    pub addr: SocketAddr,
    pub stats: ServerStats,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server did not shut down")
            .unwrap();
    }
}

/// A server on 127.0.0.1 with an echo service.
pub fn start(pki: &Pki, settings: TransportSettings) -> Running {
    let server = Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &ServerTls {
            operator_ca: vec![pki.ca_der()],
            identity: pki.server.clone(),
        },
        settings,
        echo(),
        Revocations::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let stats = server.stats();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running {
        addr,
        stats,
        stop,
        task,
    }
}

pub fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// An honest box connected from `from`.
pub async fn honest_connect(
    tls: &ClientTls,
    from: IpAddr,
    server: SocketAddr,
) -> Result<(quinn::Endpoint, quinn::Connection), QuicError> {
    let endpoint =
        transport::client_endpoint((from, 0).into(), tls, &TransportSettings::default())?;
    let conn = transport::connect(&endpoint, server, SERVER_NAME).await?;
    Ok((endpoint, conn))
}

/// One honest box's visit: connect from `from`, complete one request, close. Returns the time
/// to connect, or why it failed (including not within `deadline`).
pub async fn honest_request(
    tls: &ClientTls,
    from: IpAddr,
    server: SocketAddr,
    deadline: Duration,
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let visit = async {
        let (endpoint, conn) = honest_connect(tls, from, server)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        let connected = t0.elapsed();
        let answer = transport::call(&conn, b"ping")
            .await
            .map_err(|e| format!("request: {e}"))?;
        if !answer.ends_with(b"|ping") {
            return Err(format!("unexpected answer {answer:?}"));
        }
        conn.close(0u32.into(), b"done");
        drop(endpoint);
        Ok(connected)
    };
    match tokio::time::timeout(deadline, visit).await {
        Ok(r) => r,
        Err(_) => Err(format!("no connection and answer within {deadline:?}")),
    }
}

/// Resident set size of this process, KiB.
pub fn rss_kib() -> u64 {
    rss_kib_of("self").unwrap_or(0)
}

/// Resident set size of process `pid` (or "self"), KiB.
pub fn rss_kib_of(pid: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn send_all(socket: &UdpSocket, conn: &mut quinn_proto::Connection, buf: &mut Vec<u8>) -> usize {
    let mut sent = 0;
    while let Some(t) = conn.poll_transmit(Instant::now(), 1, buf) {
        if socket.send_to(&buf[..t.size], t.destination).is_ok() {
            sent += 1;
        }
        buf.clear();
    }
    sent
}

/// What the Initial flooder did.
#[derive(Debug, Clone, Copy)]
pub struct FloodReport {
    pub attempts: u64,
    pub datagrams: u64,
    pub elapsed: Duration,
}

/// Sends `count` connection attempts at `rate` per second from one UDP socket bound to
/// `from`: each the genuine first flight (Initial packet, ClientHello, padded to 1200 bytes)
/// of a new quinn-proto client connection with its own random connection ids. Nothing is ever
/// answered; the client state is dropped as soon as its packet is out. Runs on its own thread.
pub fn initial_flood(
    from: IpAddr,
    server: SocketAddr,
    count: u64,
    rate: u64,
    config: quinn_proto::ClientConfig,
) -> std::thread::JoinHandle<FloodReport> {
    std::thread::spawn(move || {
        let socket = UdpSocket::bind((from, 0)).unwrap();
        let endpoint_config = Arc::new(quinn_proto::EndpointConfig::default());
        let mut buf = Vec::with_capacity(1500);
        let start = Instant::now();
        let mut datagrams = 0;
        for i in 0..count {
            let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
            let mut endpoint =
                quinn_proto::Endpoint::new(endpoint_config.clone(), None, false, None);
            let (_, mut conn) = endpoint
                .connect(Instant::now(), config.clone(), server, SERVER_NAME)
                .unwrap();
            datagrams += send_all(&socket, &mut conn, &mut buf) as u64;
        }
        FloodReport {
            attempts: count,
            datagrams,
            elapsed: start.elapsed(),
        }
    })
}

/// What the stalling attacker saw.
#[derive(Debug, Clone, Copy, Default)]
pub struct StallReport {
    pub attempts: usize,
    /// Answered with a Retry, which the attacker honoured (its address is then validated).
    pub retried: usize,
    /// Answered at once with anything but a Retry (the server's handshake flight, or a refusal).
    pub direct: usize,
    /// The server's handshake flight after the Retry: a handshake now pending, never finished.
    pub stalled_after_retry: usize,
}

impl StallReport {
    /// Attempts the server answered and the attacker then left hanging.
    pub fn hanging(&self) -> usize {
        self.direct + self.stalled_after_retry
    }
}

/// A running stalling attacker: its progress so far, and its report once `hold` is over.
pub struct Stall {
    pub progress: Arc<Mutex<StallReport>>,
    pub thread: std::thread::JoinHandle<StallReport>,
}

fn is_retry(datagram: &[u8]) -> bool {
    // Long header (0x80) of type Retry (0x30); the type bits are not header-protected.
    datagram
        .first()
        .is_some_and(|b| b & 0x80 != 0 && b & 0x30 == 0x30)
}

/// Opens `n` connection attempts from one socket bound to `from`, answers the server's Retry
/// (proving the address), and then never sends another packet: every handshake the server
/// starts stays unfinished. Keeps its socket open for `hold`, then reports.
pub fn stalled_handshakes(
    from: IpAddr,
    server: SocketAddr,
    n: usize,
    config: quinn_proto::ClientConfig,
    hold: Duration,
) -> Stall {
    #[derive(PartialEq)]
    enum Phase {
        AwaitFirst,
        AwaitAfterRetry,
        Stalled,
    }
    let progress = Arc::new(Mutex::new(StallReport::default()));
    let shared = progress.clone();
    let thread = std::thread::spawn(move || {
        let socket = UdpSocket::bind((from, 0)).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(20)))
            .unwrap();
        let mut endpoint = quinn_proto::Endpoint::new(
            Arc::new(quinn_proto::EndpointConfig::default()),
            None,
            false,
            None,
        );
        let mut buf = Vec::with_capacity(1500);
        let mut conns = HashMap::new();
        let mut report = StallReport {
            attempts: n,
            ..StallReport::default()
        };
        for _ in 0..n {
            let (h, mut conn) = endpoint
                .connect(Instant::now(), config.clone(), server, SERVER_NAME)
                .unwrap();
            send_all(&socket, &mut conn, &mut buf);
            conns.insert(h, (conn, Phase::AwaitFirst));
        }
        let until = Instant::now() + hold;
        let mut rx = vec![0u8; 65536];
        while Instant::now() < until {
            let Ok((len, remote)) = socket.recv_from(&mut rx) else {
                continue;
            };
            let datagram = &rx[..len];
            let retry = is_retry(datagram);
            let event = endpoint.handle(
                Instant::now(),
                remote,
                None,
                None,
                bytes::BytesMut::from(datagram),
                &mut buf,
            );
            buf.clear();
            let Some(quinn_proto::DatagramEvent::ConnectionEvent(h, event)) = event else {
                continue;
            };
            let Some((conn, phase)) = conns.get_mut(&h) else {
                continue;
            };
            match phase {
                Phase::AwaitFirst if retry => {
                    report.retried += 1;
                    conn.handle_event(event);
                    send_all(&socket, conn, &mut buf);
                    *phase = Phase::AwaitAfterRetry;
                }
                Phase::AwaitFirst => {
                    report.direct += 1;
                    *phase = Phase::Stalled;
                }
                Phase::AwaitAfterRetry => {
                    report.stalled_after_retry += 1;
                    *phase = Phase::Stalled;
                }
                Phase::Stalled => {}
            }
            *shared.lock().unwrap() = report;
        }
        report
    });
    Stall { progress, thread }
}

/// Runs `n` quinn clients with `tls` (no certificate: [`anonymous_tls`]) from one endpoint bound to `from`, `parallel`
/// at a time; each connects and tries one request. Returns how many were refused (any error)
/// and how many got an answer (must be none).
pub async fn anonymous_flood(
    tls: ClientTls,
    from: IpAddr,
    server: SocketAddr,
    n: usize,
    parallel: usize,
) -> (usize, usize) {
    let endpoint =
        transport::client_endpoint((from, 0).into(), &tls, &TransportSettings::default()).unwrap();
    let limit = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let permit = limit.clone().acquire_owned().await.unwrap();
        let endpoint = endpoint.clone();
        tasks.spawn(async move {
            let r = tokio::time::timeout(Duration::from_secs(20), async {
                let conn = transport::connect(&endpoint, server, SERVER_NAME).await?;
                transport::call(&conn, b"ping").await
            })
            .await;
            drop(permit);
            matches!(r, Ok(Ok(_)))
        });
    }
    let (mut refused, mut answered) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        if r.unwrap() {
            answered += 1;
        } else {
            refused += 1;
        }
    }
    (refused, answered)
}

/// One captured log event at WARN or above.
#[derive(Debug, Clone)]
pub struct LogLine {
    pub message: String,
    pub remote: Option<String>,
}

/// Every WARN+ event in this test process (installed once, as the global subscriber, since
/// the server's events come from tokio's worker threads).
pub fn captured_logs() -> Arc<Mutex<Vec<LogLine>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<LogLine>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        use tracing_subscriber::layer::SubscriberExt;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Capture(logs.clone()));
        tracing::subscriber::set_global_default(subscriber).unwrap();
        logs
    })
    .clone()
}

struct Capture(Arc<Mutex<Vec<LogLine>>>);

#[derive(Default)]
struct Fields {
    message: String,
    remote: Option<String>,
}

impl tracing::field::Visit for Fields {
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "remote" => self.remote = Some(format!("{value:?}")),
            _ => {}
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Capture {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if *event.metadata().level() > tracing::Level::WARN {
            return;
        }
        let mut f = Fields::default();
        event.record(&mut f);
        self.0.lock().unwrap().push(LogLine {
            message: f.message,
            remote: f.remote,
        });
    }
}

/// Log lines about source address `ip` so far.
pub fn lines_from(logs: &Mutex<Vec<LogLine>>, ip: IpAddr) -> Vec<LogLine> {
    let prefix = format!("{ip}:");
    logs.lock()
        .unwrap()
        .iter()
        .filter(|l| l.remote.as_deref().is_some_and(|r| r.starts_with(&prefix)))
        .cloned()
        .collect()
}

/// Waits (bounded) until `f` holds, polling.
pub async fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + limit;
    while Instant::now() < until {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    f()
}
