//! Every branch of the load flow and of [`decide`], with a real purse card and a real HSM
//! (`proto::hsm`) in memory: the card really runs INITIALIZE FOR LOAD and LOAD, the HSM
//! really checks S1 and S3 and runs the negative-result procedure. The head end's routing
//! is scripted by [`FakeLoadServer`] (no sockets).

use super::*;
use crate::show::Problem;
use proto::apdu::StatusWord;
use proto::card::{CardFault, CardSpec, CardState, PurseCard};
use proto::hsm::{Hsm, LoadVerdict};
use proto::messages::ErrorMsg;
use proto::money::Currency;
use proto::purse::{Date, Expiry, IssuerKeys, LOAD_NEGATIVE, LogRecord};

const TODAY: Date = Date::new(2026, 11, 21);
const TS: u64 = 1_790_000_000;
const PIN: &str = "4711";

fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    }
}

fn pin_key() -> DesKey {
    DesKey::new([0x5A; 16])
}

fn card_with(balance: u64, max: u64, currency: Currency) -> PurseCard {
    let spec = CardSpec {
        card_id: 42,
        provider_id: 1,
        currency,
        balance,
        max_balance: max,
        expiry: Expiry {
            year: 2030,
            month: 12,
        },
    };
    PurseCard::new(CardState::personalise(&spec, &issuer()), 7)
}

fn card() -> PurseCard {
    card_with(1_000, 10_000, Currency::EUR)
}

fn bank() -> LoadSource {
    LoadSource::Bank {
        account: "ACC-0001".into(),
    }
}

fn voucher() -> LoadSource {
    LoadSource::Voucher {
        code: "VOUCHER-0001".into(),
    }
}

/// FAKE head end for the flow tests: the gateway's and bank's answers are scripted, but the
/// load command, the S3 check and the negative-result verdict come from a real `Hsm`.
struct FakeLoadServer {
    hsm: Hsm,
    max: u64,
    pin_required: bool,
    /// Bank loads carry the issuer's UNBLOCK (`[load] unblock_with_bank_loads`).
    unblock: bool,
    requests: Vec<LoadRequest>,
    responses: Vec<LoadResponseMsg>,
}

impl FakeLoadServer {
    fn new(max: u64, pin_required: bool) -> Self {
        Self {
            hsm: Hsm::new(0x4853_4D01, issuer().load()),
            max,
            pin_required,
            unblock: false,
            requests: Vec::new(),
            responses: Vec::new(),
        }
    }

    fn offer(&self, source: LoadSource) -> LoadOffer {
        LoadOffer {
            transaction_id: "ld-1".into(),
            source,
            max_amount: Money::new(self.max, Currency::EUR),
            limited_by: "funds".into(),
            timestamp: TS,
            date: TODAY,
            pin_required: self.pin_required,
        }
    }

    fn answer(&mut self, m: &Message) -> Message {
        match m {
            Message::LoadOfferRequest(r) => Message::LoadOffer(self.offer(r.source.clone())),
            Message::LoadRequest(r) => {
                self.requests.push(r.clone());
                // As the load server: a bank load carries the card's passbook.
                let authorized = match r.source {
                    LoadSource::Bank { .. } => self.hsm.authorize_with_passbook(
                        &r.transaction_id,
                        &r.init,
                        r.amount,
                        TODAY,
                        &r.passbook,
                    ),
                    LoadSource::Unload { .. } => {
                        self.hsm
                            .authorize_unload(&r.transaction_id, &r.init, r.amount, TODAY)
                    }
                    _ => self
                        .hsm
                        .authorize(&r.transaction_id, &r.init, r.amount, TODAY),
                };
                match authorized {
                    Ok(command) => Message::LoadCommand(proto::messages::LoadCommandMsg {
                        transaction_id: r.transaction_id.clone(),
                        command,
                        key_update: None,
                        unblock: (self.unblock && matches!(r.source, LoadSource::Bank { .. }))
                            .then(|| self.hsm.unblock(&r.init))
                            .flatten(),
                        app_key: matches!(r.source, LoadSource::Bank { .. })
                            .then(|| self.hsm.app_key_push(&r.init))
                            .flatten(),
                    }),
                    Err(e) => Message::error(ErrorCode::BadSignature, e.to_string(), None),
                }
            }
            Message::LoadResponse(r) => {
                self.responses.push(r.clone());
                let unload = self
                    .requests
                    .iter()
                    .any(|q| q.transaction_id == r.transaction_id && q.source.is_unload());
                let mut loaded = None;
                let mut new_balance = None;
                if let Some(resp) = &r.response {
                    let confirmed = if unload {
                        self.hsm.confirm_unload(&r.transaction_id, resp)
                    } else {
                        self.hsm.confirm(&r.transaction_id, resp)
                    };
                    match confirmed {
                        Ok(LoadVerdict::Loaded) => {
                            loaded = Some(true);
                            new_balance = Some(resp.new_balance);
                        }
                        Ok(LoadVerdict::NegativeNeedsProof) => {}
                        Err(e) => {
                            return Message::error(ErrorCode::BadSignature, e.to_string(), None);
                        }
                    }
                }
                if loaded.is_none() {
                    let zero = r.zero_value.as_ref().expect("zero-value proof");
                    let v = if unload {
                        self.hsm.resolve_unload_negative(&r.transaction_id, zero)
                    } else {
                        self.hsm.resolve_negative(&r.transaction_id, zero)
                    }
                    .expect("a genuine zero-value S1");
                    loaded = Some(v.loaded());
                    if !v.loaded() {
                        new_balance = Some(zero.balance);
                    }
                }
                Message::LoadConfirmation(LoadConfirmation {
                    transaction_id: r.transaction_id.clone(),
                    loaded: loaded.unwrap(),
                    new_balance,
                    sealed: Vec::new(),
                })
            }
            other => panic!("the fake does not answer {other:?}"),
        }
    }
}

