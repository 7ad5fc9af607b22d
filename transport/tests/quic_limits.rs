//! Limits and lifecycle over real QUIC on loopback: streams beyond the per-connection limit
//! wait for credit (back-pressure) and all complete; connections beyond the limit are refused
//! with a clear reason; shutdown lets in-flight transactions finish.

mod quic_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use quic_support::*;
use tokio::sync::{Barrier, Notify};
use transport::{Peer, QuicError, Revocations, TransportSettings};

#[tokio::test]
async fn streams_beyond_the_limit_wait_for_credit_and_all_complete() {
    const LIMIT: u32 = 3;
    const CALLS: usize = 24; // a multiple of LIMIT, for the barrier
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    // Every handler waits until LIMIT of them are in at once: proves the limit is reached (not
    // serialised), while `peak` proves it is never exceeded.
    let barrier = Arc::new(Barrier::new(LIMIT as usize));
    let svc = {
        let (in_flight, peak, barrier) = (in_flight.clone(), peak.clone(), barrier.clone());
        move |_peer: Arc<Peer>, req: Vec<u8>| {
            let (in_flight, peak, barrier) = (in_flight.clone(), peak.clone(), barrier.clone());
            async move {
                let now = in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                barrier.wait().await;
                in_flight.fetch_sub(1, Ordering::SeqCst);
                Ok(req)
            }
        }
    };
    let pki = pki();
    let settings = TransportSettings {
        max_streams_per_connection: LIMIT,
        ..TransportSettings::default()
    };
    let server = start(
        &pki,
        settings.clone(),
        Arc::new(svc),
        Revocations::default(),
    );
    let client = Arc::new(
        connect_with(&box_tls(&pki, "box-000123"), &settings, server.addr)
            .await
            .unwrap(),
    );

    let mut calls = tokio::task::JoinSet::new();
    for i in 0..CALLS {
        let client = client.clone();
        calls.spawn(async move { (i, client.call(format!("txn {i}").as_bytes()).await) });
    }
    let mut done = 0;
    let all = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(joined) = calls.join_next().await {
            let (i, result) = joined.unwrap();
            assert_eq!(result.unwrap(), format!("txn {i}").into_bytes());
            done += 1;
        }
    })
    .await;
    assert!(all.is_ok(), "stalled after {done} of {CALLS} calls");
    assert_eq!(done, CALLS, "every queued transaction completed");
    assert_eq!(peak.load(Ordering::SeqCst), LIMIT as usize);
    server.stop().await;
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let pki = pki();
    let settings = TransportSettings {
        max_connections: 1,
        ..TransportSettings::default()
    };
    let server = start(&pki, settings, identity_echo(), Revocations::default());
    let first = connect(&box_tls(&pki, "box-000001"), server.addr)
        .await
        .unwrap();
    assert_eq!(first.call(b"a").await.unwrap(), b"box:box-000001|a");

    let second = box_tls(&pki, "box-000002");
    let err = connect_and_call(&second, server.addr, b"b")
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::Refused), "got {err:?}");
    assert!(err.to_string().contains("connection limit"), "{err}");

    // The slot comes back once the first box leaves (released asynchronously, so retry).
    first.close().await;
    let mut answer = Err(QuicError::Refused);
    for _ in 0..100 {
        answer = connect_and_call(&second, server.addr, b"b").await;
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answer.unwrap(), b"box:box-000002|b");
    server.stop().await;
}

#[tokio::test]
async fn shutdown_lets_in_flight_transactions_finish() {
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let calls = Arc::new(AtomicUsize::new(0));
    let svc = {
        let (entered, release, calls) = (entered.clone(), release.clone(), calls.clone());
        move |_peer: Arc<Peer>, req: Vec<u8>| {
            let (entered, release) = (entered.clone(), release.clone());
            calls.fetch_add(1, Ordering::SeqCst);
            async move {
                entered.notify_one();
                release.notified().await;
                Ok(req)
            }
        }
    };
    let pki = pki();
    let server = start(
        &pki,
        TransportSettings::default(),
        Arc::new(svc),
        Revocations::default(),
    );
    let client = Arc::new(
        connect(&box_tls(&pki, "box-000123"), server.addr)
            .await
            .unwrap(),
    );

    let in_flight = {
        let client = client.clone();
        tokio::spawn(async move { client.call(b"in flight").await })
    };
    entered.notified().await;
    let (stop, task) = server.stop_signal();
    stop.send(()).unwrap();
    // Give the server a moment to see the signal before the late request goes out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let late = {
        let client = client.clone();
        tokio::spawn(async move { client.call(b"too late").await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    release.notify_one();

    assert_eq!(in_flight.await.unwrap().unwrap(), b"in flight");
    let err = late.await.unwrap().unwrap_err();
    assert!(matches!(err, QuicError::ShuttingDown), "got {err:?}");
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "no transaction accepted after shutdown"
    );
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("server did not stop")
        .unwrap();
}

#[tokio::test]
async fn keep_alive_holds_a_quiet_connection_open() {
    // Short timers so the test is quick: with a 2 s idle timeout and 1 s keep-alive, a
    // connection quiet for 3 s survives only because of the keep-alives.
    let settings = TransportSettings {
        keep_alive_secs: 1,
        idle_timeout_secs: 2,
        ..TransportSettings::default()
    };
    let pki = pki();
    let server = start(
        &pki,
        settings.clone(),
        identity_echo(),
        Revocations::default(),
    );
    let client = connect_with(&box_tls(&pki, "box-000123"), &settings, server.addr)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        client.connection().close_reason().is_none(),
        "connection timed out"
    );
    assert_eq!(
        client.call(b"still").await.unwrap(),
        b"box:box-000123|still"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_box_that_changes_address_keeps_its_connection() {
    let pki = pki();
    let server = start(
        &pki,
        TransportSettings::default(),
        identity_echo(),
        Revocations::default(),
    );
    let client = connect(&box_tls(&pki, "box-000123"), server.addr)
        .await
        .unwrap();
    assert_eq!(
        client.call(b"before").await.unwrap(),
        b"box:box-000123|before"
    );
    let old = client.endpoint().local_addr().unwrap();
    // A new UDP socket, as after a NAT rebinding or a DHCP change: connection migration.
    client
        .endpoint()
        .rebind(std::net::UdpSocket::bind("127.0.0.1:0").unwrap())
        .unwrap();
    assert_ne!(client.endpoint().local_addr().unwrap().port(), old.port());
    assert_eq!(
        client.call(b"after").await.unwrap(),
        b"box:box-000123|after"
    );
    server.stop().await;
}
