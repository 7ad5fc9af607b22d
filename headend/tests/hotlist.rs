//! Issue 16, the card hotlist, over real QUIC on loopback with the real `headend hotlist`
//! commands: the issuer makes its keys and signs a list; the list is installed at clearing
//! and reaches both payment servers (the cable head end's and an internet merchant's) as a
//! system update; a hotlisted card is refused at the draw by the security card with
//! `CardHotlisted`, and nothing moves (the load side: `hotlist_load.rs`).

mod clearing_support;
mod hotlist_support;
mod purchase_support;

use std::process::Command;
use std::time::Duration;

use clearing_support::*;
use headend::assembly::Roles;
use headend::config::HeadendConfig;
use headend::payment::pool::Command as CardCommand;
use hotlist_support::*;
use proto::messages::*;
use purchase_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hotlist_reaches_both_payment_servers_through_clearing_and_stops_the_card_at_the_draw()
{
    let d = deployment();
    // The test boxes' cards are numbered 0xC0DE_0000 + their opening balance.
    let blocked_card = 0xC0DE_0000 + 20_000;
    let (verify, list) = issuer_signs(d.dir.path(), 1, &[blocked_card, 0x5EED]);
    for role in ["clearing", "payment", "payment-web"] {
        with_hotlist(&d.configs[role], &verify);
    }
    let only = |f: fn(&mut Roles)| {
        let mut r = Roles::NONE;
        f(&mut r);
        r
    };
    let clearing = d.start("clearing", only(|r| r.clearing = true)).await;
    let cable = d.start("payment", only(|r| r.payment = true)).await;
    let web = d.start("payment-web", only(|r| r.payment = true)).await;
    let merchant = d.start("merchant", only(|r| r.merchant = true)).await;
    let gateway = d.start("gateway", only(|r| r.gateway = true)).await;

    // The issuer installs the list at clearing (the real command, a second process on
    // clearing's journal); both payment servers ask clearing for updates.
    let out = headend(&[
        "hotlist",
        "install",
        "--config",
        s(&d.configs["clearing"]),
        "--file",
        s(&list),
    ]);
    assert!(
        out.contains("clearing: hotlist version 1 with 2 card(s) installed"),
        "{out}"
    );
    for (name, p) in [("payment", &cable), ("payment-web", &web)] {
        let p = p.payment.clone().unwrap();
        assert!(
            within(Duration::from_secs(20), || held_version(p.journal()) == 1).await,
            "{name} never received the hotlist from clearing"
        );
        // Each of its security cards was given the list.
        assert!(
            within(Duration::from_secs(10), || {
                p.pool()
                    .trace()
                    .iter()
                    .filter(|e| e.command == CardCommand::LoadHotlist)
                    .count()
                    >= p.pool().len()
            })
            .await,
            "{name}: the list reached its security cards"
        );
    }

    let ca = d.dir.path().join("ca");
    let cfg = HeadendConfig::load(&d.dir.path().join("headend.toml")).unwrap();
    let gw_addr = gateway.gateway_addr.unwrap();
    let mut blocked = TestBox::connect(&ca, &cfg, "box-000301", gw_addr, 20_000).await;
    let mut other = TestBox::connect(&ca, &cfg, "box-000302", gw_addr, 20_001).await;
    let web_p = web.payment.clone().unwrap();
    let totals_before = web_p.totals().await;
    // The internet merchant's payment server: the security card refuses the draw.
    for (merchant_id, item) in [("M-WEBSHOP", "ebook-1"), ("CABLE", "ppv-1001")] {
        let offer = blocked.offer(merchant_id, item).await;
        let draw = blocked.draw_request(&offer);
        let answer = blocked.call(&Message::DrawRequest(draw)).await;
        let Message::Error(e) = &answer else {
            panic!("{merchant_id}: expected CardHotlisted, got {answer:?}")
        };
        assert_eq!(
            e.code,
            ErrorCode::CardHotlisted,
            "{merchant_id}: {}",
            e.reason
        );
        assert!(e.reason.contains("hotlist"), "{}", e.reason);
    }
    assert_eq!(
        blocked.balance(),
        20_000,
        "the blocked card keeps its value"
    );
    assert_eq!(web_p.totals().await, totals_before, "nothing counted");
    assert!(
        merchant
            .merchant
            .as_ref()
            .unwrap()
            .entitlements("box-000301")
            .is_empty()
    );
    // A card not listed buys at both.
    for (merchant_id, item) in [("M-WEBSHOP", "ebook-1"), ("CABLE", "ppv-1001")] {
        let (_, r) = other.buy(merchant_id, item).await;
        assert!(
            matches!(r, Message::Receipt(ref r) if r.released),
            "{merchant_id}: {r:?}"
        );
    }
    assert_eq!(other.balance(), 20_001 - 1_250 - 499);

    // A forged list at clearing is refused by the command, and nothing changes.
    let forged_dir = d.dir.path().join("forger");
    let (_, forged) = issuer_signs(&forged_dir, 9, &[]);
    let out = Command::new(env!("CARGO_BIN_EXE_headend"))
        .args(["hotlist", "install", "--config"])
        .arg(&d.configs["clearing"])
        .arg("--file")
        .arg(&forged)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("signature does not verify"), "{err}");
    assert_eq!(
        held_version(clearing.clearing.as_ref().unwrap().journal()),
        1
    );

    gateway.stop().await;
    merchant.stop().await;
    web.stop().await;
    cable.stop().await;
    clearing.stop().await;
}
