//! Handshake floods at the issue's scale, with figures: honest-box success rate and time to
//! connect during and right after the flood, and the server's memory (VmRSS of the server
//! process, which runs as a child of this one so the attackers' memory is not counted)
//! before, at its peak during, and after.
//!
//! ```sh
//! cargo bench -p transport --bench handshake_flood             # every scenario
//! cargo bench -p transport --bench handshake_flood -- initial  # one: initial | stall | anon | burst
//! ```
//!
//! - `initial`: the issue's attack: 10,800 genuine QUIC Initial packets at 700/s from one UDP
//!   socket (`FLOOD_COUNT`, `FLOOD_RATE` override), never answered;
//! - `stall`: 64 source addresses, each opening 48 handshakes a second that answer the Retry
//!   and then never finish, for 8 s: more than the global pending bound;
//! - `anon`: 3,000 ordinary QUIC clients without a certificate, 64 at a time, from one address.
//! - `burst`: no attacker: 1,000 honest boxes behind one address (a NAT, or the fleet
//!   simulator) reconnect 64 at a time — what the per-source pending bound costs them.
//!
//! The server uses the default `TransportSettings`; `FLOOD_MAX_CONNECTIONS`,
//! `FLOOD_MAX_PENDING_HANDSHAKES`, `FLOOD_MAX_PENDING_PER_SOURCE`, `FLOOD_RETRY_THRESHOLD` and
//! `FLOOD_HANDSHAKE_TIMEOUT_MS` override the limits. `FLOOD_REPEAT=N` runs each attack N times
//! against the same server process (memory kept for reuse, not leaked, stays level from round
//! to round).
//!
//! Memory is read four ways: idle, peak, after the attack (+0, +5, +10 s), and after asking the
//! server process to `malloc_trim` (what glibc keeps for reuse versus what is still in use).
//!
//! Bounded: every phase has a fixed length; all four scenarios take about 2 minutes on two
//! cores. Loopback only.

#[path = "../tests/support/mod.rs"]
mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::*;
use transport::{Revocations, Server, ServerTls, TlsIdentity, TransportSettings};

const CHILD_ENV: &str = "PURSELINK_FLOOD_SERVER_DIR";

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The default settings, with `FLOOD_<FIELD>` environment overrides for the limits.
fn settings() -> TransportSettings {
    let mut s = TransportSettings::default();
    let d = TransportSettings::default();
    s.max_connections = env_u64("FLOOD_MAX_CONNECTIONS", d.max_connections as u64) as usize;
    s.max_pending_handshakes = env_u64(
        "FLOOD_MAX_PENDING_HANDSHAKES",
        d.max_pending_handshakes as u64,
    ) as usize;
    s.max_pending_per_source = env_u64(
        "FLOOD_MAX_PENDING_PER_SOURCE",
        d.max_pending_per_source as u64,
    ) as usize;
    s.retry_threshold = env_u64("FLOOD_RETRY_THRESHOLD", d.retry_threshold as u64) as usize;
    s.handshake_timeout_ms = env_u64("FLOOD_HANDSHAKE_TIMEOUT_MS", d.handshake_timeout_ms);
    s
}

