//! Black-box finding 3: a server certificate of the operator CA without the gateway's role
//! (`headend pki issue-server --name <the gateway's name>`) must not pass for the gateway.
//!
//! The attacker's fake gateway completed the handshake with an honest box, read the voucher
//! code from its `LoadOfferRequest` and relayed the purchase as a man in the middle. Here the
//! daemon (the same code `stbd run` runs, over real QUIC with its device certificate, on a
//! real virtual card, driven by remote keys) starts a voucher load against a fake gateway
//! presenting such a certificate: the handshake must fail and the fake must hear nothing.
//! The same fake with a genuine gateway certificate (`issue-role --role gateway`) does get
//! the request, so the silence is the role check and not a broken harness.

mod support;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use headend::pki::{IssuedCert, OperatorCa};
use headend::quic::{BoxId, Revocations, Server, ServerStats, ServerTls, TransportSettings};
use proto::messages::{ErrorCode, Message};
use support::{Box_, Pki, card_file, config, start_box};
use ui::{RemoteKey, ScreenId};

const GATEWAY_NAME: &str = "gateway.test";
const VOUCHER: &str = "V7KQ-3M9X-T2PD-8HWN";

/// A gateway impostor: the real transport server with `cert`, recording every message a box
/// sends it (and answering each with Busy).
struct Fake {
    addr: SocketAddr,
    stats: ServerStats,
    heard: Arc<Mutex<Vec<Message>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Fake {
    fn start(ca: &OperatorCa, cert: &IssuedCert) -> Fake {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let h = heard.clone();
        let service = Arc::new(move |_peer: Arc<headend::quic::Peer>, request: Vec<u8>| {
            let h = h.clone();
            async move {
                if let Ok(m) = Message::from_payload(&request) {
                    h.lock().unwrap().push(m);
                }
                Ok(Message::error(ErrorCode::Busy, "fake", None).to_payload())
            }
        });
        let server = Server::bind(
            ([127, 0, 0, 1], 0).into(),
            &ServerTls {
                operator_ca: vec![ca.cert_der()],
                identity: cert.tls_identity(),
            },
            TransportSettings::default(),
            service,
            Revocations::default(),
        )
        .unwrap();
        let (stop, rx) = tokio::sync::oneshot::channel::<()>();
        let fake = Fake {
            addr: server.local_addr().unwrap(),
            stats: server.stats(),
            heard,
            stop: Some(stop),
        };
        tokio::spawn(server.run(async {
            let _ = rx.await;
        }));
        fake
    }

    fn heard(&self) -> Vec<String> {
        self.heard
            .lock()
            .unwrap()
            .iter()
            .map(|m| format!("{m:?}"))
            .collect()
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// The box's files, named as the shared support's [`config`] expects them.
fn box_pki(dir: &std::path::Path, ca: &OperatorCa, server: &IssuedCert) -> Pki {
    let device = ca
        .issue_device(&BoxId::new("box-000001").unwrap())
        .unwrap()
        .save(&dir.join("box"), "box-000001")
        .unwrap();
    let ca_pem = dir.join("ca.pem");
    std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
    Pki {
        ca_pem,
        dev_cert: device.cert,
        dev_key: device.key,
        server_chain: vec![server.cert_der()],
        server_key: Vec::new(),
        ca_der: ca.cert_der(),
    }
}

/// F2 → "2" (the voucher): the box asks the gateway for a load offer naming its voucher.
async fn voucher_load(b: &mut Box_) -> ScreenId {
    b.until("card on the home screen", |s| s.card_balance.is_some())
        .await;
    b.key(RemoteKey::Green).await;
    b.until("Load from:", |s| s.screen == ScreenId::LoadSource)
        .await;
    b.key(RemoteKey::Digit(2)).await;
    b.until("the load offer's outcome", |s| {
        matches!(s.screen, ScreenId::Error | ScreenId::LoadAmount)
    })
    .await
    .screen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_without_the_gateway_role_is_not_the_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let ca = OperatorCa::generate().unwrap();
    let card = card_file(dir.path());

    // The attacker's certificate: genuine operator CA, the gateway's DNS name, no role.
    let impostor_cert = ca.issue_server(&[GATEWAY_NAME.into()]).unwrap();
    let impostor = Fake::start(&ca, &impostor_cert);
    let pki = box_pki(dir.path(), &ca, &impostor_cert);
    let mut cfg = config(dir.path(), &pki, impostor.addr, &card, 3);
    cfg.load.voucher = Some(VOUCHER.into());
    assert_eq!(cfg.headend.server_role, "gateway", "the default");
    let mut b = start_box(cfg.clone(), &card).await;
    let screen = voucher_load(&mut b).await;
    b.stop().await;
    let heard = impostor.heard();
    let stats = impostor.stats.snapshot();
    eprintln!("impostor: heard {heard:?}; {stats:?}");
    assert!(
        heard.is_empty(),
        "the impostor with an issue-server certificate heard the box: {heard:?}"
    );
    assert_eq!(
        stats.established_total, 0,
        "no connection with the impostor: {stats:?}"
    );
    assert!(
        stats.handshake_failures >= 1,
        "the box tried, and the handshake failed: {stats:?}"
    );
    assert_eq!(
        screen,
        ScreenId::Error,
        "the viewer sees the head end unreachable"
    );

    // Another role's certificate is not the gateway either.
    let payment_cert = ca
        .issue_role("payment", &[GATEWAY_NAME.into()], false)
        .unwrap();
    let payment = Fake::start(&ca, &payment_cert);
    let mut other = cfg.clone();
    other.headend.address = payment.addr.to_string().as_str().into();
    let mut b = start_box(other, &card).await;
    voucher_load(&mut b).await;
    b.stop().await;
    assert!(payment.heard().is_empty(), "{:?}", payment.heard());
    assert_eq!(payment.stats.snapshot().established_total, 0);

    // The control: a certificate issued for the gateway's role is the gateway.
    let gateway_cert = ca
        .issue_role("gateway", &[GATEWAY_NAME.into()], true)
        .unwrap();
    let genuine = Fake::start(&ca, &gateway_cert);
    let mut honest = cfg.clone();
    honest.headend.address = genuine.addr.to_string().as_str().into();
    let mut b = start_box(honest, &card).await;
    voucher_load(&mut b).await;
    b.stop().await;
    let heard = genuine.heard();
    assert!(
        heard.iter().any(|m| m.starts_with("LoadOfferRequest")),
        "the genuine gateway gets the load offer request: {heard:?}"
    );
    // Nothing changed on the card.
    assert_eq!(support::balance(&card), 1_000);
}
