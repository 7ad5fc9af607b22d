//! The purse card application: what a real stored-value card executes (001 smart card 5;
//! intersector electronic purse style, [0077]–[0078], [0093]). A sans-IO state machine:
//! APDU bytes in, APDU bytes out; randomness comes from a seeded RNG the caller provides.
//!
//! # APDU table
//!
//! | command                  | CLA INS P1 P2 | data in                  | data out                 |
//! |--------------------------|---------------|--------------------------|--------------------------|
//! | SELECT by AID            | 00 A4 04 00   | purse AID                | FCI `6F 84 <AID>`, with a PIN `A5` ([`PinRule`]) |
//! | VERIFY                   | 00 20 00 80   | PIN block ([`pin_block`]) | —                       |
//! | READ PURSE               | 80 B0 00 00   | —                        | [`PurseInfo`]            |
//! | INITIALIZE FOR PURCHASE  | 80 50 01 00   | date (YYYY MM DD)        | [`PurchaseInit`]         |
//! | INITIALIZE (proof)       | 80 50 01 01   | date (YYYY MM DD)        | [`PurchaseInit`]; no session: no DEBIT follows; a blocked or expired card answers it too |
//! | INITIALIZE, points purse | 80 50 01 02 (03: proof) | date (YYYY MM DD) | [`PurchaseInit`] of the points ([`Purse::Points`]: [`Currency::POINTS`], the points balance, the points purse's key); the DEBIT that follows redeems points |
//! | DEBIT                    | 80 54 00 00   | [`DebitCommand`]; zero in [`Currency::AUTHENTICATION`] is an authentication draw (002 FIG. 16): the counter and log move, the balance does not | [`DebitResponse`]        |
//! | INITIALIZE FOR CREDIT    | 80 50 03 00   | date (YYYY MM DD)        | [`PurchaseInit`] of the money purse, MACed under [`CreditCommand::INIT_LABEL`]: opens a refund session |
//! | CREDIT                   | 80 56 00 00   | [`CreditCommand`] (a refund, signed by the merchant's security card) | [`CreditResponse`]; logged as [`LogKind::Credit`] |
//! | INITIALIZE FOR UNLOAD    | 80 50 04 00   | [`LoadInitRequest`] (amount ≤ the purse's balance; 0: the proof of the negative-result procedure) | [`LoadInit`], S1 under [`Direction::Unload`]'s label |
//! | UNLOAD                   | 80 58 00 00   | [`LoadCommand`], S2 under [`Direction::Unload`]'s label | [`LoadResponse`], S3 (the card's proof it gave the value up); logged as [`LogKind::Unload`] |
//! | INITIALIZE FOR LOAD      | 80 50 02 00   | [`LoadInitRequest`]; its currency names the purse (points: [`Currency::POINTS`], at most [`POINTS_MAX`], the points purse's load key) | [`LoadInit`] (S1)        |
//! | LOAD                     | 80 52 00 00   | [`LoadCommand`] (S2), then the issuer's sealed [`KeyUpdate`] (56 bytes), [`Unblock`] (24 bytes) and application key ([`crate::transfer::AppKeyPush`], 40 bytes), each optional, in that order | [`LoadResponse`] (S3)    |
//! | TRANSFER (card to card)  | 80 5A xx 00   | see [`transfer`] (seed 004 FIG. 4, P1–P4) | see [`transfer`] |
//! | SET PRIVACY              | 80 D2 00 0x 00 | — (x = 1 on, 0 off)     | —; with a PIN, only after VERIFY this session (`6982`) |
//! | READ LOG                 | 80 B2 nn 00   | — (nn = 1 is the newest) | [`LogRecord`]            |
//! | READ RECORD (provider)   | 00 B2 nn 0C   | — (nn = 1.. in personalisation order; P2 `04` too) | [`ProviderRecordInfo`], never the key; access Pin: after VERIFY in this session (seed 003, [`crate::provider`]) |
//! | READ RECORD (cardholder) | 00 B2 01 14   | —                        | [`Cardholder`]           |
//! | UPDATE RECORD (provider) | 00 DC nn 04   | [`RecordUpdate`]: account information, counter, MAC under the provider's card key (P2 `0C` too) | receipt MAC (8 bytes) |
//!
//! # Status words
//!
//! | SW   | meaning                                                        |
//! |------|----------------------------------------------------------------|
//! | 9000 | success                                                        |
//! | 6700 | wrong length: a malformed APDU, or one of 1–4 bytes (no purse command is that short) |
//! | 6Cxx | wrong Le: the answer is xx bytes; nothing was done, resend with Le = xx (ISO 7816-4 §5.1.3); Le = 00 or none takes any length |
//! | 6A80 | malformed command data, or a command for another card         |
//! | 6A82 | SELECT of an unknown AID                                       |
//! | 6A83 | READ LOG, READ RECORD or UPDATE RECORD of a record that does not exist |
//! | 6A86 | wrong P1/P2                                                    |
//! | 6D00 | unknown instruction                                            |
//! | 6E00 | class not supported                                            |
//! | 6982 | bad signature (security card, HSM); counts toward the lock     |
//! | 6982 | READ/UPDATE RECORD: security status not satisfied ([`SW_SECURITY_NOT_SATISFIED`]): no PIN verified in this session, or an update MAC that does not verify under the provider's key; does not count toward the lock |
//! | 6983 | card blocked                                                   |
//! | 6985 | wrong state or sequence (e.g. DEBIT without INITIALIZE)        |
//! | 9401 | insufficient value                                             |
//! | 9402 | over max balance                                               |
//! | 9403 | wrong currency (neither the card's nor the authentication currency) |
//! | 9404 | expired                                                        |
//! | 9405 | replay: a transaction number already used, or an UPDATE RECORD counter not above the record's last |
//! | 9406 | amount out of range: a zero-value debit or load in money, or value in the authentication currency |
//! | 9407 | DEBIT above the PIN threshold without a verified PIN            |
//! | 63Cx | VERIFY: wrong PIN, x tries left; `63C0`: the PIN is blocked     |
//! | 6A88 | VERIFY on a card without a PIN                                  |
//! | 9408 | TRANSFER: fewer than two application keys in common, or none held |
//! | 9409 | TRANSFER: an earlier transfer of this card is not settled       |
//!
//! # Lock and unblock (seed 004, BAD_KEY)
//!
//! Every signature that does not verify (a security card's, an HSM's, a sealed update's)
//! counts; a good one resets the count; at the limit the card blocks (`6983`). READ PURSE
//! shows the count and the limit. A blocked card refuses purchases, but may INITIALIZE FOR
//! LOAD: its LOAD is refused (`6983`) unless it carries the issuer's [`Unblock`] (issued
//! only with a bank load), which opens the card in the same state change as the credit; an
//! UNBLOCK that does not open adds to the count.
//!
//! # Passbook and privacy (seed 004 PASSBOOK)
//!
//! The passbook is the log's records since the last upload ([`CardState::passbook`]); every
//! INITIALIZE FOR LOAD or UNLOAD puts its digest ([`passbook_digest`]) under S1, so what a
//! bank load uploads is exactly those records, and the HSM's load command says through
//! which transaction the bank has them (`passbook_through`, under S2): the card clears them
//! (never uploads them again) with the credit. The log keeps every record for recovery.
//! With privacy on (SET PRIVACY) the digest is zeros and nothing is uploaded or cleared.
//!
//! # PIN threshold (seed 004, MIN_TRANS/MAX_TRANS)
//!
//! A card personalised with a PIN ([`CardState::with_pin`]) debits more than its threshold
//! only after a VERIFY of the PIN in the same session (since the last SELECT or reset); the
//! DEBIT uses it up. Purchases up to the threshold need no PIN, so a stolen card loses at
//! most that much per purchase without it. A wrong PIN uses a try (persisted before the
//! answer); at none left the PIN is blocked — purchases under the threshold still work. A
//! right PIN restores the tries. SELECT's FCI tells the box the threshold and the tries
//! left ([`PinRule`], proprietary template `A5`).
//!
//! Every INITIALIZE opens a one-shot session: the DEBIT or LOAD that follows closes it,
//! whatever its outcome, so a refused command cannot be retried without a fresh
//! INITIALIZE (and a fresh card random).

