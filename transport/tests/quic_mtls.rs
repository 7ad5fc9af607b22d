//! Mutual TLS over real QUIC on loopback: the box identity reaches the handler; no
//! certificate, a certificate from another CA, a wrong ALPN and a revoked box are refused, each
//! with its own reason, and the service never runs for them.

mod quic_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use quic_support::*;
use transport::pki::OperatorCa;
use transport::{
    ClientTls, Peer, QuicError, RevocationConfig, Revocations, Service, TransportSettings,
};

/// An identity echo that counts its calls, to show refused peers never reach it.
fn counted() -> (Arc<dyn Service>, Arc<AtomicUsize>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let inner = identity_echo();
    let c = calls.clone();
    let svc = move |peer: Arc<Peer>, req: Vec<u8>| {
        c.fetch_add(1, Ordering::SeqCst);
        let inner = inner.clone();
        async move { inner.call(peer, req).await }
    };
    (Arc::new(svc), calls)
}

#[tokio::test]
async fn round_trip_carries_the_box_identity() {
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
    // Several transactions, each on its own stream, on one long-lived connection.
    for i in 0..3 {
        let req = format!("draw request {i}");
        let resp = client.call(req.as_bytes()).await.unwrap();
        assert_eq!(resp, format!("box:box-000123|{req}").into_bytes());
    }
    client.close().await;
    server.stop().await;
}

#[tokio::test]
async fn role_certificate_maps_to_a_role_identity() {
    let pki = pki();
    let server = start(
        &pki,
        TransportSettings::default(),
        identity_echo(),
        Revocations::default(),
    );
    let role = pki
        .ca
        .issue_role("gateway", &["gateway.purselink.test".into()], true)
        .unwrap();
    let tls = ClientTls::new(vec![pki.ca.cert_der()], role.tls_identity(), "gateway");
    let resp = connect_and_call(&tls, server.addr, b"x").await.unwrap();
    assert_eq!(
        resp, b"role:gateway|x",
        "the role URI names it, not the DNS name"
    );
    server.stop().await;
}

#[tokio::test]
async fn a_server_only_certificate_cannot_be_a_client() {
    // An internet merchant's server certificate (server authentication only), or a role
    // that calls nobody: the TLS handshake refuses it as a client identity.
    let pki = pki();
    let (svc, calls) = counted();
    let server = start(
        &pki,
        TransportSettings::default(),
        svc,
        Revocations::default(),
    );
    for cert in [
        pki.ca.issue_server(&["shop.example.net".into()]).unwrap(),
        pki.ca
            .issue_role("merchant", &["merchant.purselink.test".into()], false)
            .unwrap(),
    ] {
        let tls = ClientTls::new(vec![pki.ca.cert_der()], cert.tls_identity(), "gateway");
        let err = connect_and_call(&tls, server.addr, b"x").await.unwrap_err();
        assert!(
            matches!(
                err,
                transport::QuicError::BadCertificate(_) | transport::QuicError::Tls { .. }
            ),
            "{err:?}"
        );
    }
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn no_client_certificate_is_refused() {
    let pki = pki();
    let (svc, calls) = counted();
    let server = start(
        &pki,
        TransportSettings::default(),
        svc,
        Revocations::default(),
    );
    let tls = ClientTls {
        identity: None,
        ..box_tls(&pki, "box-000001")
    };
    let err = connect_and_call(&tls, server.addr, b"hello")
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::NoClientCertificate), "got {err:?}");
    assert!(err.to_string().contains("no client certificate"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn certificate_from_another_ca_is_refused() {
    let pki = pki();
    let (svc, calls) = counted();
    let server = start(
        &pki,
        TransportSettings::default(),
        svc,
        Revocations::default(),
    );
    let rogue_ca = OperatorCa::generate().unwrap();
    let rogue = rogue_ca.issue_device(&box_id("box-000123")).unwrap();
    // It trusts the real server, but its own certificate is from the rogue CA.
    let tls = ClientTls::new(vec![pki.ca.cert_der()], rogue.tls_identity(), "gateway");
    let err = connect_and_call(&tls, server.addr, b"hello")
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::UnknownCa), "got {err:?}");
    assert_eq!(err.to_string(), "certificate not signed by the operator CA");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn server_from_another_ca_is_refused_by_the_box() {
    let pki = pki();
    let rogue = quic_support::Pki {
        ca: OperatorCa::generate().unwrap(),
        server: pki.server.clone(),
    };
    let rogue = quic_support::Pki {
        server: rogue.ca.issue_server(&[SERVER_NAME.into()]).unwrap(),
        ..rogue
    };
    let (svc, calls) = counted();
    let server = start(
        &rogue,
        TransportSettings::default(),
        svc,
        Revocations::default(),
    );
    let err = connect_and_call(&box_tls(&pki, "box-000123"), server.addr, b"hello")
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::UnknownCa), "got {err:?}");
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

