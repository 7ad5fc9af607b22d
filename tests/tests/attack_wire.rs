//! Issue 12, cases 8 and 10, against a split head end of real `headend` processes:
//! - case 10: a message followed by trailing bytes in its frame (and other malformed
//!   frames and payloads, raw bytes written by the attacker) is refused with a clear reason,
//!   at the gateway and at every role, and nothing is journaled;
//! - case 8: ids that carry newlines, NUL, ANSI escapes or 10 KB reach the head end's logs
//!   (each role's stderr) escaped and capped: no forged line, no raw control byte.
//!
//! Each test checks the refusal and its reason, that no value moved (journals and card
//! files), and that an honest box completes purchases during the attack and right after.

mod attack;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use attack::boxes::BoxClient;
use attack::deploy::{HeadEnd, ROLES};
use attack::ledger::{self, Ledger};
use attack::wire::{self, Outcome};
use attack::*;
use proto::messages::*;

/// Steps journaled since `from` (per role) whose transaction is not in `known`.
fn stray_steps(
    he: &HeadEnd,
    from: &[(usize, usize)],
    known: &BTreeSet<String>,
) -> Vec<(String, String, String, String)> {
    let mut out = Vec::new();
    for (role, (n, _)) in ROLES.iter().zip(from) {
        for (t, s, d) in ledger::steps(&he.journal(role)).into_iter().skip(*n) {
            if !known.contains(&t) {
                out.push((role.to_string(), t, s, d));
            }
        }
    }
    out
}

fn sizes(he: &HeadEnd) -> Vec<(usize, usize)> {
    ROLES.iter().map(|r| ledger::size(&he.journal(r))).collect()
}