use std::collections::VecDeque;

use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::apdu::{ApduError, CardApplication, Command, Response, StatusWord};
use crate::crypto::{self, DesKey, Mac};
use crate::money::Currency;
use crate::purse::*;
use crate::transfer::{AppKeyPush, AppKeys, Expecting, Receiving, Remembered, Sent};

pub mod transfer;

pub const CLA_ISO: u8 = 0x00;
pub const CLA_PURSE: u8 = 0x80;
pub const INS_SELECT: u8 = 0xA4;
pub const INS_READ_PURSE: u8 = 0xB0;
pub const INS_INITIALIZE: u8 = 0x50;
pub const INS_DEBIT: u8 = 0x54;
pub const INS_LOAD: u8 = 0x52;
pub const INS_READ_LOG: u8 = 0xB2;
/// VERIFY (ISO 7816-4), CLA `00`.
pub const INS_VERIFY: u8 = 0x20;
/// READ RECORD (ISO 7816-4), CLA `00`: a service-provider or cardholder record (seed 003).
pub const INS_READ_RECORD: u8 = 0xB2;
/// UPDATE RECORD (ISO 7816-4), CLA `00`: a provider's account information (seed 003).
pub const INS_UPDATE_RECORD: u8 = 0xDC;
/// VERIFY's P2: the card's own PIN (ISO 7816-4: specific reference data, number 0).
pub const P2_PIN: u8 = 0x80;
pub const P1_INIT_PURCHASE: u8 = 0x01;
pub const P1_INIT_LOAD: u8 = 0x02;
/// INITIALIZE FOR CREDIT: opens a refund session (issue 17, the merchant's CREDIT).
pub const P1_INIT_CREDIT: u8 = 0x03;
/// CREDIT: a merchant's refund, signed by its security card ([`CreditCommand`]).
pub const INS_CREDIT: u8 = 0x56;
/// SET PRIVACY (`80 D2 00 P2`, P2 `01` on, `00` off): the cardholder's choice (seed 004);
/// with a PIN on the card, only after VERIFY in this session.
pub const INS_SET_PRIVACY: u8 = 0xD2;
/// TRANSFER, card to card (seed 004; [`transfer`]): P1 names the step.
pub const INS_TRANSFER: u8 = 0x5A;
/// INITIALIZE FOR UNLOAD: value back to the issuer (issue 17; 004 card-to-bank).
pub const P1_INIT_UNLOAD: u8 = 0x04;
/// UNLOAD: the HSM's unload command (S2 under [`Direction::Unload`]'s label).
pub const INS_UNLOAD: u8 = 0x58;
/// INITIALIZE FOR PURCHASE's P2 for a proof: the same MACed answer, no session opened (no
/// DEBIT can follow), and answered by a blocked or expired card too — the cancel's and
/// recovery's proof that a draw was not debited.
pub const P2_PROOF: u8 = 0x01;
/// INITIALIZE FOR PURCHASE's P2 bit for the points purse (002 [0160]–[0164]): the answer
/// carries the points and [`Currency::POINTS`], MACed under the points purse's key, and the
/// DEBIT that follows redeems points. May be combined with [`P2_PROOF`].
pub const P2_POINTS: u8 = 0x02;
/// The most points a card holds (the points purse's "max balance").
pub const POINTS_MAX: u64 = 100_000_000;
/// Status word for READ LOG past the last record.
pub const SW_RECORD_NOT_FOUND: StatusWord = StatusWord(0x6A83);
/// The log keeps at least the last 20 transactions (001 [0016]); we keep 32.
pub const LOG_CAPACITY: usize = 32;
/// The card answers to reset with T=0 and the historical bytes "PURSELINK1".
pub const CARD_ATR: [u8; 12] = [
    0x3B, 0x0A, b'P', b'U', b'R', b'S', b'E', b'L', b'I', b'N', b'K', b'1',
];

pub use crate::provider::{
    Cardholder, ProviderRecordInfo, RecordUpdate, SW_SECURITY_NOT_SATISFIED, ServiceProviderRecord,
};

/// Deliberate misbehaviour for the negative-result tests of 001 [0129]–[0132]: what a
/// faulty or tampered card does on its next LOAD. One-shot; cleared once used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CardFault {
    /// Not loaded, and says so (a true negative).
    TrueNegative,
    /// Loaded, but reports that it was not (a false negative: a tampered card).
    FalseNegative,
    /// Not loaded, says so, but its transaction counter moved by accident.
    CounterBump,
}

/// Everything the card keeps across power cycles.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardState {
    pub card_id: u64,
    pub provider_id: u32,
    pub keys: CardKeys,
    pub key_version: u8,
    pub currency: Currency,
    pub balance: u64,
    pub max_balance: u64,
    pub expiry: Expiry,
    pub atc: u32,
    pub load_count: u32,
    /// INITIALIZE FOR PURCHASE / FOR LOAD answered so far (each raised and persisted on
    /// every one): the freshness witness of a "not debited" / "not loaded" proof.
    pub purchase_inits: u32,
    pub load_inits: u32,
    pub status: u8,
    /// Lock of seed 004: consecutive bad signatures; the card blocks at `bad_key_limit`.
    pub bad_key_count: u8,
    pub bad_key_limit: u8,
    /// Second value type (seed 002): loyalty points.
    pub points: u64,
    /// Seed 003's service-provider data area: one record per provider, READ RECORD number =
    /// position + 1 ([`crate::provider`]).
    pub providers: Vec<ServiceProviderRecord>,
    /// Seed 003's cardholder data area (claim 1); `None`: none personalised.
    pub cardholder: Option<Cardholder>,
    /// Newest last.
    pub log: VecDeque<LogRecord>,
    pub fault: Option<CardFault>,
    /// The cardholder PIN and the amount above which a DEBIT needs it (seed 004); `None`:
    /// no PIN, every purchase takes OK alone.
    pub pin: Option<CardPin>,
    /// The cardholder chose privacy (seed 004): the passbook is never uploaded (its digest
    /// in S1 is zeros) and a load cannot clear it.
    pub privacy: bool,
    /// The passbook was uploaded to the bank and cleared through this transaction number:
    /// the log records after it are the passbook ([`CardState::passbook`]). The log itself
    /// keeps every record for recovery; cleared ones are only never uploaded again.
    pub passbook_through: u32,
    /// The INITIALIZE counts of the last load/unload sessions carried out, oldest first
    /// ([`LoadInit::runs`]).
    pub recent_runs: [Run; RECENT_RUNS],
    /// The INITIALIZE counts of the last credit (refund) sessions carried out, with the
    /// security card whose command ran, oldest first ([`PurchaseInit::credits`]).
    pub recent_credits: [Run; RECENT_RUNS],
    /// The four application keys and their epochs (seed 004 KEY_NUMBER); `None`: the card
    /// was personalised without them and takes no part in card-to-card transfers.
    pub app_keys: Option<AppKeys>,
    /// A transfer this card was debited for, until the payee's receipt or cancellation
    /// settles it ([`crate::transfer`]).
    pub sent: Option<Sent>,
    /// A transfer this card answered P1 for, until its P4 or a cancellation.
    pub receiving: Option<Receiving>,
    /// The payee's signed word on the last transfer of each of its last payers, oldest
    /// first.
    pub remembered: VecDeque<Remembered>,
    /// A RECEIVE waiting for its P1.
    pub expecting: Option<Expecting>,
    /// Challenges made for transfers (R0, R1, R2 each end in it): none repeats.
    pub transfer_nonce: u32,
}

