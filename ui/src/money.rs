//! Money for display: integer minor units, ISO 4217 numeric code and exponent.
//!
//! This file owns the `Money`/`Currency` value types the daemon hands to the UI and their text
//! formatting. There are no floats anywhere: 1250 minor units with exponent 2 is "12.50".

use std::fmt;

/// An ISO 4217 currency: numeric code and exponent (number of minor-unit digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Currency {
    /// ISO 4217 numeric code, e.g. 978 for the euro.
    pub code: u16,
    /// Minor-unit digits, e.g. 2 for the euro, 0 for the yen.
    pub exponent: u8,
}

impl Currency {
    pub const EUR: Currency = Currency {
        code: 978,
        exponent: 2,
    };

    /// ISO 4217 `XXX` (999), the authentication draw's currency (002 FIG. 16): only zero,
    /// which is no charge.
    pub const AUTHENTICATION: Currency = Currency {
        code: 999,
        exponent: 0,
    };

    pub const fn new(code: u16, exponent: u8) -> Self {
        Currency { code, exponent }
    }

    /// The alphabetic code for the common numeric codes; `None` for the rest.
    ///
    /// Alphabetic codes rather than symbols: "€" and "£" are missing from some Linux console
    /// fonts, and "EUR" reads as well from the sofa.
    pub fn alpha(&self) -> Option<&'static str> {
        Some(match self.code {
            // Loyalty points (002): code 000, which ISO 4217 gives no currency.
            0 => "PTS",
            36 => "AUD",
            124 => "CAD",
            156 => "CNY",
            203 => "CZK",
            208 => "DKK",
            348 => "HUF",
            392 => "JPY",
            578 => "NOK",
            643 => "RUB",
            752 => "SEK",
            756 => "CHF",
            826 => "GBP",
            840 => "USD",
            946 => "RON",
            949 => "TRY",
            978 => "EUR",
            985 => "PLN",
            999 => "XXX",
            _ => return None,
        })
    }

    /// The label shown after an amount: "EUR", or "#123" for a code we have no name for.
    pub fn label(&self) -> String {
        match self.alpha() {
            Some(a) => a.to_string(),
            None => format!("#{:03}", self.code),
        }
    }
}

/// An amount in minor units of a currency.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Money {
    pub minor: i64,
    pub currency: Currency,
}

impl Money {
    pub const fn new(minor: i64, currency: Currency) -> Self {
        Money { minor, currency }
    }

    /// The number alone, "12.50" (no currency), for the big-digit rendering.
    pub fn amount_text(&self) -> String {
        format_minor(self.minor, self.currency.exponent)
    }
}

/// Formats minor units with `exponent` decimals: (1250, 2) → "12.50", (-5, 2) → "-0.05".
///
/// Integer arithmetic only. An absurd exponent (more digits than an i64 has) still formats
/// rather than panicking: the fraction is simply zero-padded.
pub fn format_minor(minor: i64, exponent: u8) -> String {
    let sign = if minor < 0 { "-" } else { "" };
    // unsigned_abs: i64::MIN has no positive i64 counterpart.
    let digits = minor.unsigned_abs().to_string();
    let exp = usize::from(exponent);
    if exp == 0 {
        return format!("{sign}{digits}");
    }
    let padded = if digits.len() <= exp {
        format!("{}{}", "0".repeat(exp + 1 - digits.len()), digits)
    } else {
        digits
    };
    let (int, frac) = padded.split_at(padded.len() - exp);
    format!("{sign}{int}.{frac}")
}

impl fmt::Display for Money {
    /// "12.50 EUR"; an authentication's zero is "no charge".
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.currency == Currency::AUTHENTICATION && self.minor == 0 {
            return f.write_str(crate::strings::NO_CHARGE);
        }
        write!(f, "{} {}", self.amount_text(), self.currency.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_euro_cents() {
        assert_eq!(Money::new(1250, Currency::EUR).to_string(), "12.50 EUR");
        assert_eq!(Money::new(5, Currency::EUR).to_string(), "0.05 EUR");
        assert_eq!(Money::new(0, Currency::EUR).to_string(), "0.00 EUR");
        assert_eq!(Money::new(-1999, Currency::EUR).to_string(), "-19.99 EUR");
    }

    #[test]
    fn formats_other_exponents_and_codes() {
        assert_eq!(
            Money::new(1500, Currency::new(392, 0)).to_string(),
            "1500 JPY"
        );
        assert_eq!(
            Money::new(1234, Currency::new(48, 3)).to_string(),
            "1.234 #048"
        );
        assert_eq!(format_minor(7, 30).len(), 32); // "0." + 30 digits, no panic
    }

    #[test]
    fn an_authentication_is_no_charge() {
        assert_eq!(
            Money::new(0, Currency::AUTHENTICATION).to_string(),
            "no charge"
        );
        // Value in that currency is not an authentication: shown as it is.
        assert_eq!(Money::new(5, Currency::AUTHENTICATION).to_string(), "5 XXX");
    }

    #[test]
    fn extreme_values_do_not_panic() {
        assert_eq!(format_minor(i64::MIN, 2), "-92233720368547758.08");
        assert_eq!(format_minor(i64::MAX, 0), "9223372036854775807");
    }
}
