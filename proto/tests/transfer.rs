//! Card-to-card transfer (issue 18; seed 004 FIG. 4, packets P1–P4 of FIG. 6) between two
//! purse cards, APDU by APDU: value moves exactly once, a replayed or tampered packet is a
//! bad key, cards without two common application-key epochs refuse and say why, and a
//! transfer cut at any step settles from the two cards alone — the payee credited exactly
//! once or the payer credited back, never both, never neither.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::transfer::commands as xfer;
use proto::card::{CardSpec, CardState, PurseCard};
use proto::crypto::DesKey;
use proto::purse::*;
use proto::transfer::*;

const PAYER: u64 = 4711;
const PAYEE: u64 = 4712;

fn app_master() -> DesKey {
    DesKey::new([0x5A; 16])
}

fn card(id: u64, balance: u64, oldest_epoch: u8) -> PurseCard {
    let spec = CardSpec::demo(id, EUR, balance, 100_000);
    let state = CardState::personalise(&spec, &issuer())
        .with_app_keys(&app_master(), oldest_epoch)
        .unwrap();
    let mut c = PurseCard::new(state, id);
    select(&mut c);
    c
}

/// The card after a power cycle: its persistent state only, a fresh session.
fn power_cycle(c: &PurseCard) -> PurseCard {
    let mut c = PurseCard::new(c.state.clone(), c.state.atc.into());
    select(&mut c);
    c
}

fn status(c: &mut PurseCard) -> TransferStatus {
    TransferStatus::decode(&ok(c, &xfer::status())).unwrap()
}

/// SEND to the card whose RECEIVE answered `recv` (its id, epochs and challenge).
fn send_to(recv: &[u8], amount: u64) -> Vec<u8> {
    xfer::send(
        TODAY,
        amount,
        EUR,
        u64::from_be_bytes(recv[..8].try_into().unwrap()),
        recv[8..12].try_into().unwrap(),
        recv[12..20].try_into().unwrap(),
    )
}

/// The exchange of FIG. 4 up to (and with) `steps` of its five card commands:
/// RECEIVE, SEND, P1, P2 P3, P4. Returns the payee's receipt if P4 ran.
fn exchange(
    payer: &mut PurseCard,
    payee: &mut PurseCard,
    amount: u64,
    steps: usize,
) -> Option<Settlement> {
    if steps == 0 {
        return None;
    }
    let recv = ok(payee, &xfer::receive(TODAY, amount, EUR));

    if steps == 1 {
        return None;
    }
    let p1 = ok(payer, &send_to(&recv, amount));
    if steps == 2 {
        return None;
    }
    let p23 = ok(payee, &xfer::packet1(&p1));
    if steps == 3 {
        return None;
    }
    let p4 = ok(payer, &xfer::packets23(&p23));
    if steps == 4 {
        return None;
    }
    Some(Settlement::decode(&ok(payee, &xfer::packet4(TODAY, &p4))).unwrap())
}

/// Settles the two cards' transfer as a recovering box or gateway would: from STATUS alone.
/// Returns the steps taken.
fn settle(payer: &mut PurseCard, payee: &mut PurseCard) -> Vec<&'static str> {
    let mut taken = Vec::new();
    let mut p4_refused = false;
    for _ in 0..5 {
        let (a, b) = (status(payer), status(payee));
        match next_settle_step((PAYER, &a), (PAYEE, &b), p4_refused) {
            SettleStep::Settled => return taken,
            SettleStep::DeliverP4 { p4 } => {
                taken.push("deliver P4");
                let r = send(payee, &xfer::packet4(TODAY, &p4));
                if !r.sw.is_ok() {
                    taken.push("P4 refused");
                    p4_refused = true;
                    continue;
                }
                ok(
                    payer,
                    &xfer::resolve(TODAY, &Settlement::decode(&r.data).unwrap()),
                );
            }
            SettleStep::AskPayee { random } => {
                taken.push("ask payee");
                let word = Settlement::decode(&ok(payee, &xfer::cancel(random))).unwrap();
                if a.sent.as_ref().is_some_and(|s| s.random == random) {
                    taken.push(match word.kind {
                        Settled::Credited => "payer takes the receipt",
                        Settled::Cancelled => "payer credited back",
                    });
                    ok(payer, &xfer::resolve(TODAY, &word));
                }
            }
        }
    }
    panic!("not settled in five steps: {taken:?}");
}

