//! Service-provider records and the cardholder data area on the purse card (seed 003,
//! claims 1–4 and 10–12).
//!
//! Claim 1's card has "a data area for storing cardholder information" ([`Cardholder`],
//! [`CardState::cardholder`], a separate field: not a provider record) and "a data area for
//! storing service provider information" ([`CardState::providers`]: one
//! [`ServiceProviderRecord`] per provider, in personalisation order). Claim 10's record has
//! a name, a key value, its key type and account information; claim 11 adds the instrument
//! type, claim 12 the access condition the user must satisfy; claim 4's card operating
//! system manages the area ([`CardState::with_provider`] at personalisation, UPDATE RECORD
//! in the field).
//!
//! # Files and commands (ISO 7816-4 short-EF addressing, "record number in P1")
//!
//! | file                | SFI | READ RECORD P2 | records                                     |
//! |---------------------|-----|----------------|---------------------------------------------|
//! | provider records    | 1   | `0C` (or `04`, the current file) | 1..=n, personalisation order |
//! | cardholder data     | 2   | `14`           | 1 only                                      |
//!
//! - READ RECORD `00 B2 P1 P2`, no data, Le `00`: the record's [`ProviderRecordInfo`] (or
//!   [`Cardholder`]) layout — never the key. Access [`ReadAccess::Pin`] needs a VERIFY of
//!   the cardholder PIN since the last SELECT or reset (it lasts the session; a DEBIT does
//!   not use it up, a failed VERIFY closes it).
//! - UPDATE RECORD `00 DC P1 04` (or `0C`), data a [`RecordUpdate`]: new account
//!   information, a counter above the record's last one, and a MAC under the provider's
//!   card key ([`UpdateAccess::ProviderMac`]). The answer is an 8-byte receipt MAC
//!   ([`RecordUpdate::verify_receipt`]). The cardholder file is not updatable (`6A86`).
//!
//! Status words: `6700` data on READ RECORD or none on UPDATE RECORD; `6A80` malformed
//! update data, or one for another provider; `6A83` no such record; `6A86` P1 = 0 or an
//! unknown P2; `6982` ([`SW_SECURITY_NOT_SATISFIED`]) the access condition is not met (no
//! PIN verified, or a MAC that does not verify) — unlike the purse's `6982` it does not
//! count toward the bad-key lock; `9405` an update counter not above the last one (a
//! replay); `6985` before SELECT. The purse lock (`6983`) does not close the records.
//!
//! The provider's key is 2-key triple DES ([`KeyType::Tdes2Mac3`]), diversified per card
//! from the provider's master key like the purse keys ([`MasterKey::card_key`]: the card id
//! encrypted under the master); the card keeps it and only ever uses it to verify.

use serde::{Deserialize, Serialize};

use crate::apdu::{Command, StatusWord};
use crate::card::{CardState, SW_RECORD_NOT_FOUND};
use crate::codec::{LayoutError, Reader, Writer};
use crate::crypto::{self, DesKey, Mac};
use crate::purse::MasterKey;

/// READ/UPDATE RECORD's status word when the record's access condition is not satisfied
/// (ISO 7816-4 "security status not satisfied"): no PIN verified in this session, or an
/// update whose MAC does not verify under the provider's key. Not counted toward the
/// purse's bad-key lock.
pub const SW_SECURITY_NOT_SATISFIED: StatusWord = StatusWord(0x6982);

/// Short EF identifier of the service-provider records file.
pub const SFI_PROVIDERS: u8 = 1;
/// Short EF identifier of the cardholder data file.
pub const SFI_CARDHOLDER: u8 = 2;
/// P2 "record number in P1" of the currently selected file: the provider records (the
/// purse application has no other record file selected).
pub const P2_CURRENT_FILE: u8 = 0x04;
/// P2 "record number in P1" of SFI 1, the provider records (`0C`).
pub const P2_PROVIDER_RECORDS: u8 = (SFI_PROVIDERS << 3) | 0x04;
/// P2 "record number in P1" of SFI 2, the cardholder data (`14`).
pub const P2_CARDHOLDER: u8 = (SFI_CARDHOLDER << 3) | 0x04;

/// At most this many provider records on a card.
pub const MAX_RECORDS: usize = 8;
/// A provider's or cardholder's name: at most this many bytes of UTF-8.
pub const MAX_NAME: usize = 32;
/// Account information (or cardholder data): at most this many bytes.
pub const MAX_ACCOUNT: usize = 128;