fn reply(card: &mut PurseCard, apdu: &[u8]) -> Input {
    Input::Card(Ok(CardReply {
        atr: proto::card::CARD_ATR.to_vec(),
        response: card.process(apdu).response,
    }))
}

/// Feeds every APDU the flow asks for to `card` until it asks for something else.
fn drive(l: &mut Load, card: &mut PurseCard, mut actions: Vec<Action>) -> Vec<Action> {
    let mut all = Vec::new();
    loop {
        let apdu = match actions.last() {
            Some(Action::Apdu(a)) => Some(a.clone()),
            _ => None,
        };
        all.append(&mut actions);
        match apdu {
            Some(a) => actions = l.handle(reply(card, &a)),
            None => return all,
        }
    }
}

fn feed(l: &mut Load, card: &mut PurseCard, input: Input) -> Vec<Action> {
    let a = l.handle(input);
    drive(l, card, a)
}

fn sent(actions: &[Action]) -> Option<&Message> {
    actions.iter().rev().find_map(|a| match a {
        Action::Send(m) => Some(m),
        _ => None,
    })
}

fn steps(actions: &[Action]) -> Vec<&Step> {
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

/// What a test expects of a refusal.
type Want = fn(&Refusal) -> bool;

/// Why the flow refused, as it showed the viewer.
fn refusal(actions: &[Action]) -> Option<&Refusal> {
    actions.iter().find_map(|a| match a {
        Action::Show(Show::Refused(r)) => Some(r),
        _ => None,
    })
}

fn pin(digits: &str) -> Secret<String> {
    Secret::new(digits.to_string())
}

/// Starts a load and answers the offer request: the flow then waits for the amount.
fn to_amount(source: LoadSource, card: &mut PurseCard, he: &mut FakeLoadServer) -> Load {
    let (mut l, a) = Load::start(source, Some(pin_key()), 1);
    let a = drive(&mut l, card, a);
    let req = sent(&a).expect("load offer request").clone();
    let Message::LoadOfferRequest(r) = &req else {
        panic!("{req:?}")
    };
    assert_eq!(r.card.balance, card.state.balance, "READ PURSE data");
    let a = feed(&mut l, card, Input::Answer(he.answer(&req)));
    assert!(
        a.iter()
            .any(|a| matches!(a, Action::Show(Show::LoadMax(m)) if m.minor == he.max)),
        "{a:?}"
    );
    assert!(
        steps(&a).is_empty(),
        "nothing is journaled before the request"
    );
    l
}

/// Amount (and PIN for a bank): runs to the load request; returns its actions.
fn to_request(
    l: &mut Load,
    card: &mut PurseCard,
    amount: i64,
    pin_digits: Option<&str>,
) -> Vec<Action> {
    let a = feed(l, card, Input::Amount(amount));
    match pin_digits {
        Some(d) => {
            assert!(
                a.iter()
                    .any(|a| matches!(a, Action::Show(Show::PinEntry { .. }))),
                "{a:?}"
            );
            feed(l, card, Input::Pin(pin(d)))
        }
        None => a,
    }
}

/// Runs a whole load against the fake; returns every action after the PIN.
fn run(
    l: &mut Load,
    card: &mut PurseCard,
    he: &mut FakeLoadServer,
    first: Vec<Action>,
) -> Vec<Action> {
    let mut all = Vec::new();
    let mut a = first;
    loop {
        let msg = sent(&a).cloned();
        let done = outcome(&a).is_some();
        all.extend(a);
        if done {
            return all;
        }
        let m = msg.expect("the flow waits on the head end");
        a = feed(l, card, Input::Answer(he.answer(&m)));
    }
}

#[test]
fn bank_load_with_pin_loads_the_card_and_journals_each_step_first() {
    let mut c = card();
    let mut he = FakeLoadServer::new(5_000, true);
    let mut l = to_amount(bank(), &mut c, &mut he);
    let first = to_request(&mut l, &mut c, 500, Some(PIN));
    // The journal entry comes before the request it announces.
    let j = first
        .iter()
        .position(|a| matches!(a, Action::Journal { .. }))
        .unwrap();
    let s = first
        .iter()
        .position(|a| matches!(a, Action::Send(_)))
        .unwrap();
    assert!(j < s);
    let a = run(&mut l, &mut c, &mut he, first.clone());
    match outcome(&a) {
        Some(Outcome::Loaded {
            transaction_id,
            amount,
            new_balance,
        }) => {
            assert_eq!(transaction_id, "ld-1");
            assert_eq!(amount.minor, 500);
            assert_eq!(*new_balance, 1_500);
        }
        o => panic!("{o:?}"),
    }
    assert_eq!(c.state.balance, 1_500);
    assert!(a.iter().any(|a| matches!(
        a,
        Action::Show(Show::Receipt(r)) if r.balance_after.minor == 1_500
            && matches!(&r.what, Receipted::Bank { account } if account == "ACC-0001")
    )));
    let names: Vec<&str> = steps(&a)
        .iter()
        .map(|s| match s {
            Step::RequestSent { .. } => "request_sent",
            Step::CommandReceived { .. } => "command",
            Step::LoadSent => "load_sent",
            Step::Responded { .. } => "responded",
            Step::ZeroValue { .. } => "zero",
            Step::Completed { .. } => "completed",
            Step::Ended { .. } => "ended",
        })
        .collect();
    assert_eq!(
        names,
        [
            "request_sent",
            "command",
            "load_sent",
            "responded",
            "completed"
        ]
    );
    // LOAD goes to the card only after load_sent is journaled.
    let load_sent = a
        .iter()
        .position(|x| {
            matches!(
                x,
                Action::Journal {
                    step: Step::LoadSent,
                    ..
                }
            )
        })
        .unwrap();
    let load_apdu = a
        .iter()
        .position(|x| matches!(x, Action::Apdu(ap) if ap[1] == proto::card::INS_LOAD))
        .unwrap();
    assert!(load_sent < load_apdu);
    // The PIN went sealed, bound to this transaction, and is nowhere in clear.
    let req = &he.requests[0];
    let sealed = req.sealed_pin.as_ref().expect("sealed PIN");
    let block: PinBlock =
        postcard::from_bytes(&proto::crypto::open(&pin_key(), sealed).unwrap()).unwrap();
    assert_eq!(
        (block.transaction_id.as_str(), block.pin.expose().as_str()),
        ("ld-1", PIN)
    );
    assert!(!sealed.windows(PIN.len()).any(|w| w == PIN.as_bytes()));
    let everything = format!("{a:?}");
    assert!(!everything.contains(PIN), "the PIN shows in the actions");
    assert_eq!(req.amount.minor, 500);
    assert_eq!(req.init.timestamp, TS);
}

#[test]
fn voucher_load_asks_no_pin() {
    let mut c = card();
    let mut he = FakeLoadServer::new(3_000, false);
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let first = to_request(&mut l, &mut c, 3_000, None);
    assert!(
        !first
            .iter()
            .any(|a| matches!(a, Action::Show(Show::PinEntry { .. })))
    );
    let a = run(&mut l, &mut c, &mut he, first);
    assert!(matches!(outcome(&a), Some(Outcome::Loaded { .. })), "{a:?}");
    assert_eq!(c.state.balance, 4_000);
    assert_eq!(he.requests[0].sealed_pin, None);
    assert!(
        matches!(&he.requests[0].source, LoadSource::Voucher { code } if code.expose() == "VOUCHER-0001")
    );
}

#[test]
fn bad_amounts_and_pins_are_refused_before_the_card_with_nothing_journaled() {
    for (amount, pin_digits) in [
        (0, None),
        (-5, None),
        (5_001, None),
        (500, Some("12")),
        (500, Some("1234567890123")),
        (500, Some("12a4")),
    ] {
        let mut c = card();
        let mut he = FakeLoadServer::new(5_000, true);
        let mut l = to_amount(bank(), &mut c, &mut he);
        let mut a = feed(&mut l, &mut c, Input::Amount(amount));
        if let Some(p) = pin_digits {
            a = feed(&mut l, &mut c, Input::Pin(pin(p)));
        }
        match refusal(&a).unwrap_or_else(|| panic!("{amount}: {a:?}")) {
            Refusal::AmountOutOfRange { got, max } => {
                assert!(pin_digits.is_none());
                assert_eq!((*got, max.minor), (amount, 5_000));
            }
            Refusal::BadPin { min: 4, max: 12 } => assert!(pin_digits.is_some()),
            other => panic!("{amount}: {other:?}"),
        }
        assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
        assert!(steps(&a).is_empty());
        assert!(sent(&a).is_none());
        assert_eq!(c.state.balance, 1_000);
        assert_eq!(c.state.atc, 0);
    }
}

#[test]
fn a_pin_account_without_a_pin_key_is_refused_clearly() {
    let mut c = card();
    let mut he = FakeLoadServer::new(5_000, true);
    let (mut l, a) = Load::start(bank(), None, 1);
    let a = drive(&mut l, &mut c, a);
    let req = sent(&a).unwrap().clone();
    feed(&mut l, &mut c, Input::Answer(he.answer(&req)));
    let a = feed(&mut l, &mut c, Input::Amount(100));
    assert_eq!(refusal(&a), Some(&Refusal::NoPinKey), "{a:?}");
    assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
}

#[test]
fn back_on_amount_or_pin_cancels_without_a_trace() {
    for at_pin in [false, true] {
        let mut c = card();
        let mut he = FakeLoadServer::new(5_000, true);
        let mut l = to_amount(bank(), &mut c, &mut he);
        if at_pin {
            feed(&mut l, &mut c, Input::Amount(100));
        }
        let a = feed(&mut l, &mut c, Input::Cancel);
        assert_eq!(
            outcome(&a),
            Some(&Outcome::Cancelled {
                transaction_id: Some("ld-1".into())
            })
        );
        assert!(steps(&a).is_empty() && sent(&a).is_none());
        assert!(l.is_done());
        // A late answer changes nothing.
        assert!(l.handle(Input::Amount(5)).is_empty());
    }
}

#[test]
fn offer_refusals_network_failures_and_bad_offers_end_the_flow() {
    let mut c = card();
    let cases: Vec<(Input, Want)> = vec![
        (
            Input::Answer(Message::error(
                ErrorCode::AccountLocked,
                "account ACC-0001 is locked",
                None,
            )),
            |r| matches!(r, Refusal::LoadOfferRefused { code: ErrorCode::AccountLocked, reason } if reason.contains("locked")),
        ),
        (
            Input::NetworkFailed(NetworkFailure::Unreachable("x".into())),
            |r| matches!(r, Refusal::Unreachable { error } if error.to_string() == "head end unreachable: x"),
        ),
        (Input::Answer(Message::CatalogRequest), |r| {
            matches!(
                r,
                Refusal::OutOfTurn {
                    to: Request::LoadOffer,
                    answer: "a catalog request"
                }
            )
        }),
    ];
    for (input, want) in cases {
        let (mut l, a) = Load::start(bank(), Some(pin_key()), 1);
        drive(&mut l, &mut c, a);
        let a = feed(&mut l, &mut c, input);
        assert!(want(refusal(&a).unwrap()), "{a:?}");
        assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
        assert!(steps(&a).is_empty());
    }
    // Nothing loadable now, and an offer in another currency.
    let cases: [(u64, Currency, Want); 2] = [
        (
            0,
            Currency::EUR,
            |r| matches!(r, Refusal::NothingToLoad { limited_by } if limited_by == "funds"),
        ),
        (
            100,
            Currency::new(840, 2),
            |r| matches!(r, Refusal::AccountCurrency { card, .. } if *card == Currency::EUR),
        ),
    ];
    for (max, currency, want) in cases {
        let (mut l, a) = Load::start(bank(), Some(pin_key()), 1);
        drive(&mut l, &mut c, a);
        let mut o = FakeLoadServer::new(max, true).offer(bank());
        o.max_amount = Money::new(max, currency);
        let a = feed(&mut l, &mut c, Input::Answer(Message::LoadOffer(o)));
        assert!(want(refusal(&a).unwrap()), "{a:?}");
    }
}

#[test]
fn card_refusing_initialize_for_load_or_pulled_before_it_ends_cleanly() {
    // Over the card's maximum balance (the offer's maximum was wrong).
    let mut c = card_with(9_900, 10_000, Currency::EUR);
    let mut he = FakeLoadServer::new(5_000, false);
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let a = feed(&mut l, &mut c, Input::Amount(500));
    assert_eq!(
        refusal(&a),
        Some(&Refusal::CardRefused {
            sw: StatusWord::OVER_MAX_BALANCE
        }),
        "{a:?}"
    );
    assert!(steps(&a).is_empty() && sent(&a).is_none());
    // Pulled while the viewer types.
    let mut c = card();
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let a = l.handle(Input::CardRemoved);
    assert_eq!(refusal(&a), Some(&Refusal::CardRemoved));
    assert!(steps(&a).is_empty());
    // The reader fails on the INITIALIZE.
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let a = l.handle(Input::Amount(500));
    assert!(matches!(a.last(), Some(Action::Apdu(_))));
    let a = l.handle(Input::Card(Err(CardFailure::Reader("reader gone".into()))));
    assert_eq!(refusal(&a).unwrap().problem(), Problem::NoCard);
    assert!(steps(&a).is_empty());
}

#[test]
fn wrong_pin_is_refused_and_closed_in_the_journal() {
    let mut c = card();
    let mut he = FakeLoadServer::new(5_000, true);
    let mut l = to_amount(bank(), &mut c, &mut he);
    to_request(&mut l, &mut c, 500, Some("9999"));
    let a = feed(
        &mut l,
        &mut c,
        Input::Answer(Message::Error(ErrorMsg {
            code: ErrorCode::WrongPin,
            reason: "wrong PIN; 2 tries left".into(),
            transaction_id: Some("ld-1".into()),
        })),
    );
    assert!(
        matches!(refusal(&a), Some(Refusal::LoadRefused { code: ErrorCode::WrongPin, reason }) if reason == "wrong PIN; 2 tries left"),
        "{a:?}"
    );
    assert!(matches!(steps(&a)[..], [Step::Ended { .. }]));
    assert!(matches!(outcome(&a), Some(Outcome::Failed { .. })));
    assert_eq!(c.state.balance, 1_000);
}

#[test]
fn busy_or_lost_answer_to_the_load_request_is_closed_by_a_zero_value_proof() {
    for input in [
        Input::NetworkFailed(NetworkFailure::Timeout(std::time::Duration::from_secs(10))),
        Input::Answer(Message::error(
            ErrorCode::Busy,
            "load server unreachable",
            None,
        )),
        Input::Answer(Message::CatalogRequest),
    ] {
        let mut c = card();
        let mut he = FakeLoadServer::new(5_000, true);
        let mut l = to_amount(bank(), &mut c, &mut he);
        let req = to_request(&mut l, &mut c, 500, Some(PIN));
        // The request reached the HSM (S2 issued) but its answer was lost.
        he.answer(sent(&req).unwrap());
        let a = feed(&mut l, &mut c, input);
        let Some(Message::LoadResponse(r)) = sent(&a) else {
            panic!("{a:?}")
        };
        assert_eq!(r.response, None);
        let zero = r.zero_value.as_ref().expect("zero-value S1");
        assert_eq!(zero.amount, 0);
        assert!(matches!(steps(&a)[..], [Step::ZeroValue { .. }]));
        let m = sent(&a).unwrap().clone();
        let a = feed(&mut l, &mut c, Input::Answer(he.answer(&m)));
        assert!(
            matches!(outcome(&a), Some(Outcome::NotLoaded { .. })),
            "{a:?}"
        );
        assert!(matches!(steps(&a)[..], [Step::Completed { .. }]));
        assert_eq!(c.state.balance, 1_000);
    }
}

#[test]
fn load_command_for_another_amount_or_card_is_not_run() {
    for tamper in 0..3 {
        let mut c = card();
        let mut he = FakeLoadServer::new(5_000, false);
        let mut l = to_amount(voucher(), &mut c, &mut he);
        let req = to_request(&mut l, &mut c, 500, None);
        let Message::LoadCommand(mut cmd) = he.answer(sent(&req).unwrap()) else {
            panic!()
        };
        match tamper {
            0 => cmd.command.amount = 5_000,
            1 => cmd.command.card_id = 43,
            _ => cmd.command.currency = Currency::new(840, 2),
        }
        let a = feed(&mut l, &mut c, Input::Answer(Message::LoadCommand(cmd)));
        assert!(
            !a.iter()
                .any(|x| matches!(x, Action::Apdu(ap) if ap[1] == proto::card::INS_LOAD)),
            "LOAD must not run"
        );
        assert!(matches!(
            steps(&a)[..],
            [Step::CommandReceived { .. }, Step::ZeroValue { .. }]
        ));
        let m = sent(&a).unwrap().clone();
        let a = feed(&mut l, &mut c, Input::Answer(he.answer(&m)));
        assert!(
            matches!(outcome(&a), Some(Outcome::NotLoaded { .. })),
            "{a:?}"
        );
        assert_eq!(c.state.balance, 1_000);
    }
}

#[test]
fn a_forged_load_command_refused_by_the_card_is_proved_not_loaded() {
    let mut c = card();
    let mut he = FakeLoadServer::new(5_000, false);
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let req = to_request(&mut l, &mut c, 500, None);
    let Message::LoadCommand(mut cmd) = he.answer(sent(&req).unwrap()) else {
        panic!()
    };
    cmd.command.s2 = [0; 8];
    let a = feed(&mut l, &mut c, Input::Answer(Message::LoadCommand(cmd)));
    assert!(matches!(
        steps(&a)[..],
        [
            Step::CommandReceived { .. },
            Step::LoadSent,
            Step::ZeroValue { .. }
        ]
    ));
    let m = sent(&a).unwrap().clone();
    let a = feed(&mut l, &mut c, Input::Answer(he.answer(&m)));
    assert!(matches!(outcome(&a), Some(Outcome::NotLoaded { .. })));
    assert_eq!(c.state.balance, 1_000);
}

#[test]
fn negative_results_send_the_zero_value_proof_and_the_hsm_decides() {
    for (fault, loaded) in [
        (CardFault::TrueNegative, false),
        (CardFault::CounterBump, false),
        (CardFault::FalseNegative, true),
    ] {
        let mut c = card();
        c.state.fault = Some(fault);
        let mut he = FakeLoadServer::new(5_000, true);
        let mut l = to_amount(bank(), &mut c, &mut he);
        let first = to_request(&mut l, &mut c, 500, Some(PIN));
        let a = run(&mut l, &mut c, &mut he, first);
        let r = he.responses.last().unwrap();
        assert_eq!(r.response.as_ref().unwrap().result, LOAD_NEGATIVE);
        assert_eq!(r.zero_value.as_ref().unwrap().amount, 0);
        assert!(
            steps(&a)
                .iter()
                .any(|s| matches!(s, Step::Responded { .. }))
        );
        assert!(
            steps(&a)
                .iter()
                .any(|s| matches!(s, Step::ZeroValue { .. }))
        );
        match (loaded, outcome(&a)) {
            (true, Some(Outcome::Loaded { new_balance, .. })) => assert_eq!(*new_balance, 1_500),
            (false, Some(Outcome::NotLoaded { .. })) => {}
            (_, o) => panic!("{fault:?}: {o:?}"),
        }
        assert_eq!(
            c.state.balance,
            if loaded { 1_500 } else { 1_000 },
            "{fault:?}"
        );
    }
}

#[test]
fn card_lost_mid_load_or_lost_confirmation_leaves_it_in_doubt_for_recovery() {
    // The reader fails on LOAD.
    let mut c = card();
    let mut he = FakeLoadServer::new(5_000, false);
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let req = to_request(&mut l, &mut c, 500, None);
    let cmd = he.answer(sent(&req).unwrap());
    let a = l.handle(Input::Answer(cmd));
    assert!(matches!(a.last(), Some(Action::Apdu(_))));
    assert!(matches!(
        steps(&a)[..],
        [Step::CommandReceived { .. }, Step::LoadSent]
    ));
    let a = l.handle(Input::Card(Err(CardFailure::Removed(
        "card removed".into(),
    ))));
    assert!(
        matches!(outcome(&a), Some(Outcome::InDoubt { .. })),
        "{a:?}"
    );
    assert!(
        a.iter().any(|x| matches!(
            x,
            Action::Show(Show::InDoubt(Doubt::CardLostDuringLoad { .. }))
        )),
        "{a:?}"
    );
    assert!(steps(&a).is_empty(), "the journal stays at load_sent");

    // The confirmation is lost after LOAD.
    let mut c = card();
    let mut he = FakeLoadServer::new(5_000, false);
    let mut l = to_amount(voucher(), &mut c, &mut he);
    let req = to_request(&mut l, &mut c, 500, None);
    let cmd = he.answer(sent(&req).unwrap());
    let a = feed(&mut l, &mut c, Input::Answer(cmd));
    assert!(matches!(sent(&a), Some(Message::LoadResponse(_))));
    let a = feed(
        &mut l,
        &mut c,
        Input::NetworkFailed(NetworkFailure::Timeout(std::time::Duration::from_secs(10))),
    );
    assert!(matches!(outcome(&a), Some(Outcome::InDoubt { .. })));
    let a2 = {
        let (mut l2, _) = Load::start(voucher(), None, 1);
        let Some(Message::LoadRequest(r)) = sent(&req).cloned() else {
            panic!()
        };
        l2.state = State::AwaitConfirmation(Requested {
            offer: he.offer(voucher()),
            init: r.init,
        });
        l2.handle(Input::Answer(Message::error(
            ErrorCode::Busy,
            "bank down",
            None,
        )))
    };
    assert!(matches!(outcome(&a2), Some(Outcome::InDoubt { .. })));
    assert_eq!(c.state.balance, 1_500, "the card did load");
}

// ---- recovery decisions ----

/// A load run to just after LOAD (or not), as the journal would hold it.
fn pending(
    c: &mut PurseCard,
    fault: Option<CardFault>,
    run_load: bool,
) -> (PendingLoad, FakeLoadServer) {
    c.state.fault = fault;
    let mut he = FakeLoadServer::new(5_000, false);
    let mut l = to_amount(voucher(), c, &mut he);
    let req = to_request(&mut l, c, 500, None);
    let Some(Message::LoadRequest(r)) = sent(&req).cloned() else {
        panic!()
    };
    let Message::LoadCommand(cmd) = he.answer(&Message::LoadRequest(r.clone())) else {
        panic!()
    };
    if run_load {
        // The INITIALIZE FOR LOAD session is still open: LOAD straight away.
        let r = c.process(&commands::load(&cmd.command)).response;
        assert!(split_sw(&r).unwrap().1.is_ok());
    }
    let p = PendingLoad {
        transaction_id: "ld-1".into(),
        offer: he.offer(voucher()),
        init: r.init,
        command: Some(cmd.command),
        response: None,
        zero: None,
        state: JournalState::LoadSent,
    };
    (p, he)
}

fn seen(card_id: u64, log: &[LogRecord]) -> CardSeen<'_> {
    CardSeen::new(card_id, log)
}

