//! Issue 17, refunds through the head end, over real QUIC on loopback: a merchant
//! authorizes the refund of a sale (`headend refund`, the real binary, on the payment
//! server's journal), the card's box lists the refunds due to its card, runs INITIALIZE FOR
//! CREDIT, gets the sale's security card's credit command through the gateway, runs CREDIT
//! and sends the card's signed credit response back; the refund goes into a collection
//! batch as a refund record, clearing takes it off the merchant's pay, and `headend
//! reconcile` checks it from the raw journals.
//!
//! - `a_merchant_refunds_a_sale_once_to_its_card_and_clearing_nets_it`: split roles and
//!   clearing; the card is credited once; a second refund, a larger refund and a refund to
//!   another card are refused; settlement pays the merchant its sales less the refund;
//!   reconcile holds, and names the refund once its amount is tampered with.
//! - `a_credit_command_the_card_never_ran_is_proved_and_due_again`: the box lost the credit
//!   command; the card's proof counts it back at the security card, and the refund runs
//!   once later.
//! - `a_credit_the_card_ran_whose_answer_was_lost_completes_from_the_card_log`: the proof is
//!   refused (the card's counter moved), and the credit response from the card's log
//!   completes it; a tampered response is refused.

mod clearing_support;
mod purchase_support;

use clearing_support::*;

use std::process::Command;

use headend::assembly::Roles;
use headend::journal::Kind;
use headend::payment::collection::BatchState;
use headend::payment::refund::{self, RefundRec};
use proto::card::commands;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::{CreditResponse, LogRecord};
use purchase_support::*;