/// The label of an UPDATE RECORD's MAC.
const LABEL_UPDATE: &[u8; 4] = b"UREC";
/// The label of the card's receipt for an applied update.
const LABEL_RECEIPT: &[u8; 4] = b"URSP";

/// Instrument type (claim 11, one byte; other codes are the provider's): stored value.
pub const INSTRUMENT_STORED_VALUE: u8 = 0x01;
/// Instrument type: a credit card or credit line.
pub const INSTRUMENT_CREDIT: u8 = 0x02;
/// Instrument type: a debit card (a bank account).
pub const INSTRUMENT_DEBIT: u8 = 0x03;
/// Instrument type: a loyalty or membership scheme.
pub const INSTRUMENT_LOYALTY: u8 = 0x04;
/// Instrument type: a pre-funded or billing account with the provider.
pub const INSTRUMENT_ACCOUNT: u8 = 0x05;

/// The type of a record's key value (claim 10's key-type indication).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum KeyType {
    /// 2-key triple DES, 16 bytes; MACs by ISO 9797-1 algorithm 3 (code `01`, as
    /// [`crate::purse::ALG_TDES_MAC3`]).
    Tdes2Mac3,
}

impl KeyType {
    /// The one-byte code in a record's layout.
    pub fn code(self) -> u8 {
        match self {
            Self::Tdes2Mac3 => 0x01,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        (c == 0x01).then_some(Self::Tdes2Mac3)
    }
}

/// Who may READ a record (claim 12's access condition).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ReadAccess {
    /// Anyone who selected the purse (code `00`).
    Always,
    /// Only after a VERIFY of the cardholder PIN in this session (code `01`).
    Pin,
}

impl ReadAccess {
    /// The one-byte code in a record's layout.
    pub fn code(self) -> u8 {
        match self {
            Self::Always => 0x00,
            Self::Pin => 0x01,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        match c {
            0x00 => Some(Self::Always),
            0x01 => Some(Self::Pin),
            _ => None,
        }
    }
}

/// Who may UPDATE a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UpdateAccess {
    /// Only an update carrying a MAC under the provider's card key (code `01`).
    ProviderMac,
}

impl UpdateAccess {
    /// The one-byte code in a record's layout.
    pub fn code(self) -> u8 {
        match self {
            Self::ProviderMac => 0x01,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        (c == 0x01).then_some(Self::ProviderMac)
    }
}

/// Why a record, a cardholder area or an update cannot be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    /// A provider's or cardholder's name over [`MAX_NAME`] bytes.
    #[error("a name is at most {MAX_NAME} bytes")]
    NameTooLong,
    /// Account information or cardholder data over [`MAX_ACCOUNT`] bytes.
    #[error("account information or cardholder data is at most {MAX_ACCOUNT} bytes")]
    AccountTooLong,
    /// The card already holds [`MAX_RECORDS`] records.
    #[error("a card holds at most {MAX_RECORDS} provider records")]
    TooManyRecords,
    /// The provider (this id) already has a record on the card.
    #[error("provider {0} already has a record on this card")]
    DuplicateProvider(u32),
    /// [`ReadAccess::Pin`] on a card without a PIN: it could never be read.
    #[error("a record read under the PIN needs a card with a PIN (CardState::with_pin first)")]
    NoPin,
}

/// One service provider's record as the card keeps it (seed 003 claims 10–12). The key is
/// private: READ RECORD answers [`ServiceProviderRecord::info`], everything but the key;
/// `Debug` masks it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceProviderRecord {
    pub provider_id: u32,
    /// The provider's name (claim 10's name field), at most [`MAX_NAME`] bytes of UTF-8.
    pub name: String,
    /// The provider's card key: its master diversified by this card's id.
    key: DesKey,
    pub key_type: KeyType,
    /// Information unique to this provider (claim 10), at most [`MAX_ACCOUNT`] bytes.
    pub account: Vec<u8>,
    /// The instrument type the provider supports (claim 11), e.g. [`INSTRUMENT_CREDIT`].
    pub instrument: u8,
    pub read_access: ReadAccess,
    pub update_access: UpdateAccess,
    /// The counter of the last update applied (0: never updated); an update must name a
    /// higher one.
    pub update_counter: u32,
}

