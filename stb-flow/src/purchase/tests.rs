//! Every branch of the purchase flow, with a real purse card and a real security card in
//! memory (no reader, socket or clock): the card really debits and really refuses.

use super::*;
use crate::show::Problem;
use proto::card::{CardSpec, CardState, PurseCard};
use proto::crypto::DesKey;
use proto::messages::{DebitCommandBody, DebitCommandMsg, Embodiment, ErrorCode, ErrorMsg};
use proto::money::{Currency, Money};
use proto::purse::{Expiry, IssuerKeys};
use proto::security_card::{DrawData, SecurityCard};

const TODAY: Date = Date::new(2026, 11, 21);

fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    }
}

fn card_with(balance: u64, currency: Currency, expiry: Expiry) -> PurseCard {
    let spec = CardSpec {
        card_id: 42,
        provider_id: 1,
        currency,
        balance,
        max_balance: 100_000,
        expiry,
    };
    PurseCard::new(CardState::personalise(&spec, &issuer()), 7)
}

fn card() -> PurseCard {
    card_with(
        1_000,
        Currency::EUR,
        Expiry {
            year: 2030,
            month: 12,
        },
    )
}

fn offer(amount: u64, tsk: Option<DesKey>) -> Offer {
    Offer {
        transaction_id: "tx-1".into(),
        merchant_id: "cable".into(),
        item_id: "ppv-7".into(),
        title: "Big Match".into(),
        amount: Money::new(amount, Currency::EUR),
        payment_route: "payment".into(),
        status_route: "merchant".into(),
        embodiment: Embodiment::SecurityCard,
        tsk,
        etsk: None,
    }
}

fn reply(card: &mut PurseCard, apdu: &[u8]) -> Input {
    Input::Card(Ok(CardReply {
        atr: proto::card::CARD_ATR.to_vec(),
        response: card.process(apdu).response,
    }))
}

/// Feeds every APDU the flow asks for to `card` until it asks for something else.
fn drive(p: &mut Purchase, card: &mut PurseCard, mut actions: Vec<Action>) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let apdu = match actions.last() {
            Some(Action::Apdu(a)) => Some(a.clone()),
            _ => None,
        };
        all.append(&mut actions);
        match apdu {
            Some(a) => actions = p.handle(reply(card, &a)),
            None => return all,
        }
    }
}

fn feed(p: &mut Purchase, card: &mut PurseCard, input: Input) -> Vec<Action> {
    let a = p.handle(input);
    drive(p, card, a)
}

fn sent(actions: &[Action]) -> Option<&Message> {
    actions.iter().rev().find_map(|a| match a {
        Action::Send(m) => Some(m),
        _ => None,
    })
}

fn journal_steps(actions: &[Action]) -> Vec<&Step> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Journal { step, .. } => Some(step),
            _ => None,
        })
        .collect()
}

fn outcome(actions: &[Action]) -> Option<&Outcome> {
    actions.iter().find_map(|a| match a {
        Action::Done(o) => Some(o),
        _ => None,
    })
}

/// The kind of trouble the flow showed the viewer, if it refused.
fn ui_error(actions: &[Action]) -> Option<Problem> {
    actions.iter().find_map(|a| match a {
        Action::Show(Show::Refused(r)) => Some(r.problem()),
        _ => None,
    })
}

/// Runs the flow up to the offer popup.
fn to_viewer(card: &mut PurseCard, offer: Offer) -> (Purchase, Vec<Action>) {
    let (mut p, a) = Purchase::start("cable", "ppv-7", TODAY, 1);
    assert!(matches!(
        sent(&a),
        Some(Message::OfferRequest { merchant_id, item_id }) if merchant_id == "cable" && item_id == "ppv-7"
    ));
    let a = p.handle(Input::Answer(Message::Offer(offer)));
    let a = drive(&mut p, card, a);
    (p, a)
}

/// The security card's side of a draw request.
fn debit_command(
    security_card: &mut SecurityCard,
    draw: &Message,
    tsk: Option<&DesKey>,
) -> DebitCommand {
    let Message::DrawRequest(d) = draw else {
        panic!("{draw:?}")
    };
    let body = d.body.open(tsk).unwrap();
    security_card
        .issue_debit(
            &DrawData {
                merchant_id: d.merchant_id.clone(),
                transaction_id: d.transaction_id.clone(),
                amount: body.amount,
                init: body.init,
            },
            TODAY,
            false,
        )
        .unwrap()
        .command
}

fn command_msg(c: DebitCommand, tsk: Option<&DesKey>) -> Message {
    let mut rng = StdRng::seed_from_u64(9);
    Message::DebitCommand(DebitCommandMsg {
        transaction_id: "tx-1".into(),
        body: Protected::new(DebitCommandBody { command: c }, tsk, &mut rng),
    })
}

fn receipt(released: bool) -> Message {
    Message::Receipt(Receipt {
        transaction_id: "tx-1".into(),
        released,
        text: "enjoy".into(),
        entitlement: Some("ppv-7".into()),
        new_balance: Some(750),
    })
}