fn log(c: &mut PurseCard) -> Vec<LogRecord> {
    c.process(&commands::select());
    (1..=32u8)
        .map_while(|n| {
            let r = c.process(&commands::read_log(n)).response;
            let (d, sw) = split_sw(&r)?;
            sw.is_ok().then(|| LogRecord::decode(d).unwrap())
        })
        .collect()
}

#[test]
fn recovery_rebuilds_s3_from_the_log_and_the_hsm_accepts_it() {
    let mut c = card();
    let (p, mut he) = pending(&mut c, None, true);
    let l = log(&mut c);
    assert_eq!(decide(&p, Some(seen(43, &l))), Decision::WaitForCard);
    assert_eq!(decide(&p, None), Decision::WaitForCard);
    let Decision::FromLog(resp) = decide(&p, Some(seen(42, &l))) else {
        panic!()
    };
    assert!(resp.is_loaded());
    let conf = he.answer(&Message::LoadResponse(LoadResponseMsg {
        transaction_id: p.transaction_id.clone(),
        response: Some(resp),
        zero_value: None,
    }));
    assert!(matches!(conf, Message::LoadConfirmation(c) if c.loaded));
}

#[test]
fn recovery_without_a_logged_load_proves_it_with_a_zero_value_s1() {
    for (fault, run_load) in [(None, false), (Some(CardFault::TrueNegative), true)] {
        let mut c = card();
        let (p, mut he) = pending(&mut c, fault, run_load);
        let l = log(&mut c);
        assert_eq!(
            decide(&p, Some(seen(42, &l))),
            Decision::ProveWithZero { response: None }
        );
        c.process(&commands::select());
        let (d, sw) = {
            let r = c.process(&zero_value_apdu(&p.offer)).response;
            let (d, sw) = split_sw(&r).unwrap();
            (d.to_vec(), sw)
        };
        assert!(sw.is_ok());
        let zero = LoadInit::decode(&d).unwrap();
        let conf = he.answer(&Message::LoadResponse(LoadResponseMsg {
            transaction_id: p.transaction_id.clone(),
            response: None,
            zero_value: Some(zero),
        }));
        assert!(
            matches!(&conf, Message::LoadConfirmation(c) if !c.loaded),
            "{conf:?}"
        );
        assert_eq!(c.state.balance, 1_000);
    }
}