/// Case 10: trailing bytes, and the other ways a frame or payload can be wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trailing_bytes_and_malformed_frames_are_refused_and_journal_nothing() {
    let mut he = HeadEnd::start("malformed", |_, _| {});
    let honest = BoxClient::new(&he, "box-000120", 700_120, 50_000).await;
    let honest_card = honest.card_path.clone();
    let mut attacker = BoxClient::new(&he, "box-000680", 700_680, 5_000).await;
    let attacker_card = attacker.card_path.clone();
    let cards = [
        ("honest", honest_card.as_path()),
        ("attacker", &attacker_card),
    ];
    // The attacker's own offer: its TSK lets it seal a body with bytes after it.
    let offer = attacker.offer(PPV.0, PPV.1).await.expect("an offer");
    let before = Ledger::read(&he, &cards);
    let sizes0 = sizes(&he);
    let honest = HonestLoop::start(honest, Duration::from_millis(2500));

    let with_trailing = |m: &Message, extra: &[u8]| {
        let mut p = wire::payload(m);
        p.extend_from_slice(extra);
        wire::frame(&p)
    };
    let offer_req = Message::OfferRequest {
        merchant_id: PPV.0.into(),
        item_id: PPV.1.into(),
    };
    // A draw request for the attacker's own offer, followed by one byte; and the same
    // request whose sealed body carries a byte after the body inside the seal.
    let draw = Message::DrawRequest(attacker.draw_request(&offer));
    let sealed_trailing = {
        let init = attacker.init_purchase();
        let body = DrawBody {
            amount: offer.amount,
            atr: vec![0x3B],
            init,
        };
        let mut clear = postcard::to_allocvec(&body).unwrap();
        clear.push(0);
        Message::DrawRequest(DrawRequest {
            transaction_id: offer.transaction_id.clone(),
            merchant_id: offer.merchant_id.clone(),
            etsk: offer.etsk.clone(),
            body: Protected::Sealed(proto::crypto::seal(
                offer.tsk.as_ref().expect("the demo's message layer is on"),
                &clear,
                &mut rand::rngs::OsRng,
            )),
        })
    };
    let mut bad_version = wire::frame(&wire::payload(&offer_req));
    bad_version[4] = 9;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "offer request + 1 trailing byte",
            with_trailing(&offer_req, &[0]),
        ),
        (
            "catalog request + 7 trailing bytes",
            with_trailing(&Message::CatalogRequest, b"ATTACK!"),
        ),
        (
            "draw request (own offer) + 1 trailing byte",
            with_trailing(&draw, &[0xFF]),
        ),
        (
            "a payload that is no message",
            wire::frame(&[0xFF, 0xFF, 0xFF, 0x0F]),
        ),
        ("an unknown message kind", wire::frame(&[200, 1])),
        ("frame version 9", bad_version),
        ("empty frame (length 0)", vec![0, 0, 0, 0]),
        (
            "frame cut short",
            wire::frame(&wire::payload(&offer_req))[..6].to_vec(),
        ),
        (
            "frame longer than 64 KiB",
            [(1u32 << 20).to_be_bytes().as_slice(), &[1u8; 100]].concat(),
        ),
        ("no frame at all", Vec::new()),
    ];
    let mut seen = Vec::new();
    for (what, bytes) in &cases {
        let o = attacker.conn.call_raw(bytes).await;
        match &o {
            Outcome::Answer(Message::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Malformed, "{what}: {e:?}");
                seen.push(format!("{what}: Malformed: {}", e.reason));
            }
            // The transport refuses a frame that is not one frame: the stream is reset
            // with BadFrame (0x21) or FrameTooLarge (0x20).
            Outcome::Reset(code) if [0x20, 0x21].contains(code) => {
                seen.push(format!("{what}: stream reset 0x{code:x}"));
            }
            other => panic!("{what}: {other:?}"),
        }
    }
    for s in &seen[..3] {
        assert!(s.contains("trailing bytes"), "{s}");
    }
    // Inside the seal.
    let o = attacker.call(&sealed_trailing).await;
    let e = o
        .error()
        .unwrap_or_else(|| panic!("sealed trailing: {o:?}"));
    assert!(
        e.reason.contains("1 trailing bytes after the body"),
        "sealed body with a trailing byte: {e:?}"
    );
    seen.push(format!(
        "draw request whose sealed body has 1 trailing byte: {:?}: {}",
        e.code, e.reason
    ));
    // At every other role too, as their caller (the gateway's own certificate): the
    // payload is checked after the peer, before anything is handled.
    let gw = he.own_role_cert("gateway");
    let roots = wire::roots(&he.ca_pem());
    for role in ["payment", "merchant", "bank", "load"] {
        let conn = wire::connect(
            he.addrs.of(role),
            wire::client_config(roots.clone(), Some(&gw), &[wire::ALPN]),
        )
        .await
        .expect("the gateway's certificate connects");
        for (what, m) in [
            ("catalog request", Message::CatalogRequest),
            ("reversals since 0", Message::ReversalsSince { after: 0 }),
            ("a draw request", draw.clone()),
        ] {
            let o = conn.call_raw(&with_trailing(&m, &[0])).await;
            let e = o
                .error()
                .unwrap_or_else(|| panic!("{role}: {what} + 1 byte: {o:?}"));
            assert_eq!(e.code, ErrorCode::Malformed, "{role}: {what}: {e:?}");
            assert!(
                e.reason.contains("1 trailing bytes"),
                "{role}: {what}: {}",
                e.reason
            );
        }
        seen.push(format!(
            "{role}, any message + 1 trailing byte: Malformed: {}",
            conn.call_raw(&with_trailing(&Message::CatalogRequest, &[0]))
                .await
                .error()
                .map(|e| e.reason.clone())
                .unwrap_or_default()
        ));
    }
    for s in &seen {
        eprintln!("malformed: {s}");
    }
    he.assert_alive();

    let report = honest.finish().await;
    assert_honest_during(&report, "malformed");
    let mut client = report.client;
    let last = honest_after(&mut client, "malformed").await;
    let mut bought: Vec<_> = report.purchases.iter().map(|p| ("honest", p)).collect();
    bought.push(("honest", &last));
    before.assert_only(&Ledger::read(&he, &cards), &bought, "malformed");
    let known: BTreeSet<String> = bought
        .iter()
        .map(|(_, p)| p.offer.transaction_id.clone())
        .collect();
    let stray = stray_steps(&he, &sizes0, &known);
    assert!(
        stray.is_empty(),
        "journaled for malformed requests: {stray:?}"
    );
    // The attacker's offer was not drawn.
    let gw_state = ledger::state(&he.journal("gateway"), "gw");
    let rec: headend::gateway::GwTxn = headend::journal::decode(
        &gw_state
            .iter()
            .find(|(k, _)| *k == offer.transaction_id)
            .unwrap()
            .1,
    )
    .unwrap();
    assert_eq!(rec.state, headend::gateway::GwState::Offered);
}

