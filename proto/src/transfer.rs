//! Card-to-card transfer (seed 004, FIG. 3–4 and the packets of FIG. 6) and the application
//! keys with epoch numbers it runs on.
//!
//! # Application keys (seed 004, KEY_NUMBER)
//!
//! Every cardholder card holds four application keys, each with its epoch number (0–255),
//! oldest first ([`AppKeys`]). All cards of the scheme share the key of an epoch: it is
//! derived from the scheme's application master ([`app_key`]), which only the issuer's
//! personalisation and the HSM that pushes new epochs hold. Two cards can transact if at
//! least two of their epochs match ([`common_epochs`]): the older of the two newest common
//! epochs is AK0, the newer AK1. A new key replaces the oldest ([`AppKeys::push`]).
//!
//! # The transfer (FIG. 4A–4B), payer card 1, payee card 2
//!
//! | step | who | command ([`crate::card`], `80 5A P1 00`) | answer |
//! |---|---|---|---|
//! | 403 | payee | RECEIVE (P1 = 01): amount, currency | its card id, epochs and challenge R0 (kept across power loss until the next RECEIVE or P1) |
//! | 405–408 | payer | SEND (02): amount, currency, payee id, payee epochs, R0 | AK0, AK1 epochs and P1 under AK0 (P1 names the payee and echoes R0) |
//! | 410–412 | payee | P1 (03): epochs, P1 | P2 under AK0, P3 under AK1; the payee now waits for P4 (kept across power loss) |
//! | 414 | payer | P2 P3 (04) | P4 under AK1: the payer is debited, and keeps P4 until it is settled |
//! | 417 | payee | P4 (05) | a receipt: the payee is credited |
//!
//! Each packet is sealed ([`crate::crypto::seal`]: triple-DES CBC and a MAC, under keys
//! derived from the application key) in place of the seed's mixing and encryption; each
//! echoes the other card's challenge, so a replayed packet fails: P1 the payee's R0 (a P1
//! captured once cannot open another receive), P2 the payer's R1, P4 the payee's R2. Each
//! card's challenges end in a counter it persists (`transfer_nonce`), so none repeats even
//! if its random generator does.
//!
//! # Settling (a box or the gateway died mid-transfer)
//!
//! The payer's debit and the payee's credit are two cards' state changes; between them P4
//! may be lost. Both cards keep what decides it:
//! - the payer keeps P4 and the transfer's random R2 until it sees the payee's receipt or
//!   cancellation (STATUS, P1 = 08, answers them; a new SEND waits until then);
//! - the payee keeps its pending receive (R2) until P4 credits it or CANCEL (06) ends it,
//!   and remembers its signed word on the last transfer from each of its last
//!   [`TRANSFER_MEMORY`] payers (a payer has one unsettled transfer at most, so its last one
//!   is the one it waits on; the word is kept signed, so it outlives the key it was made
//!   under).
//! - a card takes no key push that would drop the key its own unsettled transfer uses: it
//!   takes the next one, once settled.
//!
//! So either P4 is delivered again (the payee credits it once, and its receipt settles the
//! payer), or the payee cancels and the payer takes its cancellation (RESOLVE, 07) and is
//! credited back. The payee never credits a cancelled R2, and the payer re-credits only a
//! cancellation signed under AK1 for its own R2: never both, never neither.

use serde::{Deserialize, Serialize};

use crate::codec::{LayoutError, Reader, Writer};
use crate::crypto::{DesKey, Mac};
use crate::money::Currency;
use crate::purse::{read_currency, write_currency};

/// Application keys a card holds (seed 004: four).
pub const APP_KEYS: usize = 4;

/// The application number every cardholder card shares (FIG. 6 fields 602, 612, 622, 632).
pub const APPLICATION_NUMBER: [u8; 8] = *b"PLXFER01";

/// Incoming transfers whose outcome the payee card remembers, newest last.
pub const TRANSFER_MEMORY: usize = 32;

/// The debit code of P3 and the credit code of P4 (FIG. 6: "the correct credit code which
/// is different from the debit code").
pub const DEBIT_CODE: u8 = b'D';
pub const CREDIT_CODE: u8 = b'C';