#[test]
fn recovery_resends_what_the_journal_holds() {
    let mut c = card();
    let (mut p, _) = pending(&mut c, None, false);
    let loaded = LoadResponse {
        card_id: 42,
        atc: p.init.atc,
        amount: 500,
        currency: Currency::EUR,
        result: LOAD_OK,
        new_balance: 1_500,
        s3: [1; 8],
    };
    p.response = Some(loaded.clone());
    assert!(
        matches!(decide(&p, Some(seen(42, &[]))), Decision::Resend(m) if m.response == Some(loaded.clone()) && m.zero_value.is_none())
    );
    let negative = LoadResponse {
        result: LOAD_NEGATIVE,
        ..loaded
    };
    p.response = Some(negative.clone());
    assert_eq!(
        decide(&p, Some(seen(42, &[]))),
        Decision::ProveWithZero {
            response: Some(negative.clone())
        }
    );
    p.zero = Some(p.init.clone());
    assert!(
        matches!(decide(&p, Some(seen(42, &[]))), Decision::Resend(m) if m.response == Some(negative.clone()) && m.zero_value.is_some())
    );
    p.response = None;
    assert!(
        matches!(decide(&p, Some(seen(42, &[]))), Decision::Resend(m) if m.response.is_none() && m.zero_value.is_some())
    );
    // Before any load command a logged load with the same counter is not this one.
    let mut c2 = card();
    let (mut p2, _) = pending(&mut c2, None, true);
    p2.command = None;
    assert_eq!(
        decide(&p2, Some(seen(42, &log(&mut c2)))),
        Decision::ProveWithZero { response: None }
    );
}