impl ServiceProviderRecord {
    /// What READ RECORD tells: the record without its key.
    pub fn info(&self) -> ProviderRecordInfo {
        ProviderRecordInfo {
            provider_id: self.provider_id,
            name: self.name.clone(),
            key_type: self.key_type,
            account: self.account.clone(),
            instrument: self.instrument,
            read_access: self.read_access,
            update_access: self.update_access,
            update_counter: self.update_counter,
        }
    }
}

/// What a provider personalises on a card; [`CardState::with_provider`] adds the key
/// diversified from the provider's master for that card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderSpec {
    pub provider_id: u32,
    /// At most [`MAX_NAME`] bytes of UTF-8.
    pub name: String,
    /// At most [`MAX_ACCOUNT`] bytes.
    pub account: Vec<u8>,
    /// One of the `INSTRUMENT_*` codes, or the provider's own.
    pub instrument: u8,
    pub read_access: ReadAccess,
}

/// READ RECORD's answer for a provider record (SFI 1): `provider_id u32 ‖ key_type u8 ‖
/// instrument u8 ‖ read_access u8 ‖ update_access u8 ‖ update_counter u32 ‖ name_len u8 ‖
/// name ‖ account_len u8 ‖ account` (big-endian; 14 to 174 bytes). No key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderRecordInfo {
    pub provider_id: u32,
    pub name: String,
    pub key_type: KeyType,
    pub account: Vec<u8>,
    pub instrument: u8,
    pub read_access: ReadAccess,
    pub update_access: UpdateAccess,
    pub update_counter: u32,
}

impl ProviderRecordInfo {
    /// The READ RECORD layout above.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.provider_id)
            .u8(self.key_type.code())
            .u8(self.instrument)
            .u8(self.read_access.code())
            .u8(self.update_access.code())
            .u32(self.update_counter);
        write_var(&mut w, self.name.as_bytes());
        write_var(&mut w, &self.account);
        w.finish()
    }

    /// # Errors
    ///
    /// Any bytes that are not the layout: short, long, unknown codes, a field over its
    /// maximum, a name that is not UTF-8.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let bad = LayoutError(b.len());
        let mut r = Reader::new(b);
        let provider_id = r.u32()?;
        let key_type = KeyType::from_code(r.u8()?).ok_or(bad)?;
        let instrument = r.u8()?;
        let read_access = ReadAccess::from_code(r.u8()?).ok_or(bad)?;
        let update_access = UpdateAccess::from_code(r.u8()?).ok_or(bad)?;
        let update_counter = r.u32()?;
        let name = read_name(&mut r)?;
        let account = read_var(&mut r, MAX_ACCOUNT)?.to_vec();
        r.end()?;
        Ok(Self {
            provider_id,
            name,
            key_type,
            account,
            instrument,
            read_access,
            update_access,
            update_counter,
        })
    }
}

/// The cardholder data area (claim 1), READ RECORD of SFI 2, record 1: `read_access u8 ‖
/// name_len u8 ‖ name ‖ data_len u8 ‖ data` (3 to 163 bytes). `data` is free-form
/// (address, date of birth: the issuer's layout), at most [`MAX_ACCOUNT`] bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cardholder {
    pub name: String,
    pub data: Vec<u8>,
    pub read_access: ReadAccess,
}

impl Cardholder {
    /// The READ RECORD layout above.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.read_access.code());
        write_var(&mut w, self.name.as_bytes());
        write_var(&mut w, &self.data);
        w.finish()
    }

    /// # Errors
    ///
    /// Any bytes that are not the layout.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let read_access = ReadAccess::from_code(r.u8()?).ok_or(LayoutError(b.len()))?;
        let name = read_name(&mut r)?;
        let data = read_var(&mut r, MAX_ACCOUNT)?.to_vec();
        r.end()?;
        Ok(Self {
            name,
            data,
            read_access,
        })
    }
}

/// UPDATE RECORD's data: `provider_id u32 ‖ counter u32 ‖ account_len u8 ‖ account ‖ mac
/// [8]` (17 to 145 bytes). The MAC is [`crypto::sign`] under the provider's card key,
/// label `UREC`, over [`RecordUpdate::signed_fields`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordUpdate {
    /// The provider whose record this replaces (must be the addressed record's).
    pub provider_id: u32,
    /// Above the record's [`ServiceProviderRecord::update_counter`], or the card answers
    /// `9405`.
    pub counter: u32,
    /// The new account information, at most [`MAX_ACCOUNT`] bytes.
    pub account: Vec<u8>,
    pub mac: Mac,
}

