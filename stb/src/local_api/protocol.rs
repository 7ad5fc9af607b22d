//! One JSON object per line each way.
//!
//! Request: `{"op":"pay","merchant_id":"cable","item_id":"ppv-7"}` (an optional `"id"` is
//! echoed back). Response: `{"id":..,"result":"paid","transaction_id":..,"released":true,
//! "entitlement":..,"new_balance":750}`, or `"result"` `"cancelled"`, `"failed"` (with
//! `"reason"`), `"pending"` (value may have moved; the box settles it by itself), or
//! `"error"` for a bad request.

use serde::{Deserialize, Serialize};

use stb_flow::purchase::Outcome;

use crate::daemon::show;

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum Request {
    Pay {
        #[serde(default)]
        id: Option<serde_json::Value>,
        merchant_id: String,
        item_id: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "lowercase")]
pub enum Response {
    Paid {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<serde_json::Value>,
        transaction_id: String,
        released: bool,
        entitlement: Option<String>,
        new_balance: Option<u64>,
    },
    Cancelled {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<serde_json::Value>,
        transaction_id: Option<String>,
        reason: String,
    },
    Failed {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<serde_json::Value>,
        transaction_id: Option<String>,
        reason: String,
    },
    Pending {
        #[serde(skip_serializing_if = "Option::is_none", default)]
        id: Option<serde_json::Value>,
        transaction_id: String,
        reason: String,
    },
    Error {
        reason: String,
    },
}

impl Response {
    /// The answer for a purchase's outcome; the reasons are the TV's sentences
    /// ([`show`]).
    pub fn from_outcome(id: Option<serde_json::Value>, o: Outcome) -> Self {
        match o {
            Outcome::Paid {
                transaction_id,
                receipt,
            } => Self::Paid {
                id,
                transaction_id,
                released: receipt.released,
                entitlement: receipt.entitlement,
                new_balance: receipt.new_balance,
            },
            Outcome::Cancelled {
                transaction_id,
                reason,
            } => Self::Cancelled {
                id,
                transaction_id,
                reason: show::cancel_reason(reason).into(),
            },
            Outcome::Failed {
                transaction_id,
                refusal,
            } => Self::Failed {
                id,
                transaction_id,
                reason: show::refusal_reason(&refusal),
            },
            Outcome::InDoubt {
                transaction_id,
                doubt,
            } => Self::Pending {
                id,
                transaction_id,
                reason: show::doubt_reason(&doubt),
            },
        }
    }
}

/// Parses one request line; the error says what is wrong, for the `error` response.
pub fn parse(line: &str) -> Result<Request, String> {
    let r: Request = serde_json::from_str(line).map_err(|e| format!("bad request: {e}"))?;
    let Request::Pay {
        merchant_id,
        item_id,
        ..
    } = &r;
    for (k, v) in [("merchant_id", merchant_id), ("item_id", item_id)] {
        if v.is_empty() || v.len() > 128 || v.chars().any(char::is_control) {
            return Err(format!(
                "bad request: {k} must be 1 to 128 printable characters"
            ));
        }
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_or_say_why_not() {
        let r = parse(r#"{"op":"pay","merchant_id":"cable","item_id":"ppv-7","id":3}"#).unwrap();
        assert!(matches!(r, Request::Pay { ref item_id, .. } if item_id == "ppv-7"));
        assert!(parse("not json").unwrap_err().contains("bad request"));
        assert!(parse(r#"{"op":"load"}"#).is_err());
        assert!(
            parse(r#"{"op":"pay","merchant_id":"","item_id":"x"}"#)
                .unwrap_err()
                .contains("merchant_id")
        );
        assert!(parse(r#"{"op":"pay","merchant_id":"m","item_id":"x","extra":1}"#).is_err());
    }
}