/// A server certificate of the operator CA is the gateway only if it names the gateway's role
/// (black-box finding 3): an `issue-server` certificate for the gateway's own DNS name, or
/// another role's, fails the box's handshake with a reason naming the role; the server's
/// service never runs.
#[tokio::test]
async fn a_server_that_does_not_name_the_expected_role_is_refused() {
    let mut pki = pki();
    let gateway_server = pki.server.clone();
    let names = vec![SERVER_NAME.to_string()];
    for (what, server_cert, expect) in [
        (
            "issue-server",
            pki.ca.issue_server(&names).unwrap(),
            "names no role",
        ),
        (
            "the payment role's",
            pki.ca.issue_role("payment", &names, false).unwrap(),
            "names role payment",
        ),
    ] {
        pki.server = server_cert;
        let (svc, calls) = counted();
        let server = start(
            &pki,
            TransportSettings::default(),
            svc,
            Revocations::default(),
        );
        let err = connect_and_call(&box_tls(&pki, "box-000123"), server.addr, b"voucher")
            .await
            .unwrap_err();
        eprintln!("{what}: {err}");
        match &err {
            QuicError::BadCertificate(reason) => assert!(
                reason.contains(expect) && reason.contains("urn:purselink:role:gateway"),
                "{what}: {reason}"
            ),
            other => panic!("{what}: expected a certificate refusal, got {other:?}"),
        }
        assert_eq!(calls.load(Ordering::SeqCst), 0, "{what}: the service ran");
        server.stop().await;
    }
    // The gateway calling the payment role expects "payment": the gateway's own certificate
    // (a role certificate of the operator CA, but another role) is not it.
    pki.server = gateway_server;
    let (svc, calls) = counted();
    let server = start(
        &pki,
        TransportSettings::default(),
        svc,
        Revocations::default(),
    );
    let gateway = pki
        .ca
        .issue_role("gateway", &["gateway.purselink.test".into()], true)
        .unwrap();
    let tls = ClientTls::new(vec![pki.ca.cert_der()], gateway.tls_identity(), "payment");
    let err = connect_and_call(&tls, server.addr, b"x").await.unwrap_err();
    assert!(
        matches!(&err, QuicError::BadCertificate(r) if r.contains("names role gateway, not urn:purselink:role:payment")),
        "{err:?}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn wrong_alpn_is_refused() {
    let pki = pki();
    let (svc, calls) = counted();
    let server = start(
        &pki,
        TransportSettings::default(),
        svc,
        Revocations::default(),
    );
    let tls = ClientTls {
        alpn: vec![b"h3".to_vec()],
        ..box_tls(&pki, "box-000123")
    };
    let err = connect_and_call(&tls, server.addr, b"hello")
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::AlpnMismatch), "got {err:?}");
    assert!(err.to_string().contains("ALPN mismatch"));
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    server.stop().await;
}

