//! Card to card across two boxes through the gateway (issue 18; seed 004 FIG. 4): real
//! processes (a split head end, each role its own `headend <role>`), QUIC on loopback, two
//! boxes each running the box's own transfer flow (`stb_flow::transfer`) against its own
//! purse card. The payee's box opens the transfer and gets a code; the payer's joins with
//! it; the cards' packets P1–P4 and the receipt go through the gateway's journaled mailbox.
//! Then the gateway is SIGKILLed right after the payer's card was debited and restarted:
//! the payee's card is credited exactly once, the two cards' sum unchanged.

mod split_support;

use std::path::PathBuf;
use std::time::Duration;

use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::LogKind;
use split_support::wire_box::{self, WireBox};
use split_support::*;
use stb_flow::transfer::{Next, Outcome, Transfer};
use tokio::sync::{mpsc, oneshot};

const PAYER_CARD: u64 = 0x7A11_0001;
const PAYEE_CARD: u64 = 0x7A11_0002;

/// Where a box reconnects after its connection died (the gateway's restart).
struct Reconnect {
    ca: PathBuf,
    addr: std::net::SocketAddr,
}

/// The box's shell around the flow: APDUs to its card, messages to the gateway (reconnecting
/// and telling the flow when a call failed), the code and the confirmation through the
/// test. `debited` fires once the payer's card holds a sent transfer; `cancel`, when it
/// fires, is the viewer pressing Back.
async fn drive(
    b: &mut WireBox,
    flow: &mut Transfer,
    reconnect: &Reconnect,
    code: Option<oneshot::Sender<String>>,
    mut debited: Option<(oneshot::Sender<()>, oneshot::Receiver<()>)>,
    mut cancel: Option<oneshot::Receiver<()>>,
    failed_calls: &mut u32,
) -> Result<Outcome, String> {
    let mut code = code;
    let mut next = flow.start();
    let mut steps = 0;
    loop {
        steps += 1;
        if steps > 2_000 {
            return Err("no end in 2 000 steps".into());
        }
        next = match next {
            Next::Apdu(apdu) => {
                let r = b.card.process_apdu_bytes(&apdu);
                if b.card.state.sent.is_some() {
                    if let Some((tell, resume)) = debited.take() {
                        let _ = tell.send(());
                        let _ = resume.await;
                    }
                }
                flow.card(&r)
            }
            Next::Send(_, _) if cancel.as_mut().is_some_and(|c| c.try_recv().is_ok()) => {
                cancel = None;
                flow.cancel()
            }
            Next::Send(m, wait) => {
                tokio::time::sleep(wait).await;
                match tokio::time::timeout(Duration::from_secs(5), b.call(&m)).await {
                    Ok(Ok(answer)) => flow.answer(answer),
                    _ => {
                        *failed_calls += 1;
                        // The gateway went away: a new connection, the same message again.
                        if let Ok(Ok(c)) = tokio::time::timeout(
                            Duration::from_secs(5),
                            wire_box::connect(&reconnect.ca, &b.id, reconnect.addr),
                        )
                        .await
                        {
                            b.client = c;
                        }
                        flow.failed()
                    }
                }
            }
            Next::ShowCode(c) => {
                if let Some(tx) = code.take() {
                    let _ = tx.send(c);
                }
                flow.go_on()
            }
            Next::Confirm(_) => flow.go_on(),
            Next::NeedsPin { .. } => return Err("these cards have no PIN".into()),
            Next::Done(o) => return Ok(o),
            Next::Refused(why) => return Err(why),
        }
    }
}

trait Bytes {
    fn process_apdu_bytes(&mut self, apdu: &[u8]) -> Vec<u8>;
}

impl Bytes for proto::card::PurseCard {
    fn process_apdu_bytes(&mut self, apdu: &[u8]) -> Vec<u8> {
        proto::apdu::CardApplication::process_apdu(self, apdu)
    }
}

/// What happens once the payer's card was debited.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AfterDebit {
    Nothing,
    /// The gateway is SIGKILLed and restarted.
    KillGateway,
    /// The payee's viewer cancels (the payer's P4 has not been posted yet).
    PayeeCancels,
}

