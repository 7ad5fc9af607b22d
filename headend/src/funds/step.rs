//! The steps the funders, bank and pre-funded voucher accounts (accounts, holds, PINs) journals (the `steps` table's `step` column), named once. The text
//! ([`FundsStep::text`]) is what is on disk and what operators and tests read; it never changes
//! for a variant. No decision reads it back: decisions read the records.

use std::borrow::Cow;

/// One step journaled by the funders, bank and pre-funded voucher accounts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FundsStep {
    /// "account opened"
    AccountOpened,
    /// "unlocked by the operator"
    UnlockedByTheOperator,
    /// "load offer made"
    LoadOfferMade,
    /// "hold requested"
    HoldRequested,
    /// "hold placed"
    HoldPlaced,
    /// "wrong PIN: account locked"
    WrongPINAccountLocked,
    /// "wrong PIN"
    WrongPIN,
    /// "hold captured: moved to the issuer float"
    HoldCapturedMovedToTheIssuerFloat,
    /// "hold released"
    HoldReleased,
    /// "unload hold placed: reserved out of the issuer float"
    UnloadHoldPlaced,
    /// "unload captured: credited to the account"
    UnloadCreditedToTheAccount,
    /// "unload released: back to the issuer float"
    UnloadReleased,
}

impl FundsStep {
    /// The step's text as journaled.
    pub const fn as_str(self) -> &'static str {
        match self {
            FundsStep::AccountOpened => "account opened",
            FundsStep::UnlockedByTheOperator => "unlocked by the operator",
            FundsStep::LoadOfferMade => "load offer made",
            FundsStep::HoldRequested => "hold requested",
            FundsStep::HoldPlaced => "hold placed",
            FundsStep::WrongPINAccountLocked => "wrong PIN: account locked",
            FundsStep::WrongPIN => "wrong PIN",
            FundsStep::HoldCapturedMovedToTheIssuerFloat => {
                "hold captured: moved to the issuer float"
            }
            FundsStep::HoldReleased => "hold released",
            FundsStep::UnloadHoldPlaced => "unload hold placed: reserved out of the issuer float",
            FundsStep::UnloadCreditedToTheAccount => "unload captured: credited to the account",
            FundsStep::UnloadReleased => "unload released: back to the issuer float",
        }
    }
}

impl crate::journal::StepText for FundsStep {
    fn text(&self) -> Cow<'static, str> {
        Cow::Borrowed(self.as_str())
    }
}