/// The cardholder PIN as the card keeps it (seed 004's PIN threshold). `Debug` shows the
/// tries and the threshold, never the PIN.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CardPin {
    /// The PIN as its block ([`pin_block`]).
    block: [u8; 8],
    pub tries_left: u8,
    pub try_limit: u8,
    /// A DEBIT of more than this (minor units of the card's currency) needs the PIN.
    pub threshold: u64,
}

impl std::fmt::Debug for CardPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CardPin")
            .field("tries_left", &self.tries_left)
            .field("try_limit", &self.try_limit)
            .field("threshold", &self.threshold)
            .finish_non_exhaustive()
    }
}

/// What SELECT's FCI tells the box of the card's PIN: purchases above `threshold` (minor
/// units) need it, and `tries_left` wrong PINs remain. Template `A5` with `DF50` (threshold,
/// u64) and `DF51` (tries left, u8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PinRule {
    pub threshold: u64,
    pub tries_left: u8,
}

impl PinRule {
    /// Whether a purchase of `amount` minor units needs the PIN.
    pub fn needs_pin(&self, amount: u64) -> bool {
        amount > self.threshold
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = vec![0xA5, 15, 0xDF, 0x50, 8];
        v.extend_from_slice(&self.threshold.to_be_bytes());
        v.extend_from_slice(&[0xDF, 0x51, 1, self.tries_left]);
        v
    }

    /// The rule in a SELECT answer's FCI, if the card has a PIN. Any bytes: a malformed
    /// FCI is `None` (no PIN asked: the card still refuses an unverified DEBIT above its
    /// threshold, `9407`).
    pub fn from_fci(fci: &[u8]) -> Option<Self> {
        // 6F L { 84 L AID, A5 L { DF50 08 threshold, DF51 01 tries } }
        let body = tlv(fci, &[0x6F])?;
        let a5 = tlvs(body).find(|(t, _)| *t == [0xA5])?.1;
        let mut threshold = None;
        let mut tries_left = None;
        for (tag, v) in tlvs(a5) {
            match tag {
                [0xDF, 0x50] => threshold = Some(u64::from_be_bytes(v.try_into().ok()?)),
                [0xDF, 0x51] => tries_left = v.first().copied().filter(|_| v.len() == 1),
                _ => {}
            }
        }
        Some(Self {
            threshold: threshold?,
            tries_left: tries_left?,
        })
    }
}

/// The value of the single TLV `b` is, if its tag is `tag` (one-byte lengths only).
fn tlv<'a>(b: &'a [u8], tag: &[u8]) -> Option<&'a [u8]> {
    let mut it = tlvs(b);
    let (t, v) = it.next()?;
    (t == tag && it.next().is_none()).then_some(v)
}

/// The TLVs in `b` (BER tags of one or two bytes, lengths of one byte), until the bytes
/// end or stop making sense.
fn tlvs(b: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    let mut rest = b;
    std::iter::from_fn(move || {
        let tag_len = if *rest.first()? & 0x1F == 0x1F { 2 } else { 1 };
        let len = usize::from(*rest.get(tag_len)?);
        if len > 0x7F {
            rest = &[];
            return None;
        }
        let end = tag_len + 1 + len;
        let Some(value) = rest.get(tag_len + 1..end) else {
            rest = &[];
            return None;
        };
        let tag = &rest[..tag_len];
        rest = &rest[end..];
        Some((tag, value))
    })
}

/// A PIN as the VERIFY block: ISO 9564 format 2 — `2L` (L digits), the digits in BCD,
/// `F`-padded to 8 bytes. `None` unless 4 to 12 decimal digits.
pub fn pin_block(pin: &str) -> Option<[u8; 8]> {
    let digits: Vec<u8> = pin
        .bytes()
        .map(|c| c.is_ascii_digit().then(|| c - b'0'))
        .collect::<Option<_>>()?;
    if !(4..=12).contains(&digits.len()) {
        return None;
    }
    let mut nibbles = vec![2, digits.len() as u8];
    nibbles.extend(&digits);
    nibbles.resize(16, 0xF);
    let mut out = [0u8; 8];
    for (i, pair) in nibbles.chunks(2).enumerate() {
        out[i] = (pair[0] << 4) | pair[1];
    }
    Some(out)
}

/// Wrong PINs a card takes before its PIN blocks (seed 004).
pub const PIN_TRIES: u8 = 3;

/// Parameters for personalising a new card.
#[derive(Debug, Clone)]
pub struct CardSpec {
    pub card_id: u64,
    pub provider_id: u32,
    pub currency: Currency,
    pub balance: u64,
    pub max_balance: u64,
    pub expiry: Expiry,
}

impl CardSpec {
    /// A card of the demo's programme (provider 7, valid to the end of 2099): card
    /// `card_id` holding `balance` minor units of `currency`, at most `max_balance`. What
    /// the demo, the simulators and the tests personalise.
    pub fn demo(card_id: u64, currency: Currency, balance: u64, max_balance: u64) -> Self {
        Self {
            card_id,
            provider_id: 7,
            currency,
            balance,
            max_balance,
            expiry: Expiry {
                year: 2099,
                month: 12,
            },
        }
    }
}

impl CardState {
    /// Personalises a card: keys diversified from the issuer's master keys by card id.
    pub fn personalise(spec: &CardSpec, issuer: &IssuerKeys) -> Self {
        Self {
            card_id: spec.card_id,
            provider_id: spec.provider_id,
            keys: issuer.card_keys(spec.card_id),
            key_version: issuer.key_version,
            currency: spec.currency,
            balance: spec.balance,
            max_balance: spec.max_balance,
            expiry: spec.expiry,
            atc: 0,
            load_count: 0,
            purchase_inits: 0,
            load_inits: 0,
            status: 0,
            bad_key_count: 0,
            bad_key_limit: 10,
            points: 0,
            providers: Vec::new(),
            cardholder: None,
            log: VecDeque::new(),
            fault: None,
            pin: None,
            privacy: false,
            passbook_through: 0,
            recent_runs: [(0, 0); RECENT_RUNS],
            recent_credits: [(0, 0); RECENT_RUNS],
            app_keys: None,
            sent: None,
            receiving: None,
            remembered: VecDeque::new(),
            expecting: None,
            transfer_nonce: 0,
        }
    }

    /// This card with the scheme's application keys of epochs `oldest` to `oldest + 3`
    /// (seed 004 KEY_NUMBER), derived from the application master.
    ///
    /// # Errors
    /// The epochs pass 255.
    pub fn with_app_keys(mut self, master: &DesKey, oldest: u8) -> Result<Self, String> {
        self.app_keys = Some(AppKeys::from_master(master, oldest)?);
        Ok(self)
    }

    /// This card with the cardholder PIN `pin` (4–12 digits): DEBITs of more than
    /// `threshold` minor units need it, [`PIN_TRIES`] wrong ones block it.
    ///
    /// # Errors
    ///
    /// A PIN that is not 4 to 12 digits.
    pub fn with_pin(mut self, pin: &str, threshold: u64) -> Result<Self, String> {
        let block = pin_block(pin).ok_or("a PIN is 4 to 12 digits")?;
        self.pin = Some(CardPin {
            block,
            tries_left: PIN_TRIES,
            try_limit: PIN_TRIES,
            threshold,
        });
        Ok(self)
    }

    pub fn info(&self) -> PurseInfo {
        PurseInfo {
            card_id: self.card_id,
            provider_id: self.provider_id,
            balance: self.balance,
            max_balance: self.max_balance,
            currency: self.currency,
            expiry: self.expiry,
            key_version: self.key_version,
            atc: self.atc,
            load_count: self.load_count,
            algorithm: ALG_TDES_MAC3,
            auth_mode: AUTH_MODE_DES,
            status: self.status,
            points: self.points,
            bad_key_count: self.bad_key_count,
            bad_key_limit: self.bad_key_limit,
            privacy: self.privacy,
            passbook_through: self.passbook_through,
        }
    }