impl RecordUpdate {
    /// An update signed with the provider's card key for `card_id` (the provider's
    /// [`MasterKey::card_key`]).
    ///
    /// # Errors
    ///
    /// Account information over [`MAX_ACCOUNT`] bytes.
    pub fn sign(
        card_key: &DesKey,
        card_id: u64,
        provider_id: u32,
        counter: u32,
        account: Vec<u8>,
    ) -> Result<Self, RecordError> {
        if account.len() > MAX_ACCOUNT {
            return Err(RecordError::AccountTooLong);
        }
        let mut u = Self {
            provider_id,
            counter,
            account,
            mac: [0; 8],
        };
        u.mac = crypto::sign(card_key, LABEL_UPDATE, &u.signed_fields(card_id));
        Ok(u)
    }

    /// What the MAC covers: `card_id u64 ‖ provider_id u32 ‖ counter u32 ‖ account_len u8
    /// ‖ account`.
    pub fn signed_fields(&self, card_id: u64) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(card_id).u32(self.provider_id).u32(self.counter);
        write_var(&mut w, &self.account);
        w.finish()
    }

    /// UPDATE RECORD's data layout above.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u32(self.provider_id).u32(self.counter);
        write_var(&mut w, &self.account);
        w.bytes(&self.mac);
        w.finish()
    }

    /// # Errors
    ///
    /// Any bytes that are not the layout (account over [`MAX_ACCOUNT`] included).
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let provider_id = r.u32()?;
        let counter = r.u32()?;
        let account = read_var(&mut r, MAX_ACCOUNT)?.to_vec();
        let mac = r.take()?;
        r.end()?;
        Ok(Self {
            provider_id,
            counter,
            account,
            mac,
        })
    }

    /// Whether `receipt` (UPDATE RECORD's 8-byte answer) is the card's proof that it
    /// applied this update: MAC label `URSP` under the same key over the same fields.
    pub fn verify_receipt(&self, card_key: &DesKey, card_id: u64, receipt: &[u8]) -> bool {
        receipt.try_into().is_ok_and(|m: Mac| {
            crypto::verify(card_key, LABEL_RECEIPT, &self.signed_fields(card_id), &m)
        })
    }
}

fn write_var(w: &mut Writer, v: &[u8]) {
    // Callers keep fields at most MAX_ACCOUNT (< 256) bytes.
    w.u8(v.len().min(usize::from(u8::MAX)) as u8).bytes(v);
}

fn read_var<'a>(r: &mut Reader<'a>, max: usize) -> Result<&'a [u8], LayoutError> {
    let n = usize::from(r.u8()?);
    if n > max {
        return Err(LayoutError(n));
    }
    r.bytes(n)
}

fn read_name(r: &mut Reader) -> Result<String, LayoutError> {
    let b = read_var(r, MAX_NAME)?;
    String::from_utf8(b.to_vec()).map_err(|_| LayoutError(b.len()))
}

fn check_name(name: &str) -> Result<(), RecordError> {
    if name.len() > MAX_NAME {
        Err(RecordError::NameTooLong)
    } else {
        Ok(())
    }
}

impl CardState {
    /// This card with a service provider's record (seed 003 claims 10–12) after the ones it
    /// has (record number = position, from 1): the spec's fields, key type
    /// [`KeyType::Tdes2Mac3`], the key `master.card_key(card_id)`, update access
    /// [`UpdateAccess::ProviderMac`], update counter 0.
    ///
    /// # Errors
    ///
    /// A name or account over its maximum, a [`MAX_RECORDS`]th-plus record, a provider
    /// already on the card, or [`ReadAccess::Pin`] on a card without a PIN (add the PIN
    /// first, [`CardState::with_pin`]).
    pub fn with_provider(
        mut self,
        spec: &ProviderSpec,
        master: &MasterKey,
    ) -> Result<Self, RecordError> {
        check_name(&spec.name)?;
        if spec.account.len() > MAX_ACCOUNT {
            return Err(RecordError::AccountTooLong);
        }
        if self.providers.len() >= MAX_RECORDS {
            return Err(RecordError::TooManyRecords);
        }
        if self
            .providers
            .iter()
            .any(|r| r.provider_id == spec.provider_id)
        {
            return Err(RecordError::DuplicateProvider(spec.provider_id));
        }
        if spec.read_access == ReadAccess::Pin && self.pin.is_none() {
            return Err(RecordError::NoPin);
        }
        self.providers.push(ServiceProviderRecord {
            provider_id: spec.provider_id,
            name: spec.name.clone(),
            key: master.card_key(self.card_id),
            key_type: KeyType::Tdes2Mac3,
            account: spec.account.clone(),
            instrument: spec.instrument,
            read_access: spec.read_access,
            update_access: UpdateAccess::ProviderMac,
            update_counter: 0,
        });
        Ok(self)
    }