#[test]
fn recovery_resends_from_the_journal_without_the_card_and_waits_for_it_otherwise() {
    let mut c = card();
    let (mut p, _) = pending(&mut c, None, false);
    // Nothing journaled beyond the request: the card (its log, a zero-value S1) is needed.
    assert_eq!(decide(&p, None), Decision::WaitForCard);
    assert_eq!(decide(&p, Some(seen(43, &[]))), Decision::WaitForCard);
    // A journaled zero-value proof settles it whatever card is in the reader.
    p.zero = Some(p.init.clone());
    for card in [None, Some(seen(43, &[]))] {
        assert!(
            matches!(decide(&p, card), Decision::Resend(m) if m.zero_value.is_some()),
            "{card:?}"
        );
    }
}

#[test]
fn a_load_answer_settles_only_with_its_confirmation() {
    let sent = LoadResponseMsg {
        transaction_id: "ld-1".into(),
        response: None,
        zero_value: None,
    };
    let conf = |txid: &str| {
        Message::LoadConfirmation(LoadConfirmation {
            transaction_id: txid.into(),
            loaded: false,
            new_balance: None,
            sealed: vec![],
        })
    };
    let error = |code| {
        Message::Error(ErrorMsg {
            code,
            reason: "r".into(),
            transaction_id: None,
        })
    };
    assert!(matches!(
        on_load_answer("ld-1", &sent, false, Ok(&conf("ld-1"))),
        LoadResolution::Completed(c) if !c.loaded
    ));
    assert!(matches!(
        on_load_answer("ld-1", &sent, false, Ok(&conf("ld-2"))),
        LoadResolution::Retry(_)
    ));
    assert_eq!(
        on_load_answer("ld-1", &sent, true, Ok(&error(ErrorCode::BadSignature))),
        LoadResolution::ProveWithZero
    );
    for (from_log, code) in [
        (false, ErrorCode::BadSignature),
        (true, ErrorCode::Busy),
        (false, ErrorCode::Timeout),
    ] {
        assert!(matches!(
            on_load_answer("ld-1", &sent, from_log, Ok(&error(code))),
            LoadResolution::Retry(_)
        ));
    }
    assert!(matches!(
        on_load_answer(
            "ld-1",
            &sent,
            false,
            Err(&NetworkFailure::Timeout(std::time::Duration::from_secs(10)))
        ),
        LoadResolution::Retry(_)
    ));
}