/// Case 8: what a box puts in an id reaches the logs escaped and capped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_ids_reach_the_logs_escaped_and_capped() {
    let mut he = HeadEnd::start("logs", |_, _| {});
    let honest = BoxClient::new(&he, "box-000121", 700_121, 50_000).await;
    let honest_card = honest.card_path.clone();
    let mut attacker = BoxClient::new(&he, "box-000681", 700_681, 5_000).await;
    let attacker_card = attacker.card_path.clone();
    let cards = [
        ("honest", honest_card.as_path()),
        ("attacker", &attacker_card),
    ];
    let before = Ledger::read(&he, &cards);
    let honest = HonestLoop::start(honest, Duration::from_millis(2500));

    const FORGED: &str = "2026-11-30T00:00:00.000000Z  INFO merchant: goods released txid=\"FORGED-LINE\" entitlement=\"free\"";
    let hostile = [
        format!("ppv-1001\n{FORGED}"),
        format!("ppv-1001\r\n{FORGED}\0\u{1b}[2J\u{1b}[31mRED\u{7f}"),
        format!("\u{1b}]0;pwned\u{7}{}", "A".repeat(10 * 1024)),
        format!("x\u{0}y\u{8}\u{8}\u{8}z\u{9b}31m\u{2028}{FORGED}"),
    ];
    let mut answers = Vec::new();
    for h in &hostile {
        // As an item id (the merchant refuses it), a merchant id (the gateway refuses it),
        // and a transaction id in every step a box sends.
        let card = attacker.purse();
        let init = attacker.init_purchase();
        let msgs = vec![
            Message::OfferRequest {
                merchant_id: PPV.0.into(),
                item_id: h.clone(),
            },
            Message::OfferRequest {
                merchant_id: h.clone(),
                item_id: PPV.1.into(),
            },
            Message::DrawRequest(DrawRequest {
                transaction_id: h.clone(),
                merchant_id: h.clone(),
                etsk: None,
                body: Protected::Clear(DrawBody {
                    amount: proto::money::Money::new(1, proto::money::Currency::EUR),
                    atr: vec![],
                    init: init.clone(),
                }),
            }),
            Message::Cancel(CancelMsg {
                transaction_id: h.clone(),
                reason: CancelReason::Viewer,
                proof: Some(init),
            }),
            Message::LoadOfferRequest(LoadOfferRequest {
                source: LoadSource::Bank { account: h.clone() },
                card: card.clone(),
            }),
            Message::LoadOfferRequest(LoadOfferRequest {
                source: LoadSource::voucher(h.clone()),
                card,
            }),
            Message::LoadResponse(LoadResponseMsg {
                transaction_id: h.clone(),
                response: None,
                zero_value: None,
            }),
        ];
        for m in &msgs {
            let o = attacker.call(m).await;
            let e = o
                .error()
                .unwrap_or_else(|| panic!("{}: {o:?}", attack::samples::name(m)));
            answers.push((attack::samples::name(m), e.code));
        }
    }
    eprintln!(
        "logs: {} hostile requests refused: {answers:?}",
        answers.len()
    );
    he.assert_alive();
    let report = honest.finish().await;
    assert_honest_during(&report, "logs");
    let mut client = report.client;
    let last = honest_after(&mut client, "logs").await;
    let mut bought: Vec<_> = report.purchases.iter().map(|p| ("honest", p)).collect();
    bought.push(("honest", &last));
    before.assert_only(&Ledger::read(&he, &cards), &bought, "logs");

    // Give the roles a moment to flush, then read every role's stderr as bytes.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut escaped_seen = 0;
    let mut longest = 0;
    for role in ROLES {
        let raw = std::fs::read(he.log(role)).expect("log");
        for (i, b) in raw.iter().enumerate() {
            assert!(
                *b == b'\n' || (*b >= 0x20 && *b != 0x7f),
                "{role}.log holds the raw control byte 0x{b:02x} at offset {i}: {:?}",
                String::from_utf8_lossy(&raw[i.saturating_sub(60)..(i + 20).min(raw.len())])
            );
        }
        let text = String::from_utf8(raw).expect("the log is UTF-8");
        // C1 controls (CSI, NEL) are control characters too.
        for c in ['\u{9b}', '\u{85}'] {
            assert!(!text.contains(c), "{role}.log holds {c:?} raw");
        }
        if text.contains('\u{2028}') {
            // Not a control character (it is a line separator, category Zl): reported.
            eprintln!("logs: {role}.log holds U+2028 LINE SEPARATOR unescaped");
        }
        for line in text.lines() {
            longest = longest.max(line.len());
            assert!(
                line.starts_with("20") && line.as_bytes().get(10) == Some(&b'T'),
                "{role}.log has a line that is not the logger's own: {line:?}"
            );
            assert!(
                !line.contains(&"A".repeat(300)),
                "{role}.log: a field is not capped: {} bytes",
                line.len()
            );
            if line.contains("FORGED-LINE") {
                escaped_seen += 1;
                // The hostile text is in the line, but escaped, after the logger's own start.
                assert!(
                    !line.starts_with("2026-11-30T00:00:00.000000Z"),
                    "{role}: forged line: {line}"
                );
                assert!(
                    line.contains("\\n") || line.contains("\\r") || line.contains("\\u{"),
                    "{role}: {line}"
                );
            }
        }
        // A voucher code and the demo PIN never appear.
        assert!(
            !text.contains(&he.voucher),
            "{role}.log holds the voucher code"
        );
    }
    let capped = ROLES
        .iter()
        .map(|r| he.log_text(r).matches("chars)").count())
        .sum::<usize>();
    eprintln!(
        "logs: every line of the 5 roles' logs is the logger's own; {escaped_seen} lines carry \
         the forged text escaped; {capped} capped fields (…(+N chars)); longest line {longest} bytes; \
         no raw control byte"
    );
    assert!(escaped_seen > 0, "the hostile ids were never logged at all");
    assert!(capped > 0, "the 10 KB id was never logged capped");
}
