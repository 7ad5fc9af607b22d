//! `wanproxy`: the WAN simulator as a standalone process — a userspace UDP proxy with one-way
//! delay, jitter and loss between a QUIC client and its server (see `sim::wan`).
//!
//! `wanproxy --listen 127.0.0.1:5433 --upstream 127.0.0.1:4433 --rtt-ms 50 --loss 0.01`

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use sim::wan::{ProxyLimits, WanParams, WanProxy};

#[derive(Parser)]
#[command(about = "UDP proxy with delay, jitter and loss (loopback only)")]
struct Args {
    /// Where clients send (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// The server the proxy forwards to (loopback).
    #[arg(long)]
    upstream: SocketAddr,
    /// Round-trip time added (half each way).
    #[arg(long, default_value_t = 50)]
    rtt_ms: u64,
    /// Uniform jitter per packet, each way.
    #[arg(long, default_value_t = 0)]
    jitter_ms: u64,
    /// Packet loss probability per packet, each way (0.0 to 1.0).
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Packets queued per direction per flow; more are dropped.
    #[arg(long, default_value_t = 4096)]
    queue: usize,
    /// The proxy stops by itself after this long.
    #[arg(long, default_value_t = 600)]
    seconds: u64,
    #[arg(long, default_value_t = 0x5eed)]
    seed: u64,
}

fn main() -> Result<(), String> {
    let a = Args::parse();
    for addr in [a.listen, a.upstream] {
        if !addr.ip().is_loopback() {
            return Err(format!("{addr}: loopback addresses only"));
        }
    }
    if !(0.0..=1.0).contains(&a.loss) {
        return Err("--loss is a probability, 0.0 to 1.0".into());
    }
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    rt.block_on(async {
        let params = WanParams {
            delay: Duration::from_millis(a.rtt_ms) / 2,
            jitter: Duration::from_millis(a.jitter_ms),
            loss: a.loss,
            queue_limit: a.queue.max(1),
        };
        let lifetime = Duration::from_secs(a.seconds);
        let proxy = WanProxy::start(
            a.listen,
            a.upstream,
            params,
            ProxyLimits {
                lifetime,
                seed: a.seed,
                ..ProxyLimits::default()
            },
        )
        .await
        .map_err(|e| format!("{}: {e}", a.listen))?;
        println!("{}", proxy.addr());
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = tokio::time::sleep(lifetime) => {}
        }
        let (fwd, lost, over) = proxy.stats().snapshot();
        eprintln!("wanproxy: forwarded {fwd}, lost {lost}, dropped at a full queue {over}");
        proxy.stop().await;
        Ok(())
    })
}