/// Seed 004: a card locked by bad signatures gets no voucher load (only a bank load can
/// open it), and a bank load runs the issuer's UNBLOCK in the same LOAD: the card comes out
/// open and credited.
#[test]
fn a_locked_card_loads_only_from_a_bank_and_the_unblock_opens_it() {
    let mut c = card();
    c.state.status |= proto::purse::STATUS_BLOCKED;
    c.state.bad_key_count = c.state.bad_key_limit;
    let (mut l, a) = Load::start(voucher(), Some(pin_key()), 1);
    let a = drive(&mut l, &mut c, a);
    assert_eq!(refusal(&a), Some(&Refusal::CardBlocked));
    assert!(sent(&a).is_none(), "nothing asked of the head end");

    let mut he = FakeLoadServer::new(5_000, true);
    he.unblock = true;
    let mut l = to_amount(bank(), &mut c, &mut he);
    let first = to_request(&mut l, &mut c, 300, Some(PIN));
    let a = run(&mut l, &mut c, &mut he, first);
    assert!(matches!(outcome(&a), Some(Outcome::Loaded { .. })), "{a:?}");
    assert_eq!(c.state.balance, 1_300);
    assert_eq!(c.state.status & proto::purse::STATUS_BLOCKED, 0, "opened");
    assert_eq!(c.state.bad_key_count, 0);
}