/// MAC labels of the payee's receipt and cancellation.
pub const RECEIPT_LABEL: &[u8; 4] = b"TRCV";
pub const CANCEL_LABEL: &[u8; 4] = b"TCAN";

/// The application key of `epoch`, derived from the scheme's application master.
pub fn app_key(master: &DesKey, epoch: u8) -> AppKey {
    AppKey {
        epoch,
        key: master.derive(b"AK", &[epoch]),
    }
}

/// One application key and its epoch number. `Debug` shows the epoch only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppKey {
    pub epoch: u8,
    key: DesKey,
}

impl std::fmt::Debug for AppKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppKey({})", self.epoch)
    }
}

impl AppKey {
    /// The key itself.
    pub fn key(&self) -> &DesKey {
        &self.key
    }

    /// The wire form a key push carries: epoch ‖ 16 key bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.epoch).bytes(self.key.bytes());
        w.finish()
    }

    /// # Errors
    /// Not 17 bytes.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let epoch = r.u8()?;
        let key = DesKey::new(r.take()?);
        r.end()?;
        Ok(Self { epoch, key })
    }
}

/// A new epoch's application key pushed to a card with a bank load (seed 004 FIG. 5: the
/// bank supplies "a new key if the card does not have the latest"), carried in the LOAD APDU
/// after the key update and the UNBLOCK, each optional. Sealed like them
/// ([`crate::crypto::seal`]) under [`AppKeyPush::session`]: the card's current load key and
/// this load's S1, so it opens in that LOAD only. The card takes it with the credit, in
/// place of its oldest key, if it is newer than its newest; an older one changes nothing.
pub struct AppKeyPush;

impl AppKeyPush {
    /// The sealed length in the LOAD APDU: IV, 24 bytes of ciphertext (`AKEY`, epoch, key,
    /// padding), MAC. Distinct from a key update's 56 and an UNBLOCK's 24, and so are all
    /// their sums.
    pub const SEALED_LEN: usize = 40;
    const MAGIC: &'static [u8; 4] = b"AKEY";

    /// The key a push for one load is sealed under.
    pub fn session(card_load_key: &DesKey, s1: &Mac) -> DesKey {
        crate::purse::load_session(card_load_key, b"AKY", s1)
    }

    /// The plaintext: `AKEY`, then [`AppKey::encode`].
    pub fn encode(key: &AppKey) -> Vec<u8> {
        let mut v = Self::MAGIC.to_vec();
        v.extend_from_slice(&key.encode());
        v
    }

    /// # Errors
    /// Not `AKEY` and an [`AppKey`].
    pub fn decode(b: &[u8]) -> Result<AppKey, LayoutError> {
        match b.split_first_chunk::<4>() {
            Some((magic, rest)) if magic == Self::MAGIC => AppKey::decode(rest),
            _ => Err(LayoutError(b.len())),
        }
    }
}

/// A card's four application keys, oldest first, epochs strictly increasing.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppKeys([AppKey; APP_KEYS]);

impl std::fmt::Debug for AppKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AppKeys{:?}", self.epochs())
    }
}

impl AppKeys {
    /// The keys of epochs `oldest` to `oldest + 3`, as personalisation writes them.
    ///
    /// # Errors
    /// `oldest + 3` is past epoch 255.
    pub fn from_master(master: &DesKey, oldest: u8) -> Result<Self, String> {
        if oldest > u8::MAX - 3 {
            return Err(format!(
                "application key epochs {oldest}..{} pass 255",
                u16::from(oldest) + 3
            ));
        }
        Ok(Self(std::array::from_fn(|i| {
            app_key(master, oldest + i as u8)
        })))
    }

    /// The epoch numbers, oldest first.
    pub fn epochs(&self) -> [u8; APP_KEYS] {
        std::array::from_fn(|i| self.0[i].epoch)
    }

    /// The key of `epoch`, if this card holds it.
    pub fn key(&self, epoch: u8) -> Option<&DesKey> {
        self.0.iter().find(|k| k.epoch == epoch).map(AppKey::key)
    }

