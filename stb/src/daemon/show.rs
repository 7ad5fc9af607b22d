//! The one place the daemon turns the flows' vocabulary ([`stb_flow::show`]) into TV
//! updates ([`UiUpdate`]) and into the reasons apps on the box get (the local API). The
//! wording is the TV crate's ([`ui::strings`]); this module only picks the sentence and fills
//! in the facts.

use proto::apdu::StatusWord;
use stb_flow::show::{
    CardAnswer, Doubt, Flow, Problem, Progress, Receipted, Refusal, Request, Show,
};
use ui::UiUpdate;
use ui::model::{ErrorKind, ProgressStep, TxId, TxKind, UiError};
use ui::strings as s;

/// proto's money → the UI's money (the UI crate has no proto dependency). Minor units
/// beyond `i64` (never on a real card) show as `i64::MAX`.
#[must_use]
pub fn ui_money(m: proto::money::Money) -> ui::Money {
    ui::Money::new(
        i64::try_from(m.minor).unwrap_or(i64::MAX),
        ui::Currency::new(m.currency.code, m.currency.exponent),
    )
}

#[must_use]
pub fn ui_date(d: proto::purse::Date) -> ui::model::Date {
    ui::model::Date::new(d.year, d.month, d.day)
}

/// A flow's [`Show`] as the TV update that shows it.
#[must_use]
pub fn update(show: Show) -> UiUpdate {
    match show {
        Show::Progress(p) => UiUpdate::Progress(progress(p)),
        Show::Offer(o) => UiUpdate::Offer(ui::model::Offer {
            txid: TxId(o.transaction_id),
            item: o.item,
            merchant: o.merchant,
            price: ui_money(o.price),
            balance: ui_money(o.balance),
            balance_after: ui_money(o.balance_after),
            timeout_secs: 0,
        }),
        Show::OfferWithdrawn { transaction_id } => UiUpdate::OfferWithdrawn(TxId(transaction_id)),
        Show::LoadMax(max) => UiUpdate::LoadMax(ui_money(max)),
        Show::PinEntry {
            min_len,
            max_len,
            attempts_left,
        } => UiUpdate::PinRequest(ui::model::PinRequest {
            min_len,
            max_len,
            attempts_left,
        }),
        Show::Receipt(r) => {
            let (kind, item, merchant) = match r.what {
                Receipted::Purchase { item, merchant } => (TxKind::Purchase, item, merchant),
                Receipted::Bank { account } => (
                    TxKind::Load,
                    s::load_source(ui::model::LoadSource::Bank).to_string(),
                    account,
                ),
                Receipted::Unload { account } => (
                    TxKind::Unload,
                    s::load_source(ui::model::LoadSource::Unload).to_string(),
                    account,
                ),
                Receipted::Refund { merchant } => {
                    (TxKind::Refund, s::REFUND_ITEM.to_string(), merchant)
                }
                Receipted::Voucher { code_tail } => (
                    TxKind::Load,
                    s::load_source(ui::model::LoadSource::Voucher).to_string(),
                    s::voucher_masked(&code_tail),
                ),
            };
            UiUpdate::Receipt(ui::model::Receipt {
                txid: TxId(r.transaction_id),
                kind,
                item,
                merchant,
                amount: ui_money(r.amount),
                balance_after: ui_money(r.balance_after),
                date: ui_date(r.date),
            })
        }
        Show::NotReleased { text } => error(ErrorKind::Other, s::why_not_released(&text)),
        Show::NotLoaded => error(ErrorKind::Other, s::WHY_NOT_LOADED.into()),
        Show::Refused(r) => UiUpdate::Error(refused(&r)),
        Show::InDoubt(d) => {
            let why = doubt_reason(&d);
            let text = match d.flow() {
                Flow::Purchase => s::in_doubt_purchase(&why),
                // A refund is never in doubt on the box: it stays due at the head end.
                Flow::Load | Flow::Refund => s::in_doubt_load(&why),
            };
            error(ErrorKind::Pending, text)
        }
    }
}

fn error(kind: ErrorKind, detail: String) -> UiUpdate {
    UiUpdate::Error(UiError {
        kind,
        detail: Some(detail),
    })
}