#[test]
fn two_cards_move_value_once_and_both_passbooks_name_the_other_card() {
    let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    let receipt = exchange(&mut payer, &mut payee, 500, 5).expect("P4 ran");
    assert_eq!((payer.state.balance, payee.state.balance), (9_500, 2_500));
    // The payer keeps P4 until the receipt settles it.
    assert!(payer.state.sent.is_some());
    ok(&mut payer, &xfer::resolve(TODAY, &receipt));
    assert_eq!(payer.state.sent, None);
    assert_eq!(payer.state.balance, 9_500, "a receipt moves no value");

    let out = payer.state.log.back().unwrap();
    let inn = payee.state.log.back().unwrap();
    assert_eq!(
        (out.kind, out.amount, out.counterparty, out.balance_after),
        (LogKind::TransferOut, 500, PAYEE, 9_500)
    );
    assert_eq!(
        (inn.kind, inn.amount, inn.counterparty, inn.balance_after),
        (LogKind::TransferIn, 500, PAYER, 2_500)
    );
    assert_eq!(out.signature, inn.signature, "both name the transfer's R2");
    assert!(payer.state.passbook().contains(out) && payee.state.passbook().contains(inn));
    assert_eq!(status(&mut payer), TransferStatus::default());
    assert_eq!(status(&mut payee), TransferStatus::default());
}

#[test]
fn a_replayed_p4_is_refused_and_counts_as_a_bad_key() {
    let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    let recv = ok(&mut payee, &xfer::receive(TODAY, 500, EUR));
    let p1 = ok(&mut payer, &send_to(&recv, 500));
    let p23 = ok(&mut payee, &xfer::packet1(&p1));
    let p4 = ok(&mut payer, &xfer::packets23(&p23));
    ok(&mut payee, &xfer::packet4(TODAY, &p4));
    assert_eq!(payee.state.bad_key_count, 0);

    // Replayed as it was: nothing waits for it.
    let r = send(&mut payee, &xfer::packet4(TODAY, &p4));
    assert_eq!(r.sw, StatusWord::BAD_SIGNATURE);
    assert_eq!((payee.state.balance, payee.state.bad_key_count), (2_500, 1));

    // Replayed into the payee's next transfer (another R2): it does not answer it.
    let recv = ok(&mut payee, &xfer::receive(TODAY, 500, EUR));
    let mut third = card(4713, 5_000, 50);
    let p1 = ok(&mut third, &send_to(&recv, 500));
    ok(&mut payee, &xfer::packet1(&p1));
    // (A good P1 does not reset the count: any cardholder's card makes genuine ones.)
    assert_eq!(payee.state.bad_key_count, 1);
    let r = send(&mut payee, &xfer::packet4(TODAY, &p4));
    assert_eq!(r.sw, StatusWord::BAD_SIGNATURE);
    assert_eq!((payee.state.balance, payee.state.bad_key_count), (2_500, 2));
    assert!(
        payee.state.receiving.is_some(),
        "the real transfer still waits"
    );
}