    /// The newest epoch held.
    pub fn newest(&self) -> u8 {
        self.0[APP_KEYS - 1].epoch
    }

    /// Takes a new epoch's key in place of the oldest (seed 004 block 517).
    ///
    /// # Errors
    /// The key is not newer than the newest held (a replayed or stale push).
    /// The oldest epoch held (the one a push drops).
    pub fn oldest(&self) -> u8 {
        self.0[0].epoch
    }

    pub fn push(&mut self, key: AppKey) -> Result<(), String> {
        if key.epoch <= self.newest() {
            return Err(format!(
                "application key {} is not newer than the card's newest, {}",
                key.epoch,
                self.newest()
            ));
        }
        self.0.rotate_left(1);
        self.0[APP_KEYS - 1] = key;
        Ok(())
    }
}

/// Two cards' epoch sets that share fewer than two epochs (seed 004: "it would not be
/// possible to implement a successful money transfer").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "the cards share fewer than two application keys: this card holds {}, the other {} \
     (seed 004 needs two in common; the older card takes the newer keys with its next bank load)",
    show(ours),
    show(theirs)
)]
pub struct NoCommonKeys {
    pub ours: [u8; APP_KEYS],
    pub theirs: [u8; APP_KEYS],
}

fn show(e: &[u8; APP_KEYS]) -> String {
    format!("{{{}, {}, {}, {}}}", e[0], e[1], e[2], e[3])
}

/// The (AK0, AK1) epochs two cards use: the two newest they share, older first.
///
/// # Errors
/// Fewer than two in common.
pub fn common_epochs(
    ours: [u8; APP_KEYS],
    theirs: [u8; APP_KEYS],
) -> Result<(u8, u8), NoCommonKeys> {
    let mut common: Vec<u8> = ours
        .iter()
        .copied()
        .filter(|e| theirs.contains(e))
        .collect();
    common.sort_unstable();
    common.dedup();
    match common.as_slice() {
        [.., ak0, ak1] => Ok((*ak0, *ak1)),
        _ => Err(NoCommonKeys { ours, theirs }),
    }
}

/// A card's 8-byte public name (FIG. 6 fields 603, 613): ASCII, space-padded.
pub type PublicName = [u8; 8];

/// Whether `name` is a valid public name: printable ASCII (the payer's check of P2).
pub fn valid_name(name: &PublicName) -> bool {
    name.iter().all(|b| (0x20..0x7F).contains(b))
}

/// The public name of a card: its holder's name, or `CARD` and the card id's last four
/// digits, cut or space-padded to 8 ASCII bytes.
pub fn public_name(holder: Option<&str>, card_id: u64) -> PublicName {
    let text = holder
        .map(str::to_owned)
        .unwrap_or_else(|| format!("CARD{:04}", card_id % 10_000));
    let mut out = [b' '; 8];
    for (o, c) in out
        .iter_mut()
        .zip(text.bytes().filter(|b| (0x20..0x7F).contains(b)))
    {
        *o = c;
    }
    out
}

/// P1 and P2 (FIG. 6 fields 601–604, 611–614), sealed under AK0: the payer's random R1
/// (P2 echoes it), the application number, the sender's public name and account number,
/// and — in P1 — the amount the payer will send, the payee's card id and its challenge R0
/// (P2 repeats them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub random: [u8; 8],
    pub application: [u8; 8],
    pub name: PublicName,
    pub card_id: u64,
    pub amount: u64,
    pub currency: Currency,
    pub payee: u64,
    pub payee_challenge: [u8; 8],
}

impl Greeting {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&self.random)
            .bytes(&self.application)
            .bytes(&self.name)
            .u64(self.card_id)
            .u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u64(self.payee).bytes(&self.payee_challenge);
        w.finish()
    }

    /// # Errors
    /// Another layout.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            random: r.take()?,
            application: r.take()?,
            name: r.take()?,
            card_id: r.u64()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            payee: r.u64()?,
            payee_challenge: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// P3 and P4 (FIG. 6 fields 621–624, 631–634), sealed under AK1: the payee's random R2