    /// A purse's balance and currency: the money purse in the card's currency, or the
    /// points.
    pub fn purse(&self, purse: Purse) -> (u64, Currency) {
        match purse {
            Purse::Money => (self.balance, self.currency),
            Purse::Points => (self.points, Currency::POINTS),
        }
    }

    fn purse_mut(&mut self, purse: Purse) -> &mut u64 {
        match purse {
            Purse::Money => &mut self.balance,
            Purse::Points => &mut self.points,
        }
    }

    /// The most a purse holds.
    pub fn purse_max(&self, purse: Purse) -> u64 {
        match purse {
            Purse::Money => self.max_balance,
            Purse::Points => POINTS_MAX,
        }
    }

    /// The passbook (seed 004 PASSBOOK): the log records since the last upload, oldest
    /// first; none when the cardholder chose privacy.
    pub fn passbook(&self) -> Vec<LogRecord> {
        if self.privacy {
            return Vec::new();
        }
        self.log
            .iter()
            .filter(|r| r.atc > self.passbook_through)
            .cloned()
            .collect()
    }

    fn push_log(&mut self, rec: LogRecord) {
        if self.log.len() == LOG_CAPACITY {
            self.log.pop_front();
        }
        self.log.push_back(rec);
    }
}

#[derive(Debug, Clone)]
enum Session {
    None,
    Purchase {
        atc: u32,
        card_random: [u8; 8],
        purse: Purse,
    },
    Load {
        atc: u32,
        request: LoadInitRequest,
        s1: Mac,
        direction: Direction,
        init_count: u32,
    },
    Credit {
        atc: u32,
        card_random: [u8; 8],
        /// The session's INITIALIZE count: named in [`PurchaseInit::credits`] once its
        /// CREDIT ran.
        init_count: u32,
    },
    /// The payer's SEND, waiting for P2 and P3.
    TransferSend {
        date: Date,
        r1: [u8; 8],
        ak0: u8,
        ak1: u8,
        amount: u64,
        currency: Currency,
        payee: u64,
    },
}

/// The result of one APDU: the response, and whether persistent state changed (so a
/// file-backed card must persist before it answers).
pub struct Outcome {
    pub response: Vec<u8>,
    pub state_changed: bool,
}

/// The purse card: persistent state plus the volatile session a reset clears.
pub struct PurseCard {
    pub state: CardState,
    selected: bool,
    session: Session,
    /// The PIN was verified since the last SELECT or reset; the next DEBIT uses it up.
    pin_verified: bool,
    /// The PIN was verified since the last SELECT or reset, for READ RECORD of records
    /// with access Pin (seed 003 claim 12): lasts the session, a failed VERIFY clears it.
    records_pin_verified: bool,
    rng: StdRng,
    changed: bool,
}

type Answer = Result<Vec<u8>, StatusWord>;

impl PurseCard {
    /// `seed` drives the card randoms; a real deployment seeds from the OS.
    pub fn new(state: CardState, seed: u64) -> Self {
        Self {
            state,
            selected: false,
            session: Session::None,
            pin_verified: false,
            records_pin_verified: false,
            rng: StdRng::seed_from_u64(seed),
            changed: false,
        }
    }

    /// Processes one APDU. An APDU of 4 bytes or fewer is `6700` (every purse command
    /// carries data or Le). A non-zero Le that is not the answer's length gets `6Cxx` with
    /// the right length, and the command is undone (state, session, selection), so the
    /// reader's resend with Le = xx runs it once.
    pub fn process(&mut self, apdu: &[u8]) -> Outcome {
        self.changed = false;
        let parsed = if apdu.len() <= 4 {
            Err(ApduError::TooShort(apdu.len()))
        } else {
            Command::parse(apdu)
        };
        let response = match parsed {
            Err(_) => Response::status(StatusWord::WRONG_LENGTH),
            Ok(cmd) => {
                let before = (
                    self.state.clone(),
                    self.selected,
                    self.session.clone(),
                    self.pin_verified,
                    self.records_pin_verified,
                );
                match self.dispatch(&cmd) {
                    Ok(data) => match cmd.le {
                        Some(le) if le != 0 && usize::from(le) != data.len() => {
                            (
                                self.state,
                                self.selected,
                                self.session,
                                self.pin_verified,
                                self.records_pin_verified,
                            ) = before;
                            self.changed = false;
                            Response::status(StatusWord(0x6C00 | (data.len() as u16 & 0xFF)))
                        }
                        _ => Response::ok(data),
                    },
                    Err(sw) => Response::status(sw),
                }
            }
        };
        Outcome {
            response: response.to_bytes(),
            state_changed: std::mem::take(&mut self.changed),
        }
    }

    fn dispatch(&mut self, cmd: &Command) -> Answer {
        match (cmd.cla, cmd.ins) {
            (CLA_ISO, INS_SELECT) => self.select(cmd),
            (CLA_ISO, INS_VERIFY) if self.selected => self.verify(cmd),
            (CLA_ISO, INS_VERIFY) => Err(StatusWord::WRONG_STATE),
            (CLA_ISO, INS_READ_RECORD | INS_UPDATE_RECORD) if !self.selected => {
                Err(StatusWord::WRONG_STATE)
            }
            (CLA_ISO, INS_READ_RECORD) => {
                crate::provider::read_record(&self.state, self.records_pin_verified, cmd)
            }
            (CLA_ISO, INS_UPDATE_RECORD) => {
                let receipt = crate::provider::update_record(&mut self.state, cmd)?;
                self.changed = true;
                Ok(receipt)
            }
            (CLA_ISO, _) => Err(StatusWord::UNKNOWN_INSTRUCTION),
            (CLA_PURSE, ins) => {
                if !self.selected {
                    return Err(StatusWord::WRONG_STATE);
                }
                match ins {
                    INS_READ_PURSE => self.read_purse(cmd),
                    INS_INITIALIZE => match cmd.p1 {
                        P1_INIT_PURCHASE => self.init_purchase(cmd),
                        P1_INIT_LOAD => self.init_load(cmd, Direction::Load),
                        P1_INIT_UNLOAD => self.init_load(cmd, Direction::Unload),
                        P1_INIT_CREDIT => self.init_credit(cmd),
                        _ => Err(StatusWord::WRONG_P1P2),
                    },
                    INS_DEBIT => self.debit(cmd),
                    INS_CREDIT => self.credit(cmd),
                    INS_SET_PRIVACY => self.set_privacy(cmd),
                    INS_LOAD => self.load(cmd, Direction::Load),
                    INS_UNLOAD => self.load(cmd, Direction::Unload),
                    INS_READ_LOG => self.read_log(cmd),
                    INS_TRANSFER => self.transfer(cmd),
                    _ => Err(StatusWord::UNKNOWN_INSTRUCTION),
                }
            }
            _ => Err(StatusWord::CLASS_NOT_SUPPORTED),
        }
    }

    fn select(&mut self, cmd: &Command) -> Answer {
        if cmd.p1 != 0x04 {
            return Err(StatusWord::WRONG_P1P2);
        }
        if cmd.data != PURSE_AID {
            self.selected = false;
            return Err(StatusWord::APP_NOT_FOUND);
        }
        self.selected = true;
        self.session = Session::None;
        self.pin_verified = false;
        self.records_pin_verified = false;
        let rule = self.state.pin.as_ref().map(|p| PinRule {
            threshold: p.threshold,
            tries_left: p.tries_left,
        });
        let a5 = rule.map(|r| r.encode()).unwrap_or_default();
        let mut fci = vec![
            0x6F,
            (2 + PURSE_AID.len() + a5.len()) as u8,
            0x84,
            PURSE_AID.len() as u8,
        ];
        fci.extend_from_slice(&PURSE_AID);
        fci.extend_from_slice(&a5);
        Ok(fci)
    }

