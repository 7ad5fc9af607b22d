//! Issue 11, purchase scenarios with real processes (a split head end: each role its own
//! `headend <role>` process, QUIC between them; boxes with genuine device certificates and
//! cards speak the wire protocol to the gateway; outcomes read from each role's journal):
//!
//! - scenario 5: FIG. 4/5, the merchant SIGSTOPped or SIGKILLed when the payment server
//!   confirms: the box hears `Busy` ("paid; the release will follow"), and once the merchant
//!   is back the goods are released exactly once without the box re-sending; a later resend
//!   gets the receipt;
//! - scenario 6: FIG. 6/7, a debit response with a bad card signature and at once the
//!   genuine one, many rounds, also with the payment server SIGSTOPped while they arrive:
//!   every accepted response reaches the payment server exactly once, the genuine one
//!   completes the sale and releases once, FIG. 6 never forwards the bad one;
//! - scenario 1's head-end half, the cancel rules: no proof or a proof whose counter moved
//!   reverses nothing (`ProofRejected`); a valid proof reverses (`Receipt { released: false
//!   }`); a completed purchase cannot be cancelled (`AlreadyCompleted`).

mod split_support;

use std::time::{Duration, Instant};

use headend::gateway::GwState;
use headend::merchant::OfferState;
use headend::payment::PayState;
use proto::messages::*;
use proto::money::Currency;
use proto::purse::DebitResponse;
use split_support::wire_box::WireBox;
use split_support::*;

const ANSWER: Duration = Duration::from_secs(30);
/// `[transport] call_timeout_ms`: the default, which these deployments keep.
const CALL_TIMEOUT: Duration = Duration::from_millis(8000);

/// A purchase up to the card's DEBIT: the offer and the debit response the box holds.
async fn debited(b: &mut WireBox, merchant: &str, item: &str) -> (Offer, DebitResponseMsg) {
    let (offer, cmd) = drawn(b, merchant, item).await;
    let resp = b.debit(&offer, &cmd).unwrap();
    (offer, resp)
}

/// A purchase up to the debit command (the card has not run DEBIT).
async fn drawn(b: &mut WireBox, merchant: &str, item: &str) -> (Offer, proto::purse::DebitCommand) {
    let ask_offer = Message::OfferRequest {
        merchant_id: merchant.into(),
        item_id: item.into(),
    };
    let offer = match ask(&b.client, &ask_offer, ANSWER).await.unwrap() {
        Message::Offer(o) => o,
        other => panic!("offer: {other:?}"),
    };
    let draw = Message::DrawRequest(b.draw_request(&offer).unwrap());
    let answer = ask(&b.client, &draw, ANSWER).await.unwrap();
    let cmd = WireBox::open_debit_command(&offer, &answer).unwrap();
    (offer, cmd)
}

/// The card's debit response inside `msg`.
fn response(offer: &Offer, msg: &DebitResponseMsg) -> DebitResponse {
    msg.body.open(offer.tsk.as_ref()).unwrap()
}

/// The same response with one bit of the card signature flipped, sealed as the box would.
fn with_bad_signature(offer: &Offer, msg: &DebitResponseMsg) -> DebitResponseMsg {
    let mut bad = response(offer, msg);
    bad.card_signature[0] ^= 0x01;
    DebitResponseMsg {
        transaction_id: msg.transaction_id.clone(),
        body: Protected::new(bad, offer.tsk.as_ref(), &mut rand::rngs::OsRng),
    }
}

/// How many times the payment server journaled receiving a debit response with `resp`'s
/// card signature for `txid`.
fn received_by_payment(split: &Split, txid: &str, resp: &DebitResponse) -> usize {
    let sig = format!("card signature {}", hex::encode(resp.card_signature));
    split
        .steps(R::Payment, txid)
        .iter()
        .filter(|(step, detail)| step == "debit response received" && *detail == sig)
        .count()
}

/// Release entries the gateway still holds for `txid`.
fn gateway_releases(split: &Split, txid: &str) -> usize {
    split
        .journal(R::Gateway)
        .all(headend::journal::Kind::Release)
        .unwrap()
        .iter()
        .filter(|(k, _)| k.starts_with(&format!("{txid}/")))
        .count()
}