fn error(code: ErrorCode) -> Message {
    Message::Error(ErrorMsg {
        code,
        reason: "no".into(),
        transaction_id: Some("tx-1".into()),
    })
}

/// Up to the debit command, accepted; returns the flow, its draw request and the actions.
fn accepted(card: &mut PurseCard, tsk: Option<DesKey>) -> (Purchase, Message, Vec<Action>) {
    let (mut p, a) = to_viewer(card, offer(250, tsk));
    assert!(matches!(a.last(), Some(Action::Show(Show::Offer(_)))));
    assert!(p.awaiting_viewer());
    assert!(
        !p.card_sequence_open(),
        "the card is not held while the viewer decides"
    );
    let a = feed(&mut p, card, Input::Accept);
    let draw = sent(&a).unwrap().clone();
    assert!(
        p.card_sequence_open(),
        "INITIALIZE → DEBIT is one card sequence"
    );
    (p, draw, a)
}

fn cancel_of(actions: &[Action]) -> &CancelMsg {
    match sent(actions) {
        Some(Message::Cancel(c)) => c,
        other => panic!("expected a cancel, got {other:?}"),
    }
}

#[test]
fn happy_path_debits_the_card_and_journals_every_step_first() {
    for tsk in [None, Some(DesKey::new([0x5B; 16]))] {
        let mut c = card();
        let mut security_card = SecurityCard::new(3, issuer().purchase());
        let (mut p, draw, a) = accepted(&mut c, tsk.clone());
        assert!(matches!(
            journal_steps(&a)[..],
            [Step::OfferAccepted { .. }, Step::DrawSent]
        ));
        // Journal before the send.
        let send_at = a.iter().position(|x| matches!(x, Action::Send(_))).unwrap();
        let drawn_at = a
            .iter()
            .position(|x| {
                matches!(
                    x,
                    Action::Journal {
                        step: Step::DrawSent,
                        ..
                    }
                )
            })
            .unwrap();
        assert!(drawn_at < send_at);
        if tsk.is_some() {
            let Message::DrawRequest(d) = &draw else {
                panic!()
            };
            assert!(matches!(d.body, Protected::Sealed(_)));
        }
        let cmd = debit_command(&mut security_card, &draw, tsk.as_ref());
        let a = p.handle(Input::Answer(command_msg(cmd.clone(), tsk.as_ref())));
        assert!(matches!(
            journal_steps(&a)[..],
            [Step::DebitCommandReceived { .. }, Step::DebitSent]
        ));
        let a = drive(&mut p, &mut c, a);
        assert_eq!(c.state.balance, 750);
        let Some(Message::DebitResponse(resp)) = sent(&a) else {
            panic!("{a:?}")
        };
        let resp = resp.body.open(tsk.as_ref()).unwrap();
        assert!(matches!(
            journal_steps(&a)[..],
            [
                Step::DebitCommandReceived { .. },
                Step::DebitSent,
                Step::DebitResponded { .. }
            ]
        ));
        security_card
            .complete(cmd.security_card_txn, &resp)
            .unwrap();
        let a = p.handle(Input::Answer(receipt(true)));
        assert!(matches!(journal_steps(&a)[..], [Step::Completed { .. }]));
        assert!(
            a.iter().any(
                |x| matches!(x, Action::Show(Show::Receipt(r)) if r.balance_after.minor == 750)
            )
        );
        assert!(matches!(outcome(&a), Some(Outcome::Paid { .. })));
        assert!(p.is_done());
        assert!(p.handle(Input::Accept).is_empty());
    }
}

#[test]
fn offer_refused_or_unreachable_ends_at_once() {
    let (mut p, _) = Purchase::start("cable", "x", TODAY, 1);
    let a = p.handle(Input::Answer(error(ErrorCode::UnknownMerchant)));
    assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
    let (mut p, _) = Purchase::start("cable", "x", TODAY, 1);
    let a = p.handle(Input::NetworkFailed(NetworkFailure::Timeout(
        std::time::Duration::from_secs(10),
    )));
    assert_eq!(ui_error(&a), Some(Problem::HeadEndUnreachable));
    let (mut p, _) = Purchase::start("cable", "x", TODAY, 1);
    let a = p.handle(Input::Answer(receipt(true)));
    assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
    let (mut p, _) = Purchase::start("cable", "x", TODAY, 1);
    let a = p.handle(Input::Answer(Message::Offer(offer(0, None))));
    assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
}

/// A failed [0075] check: a clear error, the offer dropped without proof, nothing journaled.
fn refused(mut c: PurseCard, kind: Problem) {
    let (mut p, a) = to_viewer(&mut c, offer(250, None));
    assert_eq!(ui_error(&a), Some(kind), "{a:?}");
    assert!(!a.iter().any(|x| matches!(x, Action::Show(Show::Offer(_)))));
    assert!(journal_steps(&a).is_empty());
    let cancel = cancel_of(&a);
    assert_eq!(
        (cancel.reason, cancel.proof.is_none()),
        (CancelReason::NotDebited, true)
    );
    let a = p.handle(Input::Answer(receipt(false)));
    assert!(
        matches!(outcome(&a), Some(Outcome::Failed { refusal, .. }) if refusal.problem() == kind)
    );
    assert!(journal_steps(&a).is_empty());
}