fn progress(p: Progress) -> ProgressStep {
    match p {
        Progress::ReadingCard => ProgressStep::ReadingCard,
        Progress::ContactingServer => ProgressStep::ContactingServer,
        Progress::DebitingCard => ProgressStep::DebitingCard,
        Progress::LoadingCard => ProgressStep::LoadingCard,
        Progress::Confirming => ProgressStep::Confirming,
    }
}

/// The TV's error kind (its title and advice) for a kind of trouble.
#[must_use]
pub fn error_kind(p: Problem) -> ErrorKind {
    match p {
        Problem::NoCard => ErrorKind::NoCard,
        Problem::CardBlocked => ErrorKind::CardBlocked,
        Problem::CardHotlisted => ErrorKind::CardHotlisted,
        Problem::KeyRetired => ErrorKind::KeyRetired,
        Problem::CardExpired => ErrorKind::CardExpired,
        Problem::OfferExpired => ErrorKind::OfferExpired,
        Problem::InsufficientValue => ErrorKind::InsufficientValue,
        Problem::HeadEndUnreachable => ErrorKind::HeadEndUnreachable,
        Problem::Timeout => ErrorKind::Timeout,
        Problem::AmountMismatch => ErrorKind::AmountMismatch,
        Problem::WrongPin => ErrorKind::WrongPin,
        Problem::PinBlocked => ErrorKind::PinBlocked,
        Problem::Other => ErrorKind::Other,
    }
}

/// The TV's error for a refusal: its kind and the sentence in small print.
#[must_use]
pub fn refused(r: &Refusal) -> UiError {
    UiError {
        kind: error_kind(r.problem()),
        detail: Some(refusal_reason(r)),
    }
}

fn request(r: Request) -> &'static str {
    match r {
        Request::Offer => s::REQ_OFFER,
        Request::Draw => s::REQ_DRAW,
        Request::LoadOffer => s::REQ_LOAD_OFFER,
    }
}

fn money(m: proto::money::Money) -> ui::Money {
    ui_money(m)
}