#[test]
fn tampered_packets_are_bad_keys_and_move_nothing() {
    let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    let recv = ok(&mut payee, &xfer::receive(TODAY, 500, EUR));
    let mut p1 = ok(&mut payer, &send_to(&recv, 500));
    let n = p1.len();
    p1[n - 10] ^= 0x01;
    assert_eq!(
        send(&mut payee, &xfer::packet1(&p1)).sw,
        StatusWord::BAD_SIGNATURE
    );
    // Refused, not counted: a P1 credits nothing, and a relay could block the card with
    // junk otherwise (the second outside attack, G1).
    assert_eq!(
        (payee.state.bad_key_count, payee.state.receiving.clone()),
        (0, None)
    );

    // P3 tampered (the amount is inside it): the payer is not debited.
    let recv = ok(&mut payee, &xfer::receive(TODAY, 500, EUR));
    let p1 = ok(&mut payer, &send_to(&recv, 500));
    let mut p23 = ok(&mut payee, &xfer::packet1(&p1));
    let n = p23.len();
    p23[n - 12] ^= 0x80;
    assert_eq!(
        send(&mut payer, &xfer::packets23(&p23)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(
        (payer.state.balance, payer.state.bad_key_count),
        (10_000, 0),
        "refused, not counted (P2 P3 debit only when they open)"
    );
    assert_eq!(payer.state.sent, None);

    // A settlement the payee never signed does not credit the payer back.
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    exchange(&mut a, &mut b, 700, 4);
    let sent = a.state.sent.clone().unwrap();
    let forged = Settlement {
        kind: Settled::Cancelled,
        random: sent.random,
        mac: [0x42; 8],
    };
    assert_eq!(
        send(&mut a, &xfer::resolve(TODAY, &forged)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!((a.state.balance, a.state.bad_key_count), (9_300, 1));
    assert!(a.state.sent.is_some());
}

#[test]
fn cards_need_two_common_key_epochs_and_say_why_when_they_lack_them() {
    // Seed 004's own examples.
    assert_eq!(
        common_epochs([49, 50, 51, 52], [51, 52, 53, 54]),
        Ok((51, 52))
    );
    let refused = common_epochs([51, 52, 53, 54], [54, 55, 56, 57]).unwrap_err();
    let why = refused.to_string();
    assert!(
        why.contains("{51, 52, 53, 54}") && why.contains("{54, 55, 56, 57}"),
        "{why}"
    );
    assert_eq!(
        common_epochs([1, 2, 3, 4], [1, 2, 3, 4]),
        Ok((3, 4)),
        "the newest two"
    );

    // The same on the cards.
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    assert_eq!(ok(&mut a, &xfer::read_epochs()), [49, 50, 51, 52]);
    assert_eq!(ok(&mut b, &xfer::read_epochs()), [51, 52, 53, 54]);
    exchange(&mut a, &mut b, 100, 5).expect("{49–52} and {51–54} transfer");

    let (mut a, mut b) = (card(PAYER, 10_000, 51), card(PAYEE, 2_000, 54));
    let recv = ok(&mut b, &xfer::receive(TODAY, 100, EUR));
    let r = send(&mut a, &send_to(&recv, 100));
    assert_eq!(r.sw, StatusWord::NO_COMMON_KEYS);
    assert_eq!(a.state.balance, 10_000);

    // A card without application keys takes no part.
    let plain = CardState::personalise(&CardSpec::demo(9, EUR, 100, 1_000), &issuer());
    let mut plain = PurseCard::new(plain, 1);
    select(&mut plain);
    assert_eq!(
        send(&mut plain, &xfer::read_epochs()).sw,
        StatusWord::NO_COMMON_KEYS
    );
}

#[test]
fn a_new_epoch_key_replaces_the_oldest() {
    let mut keys = AppKeys::from_master(&app_master(), 51).unwrap();
    keys.push(app_key(&app_master(), 55)).unwrap();
    assert_eq!(keys.epochs(), [52, 53, 54, 55]);
    assert!(keys.key(51).is_none() && keys.key(55).is_some());
    assert!(
        keys.push(app_key(&app_master(), 55)).is_err(),
        "a replayed push"
    );
    assert!(
        keys.push(app_key(&app_master(), 40)).is_err(),
        "a stale push"
    );
    assert!(
        AppKeys::from_master(&app_master(), 253).is_err(),
        "past epoch 255"
    );
    // After the push, {52–55} and {54–57} share 54 and 55.
    assert_eq!(common_epochs(keys.epochs(), [54, 55, 56, 57]), Ok((54, 55)));
}

#[test]
fn a_transfer_cut_at_any_step_settles_exactly_once_from_the_two_cards() {
    // Each cut: the exchange stops after `steps` commands (a box, the reader or the relay
    // died), both cards lose power; the settlement runs from their STATUS alone.
    for steps in 0..=5 {
        for power_loss in [false, true] {
            let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
            exchange(&mut payer, &mut payee, 500, steps);
            if power_loss {
                payer = power_cycle(&payer);
                payee = power_cycle(&payee);
            }
            let taken = settle(&mut payer, &mut payee);
            let (a, b) = (payer.state.balance, payee.state.balance);
            assert_eq!(a + b, 12_000, "cut after {steps}: sum kept ({taken:?})");
            let expected = match steps {
                // The payee credited: the payer's debit stands, whatever settles it.
                5 => (9_500, 2_500),
                // The payer debited, P4 never delivered: settling delivers it once.
                4 => (9_500, 2_500),
                // No debit: nothing moves.
                _ => (10_000, 2_000),
            };
            assert_eq!((a, b), expected, "cut after {steps} ({taken:?})");
            assert_eq!(
                status(&mut payer),
                TransferStatus::default(),
                "cut after {steps}"
            );
            assert_eq!(
                status(&mut payee),
                TransferStatus::default(),
                "cut after {steps}"
            );
            assert_eq!(
                settle(&mut payer, &mut payee),
                Vec::<&str>::new(),
                "settled stays settled"
            );
            // The cards work on: a full transfer after the settlement.
            exchange(&mut payer, &mut payee, 100, 5).expect("next transfer");
        }
    }
}

#[test]
fn a_cancelled_transfer_is_credited_back_once_and_its_p4_is_then_refused() {
    let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    exchange(&mut payer, &mut payee, 500, 4);
    let sent = payer.state.sent.clone().unwrap();
    // The payee gives up first (its holder cancelled; the relay lost P4).
    let word = Settlement::decode(&ok(&mut payee, &xfer::cancel(sent.random))).unwrap();
    assert_eq!(word.kind, Settled::Cancelled);
    // P4 now arrives: refused, counted, nothing credited.
    let r = send(&mut payee, &xfer::packet4(TODAY, &sent.p4));
    assert_eq!(r.sw, StatusWord::BAD_SIGNATURE);
    assert_eq!(payee.state.balance, 2_000);
    // The payer is credited back, once.
    ok(&mut payer, &xfer::resolve(TODAY, &word));
    assert_eq!(payer.state.balance, 10_000);
    assert_eq!(payer.state.log.back().unwrap().kind, LogKind::TransferBack);
    assert_eq!(
        send(&mut payer, &xfer::resolve(TODAY, &word)).sw,
        StatusWord::WRONG_STATE
    );
    assert_eq!(payer.state.balance, 10_000);
    // The payee remembers it: asked again, it answers the same cancellation.
    let again = Settlement::decode(&ok(&mut payee, &xfer::cancel(sent.random))).unwrap();
    assert_eq!(again, word);
    // A receipt cannot be made into a cancellation: the kind is under the MAC.
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    let receipt = exchange(&mut a, &mut b, 500, 5).unwrap();
    let flipped = Settlement {
        kind: Settled::Cancelled,
        ..receipt
    };
    assert_eq!(
        send(&mut a, &xfer::resolve(TODAY, &flipped)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(a.state.balance, 9_500);
}

#[test]
fn a_card_with_an_unsettled_transfer_starts_no_other() {
    let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    exchange(&mut payer, &mut payee, 500, 4);
    let mut other = card(4713, 0, 50);
    let recv = ok(&mut other, &xfer::receive(TODAY, 100, EUR));
    let r = send(&mut payer, &send_to(&recv, 100));
    assert_eq!(r.sw, StatusWord::TRANSFER_UNSETTLED);
    assert_eq!(
        send(&mut payee, &xfer::receive(TODAY, 100, EUR)).sw,
        StatusWord::TRANSFER_UNSETTLED
    );
}

#[test]
fn a_transfer_above_the_pin_threshold_needs_the_pin() {
    let spec = CardSpec::demo(PAYER, EUR, 10_000, 100_000);
    let state = CardState::personalise(&spec, &issuer())
        .with_app_keys(&app_master(), 49)
        .unwrap()
        .with_pin("1234", 1_000)
        .unwrap();
    let mut payer = PurseCard::new(state, 1);
    select(&mut payer);
    let mut payee = card(PAYEE, 0, 51);
    let recv = ok(&mut payee, &xfer::receive(TODAY, 2_000, EUR));
    let r = send(&mut payer, &send_to(&recv, 2_000));
    assert_eq!(r.sw, StatusWord::PIN_REQUIRED);
    ok(
        &mut payer,
        &proto::card::commands::verify_pin("1234").unwrap(),
    );
    // (A refused SEND used nothing up: the payee's challenge still stands.)
    ok(&mut payer, &send_to(&recv, 2_000));
}

#[test]
fn packets_and_status_decode_only_their_layouts() {
    for len in 0..80 {
        let junk = vec![0xA5; len];
        let _ = Greeting::decode(&junk);
        let _ = ValuePacket::decode(&junk);
        let _ = Settlement::decode(&junk);
        let _ = TransferStatus::decode(&junk);
        let _ = read_parts::<2>(&junk);
        let _ = AppKey::decode(&junk);
    }
    let s = TransferStatus {
        sent: Some(Sent {
            random: [1; 8],
            amount: 5,
            currency: EUR,
            payee: 9,
            ak1: 4,
            p4: vec![7; 40],
        }),
        receiving: None,
    };
    assert_eq!(TransferStatus::decode(&s.encode()), Ok(s));
}

/// One step of a hostile or unlucky relay between the two cards.
#[derive(Debug, Clone)]
enum Op {
    /// The next command of an honest exchange (RECEIVE, SEND, P1, P2 P3, P4, RESOLVE, in
    /// turn), with the newest packet.
    Next,
    Receive,
    Send,
    /// Deliver the `n`-th (modulo) packet of its kind ever seen: the newest, or a replay.
    P1(usize),
    P23(usize),
    P4(usize),
    Cancel(usize),
    Resolve(usize),
    PowerCyclePayer,
    PowerCyclePayee,
}

fn op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    prop_oneof![
        8 => Just(Op::Next),
        1 => Just(Op::Receive),
        1 => Just(Op::Send),
        1 => (0usize..3).prop_map(Op::P1),
        1 => (0usize..3).prop_map(Op::P23),
        1 => (0usize..3).prop_map(Op::P4),
        1 => (0usize..3).prop_map(Op::Cancel),
        1 => (0usize..3).prop_map(Op::Resolve),
        1 => Just(Op::PowerCyclePayer),
        1 => Just(Op::PowerCyclePayee),
    ]
}

/// The newest-first `n`-th of `seen`, if any.
fn pick<T: Clone>(seen: &[T], n: usize) -> Option<T> {
    (!seen.is_empty()).then(|| seen[seen.len() - 1 - n % seen.len()].clone())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Any order of the exchange's commands — replays, losses, cancellations and power
    /// cycles included — then the settlement from STATUS: the two cards' sum never
    /// changes, nothing stays pending, and each card's balance is its log's.
    #[test]
    fn any_relay_then_settling_conserves_value(ops in proptest::collection::vec(op(), 0..24)) {
        let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
        let (mut recvs, mut p1s, mut p23s, mut p4s) = (vec![], vec![], vec![], vec![]);
        let (mut r2s, mut words) = (vec![], vec![]);
        let mut next = 0usize;
        for op in ops {
            let op = match op {
                Op::Next => {
                    next += 1;
                    [Op::Receive, Op::Send, Op::P1(0), Op::P23(0), Op::P4(0), Op::Resolve(0)][(next - 1) % 6].clone()
                }
                op => op,
            };
            match op {
                Op::Next => unreachable!("mapped above"),
                Op::Receive => {
                    let r = send(&mut payee, &xfer::receive(TODAY, 500, EUR));
                    if r.sw == StatusWord::OK { recvs.push(r.data) }
                }
                Op::Send => if let Some(recv) = pick(&recvs, 0) {
                    let r = send(&mut payer, &send_to(&recv, 500));
                    if r.sw == StatusWord::OK { p1s.push(r.data) }
                },
                Op::P1(n) => if let Some(p1) = pick(&p1s, n) {
                    let r = send(&mut payee, &xfer::packet1(&p1));
                    if r.sw == StatusWord::OK { p23s.push(r.data) }
                    if let Some(rec) = &payee.state.receiving { r2s.push(rec.random) }
                },
                Op::P23(n) => if let Some(p23) = pick(&p23s, n) {
                    let r = send(&mut payer, &xfer::packets23(&p23));
                    if r.sw == StatusWord::OK { p4s.push(r.data) }
                },
                Op::P4(n) => if let Some(p4) = pick(&p4s, n) {
                    let r = send(&mut payee, &xfer::packet4(TODAY, &p4));
                    if r.sw == StatusWord::OK { words.push(Settlement::decode(&r.data).unwrap()) }
                },
                Op::Cancel(n) => if let Some(r2) = pick(&r2s, n) {
                    let r = send(&mut payee, &xfer::cancel(r2));
                    if r.sw == StatusWord::OK { words.push(Settlement::decode(&r.data).unwrap()) }
                },
                Op::Resolve(n) => if let Some(w) = pick(&words, n) {
                    let _ = send(&mut payer, &xfer::resolve(TODAY, &w));
                },
                Op::PowerCyclePayer => payer = power_cycle(&payer),
                Op::PowerCyclePayee => payee = power_cycle(&payee),
            }
            proptest::prop_assert!(payer.state.balance + payee.state.balance <= 12_000, "value created");
        }
        // Blocked by too many bad keys, a card settles only through its issuer.
        proptest::prop_assume!(payer.state.status == 0 && payee.state.status == 0);
        settle(&mut payer, &mut payee);
        proptest::prop_assert_eq!(payer.state.balance + payee.state.balance, 12_000);
        proptest::prop_assert_eq!(status(&mut payer), TransferStatus::default());
        proptest::prop_assert_eq!(status(&mut payee), TransferStatus::default());
        for c in [&payer, &payee] {
            let net: i64 = c.state.log.iter().map(|r| {
                let a = r.amount as i64;
                if r.kind.takes_value() { -a } else { a }
            }).sum();
            let opening = if c.state.card_id == PAYER { 10_000 } else { 2_000 };
            proptest::prop_assert_eq!(opening + net, c.state.balance as i64);
        }
    }
}

#[test]
fn a_bank_load_pushes_the_current_epoch_key_which_replaces_the_oldest_in_that_load_only() {
    use proto::money::Money;
    let mut c = card(PAYEE, 2_000, 51);
    let mut h = hsm().with_app_key(&app_master(), 55);
    let mut n = 0;
    let mut authorized = |c: &mut PurseCard, h: &mut proto::hsm::Hsm| {
        n += 1;
        let init = init_load(c, 500, n).unwrap();
        let cmd = h
            .authorize(&format!("k{n}"), &init, Money::new(500, EUR), TODAY)
            .unwrap();
        (init, cmd)
    };
    let epochs = |c: &PurseCard| c.state.app_keys.as_ref().unwrap().epochs();

    // Tampered: the whole LOAD is refused, as a bad key; nothing credited or re-keyed.
    let (init, cmd) = authorized(&mut c, &mut h);
    let mut push = h.app_key_push(&init).unwrap();
    assert_eq!(push.len(), AppKeyPush::SEALED_LEN);
    push[12] ^= 1;
    let apdu = proto::card::commands::load_with_items(&cmd, [None, None, Some(&push)]);
    assert_eq!(send(&mut c, &apdu).sw, StatusWord::BAD_SIGNATURE);
    assert_eq!((c.state.balance, epochs(&c)), (2_000, [51, 52, 53, 54]));

    // Genuine, but another load's: sealed for that session only.
    let old_push = h.app_key_push(&init).unwrap();
    let (_, cmd) = authorized(&mut c, &mut h);
    let apdu = proto::card::commands::load_with_items(&cmd, [None, None, Some(&old_push)]);
    assert_eq!(send(&mut c, &apdu).sw, StatusWord::BAD_SIGNATURE);
    assert_eq!((c.state.balance, epochs(&c)), (2_000, [51, 52, 53, 54]));

    // Its own load's, beside the issuer's UNBLOCK: credited and re-keyed together.
    let (init, cmd) = authorized(&mut c, &mut h);
    let push = h.app_key_push(&init).unwrap();
    let unblock = h.unblock(&init).unwrap();
    let apdu = proto::card::commands::load_with_items(&cmd, [None, Some(&unblock), Some(&push)]);
    assert!(
        LoadResponse::decode(&ok(&mut c, &apdu))
            .unwrap()
            .is_loaded()
    );
    assert_eq!((c.state.balance, epochs(&c)), (2_500, [52, 53, 54, 55]));

    // The same epoch again is no news: loaded, keys as they were.
    let (init, cmd) = authorized(&mut c, &mut h);
    let push = h.app_key_push(&init).unwrap();
    let apdu = proto::card::commands::load_with_items(&cmd, [None, None, Some(&push)]);
    assert!(
        LoadResponse::decode(&ok(&mut c, &apdu))
            .unwrap()
            .is_loaded()
    );
    assert_eq!((c.state.balance, epochs(&c)), (3_000, [52, 53, 54, 55]));

    // Now it transfers with a card of {54–57}, which it could not before.
    let mut newer = card(4799, 0, 54);
    select(&mut c);
    exchange(&mut c, &mut newer, 100, 5).expect("{52–55} and {54–57} share 54 and 55");
    assert_eq!(newer.state.balance, 100);
}

// ---- The outside attack on the card protocol (findings, each a regression test) ----

/// F1: a relay without keys replayed an old P1 to plant pending receives and push a
/// cancelled transfer out of the payee's memory. P1 now answers the payee's own challenge
/// (R0, from its RECEIVE) and names it: a replayed P1 is a bad key and plants nothing.
#[test]
fn a_replayed_p1_plants_nothing() {
    let (mut payer, mut payee) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    let recv = ok(&mut payee, &xfer::receive(TODAY, 500, EUR));
    let p1 = ok(&mut payer, &send_to(&recv, 500));
    ok(&mut payee, &xfer::packet1(&p1));
    let r2 = payee.state.receiving.clone().unwrap().random;
    ok(&mut payee, &xfer::cancel(r2));
    ok(&mut payee, &xfer::receive(TODAY, 500, EUR));
    assert_eq!(
        send(&mut payee, &xfer::packet1(&p1)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(payee.state.receiving, None, "nothing planted");
    assert_eq!(payee.state.bad_key_count, 0, "refused, not counted");
}

/// F1 (memory): the payee remembers its word per payer, so a payer's unsettled transfer is
/// not pushed out by another payer's many transfers.
#[test]
fn a_cancelled_transfers_word_outlives_another_payers_many_transfers() {
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    exchange(&mut a, &mut b, 500, 4);
    let r2 = a.state.sent.clone().unwrap().random;
    ok(&mut b, &xfer::cancel(r2)); // its answer never reaches A
    let mut c = card(4713, 10_000, 50);
    for _ in 0..(TRANSFER_MEMORY + 4) {
        let receipt = exchange(&mut c, &mut b, 10, 5).unwrap();
        ok(&mut c, &xfer::resolve(TODAY, &receipt));
    }
    let steps = settle(&mut a, &mut b);
    assert_eq!(steps, ["ask payee", "payer credited back"]);
    assert_eq!(a.state.balance, 10_000);
    assert_eq!(a.state.balance + b.state.balance + c.state.balance, 22_000);
}

/// F2: two key pushes while a transfer was pending dropped the key it needed. A card keeps
/// the key its own unsettled transfer uses (the push waits for the next bank load), and
/// keeps its word on settled ones signed.
#[test]
fn a_key_push_does_not_drop_the_key_an_unsettled_transfer_uses() {
    use proto::money::Money;
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    exchange(&mut a, &mut b, 500, 4); // AK0 51, AK1 52; B waits for P4
    for (n, epoch) in [(1u64, 55u8), (2, 56)] {
        let h = hsm().with_app_key(&app_master(), epoch);
        let mut h = h;
        let init = init_load(&mut b, 100, n).unwrap();
        let cmd = h
            .authorize(&format!("push{n}"), &init, Money::new(100, EUR), TODAY)
            .unwrap();
        let push = h.app_key_push(&init).unwrap();
        let apdu = proto::card::commands::load_with_items(&cmd, [None, None, Some(&push)]);
        assert!(
            LoadResponse::decode(&ok(&mut b, &apdu))
                .unwrap()
                .is_loaded()
        );
    }
    // 55 dropped 51 (unused); 56 would have dropped 52, AK1 of the pending transfer.
    assert_eq!(
        b.state.app_keys.as_ref().unwrap().epochs(),
        [52, 53, 54, 55]
    );
    select(&mut b);
    assert_eq!(settle(&mut a, &mut b), ["deliver P4"]);
    assert_eq!((a.state.balance, b.state.balance), (9_500, 2_700));
}

/// F3: a payee that cannot take P4 (over its maximum after a load, or blocked) is asked
/// to cancel, and the payer is credited back.
#[test]
fn a_payee_that_cannot_take_p4_cancels_and_the_payer_is_credited_back() {
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    exchange(&mut a, &mut b, 500, 4);
    b.state.balance = b.state.max_balance - 100; // a load in between
    let steps = settle(&mut a, &mut b);
    assert_eq!(
        steps,
        [
            "deliver P4",
            "P4 refused",
            "ask payee",
            "payer credited back"
        ]
    );
    assert_eq!(a.state.balance, 10_000);
    assert_eq!(b.state.balance, b.state.max_balance - 100);
}

/// F4: a card could make itself a P1 that opened (a good signature) and so reset its
/// bad-key count as often as it liked. No P1 resets the count now (only P4 and RESOLVE,
/// which credit, do), and no P1 counts toward it either.
#[test]
fn a_card_cannot_reset_its_bad_key_count_with_its_own_p1() {
    let mut victim = card(PAYEE, 2_000, 51);
    let mut rounds = 0;
    while victim.state.status == 0 && rounds < 20 {
        rounds += 1;
        let _ = send(&mut victim, &xfer::packet4(TODAY, &[0u8; 40]));
        let recv = send(&mut victim, &xfer::receive(TODAY, 1, EUR));
        if !recv.sw.is_ok() {
            break;
        }
        let mut to_other = recv.data.clone();
        to_other[..8].copy_from_slice(&999_999u64.to_be_bytes());
        let p1 = send(&mut victim, &send_to(&to_other, 1));
        if p1.sw.is_ok() {
            let _ = send(&mut victim, &xfer::packet1(&p1.data));
        }
    }
    assert_eq!(
        rounds, 10,
        "ten bad P4s in ten rounds: the P1s reset nothing"
    );
    assert_ne!(victim.state.status, 0, "blocked by its bad keys");
}

/// F5: the payee's R2 was all random: a card whose generator repeated after a reset took
/// an old P4 again. Every challenge ends in a persisted counter.
#[test]
fn an_old_p4_is_refused_even_if_the_random_generator_repeats() {
    let (mut a, mut b) = (card(PAYER, 10_000, 49), card(PAYEE, 2_000, 51));
    let same_seed = |c: &PurseCard| {
        let mut c = PurseCard::new(c.state.clone(), 1);
        select(&mut c);
        c
    };
    b = same_seed(&b);
    exchange(&mut a, &mut b, 500, 4);
    let old = a.state.sent.clone().unwrap();
    let word = Settlement::decode(&ok(&mut b, &xfer::cancel(old.random))).unwrap();
    ok(&mut a, &xfer::resolve(TODAY, &word));
    b = same_seed(&b);
    exchange(&mut a, &mut b, 500, 3);
    assert_ne!(b.state.receiving.clone().unwrap().random, old.random);
    assert_eq!(
        send(&mut b, &xfer::packet4(TODAY, &old.p4)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(b.state.balance, 2_000);
}