#[test]
fn checks_before_the_viewer_currency_expiry_balance() {
    refused(
        card_with(
            1000,
            Currency::USD,
            Expiry {
                year: 2030,
                month: 1,
            },
        ),
        Problem::Other,
    );
    refused(
        card_with(
            100,
            Currency::EUR,
            Expiry {
                year: 2030,
                month: 1,
            },
        ),
        Problem::InsufficientValue,
    );
    // The card itself refuses INITIALIZE after its expiry.
    refused(
        card_with(
            1000,
            Currency::EUR,
            Expiry {
                year: 2026,
                month: 10,
            },
        ),
        Problem::CardExpired,
    );
    let mut blocked = card();
    blocked.state.status = proto::purse::STATUS_BLOCKED;
    refused(blocked, Problem::CardBlocked);
}

#[test]
fn expiry_is_checked_by_the_box_too() {
    // A card whose INITIALIZE does not check expiry (a faulty card): the box still refuses.
    let mut c = card_with(
        1000,
        Currency::EUR,
        Expiry {
            year: 2026,
            month: 10,
        },
    );
    let (mut p, _) = Purchase::start("cable", "ppv-7", TODAY, 1);
    let a = p.handle(Input::Answer(Message::Offer(offer(250, None))));
    let Some(Action::Apdu(sel)) = a.last() else {
        panic!()
    };
    let _ = p.handle(reply(&mut c, sel));
    let lying = c
        .process(&commands::init_purchase(Date::new(2026, 10, 1)))
        .response;
    let a = p.handle(Input::Card(Ok(CardReply {
        atr: vec![],
        response: lying,
    })));
    assert_eq!(ui_error(&a), Some(Problem::CardExpired));
}

#[test]
fn reader_failure_and_card_removal_before_the_draw() {
    let (mut p, _) = Purchase::start("cable", "ppv-7", TODAY, 1);
    let _ = p.handle(Input::Answer(Message::Offer(offer(250, None))));
    let a = p.handle(Input::Card(Err(CardFailure::NoCard)));
    assert_eq!(ui_error(&a), Some(Problem::NoCard));
    assert_eq!(cancel_of(&a).reason, CancelReason::NotDebited);
    let a = p.handle(Input::NetworkFailed(NetworkFailure::Failed("x".into())));
    assert!(matches!(
        outcome(&a),
        Some(Outcome::Failed {
            refusal: Refusal::CardUnreadable { .. },
            ..
        })
    ));

    let mut c = card();
    let (mut p, _) = to_viewer(&mut c, offer(250, None));
    assert!(p.holds_card());
    let a = p.handle(Input::CardRemoved);
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Show(Show::OfferWithdrawn { .. })))
    );
    assert_eq!(cancel_of(&a).reason, CancelReason::NotDebited);

    let (mut p, _) = Purchase::start("cable", "ppv-7", TODAY, 1);
    let _ = p.handle(Input::Answer(Message::Offer(offer(250, None))));
    let a = p.handle(Input::Card(Ok(CardReply {
        atr: vec![],
        response: vec![0x6A],
    })));
    assert_eq!(ui_error(&a), Some(Problem::Other));
}

#[test]
fn viewer_back_and_timeout_cancel_without_journal() {
    for (timeout, reason) in [(false, CancelReason::Viewer), (true, CancelReason::Timeout)] {
        let mut c = card();
        let (mut p, _) = to_viewer(&mut c, offer(250, None));
        let a = p.handle(Input::Decline { timeout });
        assert_eq!(cancel_of(&a).reason, reason);
        assert!(journal_steps(&a).is_empty());
        let a = p.handle(Input::Answer(receipt(false)));
        assert!(matches!(outcome(&a), Some(Outcome::Cancelled { .. })));
        assert!(journal_steps(&a).is_empty());
        assert_eq!(c.state.balance, 1000);
    }
}

#[test]
fn amount_mismatch_aborts_journals_cancels_with_proof_and_tells_the_viewer() {
    let mut c = card();
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, draw, _) = accepted(&mut c, None);
    let mut cmd = debit_command(&mut security_card, &draw, None);
    cmd.amount = 2_500;
    let a = p.handle(Input::Answer(command_msg(cmd, None)));
    assert!(matches!(
        journal_steps(&a)[..],
        [
            Step::DebitCommandReceived { .. },
            Step::CancelPending {
                reason: CancelReason::AmountMismatch
            }
        ]
    ));
    assert_eq!(ui_error(&a), Some(Problem::AmountMismatch));
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Apdu(d) if d.get(1) == Some(&proto::card::INS_DEBIT)))
    );
    let a = drive(&mut p, &mut c, a);
    let cancel = cancel_of(&a);
    assert_eq!(cancel.reason, CancelReason::AmountMismatch);
    let proof = cancel.proof.as_ref().expect("proof");
    assert_eq!(proof.atc, 1, "the card's counter did not move");
    assert_eq!(c.state.balance, 1000);
    let a = p.handle(Input::Answer(receipt(false)));
    assert!(matches!(journal_steps(&a)[..], [Step::Ended { .. }]));
    assert!(matches!(
        outcome(&a),
        Some(Outcome::Failed {
            refusal: Refusal::AmountMismatch { .. },
            ..
        })
    ));
}

