//! The `headend pki` subcommands, run as the real binary: the PEM files they write serve a real
//! mTLS round trip over QUIC on loopback, and bad input gets a clear error, not a panic.

#[path = "../../transport/tests/quic_support/mod.rs"]
mod quic_support;

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use headend::quic::{
    ClientTls, QuicClient, Revocations, Server, ServerTls, TlsIdentity, TransportSettings,
    load_certs,
};

fn headend(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(args)
        .output()
        .expect("run headend")
}

fn ok(args: &[&str]) {
    let out = headend(args);
    assert!(
        out.status.success(),
        "headend {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[tokio::test]
async fn cli_issued_files_serve_an_mtls_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, boxes, servers) = (
        dir.path().join("ca"),
        dir.path().join("boxes"),
        dir.path().join("servers"),
    );
    ok(&["pki", "init-ca", "--out", s(&ca)]);
    ok(&[
        "pki",
        "issue-device",
        "--ca",
        s(&ca),
        "--box-id",
        "box-000123",
        "--out",
        s(&boxes),
    ]);
    // The gateway's certificate: a role certificate (a box requires the gateway's role).
    ok(&[
        "pki",
        "issue-role",
        "--ca",
        s(&ca),
        "--role",
        "gateway",
        "--name",
        "gateway.purselink.test",
        "--name",
        "localhost",
        "--name",
        "127.0.0.1",
        "--out",
        s(&servers),
    ]);
    for key in [
        ca.join("ca.key.pem"),
        boxes.join("box-000123.key.pem"),
        servers.join("gateway.key.pem"),
    ] {
        let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", key.display());
    }

    let operator_ca = load_certs(&ca.join("ca.crt.pem")).unwrap();
    let server = Server::bind(
        SocketAddr::from(([127, 0, 0, 1], 0)),
        &ServerTls {
            operator_ca: operator_ca.clone(),
            identity: TlsIdentity::from_pem_files(
                &servers.join("gateway.crt.pem"),
                &servers.join("gateway.key.pem"),
            )
            .unwrap(),
        },
        TransportSettings::default(),
        quic_support::identity_echo(),
        Revocations::default(),
    )
    .unwrap();
    let addr = server.local_addr().unwrap();
    let (stop, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(async {
        let _ = rx.await;
    }));

    let tls = ClientTls::new(
        operator_ca,
        TlsIdentity::from_pem_files(
            &boxes.join("box-000123.crt.pem"),
            &boxes.join("box-000123.key.pem"),
        )
        .unwrap(),
        "gateway",
    );
    // The server certificate names 127.0.0.1 and localhost as well as the gateway's DNS name.
    for name in ["gateway.purselink.test", "localhost", "127.0.0.1"] {
        let client = QuicClient::connect(&tls, &TransportSettings::default(), addr, name)
            .await
            .unwrap();
        assert_eq!(client.call(b"hi").await.unwrap(), b"box:box-000123|hi");
        client.close().await;
    }
    stop.send(()).unwrap();
    task.await.unwrap();
}

#[test]
fn bad_input_gets_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca");
    ok(&["pki", "init-ca", "--out", s(&ca)]);

    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["pki", "init-ca", "--out", s(&ca)],
            "a CA already exists here",
        ),
        (
            vec![
                "pki",
                "issue-device",
                "--ca",
                s(&ca),
                "--box-id",
                "Box 1",
                "--out",
                s(dir.path()),
            ],
            "invalid box id",
        ),
        (
            vec![
                "pki",
                "issue-device",
                "--ca",
                s(dir.path()),
                "--box-id",
                "box-1",
                "--out",
                s(dir.path()),
            ],
            "ca.crt.pem",
        ),
        (
            vec![
                "pki",
                "issue-server",
                "--ca",
                s(&ca),
                "--name",
                "not a name!",
                "--out",
                s(dir.path()),
            ],
            "invalid server name",
        ),
    ];
    for (args, expected) in cases {
        let out = headend(&args);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

/// Black-box finding 9: `headend init-demo --split-base-port PORT` writes the split per-role
/// configs the README describes (payment, merchant, bank, load, clearing at PORT+1 …
/// PORT+5; the gateway's endpoints name the first four; the payment server, bank and load
/// server send to clearing through their own `[endpoints.clearing]`), each of which the role
/// loads.
#[test]
fn init_demo_writes_split_configs_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    ok(&[
        "init-demo",
        "--dir",
        s(&out),
        "--listen",
        "127.0.0.1:7400",
        "--split-base-port",
        "7400",
    ]);
    let cfg = |role: &str| {
        headend::config::HeadendConfig::load(&out.join(format!("split/{role}.toml")))
            .unwrap_or_else(|e| panic!("split/{role}.toml: {e}"))
    };
    let gateway = cfg("gateway");
    assert_eq!(
        gateway.gateway.as_ref().unwrap().listen,
        "127.0.0.1:7400".parse().unwrap()
    );
    let listens = [
        ("payment", cfg("payment").payment.unwrap().listen),
        ("merchant", cfg("merchant").merchant.unwrap().listen),
        ("bank", cfg("bank").bank.unwrap().listen),
        ("load", cfg("load").load.unwrap().listen),
    ];
    for (i, (role, listen)) in listens.into_iter().enumerate() {
        let expected: SocketAddr = format!("127.0.0.1:{}", 7401 + i).parse().unwrap();
        assert_eq!(listen, Some(expected), "{role} listens at PORT+{}", i + 1);
        let ep = &gateway.endpoints[role];
        assert_eq!(ep.addr, expected, "the gateway's [endpoints.{role}]");
        assert_eq!(ep.role(role), role);
    }
    let clearing = cfg("clearing").clearing.unwrap();
    let at = "127.0.0.1:7405".parse().unwrap();
    assert_eq!(clearing.listen, Some(at), "clearing listens at PORT+5");
    for sender in ["payment", "bank", "load"] {
        let c = cfg(sender);
        assert_eq!(
            c.endpoints["clearing"].addr, at,
            "{sender}'s [endpoints.clearing]"
        );
        assert!(
            clearing.callers.0.iter().any(|n| n == sender),
            "clearing takes {sender}'s messages"
        );
    }
    assert_eq!(
        cfg("payment").payment.unwrap().clearing.as_deref(),
        Some("clearing")
    );
    // Without the flag, no split directory; a base too high for four more ports is refused.
    let plain = dir.path().join("plain");
    ok(&["init-demo", "--dir", s(&plain)]);
    assert!(!plain.join("split").exists());
    let err = headend(&[
        "init-demo",
        "--dir",
        s(&dir.path().join("high")),
        "--split-base-port",
        "65531",
    ]);
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("past port 65535"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
}
