//! The steps the payment server (001 FIG. 4–7: draw request, debit command, debit response, confirmation, reversal; collection) journals (the `steps` table's `step` column), named once. The text
//! ([`PayStep::text`]) is what is on disk and what operators and tests read; it never changes
//! for a variant. No decision reads it back: decisions read the records.

use std::borrow::Cow;

/// One step journaled by the payment server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayStep {
    /// "draw request received"
    DrawRequestReceived,
    /// "debit command issued"
    DebitCommandIssued,
    /// "debit response received"
    DebitResponseReceived,
    /// "confirmed"
    Confirmed,
    /// "reversing"
    Reversing,
    /// "reversed"
    Reversed,
    /// "cancel refused"
    CancelRefused,
    /// "collected"
    Collected,
    /// "batch closed" (keyed by the batch id)
    BatchClosed,
    /// "batch acknowledged" (keyed by the batch id)
    BatchAcknowledged,
    /// "refund authorized" (keyed by the sale's transaction id, as the refund steps below)
    RefundAuthorized,
    /// "refund requested"
    RefundRequested,
    /// "credit command issued"
    CreditIssued,
    /// "credited"
    Credited,
    /// "credit reversed on the card's proof"
    CreditReversed,
    /// "refund collected"
    RefundCollected,
}

impl PayStep {
    /// The step's text as journaled.
    pub const fn as_str(self) -> &'static str {
        match self {
            PayStep::DrawRequestReceived => "draw request received",
            PayStep::DebitCommandIssued => "debit command issued",
            PayStep::DebitResponseReceived => "debit response received",
            PayStep::Confirmed => "confirmed",
            PayStep::Reversing => "reversing",
            PayStep::Reversed => "reversed",
            PayStep::CancelRefused => "cancel refused",
            PayStep::Collected => "collected",
            PayStep::BatchClosed => "batch closed",
            PayStep::BatchAcknowledged => "batch acknowledged",
            PayStep::RefundAuthorized => "refund authorized",
            PayStep::RefundRequested => "refund requested",
            PayStep::CreditIssued => "credit command issued",
            PayStep::Credited => "credited",
            PayStep::CreditReversed => "credit reversed on the card's proof",
            PayStep::RefundCollected => "refund collected",
        }
    }
}

impl crate::journal::StepText for PayStep {
    fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.as_str())
    }
}