#[test]
fn debit_command_for_another_card_or_unreadable_is_cancelled() {
    let mut c = card();
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, draw, _) = accepted(&mut c, None);
    let mut cmd = debit_command(&mut security_card, &draw, None);
    cmd.atc += 1;
    let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
    assert_eq!(cancel_of(&a).reason, CancelReason::NotDebited);

    // With the FIG. 8 layer on, a clear body is refused (it cannot be stripped).
    let tsk = DesKey::new([0x5B; 16]);
    let mut c = card();
    let (mut p, draw, _) = accepted(&mut c, Some(tsk.clone()));
    let cmd = debit_command(&mut security_card, &draw, Some(&tsk));
    let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
    assert_eq!(cancel_of(&a).reason, CancelReason::NotDebited);
    assert!(cancel_of(&a).proof.is_some());

    let mut c = card();
    let (mut p, _, _) = accepted(&mut c, None);
    let a = feed(&mut p, &mut c, Input::Answer(receipt(true)));
    assert_eq!(cancel_of(&a).reason, CancelReason::NotDebited);
    // The cancel's answer is lost: the journal keeps it pending for recovery.
    let a = p.handle(Input::NetworkFailed(NetworkFailure::Unreachable(
        "gone".into(),
    )));
    assert!(journal_steps(&a).is_empty());
    assert!(outcome(&a).is_some());
}

#[test]
fn payment_server_refusal_ends_the_transaction() {
    let mut c = card();
    let (mut p, _, _) = accepted(&mut c, None);
    let a = p.handle(Input::Answer(error(ErrorCode::InsufficientValue)));
    assert!(matches!(journal_steps(&a)[..], [Step::Ended { .. }]));
    assert_eq!(ui_error(&a), Some(Problem::InsufficientValue));
}

#[test]
fn network_loss_after_the_draw_is_in_doubt() {
    let mut c = card();
    let (mut p, _, _) = accepted(&mut c, None);
    assert!(
        p.handle(Input::CardRemoved).is_empty(),
        "ignored while waiting on the network"
    );
    let a = p.handle(Input::NetworkFailed(NetworkFailure::Failed("reset".into())));
    assert!(matches!(outcome(&a), Some(Outcome::InDoubt { .. })));
    assert!(journal_steps(&a).is_empty());
}

#[test]
fn card_refusing_debit_is_cancelled_with_proof() {
    let mut c = card();
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, draw, _) = accepted(&mut c, None);
    let mut cmd = debit_command(&mut security_card, &draw, None);
    cmd.security_card_signature[0] ^= 1;
    let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
    assert_eq!(c.state.balance, 1000);
    // The cancel names the card's status word: the security card's signature failed.
    let refused = CancelReason::DebitRefused {
        sw: proto::apdu::StatusWord::BAD_SIGNATURE,
    };
    assert_eq!(cancel_of(&a).reason, refused);
    assert!(cancel_of(&a).proof.is_some());
    // Journaled with it, so recovery sends the same reason after a restart.
    assert!(
        journal_steps(&a)
            .iter()
            .any(|s| **s == Step::CancelPending { reason: refused })
    );
}

/// Issue 11 item 3 in the flow: its own cancel closes the transaction only on an answer
/// that settles it; a refused proof ends it only when DEBIT never went to the card.
#[test]
fn the_flow_s_cancel_is_closed_only_by_an_answer_that_settles_it() {
    // (DEBIT sent and refused by the card, answer, journaled Ended?)
    for (debit_sent, answer, ended) in [
        (false, receipt(false), true),
        (true, receipt(false), true),
        (false, error(ErrorCode::ProofRejected), true),
        (true, error(ErrorCode::ProofRejected), false),
        (false, error(ErrorCode::AlreadyCompleted), false),
        (true, error(ErrorCode::AlreadyCompleted), false),
        (true, error(ErrorCode::Busy), false),
    ] {
        let mut c = card();
        let mut security_card = SecurityCard::new(3, issuer().purchase());
        let (mut p, draw, _) = accepted(&mut c, None);
        let mut cmd = debit_command(&mut security_card, &draw, None);
        if debit_sent {
            // A bad signature: the card refuses DEBIT after the box journaled DebitSent.
            cmd.security_card_signature[0] ^= 1;
        } else {
            cmd.amount += 1;
        }
        let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
        assert_eq!(
            journal_steps(&a)
                .iter()
                .any(|s| matches!(s, Step::DebitSent)),
            debit_sent
        );
        assert!(cancel_of(&a).proof.is_some());
        let a = p.handle(Input::Answer(answer.clone()));
        assert!(outcome(&a).is_some(), "the flow ends either way");
        assert_eq!(
            matches!(journal_steps(&a)[..], [Step::Ended { .. }]),
            ended,
            "DEBIT sent {debit_sent}, {answer:?}: {:?}",
            journal_steps(&a)
        );
        if !ended {
            assert!(
                journal_steps(&a).is_empty(),
                "left cancel_pending for recovery"
            );
        }
    }
}

