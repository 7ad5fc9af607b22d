//! The refund flow against a real purse card and a real security card in memory, the
//! security card standing where the payment server keeps it (issue, complete, reverse):
//! the card really credits and really refuses.

use super::*;
use proto::card::{CARD_ATR, CardSpec, CardState, PurseCard};
use proto::crypto::DesKey;
use proto::messages::{ErrorCode, ErrorMsg, Receipt, RefundCommandMsg};
use proto::purse::{DebitResponse, Expiry, IssuerKeys};
use proto::security_card::{DrawData, SecurityCard};

const TODAY: Date = Date::new(2026, 11, 30);
const EUR: Currency = Currency::EUR;

fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    }
}

/// A card with 1,000 that bought for 499 through `sc` (so `sc` has settled totals).
fn sold() -> (PurseCard, SecurityCard) {
    let spec = CardSpec {
        card_id: 42,
        provider_id: 1,
        currency: EUR,
        balance: 1_000,
        max_balance: 100_000,
        expiry: Expiry {
            year: 2030,
            month: 12,
        },
    };
    let mut card = PurseCard::new(CardState::personalise(&spec, &issuer()), 7);
    let mut sc = SecurityCard::new(0x5A, issuer().purchase());
    card.process(&commands::select());
    let init = PurchaseInit::decode(&ok(&mut card, &commands::init_purchase(TODAY))).unwrap();
    let draw = DrawData {
        merchant_id: "CABLE".into(),
        transaction_id: "sale-1".into(),
        amount: Money::new(499, EUR),
        init,
    };
    let auth = sc.issue_debit(&draw, TODAY, false).unwrap();
    let resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
    sc.complete(auth.command.security_card_txn, &resp).unwrap();
    (card, sc)
}

fn ok(card: &mut PurseCard, apdu: &[u8]) -> Vec<u8> {
    let r = card.process(apdu).response;
    let (d, sw) = split_sw(&r).unwrap();
    assert!(sw.is_ok(), "{sw}");
    d.to_vec()
}

fn balance(card: &mut PurseCard) -> u64 {
    card.process(&commands::select());
    proto::purse::PurseInfo::decode(&ok(card, &commands::read_purse()))
        .unwrap()
        .balance
}

fn due(issued: Option<CreditCommand>) -> RefundDue {
    RefundDue {
        transaction_id: "sale-1".into(),
        merchant_id: "CABLE".into(),
        amount: Money::new(499, EUR),
        issued,
    }
}

/// Feeds every APDU the flow asks for to `card`; the first other action's batch.
fn drive(f: &mut Refund, card: &mut PurseCard, mut actions: Vec<Action>) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let apdu = match actions.last() {
            Some(Action::Apdu(a)) => Some(a.clone()),
            _ => None,
        };
        all.append(&mut actions);
        match apdu {
            Some(a) => {
                actions = f.handle(Input::Card(Ok(CardReply {
                    atr: CARD_ATR.to_vec(),
                    response: card.process(&a).response,
                })));
            }
            None => return all,
        }
    }
}

fn sent(actions: &[Action]) -> Option<&Message> {
    actions.iter().rev().find_map(|a| match a {
        Action::Send(m) => Some(m),
        _ => None,
    })
}

fn done(actions: &[Action]) -> Option<&Outcome> {
    actions.iter().find_map(|a| match a {
        Action::Done(o) => Some(o),
        _ => None,
    })
}

fn receipt(released: bool, balance: Option<u64>) -> Input {
    Input::Answer(Message::Receipt(Receipt {
        transaction_id: "sale-1".into(),
        released,
        text: String::new(),
        entitlement: None,
        new_balance: balance,
    }))
}

/// The security card's command for the flow's refund request.
fn command_for(sc: &mut SecurityCard, req: &Message) -> (CreditCommand, Input) {
    let Message::RefundRequest(r) = req else {
        panic!("not a refund request: {req:?}")
    };
    let credit = DrawData {
        merchant_id: "CABLE".into(),
        transaction_id: r.transaction_id.clone(),
        amount: Money::new(499, EUR),
        init: r.init.clone(),
    };
    let cmd = sc.issue_credit(&credit, TODAY).unwrap();
    let answer = Input::Answer(Message::RefundCommand(RefundCommandMsg {
        transaction_id: r.transaction_id.clone(),
        command: cmd.clone(),
    }));
    (cmd, answer)
}