/// (P4 echoes it), the application number, the debit code (P3) or credit code (P4), the
/// amount, and both cards' account numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValuePacket {
    pub random: [u8; 8],
    pub application: [u8; 8],
    pub code: u8,
    pub amount: u64,
    pub currency: Currency,
    pub payer: u64,
    pub payee: u64,
}

impl ValuePacket {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(&self.random)
            .bytes(&self.application)
            .u8(self.code)
            .u64(self.amount);
        write_currency(&mut w, self.currency);
        w.u64(self.payer).u64(self.payee);
        w.finish()
    }

    /// # Errors
    /// Another layout.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            random: r.take()?,
            application: r.take()?,
            code: r.u8()?,
            amount: r.u64()?,
            currency: read_currency(&mut r)?,
            payer: r.u64()?,
            payee: r.u64()?,
        };
        r.end()?;
        Ok(v)
    }

    /// The fields the payee's receipt or cancellation signs.
    pub fn settled_fields(r2: &[u8; 8], amount: u64, payer: u64, payee: u64) -> Vec<u8> {
        let mut w = Writer::default();
        w.bytes(r2).u64(amount).u64(payer).u64(payee);
        w.finish()
    }
}

/// How a payee ended an incoming transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Settled {
    /// P4 credited it: the payer keeps its debit.
    Credited = 0,
    /// The payee cancelled it before any P4: the payer is credited back.
    Cancelled = 1,
}

impl Settled {
    pub fn label(self) -> &'static [u8; 4] {
        match self {
            Self::Credited => RECEIPT_LABEL,
            Self::Cancelled => CANCEL_LABEL,
        }
    }

    /// # Errors
    /// Neither 0 nor 1.
    pub fn from_code(c: u8) -> Result<Self, LayoutError> {
        match c {
            0 => Ok(Self::Credited),
            1 => Ok(Self::Cancelled),
            _ => Err(LayoutError(1)),
        }
    }
}

/// The payee's word on a transfer, signed under AK1: CANCEL's answer, P4's (a receipt) and
/// RESOLVE's data. `kind ‖ R2 ‖ MAC`, 17 bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settlement {
    pub kind: Settled,
    pub random: [u8; 8],
    pub mac: Mac,
}

impl Settlement {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u8(self.kind as u8).bytes(&self.random).bytes(&self.mac);
        w.finish()
    }

    /// # Errors
    /// Another layout.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let v = Self {
            kind: Settled::from_code(r.u8()?)?,
            random: r.take()?,
            mac: r.take()?,
        };
        r.end()?;
        Ok(v)
    }
}

/// What the payer card keeps of a transfer it was debited for, until it is settled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sent {
    pub random: [u8; 8],
    pub amount: u64,
    pub currency: Currency,
    pub payee: u64,
    pub ak1: u8,
    /// P4, to deliver again.
    pub p4: Vec<u8>,
}

/// What the payee card keeps of a transfer it answered P1 for, until P4 or CANCEL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receiving {
    pub random: [u8; 8],
    pub amount: u64,
    pub currency: Currency,
    pub payer: u64,
    pub ak1: u8,
}

/// A RECEIVE waiting for its P1: the challenge P1 must echo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expecting {
    pub challenge: [u8; 8],
    pub amount: u64,
    pub currency: Currency,
}

/// An incoming transfer the payee settled, and its signed word on it (kept signed: it
/// outlives the key it was made under).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Remembered {
    pub receiving: Receiving,
    pub word: Settlement,
}

/// STATUS's answer: the card's unsettled transfers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TransferStatus {
    /// Debited, waiting for the payee's receipt or cancellation.
    pub sent: Option<Sent>,
    /// P3 given, waiting for P4 or a cancellation.
    pub receiving: Option<Receiving>,
}