#[test]
fn card_lost_during_debit_or_confirmation_lost_is_in_doubt() {
    let mut c = card();
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, draw, _) = accepted(&mut c, None);
    let cmd = debit_command(&mut security_card, &draw, None);
    let _ = p.handle(Input::Answer(command_msg(cmd, None)));
    let a = p.handle(Input::Card(Err(CardFailure::Removed(
        "card removed".into(),
    ))));
    assert!(matches!(outcome(&a), Some(Outcome::InDoubt { .. })));

    for last in [
        Input::NetworkFailed(NetworkFailure::Timeout(std::time::Duration::from_secs(10))),
        Input::Answer(error(ErrorCode::Internal)),
    ] {
        let mut c = card();
        let mut security_card = SecurityCard::new(3, issuer().purchase());
        let (mut p, draw, _) = accepted(&mut c, None);
        let cmd = debit_command(&mut security_card, &draw, None);
        feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
        let a = p.handle(last);
        assert!(matches!(outcome(&a), Some(Outcome::InDoubt { .. })));
        assert!(journal_steps(&a).is_empty(), "stays in doubt for recovery");
    }
}

#[test]
fn receipt_not_released_is_paid_but_says_so() {
    let mut c = card();
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, draw, _) = accepted(&mut c, None);
    let cmd = debit_command(&mut security_card, &draw, None);
    feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
    let a = p.handle(Input::Answer(receipt(false)));
    assert!(
        a.iter()
            .any(|x| matches!(x, Action::Show(Show::NotReleased { text }) if text == "enjoy")),
        "{a:?}"
    );
    assert!(matches!(journal_steps(&a)[..], [Step::Completed { .. }]));
}

/// Another program on the same reader resets the card, or selects its own application, while
/// the viewer decides: the OK selects the purse again and takes a fresh INITIALIZE, and the
/// purchase completes on it. Without that, DEBIT would meet a card with no session (`6985`).
#[test]
fn a_reset_or_a_foreign_select_while_the_viewer_decides_is_undone_by_selecting_again() {
    use proto::apdu::CardApplication;
    let foreign_select = [
        0x00, 0xA4, 0x04, 0x00, 0x07, 0xA0, 0, 0, 0, 0x03, 0x10, 0x10,
    ];
    for meddle in ["reset", "select"] {
        let mut c = card();
        let mut security_card = SecurityCard::new(3, issuer().purchase());
        let (mut p, a) = to_viewer(&mut c, offer(250, None));
        assert!(matches!(a.last(), Some(Action::Show(Show::Offer(_)))));
        match meddle {
            "reset" => c.reset(),
            _ => assert_eq!(c.process(&foreign_select).response, [0x6A, 0x82]),
        }
        let a = p.handle(Input::Accept);
        assert_eq!(
            a.last(),
            Some(&Action::Apdu(commands::select())),
            "{meddle}"
        );
        assert!(
            journal_steps(&a).is_empty(),
            "nothing journaled before the card answered"
        );
        let a = drive(&mut p, &mut c, a);
        let draw = sent(&a).unwrap().clone();
        let Message::DrawRequest(d) = &draw else {
            panic!("{draw:?}")
        };
        let init = &d.body.open(None).unwrap().init;
        assert!(matches!(
            journal_steps(&a)[..],
            [Step::OfferAccepted { init: j, .. }, Step::DrawSent] if j == init
        ));
        let cmd = debit_command(&mut security_card, &draw, None);
        let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
        assert!(
            matches!(sent(&a), Some(Message::DebitResponse(_))),
            "{meddle}: {a:?}"
        );
        assert!(!p.card_sequence_open());
        assert_eq!(c.state.balance, 750, "{meddle}");
        let a = p.handle(Input::Answer(receipt(true)));
        assert!(
            matches!(outcome(&a), Some(Outcome::Paid { .. })),
            "{meddle}"
        );
    }
}

/// Another card in the reader by the time the viewer said OK: refused before anything is
/// journaled, the offer dropped.
#[test]
fn another_card_after_the_ok_is_refused_before_the_draw() {
    let mut c = card();
    let (mut p, _) = to_viewer(&mut c, offer(250, None));
    let spec = CardSpec {
        card_id: 43,
        provider_id: 1,
        currency: Currency::EUR,
        balance: 1_000,
        max_balance: 100_000,
        expiry: Expiry {
            year: 2030,
            month: 12,
        },
    };
    let mut other = PurseCard::new(CardState::personalise(&spec, &issuer()), 8);
    let a = feed(&mut p, &mut other, Input::Accept);
    assert!(journal_steps(&a).is_empty());
    assert!(outcome(&a).is_none());
    assert_eq!(cancel_of(&a).reason, CancelReason::NotDebited);
    let a = p.handle(Input::Answer(receipt(false)));
    assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })), "{a:?}");
}