    /// VERIFY (ISO 7816-4): the cardholder PIN, for a DEBIT above the threshold in this
    /// session. The try is counted in the same state change as the answer.
    fn verify(&mut self, cmd: &Command) -> Answer {
        if cmd.p1 != 0 || cmd.p2 != P2_PIN {
            return Err(StatusWord::WRONG_P1P2);
        }
        self.pin_verified = false;
        self.records_pin_verified = false;
        let Some(pin) = self.state.pin.as_mut() else {
            return Err(StatusWord::NO_PIN);
        };
        let block: [u8; 8] = cmd
            .data
            .as_slice()
            .try_into()
            .map_err(|_| StatusWord::BAD_DATA)?;
        if pin.tries_left == 0 {
            return Err(StatusWord::wrong_pin(0));
        }
        if crypto::mac_eq(&block, &pin.block) {
            if pin.tries_left != pin.try_limit {
                pin.tries_left = pin.try_limit;
                self.changed = true;
            }
            self.pin_verified = true;
            self.records_pin_verified = true;
            Ok(Vec::new())
        } else {
            pin.tries_left -= 1;
            self.changed = true;
            Err(StatusWord::wrong_pin(pin.tries_left))
        }
    }

    fn read_purse(&mut self, cmd: &Command) -> Answer {
        if cmd.p1 != 0 || cmd.p2 != 0 {
            return Err(StatusWord::WRONG_P1P2);
        }
        Ok(self.state.info().encode())
    }

    fn check_usable(&self) -> Result<(), StatusWord> {
        if self.state.status & STATUS_BLOCKED != 0 {
            Err(StatusWord::BLOCKED)
        } else {
            Ok(())
        }
    }

    fn random(&mut self) -> [u8; 8] {
        let mut r = [0u8; 8];
        self.rng.fill_bytes(&mut r);
        r
    }

    fn next_atc(&self) -> Result<u32, StatusWord> {
        // A card whose counter is exhausted is at end of life, not wrapped.
        self.state.atc.checked_add(1).ok_or(StatusWord::BLOCKED)
    }

    fn init_purchase(&mut self, cmd: &Command) -> Answer {
        self.session = Session::None;
        if cmd.p2 & !(P2_PROOF | P2_POINTS) != 0 {
            return Err(StatusWord::WRONG_P1P2);
        }
        let proof = cmd.p2 & P2_PROOF != 0;
        let purse = if cmd.p2 & P2_POINTS != 0 {
            Purse::Points
        } else {
            Purse::Money
        };
        let date = parse_date(&cmd.data)?;
        // A proof opens no session (no DEBIT can follow it), so a card that blocked or
        // expired since a draw still proves that draw was not debited.
        if !proof {
            self.check_usable_on(date)?;
        }
        let init = self.purchase_init(purse, b"IPUR")?;
        if !proof {
            self.session = Session::Purchase {
                atc: init.atc,
                card_random: init.card_random,
                purse,
            };
        }
        Ok(init.encode())
    }

    /// A usable (not blocked) card that has not expired on `date`.
    fn check_usable_on(&self, date: Date) -> Result<(), StatusWord> {
        self.check_usable()?;
        if self.state.expiry.is_expired_on(date) {
            return Err(StatusWord::EXPIRED);
        }
        Ok(())
    }

    /// The [`PurchaseInit`] of `purse` for the next transaction number, MACed under
    /// `label` with the purse's purchase session key; the INITIALIZE count raised and
    /// persisted (the freshness witness of every proof).
    fn purchase_init(&mut self, purse: Purse, label: &[u8; 4]) -> Result<PurchaseInit, StatusWord> {
        let atc = self.next_atc()?;
        let init_count = self
            .state
            .purchase_inits
            .checked_add(1)
            .ok_or(StatusWord::BLOCKED)?;
        self.state.purchase_inits = init_count;
        self.changed = true;
        let card_random = self.random();
        let s = &self.state;
        let (balance, currency) = s.purse(purse);
        let mut init = PurchaseInit {
            provider_id: s.provider_id,
            card_id: s.card_id,
            algorithm: ALG_TDES_MAC3,
            expiry: s.expiry,
            balance,
            currency,
            auth_mode: AUTH_MODE_DES,
            atc,
            init_count,
            key_version: s.key_version,
            credits: s.recent_credits,
            privacy: s.privacy,
            card_random,
            card_mac: [0; 8],
        };
        let sk = s.keys.purse_purchase_session(purse, atc);
        init.card_mac = crypto::sign(&sk, label, &init.signed_fields());
        Ok(init)
    }

    /// INITIALIZE FOR CREDIT: the money purse's [`PurchaseInit`], MACed under
    /// [`CreditCommand::INIT_LABEL`] (so it can never stand for a purchase's), opening a
    /// credit session. It counts as an INITIALIZE FOR PURCHASE for freshness: a proof
    /// INITIALIZE made after it shows a refund was not credited when its counter has not
    /// moved. A blocked or expired card takes no refund.
    fn init_credit(&mut self, cmd: &Command) -> Answer {
        self.session = Session::None;
        if cmd.p2 != 0 {
            return Err(StatusWord::WRONG_P1P2);
        }
        self.check_usable_on(parse_date(&cmd.data)?)?;
        let init = self.purchase_init(Purse::Money, CreditCommand::INIT_LABEL)?;
        self.session = Session::Credit {
            atc: init.atc,
            card_random: init.card_random,
            init_count: init.init_count,
        };
        Ok(init.encode())
    }

    /// SET PRIVACY: the cardholder turns the passbook upload off (P2 `01`) or on (`00`).
    /// A card with a PIN takes it only after VERIFY in this session (`6982` otherwise).
    fn set_privacy(&mut self, cmd: &Command) -> Answer {
        let on = match cmd.p2 {
            0 => false,
            1 => true,
            _ => return Err(StatusWord::WRONG_P1P2),
        };
        if cmd.p1 != 0 || !cmd.data.is_empty() {
            return Err(StatusWord::WRONG_P1P2);
        }
        if self.state.pin.is_some() && !self.records_pin_verified {
            return Err(SW_SECURITY_NOT_SATISFIED);
        }
        if self.state.privacy != on {
            self.state.privacy = on;
            self.changed = true;
        }
        Ok(Vec::new())
    }

    /// CREDIT: a refund signed by the security card ([`CreditCommand`]) for this session's
    /// transaction number, in the card's currency, within its maximum balance. Credited,
    /// counted and logged ([`LogKind::Credit`]) in one state change; the answer carries the
    /// card's signature the security card verifies.
    fn credit(&mut self, cmd: &Command) -> Answer {
        let Session::Credit {
            atc,
            card_random,
            init_count,
        } = std::mem::replace(&mut self.session, Session::None)
        else {
            return Err(StatusWord::WRONG_STATE);
        };
        self.check_usable()?;
        let cc = CreditCommand::decode(&cmd.data).map_err(|_| StatusWord::BAD_DATA)?;
        let c = &cc.0;
        if c.card_id != self.state.card_id {
            return Err(StatusWord::BAD_DATA);
        }
        if c.atc != atc {
            return Err(StatusWord::REPLAY);
        }
        let sk = self.state.keys.purchase_session(atc);
        if !crypto::verify(
            &sk,
            CreditCommand::LABEL,
            &c.signed_fields(&card_random),
            &c.security_card_signature,
        ) {
            return Err(self.bad_signature());
        }
        self.good_signature();
        if c.currency != self.state.currency {
            return Err(StatusWord::WRONG_CURRENCY);
        }
        if self.state.expiry.is_expired_on(c.date) {
            return Err(StatusWord::EXPIRED);
        }
        if c.amount == 0 {
            return Err(StatusWord::BAD_AMOUNT);
        }
        let new_balance = self
            .state
            .balance
            .checked_add(c.amount)
            .filter(|b| *b <= self.state.max_balance)
            .ok_or(StatusWord::OVER_MAX_BALANCE)?;
        let resp = self.carry_out(
            c,
            Purse::Money,
            new_balance,
            (atc, &card_random, &sk),
            (CreditResponse::LABEL, LogKind::Credit),
        );
        // This session ran, with this security card's command: the card's next INITIALIZE
        // says so, whatever it does meanwhile (one state change with the credit).
        self.state.recent_credits.rotate_left(1);
        self.state.recent_credits[RECENT_RUNS - 1] = (init_count, c.security_card_id);
        Ok(CreditResponse(resp).encode())
    }

