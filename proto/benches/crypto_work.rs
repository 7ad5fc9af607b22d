//! Security-card purchase work and HSM load work, in operations per second on one core.
//!
//! "Purchase work" is what a payment server's security card does per purchase: verify the
//! card data, issue and sign the debit command (with the expected signature), and verify
//! the card signature on the debit response. "Load work" is the HSM's: verify S1, issue S2,
//! verify S3. The card's own work is measured alongside as the baseline: the same MACs
//! computed by the other party.

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use proto::apdu::Response;
use proto::card::{CardSpec, CardState, PurseCard, commands};
use proto::crypto::{DesKey, mac3};
use proto::hsm::Hsm;
use proto::money::{Currency, Money};
use proto::purse::*;
use proto::security_card::{DrawData, SecurityCard};

const TODAY: Date = Date::new(2026, 11, 21);

fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x11; 16]),
        load_master: DesKey::new([0x22; 16]),
    }
}

fn new_card() -> PurseCard {
    let spec = CardSpec {
        card_id: 5,
        provider_id: 1,
        currency: Currency::EUR,
        balance: u64::MAX / 4,
        max_balance: u64::MAX / 2,
        expiry: Expiry {
            year: 2030,
            month: 1,
        },
    };
    PurseCard::new(CardState::personalise(&spec, &issuer()), 1)
}

fn data(card: &mut PurseCard, apdu: &[u8]) -> Vec<u8> {
    Response::parse(&card.process(apdu).response).unwrap().data
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("purse");
    g.throughput(Throughput::Elements(1));

    g.bench_function("mac3_64_bytes_baseline", |b| {
        let k = DesKey::new([7; 16]);
        let msg = [0x5A; 64];
        b.iter(|| mac3(&k, std::hint::black_box(&msg)))
    });

    // Prepare real card data once; the security card's work is then measured alone.
    let mut card = new_card();
    data(&mut card, &commands::select());
    let init = PurchaseInit::decode(&data(&mut card, &commands::init_purchase(TODAY))).unwrap();
    let draw = DrawData {
        merchant_id: "M".into(),
        transaction_id: "t".into(),
        amount: Money::new(100, Currency::EUR),
        init,
    };
    let mut security_card = SecurityCard::new(1, issuer().purchase());
    let auth = security_card.issue_debit(&draw, TODAY, false).unwrap();
    let resp = DebitResponse::decode(&data(&mut card, &commands::debit(&auth.command))).unwrap();
    g.bench_function("security_card_purchase", |b| {
        b.iter(|| {
            let mut security_card = SecurityCard::new(1, issuer().purchase());
            let auth = security_card.issue_debit(&draw, TODAY, false).unwrap();
            security_card
                .complete(auth.command.security_card_txn, &resp)
                .unwrap()
        })
    });

    let mut card = new_card();
    data(&mut card, &commands::select());
    let req = LoadInitRequest {
        amount: 100,
        currency: Currency::EUR,
        timestamp: 1,
        date: TODAY,
    };
    let linit = LoadInit::decode(&data(&mut card, &commands::init_load(&req))).unwrap();
    let mut hsm = Hsm::new(1, issuer().load());
    let cmd = hsm
        .authorize("l", &linit, Money::new(100, Currency::EUR), TODAY)
        .unwrap();
    let lresp = LoadResponse::decode(&data(&mut card, &commands::load(&cmd))).unwrap();
    g.bench_function("hsm_load", |b| {
        b.iter(|| {
            let mut hsm = Hsm::new(1, issuer().load());
            hsm.authorize("l", &linit, Money::new(100, Currency::EUR), TODAY)
                .unwrap();
            hsm.confirm("l", &lresp).unwrap()
        })
    });

    g.bench_function("card_purchase_init_and_debit", |b| {
        let mut card = new_card();
        let mut security_card = SecurityCard::new(1, issuer().purchase());
        data(&mut card, &commands::select());
        b.iter(|| {
            let init =
                PurchaseInit::decode(&data(&mut card, &commands::init_purchase(TODAY))).unwrap();
            let d = DrawData {
                init,
                ..draw.clone()
            };
            let auth = security_card.issue_debit(&d, TODAY, true).unwrap();
            data(&mut card, &commands::debit(&auth.command))
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