/// The sentence for a refusal: the TV's small print, and the local API's `reason`.
#[must_use]
pub fn refusal_reason(r: &Refusal) -> String {
    match r {
        // The shell's words for what it saw.
        Refusal::Unreachable { error } => error.to_string(),
        Refusal::CardUnreadable { error } => error.to_string(),
        Refusal::OfferRefused { reason, .. } => reason.clone(),
        Refusal::OutOfTurn { to, answer } => s::why_out_of_turn(request(*to), answer),
        Refusal::UnusableOffer => s::WHY_UNUSABLE_OFFER.into(),
        Refusal::DrawRefused { code, reason } => s::why_draw_refused(
            reason,
            matches!(
                code,
                // The gateway's own pace and open-draw caps are the head end's, too.
                proto::messages::ErrorCode::Internal
                    | proto::messages::ErrorCode::Busy
                    | proto::messages::ErrorCode::Timeout
                    | proto::messages::ErrorCode::RateLimited
            ),
        ),
        Refusal::DebitCommandUnreadable { error } => s::why_debit_command_unreadable(error),
        Refusal::AmountMismatch { asked, offered } => {
            s::why_amount_mismatch(&money(*asked), &money(*offered))
        }
        Refusal::DebitCommandMismatch => s::WHY_DEBIT_COMMAND_MISMATCH.into(),
        Refusal::LoadOfferRefused { reason, .. } => s::why_load_offer_refused(reason),
        Refusal::UnusableLoadOffer => s::WHY_UNUSABLE_LOAD_OFFER.into(),
        Refusal::AccountCurrency { card, account } => {
            s::why_account_currency(&card.alpha(), &account.alpha())
        }
        Refusal::NothingToLoad { limited_by } => s::why_nothing_to_load(limited_by),
        Refusal::LoadRefused { reason, .. } => s::why_load_refused(reason),
        Refusal::CardRemoved => s::WHY_CARD_REMOVED.into(),
        Refusal::CardRefused { sw } => match *sw {
            StatusWord::BLOCKED => s::WHY_CARD_BLOCKED.into(),
            StatusWord::EXPIRED => s::WHY_CARD_HAS_EXPIRED.into(),
            StatusWord::OVER_MAX_BALANCE => s::WHY_OVER_MAX_BALANCE.into(),
            StatusWord::WRONG_CURRENCY => s::WHY_CARD_WRONG_CURRENCY.into(),
            sw => s::why_card_refused(&sw.to_string()),
        },
        Refusal::DebitRefused { sw } => s::why_debit_refused(&sw.to_string()),
        Refusal::NoStatusWord => s::WHY_NO_STATUS_WORD.into(),
        Refusal::Malformed(a) => s::why_card_answer_malformed(match a {
            CardAnswer::Initialize => s::CMD_INITIALIZE,
            CardAnswer::ReadPurse => s::CMD_READ_PURSE,
            CardAnswer::InitializeForLoad => s::CMD_INITIALIZE_FOR_LOAD,
            CardAnswer::ReadLog => s::CMD_READ_LOG,
        }),
        Refusal::CardBlocked => s::WHY_CARD_BLOCKED.into(),
        Refusal::PriceCurrency { card, price } => {
            s::why_price_currency(&card.alpha(), &price.alpha())
        }
        Refusal::CardExpired { year, month } => s::why_card_expired(*year, *month),
        Refusal::InsufficientValue { balance, price } => {
            s::why_insufficient_value(&money(*balance), &money(*price))
        }
        Refusal::CardSwapped => s::WHY_CARD_SWAPPED.into(),
        Refusal::LoadInitMismatch => s::WHY_LOAD_INIT_MISMATCH.into(),
        Refusal::AmountOutOfRange { got, max } => s::why_amount_out_of_range(
            &money(*max),
            &money(proto::money::Money::new(got.unsigned_abs(), max.currency)),
        ),
        Refusal::NoPinKey => s::WHY_NO_PIN_KEY.into(),
        Refusal::BadPin { min, max } => s::why_bad_pin(*min, *max),
        Refusal::WrongPin { tries_left } => s::why_wrong_pin(*tries_left),
        Refusal::PinBlocked => s::WHY_PIN_BLOCKED.into(),
        Refusal::Busy => s::WHY_BUSY.into(),
        Refusal::NoViewer => s::WHY_NO_VIEWER.into(),
        Refusal::RefundNotNow { why } => s::why_refund_not_now(why),
        Refusal::NotRecorded { flow, .. } => match flow {
            Flow::Purchase => s::WHY_PURCHASE_NOT_RECORDED.into(),
            Flow::Load | Flow::Refund => s::WHY_LOAD_NOT_RECORDED.into(),
        },
        Refusal::EarlierInDoubt {
            transaction_id,
            flow,
        } => s::why_earlier_in_doubt(transaction_id, *flow == Flow::Load),
        Refusal::JournalUnreadable { error } => s::why_journal_unreadable(&error.to_string()),
    }
}

/// Why a transaction is in doubt, without the "settled automatically" the TV adds: the
/// local API's `reason` for a pending payment.
#[must_use]
pub fn doubt_reason(d: &Doubt) -> String {
    match d {
        Doubt::NoDebitCommand { error } => s::doubt_no_debit_command(&error.to_string()),
        Doubt::CardLostDuringDebit { error } => s::doubt_card_lost_during_debit(&error.to_string()),
        Doubt::DebitResponseMalformed => s::DOUBT_DEBIT_RESPONSE_MALFORMED.into(),
        Doubt::DebitWithoutStatusWord => s::DOUBT_DEBIT_WITHOUT_STATUS_WORD.into(),
        Doubt::ConfirmationLost { error } => s::doubt_confirmation_lost(&error.to_string()),
        Doubt::PaidButRefused { reason, .. } => s::doubt_paid_but_refused(reason),
        Doubt::PaidButOutOfTurn { answer } => s::doubt_paid_but_out_of_turn(answer),
        Doubt::CardLostDuringLoad { error } => s::doubt_card_lost_during_load(&error.to_string()),
        Doubt::LoadAnswerMalformed => s::DOUBT_LOAD_ANSWER_MALFORMED.into(),
        Doubt::LoadWithoutStatusWord => s::DOUBT_LOAD_WITHOUT_STATUS_WORD.into(),
        Doubt::NoZeroValueProof { why } => s::doubt_no_zero_value_proof(&refusal_reason(why)),
        Doubt::ZeroValueMalformed => s::DOUBT_ZERO_VALUE_MALFORMED.into(),
        Doubt::LoadConfirmationLost { error } => {
            s::doubt_load_confirmation_lost(&error.to_string())
        }
        Doubt::LoadConfirmationRefused { reason, .. } => s::doubt_load_confirmation_refused(reason),
        Doubt::LoadConfirmationOutOfTurn { answer } => {
            s::doubt_load_confirmation_out_of_turn(answer)
        }
        Doubt::LoadNotRecorded { .. } => s::WHY_LOAD_NOT_RECORDED.into(),
    }
}

