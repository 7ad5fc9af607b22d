//! Property-based fuzzing: the APDU decoder (through the card), the frame decoder and the
//! message decoder take arbitrary bytes without panicking and answer with an error.

mod common;

use proptest::prelude::*;
use proto::apdu::{Command, Response, StatusWord};
use proto::card::commands;
use proto::frame::{DEFAULT_MAX_FRAME, FrameDecoder};
use proto::messages::Message;
use proto::purse::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2_000))]

    #[test]
    fn card_answers_any_bytes_with_a_status_word(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        let mut card = common::card_with(1_000, 10_000);
        let before = card.state.balance;
        let out = proto::apdu::CardApplication::process_apdu(&mut card, &bytes);
        let r = Response::parse(&out).expect("always a status word");
        // Nothing an unauthenticated stranger sends moves value.
        prop_assert_eq!(card.state.balance, before);
        if Command::parse(&bytes).is_err() {
            prop_assert_eq!(r.sw, StatusWord::WRONG_LENGTH);
        }
    }

    #[test]
    fn selected_card_answers_any_purse_command_body(ins in prop::sample::select(vec![0xB0u8, 0x50, 0x54, 0x52, 0xB2]),
                                                    p1 in 0u8..4, body in proptest::collection::vec(any::<u8>(), 1..200)) {
        let mut card = common::card_with(1_000, 10_000);
        common::select(&mut card);
        let _ = common::send(&mut card, &commands::init_purchase(common::TODAY));
        let cmd = Command::new(0x80, ins, p1, 0, body, None).to_bytes();
        let r = common::send(&mut card, &cmd);
        prop_assert_eq!(card.state.balance, 1_000);
        prop_assert!(r.sw != StatusWord::OK || ins == 0xB0 || ins == 0x50 || ins == 0xB2);
    }

    #[test]
    fn layouts_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..120)) {
        let _ = PurseInfo::decode(&bytes);
        let _ = PurchaseInit::decode(&bytes);
        let _ = DebitCommand::decode(&bytes);
        let _ = DebitResponse::decode(&bytes);
        let _ = LoadInit::decode(&bytes);
        let _ = LoadCommand::decode(&bytes);
        let _ = LoadResponse::decode(&bytes);
        let _ = LogRecord::decode(&bytes);
        let _ = proto::card::PinRule::from_fci(&bytes);
        let _ = proto::transfer::Greeting::decode(&bytes);
        let _ = proto::transfer::ValuePacket::decode(&bytes);
        let _ = proto::transfer::Settlement::decode(&bytes);
        let _ = proto::transfer::TransferStatus::decode(&bytes);
        let _ = proto::transfer::read_parts::<2>(&bytes);
    }

    #[test]
    fn fci_pin_rules_round_trip_or_are_none(threshold in any::<u64>(), tries in 0u8..=15, cut in 0usize..40) {
        let mut c = proto::card::PurseCard::new(
            proto::card::CardState::personalise(
                &proto::card::CardSpec::demo(1, proto::money::Currency::EUR, 0, 1),
                &proto::purse::IssuerKeys {
                    key_version: 1,
                    purchase_master: proto::crypto::DesKey::new([1; 16]),
                    load_master: proto::crypto::DesKey::new([2; 16]),
                },
            )
            .with_pin("1234", threshold)
            .unwrap(),
            1,
        );
        c.state.pin.as_mut().unwrap().tries_left = tries;
        let r = c.process(&proto::card::commands::select()).response;
        let fci = &r[..r.len() - 2];
        prop_assert_eq!(
            proto::card::PinRule::from_fci(fci),
            Some(proto::card::PinRule { threshold, tries_left: tries })
        );
        // Cut short anywhere: no rule, no panic.
        if cut < fci.len() {
            prop_assert_eq!(proto::card::PinRule::from_fci(&fci[..cut]), None);
        }
    }

    #[test]
    fn frame_and_message_decoders_never_panic(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..64), 0..6)) {
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        for c in &chunks {
            d.push(c);
            while let Ok(Some(p)) = d.next_frame() {
                let _ = Message::from_payload(&p);
            }
        }
        for c in &chunks {
            let _ = Message::from_payload(c);
            let _ = Message::from_frame(c, 128);
        }
    }
}
