//! The recovery round against a scripted card and journal: which commands, writes and
//! messages come out, and in which order.

use std::collections::VecDeque;

use super::*;
use proto::card::{INS_INITIALIZE, INS_READ_LOG, INS_READ_PURSE, INS_SELECT, P1_INIT_PURCHASE};
use proto::messages::{Embodiment, ErrorCode, LoadConfirmation, LoadOffer, LoadSource, Receipt};
use proto::money::{Currency, Money};
use proto::purse::{DebitResponse, Expiry, LOAD_OK, LoadCommand, LogKind};

const CARD: u64 = 9;
const HSM: u64 = 0x4853_4D01;
const TODAY: Date = Date {
    year: 2026,
    month: 11,
    day: 21,
};
const EXPIRY: Expiry = Expiry {
    year: 2030,
    month: 12,
};

/// A card that answers from its fields and remembers the instruction bytes it got.
struct FakeCard {
    info: PurseInfo,
    log: Vec<LogRecord>,
    /// The answer to INITIALIZE FOR PURCHASE (the cancel's proof).
    proof: PurchaseInit,
    /// The answer to INITIALIZE FOR LOAD (the zero-value S1).
    zero: LoadInit,
    /// INITIALIZE is refused (6985).
    refuse_init: bool,
    got: Vec<u8>,
    /// The INITIALIZE commands, whole.
    inits: Vec<Vec<u8>>,
}

impl FakeCard {
    fn new(card_id: u64, log: Vec<LogRecord>) -> Self {
        Self {
            info: PurseInfo {
                card_id,
                provider_id: 1,
                balance: 601,
                max_balance: 100_000,
                currency: Currency::EUR,
                expiry: EXPIRY,
                key_version: 1,
                atc: 5,
                load_count: 1,
                algorithm: 1,
                auth_mode: 0,
                status: 0,
                points: 0,
                bad_key_count: 0,
                bad_key_limit: 10,
                privacy: false,
                passbook_through: 0,
            },
            log,
            proof: PurchaseInit {
                provider_id: 1,
                card_id,
                algorithm: 1,
                expiry: EXPIRY,
                balance: 601,
                currency: Currency::EUR,
                auth_mode: 0,
                atc: 5,
                init_count: 12,
                key_version: 1,
                credits: Default::default(),
                privacy: false,
                card_random: [3; 8],
                card_mac: [4; 8],
            },
            zero: LoadInit {
                card_id,
                expiry: EXPIRY,
                balance: 601,
                max_balance: 100_000,
                currency: Currency::EUR,
                atc: 8,
                load_count: 1,
                init_count: 4,
                key_version: 1,
                amount: 0,
                timestamp: 77,
                passbook: [0; 8],
                runs: [(0, 0); proto::purse::RECENT_RUNS],
                card_random: [5; 8],
                s1: [6; 8],
            },
            refuse_init: false,
            got: Vec::new(),
            inits: Vec::new(),
        }
    }

    fn reply(&mut self, apdu: &[u8]) -> CardReply {
        let ok = |mut d: Vec<u8>| {
            d.extend_from_slice(&[0x90, 0x00]);
            d
        };
        self.got.push(apdu[1]);
        let response = match apdu[1] {
            INS_SELECT => ok(Vec::new()),
            INS_READ_PURSE => ok(self.info.encode()),
            INS_READ_LOG => match self.log.get(usize::from(apdu[2]) - 1) {
                Some(r) => ok(r.encode()),
                None => vec![0x6A, 0x83],
            },
            INS_INITIALIZE => {
                self.inits.push(apdu.to_vec());
                if self.refuse_init {
                    vec![0x69, 0x85]
                } else if apdu[2] == P1_INIT_PURCHASE {
                    ok(self.proof.encode())
                } else {
                    ok(self.zero.encode())
                }
            }
            _ => vec![0x6D, 0x00],
        };
        CardReply {
            atr: vec![0x3B, 0x00],
            response,
        }
    }

    fn initialized(&self) -> bool {
        self.got.contains(&INS_INITIALIZE)
    }
}