/// Why a purchase was cancelled, for the local API.
#[must_use]
pub fn cancel_reason(r: proto::messages::CancelReason) -> &'static str {
    match r {
        proto::messages::CancelReason::Timeout => s::CANCELLED_TIMED_OUT,
        _ => s::CANCELLED_BY_VIEWER,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::money::{Currency, Money};

    #[test]
    fn refusals_read_as_before_the_vocabulary_moved() {
        let eur = |m| Money::new(m, Currency::EUR);
        let e = refused(&Refusal::InsufficientValue {
            balance: eur(100),
            price: eur(250),
        });
        assert_eq!(e.kind, ErrorKind::InsufficientValue);
        assert_eq!(
            e.detail.as_deref(),
            Some("the card holds 1.00 EUR but the price is 2.50 EUR")
        );
        assert_eq!(
            refusal_reason(&Refusal::AmountOutOfRange {
                got: -5,
                max: eur(5_000)
            }),
            "the amount must be above zero and at most 50.00 EUR; got 0.05 EUR"
        );
        assert_eq!(
            refusal_reason(&Refusal::CardRefused {
                sw: StatusWord::OVER_MAX_BALANCE
            }),
            "that amount would take the card over its maximum balance"
        );
        assert!(
            refusal_reason(&Refusal::EarlierInDoubt {
                transaction_id: "tx-9".into(),
                flow: Flow::Purchase,
            })
            .contains("(tx-9) is still being settled")
        );
    }

    #[test]
    fn a_head_end_failure_is_not_blamed_on_the_payment_server() {
        use proto::messages::ErrorCode;
        let refusal = |code| Refusal::DrawRefused {
            code,
            reason: "journal unavailable; the step was not recorded here: retry it".into(),
        };
        assert_eq!(
            refusal_reason(&refusal(ErrorCode::Internal)),
            "the head end could not take it now: journal unavailable; the step was not recorded here: retry it"
        );
        assert!(refusal_reason(&refusal(ErrorCode::Busy)).starts_with("the head end could not"));
        assert!(
            refusal_reason(&refusal(ErrorCode::RateLimited)).starts_with("the head end could not")
        );
        assert!(
            refusal_reason(&refusal(ErrorCode::InsufficientFunds))
                .starts_with("the payment server refused: ")
        );
    }

    #[test]
    fn in_doubt_says_it_is_settled_without_the_viewer() {
        let UiUpdate::Error(e) = update(Show::InDoubt(Doubt::ConfirmationLost {
            error: stb_flow::NetworkFailure::Failed("reset".into()),
        })) else {
            panic!()
        };
        // Not "something went wrong, try again": trying again is what the viewer must not do.
        assert_eq!(e.kind, ErrorKind::Pending);
        let (title, _, advice) = s::error_texts(ErrorKind::Pending);
        assert!(!title.contains("wrong") && advice.contains("Do not try again"));
        let detail = e.detail.unwrap();
        assert!(detail.ends_with("you will not pay twice"));
        assert!(
            detail.contains("(request to the head end failed: reset)"),
            "the transport's words, as the gateway said them: {detail}"
        );
        let UiUpdate::Error(e) = update(Show::InDoubt(Doubt::LoadAnswerMalformed)) else {
            panic!()
        };
        assert!(e.detail.unwrap().contains("never paid twice"));
    }

    #[test]
    fn a_voucher_receipt_shows_only_the_code_s_tail() {
        let UiUpdate::Receipt(r) = update(Show::Receipt(stb_flow::show::ReceiptShown {
            transaction_id: "ld-1".into(),
            what: Receipted::Voucher {
                code_tail: "0001".into(),
            },
            amount: Money::new(500, Currency::EUR),
            balance_after: Money::new(1_500, Currency::EUR),
            date: proto::purse::Date::new(2026, 11, 21),
        })) else {
            panic!()
        };
        assert_eq!(
            (r.item.as_str(), r.merchant.as_str()),
            ("Voucher", "••••0001")
        );
        assert_eq!(r.kind, TxKind::Load);
    }
}