    /// This card with the cardholder data area (claim 1), replacing any.
    ///
    /// # Errors
    ///
    /// A name or data over its maximum, or [`ReadAccess::Pin`] on a card without a PIN.
    pub fn with_cardholder(mut self, cardholder: Cardholder) -> Result<Self, RecordError> {
        check_name(&cardholder.name)?;
        if cardholder.data.len() > MAX_ACCOUNT {
            return Err(RecordError::AccountTooLong);
        }
        if cardholder.read_access == ReadAccess::Pin && self.pin.is_none() {
            return Err(RecordError::NoPin);
        }
        self.cardholder = Some(cardholder);
        Ok(self)
    }
}

fn check_read(access: ReadAccess, pin_verified: bool) -> Result<(), StatusWord> {
    match access {
        ReadAccess::Always => Ok(()),
        ReadAccess::Pin if pin_verified => Ok(()),
        ReadAccess::Pin => Err(SW_SECURITY_NOT_SATISFIED),
    }
}

/// The provider record P1 names (from 1), if any.
fn record_index(p1: u8) -> Result<usize, StatusWord> {
    usize::from(p1).checked_sub(1).ok_or(StatusWord::WRONG_P1P2)
}

/// READ RECORD on a selected card; `pin_verified`: a VERIFY succeeded in this session.
pub(crate) fn read_record(
    state: &CardState,
    pin_verified: bool,
    cmd: &Command,
) -> Result<Vec<u8>, StatusWord> {
    if !cmd.data.is_empty() {
        return Err(StatusWord::WRONG_LENGTH);
    }
    let index = record_index(cmd.p1)?;
    match cmd.p2 {
        P2_CURRENT_FILE | P2_PROVIDER_RECORDS => {
            let rec = state.providers.get(index).ok_or(SW_RECORD_NOT_FOUND)?;
            check_read(rec.read_access, pin_verified)?;
            Ok(rec.info().encode())
        }
        P2_CARDHOLDER => {
            let ch = state
                .cardholder
                .as_ref()
                .filter(|_| index == 0)
                .ok_or(SW_RECORD_NOT_FOUND)?;
            check_read(ch.read_access, pin_verified)?;
            Ok(ch.encode())
        }
        _ => Err(StatusWord::WRONG_P1P2),
    }
}

/// UPDATE RECORD on a selected card: checks everything, then replaces the account
/// information and the counter in one step. `Ok` is the receipt; the state changed.
pub(crate) fn update_record(state: &mut CardState, cmd: &Command) -> Result<Vec<u8>, StatusWord> {
    if cmd.data.is_empty() {
        return Err(StatusWord::WRONG_LENGTH);
    }
    let index = record_index(cmd.p1)?;
    if !matches!(cmd.p2, P2_CURRENT_FILE | P2_PROVIDER_RECORDS) {
        return Err(StatusWord::WRONG_P1P2);
    }
    let card_id = state.card_id;
    let rec = state.providers.get_mut(index).ok_or(SW_RECORD_NOT_FOUND)?;
    let upd = RecordUpdate::decode(&cmd.data).map_err(|_| StatusWord::BAD_DATA)?;
    if upd.provider_id != rec.provider_id {
        return Err(StatusWord::BAD_DATA);
    }
    let fields = upd.signed_fields(card_id);
    match rec.update_access {
        UpdateAccess::ProviderMac => {
            if !crypto::verify(&rec.key, LABEL_UPDATE, &fields, &upd.mac) {
                return Err(SW_SECURITY_NOT_SATISFIED);
            }
        }
    }
    if upd.counter <= rec.update_counter {
        return Err(StatusWord::REPLAY);
    }
    rec.account = upd.account;
    rec.update_counter = upd.counter;
    Ok(crypto::sign(&rec.key, LABEL_RECEIPT, &fields).to_vec())
}
