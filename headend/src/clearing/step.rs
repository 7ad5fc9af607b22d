//! The steps the clearing role journals (the `steps` table's `step` column), named once;
//! the text is what is on disk and what operators read. No decision reads it back.

use std::borrow::Cow;

/// One step journaled by clearing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClearingStep {
    /// "batch received" (keyed `<payment server>/<batch>`)
    BatchReceived,
    /// "load advice received" (keyed by the load's transaction id)
    AdviceReceived,
    /// "settled" (keyed by the report id)
    Settled,
}

impl crate::journal::StepText for ClearingStep {
    fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(match self {
            ClearingStep::BatchReceived => "batch received",
            ClearingStep::AdviceReceived => "load advice received",
            ClearingStep::Settled => "settled",
        })
    }
}
