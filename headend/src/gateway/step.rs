//! The steps the gateway journals (the `steps` table's `step` column), named once. The text
//! ([`Step::text`], also the [`std::fmt::Display`] form) is what is on disk and what
//! operators and tests read; it never changes for a variant. The log is for people: no
//! decision reads it back — decisions read the transaction's record ([`super::GwTxn`],
//! [`super::load::GwLoad`]).

use std::borrow::Cow;

/// One step of a purchase or a load at the gateway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    // The purchase (001 FIG. 4–7).
    /// The merchant's offer was checked and relayed to the box.
    OfferRelayed,
    /// The draw request is about to go to the payment server (state `Drawn`).
    DrawRequestRelayed,
    /// The payment server's debit command went to the box.
    DebitCommandRelayed,
    /// FIG. 6: the card's signature differs from the expected one.
    ComparedMismatch,
    /// FIG. 6: the card's signature is the expected one.
    ComparedMatch,
    /// FIG. 7: the debit response goes to the merchant for its comparison.
    QueuedForMerchant,
    /// FIG. 4/5: the debit response is about to go to the payment server.
    ToPaymentServer,
    /// FIG. 4/5: the payment server refused the debit response for good.
    PaymentServerRefused,
    /// FIG. 4/5: the payment server's confirmation was accepted.
    ConfirmationReceived,
    /// The merchant's receipt went to the box.
    ReceiptRelayed,
    /// The merchant refused the confirmation for good.
    MerchantRefused,
    /// The last release of a confirmed purchase was refused: back to `Drawn`.
    NoReleasePending,
    /// Cancelled before any draw request: nothing to reverse anywhere.
    CancelledBeforeDraw,
    /// The box's cancel is about to go to the payment server.
    CancelRelayed,
    /// FIG. 6/7: the payment server answered the debit response for good.
    PaymentServerNotified,
    /// The payment server's reversal feed reversed the purchase.
    Reversed,
    /// A reversal was passed on to the merchant.
    ReversalPassedOn,
    /// The offer was not drawn within its lifetime.
    OfferExpired,

    // The load (001 [0117]–[0135], [0141]–[0157]).
    /// The funder's load offer was relayed to the box.
    LoadOfferRelayed,
    /// The first load request was accepted (the hold is asked next).
    LoadRequestReceived,
    /// The funder placed the hold.
    HoldPlaced,
    /// The funder refused the hold for good; the text carries why (an error code or a
    /// message kind).
    HoldRefused(String),
    /// The load server's load command went to the box.
    LoadCommandRelayed,
    /// The load server refused the load request (its sealed no-load follows).
    LoadRequestRefused,
    /// The load server's confirmation was journaled for the funder.
    LoadConfirmationReceived,
    /// The funder captured the hold.
    HoldCaptured,
    /// The funder released the hold.
    HoldReleased,
    /// The funder never placed a hold: nothing to settle.
    NothingHeld,
    /// The box's load response is about to go to the load server.
    LoadResponseRelayed,
    /// The load offer was not requested within its lifetime.
    LoadOfferExpired,
    /// Past the hold lifetime, the load server never authorised the load.
    HoldLifetimeNeverAuthorised,
    /// Past the hold lifetime with a load command issued.
    HoldLifetimeAwaitingOperator,
}

impl Step {
    /// The text journaled for the step.
    pub fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            Step::OfferRelayed => "offer relayed",
            Step::DrawRequestRelayed => "draw request relayed",
            Step::DebitCommandRelayed => "debit command relayed",
            Step::ComparedMismatch => "gateway compared: mismatch",
            Step::ComparedMatch => "gateway compared: match",
            Step::QueuedForMerchant => "debit response queued for the merchant's comparison",
            Step::ToPaymentServer => "debit response to the payment server",
            Step::PaymentServerRefused => "payment server refused the debit response",
            Step::ConfirmationReceived => "confirmation received",
            Step::ReceiptRelayed => "receipt relayed",
            Step::MerchantRefused => "merchant refused the confirmation",
            Step::NoReleasePending => "no release pending",
            Step::CancelledBeforeDraw => "cancelled before the draw",
            Step::CancelRelayed => "cancel relayed",
            Step::PaymentServerNotified => "payment server notified",
            Step::Reversed => "reversed by the payment server",
            Step::ReversalPassedOn => "reversal passed to the merchant",
            Step::OfferExpired => "offer expired",
            Step::LoadOfferRelayed => "load offer relayed",
            Step::LoadRequestReceived => "load request received",
            Step::HoldPlaced => "hold placed",
            Step::HoldRefused(why) => return Cow::Owned(format!("hold refused: {why}")),
            Step::LoadCommandRelayed => "load command relayed",
            Step::LoadRequestRefused => "load request refused",
            Step::LoadConfirmationReceived => "load confirmation received",
            Step::HoldCaptured => "hold captured",
            Step::HoldReleased => "hold released",
            Step::NothingHeld => "nothing held",
            Step::LoadResponseRelayed => "load response relayed",
            Step::LoadOfferExpired => "load offer expired",
            Step::HoldLifetimeNeverAuthorised => {
                "hold lifetime over: the load server never authorised the load"
            }
            Step::HoldLifetimeAwaitingOperator => {
                "hold lifetime over with a load command issued: awaiting the box's proof or an operator"
            }
        })
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text())
    }
}

impl crate::journal::StepText for Step {
    fn text(&self) -> Cow<'static, str> {
        Step::text(self)
    }
}

#[cfg(test)]
mod tests {
    use super::Step;

    /// Operators, tests and `sim` read these texts from the journal: a renamed variant keeps
    /// its text.
    #[test]
    fn steps_keep_their_journaled_text() {
        for (step, text) in [
            (Step::OfferRelayed, "offer relayed"),
            (Step::DrawRequestRelayed, "draw request relayed"),
            (Step::DebitCommandRelayed, "debit command relayed"),
            (Step::ComparedMatch, "gateway compared: match"),
            (Step::ReceiptRelayed, "receipt relayed"),
            (Step::CancelRelayed, "cancel relayed"),
            (
                Step::HoldRefused("WrongPin".into()),
                "hold refused: WrongPin",
            ),
            (Step::LoadResponseRelayed, "load response relayed"),
        ] {
            assert_eq!(step.text(), text);
            assert_eq!(step.to_string(), text);
        }
    }
}