/// The server process: loads the PKI from the directory, prints its address, then its
/// admission counters every 200 ms, until its stdin closes.
fn child(dir: PathBuf) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let tls = ServerTls {
            operator_ca: transport::load_certs(&dir.join("ca.pem")).unwrap(),
            identity: TlsIdentity::from_pem_files(&dir.join("server.pem"), &dir.join("server.key"))
                .unwrap(),
        };
        let server = Server::bind(
            ([127, 0, 0, 1], 0).into(),
            &tls,
            settings(),
            echo(),
            Revocations::default(),
        )
        .unwrap();
        println!("addr {}", server.local_addr().unwrap());
        let stats = server.stats();
        tokio::spawn(async move {
            loop {
                let s = stats.snapshot();
                println!(
                    "stats {} {} {} {} {} {} {} {}",
                    s.pending,
                    s.established,
                    s.retries_sent,
                    s.handshakes_started,
                    s.handshake_timeouts,
                    s.deferred,
                    s.refused,
                    s.evicted
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        // Until stdin closes; a "trim" line hands freed heap back to the OS (glibc
        // `malloc_trim`), to tell memory the allocator keeps for reuse from memory in use.
        let stdin_closed = tokio::task::spawn_blocking(|| {
            let mut line = String::new();
            while std::io::stdin()
                .read_line(&mut line)
                .map(|n| n > 0)
                .unwrap_or(false)
            {
                if line.trim() == "trim" {
                    // SAFETY: malloc_trim only releases free heap pages; no pointer is involved.
                    unsafe { libc::malloc_trim(0) };
                }
                line.clear();
            }
        });
        server
            .run(async {
                let _ = stdin_closed.await;
            })
            .await;
    });
}

struct ServerProcess {
    child: Child,
    addr: SocketAddr,
    /// The last counters line: pending, established, retries, started, timeouts, deferred,
    /// refused, evicted.
    stats: Arc<Mutex<Vec<u64>>>,
    pending_peak: Arc<Mutex<u64>>,
}

impl ServerProcess {
    fn spawn(dir: &std::path::Path) -> Self {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(CHILD_ENV, dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("addr ").unwrap().parse().unwrap();
        let stats = Arc::new(Mutex::new(vec![0; 8]));
        let pending_peak = Arc::new(Mutex::new(0));
        {
            let (stats, peak) = (stats.clone(), pending_peak.clone());
            std::thread::spawn(move || {
                for line in out.lines().map_while(Result::ok) {
                    if let Some(rest) = line.strip_prefix("stats ") {
                        let v: Vec<u64> = rest.split(' ').filter_map(|x| x.parse().ok()).collect();
                        let mut p = peak.lock().unwrap();
                        *p = (*p).max(v[0]);
                        *stats.lock().unwrap() = v;
                    }
                }
            });
        }
        Self {
            child,
            addr,
            stats,
            pending_peak,
        }
    }

    fn rss_kib(&self) -> u64 {
        rss_kib_of(&self.child.id().to_string()).unwrap_or(0)
    }

    fn stats_line(&self) -> String {
        let v = self.stats.lock().unwrap().clone();
        format!(
            "pending now {} (peak {}), established {}, retries {}, handshakes started {}, \
             timeouts {}, deferred {}, refused {}, evicted {}",
            v[0],
            self.pending_peak.lock().unwrap(),
            v[1],
            v[2],
            v[3],
            v[4],
            v[5],
            v[6],
            v.get(7).copied().unwrap_or(0)
        )
    }

    /// Asks the server process to hand its free heap back to the OS, then reads its VmRSS.
    fn rss_after_trim(&mut self) -> u64 {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(b"trim\n");
            let _ = stdin.flush();
        }
        std::thread::sleep(Duration::from_millis(300));
        self.rss_kib()
    }

    fn stop(mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

#[derive(Default)]
struct Visits {
    ok: Vec<Duration>,
    failed: Vec<String>,
}

impl Visits {
    fn line(&mut self) -> String {
        self.ok.sort();
        let pct = |p: f64| {
            if self.ok.is_empty() {
                0.0
            } else {
                self.ok[((self.ok.len() - 1) as f64 * p).round() as usize].as_secs_f64() * 1e3
            }
        };
        let total = self.ok.len() + self.failed.len();
        let mut s = format!(
            "{}/{} ok ({:.0}%), connect p50 {:.1} ms, p95 {:.1} ms, max {:.1} ms",
            self.ok.len(),
            total,
            100.0 * self.ok.len() as f64 / total.max(1) as f64,
            pct(0.5),
            pct(0.95),
            pct(1.0)
        );
        if let Some(first) = self.failed.first() {
            s.push_str(&format!("; first failure: {first}"));
        }
        s
    }
}

/// Honest boxes visit (connect, one request, close) one after another, alternating between
/// the attacker's address and their own, every 100 ms until `done` says stop; the visits from
/// each address apart.
async fn honest_visits(
    pki: &Pki,
    server: &ServerProcess,
    ips: [IpAddr; 2],
    mut done: impl FnMut() -> bool,
    rss_peak: &mut u64,
) -> [Visits; 2] {
    let tls = device_tls(pki, "box-000001");
    let mut v = [Visits::default(), Visits::default()];
    let mut i = 0;
    while !done() {
        let v = &mut v[i % 2];
        match honest_request(&tls, ips[i % 2], server.addr, Duration::from_secs(10)).await {
            Ok(t) => v.ok.push(t),
            Err(e) => v.failed.push(e),
        }
        i += 1;
        *rss_peak = (*rss_peak).max(server.rss_kib());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    v
}

async fn scenario(name: &str, pki: &Pki, dir: &std::path::Path) {
    let server = ServerProcess::spawn(dir);
    let honest_own = ip("127.0.0.2");
    let tls = device_tls(pki, "box-000001");
    honest_request(&tls, honest_own, server.addr, Duration::from_secs(10))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = server.rss_kib();
    let repeat = env_u64("FLOOD_REPEAT", 1).max(1);
    let mut server = server;
    for round in 1..=repeat {
        attack_round(name, pki, &mut server, round, rss_idle).await;
    }
    server.stop();
}

/// One attack on the running server, then the visits right after it and the memory figures.
async fn attack_round(
    name: &str,
    pki: &Pki,
    server: &mut ServerProcess,
    round: u64,
    rss_idle: u64,
) {
    let server_ref: &ServerProcess = server;
    let honest_own = ip("127.0.0.2");
    let mut rss_peak = rss_idle;
    let started = Instant::now();

    let (attack, ips) = match name {
        "initial" => {
            let count = env_u64("FLOOD_COUNT", 10_800);
            let rate = env_u64("FLOOD_RATE", 700);
            let from = ip("127.0.0.1");
            let flood = initial_flood(from, server_ref.addr, count, rate, attacker_config(pki));
            let during = honest_visits(
                pki,
                server_ref,
                [from, honest_own],
                || flood.is_finished(),
                &mut rss_peak,
            )
            .await;
            let r = flood.join().unwrap();
            (
                format!(
                    "{} Initials ({} datagrams) from one socket in {:.1} s",
                    r.attempts,
                    r.datagrams,
                    r.elapsed.as_secs_f64()
                ),
                (during, [from, honest_own]),
            )
        }
        "stall" => {
            let until = Instant::now() + Duration::from_secs(8);
            let addr = server_ref.addr;
            let config = attacker_config(pki);
            let attackers = std::thread::spawn(move || {
                let mut stalled = StallReport::default();
                while Instant::now() < until {
                    let threads: Vec<_> = (1..=64u8)
                        .map(|n| {
                            stalled_handshakes(
                                IpAddr::from([127, 0, 1, n]),
                                addr,
                                48,
                                config.clone(),
                                Duration::from_millis(900),
                            )
                        })
                        .collect();
                    for t in threads {
                        let r = t.thread.join().unwrap();
                        stalled.attempts += r.attempts;
                        stalled.retried += r.retried;
                        stalled.direct += r.direct;
                        stalled.stalled_after_retry += r.stalled_after_retry;
                    }
                }
                stalled
            });
            let from = ip("127.0.1.1");
            let during = honest_visits(
                pki,
                server_ref,
                [from, honest_own],
                || attackers.is_finished(),
                &mut rss_peak,
            )
            .await;
            let r = attackers.join().unwrap();
            (
                format!("64 sources, 48 stalled handshakes each per second for 8 s: {r:?}"),
                (during, [from, honest_own]),
            )
        }
        "anon" => {
            let from = ip("127.0.0.3");
            let addr = server_ref.addr;
            let n = env_u64("ANON_COUNT", 3000) as usize;
            let flood = tokio::spawn(anonymous_flood(anonymous_tls(pki), from, addr, n, 64));
            let during = honest_visits(
                pki,
                server_ref,
                [from, honest_own],
                || flood.is_finished(),
                &mut rss_peak,
            )
            .await;
            let (refused, answered) = flood.await.unwrap();
            (
                format!(
                    "{n} clients without a certificate, 64 at a time: {refused} refused, {answered} answered"
                ),
                (during, [from, honest_own]),
            )
        }
        "burst" => {
            let from = ip("127.0.0.4");
            let n = env_u64("BURST_COUNT", 1000) as usize;
            let tlss: Vec<_> = (0..n)
                .map(|i| device_tls(pki, &format!("box-{i:06}")))
                .collect();
            let addr = server_ref.addr;
            let burst = tokio::spawn(async move {
                let limit = Arc::new(tokio::sync::Semaphore::new(64));
                let mut tasks = tokio::task::JoinSet::new();
                let t0 = Instant::now();
                for tls in tlss {
                    let permit = limit.clone().acquire_owned().await.unwrap();
                    tasks.spawn(async move {
                        let r = honest_request(&tls, from, addr, Duration::from_secs(30)).await;
                        drop(permit);
                        r
                    });
                }
                let mut v = Visits::default();
                while let Some(r) = tasks.join_next().await {
                    match r.unwrap() {
                        Ok(t) => v.ok.push(t),
                        Err(e) => v.failed.push(e),
                    }
                }
                (v, t0.elapsed())
            });
            let during = honest_visits(
                pki,
                server_ref,
                [from, honest_own],
                || burst.is_finished(),
                &mut rss_peak,
            )
            .await;
            let (mut boxes, took) = burst.await.unwrap();
            (
                format!(
                    "{n} honest boxes from one address, 64 at a time, in {:.1} s: {}",
                    took.as_secs_f64(),
                    boxes.line()
                ),
                (during, [from, honest_own]),
            )
        }
        other => panic!("unknown scenario {other}"),
    };
    let attack_secs = started.elapsed().as_secs_f64();
    let (mut during, ips) = ips;
    let after_stats = server.stats_line();

    // Right after: visits for 2 s.
    let t = Instant::now();
    let mut after = honest_visits(
        pki,
        server_ref,
        ips,
        || t.elapsed() > Duration::from_secs(2),
        &mut rss_peak,
    )
    .await;
    let rss_right_after = server.rss_kib();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_5s = server.rss_kib();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_10s = server.rss_kib();
    let rss_trimmed = server.rss_after_trim();
    println!(
        "== {name}{}: {attack} ({attack_secs:.1} s)",
        if round > 1 {
            format!(" (round {round}, same server)")
        } else {
            String::new()
        }
    );
    println!(
        "   honest during, from the attacker's address: {}",
        during[0].line()
    );
    println!(
        "   honest during, from its own address: {}",
        during[1].line()
    );
    println!(
        "   honest right after, from the attacker's address: {}",
        after[0].line()
    );
    println!(
        "   honest right after, from its own address: {}",
        after[1].line()
    );
    println!("   server at the end of the attack: {after_stats}");
    println!("   server 10 s later: {}", server.stats_line());
    println!(
        "   server VmRSS: idle {rss_idle} KiB, peak {rss_peak} KiB, right after {rss_right_after} KiB, \
         +5 s {rss_5s} KiB, +10 s {rss_10s} KiB, then after malloc_trim {rss_trimmed} KiB"
    );
}

fn main() {
    if let Ok(dir) = std::env::var(CHILD_ENV) {
        return child(dir.into());
    }
    // `cargo bench` passes `--bench`; anything else names scenarios.
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scenarios: Vec<&str> = if wanted.is_empty() {
        vec!["initial", "stall", "anon", "burst"]
    } else {
        wanted.iter().map(String::as_str).collect()
    };
    let (pki, cert_pem, key_pem) = pki_with_pem();
    let dir = std::env::temp_dir().join(format!("purselink-flood-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::File::create(dir.join("ca.pem"))
        .unwrap()
        .write_all(pki.ca_pem().as_bytes())
        .unwrap();
    std::fs::write(dir.join("server.pem"), cert_pem).unwrap();
    std::fs::write(dir.join("server.key"), key_pem).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "handshake flood against a server process with {:?}",
        settings()
    );
    for name in scenarios {
        rt.block_on(scenario(name, &pki, &dir));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
