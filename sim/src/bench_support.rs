//! The load driver the benchmarks share: N concurrent clients, each issuing one request at a
//! time for a fixed duration, reporting requests per second and latency percentiles. Plus the
//! raw quinn ceiling: an echo service over this transport with mTLS, one stream per request.
//!
//! Benchmarks print these figures; no test asserts on them.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use headend::pki::OperatorCa;
use headend::quic::BoxId;
use headend::quic::{
    ClientTls, QuicClient, QuicError, Revocations, Server, ServerTls, Service, TransportSettings,
};

/// How a load run is shaped.
#[derive(Debug, Clone, Copy)]
pub struct LoadPlan {
    pub clients: usize,
    /// Run first, not measured (connection warm-up, congestion window growth).
    pub warmup: Duration,
    pub duration: Duration,
}

/// What a load run measured.
#[derive(Debug, Clone)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: u64,
    pub errors: u64,
    /// The first error seen, if any, for the printout.
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub per_second: f64,
    pub p50: Duration,
    pub p99: Duration,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "clients={:>3}  requests={:>7}  errors={}  {:>9.0} req/s  p50={:>7.1} us  p99={:>7.1} us",
            self.clients,
            self.requests,
            self.errors,
            self.per_second,
            self.p50.as_secs_f64() * 1e6,
            self.p99.as_secs_f64() * 1e6,
        )?;
        if let Some(e) = &self.first_error {
            write!(f, "  first error: {e}")?;
        }
        Ok(())
    }
}

fn percentile(sorted: &[Duration], pct: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[(sorted.len() * pct / 100).min(sorted.len() - 1)]
}

/// Runs `op(client_index)` in a loop on `plan.clients` concurrent tasks, one request in flight
/// per client, and measures each call. Reusable for any request (the purchase benchmark passes
/// a whole purchase).
pub async fn drive<F, Fut, E>(plan: LoadPlan, op: F) -> LoadReport
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: fmt::Display,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let deadline = measure_from + plan.duration;
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..plan.clients {
        let op = op.clone();
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut first_error = None;
            loop {
                let t0 = Instant::now();
                if t0 >= deadline {
                    break;
                }
                let result = op(client).await;
                let t1 = Instant::now();
                if t0 < measure_from {
                    continue;
                }
                match result {
                    Ok(()) => latencies.push(t1 - t0),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| e.to_string());
                    }
                }
            }
            (latencies, errors, first_error)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok((lat, err, first)) => {
                all.extend(lat);
                errors += err;
                if first_error.is_none() {
                    first_error = first;
                }
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| format!("client task failed: {e}"));
            }
        }
    }
    // Requests still running at the deadline finish late; count the time they really took.
    let elapsed = Instant::now().max(deadline) - measure_from;
    all.sort_unstable();
    LoadReport {
        clients: plan.clients,
        requests: all.len() as u64,
        errors,
        first_error,
        elapsed,
        per_second: all.len() as f64 / elapsed.as_secs_f64(),
        p50: percentile(&all, 50),
        p99: percentile(&all, 99),
    }
}

/// Echoes the request: the cheapest possible service, so the figure is the transport's.
fn echo() -> Arc<dyn Service> {
    Arc::new(|_peer, request: Vec<u8>| async move { Ok(request) })
}

/// The raw quinn ceiling: an echo server on loopback with this transport's settings (mTLS, one
/// stream per request), `plan.clients` boxes each on its own connection with its own device
/// certificate, `payload_len`-byte requests.
pub async fn raw_quinn(plan: LoadPlan, payload_len: usize) -> Result<LoadReport, QuicError> {
    let ca = OperatorCa::generate().map_err(|e| QuicError::QuicConfig(e.to_string()))?;
    let server_cert = ca
        .issue_role("gateway", &["localhost".into(), "127.0.0.1".into()], false)
        .map_err(|e| QuicError::QuicConfig(e.to_string()))?;
    let settings = TransportSettings {
        max_connections: plan.clients.max(1) + 8,
        ..TransportSettings::default()
    };
    let server = Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &ServerTls {
            operator_ca: vec![ca.cert_der()],
            identity: server_cert.tls_identity(),
        },
        settings.clone(),
        echo(),
        Revocations::default(),
    )?;
    let addr = server.local_addr()?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server_task = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    let mut clients = Vec::with_capacity(plan.clients);
    for i in 0..plan.clients {
        let id =
            BoxId::new(format!("box-{i:06}")).map_err(|e| QuicError::QuicConfig(e.to_string()))?;
        let cert = ca
            .issue_device(&id)
            .map_err(|e| QuicError::QuicConfig(e.to_string()))?;
        let tls = ClientTls::new(vec![ca.cert_der()], cert.tls_identity(), "gateway");
        clients.push(QuicClient::connect(&tls, &settings, addr, "localhost").await?);
    }
    let clients = Arc::new(clients);
    let payload: Arc<[u8]> = (0..payload_len).map(|i| i as u8).collect();

    let report = {
        let clients = clients.clone();
        drive(plan, move |i| {
            let clients = clients.clone();
            let payload = payload.clone();
            async move {
                let answer = clients[i].call(&payload).await?;
                if answer.len() != payload.len() {
                    return Err(QuicError::Protocol("echo answered with a different length"));
                }
                Ok::<(), QuicError>(())
            }
        })
        .await
    };

    if let Ok(clients) = Arc::try_unwrap(clients) {
        for c in clients {
            c.close().await;
        }
    }
    let _ = stop_tx.send(());
    let _ = server_task.await;
    Ok(report)
}