/// Runs one transfer of `amount` between a fresh payer box and payee box, with `after`
/// once the payer's card was debited.
async fn transfer(split: &mut Split, amount: u64, after: AfterDebit) -> (WireBox, WireBox) {
    let kill = after == AfterDebit::KillGateway;
    let reconnect = || Reconnect {
        ca: split.ca.clone(),
        addr: split.addr[&R::Gateway],
    };
    let mut payer = WireBox {
        id: "box-000011".into(),
        client: split.connect_box("box-000011").await,
        card: split.app_card(PAYER_CARD, 10_000, 49),
    };
    let mut payee = WireBox {
        id: "box-000012".into(),
        client: split.connect_box("box-000012").await,
        card: split.app_card(PAYEE_CARD, 2_000, 51),
    };
    let money = Money::new(amount, Currency::EUR);
    let (code_tx, code_rx) = oneshot::channel();
    let (r1, r2) = (reconnect(), reconnect());
    let (cancel_tx, cancel_rx) = oneshot::channel();
    let payee_task = tokio::spawn(async move {
        let mut flow = Transfer::receive("box-000012/xfer-0001".into(), money, wire_box::today());
        let mut failed = 0;
        let code = Some(code_tx);
        let cancel = Some(cancel_rx);
        let out = drive(&mut payee, &mut flow, &r1, code, None, cancel, &mut failed).await;
        (payee, out, failed)
    });
    let code = code_rx.await.expect("the payee's box shows a code");
    assert_eq!(code.len(), 8, "{code}");
    let (tell_tx, tell_rx) = oneshot::channel();
    let (resume_tx, resume_rx) = oneshot::channel();
    let (done_tx, mut done_rx) = mpsc::channel(1);
    let payer_task = tokio::spawn(async move {
        let mut flow = Transfer::send(code, None, wire_box::today());
        let mut failed = 0;
        let debited = Some((tell_tx, resume_rx));
        let out = drive(&mut payer, &mut flow, &r2, None, debited, None, &mut failed).await;
        let _ = done_tx.send(()).await;
        (payer, out, failed)
    });
    // The payer's card is debited: P4 exists only on that card (and, once posted, in the
    // gateway's journal).
    let within = |t| tokio::time::timeout(Duration::from_secs(60), t);
    let mut payee_task = Some(payee_task);
    let mut payee_done = None;
    tokio::select! {
        _ = tell_rx => {
            match after {
                AfterDebit::Nothing => {}
                AfterDebit::KillGateway => {
                    split.kill(R::Gateway);
                    split.spawn(R::Gateway).await;
                }
                AfterDebit::PayeeCancels => {
                    cancel_tx.send(()).unwrap();
                    let task = payee_task.take().unwrap();
                    payee_done = Some(within(task).await.expect("the payee's flow ends").unwrap());
                }
            }
            let _ = resume_tx.send(());
        }
        _ = done_rx.recv() => panic!("the payer's flow ended before its card was debited"),
    }
    let (payer, sent, payer_failed) = within(payer_task)
        .await
        .expect("the payer's flow ends")
        .unwrap();
    let (payee, received, payee_failed) = match payee_task {
        Some(t) => within(t).await.expect("the payee's flow ends").unwrap(),
        None => payee_done.unwrap(),
    };
    if after == AfterDebit::PayeeCancels {
        assert_eq!(
            sent,
            Ok(Outcome::Returned {
                amount: money,
                to_card: PAYEE_CARD
            })
        );
        assert_eq!(received, Ok(Outcome::Declined { amount: money }));
        return (payer, payee);
    }
    // With the kill, the payer's post of P4 (its next call) met the dead gateway.
    assert_eq!(
        (payer_failed > 0, payee_failed > 0 || !kill),
        (kill, true),
        "calls that failed: payer {payer_failed}, payee {payee_failed}"
    );
    assert_eq!(
        sent,
        Ok(Outcome::Sent {
            amount: money,
            to_card: PAYEE_CARD
        })
    );
    assert_eq!(received, Ok(Outcome::Received { amount: money }));
    (payer, payee)
}

