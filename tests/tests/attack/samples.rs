//! One well-formed instance of every `proto::messages::Message` variant, built from the
//! attacker's own card where a message carries card data. [`name`] matches every variant
//! without a wildcard, so a new message kind does not compile until the suite covers it.

use proto::crypto::DesKey;
use proto::messages::*;
use proto::money::{Currency, Money};
use proto::purse::*;

/// The card data an attacker has: its own card's answers.
pub struct CardData {
    pub purse: PurseInfo,
    pub init: PurchaseInit,
    pub load_init: LoadInit,
}

/// A message kind's name (exhaustive on purpose).
pub fn name(m: &Message) -> &'static str {
    match m {
        Message::OfferRequest { .. } => "OfferRequest",
        Message::Offer(_) => "Offer",
        Message::DrawRequest(_) => "DrawRequest",
        Message::DebitCommand(_) => "DebitCommand",
        Message::DebitResponse(_) => "DebitResponse",
        Message::Confirmation(_) => "Confirmation",
        Message::Receipt(_) => "Receipt",
        Message::LoadRequest(_) => "LoadRequest",
        Message::LoadCommand(_) => "LoadCommand",
        Message::LoadResponse(_) => "LoadResponse",
        Message::LoadConfirmation(_) => "LoadConfirmation",
        Message::Error(_) => "Error",
        Message::CatalogRequest => "CatalogRequest",
        Message::Catalog(_) => "Catalog",
        Message::Cancel(_) => "Cancel",
        Message::RoutedOfferRequest { .. } => "RoutedOfferRequest",
        Message::LoadOfferRequest(_) => "LoadOfferRequest",
        Message::LoadOffer(_) => "LoadOffer",
        Message::RoutedLoadOfferRequest { .. } => "RoutedLoadOfferRequest",
        Message::HoldRequest(_) => "HoldRequest",
        Message::HoldPlaced(_) => "HoldPlaced",
        Message::HoldSettled(_) => "HoldSettled",
        Message::LoadRefused(_) => "LoadRefused",
        Message::RoutedLoadRequest { .. } => "RoutedLoadRequest",
        Message::LoadExpire { .. } => "LoadExpire",
        Message::ReversalsSince { .. } => "ReversalsSince",
        Message::Reversals(_) => "Reversals",
        Message::Reversed(_) => "Reversed",
        Message::Ack { .. } => "Ack",
        Message::RoutedDebitCommand { .. } => "RoutedDebitCommand",
        Message::CollectionBatch(_) => "CollectionBatch",
        Message::BatchAck { .. } => "BatchAck",
        Message::LoadAdvice(_) => "LoadAdvice",
        Message::HotlistRequest { .. } => "HotlistRequest",
        Message::HotlistUpdate(_) => "HotlistUpdate",
        Message::RefundsDueRequest { .. } => "RefundsDueRequest",
        Message::RefundsDue(_) => "RefundsDue",
        Message::RefundRequest(_) => "RefundRequest",
        Message::RefundCommand(_) => "RefundCommand",
        Message::RefundResponse(_) => "RefundResponse",
        Message::RefundProof(_) => "RefundProof",
        Message::TransferInvite(_) => "TransferInvite",
        Message::TransferJoin { .. } => "TransferJoin",
        Message::TransferTerms(_) => "TransferTerms",
        Message::TransferPost(_) => "TransferPost",
        Message::TransferFetch { .. } => "TransferFetch",
        Message::TransferPacket(_) => "TransferPacket",
    }
}

/// The number of message kinds [`every`] returns (one per variant).
pub const KINDS: usize = 47;

fn eur(minor: u64) -> Money {
    Money::new(minor, Currency::EUR)
}

