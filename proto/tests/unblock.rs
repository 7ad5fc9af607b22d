//! Seed 004's lock (BAD_KEY) and the issuer's UNBLOCK: the card blocks after too many bad
//! signatures and shows the count; only a bank load carrying a valid UNBLOCK opens it (in
//! the same state change as the credit); an UNBLOCK that does not open adds to the count.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{PurseCard, commands};
use proto::hsm::Hsm;
use proto::money::Money;
use proto::purse::{LoadResponse, PurchaseInit, Unblock};

/// A card with a lock limit of 3, blocked by three DEBITs with a wrong security-card
/// signature.
fn blocked_card() -> PurseCard {
    let mut c = card_with(1_000, 100_000);
    c.state.bad_key_limit = 3;
    let mut sc = security_card();
    for i in 0..3 {
        let d = draw(&mut c, 100, &format!("bad-{i}"));
        let mut cmd = sc.issue_debit(&d, TODAY, false).unwrap().command;
        cmd.security_card_signature[0] ^= 1;
        assert_eq!(
            send(&mut c, &commands::debit(&cmd)).sw,
            StatusWord::BAD_SIGNATURE
        );
        let info = read_purse(&mut c);
        assert_eq!((info.bad_key_count, info.bad_key_limit), (i + 1, 3));
    }
    c
}

/// INITIALIZE FOR LOAD (allowed on a blocked card) and the HSM's load command.
fn authorized(
    c: &mut PurseCard,
    hsm: &mut Hsm,
    txid: &str,
) -> (proto::purse::LoadInit, proto::purse::LoadCommand) {
    let init = init_load(c, 500, 7).expect("a blocked card may start a load");
    let cmd = hsm
        .authorize(txid, &init, Money::new(500, EUR), TODAY)
        .unwrap();
    (init, cmd)
}

#[test]
fn the_card_blocks_at_the_limit_and_shows_the_count() {
    let mut c = blocked_card();
    let info = read_purse(&mut c);
    assert!(info.is_blocked());
    assert_eq!(info.bad_key_count, 3, "the count is visible");
    // No purchase.
    select(&mut c);
    assert_eq!(
        send(&mut c, &commands::init_purchase(TODAY)).sw,
        StatusWord::BLOCKED
    );
}

#[test]
fn a_load_without_unblock_is_refused_and_a_valid_unblock_opens_the_card_with_the_credit() {
    let mut c = blocked_card();
    let mut h = hsm();
    let (_, cmd) = authorized(&mut c, &mut h, "plain");
    assert_eq!(send(&mut c, &commands::load(&cmd)).sw, StatusWord::BLOCKED);
    let info = read_purse(&mut c);
    assert_eq!(
        (info.balance, info.bad_key_count),
        (1_000, 3),
        "nothing moved"
    );
    assert!(info.is_blocked());

    let (init, cmd) = authorized(&mut c, &mut h, "unblock");
    let unblock = h.unblock(&init).unwrap();
    assert_eq!(unblock.len(), Unblock::SEALED_LEN);
    let r = ok(
        &mut c,
        &commands::load_with_issuer(&cmd, None, Some(&unblock)),
    );
    let resp = LoadResponse::decode(&r).unwrap();
    assert!(resp.is_loaded());
    let info = read_purse(&mut c);
    assert!(!info.is_blocked(), "opened");
    assert_eq!((info.balance, info.bad_key_count), (1_500, 0));
    // It buys again.
    select(&mut c);
    PurchaseInit::decode(&ok(&mut c, &commands::init_purchase(TODAY))).unwrap();
}

#[test]
fn an_unblock_that_does_not_open_adds_to_the_count_and_moves_nothing() {
    let mut c = blocked_card();
    let mut h = hsm();
    let (init, cmd) = authorized(&mut c, &mut h, "tampered");
    let mut unblock = h.unblock(&init).unwrap();
    unblock[10] ^= 1;
    assert_eq!(
        send(
            &mut c,
            &commands::load_with_issuer(&cmd, None, Some(&unblock))
        )
        .sw,
        StatusWord::BAD_SIGNATURE
    );
    let info = read_purse(&mut c);
    assert_eq!((info.balance, info.bad_key_count), (1_000, 4));
    assert!(info.is_blocked());
    // Another card's UNBLOCK (another load's session) does not open it either.
    let mut other = card_with(0, 100_000);
    other.state.card_id ^= 1;
    other.state.keys = issuer().card_keys(other.state.card_id);
    let oinit = init_load(&mut other, 500, 9).unwrap();
    let foreign = h.unblock(&oinit).unwrap();
    let (_, cmd) = authorized(&mut c, &mut h, "foreign");
    assert_eq!(
        send(
            &mut c,
            &commands::load_with_issuer(&cmd, None, Some(&foreign))
        )
        .sw,
        StatusWord::BAD_SIGNATURE
    );
    assert_eq!(read_purse(&mut c).bad_key_count, 5);
}

