//! The steps the load server (001 [0117]–[0135]: load requests, load commands, load responses, confirmations) journals (the `steps` table's `step` column), named once. The text
//! ([`LoadStep::text`]) is what is on disk and what operators and tests read; it never changes
//! for a variant. No decision reads it back: decisions read the records.

use std::borrow::Cow;

/// One step journaled by the load server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadStep {
    /// "load request refused"
    LoadRequestRefused,
    /// "load request received"
    LoadRequestReceived,
    /// "S1 verified: load command issued"
    S1VerifiedLoadCommandIssued,
    /// "load response received"
    LoadResponseReceived,
    /// "negative result: zero-value S1 awaited"
    NegativeResultZeroValueS1Awaited,
    /// "confirmation sealed"
    ConfirmationSealed,
}

impl LoadStep {
    /// The step's text as journaled.
    pub const fn as_str(self) -> &'static str {
        match self {
            LoadStep::LoadRequestRefused => "load request refused",
            LoadStep::LoadRequestReceived => "load request received",
            LoadStep::S1VerifiedLoadCommandIssued => "S1 verified: load command issued",
            LoadStep::LoadResponseReceived => "load response received",
            LoadStep::NegativeResultZeroValueS1Awaited => "negative result: zero-value S1 awaited",
            LoadStep::ConfirmationSealed => "confirmation sealed",
        }
    }
}

impl crate::journal::StepText for LoadStep {
    fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.as_str())
    }
}