fn assert_moved_once(payer: &WireBox, payee: &WireBox, amount: u64) {
    let (a, b) = (&payer.card.state, &payee.card.state);
    assert_eq!(
        (a.balance, b.balance),
        (10_000 - amount, 2_000 + amount),
        "moved exactly once"
    );
    assert_eq!(a.balance + b.balance, 12_000, "the sum is unchanged");
    assert_eq!(
        (a.sent.clone(), b.receiving.clone()),
        (None, None),
        "settled"
    );
    // Both passbooks name the other card, once each.
    let out: Vec<_> = a
        .log
        .iter()
        .filter(|r| r.kind == LogKind::TransferOut)
        .collect();
    let inn: Vec<_> = b
        .log
        .iter()
        .filter(|r| r.kind == LogKind::TransferIn)
        .collect();
    assert_eq!(out.len(), 1, "{:?}", a.log);
    assert_eq!(inn.len(), 1, "{:?}", b.log);
    assert_eq!((out[0].counterparty, out[0].amount), (PAYEE_CARD, amount));
    assert_eq!((inn[0].counterparty, inn[0].amount), (PAYER_CARD, amount));
    assert_eq!(out[0].signature, inn[0].signature, "the same transfer (R2)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_boxes_move_5_00_card_to_card_through_the_gateway() {
    let mut split = Split::start(Options::default()).await;
    let (payer, payee) = transfer(&mut split, 500, AfterDebit::Nothing).await;
    assert_moved_once(&payer, &payee, 500);
    // The gateway journaled every packet before acknowledging it.
    let journal = split.journal(R::Gateway);
    let rec: headend::gateway::transfer::TransferRec = headend::journal::decode(
        &journal
            .get(headend::journal::Kind::Transfer, "box-000012/xfer-0001")
            .unwrap()
            .expect("the mailbox"),
    )
    .unwrap();
    assert_eq!(
        rec.packets.keys().copied().collect::<Vec<_>>(),
        [
            TransferStep::P1,
            TransferStep::P23,
            TransferStep::P4,
            TransferStep::Settlement
        ]
    );
    assert_eq!(
        (rec.payer_box.as_deref(), rec.payee_box.as_str()),
        (Some("box-000011"), "box-000012")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_sigkilled_after_the_payers_debit_credits_the_payee_exactly_once() {
    let mut split = Split::start(Options::default()).await;
    let (payer, payee) = transfer(&mut split, 500, AfterDebit::KillGateway).await;
    assert_moved_once(&payer, &payee, 500);
}

/// The other way a debited transfer ends: the payee's viewer cancels before P4 came; its
/// card signs the cancellation, the payer's card takes it and is credited back — the payee
/// never credited, the sum unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_payee_that_cancels_after_the_payers_debit_credits_the_payer_back() {
    let mut split = Split::start(Options::default()).await;
    let (payer, payee) = transfer(&mut split, 500, AfterDebit::PayeeCancels).await;
    let (a, b) = (&payer.card.state, &payee.card.state);
    assert_eq!((a.balance, b.balance), (10_000, 2_000));
    let kinds = |s: &proto::card::CardState| s.log.iter().map(|r| r.kind).collect::<Vec<_>>();
    assert_eq!(kinds(a), [LogKind::TransferOut, LogKind::TransferBack]);
    assert_eq!(
        kinds(b),
        Vec::<LogKind>::new(),
        "the payee was never credited"
    );
    assert_eq!(
        (a.sent.clone(), b.receiving.clone()),
        (None, None),
        "settled"
    );
}

/// The second outside attack on the mailbox: a transfer id is the payee box's own (no
/// squatting another box's), a box cannot open transfers without limit (G3), a third box
/// learns nothing of a pair's transfer — the answer is the one for no transfer (G6) — and
/// a settlement comes only after the payee's card answered P1 (G5).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mailbox_keeps_ids_per_box_limits_invites_and_hides_pairs_from_third_boxes() {
    let split = Split::start(Options::default()).await;
    let payee = WireBox {
        id: "box-000021".into(),
        client: split.connect_box("box-000021").await,
        card: split.app_card(PAYEE_CARD, 0, 51),
    };
    let third = WireBox {
        id: "box-000023".into(),
        client: split.connect_box("box-000023").await,
        card: split.app_card(0x7A11_0003, 0, 51),
    };
    let invite = |id: &str| {
        Message::TransferInvite(TransferInvite {
            transfer_id: id.into(),
            amount: Money::new(500, Currency::EUR),
            payee_card: PAYEE_CARD,
            payee_epochs: [51, 52, 53, 54],
            payee_challenge: [7; 8],
        })
    };
    let code = |m: &Message| match m {
        Message::Error(e) => Some(e.code),
        _ => None,
    };
    // Another box's id prefix, or none: refused.
    for id in ["box-000023/t", "t-1", "box-000021/"] {
        let a = payee.call(&invite(id)).await.unwrap();
        assert_eq!(code(&a), Some(ErrorCode::Malformed), "{id}: {a:?}");
    }
    let a = payee.call(&invite("box-000021/t-1")).await.unwrap();
    assert!(matches!(a, Message::TransferTerms(_)), "{a:?}");
    // A third box: the answer for a pair's transfer is the answer for none.
    let fetch = |id: &str| Message::TransferFetch {
        transfer_id: id.into(),
        step: TransferStep::P1,
    };
    let theirs = third.call(&fetch("box-000021/t-1")).await.unwrap();
    let none = third.call(&fetch("box-000021/none")).await.unwrap();
    assert_eq!(
        code(&theirs),
        Some(ErrorCode::UnknownTransaction),
        "{theirs:?}"
    );
    assert_eq!(
        format!("{theirs:?}").replace("t-1", "none"),
        format!("{none:?}"),
        "indistinguishable"
    );
    // No settlement before the payee's card answered P1 (P2 P3 posted).
    let settle = Message::TransferPost(TransferPacket {
        transfer_id: "box-000021/t-1".into(),
        step: TransferStep::Settlement,
        data: vec![0; 17],
    });
    let a = payee.call(&settle).await.unwrap();
    assert_eq!(code(&a), Some(ErrorCode::Malformed), "{a:?}");
    // The payee withdraws before its card answered P1: the code is dead, the joined payer
    // is told, and no packet is taken after it.
    let Message::TransferTerms(terms) = payee.call(&invite("box-000021/w-1")).await.unwrap() else {
        panic!("terms")
    };
    let join = Message::TransferJoin {
        code: terms.code.clone(),
    };
    assert!(matches!(
        third.call(&join).await.unwrap(),
        Message::TransferTerms(_)
    ));
    let post = |step, data: Vec<u8>| {
        Message::TransferPost(TransferPacket {
            transfer_id: "box-000021/w-1".into(),
            step,
            data,
        })
    };
    let a = payee
        .call(&post(TransferStep::Withdrawn, vec![0]))
        .await
        .unwrap();
    assert!(matches!(a, Message::Ack { .. }), "{a:?}");
    let a = payee
        .call(&post(TransferStep::Withdrawn, vec![0]))
        .await
        .unwrap();
    assert!(matches!(a, Message::Ack { .. }), "a repeat is taken: {a:?}");
    let told = third
        .call(&Message::TransferFetch {
            transfer_id: "box-000021/w-1".into(),
            step: TransferStep::P23,
        })
        .await
        .unwrap();
    assert!(
        matches!(&told, Message::Error(e) if e.reason.contains("withdrew")),
        "{told:?}"
    );
    // The code is freed: it names no transfer any more.
    let a = third.call(&join).await.unwrap();
    assert_eq!(code(&a), Some(ErrorCode::UnknownTransaction), "{a:?}");
    for (who, m) in [
        (&third, post(TransferStep::P1, vec![1; 40])),
        (&payee, post(TransferStep::P23, vec![2; 40])),
    ] {
        let a = who.call(&m).await.unwrap();
        assert!(
            matches!(&a, Message::Error(e) if e.reason.contains("withdrew")),
            "{m:?} after the withdrawal: {a:?}"
        );
    }
    // The payee's card cancels before its P2 P3 reached the mailbox (its box restarted):
    // the cancellation is taken after P1, the payer is told, and no P2 P3 comes after it.
    let Message::TransferTerms(terms) = payee.call(&invite("box-000021/c-1")).await.unwrap() else {
        panic!("terms")
    };
    let join = Message::TransferJoin { code: terms.code };
    assert!(matches!(
        third.call(&join).await.unwrap(),
        Message::TransferTerms(_)
    ));
    let post = |step, data: Vec<u8>| {
        Message::TransferPost(TransferPacket {
            transfer_id: "box-000021/c-1".into(),
            step,
            data,
        })
    };
    let a = third
        .call(&post(TransferStep::P1, vec![1; 40]))
        .await
        .unwrap();
    assert!(matches!(a, Message::Ack { .. }), "{a:?}");
    let a = payee
        .call(&post(TransferStep::Settlement, vec![2; 17]))
        .await
        .unwrap();
    assert!(
        matches!(a, Message::Ack { .. }),
        "a cancellation after P1: {a:?}"
    );
    let told = third
        .call(&Message::TransferFetch {
            transfer_id: "box-000021/c-1".into(),
            step: TransferStep::P23,
        })
        .await
        .unwrap();
    assert!(
        matches!(&told, Message::Error(e) if e.reason.contains("cancelled")),
        "{told:?}"
    );
    let a = payee
        .call(&post(TransferStep::P23, vec![3; 40]))
        .await
        .unwrap();
    assert!(
        matches!(&a, Message::Error(e) if e.reason.contains("cancelled")),
        "no P2 P3 after the card cancelled: {a:?}"
    );
    // Invites cost the box's budget: past its burst they are rate-limited.
    let mut limited = 0;
    for n in 0..40 {
        let a = payee
            .call(&invite(&format!("box-000021/flood-{n}")))
            .await
            .unwrap();
        if code(&a) == Some(ErrorCode::RateLimited) {
            limited += 1;
        }
    }
    assert!(limited > 0, "40 invites at once were never limited");
    let opened = split
        .journal(R::Gateway)
        .all(headend::journal::Kind::Transfer)
        .unwrap()
        .len();
    assert!(opened < 30, "{opened} transfers opened");
}
