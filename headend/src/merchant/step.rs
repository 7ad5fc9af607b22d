//! The steps the merchant (offers, confirmations, releases, reversals) journals (the `steps` table's `step` column), named once. The text
//! ([`MerchantStep::text`]) is what is on disk and what operators and tests read; it never changes
//! for a variant. No decision reads it back: decisions read the records.

use std::borrow::Cow;

/// One step journaled by the merchant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MerchantStep {
    /// "offer made"
    OfferMade,
    /// "confirmation refused"
    ConfirmationRefused,
    /// "goods released"
    GoodsReleased,
    /// "reversed by the payment server"
    ReversedByThePaymentServer,
    /// "offer expired"
    OfferExpired,
    /// "declined: nothing released"
    Declined,
}

impl MerchantStep {
    /// The step's text as journaled.
    pub const fn as_str(self) -> &'static str {
        match self {
            MerchantStep::OfferMade => "offer made",
            MerchantStep::ConfirmationRefused => "confirmation refused",
            MerchantStep::GoodsReleased => "goods released",
            MerchantStep::ReversedByThePaymentServer => "reversed by the payment server",
            MerchantStep::OfferExpired => "offer expired",
            MerchantStep::Declined => "declined: nothing released",
        }
    }
}

impl crate::journal::StepText for MerchantStep {
    fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.as_str())
    }
}
