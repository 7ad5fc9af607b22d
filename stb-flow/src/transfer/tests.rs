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
    let mut next = next;
    let mut busy = 0;
    loop {
        next = match next {
            Next::Apdu(a) => flow.card(&proto::apdu::CardApplication::process_apdu(c, &a)),
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
}