/// The shell of the tests: executes the round's actions in order against the fake card and
/// a journal that may fail, and keeps every action it executed.
struct Shell {
    card: Option<FakeCard>,
    journal_fails: bool,
    done: Vec<Action>,
}

impl Shell {
    fn with_card(card: FakeCard) -> Self {
        Self {
            card: Some(card),
            journal_fails: false,
            done: Vec::new(),
        }
    }

    fn without_card() -> Self {
        Self {
            card: None,
            journal_fails: false,
            done: Vec::new(),
        }
    }

    fn card(&self) -> &FakeCard {
        self.card.as_ref().expect("a card")
    }

    fn run(&mut self, round: &mut Round, actions: Vec<Action>) {
        let mut q: VecDeque<Action> = actions.into();
        while let Some(a) = q.pop_front() {
            let input = match &a {
                Action::Apdu(apdu) => Some(Input::Card(match self.card.as_mut() {
                    Some(c) => Ok(c.reply(apdu)),
                    None => Err(CardFailure::NoCard),
                })),
                Action::Journal { .. } => Some(Input::Journaled(if self.journal_fails {
                    Err(JournalFailure("disk full".into()))
                } else {
                    Ok(())
                })),
                _ => None,
            };
            if input.is_some() {
                assert!(q.is_empty(), "{a:?} is not the last of its batch: {q:?}");
            }
            self.done.push(a);
            if let Some(i) = input {
                q.extend(round.handle(i));
            }
        }
    }

    fn start(
        &mut self,
        round: &mut Round,
        purchases: Vec<PendingPurchase>,
        loads: Vec<PendingLoad>,
    ) {
        let present = self.card.is_some();
        let a = round.start(Ok(purchases), Ok(loads), present, TODAY);
        self.run(round, a);
    }

    fn answer(&mut self, round: &mut Round, txid: &str, message: Message) {
        let card = self.card.as_ref().map(|c| c.info.card_id);
        let a = round.handle(Input::Answer {
            transaction_id: txid.into(),
            message,
            card,
        });
        self.run(round, a);
    }

    /// The position of the first executed action that `f` accepts.
    fn position(&self, f: impl Fn(&Action) -> bool) -> Option<usize> {
        self.done.iter().position(f)
    }

    fn sends(&self) -> Vec<&Message> {
        self.done
            .iter()
            .filter_map(|a| match a {
                Action::Send { message, .. } => Some(message),
                _ => None,
            })
            .collect()
    }

    fn journaled(&self) -> Vec<&Step> {
        self.done
            .iter()
            .filter_map(|a| match a {
                Action::Journal { step, .. } => Some(step),
                _ => None,
            })
            .collect()
    }

    fn ended(&self) -> Option<&RoundEnd> {
        self.done.iter().rev().find_map(|a| match a {
            Action::Ended(e) => Some(e),
            _ => None,
        })
    }
}

fn debit(atc: u32, security_card: u64, n: u32, amount: u64) -> LogRecord {
    LogRecord {
        kind: LogKind::Debit,
        atc,
        amount,
        currency: Currency::EUR,
        balance_after: 601,
        date: TODAY,
        counterparty: security_card,
        counterparty_txn: n,
        signature: [7; 8],
    }
}

fn offer() -> Offer {
    Offer {
        transaction_id: "t1".into(),
        merchant_id: "cable".into(),
        item_id: "ppv-1".into(),
        title: "A film".into(),
        amount: Money::new(399, Currency::EUR),
        payment_route: "payment".into(),
        status_route: "merchant".into(),
        embodiment: Embodiment::SecurityCard,
        tsk: None,
        etsk: None,
    }
}

fn purchase(state: &str, debit_sent: bool, security_card: Option<(u64, u32)>) -> PendingPurchase {
    let state = purchase::JournalState::from_text(state).expect("a purchase state");
    PendingPurchase {
        txn: InDoubt {
            transaction_id: "t1".into(),
            card_id: CARD,
            atc: 4,
            amount: Money::new(399, Currency::EUR),
            security_card,
            debit_sent,
            response: None,
            cancel_reason: None,
        },
        offer: offer(),
        state,
    }
}

