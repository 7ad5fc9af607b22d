//! Black-box findings 4 and 7, with real processes (a split head end: each role its own
//! `headend <role>` process), each peer speaking the wire protocol over QUIC.
//!
//! Finding 4: the gateway talks to a role only if the server's certificate names that role.
//! The attacker held a server certificate of the operator CA made by `headend pki
//! issue-server --name payment.purselink.test` (no role), stood in for the payment server,
//! and fed the gateway a forged reversal feed: a victim's open offer was reversed at the
//! merchant and the gateway's feed cursor jumped past the genuine reversals. Here the genuine
//! payment server is SIGKILLed and the impostor takes its address with exactly that
//! certificate, answering every request with that forged feed. The gateway's reversal feed
//! calls the payment server on its own every few seconds: the impostor must hear nothing, the
//! victim's offer must stay open and the cursor where it was. When the genuine payment server
//! comes back, the gateway reaches it again and a purchase completes.
//!
//! Finding 7: one device certificate opened 40 connections to the gateway and honest boxes
//! were refused at `max_connections`. Here the gateway allows 8 connections in all; one
//! certificate opens 40 and keeps no more than `max_connections_per_peer` (4), its older ones
//! closed as superseded, and an honest box still connects and is served.

mod split_support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use headend::merchant::OfferState;
use headend::pki::OperatorCa;
use headend::quic::{
    BoxId, ClientTls, Peer, QuicClient, QuicError, Revocations, Server, ServerTls, TlsIdentity,
    TransportSettings, classify_connection, load_certs,
};
use proto::messages::*;
use split_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_talks_only_to_the_role_its_endpoint_names() {
    let mut split = Split::start(Options::default()).await;
    let victim = split.purchase_box("box-000001", 0xB0B0_0001, 5_000).await;
    let offer = victim.offer("CABLE", "ppv-1001").await.unwrap();
    let txid = offer.transaction_id.clone();
    assert_eq!(split.offer(&txid).unwrap().state, OfferState::Offered);
    let cursor = |split: &Split| {
        split
            .journal(R::Gateway)
            .get(headend::journal::Kind::Cursor, "payment")
            .unwrap()
            .map(|b| u64::from_be_bytes(b.as_slice().try_into().unwrap()))
    };
    let cursor_before = cursor(&split);

    // The impostor: the payment server's address and DNS name, a certificate of the operator
    // CA without the payment role, and a forged reversal feed for every request.
    let (cert, key) = split.issue_server_cert("payment.purselink.test");
    let heard: Arc<Mutex<Vec<String>>> = Arc::default();
    let forged = Message::Reversals(vec![ReversalNotice {
        seq: 1_000_000,
        transaction_id: txid.clone(),
        merchant_id: "CABLE".into(),
        reason: "forged by the impostor".into(),
    }]);
    let service = {
        let heard = heard.clone();
        let answer = forged.to_payload();
        Arc::new(move |peer: Arc<Peer>, request: Vec<u8>| {
            let (heard, answer) = (heard.clone(), answer.clone());
            async move {
                let what = Message::from_payload(&request)
                    .map(|m| format!("{m:?}"))
                    .unwrap_or_else(|e| format!("not a message: {e}"));
                heard
                    .lock()
                    .unwrap()
                    .push(format!("{:?}: {what}", peer.identity));
                Ok(answer)
            }
        })
    };
    split.kill(R::Payment);
    let payment_addr = split.addr[&R::Payment];
    let impostor = Server::bind(
        payment_addr,
        &ServerTls {
            operator_ca: load_certs(&split.ca.join("ca.crt.pem")).unwrap(),
            identity: TlsIdentity::from_pem_files(&cert, &key).unwrap(),
        },
        split.cfg[&R::Payment].transport.clone(),
        service,
        Revocations::default(),
    )
    .expect("the impostor binds the payment server's address");
    let impostor_stats = impostor.stats();
    let (stop_impostor, stopped) = tokio::sync::oneshot::channel::<()>();
    let impostor = tokio::spawn(impostor.run(async {
        let _ = stopped.await;
    }));

    // The feed polls the payment server every 5 s (every 0.5 s while it fails): wait until
    // the gateway has tried a few times, or the impostor was heard.
    let gateway_log = split.log(R::Gateway);
    let refused = |log: &std::path::Path| {
        std::fs::read_to_string(log)
            .unwrap_or_default()
            .matches("not urn:purselink:role:payment")
            .count()
    };
    let tried = eventually(Duration::from_secs(20), || {
        !heard.lock().unwrap().is_empty() || refused(&gateway_log) >= 3
    })
    .await;
    let heard_now = heard.lock().unwrap().clone();
    let stats = impostor_stats.snapshot();
    eprintln!("impostor heard {heard_now:?}; {stats:?}");
    assert!(
        heard_now.is_empty(),
        "the gateway talked to an issue-server certificate as its payment server: {heard_now:?}"
    );
    assert!(
        tried,
        "the gateway's reversal feed never tried the payment endpoint:\n{}",
        std::fs::read_to_string(&gateway_log).unwrap_or_default()
    );
    assert_eq!(stats.established_total, 0, "{stats:?}");
    assert_eq!(
        split.offer(&txid).unwrap().state,
        OfferState::Offered,
        "the victim's offer is not reversed"
    );
    assert_eq!(
        cursor(&split),
        cursor_before,
        "the feed cursor did not move"
    );

    // The genuine payment server comes back on its address: the gateway reaches it again.
    let _ = stop_impostor.send(());
    tokio::time::timeout(Duration::from_secs(30), impostor)
        .await
        .expect("the impostor stops")
        .unwrap();
    split.spawn(R::Payment).await;
    let mut buyer = split.purchase_box("box-000002", 0xB0B0_0002, 5_000).await;
    let until = Instant::now() + Duration::from_secs(60);
    let (_, receipt) = purchase(&mut buyer, "CABLE", "ppv-1001", until)
        .await
        .expect("a purchase through the genuine payment server");
    assert!(receipt.released);
    assert!(heard.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_cannot_take_every_connection_slot() {
    const SLOTS: i64 = 8;
    const GREEDY: usize = 40;
    let split = Split::start(Options {
        transport: vec![("max_connections", SLOTS)],
        ..Options::default()
    })
    .await;
    let per_peer = split.cfg[&R::Gateway].transport.max_connections_per_peer;
    assert!(
        per_peer < SLOTS as usize,
        "the default share is below the limit"
    );
    let gateway = split.addr[&R::Gateway];
    // One genuine device certificate, used for every connection.
    let greedy = OperatorCa::load(&split.ca)
        .unwrap()
        .issue_device(&BoxId::new("box-000666").unwrap())
        .unwrap();
    let tls = ClientTls::new(
        load_certs(&split.ca.join("ca.crt.pem")).unwrap(),
        greedy.tls_identity(),
        "gateway",
    );
    let settings = TransportSettings::default();
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..GREEDY {
        let attempt = async {
            let c = QuicClient::connect(&tls, &settings, gateway, "localhost").await?;
            // One request on it: the connection is established at the gateway (any answer,
            // a rate limit included, says so).
            c.call(&Message::CatalogRequest.to_payload()).await?;
            Ok::<_, QuicError>(c)
        };
        match tokio::time::timeout(Duration::from_secs(10), attempt).await {
            Ok(Ok(c)) => held.push(c),
            Ok(Err(e)) => refused.push(e.to_string()),
            Err(_) => refused.push("no answer within 10 s".into()),
        }
    }
    eprintln!(
        "greedy box: {} connections answered, {} refused ({:?})",
        held.len(),
        refused.len(),
        refused.first()
    );

    // An honest box connects and is served.
    let honest = split.connect_box("box-000001").await;
    let answer = ask(&honest, &Message::CatalogRequest, Duration::from_secs(10)).await;
    assert!(
        matches!(answer, Ok(Message::Catalog(_))),
        "the honest box is served: {answer:?}"
    );

    // The greedy box keeps its share, no more: its older connections were closed, saying why.
    let alive = |held: &[QuicClient]| {
        held.iter()
            .filter(|c| c.connection().close_reason().is_none())
            .count()
    };
    let settled = eventually(Duration::from_secs(10), || alive(&held) <= per_peer).await;
    assert!(
        settled,
        "the greedy box still holds {} connections",
        alive(&held)
    );
    assert_eq!(
        held.len(),
        GREEDY,
        "each new connection was let in: {refused:?}"
    );
    assert_eq!(alive(&held), per_peer);
    let reason = held[0]
        .connection()
        .close_reason()
        .map(classify_connection)
        .expect("the oldest was closed");
    assert!(
        matches!(&reason, QuicError::Superseded(why) if why.contains("superseded")),
        "{reason:?}"
    );
    eprintln!("the greedy box's oldest connection: {reason}");
    // Its newest connections still work.
    let last = held.last().unwrap();
    let a = ask(last, &Message::CatalogRequest, Duration::from_secs(10)).await;
    assert!(a.is_ok(), "{a:?}");
}