#[tokio::test]
async fn revoked_box_is_refused_with_its_reason() {
    let pki = pki();
    let (svc, calls) = counted();
    let revocations = Revocations::new(&RevocationConfig {
        box_ids: vec!["box-000666".into()],
        ..RevocationConfig::default()
    });
    let server = start(&pki, TransportSettings::default(), svc, revocations);

    let err = connect_and_call(&box_tls(&pki, "box-000666"), server.addr, b"hello")
        .await
        .unwrap_err();
    match &err {
        QuicError::BoxRevoked(reason) => assert_eq!(reason, "box revoked: box-000666"),
        other => panic!("expected BoxRevoked, got {other:?}"),
    }
    assert_eq!(calls.load(Ordering::SeqCst), 0);

    // Another box is unaffected.
    let ok = connect_and_call(&box_tls(&pki, "box-000667"), server.addr, b"hi")
        .await
        .unwrap();
    assert_eq!(ok, b"box:box-000667|hi");
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Revoked at run time, by box id, for its next connection.
    server.revocations.revoke_box(&box_id("box-000667"));
    let err = connect_and_call(&box_tls(&pki, "box-000667"), server.addr, b"hi")
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::BoxRevoked(_)), "got {err:?}");
    server.stop().await;
}

#[tokio::test]
async fn revocation_by_certificate_fingerprint_and_serial() {
    let pki = pki();
    let stolen = pki.ca.issue_device(&box_id("box-000777")).unwrap();
    let reissued = pki.ca.issue_device(&box_id("box-000777")).unwrap();
    let fingerprint = transport::identity::fingerprint(&stolen.cert_der());
    let revocations = Revocations::new(&RevocationConfig {
        fingerprints: vec![fingerprint.to_uppercase()],
        ..RevocationConfig::default()
    });
    let server = start(
        &pki,
        TransportSettings::default(),
        identity_echo(),
        revocations.clone(),
    );
    let tls = |c: &transport::pki::IssuedCert| {
        ClientTls::new(vec![pki.ca.cert_der()], c.tls_identity(), "gateway")
    };

    let err = connect_and_call(&tls(&stolen), server.addr, b"x")
        .await
        .unwrap_err();
    match &err {
        QuicError::BoxRevoked(reason) => assert!(reason.contains(&fingerprint), "{reason}"),
        other => panic!("expected BoxRevoked, got {other:?}"),
    }
    // The same box with a re-issued certificate gets in.
    assert_eq!(
        connect_and_call(&tls(&reissued), server.addr, b"x")
            .await
            .unwrap(),
        b"box:box-000777|x"
    );

    // By serial: learn it from what the server saw, then revoke it.
    let serial = {
        let seen = Arc::new(std::sync::Mutex::new(String::new()));
        let s = seen.clone();
        let svc = move |peer: Arc<Peer>, _req: Vec<u8>| {
            *s.lock().unwrap() = peer.serial.clone();
            async { Ok(Vec::new()) }
        };
        let probe = start(
            &pki,
            TransportSettings::default(),
            Arc::new(svc),
            Revocations::default(),
        );
        connect_and_call(&tls(&reissued), probe.addr, b"x")
            .await
            .unwrap();
        probe.stop().await;
        seen.lock().unwrap().clone()
    };
    assert!(!serial.is_empty());
    revocations.replace(&RevocationConfig {
        serials: vec![serial.clone()],
        ..RevocationConfig::default()
    });
    let err = connect_and_call(&tls(&reissued), server.addr, b"x")
        .await
        .unwrap_err();
    match &err {
        QuicError::BoxRevoked(reason) => assert!(reason.contains(&serial), "{reason}"),
        other => panic!("expected BoxRevoked, got {other:?}"),
    }
    server.stop().await;
}

#[test]
fn transport_settings_read_from_toml_and_validate() {
    let s: TransportSettings =
        toml::from_str("keep_alive_secs = 20\nidle_timeout_secs = 90\nmax_connections = 5")
            .unwrap();
    assert_eq!(s.keep_alive_secs, 20);
    assert_eq!(
        s.max_streams_per_connection,
        TransportSettings::default().max_streams_per_connection
    );
    assert!(s.validate().is_ok());
    let bad = TransportSettings {
        keep_alive_secs: 60,
        idle_timeout_secs: 60,
        ..TransportSettings::default()
    };
    assert!(bad.validate().is_err());
    assert!(toml::from_str::<TransportSettings>("keepalive = 1").is_err());
}