#[test]
fn unblock_restores_the_pin_tries_and_rides_with_a_key_update() {
    let c = blocked_card();
    let mut c = PurseCard::new(c.state.with_pin("4711", 500).unwrap(), 3);
    c.state.pin.as_mut().unwrap().tries_left = 0;
    let v2 = proto::purse::IssuerKeys {
        key_version: 2,
        purchase_master: proto::crypto::DesKey::new([0x33; 16]),
        load_master: proto::crypto::DesKey::new([0x44; 16]),
    };
    let both = |f: fn(&proto::purse::IssuerKeys) -> proto::purse::MasterKey| {
        proto::purse::MasterKeys::new([f(&issuer()), f(&v2)], []).unwrap()
    };
    let mut h = Hsm::new(0xBB01, both(proto::purse::IssuerKeys::load))
        .with_rekey(both(proto::purse::IssuerKeys::purchase));
    let (init, cmd) = authorized(&mut c, &mut h, "both");
    let update = h.key_update(&init).unwrap();
    let unblock = h.unblock(&init).unwrap();
    ok(
        &mut c,
        &commands::load_with_issuer(&cmd, Some(&update), Some(&unblock)),
    );
    let info = read_purse(&mut c);
    assert!(!info.is_blocked());
    assert_eq!((info.key_version, info.balance), (2, 1_500));
    assert_eq!(
        c.state.pin.as_ref().unwrap().tries_left,
        3,
        "the PIN's tries restored"
    );
}

/// A card blocked (or expired) since a draw still proves that draw was not debited: the
/// proof INITIALIZE (P2 = 01) is answered, opens no session (no DEBIT can follow), and the
/// security card accepts it. (The outside attack on issue 17: the 10th bad signature, in a
/// DEBIT, blocked the card; its proof INITIALIZE was refused `6983`, so the purchase stayed
/// in doubt in the box for good, and the box refused the bank load that would unblock it.)
#[test]
fn a_blocked_card_still_proves_a_draw_was_not_debited() {
    let mut c = card_with(1_000, 100_000);
    c.state.bad_key_limit = 1;
    let mut sc = security_card();
    let d = draw(&mut c, 100, "the-tenth");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let mut cmd = auth.command.clone();
    cmd.security_card_signature[0] ^= 1;
    assert_eq!(
        send(&mut c, &commands::debit(&cmd)).sw,
        StatusWord::BAD_SIGNATURE
    );
    assert!(
        read_purse(&mut c).is_blocked(),
        "the bad signature blocked it"
    );
    // A purchase INITIALIZE is refused; the proof is answered.
    select(&mut c);
    assert_eq!(
        send(&mut c, &commands::init_purchase(TODAY)).sw,
        StatusWord::BLOCKED
    );
    let proof = PurchaseInit::decode(&ok(&mut c, &commands::init_purchase_proof(TODAY))).unwrap();
    sc.verify_not_debited(auth.command.security_card_txn, &proof)
        .expect("the security card accepts the blocked card's proof");
    // No session: a DEBIT after a proof is out of sequence (even the genuine one).
    assert_eq!(
        send(&mut c, &commands::debit(&auth.command)).sw,
        StatusWord::WRONG_STATE
    );
    assert_eq!(read_purse(&mut c).balance, 1_000);
}

#[test]
fn an_expired_card_still_proves_and_a_proof_opens_no_session_on_a_good_card() {
    let mut c = card_with(1_000, 100_000);
    let mut sc = security_card();
    let d = draw(&mut c, 100, "before-expiry");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    // Long after the card's expiry (2028-12).
    let later = proto::purse::Date::new(2031, 1, 1);
    select(&mut c);
    assert_eq!(
        send(&mut c, &commands::init_purchase(later)).sw,
        StatusWord::EXPIRED
    );
    let proof = PurchaseInit::decode(&ok(&mut c, &commands::init_purchase_proof(later))).unwrap();
    sc.verify_not_debited(auth.command.security_card_txn, &proof)
        .expect("an expired card's proof");
    // A good card's proof INITIALIZE: no session either.
    let mut g = card_with(1_000, 100_000);
    let d = draw(&mut g, 100, "good");
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    ok(&mut g, &commands::init_purchase_proof(TODAY));
    assert_eq!(
        send(&mut g, &commands::debit(&auth.command)).sw,
        StatusWord::WRONG_STATE
    );
}

/// An UNBLOCK (or a key update) is good for the LOAD of its own load session only: one from
/// a bank load that failed, moved into another load at the same transaction number (a
/// voucher load, say), does not open, and counts as a bad signature. (The second outside
/// attack on issue 17 opened a blocked card that way, without the bank PIN.)
#[test]
fn an_unblock_from_a_failed_load_does_not_open_another_load() {
    let mut c = blocked_card();
    let mut h = hsm();
    // The bank load whose LOAD never reaches the card (pulled): its UNBLOCK is captured.
    let (init, _) = authorized(&mut c, &mut h, "failed-bank-load");
    let captured = h.unblock(&init).unwrap();
    // Another load at the same transaction number (the failed one did not move it).
    let (init2, cmd2) = authorized(&mut c, &mut h, "voucher-load");
    assert_eq!(init2.atc, init.atc);
    assert_eq!(
        send(
            &mut c,
            &commands::load_with_issuer(&cmd2, None, Some(&captured))
        )
        .sw,
        StatusWord::BAD_SIGNATURE
    );
    let info = read_purse(&mut c);
    assert!(info.is_blocked());
    assert_eq!((info.balance, info.bad_key_count), (1_000, 4));
}