    /// Carries out a debit or credit command `c` of this session (`atc`, `card_random`,
    /// session key `sk`): `purse` becomes `new_balance`, the counter moves, the card signs
    /// its answer under `label`, and the log records it as `kind` — one state change.
    fn carry_out(
        &mut self,
        c: &DebitCommand,
        purse: Purse,
        new_balance: u64,
        (atc, card_random, sk): (u32, &[u8; 8], &DesKey),
        (label, kind): (&[u8; 4], LogKind),
    ) -> DebitResponse {
        let mut resp = DebitResponse {
            card_id: self.state.card_id,
            atc,
            amount: c.amount,
            currency: c.currency,
            new_balance,
            security_card_id: c.security_card_id,
            security_card_txn: c.security_card_txn,
            card_signature: [0; 8],
        };
        resp.card_signature = crypto::sign(sk, label, &resp.signed_fields(card_random));
        *self.state.purse_mut(purse) = new_balance;
        self.state.atc = atc;
        self.state.push_log(LogRecord {
            kind,
            atc,
            amount: c.amount,
            currency: c.currency,
            balance_after: new_balance,
            date: c.date,
            counterparty: c.security_card_id,
            counterparty_txn: c.security_card_txn,
            signature: resp.card_signature,
        });
        self.changed = true;
        resp
    }

    /// Counts a bad signature toward the lock (seed 004) and blocks at the limit.
    fn bad_signature(&mut self) -> StatusWord {
        self.state.bad_key_count = self.state.bad_key_count.saturating_add(1);
        if self.state.bad_key_count >= self.state.bad_key_limit {
            self.state.status |= STATUS_BLOCKED;
        }
        self.changed = true;
        StatusWord::BAD_SIGNATURE
    }

    fn good_signature(&mut self) {
        if self.state.bad_key_count != 0 {
            self.state.bad_key_count = 0;
            self.changed = true;
        }
    }

    fn debit(&mut self, cmd: &Command) -> Answer {
        let pin_verified = std::mem::take(&mut self.pin_verified);
        let Session::Purchase {
            atc,
            card_random,
            purse,
        } = std::mem::replace(&mut self.session, Session::None)
        else {
            return Err(StatusWord::WRONG_STATE);
        };
        self.check_usable()?;
        let dc = DebitCommand::decode(&cmd.data).map_err(|_| StatusWord::BAD_DATA)?;
        if dc.card_id != self.state.card_id {
            return Err(StatusWord::BAD_DATA);
        }
        if dc.atc != atc {
            return Err(StatusWord::REPLAY);
        }
        let sk = self.state.keys.purse_purchase_session(purse, atc);
        if !crypto::verify(
            &sk,
            b"DCMD",
            &dc.signed_fields(&card_random),
            &dc.security_card_signature,
        ) {
            return Err(self.bad_signature());
        }
        self.good_signature();
        // An authentication draw (002 FIG. 16): zero in the authentication currency, whatever
        // the card's own; any value in that currency is out of range.
        // Points are redeemed only from the points purse, and money only from money.
        let authentication = dc.currency == Currency::AUTHENTICATION && purse == Purse::Money;
        let (balance, currency) = self.state.purse(purse);
        if dc.currency != currency && !authentication {
            return Err(StatusWord::WRONG_CURRENCY);
        }
        // The PIN bounds what a stolen card loses in money (seed 004).
        if let (Some(pin), Purse::Money) = (&self.state.pin, purse) {
            if dc.amount > pin.threshold && !pin_verified {
                return Err(StatusWord::PIN_REQUIRED);
            }
        }
        if self.state.expiry.is_expired_on(dc.date) {
            return Err(StatusWord::EXPIRED);
        }
        if (dc.amount == 0) != authentication {
            return Err(StatusWord::BAD_AMOUNT);
        }
        let new_balance = balance
            .checked_sub(dc.amount)
            .ok_or(StatusWord::INSUFFICIENT_VALUE)?;
        let resp = self.carry_out(
            &dc,
            purse,
            new_balance,
            (atc, &card_random, &sk),
            (b"DRSP", LogKind::Debit),
        );
        Ok(resp.encode())
    }

    /// INITIALIZE FOR LOAD, or (`Direction::Unload`) FOR UNLOAD: S1 under the direction's
    /// label. An unload needs the value on the card; its zero-value form is the proof of the
    /// negative-result procedure in reverse, answered by a blocked card too.
    fn init_load(&mut self, cmd: &Command, direction: Direction) -> Answer {
        self.session = Session::None;
        // A card locked by bad signatures may start a load: only the issuer's UNBLOCK,
        // inside a bank load, opens it (and its LOAD is refused without one).
        let req = LoadInitRequest::decode(&cmd.data).map_err(|_| StatusWord::BAD_DATA)?;
        // The currency names the purse: points, or the card's money.
        let purse = Purse::of(req.currency);
        let s = &self.state;
        let (balance, currency) = s.purse(purse);
        let max_balance = s.purse_max(purse);
        if req.currency != currency {
            return Err(StatusWord::WRONG_CURRENCY);
        }
        if s.expiry.is_expired_on(req.date) {
            return Err(StatusWord::EXPIRED);
        }
        match direction {
            Direction::Load => match balance.checked_add(req.amount) {
                Some(total) if total <= max_balance => {}
                _ => return Err(StatusWord::OVER_MAX_BALANCE),
            },
            Direction::Unload => {
                // Value goes back to the bank from the money purse only: points are no
                // money to pay out.
                if purse != Purse::Money {
                    return Err(StatusWord::WRONG_CURRENCY);
                }
                if balance < req.amount {
                    return Err(StatusWord::INSUFFICIENT_VALUE);
                }
                if req.amount != 0 {
                    self.check_usable()?;
                }
            }
        }
        let atc = self.next_atc()?;
        let init_count = self
            .state
            .load_inits
            .checked_add(1)
            .ok_or(StatusWord::BLOCKED)?;
        self.state.load_inits = init_count;
        self.changed = true;
        let card_random = self.random();
        let s = &self.state;
        let mut init = LoadInit {
            card_id: s.card_id,
            expiry: s.expiry,
            balance,
            max_balance,
            currency,
            atc,
            load_count: s.load_count,
            init_count,
            key_version: s.key_version,
            amount: req.amount,
            timestamp: req.timestamp,
            passbook: passbook_digest(&s.passbook()),
            runs: s.recent_runs,
            card_random,
            s1: [0; 8],
        };
        init.s1 = crypto::sign(
            &s.keys.purse_load(purse),
            direction.labels().0,
            &init.signed_fields(),
        );
        self.session = Session::Load {
            atc,
            request: req,
            s1: init.s1,
            direction,
            init_count,
        };
        Ok(init.encode())
    }