/// An earlier box's INITIALIZE FOR CREDIT and the credit command it got for it.
fn issued_earlier(card: &mut PurseCard, sc: &mut SecurityCard) -> CreditCommand {
    card.process(&commands::select());
    let init = PurchaseInit::decode(&ok(card, &commands::init_credit(TODAY))).unwrap();
    let credit = DrawData {
        merchant_id: "CABLE".into(),
        transaction_id: "sale-1".into(),
        amount: Money::new(499, EUR),
        init,
    };
    sc.issue_credit(&credit, TODAY).unwrap()
}

#[test]
fn nothing_due_ends_without_touching_the_card() {
    let (mut f, first) = Refund::start(42, TODAY);
    assert_eq!(
        first,
        vec![Action::Send(Message::RefundsDueRequest { card_id: 42 })]
    );
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![])));
    assert_eq!(a, vec![Action::Done(Outcome::Done { credited: vec![] })]);
}

#[test]
fn a_refund_due_is_credited_once_and_shown() {
    let (mut card, mut sc) = sold();
    let (mut f, _) = Refund::start(42, TODAY);
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(None)])));
    let a = drive(&mut f, &mut card, a);
    let (cmd, answer) = command_for(&mut sc, sent(&a).unwrap());
    assert!(f.card_sequence_open(), "INITIALIZE FOR CREDIT to CREDIT");
    let a = f.handle(answer);
    let a = drive(&mut f, &mut card, a);
    let Some(Message::RefundResponse(r)) = sent(&a) else {
        panic!("{a:?}")
    };
    sc.complete_credit(cmd.0.security_card_txn, &r.response)
        .unwrap();
    assert_eq!(balance(&mut card), 1_000);
    let a = f.handle(receipt(true, Some(1_000)));
    assert!(a.iter().any(|x| matches!(x,
        Action::Show(Show::Receipt(r)) if r.amount == Money::new(499, EUR)
            && r.balance_after == Money::new(1_000, EUR)
            && r.what == Receipted::Refund { merchant: "CABLE".into() })));
    assert_eq!(
        done(&a),
        Some(&Outcome::Done {
            credited: vec!["sale-1".into()]
        })
    );
}

#[test]
fn a_credit_command_the_card_never_ran_is_proved_then_run_fresh() {
    let (mut card, mut sc) = sold();
    // An earlier box got a command and went away before CREDIT.
    let lost = issued_earlier(&mut card, &mut sc);
    let (mut f, _) = Refund::start(42, TODAY);
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(Some(
        lost.clone(),
    ))])));
    let a = drive(&mut f, &mut card, a);
    let Some(Message::RefundProof(p)) = sent(&a) else {
        panic!("the log has no answer: a proof, {a:?}")
    };
    assert!(
        !sc.resolve_credit(lost.0.security_card_txn, &p.proof)
            .unwrap()
    );
    let a = f.handle(receipt(false, None));
    let a = drive(&mut f, &mut card, a);
    let (cmd, answer) = command_for(&mut sc, sent(&a).unwrap());
    let a = f.handle(answer);
    let a = drive(&mut f, &mut card, a);
    let Some(Message::RefundResponse(r)) = sent(&a) else {
        panic!("{a:?}")
    };
    sc.complete_credit(cmd.0.security_card_txn, &r.response)
        .unwrap();
    assert_eq!(balance(&mut card), 1_000, "credited once");
    assert!(done(&f.handle(receipt(true, Some(1_000)))).is_some());
}

#[test]
fn a_credit_the_card_ran_completes_from_its_log_without_a_proof() {
    let (mut card, mut sc) = sold();
    // An earlier box ran CREDIT and lost the answer.
    let cmd = issued_earlier(&mut card, &mut sc);
    ok(&mut card, &commands::credit(&cmd));
    let (mut f, _) = Refund::start(42, TODAY);
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(Some(
        cmd.clone(),
    ))])));
    let a = drive(&mut f, &mut card, a);
    let Some(Message::RefundResponse(r)) = sent(&a) else {
        panic!("the log's answer, {a:?}")
    };
    sc.complete_credit(cmd.0.security_card_txn, &r.response)
        .unwrap();
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Apdu(c) if *c == commands::credit(&cmd))),
        "no second CREDIT"
    );
    assert_eq!(balance(&mut card), 1_000);
}

