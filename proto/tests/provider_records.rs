//! Seed 003 claims 1–4 and 10–12 on the purse card: service-provider records (name, key,
//! key type, account information, instrument type, access conditions) and the cardholder
//! data area, read with READ RECORD and changed by the provider with a MACed UPDATE RECORD.

mod common;

use common::*;
use proptest::prelude::*;
use proto::apdu::{Command, Response, StatusWord};
use proto::card::{CardState, PurseCard, SW_RECORD_NOT_FOUND, commands};
use proto::crypto::DesKey;
use proto::provider::*;
use proto::purse::{DebitResponse, MasterKey, PurchaseInit};

const PIN: &str = "4711";
const PROVIDER_A: u32 = 0xA1;
const PROVIDER_B: u32 = 0xB2;

fn master_a() -> MasterKey {
    MasterKey::new(1, DesKey::new([0x33; 16]))
}

fn master_b() -> MasterKey {
    MasterKey::new(1, DesKey::new([0x44; 16]))
}

fn spec_a() -> ProviderSpec {
    ProviderSpec {
        provider_id: PROVIDER_A,
        name: "Acme Bank".into(),
        account: b"IBAN DE00 1234".to_vec(),
        instrument: INSTRUMENT_DEBIT,
        read_access: ReadAccess::Pin,
    }
}

fn spec_b() -> ProviderSpec {
    ProviderSpec {
        provider_id: PROVIDER_B,
        name: "Cable TV club".into(),
        account: b"member 77".to_vec(),
        instrument: INSTRUMENT_LOYALTY,
        read_access: ReadAccess::Always,
    }
}

/// A card with a PIN, provider A (record 1, read under the PIN), provider B (record 2, read
/// always) and a cardholder area; not selected.
fn card() -> PurseCard {
    let state = card_with(10_000, 100_000)
        .state
        .with_pin(PIN, 500)
        .unwrap()
        .with_provider(&spec_a(), &master_a())
        .unwrap()
        .with_provider(&spec_b(), &master_b())
        .unwrap()
        .with_cardholder(Cardholder {
            name: "J. Viewer".into(),
            data: b"1 Main St".to_vec(),
            read_access: ReadAccess::Always,
        })
        .unwrap();
    PurseCard::new(state, 5)
}

fn key_a(card: &PurseCard) -> DesKey {
    master_a().card_key(card.state.card_id)
}

fn key_b(card: &PurseCard) -> DesKey {
    master_b().card_key(card.state.card_id)
}