/// Seed 004 PASSBOOK in the box's flow: a bank load reads the card's log back to the last
/// upload (READ LOG, newest first) and sends those records, oldest first, with the request;
/// the HSM takes exactly them and the card clears them with the credit. A voucher load, or
/// a card with privacy on, sends none.
#[test]
fn a_bank_load_sends_the_card_s_passbook_and_the_card_clears_it() {
    use proto::security_card::{DrawData, SecurityCard};
    let mut c = card();
    let mut sc = SecurityCard::new(3, issuer().purchase());
    for (i, amount) in [100u64, 200, 300].into_iter().enumerate() {
        c.process(&commands::select());
        let r = c.process(&commands::init_purchase(TODAY)).response;
        let init = proto::purse::PurchaseInit::decode(split_sw(&r).unwrap().0).unwrap();
        let draw = DrawData {
            merchant_id: "m".into(),
            transaction_id: format!("p{i}"),
            amount: Money::new(amount, Currency::EUR),
            init,
        };
        let auth = sc.issue_debit(&draw, TODAY, false).unwrap();
        let r = c.process(&commands::debit(&auth.command)).response;
        assert!(split_sw(&r).unwrap().1.is_ok());
    }
    let passbook = c.state.passbook();
    assert_eq!(passbook.len(), 3);
    let mut he = FakeLoadServer::new(5_000, true);
    let mut l = to_amount(bank(), &mut c, &mut he);
    let a = to_request(&mut l, &mut c, 500, Some("1234"));
    let a = run(&mut l, &mut c, &mut he, a);
    assert!(matches!(outcome(&a), Some(Outcome::Loaded { .. })), "{a:?}");
    assert_eq!(
        he.requests[0].passbook, passbook,
        "the records since the last upload"
    );
    assert_eq!(
        c.state.passbook_through, passbook[2].atc,
        "cleared by the card"
    );

    // A voucher load sends none; privacy on, a bank load sends none either.
    for (source, privacy) in [(voucher(), false), (bank(), true)] {
        c.state.privacy = privacy;
        let mut he = FakeLoadServer::new(5_000, privacy);
        let mut l = to_amount(source, &mut c, &mut he);
        let a = to_request(&mut l, &mut c, 100, privacy.then_some("1234"));
        let a = run(&mut l, &mut c, &mut he, a);
        assert!(matches!(outcome(&a), Some(Outcome::Loaded { .. })), "{a:?}");
        assert!(he.requests[0].passbook.is_empty(), "privacy {privacy}");
    }
}