#[derive(Debug, Clone, Copy)]
enum Outage {
    Stopped,
    Killed,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fig4_fig5_confirmation_is_kept_while_the_merchant_is_down() {
    // CABLE compares in the security card (FIG. 4), M-WEBSHOP in the payment server (FIG. 5).
    let mut split = Split::start(Options::default()).await;
    let mut b = split.purchase_box("box-000001", 0xB0B0_0005, 100_000).await;
    let mut sales = 0;
    for outage in [Outage::Stopped, Outage::Killed] {
        let fig4 = debited(&mut b, "CABLE", "ppv-1001").await;
        let fig5 = debited(&mut b, "M-WEBSHOP", "ebook-1").await;
        match outage {
            Outage::Stopped => split.stop(R::Merchant),
            Outage::Killed => split.kill(R::Merchant),
        }
        let (m4, m5) = (
            Message::DebitResponse(fig4.1.clone()),
            Message::DebitResponse(fig5.1.clone()),
        );
        let client = &b.client;
        let timed = |m| async move {
            let t = Instant::now();
            (ask(client, m, ANSWER).await, t.elapsed())
        };
        let ((a4, t4), (a5, t5)) = tokio::join!(timed(&m4), timed(&m5));
        eprintln!(
            "{outage:?} merchant: the box's Busy after {:.1} s (FIG. 4) and {:.1} s (FIG. 5)",
            t4.as_secs_f64(),
            t5.as_secs_f64()
        );
        // The gateway's call to the merchant has a deadline (8 s by default); the box hears
        // Busy within it, whatever else is in flight to the same merchant.
        for t in [t4, t5] {
            assert!(
                t < CALL_TIMEOUT + Duration::from_secs(3),
                "{outage:?} merchant: the box waited {t:?} for Busy; the role call deadline is {CALL_TIMEOUT:?}"
            );
        }
        for (offer, answer) in [(&fig4.0, a4.unwrap()), (&fig5.0, a5.unwrap())] {
            let txid = &offer.transaction_id;
            match &answer {
                Message::Error(e) if e.code == ErrorCode::Busy => {
                    assert!(e.reason.contains("release will follow"), "{e:?}")
                }
                other => panic!("{outage:?} merchant, {txid}: expected Busy, got {other:?}"),
            }
            assert_eq!(
                split.pay_txn(txid).unwrap().state,
                PayState::Completed,
                "{txid}: the payment server confirmed"
            );
            assert_eq!(split.releases(txid), 0, "{txid}: nothing released yet");
        }
        match outage {
            Outage::Stopped => split.cont(R::Merchant),
            Outage::Killed => {
                split.spawn(R::Merchant).await;
            }
        }
        // The box does NOT re-send: the gateway's background delivery releases the goods.
        for offer in [&fig4.0, &fig5.0] {
            let txid = &offer.transaction_id;
            let released = eventually(Duration::from_secs(30), || split.releases(txid) == 1).await;
            assert!(
                released,
                "{outage:?} merchant, {txid}: goods released without the box re-sending"
            );
            let done = eventually(Duration::from_secs(10), || {
                split.gw_txn(txid).is_some_and(|t| t.state == GwState::Done)
                    && gateway_releases(&split, txid) == 0
            })
            .await;
            assert!(
                done,
                "{txid}: the gateway kept the receipt and dropped its release entry"
            );
        }
        // A later resend gets the receipt; nothing more is released.
        for (offer, resp) in [&fig4, &fig5] {
            let txid = &offer.transaction_id;
            let answer = ask(&b.client, &Message::DebitResponse(resp.clone()), ANSWER)
                .await
                .unwrap();
            assert!(
                matches!(&answer, Message::Receipt(r) if r.released),
                "{txid}: resend: {answer:?}"
            );
            assert_eq!(split.releases(txid), 1, "{txid}: released exactly once");
            assert_eq!(split.entitlements(txid), 1, "{txid}: one entitlement");
            assert_eq!(split.offer(txid).unwrap().state, OfferState::Released);
        }
        sales += 2;
    }
    assert_eq!(
        split.security_card_totals(Currency::EUR),
        (sales, (sales / 2) * (499 + 1250)),
        "the security cards counted each sale once"
    );
}

/// One bad-then-genuine round; returns the offer and the genuine and bad responses.
async fn bad_then_genuine(
    b: &mut WireBox,
    merchant: &str,
    item: &str,
) -> (Offer, DebitResponse, DebitResponse) {
    let (offer, genuine) = debited(b, merchant, item).await;
    let bad = with_bad_signature(&offer, &genuine);
    let txid = &offer.transaction_id;
    let a = ask(&b.client, &Message::DebitResponse(bad.clone()), ANSWER)
        .await
        .unwrap();
    assert_eq!(
        code(&a),
        Some(ErrorCode::BadSignature),
        "{txid}: bad: {a:?}"
    );
    let a = ask(&b.client, &Message::DebitResponse(genuine.clone()), ANSWER)
        .await
        .unwrap();
    assert!(
        matches!(&a, Message::Receipt(r) if r.released),
        "{txid}: genuine: {a:?}"
    );
    (
        offer.clone(),
        response(&offer, &genuine),
        response(&offer, &bad),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fig6_fig7_bad_then_genuine_debit_response() {
    const ROUNDS: usize = 30;
    const STOPPED_ROUNDS: usize = 3;
    // CABLE compares at the gateway (FIG. 6), M-WEBSHOP at the merchant (FIG. 7).
    let split = Split::start(Options {
        cable: "gateway",
        webshop: "merchant",
        ..Options::default()
    })
    .await;
    // A box per few rounds: the gateway limits each box's offer requests (a burst of 10).
    let mut boxes = Vec::new();
    for n in 0..(ROUNDS + STOPPED_ROUNDS).div_ceil(4) {
        let id = format!("box-0060{n:02}");
        boxes.push(
            split
                .purchase_box(&id, 0xB0B0_6000 + n as u64, 100_000)
                .await,
        );
    }
    let started = Instant::now();
    let mut rounds = Vec::new(); // (fig, offer, genuine, bad)
    for round in 0..ROUNDS {
        let b = &mut boxes[round / 4];
        for (fig, merchant, item) in [(6, "CABLE", "ppv-1001"), (7, "M-WEBSHOP", "ebook-1")] {
            let (o, g, bad) = bad_then_genuine(b, merchant, item).await;
            rounds.push((fig, o, g, bad));
        }
    }
    // The payment server SIGSTOPped while the two responses arrive, then continued.
    for round in ROUNDS..ROUNDS + STOPPED_ROUNDS {
        let b = &mut boxes[round / 4];
        for (fig, merchant, item) in [(6, "CABLE", "ppv-1001"), (7, "M-WEBSHOP", "ebook-1")] {
            let (offer, genuine) = debited(b, merchant, item).await;
            let bad = with_bad_signature(&offer, &genuine);
            split.stop(R::Payment);
            let txid = &offer.transaction_id;
            let a = ask(&b.client, &Message::DebitResponse(bad.clone()), ANSWER)
                .await
                .unwrap();
            assert_eq!(
                code(&a),
                Some(ErrorCode::BadSignature),
                "{txid}: bad: {a:?}"
            );
            let a = ask(&b.client, &Message::DebitResponse(genuine.clone()), ANSWER)
                .await
                .unwrap();
            assert!(
                matches!(&a, Message::Receipt(r) if r.released),
                "{txid}: genuine with the payment server stopped: {a:?}"
            );
            split.cont(R::Payment);
            rounds.push((
                fig,
                offer.clone(),
                response(&offer, &genuine),
                response(&offer, &bad),
            ));
        }
    }
    eprintln!(
        "{} rounds sent in {:.1} s",
        rounds.len(),
        started.elapsed().as_secs_f64()
    );
    // Every notification delivered (bounded wait: delivery is in the background).
    let delivered = eventually(Duration::from_secs(30), || {
        split.count(R::Gateway, headend::journal::Kind::Notify) == 0
            && rounds.iter().all(|(_, o, _, _)| {
                split
                    .pay_txn(&o.transaction_id)
                    .is_some_and(|t| t.state == PayState::Completed)
            })
    })
    .await;
    let mut wrong = Vec::new();
    for (fig, offer, genuine, bad) in &rounds {
        let txid = &offer.transaction_id;
        let pay = split.pay_txn(txid).unwrap();
        let g = received_by_payment(&split, txid, genuine);
        let x = received_by_payment(&split, txid, bad);
        let rel = split.releases(txid);
        let mut why = Vec::new();
        if pay.state != PayState::Completed || pay.debit_response.as_ref() != Some(genuine) {
            why.push(format!("payment {:?}", pay.state));
        }
        if g != 1 {
            why.push(format!("genuine reached the payment server {g} times"));
        }
        if *fig == 6 && x != 0 {
            why.push(format!("FIG. 6 forwarded the bad one {x} times"));
        }
        // FIG. 7 queues the bad one too (the merchant compares); the payment server journals
        // it only if it comes before the genuine one (after, it is a refused repeat).
        if *fig == 7 && x > 1 {
            why.push(format!("FIG. 7: bad one (queued) reached it {x} times"));
        }
        // The gateway delivered each accepted response once: FIG. 6 the genuine one only,
        // FIG. 7 both.
        let delivered = split
            .steps(R::Gateway, txid)
            .iter()
            .filter(|(s, _)| s == "payment server notified")
            .count();
        let accepted = if *fig == 6 { 1 } else { 2 };
        if delivered != accepted {
            why.push(format!(
                "the gateway delivered {delivered} responses to the payment server, not {accepted}"
            ));
        }
        if rel != 1 || split.entitlements(txid) != 1 {
            why.push(format!("released {rel} times"));
        }
        if !why.is_empty() {
            wrong.push(format!("FIG. {fig} {txid}: {}", why.join(", ")));
        }
    }
    let n6 = rounds.iter().filter(|r| r.0 == 6).count() as u64;
    let n7 = rounds.iter().filter(|r| r.0 == 7).count() as u64;
    eprintln!(
        "{} of {} rounds wrong; notifications pending {}",
        wrong.len(),
        rounds.len(),
        split.count(R::Gateway, headend::journal::Kind::Notify)
    );
    assert!(
        wrong.is_empty() && delivered,
        "{} of {} rounds wrong (all delivered: {delivered}):\n{}",
        wrong.len(),
        rounds.len(),
        wrong.join("\n")
    );
    assert_eq!(
        split.security_card_totals(Currency::EUR),
        (n6 + n7, n6 * 499 + n7 * 1250),
        "the security cards count every sale once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reverses_only_on_a_verified_proof() {
    let split = Split::start(Options::default()).await;
    let mut b = split.purchase_box("box-000001", 0xB0B0_0001, 100_000).await;
    let cancel = |txid: &str, proof| {
        Message::Cancel(CancelMsg {
            transaction_id: txid.into(),
            reason: CancelReason::NotDebited,
            proof,
        })
    };

    // No proof: nothing reversed, the transaction stays open.
    let (offer, _cmd) = drawn(&mut b, "CABLE", "ppv-1001").await;
    let txid = &offer.transaction_id;
    let a = ask(&b.client, &cancel(txid, None), ANSWER).await.unwrap();
    assert_eq!(code(&a), Some(ErrorCode::ProofRejected), "no proof: {a:?}");
    assert_eq!(split.pay_txn(txid).unwrap().state, PayState::DebitIssued);

    // The card did debit (the box lost track of it): a fresh INITIALIZE shows the counter
    // moved, so the proof does not verify; nothing reversed; the debit response completes.
    let (offer, resp) = debited(&mut b, "CABLE", "ppv-1002").await;
    let txid = &offer.transaction_id;
    let proof = b.proof().unwrap();
    let a = ask(&b.client, &cancel(txid, Some(proof)), ANSWER)
        .await
        .unwrap();
    assert_eq!(
        code(&a),
        Some(ErrorCode::ProofRejected),
        "moved counter: {a:?}"
    );
    assert_eq!(split.pay_txn(txid).unwrap().state, PayState::DebitIssued);
    let a = ask(&b.client, &Message::DebitResponse(resp), ANSWER)
        .await
        .unwrap();
    assert!(matches!(&a, Message::Receipt(r) if r.released), "{a:?}");
    assert_eq!(split.pay_txn(txid).unwrap().state, PayState::Completed);
    let completed = txid.clone();

    // A valid proof (the card never ran DEBIT): reversed, nothing charged; the merchant's
    // offer moves to Reversed (the gateway passes the payment server's reversal on).
    let (offer, _cmd) = drawn(&mut b, "M-WEBSHOP", "ebook-1").await;
    let txid = &offer.transaction_id;
    let proof = b.proof().unwrap();
    let a = ask(&b.client, &cancel(txid, Some(proof)), ANSWER)
        .await
        .unwrap();
    assert!(
        matches!(&a, Message::Receipt(r) if !r.released),
        "valid proof: {a:?}"
    );
    assert_eq!(split.pay_txn(txid).unwrap().state, PayState::Reversed);
    let reversed = eventually(Duration::from_secs(15), || {
        split
            .offer(txid)
            .is_some_and(|o| o.state == OfferState::Reversed)
    })
    .await;
    assert!(reversed, "the merchant's offer moved to Reversed");
    assert_eq!(split.releases(txid), 0);

    // A completed purchase cannot be cancelled, proof or not.
    let proof = b.proof().unwrap();
    for p in [None, Some(proof)] {
        let a = ask(&b.client, &cancel(&completed, p), ANSWER)
            .await
            .unwrap();
        assert_eq!(code(&a), Some(ErrorCode::AlreadyCompleted), "{a:?}");
    }
    assert_eq!(
        split.pay_txn(&completed).unwrap().state,
        PayState::Completed
    );
    assert_eq!(split.releases(&completed), 1);
    assert_eq!(split.security_card_totals(Currency::EUR), (1, 399));
}

/// Scenario 5's window on the gateway's side: the payment server confirms while the gateway
/// that asked is gone (SIGKILLed with the call in flight, the payment server SIGSTOPped so
/// that the call is in flight). The payment server completed the sale; the gateway never
/// journaled the confirmation; the box does not come back. Nothing at the head end delivers
/// that confirmation to the merchant — unless the gateway journals the debit response before
/// it asks, and asks again after its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fig4_confirmation_survives_the_gateway_dying_mid_call() {
    let mut split = Split::start(Options::default()).await;
    let mut b = split.purchase_box("box-000001", 0xB0B0_0009, 100_000).await;
    let (offer, resp) = debited(&mut b, "CABLE", "ppv-1001").await;
    let txid = &offer.transaction_id;
    split.stop(R::Payment);
    // The debit response reaches the gateway, which forwards it to the stopped payment
    // server and waits; the box gives up after a second.
    let r = ask(
        &b.client,
        &Message::DebitResponse(resp),
        Duration::from_secs(1),
    )
    .await;
    assert!(
        r.is_err(),
        "no answer with the payment server stopped: {r:?}"
    );
    split.kill(R::Gateway);
    split.cont(R::Payment);
    let completed = eventually(Duration::from_secs(15), || {
        split
            .pay_txn(txid)
            .is_some_and(|t| t.state == PayState::Completed)
    })
    .await;
    assert!(
        completed,
        "the payment server completed the sale it had queued"
    );
    assert_eq!(split.security_card_totals(Currency::EUR), (1, 499));
    split.spawn(R::Gateway).await;
    // The box does not come back.
    let released = eventually(Duration::from_secs(30), || split.releases(txid) == 1).await;
    assert!(
        released,
        "paid (payment Completed, security card counted) but never released: gateway record {:?}, merchant offer {:?}",
        split.gw_txn(txid).map(|t| t.state),
        split.offer(txid).map(|o| o.state)
    );
}
