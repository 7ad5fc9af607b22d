//! A load server SIGKILLed between S2 and S3 and restarted. Real processes: the load server
//! is the `headend load` binary (config from `init_demo`), killed with SIGKILL; the gateway
//! and the bank run in the test process and reach it over QUIC on loopback. The load
//! completes when the box re-sends the card's response, or is cleanly reversed through the
//! zero-value procedure when the card never ran LOAD — never paid twice, no hold left.

mod load_support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use headend::assembly::Roles;
use headend::funds::HoldState;
use load_support::*;
use proto::messages::*;

fn free_udp_port() -> SocketAddr {
    headend::assembly::free_loopback_ports(1).unwrap()[0]
}

/// Starts `headend load` on the deployment's config, but with the load server's own role
/// certificate (`certs/load.*`, from init-demo): the gateway calls `[endpoints.load]` only if
/// the server's certificate names the load role.
fn spawn_load_server(config: &Path, log: &Path) -> Child {
    let text = std::fs::read_to_string(config).unwrap();
    let own = text
        .replace("certs/gateway.crt.pem", "certs/load.crt.pem")
        .replace("certs/gateway.key.pem", "certs/load.key.pem");
    assert_ne!(own, text, "the config names the gateway's certificate");
    let config = config.with_file_name("load-server.toml");
    std::fs::write(&config, own).unwrap();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(["load", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap()
}

fn sigkill(child: &mut Child) {
    // std's Child::kill sends SIGKILL on Unix: no shutdown path runs.
    child.kill().unwrap();
    let status = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "killed by SIGKILL");
}

/// Re-sends `msg` while the load server is unreachable (Busy), bounded.
async fn until_answered(b: &LoadBox, msg: &Message) -> Message {
    for _ in 0..60 {
        match b.call(msg).await {
            Message::Error(e) if e.code == ErrorCode::Busy => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            other => return other,
        }
    }
    panic!("the load server never came back")
}

/// A head end whose load server is a separate `headend load` process on `addr`.
async fn split_head_end() -> (HeadEnd, SocketAddr) {
    let addr = free_udp_port();
    let he = start_roles(
        Roles {
            load: false,
            ..Roles::ALL
        },
        |text| {
            // The child load server sends no load advices: the clearing role is in the
            // parent, which the child cannot reach (it would refuse to start, saying so).
            let text = text.replacen("[load]\nclearing = \"clearing\"\n", "[load]\n", 1);
            let text = text.replacen(
                "float_account = \"ISSUER-FLOAT-PREFUNDED\"\n",
                &format!("float_account = \"ISSUER-FLOAT-PREFUNDED\"\nlisten = \"{addr}\"\n"),
                1,
            );
            // Short timeouts so a dead load server is noticed in seconds, not a minute.
            format!(
                "{text}\n[transport]\nkeep_alive_secs = 1\nidle_timeout_secs = 3\n\n[endpoints.load]\naddr = \"{addr}\"\nserver_name = \"localhost\"\n"
            )
        },
    )
    .await;
    assert!(he.running.load.is_none(), "the load server is the child");
    (he, addr)
}

/// Offer, S1, load request through the child load server: the load command (S2 issued).
async fn authorized(he: &HeadEnd, b: &mut LoadBox, amount: u64) -> (LoadOffer, Message) {
    let offer = b.offer(bank_source()).await;
    let init = b.init_load(&offer, amount).unwrap();
    let req = b.load_request(&offer, init, amount, Some(&he.pin));
    let answer = until_answered(b, &Message::LoadRequest(req)).await;
    assert!(matches!(answer, Message::LoadCommand(_)), "{answer:?}");
    (offer, answer)
}

fn hold(he: &HeadEnd, txid: &str) -> HoldState {
    he.running
        .bank
        .as_ref()
        .unwrap()
        .funds
        .hold(txid)
        .unwrap()
        .state
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_s2_the_load_completes_when_the_box_resends_s3() {
    let (he, _) = split_head_end().await;
    let log = he.dir.path().join("load.log");
    let mut child = spawn_load_server(&he.config_path, &log);
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (offer, answer) = authorized(&he, &mut b, 6_000).await;
    let cmd = LoadBox::command(&answer);

    sigkill(&mut child);
    // The card loads while the load server is dead; its S3 cannot be delivered yet.
    let resp = b.run_load(&cmd).unwrap();
    let msg = LoadBox::response_msg(&offer, Some(resp), None);
    assert_eq!(error_code(&b.call(&msg).await), ErrorCode::Busy);
    assert_eq!(hold(&he, &offer.transaction_id), HoldState::Held);

    // Restarted, the load server knows the load command it issued (journaled with S2).
    let mut child = spawn_load_server(&he.config_path, &log);
    let conf = until_answered(&b, &msg).await;
    let Message::LoadConfirmation(c) = &conf else {
        panic!("{conf:?}")
    };
    assert!(c.loaded);
    assert_eq!(b.balance(), 7_000);
    assert_eq!(hold(&he, &offer.transaction_id), HoldState::Captured);
    // Re-sent once more: the same confirmation, captured once.
    assert_eq!(b.call(&msg).await, conf);
    let totals = conservation(&he, &mut [&mut b]).await;
    assert_eq!(totals[&EUR], (6_000, 6_000, 6_000), "paid exactly once");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(
        logged.contains("in-doubt load after restart"),
        "restart saw the open load: {logged}"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    he.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_s2_with_the_card_pulled_the_hold_is_released_by_the_zero_value_proof() {
    let (he, _) = split_head_end().await;
    let log = he.dir.path().join("load.log");
    let mut child = spawn_load_server(&he.config_path, &log);
    let mut b = LoadBox::new(&he, BOX1, 1_000, 100_000).await;
    let (offer, _) = authorized(&he, &mut b, 6_000).await;
    sigkill(&mut child);
    // The card was pulled before LOAD; back in the reader, the box proves it never loaded.
    b.card.state.fault = None;
    let zero = b.zero_value(&offer);
    let msg = LoadBox::response_msg(&offer, None, Some(zero));
    let mut child = spawn_load_server(&he.config_path, &log);
    let conf = until_answered(&b, &msg).await;
    assert!(
        matches!(conf, Message::LoadConfirmation(ref c) if !c.loaded),
        "{conf:?}"
    );
    assert_eq!(b.balance(), 1_000);
    assert_eq!(hold(&he, &offer.transaction_id), HoldState::Released);
    conservation(&he, &mut [&mut b]).await;
    child.kill().unwrap();
    child.wait().unwrap();
    he.running.stop().await;
}
