//! The two flows against two real purse cards and a fake of the gateway's mailbox (a map:
//! the real one is `headend::gateway::transfer`, exercised over QUIC by
//! `headend/tests/transfer.rs`). What the outside attack found in the flows: a payee whose
//! card refuses P4 cancels (H2), and a flow waiting on a box that never answers gives up,
//! the payee cancelling on its card (H3).

use std::collections::BTreeMap;

use super::*;
use proto::card::{CardSpec, CardState, PurseCard};
use proto::crypto::DesKey;
use proto::messages::TransferPacket;
use proto::money::Currency;
use proto::purse::IssuerKeys;

const TODAY: Date = Date::new(2026, 12, 1);

fn card(id: u64, balance: u64, oldest: u8) -> PurseCard {
    let issuer = IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    };
    let state = CardState::personalise(
        &CardSpec::demo(id, Currency::EUR, balance, 100_000),
        &issuer,
    )
    .with_app_keys(&DesKey::new([0x5A; 16]), oldest)
    .unwrap();
    PurseCard::new(state, id)
}

/// A fake of the gateway's mailbox: terms by code, packets by step.
#[derive(Default)]
struct FakeMailbox {
    terms: Option<TransferTerms>,
    packets: BTreeMap<TransferStep, Vec<u8>>,
    /// Steps never delivered (a box that posts them and vanishes).
    withheld: Vec<TransferStep>,
}

impl FakeMailbox {
    fn answer(&mut self, m: &Message) -> Message {
        let ack = |id: &str| Message::Ack {
            transaction_id: id.into(),
        };
        match m {
            Message::TransferInvite(i) => {
                let t = TransferTerms {
                    invite: i.clone(),
                    code: "12345678".into(),
                };
                self.terms = Some(t.clone());
                Message::TransferTerms(t)
            }
            Message::TransferJoin { .. } => Message::TransferTerms(self.terms.clone().unwrap()),
            Message::TransferPost(p) => {
                if !self.withheld.contains(&p.step) {
                    self.packets.insert(p.step, p.data.clone());
                }
                ack(&p.transfer_id)
            }
            Message::TransferFetch { transfer_id, step } => match self.packets.get(step) {
                Some(d) => Message::TransferPacket(TransferPacket {
                    transfer_id: transfer_id.clone(),
                    step: *step,
                    data: d.clone(),
                }),
                None => Message::error(ErrorCode::Busy, "not yet", None),
            },
            other => panic!("{other:?}"),
        }
    }
}

/// Runs a flow until it needs the other box (a fetch of a packet not there yet, once it
/// was asked `patience` times) or ends.
fn run(
    flow: &mut Transfer,
    next: Next,
    c: &mut PurseCard,
    mb: &mut FakeMailbox,
    patience: u32,
) -> Next {
    run_noting(flow, next, c, mb, patience, &mut None)
}

/// [`run`], noting the R2 the flow said it commits under (what the box journals).
fn run_noting(
    flow: &mut Transfer,
    next: Next,
    c: &mut PurseCard,
    mb: &mut FakeMailbox,
    patience: u32,
    committed: &mut Option<[u8; 8]>,
) -> Next {
    let mut next = next;
    let mut busy = 0;
    loop {
        next = match next {
            Next::Apdu(a) => {
                let answer = flow.card(&proto::apdu::CardApplication::process_apdu(c, &a));
                if flow.random().is_some() {
                    *committed = flow.random();
                }
                answer
            }
            Next::Send(m, _) => {
                let answer = mb.answer(&m);
                if matches!(&answer, Message::Error(e) if e.code == ErrorCode::Busy) {
                    busy += 1;
                    if busy > patience {
                        return Next::Send(m, POLL);
                    }
                }
                flow.answer(answer)
            }
            Next::ShowCode(_) | Next::Confirm(_) => flow.go_on(),
            end => return end,
        }
    }
}