fn response() -> DebitResponse {
    DebitResponse {
        card_id: CARD,
        atc: 4,
        amount: 399,
        currency: Currency::EUR,
        new_balance: 601,
        security_card_id: 5,
        security_card_txn: 2,
        card_signature: [9; 8],
    }
}

fn receipt(txid: &str, released: bool) -> Message {
    Message::Receipt(Receipt {
        transaction_id: txid.into(),
        released,
        text: "ok".into(),
        entitlement: None,
        new_balance: None,
    })
}

fn load_offer() -> LoadOffer {
    LoadOffer {
        transaction_id: "ld-1".into(),
        source: LoadSource::Bank {
            account: "ACC-0001".into(),
        },
        max_amount: Money::new(5_000, Currency::EUR),
        limited_by: "funds".into(),
        timestamp: 77,
        date: TODAY,
        pin_required: true,
    }
}

/// A load whose LOAD went to the card (state `load_sent`) and whose answer was not
/// journaled.
fn load_sent() -> PendingLoad {
    let init = LoadInit {
        atc: 7,
        amount: 2_000,
        init_count: 3,
        ..FakeCard::new(CARD, Vec::new()).zero
    };
    PendingLoad {
        transaction_id: "ld-1".into(),
        offer: load_offer(),
        command: Some(LoadCommand {
            hsm_id: HSM,
            card_id: CARD,
            atc: 7,
            amount: 2_000,
            currency: Currency::EUR,
            passbook_through: 0,
            s2: [1; 8],
        }),
        init,
        response: None,
        zero: None,
        state: load::JournalState::LoadSent,
    }
}

fn load_record() -> LogRecord {
    LogRecord {
        kind: LogKind::Load,
        atc: 7,
        amount: 2_000,
        currency: Currency::EUR,
        balance_after: 2_601,
        date: TODAY,
        counterparty: HSM,
        counterparty_txn: 1,
        signature: [8; 8],
    }
}

fn confirmation(loaded: bool) -> Message {
    Message::LoadConfirmation(LoadConfirmation {
        transaction_id: "ld-1".into(),
        loaded,
        new_balance: None,
        sealed: Vec::new(),
    })
}

