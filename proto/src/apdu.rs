//! ISO 7816-4 command and response APDUs (short form) and the purse's status words.
//!
//! The decoder takes any byte slice and never panics: a malformed command is a typed
//! [`ApduError`], which the card turns into `6700` (wrong length).

use std::fmt;

/// A status word (SW1 SW2) as returned at the end of every response APDU.
#[derive(Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct StatusWord(pub u16);

impl StatusWord {
    pub const OK: Self = Self(0x9000);
    /// The command's length fields do not match its data.
    pub const WRONG_LENGTH: Self = Self(0x6700);
    /// The card is blocked (bad-key counter exhausted, or blocked by the issuer).
    pub const BLOCKED: Self = Self(0x6983);
    /// A signature (MAC) from the security card or HSM did not verify.
    pub const BAD_SIGNATURE: Self = Self(0x6982);
    /// The command is valid but not now: wrong state or sequence (e.g. DEBIT without INITIALIZE).
    pub const WRONG_STATE: Self = Self(0x6985);
    /// The command data is malformed.
    pub const BAD_DATA: Self = Self(0x6A80);
    /// SELECT named an application the card does not have.
    pub const APP_NOT_FOUND: Self = Self(0x6A82);
    /// Wrong P1/P2.
    pub const WRONG_P1P2: Self = Self(0x6A86);
    /// The instruction is not one the purse knows.
    pub const UNKNOWN_INSTRUCTION: Self = Self(0x6D00);
    /// The class byte is not the purse's.
    pub const CLASS_NOT_SUPPORTED: Self = Self(0x6E00);
    /// Purse-specific (ISO 7816-4 leaves 9xxx to the application).
    pub const INSUFFICIENT_VALUE: Self = Self(0x9401);
    pub const OVER_MAX_BALANCE: Self = Self(0x9402);
    pub const WRONG_CURRENCY: Self = Self(0x9403);
    pub const EXPIRED: Self = Self(0x9404);
    /// The command carries a transaction number the card has already used (a replay).
    pub const REPLAY: Self = Self(0x9405);
    /// An amount of zero where value must move, or one outside the purse's range.
    pub const BAD_AMOUNT: Self = Self(0x9406);
    /// A DEBIT above the card's PIN threshold without the PIN verified first (seed 004,
    /// MIN_TRANS/MAX_TRANS).
    pub const PIN_REQUIRED: Self = Self(0x9407);
    /// A card-to-card transfer with a card sharing fewer than two application keys, or by
    /// a card holding none (seed 004; [`crate::transfer::common_epochs`]).
    pub const NO_COMMON_KEYS: Self = Self(0x9408);
    /// A transfer while an earlier one of this card is not settled
    /// ([`crate::transfer`]: settling).
    pub const TRANSFER_UNSETTLED: Self = Self(0x9409);
    /// VERIFY on a card without a PIN (ISO 7816-4: referenced data not found).
    pub const NO_PIN: Self = Self(0x6A88);

    /// VERIFY's refusal of a wrong PIN: `63Cx`, x the tries left (ISO 7816-4); `63C0`:
    /// none left, the PIN is blocked.
    pub fn wrong_pin(tries_left: u8) -> Self {
        Self(0x63C0 | u16::from(tries_left.min(0x0F)))
    }

    /// The tries left a `63Cx` answer to VERIFY names.
    pub fn pin_tries_left(self) -> Option<u8> {
        (self.0 & 0xFFF0 == 0x63C0).then_some((self.0 & 0x0F) as u8)
    }

    pub fn sw1(self) -> u8 {
        (self.0 >> 8) as u8
    }
    pub fn sw2(self) -> u8 {
        self.0 as u8
    }
    pub fn is_ok(self) -> bool {
        self == Self::OK
    }

    /// What the status word means, for logs and the viewer's error screen.
    pub fn meaning(self) -> &'static str {
        match self {
            Self::OK => "success",
            Self::WRONG_LENGTH => "wrong length",
            Self::BLOCKED => "card blocked",
            Self::BAD_SIGNATURE => "signature did not verify",
            Self::WRONG_STATE => "wrong state or sequence",
            Self::BAD_DATA => "malformed command data",
            Self::APP_NOT_FOUND => "purse application not found",
            Self::WRONG_P1P2 => "wrong P1/P2",
            Self::UNKNOWN_INSTRUCTION => "unknown instruction",
            Self::CLASS_NOT_SUPPORTED => "class not supported",
            Self::INSUFFICIENT_VALUE => "insufficient value on the card",
            Self::OVER_MAX_BALANCE => "load would exceed the card's maximum balance",
            Self::WRONG_CURRENCY => "wrong currency",
            Self::EXPIRED => "card expired",
            Self::REPLAY => "transaction number already used (replay)",
            Self::BAD_AMOUNT => "amount out of range",
            Self::PIN_REQUIRED => "PIN required for this amount",
            Self::NO_COMMON_KEYS => "the cards share fewer than two application keys",
            Self::TRANSFER_UNSETTLED => "an earlier transfer of this card is not settled",
            Self::NO_PIN => "the card has no PIN",
            Self(0x63C0) => "PIN blocked: no tries left",
            _ if self.pin_tries_left().is_some() => "wrong PIN",
            _ if self.sw1() == 0x61 => "more data available (GET RESPONSE)",
            _ if self.sw1() == 0x6C => "wrong Le; resend with the length in SW2",
            _ => "unknown status",
        }
    }
}