impl TransferStatus {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        match &self.sent {
            None => {
                w.u8(0);
            }
            Some(s) => {
                w.u8(1).bytes(&s.random).u64(s.amount);
                write_currency(&mut w, s.currency);
                w.u64(s.payee).u8(s.ak1).u16(s.p4.len() as u16).bytes(&s.p4);
            }
        }
        match &self.receiving {
            None => {
                w.u8(0);
            }
            Some(r) => {
                w.u8(1).bytes(&r.random).u64(r.amount);
                write_currency(&mut w, r.currency);
                w.u64(r.payer).u8(r.ak1);
            }
        }
        w.finish()
    }

    /// # Errors
    /// Another layout.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let sent = match r.u8()? {
            0 => None,
            1 => Some(Sent {
                random: r.take()?,
                amount: r.u64()?,
                currency: read_currency(&mut r)?,
                payee: r.u64()?,
                ak1: r.u8()?,
                p4: {
                    let n = r.u16()?;
                    r.bytes(n.into())?.to_vec()
                },
            }),
            _ => return Err(LayoutError(b.len())),
        };
        let receiving = match r.u8()? {
            0 => None,
            1 => Some(Receiving {
                random: r.take()?,
                amount: r.u64()?,
                currency: read_currency(&mut r)?,
                payer: r.u64()?,
                ak1: r.u8()?,
            }),
            _ => return Err(LayoutError(b.len())),
        };
        r.end()?;
        Ok(Self { sent, receiving })
    }
}

/// Writes length-prefixed (u16) fields: the layout of answers carrying two packets.
pub fn write_parts(parts: &[&[u8]]) -> Vec<u8> {
    let mut w = Writer::default();
    for p in parts {
        w.u16(p.len() as u16).bytes(p);
    }
    w.finish()
}

/// Reads `N` length-prefixed fields, nothing after them.
///
/// # Errors
/// Another layout.
pub fn read_parts<const N: usize>(b: &[u8]) -> Result<[Vec<u8>; N], LayoutError> {
    let mut r = Reader::new(b);
    let mut out: [Vec<u8>; N] = std::array::from_fn(|_| Vec::new());
    for o in &mut out {
        let n = r.u16()?;
        *o = r.bytes(n.into())?.to_vec();
    }
    r.end()?;
    Ok(out)
}

/// The next step that settles two cards' transfer state ([`crate::transfer`]: settling),
/// from each card's STATUS. Whoever drives it (a box, the gateway's recovery, a test)
/// repeats it until [`SettleStep::Settled`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SettleStep {
    /// The payer was debited and the payee still waits for this P4: deliver it (P1 = 05);
    /// its receipt then goes to the payer (RESOLVE).
    DeliverP4 { p4: Vec<u8> },
    /// Ask the payee for its word on R2 (CANCEL: it cancels a pending R2, or answers the
    /// outcome it remembers); give the answer to the payer (RESOLVE) if the payer has a
    /// sent transfer of that R2.
    AskPayee { random: [u8; 8] },
    /// Neither card has a transfer of these two pending.
    Settled,
}

/// See [`SettleStep`]: for the transfer from card `payer_id` to card `payee_id`, from the
/// two cards' STATUS answers. Either card's transfer with a third card is left alone.
/// `p4_refused`: the payee refused this P4 before (over its maximum balance, blocked):
/// then it is asked to cancel instead, and the payer is credited back.
pub fn next_settle_step(
    (payer_id, payer): (u64, &TransferStatus),
    (payee_id, payee): (u64, &TransferStatus),
    p4_refused: bool,
) -> SettleStep {
    let sent = payer.sent.as_ref().filter(|s| s.payee == payee_id);
    let receiving = payee.receiving.as_ref().filter(|r| r.payer == payer_id);
    match (sent, receiving) {
        (Some(s), Some(r)) if s.random == r.random && !p4_refused => {
            SettleStep::DeliverP4 { p4: s.p4.clone() }
        }
        (Some(s), _) => SettleStep::AskPayee { random: s.random },
        // The payer holds no debit for it: it never sent P4 (a payer debits and keeps P4 in
        // one state change), so the payee may cancel it.
        (None, Some(r)) => SettleStep::AskPayee { random: r.random },
        (None, None) => SettleStep::Settled,
    }
}