#[test]
fn a_journaled_debit_response_is_resent_without_touching_the_card() {
    let mut p = purchase("debit_responded", true, Some((5, 2)));
    p.txn.response = Some(response());
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(FakeCard::new(CARD, Vec::new()));
    shell.start(&mut round, vec![p], Vec::new());
    assert!(shell.card().got.is_empty(), "{:?}", shell.card().got);
    assert!(shell.journaled().is_empty());
    match shell.sends().as_slice() {
        [Message::DebitResponse(m)] => {
            assert_eq!(m.transaction_id, "t1");
            assert_eq!(m.body.clone().open(None).unwrap(), response());
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(shell.done.last(), Some(&Action::ReleaseCard));
    assert_eq!(shell.ended(), None, "the answer is still out");
    assert!(round.awaits("t1"));

    shell.answer(&mut round, "t1", receipt("t1", true));
    assert!(matches!(
        shell.journaled().as_slice(),
        [Step::Purchase(purchase::Step::Completed { receipt })] if receipt.released
    ));
    assert_eq!(
        shell.ended(),
        Some(&RoundEnd {
            progressed: true,
            retry: false,
            waiting_for_card: Vec::new()
        })
    );
    assert_eq!(round.counts().resolved, 1);
    assert_eq!(round.outstanding(), 0);
}

/// A cancel journaled with the card's refusal (`6982`: the security card's signature) is
/// sent again with that reason after a restart, so the payment server still learns which
/// signature failed.
#[test]
fn a_journaled_cancel_is_sent_again_with_its_reason() {
    let refused = CancelReason::DebitRefused {
        sw: proto::apdu::StatusWord::BAD_SIGNATURE,
    };
    let card = FakeCard::new(CARD, Vec::new());
    let proof = card.proof.clone();
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    let mut pending = purchase("cancel_pending", true, Some((5, 2)));
    pending.txn.cancel_reason = Some(refused);
    shell.start(&mut round, vec![pending], Vec::new());
    match shell.sends().as_slice() {
        [Message::Cancel(c)] => {
            assert_eq!(c.reason, refused);
            assert_eq!(c.proof.as_ref(), Some(&proof));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_purchase_whose_debit_was_never_sent_is_cancelled_with_a_fresh_initialize_whatever_the_log_holds()
 {
    // The log holds a debit matching this purchase in every field: it cannot be this
    // purchase's, DEBIT never left the box.
    for state in ["debit_command", "cancel_pending"] {
        let card = FakeCard::new(CARD, vec![debit(4, 5, 2, 399)]);
        let proof = card.proof.clone();
        let mut round = Round::new(1);
        let mut shell = Shell::with_card(card);
        shell.start(
            &mut round,
            vec![purchase(state, false, Some((5, 2)))],
            Vec::new(),
        );
        assert_eq!(
            shell.card().got,
            [
                INS_SELECT,
                INS_READ_PURSE,
                INS_READ_LOG,
                INS_READ_LOG,
                INS_SELECT,
                INS_INITIALIZE
            ],
            "{state}"
        );
        assert_eq!(
            shell.card().inits,
            [commands::init_purchase_proof(TODAY)],
            "a fresh INITIALIZE FOR PURCHASE of today, as a proof (no session)"
        );
        match shell.sends().as_slice() {
            [Message::Cancel(c)] => {
                assert_eq!(c.reason, CancelReason::NotDebited);
                assert_eq!(c.proof.as_ref(), Some(&proof));
            }
            other => panic!("{state}: {other:?}"),
        }
        let cancel_journaled = shell.position(|a| {
            matches!(
                a,
                Action::Journal {
                    step: Step::Purchase(purchase::Step::CancelPending {
                        reason: CancelReason::NotDebited
                    }),
                    ..
                }
            )
        });
        let sent = shell.position(|a| matches!(a, Action::Send { .. }));
        if state == "cancel_pending" {
            assert_eq!(cancel_journaled, None, "already journaled");
        } else {
            assert!(
                cancel_journaled.unwrap() < sent.unwrap(),
                "journal before act"
            );
        }

        // The head end cannot verify the proof: DEBIT never went out, so it ends.
        shell.answer(
            &mut round,
            "t1",
            Message::error(ErrorCode::ProofRejected, "counter moved", Some("t1")),
        );
        match shell.journaled().last() {
            Some(Step::Purchase(purchase::Step::Ended { why })) => {
                assert!(why.contains("DEBIT never went to the card"), "{why}");
                assert!(why.ends_with("(recovery)"), "{why}");
            }
            other => panic!("{state}: {other:?}"),
        }
        assert!(shell.ended().unwrap().progressed);
    }
}

#[test]
fn a_card_log_match_rebuilds_the_response_and_journals_it_before_sending() {
    let card = FakeCard::new(CARD, vec![debit(3, 5, 1, 100), debit(4, 5, 2, 399)]);
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(
        &mut round,
        vec![purchase("debit_sent", true, Some((5, 2)))],
        Vec::new(),
    );
    assert!(!shell.card().initialized(), "no proof: the card paid");
    let journaled = shell
        .position(|a| {
            matches!(
                a,
                Action::Journal {
                    step: Step::Purchase(purchase::Step::DebitResponded { response }),
                    transaction_id,
                } if transaction_id == "t1" && response.card_signature == [7; 8] && response.security_card_txn == 2
            )
        })
        .expect("the rebuilt response is journaled");
    let sent = shell
        .position(|a| {
            matches!(
                a,
                Action::Send {
                    message: Message::DebitResponse(_),
                    ..
                }
            )
        })
        .expect("and sent");
    assert!(journaled < sent, "journal before act");

    // The same, but the journal write fails: nothing is sent, a later round retries.
    let card = FakeCard::new(CARD, vec![debit(4, 5, 2, 399)]);
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.journal_fails = true;
    shell.start(
        &mut round,
        vec![purchase("debit_sent", true, Some((5, 2)))],
        Vec::new(),
    );
    assert!(shell.sends().is_empty());
    assert_eq!(
        shell.ended(),
        Some(&RoundEnd {
            progressed: false,
            retry: true,
            waiting_for_card: Vec::new()
        })
    );
}

#[test]
fn a_refused_proof_with_debit_sent_and_no_log_record_is_unresolvable() {
    // Another purchase's debit with the same counter; this one's security-card transaction
    // (3) is not in the log, which reaches back past counter 4.
    let card = FakeCard::new(CARD, vec![debit(4, 5, 2, 499)]);
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(
        &mut round,
        vec![purchase("debit_sent", true, Some((5, 3)))],
        Vec::new(),
    );
    assert!(matches!(shell.sends().as_slice(), [Message::Cancel(_)]));
    shell.answer(
        &mut round,
        "t1",
        Message::error(ErrorCode::ProofRejected, "no", Some("t1")),
    );
    match shell.journaled().last() {
        Some(Step::Purchase(purchase::Step::Unresolvable { why })) => {
            assert!(why.contains("reaches back to counter 4"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(round.counts().unresolvable, 1);
    assert_eq!(round.counts().resolved, 0, "never recorded as ended");
    assert!(shell.ended().unwrap().progressed);
}

#[test]
fn already_completed_resends_the_debit_response_from_the_log_journaled_first_or_is_unresolvable() {
    // DEBIT never sent (a cancel, whatever the log holds), but the head end holds the debit:
    // the log's matching record gives the response, journaled before it is sent.
    let card = FakeCard::new(CARD, vec![debit(4, 5, 2, 399)]);
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(
        &mut round,
        vec![purchase("debit_command", false, Some((5, 2)))],
        Vec::new(),
    );
    assert!(matches!(shell.sends().as_slice(), [Message::Cancel(_)]));
    let before = shell.done.len();
    shell.answer(
        &mut round,
        "t1",
        Message::error(ErrorCode::AlreadyCompleted, "paid", Some("t1")),
    );
    let after = &shell.done[before..];
    assert!(
        matches!(
            after,
            [
                Action::Journal {
                    step: Step::Purchase(purchase::Step::DebitResponded { response }),
                    ..
                },
                Action::Send {
                    message: Message::DebitResponse(_),
                    ..
                }
            ] if response.card_signature == [7; 8]
        ),
        "{after:?}"
    );
    assert!(round.awaits("t1"));

    // DEBIT sent, no record in the log: nothing on this box gives the response.
    let card = FakeCard::new(CARD, Vec::new());
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(
        &mut round,
        vec![purchase("debit_sent", true, Some((5, 2)))],
        Vec::new(),
    );
    shell.answer(
        &mut round,
        "t1",
        Message::error(ErrorCode::AlreadyCompleted, "paid", Some("t1")),
    );
    assert!(matches!(
        shell.journaled().last(),
        Some(Step::Purchase(purchase::Step::Unresolvable { .. }))
    ));
    assert_eq!(shell.sends().len(), 1);
    assert_eq!(round.counts().unresolvable, 1);
}

#[test]
fn a_card_that_refuses_the_proof_leaves_the_purchase_for_a_retry() {
    let mut card = FakeCard::new(CARD, Vec::new());
    card.refuse_init = true;
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(
        &mut round,
        vec![purchase("draw_sent", false, None)],
        Vec::new(),
    );
    assert!(shell.sends().is_empty());
    assert!(
        shell.journaled().is_empty(),
        "no cancel_pending without a proof"
    );
    assert_eq!(shell.ended().map(|e| e.retry), Some(true));
    assert_eq!(round.counts().retries, 1);
}

#[test]
fn without_its_card_a_transaction_waits_and_no_timer_is_asked_for() {
    let mut round = Round::new(1);
    let mut shell = Shell::without_card();
    shell.start(
        &mut round,
        vec![purchase("debit_sent", true, Some((5, 2)))],
        vec![load_sent()],
    );
    assert!(shell.sends().is_empty());
    assert!(!shell.done.iter().any(|a| matches!(a, Action::Apdu(_))));
    assert_eq!(
        shell.ended(),
        Some(&RoundEnd {
            progressed: false,
            retry: false,
            waiting_for_card: vec!["ld-1".into(), "t1".into()]
        })
    );
    // Another card in the reader: the same.
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(FakeCard::new(CARD + 1, Vec::new()));
    shell.start(
        &mut round,
        vec![purchase("debit_sent", true, Some((5, 2)))],
        Vec::new(),
    );
    assert!(!shell.card().initialized());
    assert_eq!(shell.ended().unwrap().waiting_for_card, ["t1"]);
}

#[test]
fn a_load_sent_without_response_is_resent_from_the_log_journaled_first() {
    let card = FakeCard::new(CARD, vec![debit(3, 5, 1, 100), load_record()]);
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(&mut round, Vec::new(), vec![load_sent()]);
    assert!(!shell.card().initialized());
    let journaled = shell
        .position(|a| {
            matches!(
                a,
                Action::Journal {
                    step: Step::Load(load::Step::Responded { response }),
                    ..
                } if response.s3 == [8; 8] && response.result == LOAD_OK && response.new_balance == 2_601
            )
        })
        .expect("the S3 from the log is journaled");
    let sent = shell
        .position(|a| {
            matches!(
                a,
                Action::Send {
                    message: Message::LoadResponse(LoadResponseMsg {
                        response: Some(_),
                        zero_value: None,
                        ..
                    }),
                    ..
                }
            )
        })
        .expect("and sent");
    assert!(journaled < sent);
    shell.answer(&mut round, "ld-1", confirmation(true));
    assert!(matches!(
        shell.journaled().last(),
        Some(Step::Load(load::Step::Completed { confirmation })) if confirmation.loaded
    ));
    assert!(shell.ended().unwrap().progressed);
    assert_eq!(round.counts().resolved, 1);
}

#[test]
fn a_load_sent_not_in_the_log_is_proved_with_a_zero_value_initialize() {
    let card = FakeCard::new(CARD, Vec::new());
    let zero = card.zero.clone();
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(&mut round, Vec::new(), vec![load_sent()]);
    assert_eq!(
        shell.card().inits,
        [load::zero_value_apdu(&load_offer())],
        "one zero-value INITIALIZE FOR LOAD"
    );
    let journaled = shell
        .position(|a| {
            matches!(
                a,
                Action::Journal {
                    step: Step::Load(load::Step::ZeroValue { zero: z }),
                    ..
                } if *z == zero
            )
        })
        .expect("the zero-value S1 is journaled");
    let released = shell
        .position(|a| *a == Action::ReleaseCard)
        .expect("the card is released after the proof");
    let sent = shell
        .position(|a| {
            matches!(
                a,
                Action::Send {
                    message: Message::LoadResponse(LoadResponseMsg {
                        response: None,
                        zero_value: Some(_),
                        ..
                    }),
                    ..
                }
            )
        })
        .expect("and sent");
    assert!(released < journaled && journaled < sent);
    shell.answer(&mut round, "ld-1", confirmation(false));
    assert!(shell.ended().unwrap().progressed);
}

#[test]
fn a_logged_s3_the_head_end_refuses_is_proved_with_zero_on_the_free_card_only() {
    for card_free in [true, false] {
        let card = FakeCard::new(CARD, vec![load_record()]);
        let mut round = Round::new(1);
        let mut shell = Shell::with_card(card);
        shell.start(&mut round, Vec::new(), vec![load_sent()]);
        assert!(!shell.card().initialized());
        let a = round.handle(Input::Answer {
            transaction_id: "ld-1".into(),
            message: Message::error(ErrorCode::BadSignature, "S3", Some("ld-1")),
            card: card_free.then_some(CARD),
        });
        shell.run(&mut round, a);
        if card_free {
            assert!(shell.card().initialized());
            assert!(matches!(
                shell.sends().last(),
                Some(Message::LoadResponse(LoadResponseMsg {
                    zero_value: Some(_),
                    ..
                }))
            ));
            assert!(round.awaits("ld-1"));
        } else {
            assert!(!shell.card().initialized(), "a flow holds the card");
            assert_eq!(shell.ended().map(|e| e.retry), Some(true));
        }
    }
}

#[test]
fn loads_go_first_and_the_card_is_read_once() {
    let card = FakeCard::new(CARD, vec![load_record()]);
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(card);
    shell.start(
        &mut round,
        vec![purchase("draw_sent", false, None)],
        vec![load_sent()],
    );
    let kinds: Vec<&str> = shell.sends().iter().map(|m| m.kind()).collect();
    assert_eq!(kinds, ["a load response", "a cancel"]);
    assert_eq!(
        shell
            .card()
            .got
            .iter()
            .filter(|i| **i == INS_READ_PURSE)
            .count(),
        1
    );
}

#[test]
fn no_answer_leaves_it_in_doubt_and_asks_for_a_retry() {
    let mut p = purchase("debit_responded", true, Some((5, 2)));
    p.txn.response = Some(response());
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(FakeCard::new(CARD, Vec::new()));
    shell.start(&mut round, vec![p], Vec::new());
    let a = round.handle(Input::NetworkFailed {
        transaction_id: "t1".into(),
        error: NetworkFailure::Timeout(std::time::Duration::from_secs(10)),
    });
    shell.run(&mut round, a);
    assert!(shell.journaled().is_empty());
    assert_eq!(
        shell.ended(),
        Some(&RoundEnd {
            progressed: false,
            retry: true,
            waiting_for_card: Vec::new()
        })
    );
    // An answer nobody waits for (a duplicate) does nothing.
    assert!(
        round
            .handle(Input::NetworkFailed {
                transaction_id: "t1".into(),
                error: NetworkFailure::Failed("again".into()),
            })
            .is_empty()
    );
}

#[test]
fn a_round_started_while_an_answer_is_out_leaves_that_transaction_to_it() {
    let mut p = purchase("debit_responded", true, Some((5, 2)));
    p.txn.response = Some(response());
    let mut round = Round::new(1);
    let mut shell = Shell::with_card(FakeCard::new(CARD, Vec::new()));
    shell.start(&mut round, vec![p.clone()], Vec::new());
    shell.start(&mut round, vec![p], Vec::new());
    assert_eq!(shell.sends().len(), 1, "not sent twice");
    assert_eq!(shell.ended(), None);
    shell.answer(&mut round, "t1", receipt("t1", true));
    assert!(shell.ended().unwrap().progressed);
}

#[test]
fn an_answer_that_comes_while_the_card_is_read_is_handled_after_the_read() {
    let mut paid = purchase("debit_responded", true, Some((5, 2)));
    paid.txn.response = Some(response());
    let mut round = Round::new(1);
    let mut card = FakeCard::new(CARD, Vec::new());
    // t1 goes out; then a second round reads the card for t2, and the answer to t1 comes
    // in the middle of the card read.
    let a = round.start(Ok(vec![paid]), Ok(Vec::new()), true, TODAY);
    assert!(matches!(
        a.as_slice(),
        [Action::Send { .. }, Action::ReleaseCard]
    ));
    let mut t2 = purchase("draw_sent", false, None);
    t2.txn.transaction_id = "t2".into();
    let a = round.start(Ok(vec![t2]), Ok(Vec::new()), true, TODAY);
    assert_eq!(a, [Action::Apdu(commands::select())]);
    let deferred = round.handle(Input::Answer {
        transaction_id: "t1".into(),
        message: receipt("t1", true),
        card: Some(CARD),
    });
    assert!(deferred.is_empty(), "{deferred:?}");
    let a = round.handle(Input::Card(Ok(card.reply(&commands::select()))));
    assert_eq!(a, [Action::Apdu(commands::read_purse())]);
    let a = round.handle(Input::Card(Ok(card.reply(&commands::read_purse()))));
    assert_eq!(a, [Action::Apdu(commands::read_log(1))]);
    // The read is complete (an empty log): the answer's journal write comes next, and t2's
    // proof after it.
    let a = round.handle(Input::Card(Ok(card.reply(&commands::read_log(1)))));
    assert!(
        matches!(
            a.as_slice(),
            [Action::Journal {
                step: Step::Purchase(purchase::Step::Completed { .. }),
                transaction_id,
            }] if transaction_id == "t1"
        ),
        "{a:?}"
    );
    let a = round.handle(Input::Journaled(Ok(())));
    assert_eq!(a, [Action::Apdu(commands::select())]);
    assert_eq!(round.counts().resolved, 1);
}