fn update(key: &DesKey, card: &PurseCard, counter: u32, account: &[u8]) -> RecordUpdate {
    RecordUpdate::sign(
        key,
        card.state.card_id,
        PROVIDER_A,
        counter,
        account.to_vec(),
    )
    .unwrap()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[test]
fn a_pin_record_needs_verify_and_never_shows_its_key() {
    let mut c = card();
    select(&mut c);
    let r = c.process(&commands::read_record(1));
    assert_eq!(
        Response::parse(&r.response).unwrap().sw,
        SW_SECURITY_NOT_SATISFIED
    );
    assert!(!r.state_changed);
    assert_eq!(c.state.bad_key_count, 0, "6982 here is not a bad signature");
    // Record 2 is readable by anyone who selected the purse.
    let b = ProviderRecordInfo::decode(&ok(&mut c, &commands::read_record(2))).unwrap();
    assert_eq!(b.provider_id, PROVIDER_B);
    assert_eq!(b.instrument, INSTRUMENT_LOYALTY);

    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    let raw = ok(&mut c, &commands::read_record(1));
    let a = ProviderRecordInfo::decode(&raw).unwrap();
    assert_eq!(
        a,
        ProviderRecordInfo {
            provider_id: PROVIDER_A,
            name: "Acme Bank".into(),
            key_type: KeyType::Tdes2Mac3,
            account: b"IBAN DE00 1234".to_vec(),
            instrument: INSTRUMENT_DEBIT,
            read_access: ReadAccess::Pin,
            update_access: UpdateAccess::ProviderMac,
            update_counter: 0,
        }
    );
    let key = key_a(&c);
    for part in [&key.bytes()[..], &key.bytes()[..8], &key.bytes()[8..]] {
        assert!(!contains(&raw, part), "the key left the card");
    }
    // Access lasts the session: read again, and P2 04 (current file) is the same file.
    ok(&mut c, &commands::read_record(1));
    let p2_04 = Command::new(0x00, 0xB2, 1, P2_CURRENT_FILE, vec![], Some(0)).to_bytes();
    assert_eq!(ok(&mut c, &p2_04), raw);
    // The cardholder area.
    let ch = Cardholder::decode(&ok(&mut c, &commands::read_cardholder())).unwrap();
    assert_eq!(ch.name, "J. Viewer");
    assert_eq!(ch.data, b"1 Main St");
}

#[test]
fn a_wrong_pin_does_not_open_and_closes_an_open_session() {
    let mut c = card();
    select(&mut c);
    assert_eq!(
        send(&mut c, &commands::verify_pin("0000").unwrap()).sw,
        StatusWord::wrong_pin(2)
    );
    assert_eq!(
        send(&mut c, &commands::read_record(1)).sw,
        SW_SECURITY_NOT_SATISFIED
    );
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    ok(&mut c, &commands::read_record(1));
    assert_eq!(
        send(&mut c, &commands::verify_pin("1111").unwrap()).sw,
        StatusWord::wrong_pin(2)
    );
    assert_eq!(
        send(&mut c, &commands::read_record(1)).sw,
        SW_SECURITY_NOT_SATISFIED
    );
}

#[test]
fn select_or_reset_closes_the_access_and_nothing_works_unselected() {
    let mut c = card();
    assert_eq!(
        send(&mut c, &commands::read_record(2)).sw,
        StatusWord::WRONG_STATE
    );
    let u = update(&key_a(&c), &c, 1, b"x");
    assert_eq!(
        send(&mut c, &commands::update_record(1, &u)).sw,
        StatusWord::WRONG_STATE
    );
    select(&mut c);
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    ok(&mut c, &commands::read_record(1));
    select(&mut c);
    assert_eq!(
        send(&mut c, &commands::read_record(1)).sw,
        SW_SECURITY_NOT_SATISFIED
    );
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    proto::apdu::CardApplication::reset(&mut c);
    select(&mut c);
    assert_eq!(
        send(&mut c, &commands::read_record(1)).sw,
        SW_SECURITY_NOT_SATISFIED
    );
}

#[test]
fn a_debit_does_not_use_up_the_records_access() {
    let mut c = card();
    let mut sc = security_card();
    select(&mut c);
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    let init = PurchaseInit::decode(&ok(&mut c, &commands::init_purchase(TODAY))).unwrap();
    let d = proto::security_card::DrawData {
        merchant_id: "M-CABLE".into(),
        transaction_id: "t-1".into(),
        amount: proto::money::Money::new(2_000, EUR),
        init,
    };
    let auth = sc.issue_debit(&d, TODAY, false).unwrap();
    let resp = DebitResponse::decode(&ok(&mut c, &commands::debit(&auth.command))).unwrap();
    assert_eq!(resp.new_balance, 8_000);
    ok(&mut c, &commands::read_record(1));
}

#[test]
fn an_update_under_another_providers_key_is_refused_and_not_counted() {
    let mut c = card();
    select(&mut c);
    let before = c.state.clone();
    let forged = update(&key_b(&c), &c, 1, b"attacker account");
    let r = c.process(&commands::update_record(1, &forged));
    assert_eq!(
        Response::parse(&r.response).unwrap().sw,
        SW_SECURITY_NOT_SATISFIED
    );
    assert!(!r.state_changed);
    assert_eq!(c.state, before, "nothing changed, the lock count included");
    // B's own record takes B's key (and names B).
    let own =
        RecordUpdate::sign(&key_b(&c), c.state.card_id, PROVIDER_B, 1, b"m 78".to_vec()).unwrap();
    ok(&mut c, &commands::update_record(2, &own));
    assert_eq!(c.state.providers[1].account, b"m 78");
}

#[test]
fn a_correct_update_applies_once_and_its_replay_is_9405() {
    let mut c = card();
    select(&mut c);
    let key = key_a(&c);
    let u = update(&key, &c, 1, b"IBAN DE99 0000");
    let r = c.process(&commands::update_record(1, &u));
    let resp = Response::parse(&r.response).unwrap();
    assert_eq!(resp.sw, StatusWord::OK);
    assert!(r.state_changed, "persisted before the answer");
    assert!(
        u.verify_receipt(&key, c.state.card_id, &resp.data),
        "the card's receipt proves the update"
    );
    assert!(!u.verify_receipt(&key_b(&c), c.state.card_id, &resp.data));
    assert_eq!(c.state.providers[0].account, b"IBAN DE99 0000");
    assert_eq!(c.state.providers[0].update_counter, 1);
    assert_eq!(c.state.providers[1].account, b"member 77", "B untouched");

    let before = c.state.clone();
    assert_eq!(
        send(&mut c, &commands::update_record(1, &u)).sw,
        StatusWord::REPLAY
    );
    let older = update(&key, &c, 0, b"old");
    assert_eq!(
        send(&mut c, &commands::update_record(1, &older)).sw,
        StatusWord::REPLAY
    );
    assert_eq!(c.state, before);

    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    let a = ProviderRecordInfo::decode(&ok(&mut c, &commands::read_record(1))).unwrap();
    assert_eq!(
        (a.account.as_slice(), a.update_counter),
        (&b"IBAN DE99 0000"[..], 1)
    );
    let next = update(&key, &c, 7, b"");
    ok(&mut c, &commands::update_record(1, &next));
    assert_eq!(c.state.providers[0].update_counter, 7);
    assert!(c.state.providers[0].account.is_empty());
}

#[test]
fn a_wrong_le_undoes_the_update_so_the_resend_applies_it() {
    let mut c = card();
    select(&mut c);
    let u = update(&key_a(&c), &c, 1, b"new");
    let mut cmd = Command::parse(&commands::update_record(1, &u)).unwrap();
    cmd.le = Some(3);
    let r = c.process(&cmd.to_bytes());
    assert_eq!(Response::parse(&r.response).unwrap().sw, StatusWord(0x6C08));
    assert!(!r.state_changed);
    assert_eq!(c.state.providers[0].update_counter, 0);
    cmd.le = Some(8);
    assert_eq!(ok(&mut c, &cmd.to_bytes()).len(), 8);
    assert_eq!(c.state.providers[0].update_counter, 1);
}

#[test]
fn malformed_commands_get_6700_6a80_6a83_6a86() {
    let mut c = card();
    select(&mut c);
    ok(&mut c, &commands::verify_pin(PIN).unwrap());
    let u = update(&key_a(&c), &c, 1, b"abc");
    let enc = u.encode();
    let cases: Vec<(Vec<u8>, StatusWord)> = vec![
        // Four bytes: no purse command is that short.
        (vec![0x00, 0xB2, 0x01, 0x0C], StatusWord::WRONG_LENGTH),
        // Lc that does not match.
        (
            vec![0x00, 0xDC, 0x01, 0x04, 0x09, 1, 2],
            StatusWord::WRONG_LENGTH,
        ),
        // READ RECORD with data; UPDATE RECORD without.
        (
            Command::new(0, 0xB2, 1, 0x0C, vec![1], Some(0)).to_bytes(),
            StatusWord::WRONG_LENGTH,
        ),
        (
            Command::new(0, 0xDC, 1, 0x04, vec![], Some(0)).to_bytes(),
            StatusWord::WRONG_LENGTH,
        ),
        // Truncated, one byte too many, an account over the maximum.
        (
            Command::new(0, 0xDC, 1, 0x04, enc[..enc.len() - 1].to_vec(), None).to_bytes(),
            StatusWord::BAD_DATA,
        ),
        (
            Command::new(0, 0xDC, 1, 0x04, [&enc[..], &[0]].concat(), None).to_bytes(),
            StatusWord::BAD_DATA,
        ),
        (
            Command::new(
                0,
                0xDC,
                1,
                0x04,
                [&enc[..8], &[200], &[0; 208][..]].concat(),
                None,
            )
            .to_bytes(),
            StatusWord::BAD_DATA,
        ),
        // An update naming provider B sent to A's record.
        (
            commands::update_record(
                1,
                &RecordUpdate::sign(&key_a(&c), c.state.card_id, PROVIDER_B, 1, vec![]).unwrap(),
            ),
            StatusWord::BAD_DATA,
        ),
        // P1 = 0, unknown P2s, the cardholder file is not updatable.
        (
            Command::new(0, 0xB2, 0, 0x0C, vec![], Some(0)).to_bytes(),
            StatusWord::WRONG_P1P2,
        ),
        (
            Command::new(0, 0xB2, 1, 0x1C, vec![], Some(0)).to_bytes(),
            StatusWord::WRONG_P1P2,
        ),
        (
            Command::new(0, 0xDC, 1, 0x14, enc.clone(), None).to_bytes(),
            StatusWord::WRONG_P1P2,
        ),
        (
            Command::new(0, 0xDC, 0, 0x04, enc.clone(), None).to_bytes(),
            StatusWord::WRONG_P1P2,
        ),
        // Records that do not exist.
        (commands::read_record(3), SW_RECORD_NOT_FOUND),
        (commands::read_record(255), SW_RECORD_NOT_FOUND),
        (
            Command::new(0, 0xB2, 2, 0x14, vec![], Some(0)).to_bytes(),
            SW_RECORD_NOT_FOUND,
        ),
        (commands::update_record(3, &u), SW_RECORD_NOT_FOUND),
    ];
    let before = c.state.clone();
    for (apdu, sw) in cases {
        assert_eq!(send(&mut c, &apdu).sw, sw, "{}", hex::encode(&apdu));
    }
    assert_eq!(c.state, before);
    // The card still works.
    ok(&mut c, &commands::update_record(1, &u));
}

#[test]
fn personalisation_refuses_what_the_card_could_not_keep() {
    let plain = card_with(0, 1).state;
    assert_eq!(
        plain.clone().with_provider(&spec_a(), &master_a()),
        Err(RecordError::NoPin),
        "a PIN record on a card without a PIN could never be read"
    );
    let one = plain.clone().with_provider(&spec_b(), &master_b()).unwrap();
    assert_eq!(
        one.with_provider(&spec_b(), &master_a()),
        Err(RecordError::DuplicateProvider(PROVIDER_B))
    );
    let long_name = ProviderSpec {
        name: "n".repeat(MAX_NAME + 1),
        ..spec_b()
    };
    assert_eq!(
        plain.clone().with_provider(&long_name, &master_b()),
        Err(RecordError::NameTooLong)
    );
    let long_account = ProviderSpec {
        account: vec![0; MAX_ACCOUNT + 1],
        ..spec_b()
    };
    assert_eq!(
        plain.clone().with_provider(&long_account, &master_b()),
        Err(RecordError::AccountTooLong)
    );
    let mut full = plain;
    for id in 0..MAX_RECORDS as u32 {
        full = full
            .with_provider(
                &ProviderSpec {
                    provider_id: id,
                    ..spec_b()
                },
                &master_b(),
            )
            .unwrap();
    }
    assert_eq!(
        full.with_provider(&spec_b(), &master_b()),
        Err(RecordError::TooManyRecords)
    );
    assert!(RecordUpdate::sign(&DesKey::new([1; 16]), 1, 1, 1, vec![0; MAX_ACCOUNT + 1]).is_err());
}

#[test]
fn records_survive_the_card_files_postcard_round_trip() {
    let c = card();
    let bytes = postcard::to_allocvec(&c.state).unwrap();
    let back: CardState = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, c.state);
    // The key is masked in Debug.
    let shown = format!("{:?}", c.state.providers[0]);
    assert!(shown.contains("key: DesKey(..)"), "{shown}");
}