#[test]
fn a_command_for_another_amount_or_card_is_not_run() {
    let (mut card, mut sc) = sold();
    let (mut f, _) = Refund::start(42, TODAY);
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(None)])));
    let a = drive(&mut f, &mut card, a);
    let (mut cmd, _) = command_for(&mut sc, sent(&a).unwrap());
    cmd.0.amount = 999;
    let a = f.handle(Input::Answer(Message::RefundCommand(RefundCommandMsg {
        transaction_id: "sale-1".into(),
        command: cmd,
    })));
    assert!(!a.iter().any(|x| matches!(x, Action::Apdu(_))), "{a:?}");
    assert!(matches!(done(&a), Some(Outcome::Stopped { .. })));
    assert_eq!(balance(&mut card), 501);
}

#[test]
fn a_refusal_a_lost_answer_or_a_pulled_card_stops_and_leaves_it_due() {
    let (mut card, _) = sold();
    for input in [
        Input::Answer(Message::Error(ErrorMsg {
            code: ErrorCode::InDoubt,
            reason: "out".into(),
            transaction_id: Some("sale-1".into()),
        })),
        Input::NetworkFailed(NetworkFailure::Timeout(std::time::Duration::from_secs(5))),
        Input::CardRemoved,
    ] {
        let (mut f, _) = Refund::start(42, TODAY);
        let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(None)])));
        drive(&mut f, &mut card, a);
        let a = f.handle(input);
        assert!(
            matches!(done(&a), Some(Outcome::Stopped { transaction_id: Some(t), .. }) if t == "sale-1"),
            "{a:?}"
        );
        assert!(f.handle(Input::CardRemoved).is_empty(), "over");
    }
    assert_eq!(balance(&mut card), 501);
}

/// The outside attack's F2: the card ran CREDIT, the answer was lost, and the card's log
/// rolled over before the box came back: the card's INITIALIZE names the credit session,
/// the head end says credited, and the TV shows the receipt.
#[test]
fn a_credit_whose_log_record_is_gone_is_credited_on_the_cards_word() {
    let (mut card, mut sc) = sold();
    let cmd = issued_earlier(&mut card, &mut sc);
    ok(&mut card, &commands::credit(&cmd));
    // 33 purchases: the card's log (32 records) no longer holds the credit.
    for n in 0..33 {
        card.process(&commands::select());
        let init = PurchaseInit::decode(&ok(&mut card, &commands::init_purchase(TODAY))).unwrap();
        let draw = DrawData {
            merchant_id: "CABLE".into(),
            transaction_id: format!("small-{n}"),
            amount: Money::new(1, EUR),
            init,
        };
        let auth = sc.issue_debit(&draw, TODAY, false).unwrap();
        let resp = DebitResponse::decode(&ok(&mut card, &commands::debit(&auth.command))).unwrap();
        sc.complete(auth.command.security_card_txn, &resp).unwrap();
    }
    assert!(!card.state.log.iter().any(|r| r.kind == LogKind::Credit));
    let (mut f, _) = Refund::start(42, TODAY);
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(Some(
        cmd.clone(),
    ))])));
    let a = drive(&mut f, &mut card, a);
    let Some(Message::RefundProof(p)) = sent(&a) else {
        panic!("no log record: the card's INITIALIZE goes, {a:?}")
    };
    assert!(
        sc.resolve_credit(cmd.0.security_card_txn, &p.proof)
            .unwrap()
    );
    let a = f.handle(receipt(true, Some(1_000 - 33)));
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Show(Show::Receipt(_))))
    );
    assert_eq!(
        done(&a),
        Some(&Outcome::Done {
            credited: vec!["sale-1".into()]
        })
    );
    assert_eq!(balance(&mut card), 1_000 - 33, "credited once");
}

/// The outside attack's F6: a card without room for the refund is not asked to take it
/// (no credit command is issued), and the TV says why.
#[test]
fn a_card_without_room_is_not_asked_and_the_tv_says_why() {
    let (mut card, _) = sold();
    card.state.max_balance = 600;
    let (mut f, _) = Refund::start(42, TODAY);
    let a = f.handle(Input::Answer(Message::RefundsDue(vec![due(None)])));
    let a = drive(&mut f, &mut card, a);
    assert!(sent(&a).is_none(), "no refund request: {a:?}");
    assert!(a.iter().any(|x| matches!(x,
        Action::Show(Show::Refused(Refusal::RefundNotNow { why })) if why.contains("no room"))));
    assert!(matches!(done(&a), Some(Outcome::Stopped { .. })));
}
