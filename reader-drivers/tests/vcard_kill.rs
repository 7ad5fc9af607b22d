//! Kill test for the virtual card's atomic persistence: a child process runs debits on a
//! card file in a loop and is SIGKILLed at random moments, many times. Afterwards the
//! state always loads, and balance == initial − the sum of the debits in the card's log.

use std::process::{Command, Stdio};
use std::time::Duration;

use proto::apdu::{CardApplication, Response};
use proto::card::{CardSpec, commands};
use proto::crypto::DesKey;
use proto::money::{Currency, Money};
use proto::purse::*;
use proto::security_card::{DrawData, SecurityCard};
use rand::Rng;
use reader_drivers::vcard::VirtualCard;

const INITIAL: u64 = 30; // at most 30 debits of 1: the whole history fits in the log
const CHILD_ENV: &str = "PURSELINK_VCARD_KILL_CHILD";

fn issuer() -> IssuerKeys {
    IssuerKeys {
        key_version: 1,
        purchase_master: DesKey::new([0x51; 16]),
        load_master: DesKey::new([0x52; 16]),
    }
}

fn ok(card: &mut VirtualCard, apdu: &[u8]) -> Vec<u8> {
    let r = Response::parse(&card.process_apdu(apdu)).unwrap();
    assert!(r.sw.is_ok(), "{}", r.sw);
    r.data
}

/// The child's body: debit 1 unit at a time until the card is empty (or we are killed).
#[test]
fn child_debit_loop() {
    let Ok(path) = std::env::var(CHILD_ENV) else {
        return; // only runs as the child of the kill test
    };
    let mut card = VirtualCard::open(path.as_ref()).unwrap();
    let mut security_card = SecurityCard::new(9, issuer().purchase());
    let today = Date::new(2026, 11, 21);
    for i in 0.. {
        ok(&mut card, &commands::select());
        let init = PurchaseInit::decode(&ok(&mut card, &commands::init_purchase(today))).unwrap();
        if init.balance == 0 {
            break;
        }
        let draw = DrawData {
            merchant_id: "M".into(),
            transaction_id: format!("t{i}"),
            amount: Money::new(1, Currency::EUR),
            init,
        };
        let auth = security_card.issue_debit(&draw, today, false).unwrap();
        ok(&mut card, &commands::debit(&auth.command));
    }
}

#[test]
fn sigkill_at_random_moments_never_loses_half_a_debit() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut rng = rand::thread_rng();
    let mut partial_runs = 0;
    for round in 0..40 {
        let path = dir.path().join(format!("card{round}.plvc"));
        let spec = CardSpec {
            card_id: 1000 + round,
            provider_id: 1,
            currency: Currency::EUR,
            balance: INITIAL,
            max_balance: 1_000,
            expiry: Expiry {
                year: 2030,
                month: 12,
            },
        };
        VirtualCard::create(&path, &spec, &issuer()).unwrap();
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "child_debit_loop",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(rng.gen_range(5..80)));
        // SIGKILL: no destructor, no flush, no chance to finish a write.
        child.kill().unwrap();
        child.wait().unwrap();

        let mut card = VirtualCard::open(&path).expect("state always loads after SIGKILL");
        let balance = card.state().balance;
        if balance != 0 && balance != INITIAL {
            partial_runs += 1;
        }
        let debited: u64 = card
            .state()
            .log
            .iter()
            .filter(|r| r.kind == LogKind::Debit)
            .map(|r| r.amount)
            .sum();
        assert_eq!(balance, INITIAL - debited, "round {round}: balance vs log");
        assert_eq!(
            card.state().atc as usize,
            card.state().log.len(),
            "round {round}: counter vs log"
        );
        // And the card still works.
        ok(&mut card, &commands::select());
        ok(&mut card, &commands::read_purse());
    }
    // The kills must actually land mid-run for the test to mean anything.
    assert!(
        partial_runs >= 5,
        "only {partial_runs} of 40 kills landed mid-run"
    );
}
