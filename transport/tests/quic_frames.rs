//! Frame-level refusals over real QUIC on loopback: an oversize frame, garbage bytes, a wrong
//! version byte, a truncated frame and a request that never completes each get their specific
//! error, and the connection keeps serving other streams. (Two frames on one stream are a
//! transaction's two steps, answered in turn: `two_steps_on_one_stream_are_answered_in_turn`.)

mod quic_support;

use std::sync::Arc;
use std::time::Duration;

use proto::frame::{self, DEFAULT_MAX_FRAME, FrameError};
use quic_support::*;
use transport::frame_io::read_frame;
use transport::{QuicError, Revocations, TransportSettings, call_with_max};

/// Sends raw bytes on a new stream, finishes it, and returns how the server answered.
async fn raw_exchange(
    conn: &quinn::Connection,
    bytes: &[u8],
    finish: bool,
) -> Result<Vec<u8>, QuicError> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The server may refuse before it has read everything; its answer is on our receive side.
    let _ = send.write_all(bytes).await;
    if finish {
        let _ = send.finish();
    }
    let answer = tokio::time::timeout(
        Duration::from_secs(30),
        read_frame(&mut recv, DEFAULT_MAX_FRAME),
    )
    .await
    .expect("server neither answered nor refused");
    Ok(answer?)
}