/// Every card failure the shell can report, as `stbd`'s card port and the pair make them.
fn card_failures() -> Vec<CardFailure> {
    let reader = || "R0".to_string();
    let waited = std::time::Duration::from_secs(5);
    vec![
        CardFailure::NoCard,
        CardFailure::Removed("reader R0: card was removed during the command — reinsert it".into()),
        CardFailure::NoAtr { reader: reader() },
        CardFailure::NoAnswer {
            reader: reader(),
            waited,
        },
        CardFailure::InUse {
            reader: reader(),
            waited,
        },
        CardFailure::Reset { reader: reader() },
        CardFailure::Reader("reader R0: parity error".into()),
    ]
}

/// Every network failure the gateway client can report.
fn network_failures() -> Vec<NetworkFailure> {
    vec![
        NetworkFailure::Unreachable("10.0.0.1:4433: no handshake within 10s".into()),
        NetworkFailure::Failed("stream reset by peer: 9".into()),
        NetworkFailure::Timeout(std::time::Duration::from_secs(10)),
        NetworkFailure::Malformed("unexpected end of input".into()),
    ]
}

/// A card failure before the draw ends the purchase with nothing moved (the offer dropped
/// without proof, nothing journaled); during DEBIT it leaves the purchase in doubt with no
/// debit response journaled (the card's log decides). The failure reaches the viewer as it
/// was reported.
#[test]
fn every_card_failure_refuses_before_the_draw_and_is_in_doubt_during_debit() {
    for f in card_failures() {
        let (mut p, _) = Purchase::start("cable", "ppv-7", TODAY, 1);
        let _ = p.handle(Input::Answer(Message::Offer(offer(250, None))));
        let a = p.handle(Input::Card(Err(f.clone())));
        assert_eq!(ui_error(&a), Some(Problem::NoCard), "{f:?}");
        assert!(journal_steps(&a).is_empty(), "{f:?}");
        assert_eq!(
            (cancel_of(&a).reason, cancel_of(&a).proof.is_none()),
            (CancelReason::NotDebited, true),
            "{f:?}"
        );
        let a = p.handle(Input::NetworkFailed(NetworkFailure::Timeout(
            std::time::Duration::from_secs(10),
        )));
        assert_eq!(
            outcome(&a),
            Some(&Outcome::Failed {
                transaction_id: Some("tx-1".into()),
                refusal: Refusal::CardUnreadable { error: f.clone() },
            }),
            "{f:?}"
        );

        let mut c = card();
        let mut security_card = SecurityCard::new(3, issuer().purchase());
        let (mut p, draw, _) = accepted(&mut c, None);
        let cmd = debit_command(&mut security_card, &draw, None);
        let a = p.handle(Input::Answer(command_msg(cmd, None)));
        assert!(matches!(a.last(), Some(Action::Apdu(_))), "DEBIT is out");
        let a = p.handle(Input::Card(Err(f.clone())));
        assert_eq!(
            outcome(&a),
            Some(&Outcome::InDoubt {
                transaction_id: "tx-1".into(),
                doubt: Doubt::CardLostDuringDebit { error: f.clone() },
            }),
            "{f:?}"
        );
        assert!(journal_steps(&a).is_empty(), "no debit response: {f:?}");
        assert!(sent(&a).is_none(), "nothing to confirm: {f:?}");
    }
}

/// A network failure before the offer ends the purchase at once (head end unreachable);
/// after the draw it leaves the purchase in doubt with no debit command; after DEBIT the
/// card has paid and its debit response is journaled before the confirmation is lost (so
/// recovery re-sends it without the card). The failure reaches the viewer as reported.
#[test]
fn every_network_failure_refuses_before_the_offer_and_is_in_doubt_after_the_draw_or_debit() {
    for f in network_failures() {
        let (mut p, _) = Purchase::start("cable", "ppv-7", TODAY, 1);
        let a = p.handle(Input::NetworkFailed(f.clone()));
        assert_eq!(ui_error(&a), Some(Problem::HeadEndUnreachable), "{f:?}");
        assert_eq!(
            outcome(&a),
            Some(&Outcome::Failed {
                transaction_id: None,
                refusal: Refusal::Unreachable { error: f.clone() },
            }),
            "{f:?}"
        );

        let mut c = card();
        let (mut p, _, _) = accepted(&mut c, None);
        let a = p.handle(Input::NetworkFailed(f.clone()));
        assert_eq!(
            outcome(&a),
            Some(&Outcome::InDoubt {
                transaction_id: "tx-1".into(),
                doubt: Doubt::NoDebitCommand { error: f.clone() },
            }),
            "{f:?}"
        );

        let mut c = card();
        let mut security_card = SecurityCard::new(3, issuer().purchase());
        let (mut p, draw, _) = accepted(&mut c, None);
        let cmd = debit_command(&mut security_card, &draw, None);
        let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
        assert!(
            journal_steps(&a)
                .iter()
                .any(|s| matches!(s, Step::DebitResponded { .. })),
            "the card's answer is journaled before it goes out"
        );
        assert_eq!(c.state.balance, 750, "the card paid");
        let a = p.handle(Input::NetworkFailed(f.clone()));
        assert_eq!(
            outcome(&a),
            Some(&Outcome::InDoubt {
                transaction_id: "tx-1".into(),
                doubt: Doubt::ConfirmationLost { error: f.clone() },
            }),
            "{f:?}"
        );
    }
}

