//! The local app API over a real Unix socket: a payment requested by a test client is
//! confirmed with OK on the (headless) UI, a second one is cancelled with BACK; a bad line
//! gets a specific error; the socket's mode is the configured one.

mod support;

use std::os::unix::fs::PermissionsExt;

use stb::local_api::server::LocalApi;
use support::*;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use ui::RemoteKey;

async fn ask(
    rd: &mut BufReader<tokio::net::unix::OwnedReadHalf>,
    wr: &mut tokio::net::unix::OwnedWriteHalf,
    line: &str,
) -> serde_json::Value {
    wr.write_all(format!("{line}\n").as_bytes()).await.unwrap();
    let mut out = String::new();
    rd.read_line(&mut out).await.unwrap();
    serde_json::from_str(&out).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pay_confirmed_by_ok_then_cancelled_by_back() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let fake = FakeHeadEnd::start(&pki, Quirks::default()).await;
    let card = card_file(dir.path());
    let mut b = start_box(config(dir.path(), &pki, fake.addr, &card, 5), &card).await;
    b.until("card", |s| s.card_balance.is_some()).await;

    let sock = dir.path().join("stbd.sock");
    let api = LocalApi::bind(&sock, 0o660, None, &[]).unwrap();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    tokio::spawn(api.serve(b.events.clone()));

    let (rd, mut wr) = UnixStream::connect(&sock).await.unwrap().into_split();
    let mut rd = BufReader::new(rd);
    let v = ask(&mut rd, &mut wr, "{\"op\":\"pay\"}").await;
    assert_eq!(v["result"], "error");
    assert!(v["reason"].as_str().unwrap().contains("merchant_id"), "{v}");

    let pay = r#"{"op":"pay","merchant_id":"cable","item_id":"ppv-7","id":1}"#;
    let keys = b.keys.clone();
    let mut status = b.status.clone();
    let presser = tokio::spawn(async move {
        for k in [RemoteKey::Ok, RemoteKey::Back] {
            status.wait_for(|s| s.offer.is_some()).await.unwrap();
            keys.send(ui::UiEvent::Key(k)).await.unwrap();
            status.wait_for(|s| s.offer.is_none()).await.unwrap();
        }
    });
    let v = ask(&mut rd, &mut wr, pay).await;
    assert_eq!(v["result"], "paid", "{v}");
    assert_eq!(v["id"], 1);
    assert_eq!(v["new_balance"], 1000 - PRICE);
    assert_eq!(v["entitlement"], "ent-ppv-7");
    let v = ask(&mut rd, &mut wr, &pay.replace("\"id\":1", "\"id\":2")).await;
    assert_eq!(v["result"], "cancelled", "{v}");
    assert_eq!(v["id"], 2);
    presser.await.unwrap();
    assert_eq!(balance(&card), 1000 - PRICE);
    b.until("idle", |s| s.flows_done == 2).await;
    b.stop().await;
}

#[test]
fn a_non_socket_file_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("stbd.sock");
    std::fs::write(&p, "precious").unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let e = rt.block_on(async {
        LocalApi::bind(&p, 0o660, None, &[])
            .err()
            .unwrap()
            .to_string()
    });
    assert!(e.contains("not a socket"), "{e}");
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "precious");
    let e = rt.block_on(async {
        LocalApi::bind(
            &dir.path().join("s2"),
            0o660,
            Some("no-such-group-xyz"),
            &[],
        )
        .err()
        .unwrap()
        .to_string()
    });
    assert!(e.contains("no-such-group-xyz"), "{e}");
}