/// An ISO READ RECORD or UPDATE RECORD APDU of any shape: any P1/P2, any data, any Le.
fn record_apdu() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(vec![0xB2u8, 0xDC]),
        any::<u8>(),
        prop::sample::select(vec![0x04u8, 0x0C, 0x14, 0x00, 0xFF]),
        prop::option::of(any::<u8>()),
        prop::collection::vec(any::<u8>(), 0..200),
        any::<bool>(),
    )
        .prop_map(|(ins, p1, p2, le, data, raw)| {
            let apdu = Command::new(0x00, ins, p1, p2, data.clone(), le).to_bytes();
            if raw {
                [&[0x00, ins, p1, p2][..], &data].concat()
            } else {
                apdu
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn any_record_apdus_never_panic_nor_move_value(
        verify in any::<bool>(),
        apdus in prop::collection::vec(record_apdu(), 1..12),
    ) {
        let mut c = card();
        select(&mut c);
        if verify {
            ok(&mut c, &commands::verify_pin(PIN).unwrap());
        }
        let before = c.state.clone();
        for apdu in &apdus {
            let out = c.process(apdu);
            let r = Response::parse(&out.response).expect("always a status word");
            prop_assert!(r.sw.is_ok() || r.data.is_empty());
        }
        prop_assert_eq!(c.state.balance, before.balance);
        prop_assert_eq!(c.state.points, before.points);
        prop_assert_eq!(c.state.bad_key_count, before.bad_key_count);
        prop_assert_eq!(&c.state.log, &before.log);
        // Random bytes carry no provider MAC: the records are as personalised.
        prop_assert_eq!(&c.state.providers, &before.providers);
    }

    #[test]
    fn signed_updates_round_trip_and_apply(counter in 1u32.., account in prop::collection::vec(any::<u8>(), 0..=MAX_ACCOUNT)) {
        let mut c = card();
        select(&mut c);
        let u = update(&key_a(&c), &c, counter, &account);
        prop_assert_eq!(RecordUpdate::decode(&u.encode()), Ok(u.clone()));
        ok(&mut c, &commands::update_record(1, &u));
        prop_assert_eq!(&c.state.providers[0].account, &account);
        ok(&mut c, &commands::verify_pin(PIN).unwrap());
        let info = ProviderRecordInfo::decode(&ok(&mut c, &commands::read_record(1))).unwrap();
        prop_assert_eq!(info, c.state.providers[0].info());
    }

    #[test]
    fn record_layouts_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = ProviderRecordInfo::decode(&bytes);
        let _ = Cardholder::decode(&bytes);
        let _ = RecordUpdate::decode(&bytes);
    }
}