#[tokio::test]
async fn oversize_frame_is_refused_and_the_connection_survives() {
    let pki = pki();
    let settings = TransportSettings {
        max_frame: 1024,
        ..TransportSettings::default()
    };
    let server = start(&pki, settings, identity_echo(), Revocations::default());
    let client = connect(&box_tls(&pki, "box-000123"), server.addr)
        .await
        .unwrap();

    // The box's own limit refuses it before sending.
    let err = call_with_max(client.connection(), &[7u8; 2000], 1024)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            QuicError::FrameTooLarge {
                len: 2001,
                max: 1024
            }
        ),
        "got {err:?}"
    );

    // A box with a larger limit sends it; the server refuses it by its header.
    let err = call_with_max(client.connection(), &[7u8; 2000], 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::PeerFrameTooLarge), "got {err:?}");
    assert!(err.to_string().starts_with("frame too large"), "{err}");

    // A header claiming 4 GiB, with no body: refused without the server waiting for it.
    let err = raw_exchange(client.connection(), &u32::MAX.to_be_bytes(), false)
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::PeerFrameTooLarge), "got {err:?}");

    // A request of exactly the limit is read; the echo (15 bytes longer) would exceed the
    // limit, so the server refuses to send it rather than send what the box can't read.
    let err = call_with_max(client.connection(), &[1u8; 1023], 1 << 20)
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::ServiceFailed), "got {err:?}");
    // A response of exactly the limit passes.
    let payload = vec![1u8; 1023 - 15];
    let resp = call_with_max(client.connection(), &payload, 1024)
        .await
        .unwrap();
    assert_eq!(&resp[..15], b"box:box-000123|");
    assert_eq!(&resp[15..], &payload[..]);
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn garbage_frames_get_a_clear_error_and_other_streams_carry_on() {
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
    let conn = client.connection().clone();

    // A good transaction in flight on the same connection while garbage arrives.
    let good = {
        let conn = conn.clone();
        tokio::spawn(async move { transport::call(&conn, b"still here").await })
    };

    let mut wrong_version = frame::encode(b"draw", DEFAULT_MAX_FRAME).unwrap();
    wrong_version[4] = 9;
    let truncated = frame::encode(b"cut short", DEFAULT_MAX_FRAME).unwrap()[..8].to_vec();
    let cases: [(&str, Vec<u8>); 4] = [
        ("wrong version byte", wrong_version),
        ("text, not a frame", b"\0\0\0\x05hello purselink".to_vec()),
        ("truncated frame", truncated),
        ("empty frame", vec![0, 0, 0, 0]),
    ];
    for (what, bytes) in cases {
        let err = raw_exchange(&conn, &bytes, true).await.unwrap_err();
        assert!(
            matches!(err, QuicError::PeerBadFrame),
            "{what}: got {err:?}"
        );
        assert!(err.to_string().starts_with("bad frame"), "{what}: {err}");
    }
    // Random bytes: whatever their first four say, the answer is a specific refusal.
    let random: Vec<u8> = (0..64u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let err = raw_exchange(&conn, &random, true).await.unwrap_err();
    assert!(
        matches!(err, QuicError::PeerBadFrame | QuicError::PeerFrameTooLarge),
        "random bytes: got {err:?}"
    );

    assert_eq!(good.await.unwrap().unwrap(), b"box:box-000123|still here");
    // The connection still serves new streams.
    assert_eq!(
        client.call(b"after").await.unwrap(),
        b"box:box-000123|after"
    );
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn an_oversize_response_is_refused_by_the_box() {
    // The box applies the same frame checks to what the server sends.
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
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&frame::encode(b"x", DEFAULT_MAX_FRAME).unwrap())
        .await
        .unwrap();
    send.finish().unwrap();
    // Read with a limit smaller than the answer: refused as oversize, never buffered.
    let err = read_frame(&mut recv, 4).await.unwrap_err();
    assert!(
        matches!(
            err,
            transport::frame_io::FrameReadError::Frame(FrameError::Oversize { max: 4, .. })
        ),
        "got {err:?}"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_request_that_never_completes_times_out() {
    let pki = pki();
    let settings = TransportSettings {
        request_timeout_ms: 300,
        ..TransportSettings::default()
    };
    let server = start(&pki, settings, identity_echo(), Revocations::default());
    let client = connect(&box_tls(&pki, "box-000123"), server.addr)
        .await
        .unwrap();
    // Half a frame and no end of stream: the server must not hold the stream forever.
    let half = frame::encode(b"never finished", DEFAULT_MAX_FRAME).unwrap()[..6].to_vec();
    let err = raw_exchange(client.connection(), &half, false)
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::PeerTimeout), "got {err:?}");
    assert_eq!(client.call(b"ok").await.unwrap(), b"box:box-000123|ok");
    server.stop().await;
}

#[tokio::test]
async fn a_failing_service_is_reported_and_the_connection_survives() {
    let pki = pki();
    let svc = |_peer, req: Vec<u8>| async move {
        if req == b"fail" {
            Err("payment server unreachable".into())
        } else {
            Ok(req)
        }
    };
    let server = start(
        &pki,
        TransportSettings::default(),
        Arc::new(svc),
        Revocations::default(),
    );
    let client = connect(&box_tls(&pki, "box-000123"), server.addr)
        .await
        .unwrap();
    let err = client.call(b"fail").await.unwrap_err();
    assert!(matches!(err, QuicError::ServiceFailed), "got {err:?}");
    assert_eq!(client.call(b"fine").await.unwrap(), b"fine");
    server.stop().await;
}

#[tokio::test]
async fn two_steps_on_one_stream_are_answered_in_turn() {
    let pki = pki();
    let server = start(
        &pki,
        TransportSettings::default(),
        identity_echo(),
        Revocations::default(),
    );
    let client = connect(&box_tls(&pki, "box-000321"), server.addr)
        .await
        .unwrap();
    // A purchase's two steps on one stream: the answer to the first arrives before the
    // second is sent (the box needs the debit command to run DEBIT).
    let mut txn = client.transaction().await.unwrap();
    let first = txn.exchange(b"draw request").await.unwrap();
    assert_eq!(first, b"box:box-000321|draw request");
    let second = txn.last(b"debit response").await.unwrap();
    assert_eq!(second, b"box:box-000321|debit response");
    // Two frames written at once are two steps too, answered in order.
    let mut both = frame::encode(b"one", DEFAULT_MAX_FRAME).unwrap();
    both.extend(frame::encode(b"two", DEFAULT_MAX_FRAME).unwrap());
    let (mut send, mut recv) = client.connection().open_bi().await.unwrap();
    send.write_all(&both).await.unwrap();
    send.finish().unwrap();
    let a = transport::frame_io::read_next_frame(&mut recv, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let b = transport::frame_io::read_next_frame(&mut recv, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    let end = transport::frame_io::read_next_frame(&mut recv, DEFAULT_MAX_FRAME)
        .await
        .unwrap();
    assert_eq!(
        (a.as_deref(), b.as_deref(), end),
        (
            Some(&b"box:box-000321|one"[..]),
            Some(&b"box:box-000321|two"[..]),
            None
        )
    );
}