/// A card with PIN 4711 and a threshold of 5.00 (seed 004).
fn pin_card() -> PurseCard {
    let c = card_with(
        10_000,
        Currency::EUR,
        Expiry {
            year: 2030,
            month: 12,
        },
    );
    PurseCard::new(c.state.with_pin("4711", 500).unwrap(), 7)
}

fn pin(p: &str) -> Input {
    Input::Pin(proto::secret::Secret::new(p.to_string()))
}

/// The card commands (INS) the actions sent, in order.
fn apdu_ins(actions: &[Action]) -> Vec<u8> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Apdu(x) => x.get(1).copied(),
            _ => None,
        })
        .collect()
}

#[test]
fn under_the_pin_threshold_ok_alone_draws() {
    let mut c = pin_card();
    let (mut p, a) = to_viewer(&mut c, offer(499, None));
    assert!(matches!(a.last(), Some(Action::Show(Show::Offer(_)))));
    let a = feed(&mut p, &mut c, Input::Accept);
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Show(Show::PinEntry { .. }))),
        "4.99: no PIN"
    );
    assert!(matches!(sent(&a), Some(Message::DrawRequest(_))), "{a:?}");
}

#[test]
fn above_the_pin_threshold_the_pin_is_asked_and_verified_before_the_initialize() {
    let mut c = pin_card();
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, _) = to_viewer(&mut c, offer(2_995, None));
    let a = feed(&mut p, &mut c, Input::Accept);
    assert_eq!(
        a,
        [Action::Show(Show::PinEntry {
            min_len: 4,
            max_len: 12,
            attempts_left: Some(3)
        })],
        "29.95: the PIN, nothing sent yet"
    );
    assert!(p.awaiting_pin() && !p.card_sequence_open());
    let a = feed(&mut p, &mut c, pin("4711"));
    // SELECT, VERIFY, INITIALIZE in one card sequence, then the draw.
    assert_eq!(
        apdu_ins(&a),
        [
            proto::card::INS_SELECT,
            proto::card::INS_VERIFY,
            proto::card::INS_INITIALIZE
        ]
    );
    let draw = sent(&a).unwrap().clone();
    assert!(matches!(draw, Message::DrawRequest(_)));
    let cmd = debit_command(&mut security_card, &draw, None);
    let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
    assert!(matches!(sent(&a), Some(Message::DebitResponse(_))), "{a:?}");
    assert_eq!(c.state.balance, 10_000 - 2_995, "the card debited");
}

#[test]
fn a_wrong_pin_stops_before_the_draw_and_a_blocked_one_at_the_ok() {
    let mut c = pin_card();
    for left in [2u8, 1] {
        let (mut p, _) = to_viewer(&mut c, offer(2_995, None));
        let _ = feed(&mut p, &mut c, Input::Accept);
        let a = feed(&mut p, &mut c, pin("0000"));
        assert!(
            a.iter()
                .any(|x| *x == Action::Show(Show::Refused(Refusal::WrongPin { tries_left: left }))),
            "{a:?}"
        );
        assert_eq!(ui_error(&a), Some(Problem::WrongPin));
        // Nothing reached the payment server: only the offer is dropped.
        assert!(journal_steps(&a).is_empty());
        assert!(
            matches!(sent(&a), Some(Message::Cancel(c)) if c.proof.is_none()),
            "{a:?}"
        );
    }
    // The third wrong PIN blocks it.
    let (mut p, _) = to_viewer(&mut c, offer(2_995, None));
    let _ = feed(&mut p, &mut c, Input::Accept);
    let a = feed(&mut p, &mut c, pin("0000"));
    assert_eq!(ui_error(&a), Some(Problem::PinBlocked));
    // Blocked: the OK is refused at once, no PIN asked, no card command.
    let (mut p, _) = to_viewer(&mut c, offer(2_995, None));
    let a = feed(&mut p, &mut c, Input::Accept);
    assert_eq!(ui_error(&a), Some(Problem::PinBlocked));
    assert!(apdu_ins(&a).is_empty());
    // Under the threshold it still buys.
    let (mut p, _) = to_viewer(&mut c, offer(450, None));
    let a = feed(&mut p, &mut c, Input::Accept);
    assert!(matches!(sent(&a), Some(Message::DrawRequest(_))), "{a:?}");
    assert_eq!(c.state.balance, 10_000);
}

