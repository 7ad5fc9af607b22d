//! Seed 004's PASSBOOK and privacy on the card and the HSM: the passbook (the log records
//! since the last upload) is bound to a load by its digest under S1; a bank load that
//! uploads exactly those records tells the card, under S2, through which transaction the
//! bank has them, and the card clears them with the credit (its log keeps them for
//! recovery). With privacy on, the digest is zeros and nothing is uploaded or cleared.

mod common;

use common::*;
use proto::apdu::StatusWord;
use proto::card::{PurseCard, commands};
use proto::crypto;
use proto::hsm::HsmError;
use proto::money::Money;
use proto::purse::*;

fn bank_load(
    card: &mut PurseCard,
    hsm: &mut proto::hsm::Hsm,
    txid: &str,
    upload: &[LogRecord],
) -> Result<LoadResponse, HsmError> {
    let init = init_load(card, 100, 1).unwrap();
    let cmd = hsm.authorize_with_passbook(txid, &init, Money::new(100, EUR), TODAY, upload)?;
    Ok(LoadResponse::decode(&ok(card, &commands::load(&cmd))).unwrap())
}

#[test]
fn a_bank_load_uploads_the_passbook_and_the_card_clears_it() {
    let mut card = card_with(10_000, 100_000);
    let (mut sc, mut hsm) = (security_card(), hsm());
    for (i, amount) in [499, 399, 1_250].into_iter().enumerate() {
        purchase(&mut card, &mut sc, amount, &format!("sale-{i}"));
    }
    let passbook = card.state.passbook();
    assert_eq!(passbook.len(), 3);
    let init = init_load(&mut card, 100, 1).unwrap();
    assert_eq!(
        init.passbook,
        passbook_digest(&passbook),
        "S1 covers the digest"
    );
    assert_ne!(init.passbook, [0; 8]);
    // An upload that leaves a record out, or changes one, is not the card's.
    assert_eq!(
        hsm.authorize_with_passbook("l0", &init, Money::new(100, EUR), TODAY, &passbook[1..]),
        Err(HsmError::PassbookMismatch)
    );
    let mut altered = passbook.clone();
    altered[0].amount = 1;
    assert_eq!(
        hsm.authorize_with_passbook("l0", &init, Money::new(100, EUR), TODAY, &altered),
        Err(HsmError::PassbookMismatch)
    );
    // The whole passbook: the card clears it with the credit.
    let cmd = hsm
        .authorize_with_passbook("l1", &init, Money::new(100, EUR), TODAY, &passbook)
        .unwrap();
    assert_eq!(cmd.passbook_through, 3);
    let resp = LoadResponse::decode(&ok(&mut card, &commands::load(&cmd))).unwrap();
    assert!(resp.is_loaded());
    assert_eq!(read_purse(&mut card).passbook_through, 3);
    let left = card.state.passbook();
    assert_eq!(left.len(), 1, "only the load itself is new: {left:?}");
    assert_eq!(left[0].kind, LogKind::Load);
    assert_eq!(
        card.state.log.len(),
        4,
        "the log keeps every record for recovery"
    );
    // A voucher load uploads nothing and clears nothing.
    let init = init_load(&mut card, 100, 2).unwrap();
    let cmd = hsm
        .authorize("l2", &init, Money::new(100, EUR), TODAY)
        .unwrap();
    assert_eq!(cmd.passbook_through, 0);
    ok(&mut card, &commands::load(&cmd));
    assert_eq!(card.state.passbook().len(), 2);
}

#[test]
fn with_privacy_on_nothing_is_uploaded_or_cleared() {
    let mut card = card_with(10_000, 100_000);
    let (mut sc, mut hsm) = (security_card(), hsm());
    purchase(&mut card, &mut sc, 499, "sale-1");
    select(&mut card);
    ok(&mut card, &commands::set_privacy(true));
    assert!(read_purse(&mut card).privacy);
    assert!(card.state.passbook().is_empty());
    let init = init_load(&mut card, 100, 1).unwrap();
    assert_eq!(init.passbook, [0; 8], "nothing to upload");
    // Uploading the log anyway is not what the card's S1 covers.
    let log: Vec<LogRecord> = card.state.log.iter().cloned().collect();
    assert_eq!(
        hsm.authorize_with_passbook("l0", &init, Money::new(100, EUR), TODAY, &log),
        Err(HsmError::PassbookMismatch)
    );
    let resp = bank_load(&mut card, &mut hsm, "l1", &[]).unwrap();
    assert!(resp.is_loaded());
    assert_eq!(read_purse(&mut card).passbook_through, 0, "nothing cleared");
    // Privacy off again: the whole passbook is there to upload.
    select(&mut card);
    ok(&mut card, &commands::set_privacy(false));
    assert_eq!(card.state.passbook().len(), 2);
}

#[test]
fn privacy_needs_the_pin_and_a_clear_past_the_session_is_refused() {
    let c = card_with(10_000, 100_000);
    let mut card = PurseCard::new(c.state.with_pin("4711", 500).unwrap(), 7);
    select(&mut card);
    assert_eq!(
        send(&mut card, &commands::set_privacy(true)).sw,
        StatusWord(0x6982),
        "the cardholder's choice: after VERIFY"
    );
    ok(&mut card, &commands::verify_pin("4711").unwrap());
    ok(&mut card, &commands::set_privacy(true));
    assert_eq!(
        send(&mut card, &[0x80, 0xD2, 0x00, 0x07, 0x00]).sw,
        StatusWord::WRONG_P1P2
    );
    // A load command (genuinely signed) whose passbook clear reaches this very session's
    // transaction, or any clear on a privacy card: refused whole, nothing credited.
    let mut card = card_with(10_000, 100_000);
    for through in [1, 5] {
        let init = init_load(&mut card, 100, 1).unwrap();
        let mut cmd = LoadCommand {
            hsm_id: 0xBB01,
            card_id: init.card_id,
            atc: init.atc,
            amount: 100,
            currency: EUR,
            passbook_through: through,
            s2: [0; 8],
        };
        let key = issuer().card_keys(init.card_id).load;
        cmd.s2 = crypto::sign(&key, b"S2LD", &cmd.signed_fields(&init.s1));
        assert_eq!(
            send(&mut card, &commands::load(&cmd)).sw,
            StatusWord::BAD_DATA,
            "through {through} at session {}",
            init.atc
        );
    }
    assert_eq!(card.state.balance, 10_000);
}