    /// LOAD, or (`Direction::Unload`) UNLOAD: the HSM's command with S2 under the
    /// direction's label, for this session's direction only. An unload takes the value off
    /// the purse (no issuer items ride in it); the card's S3 is its proof either way.
    fn load(&mut self, cmd: &Command, direction: Direction) -> Answer {
        let session = std::mem::replace(&mut self.session, Session::None);
        let Session::Load {
            atc,
            request,
            s1,
            direction: opened,
            init_count,
        } = session
        else {
            return Err(StatusWord::WRONG_STATE);
        };
        if opened != direction {
            return Err(StatusWord::WRONG_STATE);
        }
        let (s2_label, s3_label) = (direction.labels().1, direction.labels().2);
        // The load command, then (each optional) the issuer's sealed key update, its sealed
        // UNBLOCK and a sealed application key, told apart by their lengths.
        let (lc, rest) = cmd.data.split_at(cmd.data.len().min(LoadCommand::LEN));
        let [update, unblock, app_key] = issuer_items(rest);
        let lc = LoadCommand::decode(lc).map_err(|_| StatusWord::BAD_DATA)?;
        if lc.card_id != self.state.card_id {
            return Err(StatusWord::BAD_DATA);
        }
        if lc.atc != atc {
            return Err(StatusWord::REPLAY);
        }
        // The issuer's key update and UNBLOCK ride in money loads only.
        let purse = Purse::of(request.currency);
        if (purse == Purse::Points || direction == Direction::Unload) && !rest.is_empty() {
            return Err(StatusWord::BAD_DATA);
        }
        let key: DesKey = self.state.keys.purse_load(purse);
        if !crypto::verify(&key, s2_label, &lc.signed_fields(&s1), &lc.s2) {
            return Err(self.bad_signature());
        }
        let blocked = self.state.status & STATUS_BLOCKED != 0;
        if blocked && unblock.is_empty() {
            // Locked: a load opens it only with the issuer's UNBLOCK (the count stays).
            return Err(StatusWord::BLOCKED);
        }
        if lc.amount != request.amount || lc.currency != request.currency {
            return Err(StatusWord::BAD_AMOUNT);
        }
        if lc.amount == 0 {
            return Err(StatusWord::BAD_AMOUNT);
        }
        // The passbook the bank has: through a transaction this card made before this
        // session, and never with privacy chosen. Cleared with the credit below.
        let through = lc.passbook_through;
        if through != 0 && (through >= atc || self.state.privacy) {
            return Err(StatusWord::BAD_DATA);
        }
        // A key update must open under this load's session and name a newer version; one
        // that does not is refused with the whole LOAD (nothing credited, nothing re-keyed).
        let rekey = if update.is_empty() {
            None
        } else {
            let opened = crypto::open(&KeyUpdate::session(&key, &s1), update)
                .ok()
                .and_then(|b| KeyUpdate::decode(&b).ok());
            match opened {
                Some(u) if u.key_version > self.state.key_version => Some(u),
                Some(_) => return Err(StatusWord::BAD_DATA),
                None => return Err(self.bad_signature()),
            }
        };
        // A new epoch's application key, too (seed 004 FIG. 5).
        let app_key = if app_key.is_empty() {
            None
        } else {
            match crypto::open(&AppKeyPush::session(&key, &s1), app_key)
                .ok()
                .and_then(|b| AppKeyPush::decode(&b).ok())
            {
                Some(k) => Some(k),
                None => return Err(self.bad_signature()),
            }
        };
        // The UNBLOCK opens under the card's current load key, like the key update.
        let unblock = if unblock.is_empty() {
            None
        } else {
            match crypto::open(&Unblock::session(&key, &s1), unblock)
                .ok()
                .and_then(|b| Unblock::decode(&b).ok())
            {
                Some(u) => Some(u),
                None => return Err(self.bad_signature()),
            }
        };
        if blocked && unblock.is_none_or(|u| u.flags & Unblock::LOCK == 0) {
            return Err(StatusWord::BLOCKED);
        }
        self.good_signature();
        let balance = self.state.purse(purse).0;
        let credited = match direction {
            Direction::Load => balance
                .checked_add(lc.amount)
                .filter(|b| *b <= self.state.purse_max(purse))
                .ok_or(StatusWord::OVER_MAX_BALANCE)?,
            Direction::Unload => balance
                .checked_sub(lc.amount)
                .ok_or(StatusWord::INSUFFICIENT_VALUE)?,
        };
        let fault = self.state.fault.take();
        let (result, credit, counter_moves) = match fault {
            None => (LOAD_OK, true, true),
            Some(CardFault::TrueNegative) => (LOAD_NEGATIVE, false, false),
            Some(CardFault::FalseNegative) => (LOAD_NEGATIVE, true, true),
            Some(CardFault::CounterBump) => (LOAD_NEGATIVE, false, true),
        };
        if credit {
            *self.state.purse_mut(purse) = credited;
            self.state.load_count += 1;
            self.state.passbook_through = self.state.passbook_through.max(through);
            // This session ran: the proof of the negative-result procedure names it.
            self.state.recent_runs.rotate_left(1);
            self.state.recent_runs[RECENT_RUNS - 1] = (init_count, lc.hsm_id);
            // Re-keyed in the same state change as the credit: one version or the other
            // is what persists, never neither.
            if let Some(u) = rekey {
                self.state.keys = u.keys;
                self.state.key_version = u.key_version;
            }
            // The newer epoch replaces the oldest, with the credit; an older one is no news.
            // Not while the card's own unsettled transfer needs the key it would drop: the
            // next bank load brings it again.
            let in_use: Vec<u8> = (self.state.sent.iter().map(|s| s.ak1))
                .chain(self.state.receiving.iter().map(|r| r.ak1))
                .collect();
            if let (Some(k), Some(keys)) = (app_key, self.state.app_keys.as_mut()) {
                if !in_use.contains(&keys.oldest()) {
                    let _ = keys.push(k);
                }
            }
            // Opened in the same state change as the credit, too.
            if let Some(u) = unblock {
                if u.flags & Unblock::LOCK != 0 {
                    self.state.status &= !STATUS_BLOCKED;
                    self.state.bad_key_count = 0;
                }
                if let (true, Some(pin)) = (u.flags & Unblock::PIN != 0, self.state.pin.as_mut()) {
                    pin.tries_left = pin.try_limit;
                }
            }
        }
        if counter_moves {
            self.state.atc = atc;
        }
        let mut resp = LoadResponse {
            card_id: self.state.card_id,
            atc,
            amount: lc.amount,
            currency: lc.currency,
            result,
            new_balance: self.state.purse(purse).0,
            s3: [0; 8],
        };
        resp.s3 = crypto::sign(&key, s3_label, &resp.signed_fields(&lc.s2));
        if credit {
            self.state.push_log(LogRecord {
                kind: match direction {
                    Direction::Load => LogKind::Load,
                    Direction::Unload => LogKind::Unload,
                },
                atc,
                amount: lc.amount,
                currency: lc.currency,
                balance_after: self.state.purse(purse).0,
                date: request.date,
                counterparty: lc.hsm_id,
                counterparty_txn: 0,
                signature: resp.s3,
            });
        }
        self.changed = true;
        Ok(resp.encode())
    }

    fn read_log(&mut self, cmd: &Command) -> Answer {
        if cmd.p2 != 0 || cmd.p1 == 0 {
            return Err(StatusWord::WRONG_P1P2);
        }
        let n = cmd.p1 as usize;
        let log = &self.state.log;
        if n > log.len() {
            return Err(SW_RECORD_NOT_FOUND);
        }
        Ok(log[log.len() - n].encode())
    }
}

/// The issuer items after a LOAD's load command — key update, UNBLOCK, application key,
/// each optional, in that order — told apart by their sealed lengths (each subset sums to
/// its own length). Bytes that fit no subset are taken as a key update, which then fails to
/// open: a bad signature.
fn issuer_items(rest: &[u8]) -> [&[u8]; 3] {
    const LENS: [usize; 3] = [
        KeyUpdate::SEALED_LEN,
        Unblock::SEALED_LEN,
        AppKeyPush::SEALED_LEN,
    ];
    for subset in 0u8..8 {
        let len = |i: usize| if subset & (1 << i) != 0 { LENS[i] } else { 0 };
        if len(0) + len(1) + len(2) == rest.len() {
            let (update, more) = rest.split_at(len(0));
            let (unblock, app_key) = more.split_at(len(1));
            return [update, unblock, app_key];
        }
    }
    [rest, &[], &[]]
}