#[test]
fn back_on_the_pin_entry_cancels_the_offer() {
    let mut c = pin_card();
    let (mut p, _) = to_viewer(&mut c, offer(2_995, None));
    let _ = feed(&mut p, &mut c, Input::Accept);
    let a = feed(&mut p, &mut c, Input::Decline { timeout: false });
    assert_eq!(cancel_of(&a).reason, CancelReason::Viewer);
    assert!(apdu_ins(&a).is_empty());
}

/// The DEBIT whose bad signature blocks the card (its last allowed one): the flow's cancel
/// still carries the card's proof (the proof INITIALIZE is answered by a blocked card), so
/// the payment server reverses and nothing stays in doubt.
#[test]
fn the_debit_that_blocks_the_card_is_still_cancelled_with_a_proof() {
    let mut c = card();
    c.state.bad_key_limit = 1;
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let (mut p, draw, _) = accepted(&mut c, None);
    let good = debit_command(&mut security_card, &draw, None);
    let mut cmd = good.clone();
    cmd.security_card_signature[0] ^= 1;
    let a = feed(&mut p, &mut c, Input::Answer(command_msg(cmd, None)));
    assert_ne!(c.state.status & proto::purse::STATUS_BLOCKED, 0, "blocked");
    let proof = cancel_of(&a)
        .proof
        .clone()
        .expect("a proof from the blocked card");
    security_card
        .verify_not_debited(good.security_card_txn, &proof)
        .expect("the security card accepts it");
}

/// 002 FIG. 16: an offer of 0 in the authentication currency is shown ("no charge", the
/// balance kept) and goes through like a purchase: the card's counter moves, its balance
/// does not. Any other zero, or value in that currency, is an unusable offer.
#[test]
fn an_authentication_offer_moves_the_counter_not_the_balance() {
    let mut c = card_with(
        1_000,
        Currency::JPY,
        Expiry {
            year: 2030,
            month: 12,
        },
    );
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let auth = Offer {
        amount: Money::authentication(),
        ..offer(0, None)
    };
    let (mut p, a) = to_viewer(&mut c, auth);
    let Some(Action::Show(Show::Offer(shown))) = a.last() else {
        panic!("{a:?}")
    };
    assert!(shown.price.is_authentication());
    assert_eq!(
        (shown.balance.minor, shown.balance_after.minor),
        (1_000, 1_000)
    );
    let a = feed(&mut p, &mut c, Input::Accept);
    let draw = sent(&a).unwrap().clone();
    let cmd = debit_command(&mut security_card, &draw, None);
    let a = p.handle(Input::Answer(command_msg(cmd.clone(), None)));
    let a = drive(&mut p, &mut c, a);
    let Some(Message::DebitResponse(resp)) = sent(&a) else {
        panic!("{a:?}")
    };
    security_card
        .complete(cmd.security_card_txn, &resp.body.open(None).unwrap())
        .unwrap();
    assert_eq!((c.state.balance, c.state.atc), (1_000, 1));
    let a = p.handle(Input::Answer(receipt(true)));
    assert!(matches!(outcome(&a), Some(Outcome::Paid { .. })));

    for amount in [
        Money::new(0, Currency::EUR),
        Money::new(5, Currency::AUTHENTICATION),
    ] {
        let (mut p, _) = Purchase::start("cable", "ppv-7", TODAY, 1);
        let a = p.handle(Input::Answer(Message::Offer(Offer {
            amount,
            ..offer(0, None)
        })));
        assert!(
            a.iter()
                .any(|x| matches!(x, Action::Show(Show::Refused(Refusal::UnusableOffer)))),
            "{amount:?}: {a:?}"
        );
    }
}

/// 002 [0164]: a price in points redeems from the card's points purse (INITIALIZE with the
/// points bit), the money untouched, and asks no PIN above the money threshold (the PIN
/// guards money).
#[test]
fn a_price_in_points_redeems_points_without_the_pin() {
    let mut c = pin_card();
    c.state.points = 30_000;
    let money_before = c.state.balance;
    let mut security_card = SecurityCard::new(3, issuer().purchase());
    let redeem = Offer {
        amount: Money::new(20_000, Currency::POINTS),
        ..offer(0, None)
    };
    let (mut p, a) = to_viewer(&mut c, redeem);
    let Some(Action::Show(Show::Offer(shown))) = a.last() else {
        panic!("{a:?}")
    };
    assert_eq!(
        (shown.balance.minor, shown.balance_after.minor),
        (30_000, 10_000)
    );
    // OK goes straight to the card (no PIN entry).
    let a = feed(&mut p, &mut c, Input::Accept);
    assert!(
        !a.iter()
            .any(|x| matches!(x, Action::Show(Show::PinEntry { .. }))),
        "{a:?}"
    );
    let draw = sent(&a).unwrap().clone();
    let cmd = debit_command(&mut security_card, &draw, None);
    let a = p.handle(Input::Answer(command_msg(cmd, None)));
    drive(&mut p, &mut c, a);
    assert_eq!((c.state.points, c.state.balance), (10_000, money_before));
}