/// `headend refund` (the real binary) on `config`: its exit status and output.
fn headend_refund(config: &std::path::Path, txid: &str, amount: Option<u64>) -> (bool, String) {
    let mut c = Command::new(env!("CARGO_BIN_EXE_headend"));
    c.arg("refund")
        .arg("--config")
        .arg(config)
        .args(["--txid", txid]);
    if let Some(a) = amount {
        c.args(["--amount", &a.to_string()]);
    }
    let out = c.output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

fn refused(m: &Message, code: ErrorCode, words: &str) {
    match m {
        Message::Error(e) => {
            assert_eq!(e.code, code, "{e:?}");
            assert!(e.reason.contains(words), "{:?} lacks {words:?}", e.reason);
        }
        other => panic!("not refused: {other:?}"),
    }
}

fn receipt(m: &Message) -> &Receipt {
    match m {
        Message::Receipt(r) => r,
        other => panic!("not a receipt: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_merchant_refunds_a_sale_once_to_its_card_and_clearing_nets_it() {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let d = deployment();
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
    let gw_addr = gateway.gateway_addr.unwrap();
    let ca = d.dir.path().join("ca");
    let cfg = headend::config::HeadendConfig::load(&d.dir.path().join("headend.toml")).unwrap();
    let mut a = TestBox::connect(&ca, &cfg, "box-000201", gw_addr, 10_000).await;
    let mut b = TestBox::connect(&ca, &cfg, "box-000202", gw_addr, 20_000).await;

    let (sale, r) = a.buy("CABLE", "ppv-1001").await;
    assert!(receipt(&r).released);
    let (other, r) = a.buy("CABLE", "ppv-1002").await;
    assert!(receipt(&r).released);
    let (_, r) = b.buy("CABLE", "ppv-1001").await;
    assert!(receipt(&r).released);
    let pc = cable.payment.clone().unwrap();
    assert!(eventually(|| completed(&pc).len() == 3).await);
    let paid = a.balance();
    assert_eq!(
        paid,
        10_000 - sale.amount.minor - other.amount.minor,
        "the card paid both sales"
    );

    // Nothing is due before the merchant authorizes.
    assert_eq!(a.0.refunds_due().await.unwrap(), vec![]);
    let payment_cfg = &d.configs["payment"];
    let (ok, out) = headend_refund(payment_cfg, &sale.transaction_id, None);
    assert!(ok, "{out}");
    assert!(out.contains("authorized"), "{out}");
    // A second refund of the same sale, and a refund above a sale, are refused.
    let (ok, out) = headend_refund(payment_cfg, &sale.transaction_id, Some(1));
    assert!(!ok && out.contains("refunded once"), "{out}");
    let (ok, out) = headend_refund(
        payment_cfg,
        &other.transaction_id,
        Some(other.amount.minor + 1),
    );
    assert!(!ok && out.contains("at most"), "{out}");
    assert!(pc.refund(&other.transaction_id).is_none());

    // The refund is due to a's card only.
    let due = a.0.refunds_due().await.unwrap();
    assert_eq!(
        due,
        vec![RefundDue {
            transaction_id: sale.transaction_id.clone(),
            merchant_id: "CABLE".into(),
            amount: sale.amount,
            issued: None,
        }]
    );
    assert_eq!(b.0.refunds_due().await.unwrap(), vec![]);
    // Another card's INITIALIZE FOR CREDIT for it is refused, and moves nothing.
    let wrong = b.0.refund_request(&sale.transaction_id).unwrap();
    let totals_before = pc.totals().await;
    refused(
        &b.call(&Message::RefundRequest(wrong)).await,
        ErrorCode::NotYourAccount,
        "another card",
    );
    assert_eq!(pc.totals().await, totals_before);

    // The card's refund: the command (the same on a retry), CREDIT, the receipt.
    let req = a.0.refund_request(&sale.transaction_id).unwrap();
    let cmd = a.call(&Message::RefundRequest(req.clone())).await;
    assert!(matches!(cmd, Message::RefundCommand(_)), "{cmd:?}");
    assert_eq!(a.call(&Message::RefundRequest(req)).await, cmd, "a retry");
    let eur = Currency::EUR;
    assert_eq!(
        pc.totals().await[&eur],
        totals_before[&eur] - sale.amount.minor,
        "the security card counts the refund off at issue"
    );
    let resp = a.0.credit(&cmd).unwrap();
    let done = a.call(&Message::RefundResponse(resp.clone())).await;
    let r = receipt(&done);
    assert!(r.released, "{r:?}");
    assert_eq!(r.new_balance, Some(paid + sale.amount.minor));
    assert_eq!(a.balance(), paid + sale.amount.minor, "credited");
    assert_eq!(
        a.call(&Message::RefundResponse(resp)).await,
        done,
        "a repeat gets the same receipt"
    );
    // Once credited: nothing due, and a new INITIALIZE FOR CREDIT gets no second credit.
    assert_eq!(a.0.refunds_due().await.unwrap(), vec![]);
    let again = a.0.refund_request(&sale.transaction_id).unwrap();
    refused(
        &a.call(&Message::RefundRequest(again)).await,
        ErrorCode::AlreadyCompleted,
        "credited already",
    );
    assert_eq!(a.balance(), paid + sale.amount.minor, "credited once");

    // Collection: the sales and the refund in one batch, to clearing over QUIC.
    let batch = pc.close_batch().unwrap().expect("a batch");
    assert_eq!((batch.records.len(), batch.refunds.len()), (3, 1));
    assert_eq!(batch.refunds[0].transaction_id, sale.transaction_id);
    assert_eq!(batch.refunds[0].amount, sale.amount);
    let c = clearing.clearing.clone().unwrap();
    assert!(
        eventually(|| pc.batch_state(batch.batch) == Some(BatchState::Acknowledged)).await,
        "clearing acknowledged the batch"
    );
    let left = pc.remaining_to_settle().await.unwrap();
    assert!(left.values().all(|v| *v == 0), "{left:?}");
    let report = c.settle().unwrap().expect("something to settle");
    let sales: u64 = batch.records.iter().map(|r| r.amount.minor).sum();
    let cable_pay: Vec<_> = report
        .merchants
        .iter()
        .filter(|p| p.merchant_id == "CABLE")
        .map(|p| (p.count, p.amount, p.refund_count, p.refunded))
        .collect();
    assert_eq!(cable_pay, vec![(3, sales, 1, sale.amount.minor)]);
    assert_eq!(
        report.float[0].purchases,
        (sales - sale.amount.minor) as i64
    );
    let (ok, out) = d.reconcile();
    assert!(ok, "reconcile: {out}");

    // The refund's amount changed in the payment journal: reconcile names the sale.
    let mut f: RefundRec = pc.refund(&sale.transaction_id).unwrap();
    f.amount = Money::new(f.amount.minor + 1, eur);
    pc.journal()
        .put(
            Kind::Refund,
            &sale.transaction_id,
            &headend::journal::encode(&f),
        )
        .unwrap();
    let (ok, out) = d.reconcile();
    assert!(!ok, "reconcile must fail: {out}");
    assert!(out.contains(&sale.transaction_id), "{out}");

    for r in [gateway, merchant, web, cable, clearing] {
        r.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_command_the_card_never_ran_is_proved_and_due_again() {
    let he = start(options("security-card", true)).await;
    let mut a = TestBox::new(&he, "box-000301", 10_000).await;
    let (sale, r) = a.buy("CABLE", "ppv-1001").await;
    assert!(receipt(&r).released);
    let p = he.running.payment.clone().unwrap();
    let paid = a.balance();
    let totals = p.totals().await;
    refund::authorize(&p, &sale.transaction_id, None).unwrap();

    // The command comes back and is lost: the card never runs it.
    let req = a.0.refund_request(&sale.transaction_id).unwrap();
    let lost = a.call(&Message::RefundRequest(req)).await;
    assert!(matches!(lost, Message::RefundCommand(_)), "{lost:?}");
    // A fresh request is refused while the command is out; the refund stays listed.
    let fresh = a.0.refund_request(&sale.transaction_id).unwrap();
    refused(
        &a.call(&Message::RefundRequest(fresh)).await,
        ErrorCode::InDoubt,
        "proof",
    );
    assert_eq!(a.0.refunds_due().await.unwrap().len(), 1);
    // The card's proof (its counter has not moved): counted back, due again.
    let proof = a.0.proof().unwrap();
    let back = a
        .call(&Message::RefundProof(RefundProofMsg {
            transaction_id: sale.transaction_id.clone(),
            proof,
        }))
        .await;
    assert!(!receipt(&back).released, "{back:?}");
    assert_eq!(p.totals().await, totals, "the refund is counted back");
    // The lost command no longer runs on the card (its session ended with the proof).
    assert!(a.0.credit(&lost).is_err());
    assert_eq!(a.balance(), paid);
    // The refund runs once, later.
    let done = a.0.refund(&sale.transaction_id).await.unwrap();
    assert!(receipt(&done).released, "{done:?}");
    assert_eq!(a.balance(), paid + sale.amount.minor);
    // A later INITIALIZE of the card now says credited: nothing more moves.
    let proof = a.0.proof().unwrap();
    let again = a
        .call(&Message::RefundProof(RefundProofMsg {
            transaction_id: sale.transaction_id.clone(),
            proof,
        }))
        .await;
    assert!(receipt(&again).released, "{again:?}");
    assert_eq!(a.balance(), paid + sale.amount.minor);
    let f = p.refund(&sale.transaction_id).unwrap();
    assert_eq!(f.reversed.len(), 1);
    assert_eq!(f.state_name(), "credited");
    he.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credit_the_card_ran_whose_answer_was_lost_completes_from_the_card_log() {
    let he = start(options("security-card", true)).await;
    let mut a = TestBox::new(&he, "box-000302", 10_000).await;
    let (sale, r) = a.buy("CABLE", "ppv-1001").await;
    assert!(receipt(&r).released);
    let p = he.running.payment.clone().unwrap();
    let paid = a.balance();
    refund::authorize(&p, &sale.transaction_id, None).unwrap();
    let req = a.0.refund_request(&sale.transaction_id).unwrap();
    let cmd = a.call(&Message::RefundRequest(req)).await;
    // The card credits; its answer is lost on the way.
    a.0.credit(&cmd).unwrap();
    assert_eq!(a.balance(), paid + sale.amount.minor);
    // The card's log holds the signed credit response.
    a.apdu(&commands::select());
    let log = LogRecord::decode(&a.apdu(&commands::read_log(1)).data).unwrap();
    let card_id = a.0.card_id();
    let logged: CreditResponse = log.credit_response(card_id).expect("a credit record");
    // Tampered (a larger credit): refused, nothing completed.
    let mut forged = logged.clone();
    forged.0.amount += 100;
    forged.0.new_balance += 100;
    let m = a
        .call(&Message::RefundResponse(RefundResponseMsg {
            transaction_id: sale.transaction_id.clone(),
            response: forged,
        }))
        .await;
    assert!(matches!(m, Message::Error(_)), "{m:?}");
    // The genuine signature with only the new balance changed (the outside attack's F3).
    let mut forged = logged.clone();
    forged.0.new_balance += 100;
    let m = a
        .call(&Message::RefundResponse(RefundResponseMsg {
            transaction_id: sale.transaction_id.clone(),
            response: forged,
        }))
        .await;
    assert!(matches!(m, Message::Error(_)), "{m:?}");
    assert_eq!(
        p.refund(&sale.transaction_id).unwrap().state_name(),
        "issued"
    );
    let done = a
        .call(&Message::RefundResponse(RefundResponseMsg {
            transaction_id: sale.transaction_id.clone(),
            response: logged,
        }))
        .await;
    assert!(receipt(&done).released, "{done:?}");
    assert_eq!(
        p.refund(&sale.transaction_id).unwrap().state_name(),
        "credited"
    );
    assert_eq!(a.balance(), paid + sale.amount.minor, "credited once");
    he.running.stop().await;
}

/// The outside attack through the binaries (F1, F2): a refund whose card moved on before
/// its box came back — a purchase after a credit command it never ran; 33 purchases after a
/// credit whose answer was lost, its log record gone — was stuck for good ("counter
/// moved"). The card's later INITIALIZE names the credit sessions it ran: the first is due
/// again and then credited once, the second credited; each counted off once at the
/// security card and collected once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_is_settled_from_the_card_whatever_it_did_since() {
    // 36 purchases from one box: past the demo's offer rate.
    let he = start_edited(
        purchase_support::pg_rig::Backend::Sqlite,
        options("security-card", true),
        |t| t.to_string() + "\n[gateway.limits]\noffers_per_minute = 60000\nburst = 1000\n",
    )
    .await
    .unwrap();
    let mut a = TestBox::new(&he, "box-000303", 50_000).await;
    let (one, r) = a.buy("CABLE", "ppv-1001").await;
    assert!(receipt(&r).released);
    let (two, r) = a.buy("CABLE", "ppv-1002").await;
    assert!(receipt(&r).released);
    let p = he.running.payment.clone().unwrap();
    refund::authorize(&p, &one.transaction_id, None).unwrap();
    refund::authorize(&p, &two.transaction_id, None).unwrap();

    // One: the command is lost, then the card buys again.
    let req = a.0.refund_request(&one.transaction_id).unwrap();
    let lost = a.call(&Message::RefundRequest(req)).await;
    assert!(matches!(lost, Message::RefundCommand(_)), "{lost:?}");
    let (_, r) = a.buy("CABLE", "ppv-1001").await;
    assert!(receipt(&r).released);
    let before = a.balance();
    let proof = a.0.proof().unwrap();
    let back = a
        .call(&Message::RefundProof(RefundProofMsg {
            transaction_id: one.transaction_id.clone(),
            proof,
        }))
        .await;
    assert!(
        !receipt(&back).released,
        "not credited: due again, {back:?}"
    );
    let done = a.0.refund(&one.transaction_id).await.unwrap();
    assert!(receipt(&done).released, "{done:?}");
    assert_eq!(a.balance(), before + one.amount.minor);

    // Two: credited, the answer lost, then 33 purchases (the log keeps 32).
    let req = a.0.refund_request(&two.transaction_id).unwrap();
    let cmd = a.call(&Message::RefundRequest(req)).await;
    a.0.credit(&cmd).unwrap();
    for _ in 0..33 {
        let (_, r) = a.buy("CABLE", "ppv-1001").await;
        assert!(receipt(&r).released);
    }
    a.apdu(&commands::select());
    let credits_in_log = (1..=32)
        .filter_map(|n| LogRecord::decode(&a.apdu(&commands::read_log(n)).data).ok())
        .filter(|r| r.kind == proto::purse::LogKind::Credit)
        .count();
    assert_eq!(credits_in_log, 0, "the credit's record left the log");
    let before = a.balance();
    let totals = p.totals().await;
    let proof = a.0.proof().unwrap();
    let done = a
        .call(&Message::RefundProof(RefundProofMsg {
            transaction_id: two.transaction_id.clone(),
            proof,
        }))
        .await;
    assert!(
        receipt(&done).released,
        "credited on the card's word: {done:?}"
    );
    assert_eq!(a.balance(), before, "nothing more moves");
    assert_eq!(p.totals().await, totals, "counted off once");
    assert_eq!(a.0.refunds_due().await.unwrap(), vec![]);
    let batch = p.close_batch().unwrap().expect("a batch");
    let mut refunded: Vec<_> = batch
        .refunds
        .iter()
        .map(|r| r.transaction_id.clone())
        .collect();
    refunded.sort();
    let mut want = vec![one.transaction_id.clone(), two.transaction_id.clone()];
    want.sort();
    assert_eq!(refunded, want);
    he.running.stop().await;
}

/// The outside attack (F4, F5, F8): refunds-due requests are read through the card's
/// index and rate limited per box like the catalog; a refund step with a 60,000-byte
/// transaction id gets a short refusal that does not repeat it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refund_requests_are_bounded() {
    let he = start(options("security-card", true)).await;
    let mut a = TestBox::new(&he, "box-000304", 10_000).await;
    let card_id = a.0.card_id();
    let mut limited = 0;
    for _ in 0..200 {
        match a.call(&Message::RefundsDueRequest { card_id }).await {
            Message::RefundsDue(d) => assert!(d.is_empty()),
            Message::Error(e) if e.code == ErrorCode::RateLimited => limited += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(
        limited > 0,
        "200 refunds-due requests in a row are rate limited"
    );
    let mut req = a.0.refund_request("x").unwrap();
    req.transaction_id = "T".repeat(60_000);
    let m = a.call(&Message::RefundRequest(req)).await;
    let Message::Error(e) = &m else {
        panic!("{m:?}")
    };
    assert_eq!(e.code, ErrorCode::Malformed);
    assert!(m.to_payload().len() < 1_000, "a short refusal");
    he.running.stop().await;
}