impl fmt::Debug for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04X} ({})", self.0, self.meaning())
    }
}

impl fmt::Display for StatusWord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Why a byte string is not a well-formed short command APDU.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApduError {
    #[error("APDU shorter than the 4-byte header ({0} bytes)")]
    TooShort(usize),
    #[error("Lc says {lc} data bytes but {available} follow")]
    LcMismatch { lc: usize, available: usize },
    #[error("extended-length APDUs are not supported")]
    Extended,
    #[error("response shorter than the 2-byte status word")]
    NoStatusWord,
}

/// A short command APDU: CLA INS P1 P2 [Lc data] [Le].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Command {
    pub cla: u8,
    pub ins: u8,
    pub p1: u8,
    pub p2: u8,
    pub data: Vec<u8>,
    /// Expected response length; `Some(0)` stands for 256 as in ISO 7816-4.
    pub le: Option<u8>,
}

impl Command {
    pub fn new(cla: u8, ins: u8, p1: u8, p2: u8, data: Vec<u8>, le: Option<u8>) -> Self {
        Self {
            cla,
            ins,
            p1,
            p2,
            data,
            le,
        }
    }

    /// Parses cases 1–4 of ISO 7816-3 short APDUs.
    pub fn parse(bytes: &[u8]) -> Result<Self, ApduError> {
        let (header, body) = match bytes.split_first_chunk::<4>() {
            Some((h, b)) => (h, b),
            None => return Err(ApduError::TooShort(bytes.len())),
        };
        let [cla, ins, p1, p2] = *header;
        let (data, le) = match body.len() {
            0 => (Vec::new(), None),
            1 => (Vec::new(), Some(body[0])),
            _ => {
                let lc = body[0] as usize;
                if lc == 0 {
                    return Err(ApduError::Extended);
                }
                let rest = &body[1..];
                if rest.len() == lc {
                    (rest.to_vec(), None)
                } else if rest.len() == lc + 1 {
                    (rest[..lc].to_vec(), Some(rest[lc]))
                } else {
                    return Err(ApduError::LcMismatch {
                        lc,
                        available: rest.len(),
                    });
                }
            }
        };
        Ok(Self {
            cla,
            ins,
            p1,
            p2,
            data,
            le,
        })
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![self.cla, self.ins, self.p1, self.p2];
        if !self.data.is_empty() {
            out.push(self.data.len() as u8);
            out.extend_from_slice(&self.data);
        }
        if let Some(le) = self.le {
            out.push(le);
        }
        out
    }
}

/// A response APDU: data followed by SW1 SW2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub data: Vec<u8>,
    pub sw: StatusWord,
}

impl Response {
    pub fn ok(data: Vec<u8>) -> Self {
        Self {
            data,
            sw: StatusWord::OK,
        }
    }
    pub fn status(sw: StatusWord) -> Self {
        Self {
            data: Vec::new(),
            sw,
        }
    }
    pub fn parse(bytes: &[u8]) -> Result<Self, ApduError> {
        match bytes.split_last_chunk::<2>() {
            Some((data, sw)) => Ok(Self {
                data: data.to_vec(),
                sw: StatusWord(u16::from_be_bytes(*sw)),
            }),
            None => Err(ApduError::NoStatusWord),
        }
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.data.clone();
        out.extend_from_slice(&self.sw.0.to_be_bytes());
        out
    }
}

/// Anything that answers APDUs like a card: the purse card state machine, a file-backed
/// virtual card, a security card. Reader emulators (vpcd, the serial pty) drive this.
pub trait CardApplication: Send {
    /// The answer to reset this card gives on power-up.
    fn atr(&self) -> Vec<u8>;
    /// Resets the card's volatile state (selected application, half-done transaction), as a
    /// warm or cold reset does.
    fn reset(&mut self);
    /// Processes one command APDU and returns the response APDU bytes (data + SW1 SW2).
    /// Never panics, whatever the bytes.
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_four_cases() {
        assert_eq!(Command::parse(&[0, 0xB2, 1, 2]).unwrap().le, None);
        assert_eq!(
            Command::parse(&[0, 0xB2, 1, 2, 0x10]).unwrap().le,
            Some(0x10)
        );
        let c3 = Command::parse(&[0, 0xA4, 4, 0, 2, 0xAA, 0xBB]).unwrap();
        assert_eq!((c3.data.as_slice(), c3.le), (&[0xAA, 0xBB][..], None));
        let c4 = Command::parse(&[0, 0xA4, 4, 0, 2, 0xAA, 0xBB, 0]).unwrap();
        assert_eq!((c4.data.as_slice(), c4.le), (&[0xAA, 0xBB][..], Some(0)));
        assert_eq!(Command::parse(&c4.to_bytes()).unwrap(), c4);
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(Command::parse(&[0, 1, 2]), Err(ApduError::TooShort(3)));
        assert_eq!(
            Command::parse(&[0, 1, 2, 3, 5, 1]),
            Err(ApduError::LcMismatch {
                lc: 5,
                available: 1
            })
        );
        assert_eq!(
            Command::parse(&[0, 1, 2, 3, 0, 1, 2]),
            Err(ApduError::Extended)
        );
        assert_eq!(Response::parse(&[0x90]), Err(ApduError::NoStatusWord));
    }
}