fn parse_date(data: &[u8]) -> Result<Date, StatusWord> {
    let mut r = crate::codec::Reader::new(data);
    let d = (|| Ok::<_, crate::codec::LayoutError>(Date::new(r.u16()?, r.u8()?, r.u8()?)))()
        .map_err(|_| StatusWord::BAD_DATA)?;
    r.end().map_err(|_| StatusWord::BAD_DATA)?;
    Ok(d)
}

impl CardApplication for PurseCard {
    fn atr(&self) -> Vec<u8> {
        CARD_ATR.to_vec()
    }
    fn reset(&mut self) {
        self.selected = false;
        self.session = Session::None;
        self.pin_verified = false;
        self.records_pin_verified = false;
    }
    fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
        self.process(apdu).response
    }
}

/// Builders for the purse's command APDUs, shared by the box and the tests.
pub mod commands {
    use super::*;

    pub fn select() -> Vec<u8> {
        Command::new(CLA_ISO, INS_SELECT, 0x04, 0x00, PURSE_AID.to_vec(), Some(0)).to_bytes()
    }
    pub fn read_purse() -> Vec<u8> {
        Command::new(CLA_PURSE, INS_READ_PURSE, 0, 0, vec![], Some(0)).to_bytes()
    }
    pub fn init_purchase(date: Date) -> Vec<u8> {
        init_purchase_of(Purse::Money, date)
    }
    /// INITIALIZE FOR CREDIT (a refund session).
    pub fn init_credit(date: Date) -> Vec<u8> {
        let mut d = date.year.to_be_bytes().to_vec();
        d.extend_from_slice(&[date.month, date.day]);
        Command::new(CLA_PURSE, INS_INITIALIZE, P1_INIT_CREDIT, 0, d, Some(0)).to_bytes()
    }
    /// SET PRIVACY on or off.
    pub fn set_privacy(on: bool) -> Vec<u8> {
        Command::new(
            CLA_PURSE,
            INS_SET_PRIVACY,
            0,
            u8::from(on),
            Vec::new(),
            Some(0),
        )
        .to_bytes()
    }
    /// INITIALIZE FOR UNLOAD: S1 of an unload of `req.amount` (0: the zero-value proof).
    pub fn init_unload(req: &LoadInitRequest) -> Vec<u8> {
        Command::new(
            CLA_PURSE,
            INS_INITIALIZE,
            P1_INIT_UNLOAD,
            0,
            req.encode(),
            Some(0),
        )
        .to_bytes()
    }
    /// UNLOAD with the HSM's unload command.
    pub fn unload(lc: &LoadCommand) -> Vec<u8> {
        Command::new(CLA_PURSE, INS_UNLOAD, 0, 0, lc.encode(), Some(0)).to_bytes()
    }
    /// CREDIT with the security card's credit command.
    pub fn credit(cc: &CreditCommand) -> Vec<u8> {
        Command::new(CLA_PURSE, INS_CREDIT, 0, 0, cc.encode(), Some(0)).to_bytes()
    }
    /// INITIALIZE FOR PURCHASE of `purse` (the points purse: [`P2_POINTS`]).
    pub fn init_purchase_of(purse: Purse, date: Date) -> Vec<u8> {
        let mut d = date.year.to_be_bytes().to_vec();
        d.extend_from_slice(&[date.month, date.day]);
        let p2 = match purse {
            Purse::Money => 0,
            Purse::Points => P2_POINTS,
        };
        Command::new(CLA_PURSE, INS_INITIALIZE, P1_INIT_PURCHASE, p2, d, Some(0)).to_bytes()
    }
    /// INITIALIZE FOR PURCHASE as a proof ([`P2_PROOF`]): no DEBIT can follow it.
    pub fn init_purchase_proof(date: Date) -> Vec<u8> {
        let mut d = date.year.to_be_bytes().to_vec();
        d.extend_from_slice(&[date.month, date.day]);
        Command::new(
            CLA_PURSE,
            INS_INITIALIZE,
            P1_INIT_PURCHASE,
            P2_PROOF,
            d,
            Some(0),
        )
        .to_bytes()
    }
    pub fn debit(dc: &DebitCommand) -> Vec<u8> {
        Command::new(CLA_PURSE, INS_DEBIT, 0, 0, dc.encode(), Some(0)).to_bytes()
    }
    pub fn init_load(req: &LoadInitRequest) -> Vec<u8> {
        Command::new(
            CLA_PURSE,
            INS_INITIALIZE,
            P1_INIT_LOAD,
            0,
            req.encode(),
            Some(0),
        )
        .to_bytes()
    }
    pub fn load(lc: &LoadCommand) -> Vec<u8> {
        load_with_update(lc, None)
    }
    /// LOAD with the issuer's sealed [`KeyUpdate`] after the load command.
    pub fn load_with_update(lc: &LoadCommand, key_update: Option<&[u8]>) -> Vec<u8> {
        load_with_issuer(lc, key_update, None)
    }
    /// LOAD with the issuer's sealed [`KeyUpdate`] and sealed [`Unblock`], each if any, in
    /// that order after the load command.
    pub fn load_with_issuer(
        lc: &LoadCommand,
        key_update: Option<&[u8]>,
        unblock: Option<&[u8]>,
    ) -> Vec<u8> {
        load_with_items(lc, [key_update, unblock, None])
    }
    /// LOAD with the issuer's items, each if any, in this order after the load command:
    /// sealed [`KeyUpdate`], sealed [`Unblock`], sealed application key
    /// ([`crate::transfer::AppKeyPush`]).
    pub fn load_with_items(lc: &LoadCommand, items: [Option<&[u8]>; 3]) -> Vec<u8> {
        let mut data = lc.encode();
        for item in items {
            data.extend_from_slice(item.unwrap_or_default());
        }
        Command::new(CLA_PURSE, INS_LOAD, 0, 0, data, Some(0)).to_bytes()
    }
    /// VERIFY of the cardholder PIN; `None` for a PIN that is not 4 to 12 digits.
    pub fn verify_pin(pin: &str) -> Option<Vec<u8>> {
        let block = pin_block(pin)?;
        Some(Command::new(CLA_ISO, INS_VERIFY, 0, P2_PIN, block.to_vec(), None).to_bytes())
    }
    pub fn read_log(record: u8) -> Vec<u8> {
        Command::new(CLA_PURSE, INS_READ_LOG, record, 0, vec![], Some(0)).to_bytes()
    }
    /// READ RECORD of provider record `record` (1.., personalisation order), SFI 1, Le 00.
    pub fn read_record(record: u8) -> Vec<u8> {
        Command::new(
            CLA_ISO,
            INS_READ_RECORD,
            record,
            crate::provider::P2_PROVIDER_RECORDS,
            vec![],
            Some(0),
        )
        .to_bytes()
    }
    /// READ RECORD of the cardholder data (SFI 2, record 1), Le 00.
    pub fn read_cardholder() -> Vec<u8> {
        Command::new(
            CLA_ISO,
            INS_READ_RECORD,
            1,
            crate::provider::P2_CARDHOLDER,
            vec![],
            Some(0),
        )
        .to_bytes()
    }
    /// UPDATE RECORD of provider record `record` (1..) with a signed [`RecordUpdate`], Le 00
    /// (the answer is the card's 8-byte receipt).
    pub fn update_record(record: u8, update: &RecordUpdate) -> Vec<u8> {
        Command::new(
            CLA_ISO,
            INS_UPDATE_RECORD,
            record,
            crate::provider::P2_CURRENT_FILE,
            update.encode(),
            Some(0),
        )
        .to_bytes()
    }
}