/// One of every message, naming `box_id`'s account/voucher/transactions where it must name
/// one: `txid` for transaction ids, `victim_box` where a routed message names a box.
pub fn every(card: &CardData, txid: &str, victim_box: &str, voucher: &str) -> Vec<Message> {
    let mac = [0x5Au8; 8];
    let invite = TransferInvite {
        transfer_id: txid.into(),
        amount: eur(1),
        payee_card: card.purse.card_id,
        payee_epochs: [1, 2, 3, 4],
        payee_challenge: mac,
    };
    let offer = Offer {
        transaction_id: txid.into(),
        merchant_id: "CABLE".into(),
        item_id: "ppv-1001".into(),
        title: "Championship Final (live)".into(),
        amount: eur(1),
        payment_route: "payment".into(),
        status_route: "merchant".into(),
        embodiment: Embodiment::SecurityCard,
        tsk: Some(DesKey::new([7; 16])),
        etsk: Some(vec![1; 24]),
    };
    let debit_command = DebitCommand {
        security_card_id: 0x5A00_0000,
        security_card_txn: 1,
        card_id: card.init.card_id,
        atc: card.init.atc,
        amount: 1,
        currency: Currency::EUR,
        date: super::boxes::today(),
        security_card_signature: mac,
    };
    let debit_response = DebitResponse {
        card_id: card.init.card_id,
        atc: card.init.atc,
        amount: 1,
        currency: Currency::EUR,
        new_balance: card.purse.balance - 1,
        security_card_id: 0x5A00_0000,
        security_card_txn: 1,
        card_signature: mac,
    };
    let load_command = LoadCommand {
        hsm_id: 0x4853_4D01,
        card_id: card.purse.card_id,
        atc: card.load_init.atc,
        amount: 20_000,
        currency: Currency::EUR,
        passbook_through: 0,
        s2: mac,
    };
    let load_response = LoadResponse {
        card_id: card.purse.card_id,
        atc: card.load_init.atc,
        amount: 20_000,
        currency: Currency::EUR,
        result: 0,
        new_balance: card.purse.balance + 20_000,
        s3: mac,
    };
    let voucher_source = LoadSource::voucher(voucher);
    let load_request = LoadRequest {
        transaction_id: txid.into(),
        source: voucher_source.clone(),
        amount: eur(20_000),
        init: card.load_init.clone(),
        sealed_pin: None,
        passbook: Vec::new(),
    };
    let hold = HoldPlaced {
        transaction_id: txid.into(),
        amount: eur(20_000),
        card_id: card.purse.card_id,
        mac,
    };
    let confirmation = LoadConfirmation {
        transaction_id: txid.into(),
        loaded: true,
        new_balance: Some(card.purse.balance + 20_000),
        sealed: vec![0; 32],
    };
    let notice = ReversalNotice {
        seq: 1,
        transaction_id: txid.into(),
        merchant_id: "CABLE".into(),
        reason: "attacker".into(),
    };
    let load_offer = LoadOffer {
        transaction_id: txid.into(),
        source: voucher_source.clone(),
        max_amount: eur(20_000),
        limited_by: "card".into(),
        timestamp: card.load_init.timestamp,
        date: super::boxes::today(),
        pin_required: false,
    };
    let load_offer_request = LoadOfferRequest {
        source: voucher_source.clone(),
        card: card.purse.clone(),
    };
    let all = vec![
        Message::OfferRequest {
            merchant_id: "CABLE".into(),
            item_id: "ppv-1001".into(),
        },
        Message::Offer(offer),
        Message::DrawRequest(DrawRequest {
            transaction_id: txid.into(),
            merchant_id: "CABLE".into(),
            etsk: None,
            body: Protected::Clear(DrawBody {
                amount: eur(1),
                atr: vec![0x3B, 0x00],
                init: card.init.clone(),
            }),
        }),
        Message::DebitCommand(DebitCommandMsg {
            transaction_id: txid.into(),
            body: Protected::Clear(DebitCommandBody {
                command: debit_command.clone(),
            }),
        }),
        Message::RoutedDebitCommand {
            command: DebitCommandMsg {
                transaction_id: txid.into(),
                body: Protected::Clear(DebitCommandBody {
                    command: debit_command.clone(),
                }),
            },
            gateway: GatewayCopy::default(),
        },
        Message::DebitResponse(DebitResponseMsg {
            transaction_id: txid.into(),
            body: Protected::Clear(debit_response.clone()),
        }),
        Message::Confirmation(Confirmation {
            transaction_id: txid.into(),
            result_c: Protected::Clear(DebitResultC {
                transaction_id: txid.into(),
                success: true,
                amount: eur(1),
                new_balance: 0,
            }),
            result_m: vec![0; 32],
            debit_response: Some(debit_response.clone()),
        }),
        Message::Receipt(Receipt {
            transaction_id: txid.into(),
            released: true,
            text: "released".into(),
            entitlement: Some("forged".into()),
            new_balance: None,
        }),
        Message::LoadRequest(load_request.clone()),
        Message::LoadCommand(LoadCommandMsg {
            transaction_id: txid.into(),
            command: load_command,
            key_update: None,
            unblock: None,
            app_key: None,
        }),
        Message::LoadResponse(LoadResponseMsg {
            transaction_id: txid.into(),
            response: Some(load_response),
            zero_value: None,
        }),
        Message::LoadConfirmation(confirmation.clone()),
        Message::error(ErrorCode::Internal, "attacker", Some(txid)),
        Message::CatalogRequest,
        Message::Catalog(vec![CatalogItem {
            merchant_id: "CABLE".into(),
            item_id: "free".into(),
            title: "free".into(),
            kind: "ppv".into(),
            detail: String::new(),
            amount: eur(0),
        }]),
        Message::Cancel(CancelMsg {
            transaction_id: txid.into(),
            reason: CancelReason::Viewer,
            proof: Some(card.init.clone()),
        }),
        Message::RoutedOfferRequest {
            box_id: victim_box.into(),
            merchant_id: "CABLE".into(),
            item_id: "ppv-1001".into(),
        },
        Message::LoadOfferRequest(load_offer_request.clone()),
        Message::LoadOffer(load_offer),
        Message::RoutedLoadOfferRequest {
            box_id: victim_box.into(),
            request: load_offer_request,
        },
        Message::HoldRequest(HoldRequest {
            box_id: victim_box.into(),
            transaction_id: txid.into(),
            source: voucher_source,
            amount: eur(20_000),
            card_id: card.purse.card_id,
            card_balance: card.purse.balance,
            card_max_balance: card.purse.max_balance,
            sealed_pin: None,
        }),
        Message::HoldPlaced(hold.clone()),
        Message::HoldSettled(HoldSettled {
            transaction_id: txid.into(),
            captured: false,
            amount: eur(20_000),
        }),
        Message::LoadRefused(LoadRefusal {
            error: ErrorMsg {
                code: ErrorCode::Internal,
                reason: "attacker".into(),
                transaction_id: Some(txid.into()),
            },
            confirmation,
        }),
        Message::RoutedLoadRequest {
            request: load_request,
            hold,
        },
        Message::LoadExpire {
            transaction_id: txid.into(),
        },
        Message::ReversalsSince { after: 0 },
        Message::Reversals(vec![notice.clone()]),
        Message::Reversed(notice),
        Message::Ack {
            transaction_id: txid.into(),
        },
        Message::CollectionBatch(Box::new(proto::clearing::CollectionBatch::build(
            "payment",
            1,
            "2026-11-30",
            vec![proto::clearing::BatchRecord {
                transaction_id: txid.into(),
                merchant_id: "CABLE".into(),
                security_card_id: 0x5A00_0000,
                security_card_txn: 1,
                card_id: card.init.card_id,
                amount: eur(1),
            }],
        ))),
        Message::BatchAck {
            payment_server: "payment".into(),
            batch: 1,
        },
        Message::LoadAdvice(proto::clearing::LoadAdvice {
            funder: "bank".into(),
            transaction_id: txid.into(),
            account: "ACC-1".into(),
            card_id: card.init.card_id,
            amount: eur(1),
            captured_on: "2026-11-30".into(),
            unload: false,
        }),
        Message::HotlistRequest { have: 0 },
        // An empty list "signed" by nobody: unblocks every card if anything took it.
        Message::HotlistUpdate(Some(proto::hotlist::SignedHotlist {
            version: u64::MAX,
            card_ids: Vec::new(),
            signature: vec![0; 64],
        })),
        Message::RefundsDueRequest {
            card_id: card.purse.card_id,
        },
        Message::RefundsDue(vec![RefundDue {
            transaction_id: txid.into(),
            merchant_id: "CABLE".into(),
            amount: eur(1),
            issued: None,
        }]),
        Message::RefundRequest(RefundRequest {
            transaction_id: txid.into(),
            atr: vec![0x3B, 0x00],
            init: card.init.clone(),
        }),
        Message::RefundCommand(RefundCommandMsg {
            transaction_id: txid.into(),
            command: CreditCommand(debit_command),
        }),
        Message::RefundResponse(RefundResponseMsg {
            transaction_id: txid.into(),
            response: CreditResponse(debit_response),
        }),
        Message::RefundProof(RefundProofMsg {
            transaction_id: txid.into(),
            proof: card.init.clone(),
        }),
        Message::TransferInvite(invite.clone()),
        Message::TransferJoin {
            code: "00000000".into(),
        },
        Message::TransferTerms(TransferTerms {
            invite,
            code: "00000000".into(),
        }),
        Message::TransferPost(TransferPacket {
            transfer_id: txid.into(),
            step: TransferStep::P1,
            data: vec![0x5A; 40],
        }),
        Message::TransferFetch {
            transfer_id: txid.into(),
            step: TransferStep::P1,
        },
        Message::TransferPacket(TransferPacket {
            transfer_id: txid.into(),
            step: TransferStep::P23,
            data: vec![0x5A; 40],
        }),
    ];
    assert_eq!(all.len(), KINDS);
    let names: std::collections::BTreeSet<_> = all.iter().map(name).collect();
    assert_eq!(names.len(), KINDS, "one of each kind");
    // The product's own names for them (refusals, logs) tell every kind apart too.
    let kinds: std::collections::BTreeSet<_> = all.iter().map(Message::kind).collect();
    assert_eq!(kinds.len(), KINDS, "Message::kind names each kind once");
    all
}