/// Issue 17: an unload through the box's flow — INITIALIZE FOR UNLOAD over the offer's time
/// stamp, the HSM's unload command, UNLOAD, the card's S3 — takes the value off the card
/// and the TV shows "Value unloaded"; a lost unload command is closed by a zero-value
/// INITIALIZE FOR UNLOAD, nothing moved.
#[test]
fn an_unload_takes_the_value_off_the_card_and_a_lost_command_is_proved_with_a_zero_unload() {
    let unload = LoadSource::Unload {
        account: "ACC-0001".into(),
    };
    let mut c = card();
    let mut he = FakeLoadServer::new(1_000, true);
    let mut l = to_amount(unload.clone(), &mut c, &mut he);
    let first = to_request(&mut l, &mut c, 400, Some(PIN));
    let a = run(&mut l, &mut c, &mut he, first);
    assert_eq!(c.state.balance, 600, "unloaded");
    assert!(
        a.iter().any(|x| matches!(x,
            Action::Show(Show::Receipt(r)) if r.what == Receipted::Unload { account: "ACC-0001".into() }
                && r.balance_after == Money::new(600, Currency::EUR))),
        "{a:?}"
    );
    assert!(
        matches!(
            outcome(&a),
            Some(Outcome::Loaded {
                new_balance: 600,
                ..
            })
        ),
        "{a:?}"
    );
    assert_eq!(c.state.log.back().map(|r| r.kind), Some(LogKind::Unload));

    // The unload command never comes back (the head end is busy): the zero-value proof
    // is an INITIALIZE FOR UNLOAD, and the HSM says not unloaded.
    let mut he = FakeLoadServer::new(600, true);
    let mut l = to_amount(unload, &mut c, &mut he);
    let first = to_request(&mut l, &mut c, 100, Some(PIN));
    let req = sent(&first).cloned().expect("the unload request");
    let _ = he.answer(&req); // authorized at the HSM, the answer lost
    let a = feed(
        &mut l,
        &mut c,
        Input::Answer(Message::error(ErrorCode::Busy, "busy", None)),
    );
    let zero_sent = a.iter().any(
        |x| matches!(x, Action::Apdu(apdu) if apdu.get(2) == Some(&proto::card::P1_INIT_UNLOAD)),
    );
    assert!(zero_sent, "a zero-value INITIALIZE FOR UNLOAD: {a:?}");
    let a = run(&mut l, &mut c, &mut he, a);
    assert!(
        matches!(outcome(&a), Some(Outcome::NotLoaded { .. })),
        "{a:?}"
    );
    assert_eq!(c.state.balance, 600, "nothing moved");
}

/// Issue 17: recovery of an in-doubt unload finds the card's UNLOAD in its log (an unload
/// record, not a load's), and the HSM takes the rebuilt S3: unloaded once.
#[test]
fn recovery_of_an_unload_rebuilds_s3_from_an_unload_record() {
    let unload = LoadSource::Unload {
        account: "ACC-0001".into(),
    };
    let mut c = card();
    let mut he = FakeLoadServer::new(1_000, false);
    let mut l = to_amount(unload.clone(), &mut c, &mut he);
    let req = to_request(&mut l, &mut c, 300, None);
    let Some(Message::LoadRequest(r)) = sent(&req).cloned() else {
        panic!()
    };
    let Message::LoadCommand(cmd) = he.answer(&Message::LoadRequest(r.clone())) else {
        panic!()
    };
    let resp = c.process(&commands::unload(&cmd.command)).response;
    assert!(split_sw(&resp).unwrap().1.is_ok());
    let p = PendingLoad {
        transaction_id: "ld-1".into(),
        offer: he.offer(unload),
        init: r.init,
        command: Some(cmd.command),
        response: None,
        zero: None,
        state: JournalState::LoadSent,
    };
    let l = log(&mut c);
    let Decision::FromLog(resp) = decide(&p, Some(seen(42, &l))) else {
        panic!("the unload record in the log")
    };
    let conf = he.answer(&Message::LoadResponse(LoadResponseMsg {
        transaction_id: p.transaction_id.clone(),
        response: Some(resp),
        zero_value: None,
    }));
    assert!(
        matches!(&conf, Message::LoadConfirmation(c) if c.loaded),
        "{conf:?}"
    );
    assert_eq!(c.state.balance, 700);
}
