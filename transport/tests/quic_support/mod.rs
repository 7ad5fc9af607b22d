//! Shared fixture for the `quic_*` tests: an in-memory operator CA, a real server on
//! 127.0.0.1:0, and box clients with device certificates.

#![allow(dead_code)] // each test file uses part of it

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use transport::pki::{IssuedCert, OperatorCa};
use transport::{
    BoxId, ClientTls, QuicClient, QuicError, Revocations, Server, ServerTls, Service,
    TransportSettings,
};

pub const SERVER_NAME: &str = "gateway.purselink.test";

pub struct Pki {
    pub ca: OperatorCa,
    pub server: IssuedCert,
}

pub fn pki() -> Pki {
    let ca = OperatorCa::generate().unwrap();
    let server = ca
        .issue_role(
            "gateway",
            &[SERVER_NAME.into(), "localhost".into(), "127.0.0.1".into()],
            false,
        )
        .unwrap();
    Pki { ca, server }
}

pub fn box_id(id: &str) -> BoxId {
    BoxId::new(id).unwrap()
}

/// A box's TLS settings: the operator CA as root and its own device certificate.
pub fn box_tls(pki: &Pki, id: &str) -> ClientTls {
    let cert = pki.ca.issue_device(&box_id(id)).unwrap();
    ClientTls::new(vec![pki.ca.cert_der()], cert.tls_identity(), "gateway")
}

pub struct Running {
    pub addr: SocketAddr,
    pub revocations: Revocations,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Signals shutdown and waits (bounded, so a hang fails the test instead of stalling it).
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("server did not shut down")
            .unwrap();
    }

    pub fn stop_signal(
        self,
    ) -> (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ) {
        (self.stop, self.task)
    }
}

pub fn start(
    pki: &Pki,
    settings: TransportSettings,
    service: Arc<dyn Service>,
    revocations: Revocations,
) -> Running {
    let server = Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &ServerTls {
            operator_ca: vec![pki.ca.cert_der()],
            identity: pki.server.tls_identity(),
        },
        settings,
        service,
        revocations,
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let revocations = server.revocations();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));
    Running {
        addr,
        revocations,
        stop,
        task,
    }
}

/// Answers `<peer identity>|<request>`, so a test sees which identity the handler got.
pub fn identity_echo() -> Arc<dyn Service> {
    Arc::new(|peer: Arc<transport::Peer>, request: Vec<u8>| async move {
        let who = match &peer.identity {
            transport::PeerIdentity::Box(id) => format!("box:{id}"),
            transport::PeerIdentity::Role(name) => format!("role:{name}"),
            transport::PeerIdentity::Other(name) => format!("other:{name}"),
        };
        let mut out = who.into_bytes();
        out.push(b'|');
        out.extend_from_slice(&request);
        Ok(out)
    })
}

pub async fn connect(tls: &ClientTls, addr: SocketAddr) -> Result<QuicClient, QuicError> {
    connect_with(tls, &TransportSettings::default(), addr).await
}

pub async fn connect_with(
    tls: &ClientTls,
    settings: &TransportSettings,
    addr: SocketAddr,
) -> Result<QuicClient, QuicError> {
    QuicClient::connect(tls, settings, addr, SERVER_NAME).await
}

/// Connects and makes one call: the error, wherever it shows up (a TLS 1.3 client may finish
/// its handshake before the server has judged its certificate, so a refusal can surface at the
/// first call rather than at connect).
pub async fn connect_and_call(
    tls: &ClientTls,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>, QuicError> {
    let client = connect(tls, addr).await?;
    tokio::time::timeout(Duration::from_secs(30), client.call(payload))
        .await
        .expect("call hung instead of failing")
}
