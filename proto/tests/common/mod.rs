//! Shared fixtures for proto's flow tests: an issuer, a card, a security card, an HSM, and
//! the APDU exchanges a terminal would run.
#![allow(dead_code)]

use proto::apdu::{CardApplication, Response, StatusWord};
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::DesKey;
use proto::hsm::Hsm;
use proto::money::{Currency, Money};
use proto::purse::*;
use proto::security_card::{DrawData, SecurityCard};

pub const TODAY: Date = Date::new(2026, 11, 21);
pub const EUR: Currency = Currency::EUR;

pub fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    }
}

pub fn card_with(balance: u64, max: u64) -> PurseCard {
    let spec = CardSpec {
        card_id: 0x0102_0304_0506_0708,
        provider_id: 42,
        currency: EUR,
        balance,
        max_balance: max,
        expiry: Expiry {
            year: 2028,
            month: 12,
        },
    };
    PurseCard::new(CardState::personalise(&spec, &issuer()), 99)
}

pub fn security_card() -> SecurityCard {
    SecurityCard::new(0xAA01, issuer().purchase())
}

pub fn hsm() -> Hsm {
    Hsm::new(0xBB01, issuer().load())
}

/// Sends an APDU and splits the response.
pub fn send(card: &mut PurseCard, apdu: &[u8]) -> Response {
    Response::parse(&card.process_apdu(apdu)).expect("card always returns a status word")
}

pub fn ok(card: &mut PurseCard, apdu: &[u8]) -> Vec<u8> {
    let r = send(card, apdu);
    assert_eq!(r.sw, StatusWord::OK, "APDU {}", hex::encode(apdu));
    r.data
}

pub fn select(card: &mut PurseCard) {
    ok(card, &commands::select());
}

pub fn read_purse(card: &mut PurseCard) -> PurseInfo {
    PurseInfo::decode(&ok(card, &commands::read_purse())).unwrap()
}

/// Card read for a purchase (SELECT + INITIALIZE FOR PURCHASE) and the draw data.
pub fn draw(card: &mut PurseCard, amount: u64, txid: &str) -> DrawData {
    select(card);
    let init = PurchaseInit::decode(&ok(card, &commands::init_purchase(TODAY))).unwrap();
    DrawData {
        merchant_id: "M-CABLE".into(),
        transaction_id: txid.into(),
        amount: Money::new(amount, EUR),
        init,
    }
}

pub fn init_load(card: &mut PurseCard, amount: u64, ts: u64) -> Result<LoadInit, StatusWord> {
    select(card);
    let r = send(
        card,
        &commands::init_load(&LoadInitRequest {
            amount,
            currency: EUR,
            timestamp: ts,
            date: TODAY,
        }),
    );
    if r.sw.is_ok() {
        Ok(LoadInit::decode(&r.data).unwrap())
    } else {
        Err(r.sw)
    }
}

/// INITIALIZE FOR LOAD or (`Direction::Unload`) FOR UNLOAD of `amount` in `currency`
/// (the currency names the purse): S1, or the card's refusal.
pub fn init_transfer(
    card: &mut PurseCard,
    dir: Direction,
    amount: u64,
    currency: Currency,
) -> Result<LoadInit, StatusWord> {
    select(card);
    let req = LoadInitRequest {
        amount,
        currency,
        timestamp: 2_000,
        date: TODAY,
    };
    let apdu = match dir {
        Direction::Load => commands::init_load(&req),
        Direction::Unload => commands::init_unload(&req),
    };
    let r = send(card, &apdu);
    if r.sw.is_ok() {
        Ok(LoadInit::decode(&r.data).unwrap())
    } else {
        Err(r.sw)
    }
}

/// A full purchase through the security card (FIG. 4 comparison). Returns the response.
pub fn purchase(
    card: &mut PurseCard,
    security_card: &mut SecurityCard,
    amount: u64,
    txid: &str,
) -> DebitResponse {
    let d = draw(card, amount, txid);
    let auth = security_card.issue_debit(&d, TODAY, false).unwrap();
    let resp = DebitResponse::decode(&ok(card, &commands::debit(&auth.command))).unwrap();
    security_card
        .complete(auth.command.security_card_txn, &resp)
        .unwrap();
    resp
}

/// A full load through the HSM.
pub fn load(card: &mut PurseCard, hsm: &mut Hsm, amount: u64, txid: &str) -> LoadResponse {
    let init = init_load(card, amount, 1_000).unwrap();
    let cmd = hsm
        .authorize(txid, &init, Money::new(amount, EUR), TODAY)
        .unwrap();
    let resp = LoadResponse::decode(&ok(card, &commands::load(&cmd))).unwrap();
    hsm.confirm(txid, &resp).unwrap();
    resp
}