#[test]
fn a_payee_whose_card_refuses_p4_cancels_and_the_payer_is_credited_back() {
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox::default();
    let amount = Money::new(500, Currency::EUR);
    let mut payee = Transfer::receive("box-2/t1".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0); // invite, wait for P1
    let first = payer.start();
    let waiting_payer = run(&mut payer, first, &mut a, &mut mb, 0); // P1 posted, waits P23
    let waiting = run(&mut payee, waiting, &mut b, &mut mb, 0); // P23 posted, waits P4
    // A load reaches the payee's card meanwhile: 500 more would pass its maximum.
    b.state.balance = 99_700;
    let waiting_payer = run(&mut payer, waiting_payer, &mut a, &mut mb, 0); // debited, P4 posted
    assert_eq!(a.state.balance, 9_500);
    let end = run(&mut payee, waiting, &mut b, &mut mb, 0);
    assert_eq!(end, Next::Done(Outcome::Declined { amount }));
    let end = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
    assert_eq!(end, Next::Done(Outcome::Returned { amount, to_card: 2 }));
    assert_eq!((a.state.balance, b.state.balance), (10_000, 99_700));
    assert_eq!(
        (a.state.sent.clone(), b.state.receiving.clone()),
        (None, None)
    );
}

#[test]
fn a_payee_waiting_on_a_payer_that_never_posts_p4_gives_up_and_cancels() {
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox {
        withheld: vec![TransferStep::P4],
        ..FakeMailbox::default()
    };
    let amount = Money::new(500, Currency::EUR);
    let mut payee = Transfer::receive("box-2/t1".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let waiting_payer = run(&mut payer, first, &mut a, &mut mb, 0);
    let waiting = run(&mut payee, waiting, &mut b, &mut mb, 0);
    // The payer is debited and its P4 never arrives.
    let waiting_payer = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
    assert_eq!(a.state.balance, 9_500);
    let end = run(&mut payee, waiting, &mut b, &mut mb, MAX_POLLS + 1);
    assert_eq!(
        end,
        Next::Done(Outcome::Declined { amount }),
        "gave up and cancelled"
    );
    assert_eq!(b.state.receiving, None);
    let end = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
    assert_eq!(end, Next::Done(Outcome::Returned { amount, to_card: 2 }));
    assert_eq!((a.state.balance, b.state.balance), (10_000, 2_000));

    // A payer that waits on a payee that never answers P1 gives up too: nothing moved.
    let mut mb = FakeMailbox::default();
    let mut lone = Transfer::receive("box-2/t2".into(), amount, TODAY);
    let first = lone.start();
    let end = run(&mut lone, first, &mut b, &mut mb, MAX_POLLS + 1);
    assert!(
        matches!(end, Next::Refused(ref why) if why.contains("nothing moved")),
        "{end:?}"
    );
    assert!(
        mb.packets.contains_key(&TransferStep::Withdrawn),
        "the payee withdrew its code when it gave up"
    );
}

/// A box that restarts mid-transfer resumes from its journal (R2) and its card's STATUS
/// (issue 18's H1), whichever side and wherever it died: the value moves exactly once.
#[test]
fn a_restarted_box_resumes_from_its_card_and_the_value_moves_once() {
    let amount = Money::new(500, Currency::EUR);

    // 1. The payee box dies after its card answered P1 (it waits for P4); the payer is
    //    debited meanwhile. The restarted payee fetches P4, is credited, posts its receipt.
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox::default();
    let mut payee = Transfer::receive("box-2/r1".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let (mut r2_payee, mut r2_payer) = (None, None);
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let waiting_payer = run_noting(&mut payer, first, &mut a, &mut mb, 0, &mut r2_payer);
    let _dies = run_noting(&mut payee, waiting, &mut b, &mut mb, 0, &mut r2_payee);
    assert!(
        payee.pending(),
        "its card answered P1: the journal must stay open"
    );
    drop(payee);
    let waiting_payer = run_noting(&mut payer, waiting_payer, &mut a, &mut mb, 0, &mut r2_payer);
    assert_eq!(a.state.balance, 9_500, "debited");
    assert!(b.state.receiving.is_some(), "the payee card waits for P4");
    let r2 = r2_payee.expect("the payee journaled R2 once its card answered P1");
    assert_eq!(Some(r2), r2_payer, "both boxes journal the same R2");
    let mut again = Transfer::resume("box-2/r1".into(), false, Some(r2), amount, None, TODAY);
    let first = again.start();
    assert!(
        again.pending(),
        "resumed: pending until the card says otherwise"
    );
    assert_eq!(
        run(&mut again, first, &mut b, &mut mb, 0),
        Next::Done(Outcome::Received { amount })
    );
    assert!(!again.pending());
    assert_eq!(
        run(&mut payer, waiting_payer, &mut a, &mut mb, 0),
        Next::Done(Outcome::Sent { amount, to_card: 2 })
    );
    assert_eq!((a.state.balance, b.state.balance), (9_500, 2_500));

    // 2. The payer box dies after the debit, before its P4 reached the mailbox. The
    //    restarted payer posts the P4 its card kept and settles.
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox {
        withheld: vec![TransferStep::P4],
        ..FakeMailbox::default()
    };
    let mut payee = Transfer::receive("box-2/r2".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let mut r2 = None;
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let waiting_payer = run_noting(&mut payer, first, &mut a, &mut mb, 0, &mut r2);
    let waiting = run(&mut payee, waiting, &mut b, &mut mb, 0);
    let _dies = run_noting(&mut payer, waiting_payer, &mut a, &mut mb, 0, &mut r2);
    drop(payer);
    assert_eq!(a.state.balance, 9_500, "debited, its P4 lost with the box");
    mb.withheld.clear();
    let mut again = Transfer::resume(
        "box-2/r2".into(),
        true,
        Some(r2.expect("the payer journaled R2 once its card was debited")),
        amount,
        Some(2),
        TODAY,
    );
    let first = again.start();
    let waiting_payer = run(&mut again, first, &mut a, &mut mb, 0);
    assert_eq!(
        run(&mut payee, waiting, &mut b, &mut mb, 0),
        Next::Done(Outcome::Received { amount })
    );
    assert_eq!(
        run(&mut again, waiting_payer, &mut a, &mut mb, 0),
        Next::Done(Outcome::Sent { amount, to_card: 2 })
    );
    assert_eq!((a.state.balance, b.state.balance), (9_500, 2_500));
    assert_eq!(a.state.sent, None, "settled");

    // 3. The payee box dies after its card was credited, before the receipt reached the
    //    mailbox. The restarted payee asks its card for its word on R2 (the receipt it
    //    remembers) and posts it; the payer settles as sent — not credited back.
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox {
        withheld: vec![TransferStep::Settlement],
        ..FakeMailbox::default()
    };
    let mut payee = Transfer::receive("box-2/r3".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let mut r2 = None;
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let waiting_payer = run(&mut payer, first, &mut a, &mut mb, 0);
    let waiting = run_noting(&mut payee, waiting, &mut b, &mut mb, 0, &mut r2);
    let waiting_payer = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
    let _dies = run(&mut payee, waiting, &mut b, &mut mb, 0);
    assert_eq!((a.state.balance, b.state.balance), (9_500, 2_500));
    mb.withheld.clear();
    let mut again = Transfer::resume("box-2/r3".into(), false, r2, amount, None, TODAY);
    let first = again.start();
    assert_eq!(
        run(&mut again, first, &mut b, &mut mb, 0),
        Next::Done(Outcome::Received { amount })
    );
    assert_eq!(
        run(&mut payer, waiting_payer, &mut a, &mut mb, 0),
        Next::Done(Outcome::Sent { amount, to_card: 2 })
    );
    assert_eq!((a.state.balance, b.state.balance), (9_500, 2_500));

    // 4. A payer that died before P2 P3 reached its card: nothing to settle, nothing moved.
    let (mut a, _b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut lone = Transfer::resume("box-2/r4".into(), true, None, amount, Some(2), TODAY);
    let first = lone.start();
    assert!(
        matches!(run(&mut lone, first, &mut a, &mut FakeMailbox::default(), 0), Next::Refused(ref w) if w.contains("not debited")),
    );
    assert!(!lone.pending(), "nothing on the card: the journal closes");
    assert_eq!(a.state.balance, 10_000);
}

/// A sender card with a PIN asks for it above its threshold (seed 004): the flow asks the
/// viewer, VERIFY then SEND; a wrong PIN ends it with nothing moved.
#[test]
fn a_sender_card_above_its_pin_threshold_asks_for_the_pin() {
    let amount = Money::new(500, Currency::EUR);
    for (pin, moves) in [("4711", true), ("1111", false)] {
        let mut a = card(1, 10_000, 49);
        a.state = a.state.clone().with_pin("4711", 100).unwrap();
        let mut b = card(2, 2_000, 51);
        let mut mb = FakeMailbox::default();
        let mut payee = Transfer::receive("box-2/p1".into(), amount, TODAY);
        let mut payer = Transfer::send("12345678".into(), None, TODAY);
        let first = payee.start();
        let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
        let first = payer.start();
        let asked = run(&mut payer, first, &mut a, &mut mb, 0);
        assert_eq!(asked, Next::NeedsPin { min: 4, max: 12 });
        assert!(payer.awaiting_pin());
        let next = payer.pin(Secret::new(pin.into()));
        let waiting_payer = run(&mut payer, next, &mut a, &mut mb, 0);
        if !moves {
            assert!(
                matches!(waiting_payer, Next::Refused(ref w) if w.contains("Verify")),
                "{waiting_payer:?}"
            );
            assert!(!payer.pending());
            assert_eq!(a.state.balance, 10_000);
            continue;
        }
        let waiting = run(&mut payee, waiting, &mut b, &mut mb, 0);
        let waiting_payer = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
        assert_eq!(
            run(&mut payee, waiting, &mut b, &mut mb, 0),
            Next::Done(Outcome::Received { amount })
        );
        assert_eq!(
            run(&mut payer, waiting_payer, &mut a, &mut mb, 0),
            Next::Done(Outcome::Sent { amount, to_card: 2 })
        );
        assert_eq!((a.state.balance, b.state.balance), (9_500, 2_500));
    }
}

/// The third outside attack (attack27), F1: the payer card's answer to P2 P3 is lost (the
/// card pulled mid-command): the card may be debited, so the flow stays pending and the
/// box keeps its journal row for resume — it resumes, posts the P4 the card kept, and the
/// value arrives once.
#[test]
fn a_payer_whose_debit_answer_is_lost_stays_pending_and_resumes() {
    let amount = Money::new(500, Currency::EUR);
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox::default();
    let mut payee = Transfer::receive("box-2/f1".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let Next::Send(fetch, _) = run(&mut payer, first, &mut a, &mut mb, 0) else {
        panic!("the payer waits for P2 P3")
    };
    let waiting = run(&mut payee, waiting, &mut b, &mut mb, 0);
    let Next::Apdu(p23) = payer.answer(mb.answer(&fetch)) else {
        panic!("P2 P3 for the card")
    };
    assert!(payer.committing());
    let _lost = proto::apdu::CardApplication::process_apdu(&mut a, &p23);
    assert!(matches!(
        payer.stop("the card did not answer"),
        Next::Refused(_)
    ));
    assert!(payer.pending(), "debited: the journal row must stay");
    assert_eq!(a.state.balance, 9_500);
    let mut again = Transfer::resume("box-2/f1".into(), true, None, amount, Some(2), TODAY);
    let first = again.start();
    let waiting_payer = run(&mut again, first, &mut a, &mut mb, 0);
    assert_eq!(
        run(&mut payee, waiting, &mut b, &mut mb, 0),
        Next::Done(Outcome::Received { amount })
    );
    assert_eq!(
        run(&mut again, waiting_payer, &mut a, &mut mb, 0),
        Next::Done(Outcome::Sent { amount, to_card: 2 })
    );
    assert_eq!((a.state.balance, b.state.balance), (9_500, 2_500));
}

/// attack27 F2: a hostile payee posts a forged settlement. The payer's card refuses it
/// (one bad key) and the flow ends disputed — which the box journals as such and never
/// tries again by itself, so a forged word cannot count the card into its lock.
#[test]
fn a_forged_settlement_ends_the_payer_disputed_after_one_bad_key() {
    let amount = Money::new(500, Currency::EUR);
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox {
        withheld: vec![TransferStep::Settlement],
        ..FakeMailbox::default()
    };
    let mut payee = Transfer::receive("box-2/f2".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let waiting_payer = run(&mut payer, first, &mut a, &mut mb, 0);
    let _ = run(&mut payee, waiting, &mut b, &mut mb, 0);
    let waiting_payer = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
    let r2 = b.state.receiving.as_ref().unwrap().random;
    let forged = Settlement {
        kind: Settled::Credited,
        random: r2,
        mac: [0; 8],
    };
    mb.packets.insert(TransferStep::Settlement, forged.encode());
    let before = a.state.bad_key_count;
    let end = run(&mut payer, waiting_payer, &mut a, &mut mb, 0);
    assert!(
        matches!(end, Next::Refused(ref w) if w.contains("does not verify")),
        "{end:?}"
    );
    assert!(payer.disputed() && payer.pending());
    assert_eq!(a.state.bad_key_count, before + 1, "one try, one bad key");
    assert!(a.state.sent.is_some(), "kept for the issuer");
    assert_eq!(
        JournalState::from_text(JournalState::Disputed.as_str()),
        Some(JournalState::Disputed)
    );
    assert!(!JournalState::IN_DOUBT.contains(&JournalState::Disputed));
}

/// attack27 F3: the payee's box dies after its card answered P1, before its P2 P3 reached
/// the mailbox. Resumed, it waits for P4 only RESUME_POLLS asks (a P4 that does not come
/// soon is not coming), cancels on its card and posts the cancellation (the gateway takes
/// a settlement after P1, and tells the payer): the journal closes, nothing moved.
#[test]
fn a_payee_resumed_before_its_p23_was_posted_cancels_soon() {
    let amount = Money::new(500, Currency::EUR);
    let (mut a, mut b) = (card(1, 10_000, 49), card(2, 2_000, 51));
    let mut mb = FakeMailbox {
        withheld: vec![TransferStep::P23],
        ..FakeMailbox::default()
    };
    let mut payee = Transfer::receive("box-2/f3".into(), amount, TODAY);
    let mut payer = Transfer::send("12345678".into(), None, TODAY);
    let mut r2 = None;
    let first = payee.start();
    let waiting = run(&mut payee, first, &mut b, &mut mb, 0);
    let first = payer.start();
    let _waiting_payer = run(&mut payer, first, &mut a, &mut mb, 0);
    let _dies = run_noting(&mut payee, waiting, &mut b, &mut mb, 0, &mut r2);
    assert!(b.state.receiving.is_some());
    let mut again = Transfer::resume("box-2/f3".into(), false, r2, amount, None, TODAY);
    let first = again.start();
    let end = run(&mut again, first, &mut b, &mut mb, RESUME_POLLS + 1);
    assert_eq!(end, Next::Done(Outcome::Declined { amount }));
    assert!(!again.pending());
    assert_eq!(b.state.receiving, None);
    assert_eq!((a.state.balance, b.state.balance), (10_000, 2_000));
}
