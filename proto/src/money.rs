//! Money: integer minor units with an ISO 4217 numeric currency and exponent. Never floats.
//!
//! Arithmetic is overflow-checked and refuses to mix currencies; every operation that can
//! fail returns a [`MoneyError`] instead of wrapping or panicking.

use std::fmt;

use serde::{Deserialize, Serialize};

/// An ISO 4217 currency: numeric code and exponent (digits after the decimal point).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Currency {
    /// ISO 4217 numeric code, e.g. 978 for EUR, 840 for USD.
    pub code: u16,
    /// Minor-unit exponent, e.g. 2 for EUR (cents), 0 for JPY.
    pub exponent: u8,
}

impl Currency {
    pub const EUR: Self = Self::new(978, 2);
    pub const USD: Self = Self::new(840, 2);
    pub const GBP: Self = Self::new(826, 2);
    pub const JPY: Self = Self::new(392, 0);
    /// ISO 4217 `XXX` (999: "no currency is involved"), the specially assigned currency of
    /// an authentication draw (002 FIG. 16, [0161]): a "purchase" of zero that moves the
    /// card's counter and not its balance, answered by "authentication OK" and making no
    /// payment record. Only the amount zero exists in it ([`Money::is_authentication`]).
    pub const AUTHENTICATION: Self = Self::new(999, 0);
    /// Loyalty points (002 [0160]–[0164], "frequent flyer miles"): the card's second purse.
    /// Code 000, which ISO 4217 assigns to no currency, exponent 0 (whole points). Points
    /// are redeemed by a draw in this currency and loaded like money; they never mix with
    /// money ([`Money`] refuses to).
    pub const POINTS: Self = Self::new(0, 0);

    pub const fn new(code: u16, exponent: u8) -> Self {
        Self { code, exponent }
    }

    /// The alphabetic code for the currencies we name, else the numeric one.
    pub fn alpha(self) -> String {
        match self.code {
            978 => "EUR".into(),
            840 => "USD".into(),
            826 => "GBP".into(),
            392 => "JPY".into(),
            756 => "CHF".into(),
            124 => "CAD".into(),
            999 => "XXX".into(),
            0 => "PTS".into(),
            other => format!("{other:03}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("currency mismatch: {} vs {}", .left.alpha(), .right.alpha())]
    CurrencyMismatch { left: Currency, right: Currency },
    #[error("arithmetic overflow")]
    Overflow,
    #[error("result would be negative")]
    Negative,
}

/// An amount of money: minor units in a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Money {
    pub minor: u64,
    pub currency: Currency,
}

impl Money {
    pub const fn new(minor: u64, currency: Currency) -> Self {
        Self { minor, currency }
    }

    pub const fn zero(currency: Currency) -> Self {
        Self { minor: 0, currency }
    }

    /// The authentication "amount" of 002 FIG. 16: zero in [`Currency::AUTHENTICATION`].
    pub const fn authentication() -> Self {
        Self::zero(Currency::AUTHENTICATION)
    }

    /// Whether this is an authentication draw's amount (zero in
    /// [`Currency::AUTHENTICATION`]). A non-zero amount in that currency is not: every
    /// layer refuses it.
    pub fn is_authentication(&self) -> bool {
        self.currency == Currency::AUTHENTICATION && self.minor == 0
    }

    fn same(self, other: Self) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch {
                left: self.currency,
                right: other.currency,
            })
        }
    }

    pub fn checked_add(self, other: Self) -> Result<Self, MoneyError> {
        self.same(other)?;
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Ok(Self::new(minor, self.currency))
    }

    pub fn checked_sub(self, other: Self) -> Result<Self, MoneyError> {
        self.same(other)?;
        let minor = self
            .minor
            .checked_sub(other.minor)
            .ok_or(MoneyError::Negative)?;
        Ok(Self::new(minor, self.currency))
    }
}

impl fmt::Display for Money {
    /// `12.50 EUR`: integer formatting only, so no rounding ever happens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let exp = u32::from(self.currency.exponent);
        match 10u64.checked_pow(exp) {
            Some(scale) if exp > 0 => write!(
                f,
                "{}.{:0width$} {}",
                self.minor / scale,
                self.minor % scale,
                self.currency.alpha(),
                width = exp as usize
            ),
            _ => write!(f, "{} {}", self.minor, self.currency.alpha()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_is_checked() {
        let a = Money::new(1250, Currency::EUR);
        let b = Money::new(250, Currency::EUR);
        assert_eq!(a.checked_sub(b).unwrap().minor, 1000);
        assert_eq!(b.checked_sub(a), Err(MoneyError::Negative));
        assert_eq!(
            Money::new(u64::MAX, Currency::EUR).checked_add(b),
            Err(MoneyError::Overflow)
        );
        assert!(matches!(
            a.checked_add(Money::new(1, Currency::USD)),
            Err(MoneyError::CurrencyMismatch { .. })
        ));
    }

    #[test]
    fn displays_without_floats() {
        assert_eq!(Money::new(1205, Currency::EUR).to_string(), "12.05 EUR");
        assert_eq!(Money::new(500, Currency::JPY).to_string(), "500 JPY");
        assert_eq!(Money::new(7, Currency::new(48, 3)).to_string(), "0.007 048");
    }
}
