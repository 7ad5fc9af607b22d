//! The security card as a card: the PSAM application behind an APDU interface, so a
//! payment-server terminal drives it in a PC/SC reader the way 001 [0041]–[0044] and
//! [0090]–[0094] describe. It runs the same [`SecurityCard`] logic as the software security
//! card; this module only adds the APDUs, the replay session and the status words.
//!
//! # The [0093] replay
//!
//! The terminal replays, one at a time, what the purse card gave the box: its answer to
//! reset (CARD ATR), its INITIALIZE FOR PURCHASE response with the draw (INITIALIZE, answered
//! with the debit command), and — FIG. 4 only — its DEBIT response (DEBIT RESPONSE, compared
//! here). The security card thus sees the purse card as if it were in a reader beside it.
//! For FIG. 5–7 the INITIALIZE answer also carries the expected card signature, and the
//! security card gets no further command for that transaction ([0097]).
//!
//! # APDU table
//!
//! CLA `80` (proprietary); `90` is the same command with ISO 7816-4 command chaining (more
//! blocks follow). Integers are big-endian. `txn` is the security card's transaction number
//! (u32). Every command but SELECT needs the application selected first (`6985`).
//!
//! | command | CLA INS P1 P2 | data | response data |
//! |---|---|---|---|
//! | SELECT | `00 A4 04 00` | [`PSAM_AID`] | — |
//! | CARD ATR | `80 10 00 00` | the purse card's ATR (2–33 bytes, TS `3B` or `3F`): opens a replay session | — |
//! | INITIALIZE | `80 12 P1 00` | P1 bit 0: early release (FIG. 5–7). amount u64, currency code u16, exponent u8, date (year u16, month u8, day u8), merchant id (length u8, UTF-8), transaction id (length u8, UTF-8), then the card's INITIALIZE FOR PURCHASE response ([`PurchaseInit::encode`]); ends the replay session | the debit command ([`DebitCommand::encode`]), then with early release the expected card signature (8 bytes) |
//! | DEBIT RESPONSE | `80 14 00 00` | txn, then the card's DEBIT response ([`DebitResponse::encode`]) | the sale counted: the card's status after it (GET STATUS layout) |
//! | REVERSE | `80 16 00 00` | txn | the card's status after it (GET STATUS layout) |
//! | VERIFY NOT DEBITED | `80 18 00 00` | txn, then a later INITIALIZE FOR PURCHASE response | — (proved not debited) |
//! | FORGET | `80 1A 00 00` | txn | `01` dropped, `00` kept |
//! | PURGE SETTLED | `80/90 1C 00 00` | the open txns to keep, 4 bytes each (chained past 252 bytes) | dropped count u32 |
//! | LOAD HOTLIST | `80/90 1E 00 00` | the issuer's [`Hotlist`] (postcard; chained) | — |
//! | INITIALIZE CREDIT | `80 20 00 00` | a refund: as INITIALIZE's (amount, currency, date, merchant id, refund id), then the card's INITIALIZE FOR CREDIT response; after CARD ATR, like INITIALIZE | the credit command ([`crate::purse::CreditCommand::encode`]); the refund counted off the totals |
//! | CREDIT RESPONSE | `80 22 00 00` | txn, then the card's CREDIT response | the card's status after it (GET STATUS layout) |
//! | RESOLVE CREDIT | `80 24 00 00` | txn, then a later INITIALIZE FOR PURCHASE response (its list of credit sessions run says whether the refund's ran) | `01` credited / `00` not credited (counted back), then the card's status after it (GET STATUS layout) |
//! | GET STATUS | `80 30 00 00 00` | — | id u64, txn counter u32, newest key version u8, hotlist version u64, n u8, then n × (currency code u16, exponent u8, count u64, amount u64) |
//! | GET LAST ERROR | `80 3E 00 00 00` | — | the last refusal's [`SecurityCardError`] (postcard), for its fields |
//!
//! Status words: `9000` done; ISO 7816-4 `6700` wrong length, `6A80` malformed data, `6985`
//! wrong sequence (no application selected, or INITIALIZE without CARD ATR), `6A82` unknown
//! AID, `6D00` unknown INS, `6E00` wrong CLA, `6581` not persisted (file-backed card);
//! refusals by the security-card logic are proprietary `94xx` (ISO 7816-4 leaves `9xxx` to
//! the application), one per [`SecurityCardError`] kind ([`status_word`]); their fields
//! come from GET LAST ERROR.

use serde::{Deserialize, Serialize};

use crate::apdu::{Command, Response, StatusWord};
use crate::codec::{LayoutError, Reader, Writer};
use crate::hotlist::Hotlist;
use crate::money::{Currency, Money};
use crate::purse::{
    CreditResponse, Date, DebitCommand, DebitResponse, MasterKeysFile, PurchaseInit, read_currency,
    write_currency,
};
use crate::security_card::{DebitAuthorization, DrawData, SecurityCard, SecurityCardError, Totals};

/// The PSAM application's AID (proprietary RID A000000999, PIX "PSAM").
pub const PSAM_AID: [u8; 9] = [0xA0, 0x00, 0x00, 0x09, 0x99, 0x50, 0x53, 0x41, 0x4D];
/// The class of every PSAM command ([`CLA_CHAINED`]: more blocks follow).
pub const CLA: u8 = 0x80;
/// [`CLA`] with the ISO 7816-4 command-chaining bit (b5).
pub const CLA_CHAINED: u8 = 0x90;
pub const INS_CARD_ATR: u8 = 0x10;
pub const INS_INITIALIZE: u8 = 0x12;
pub const INS_DEBIT_RESPONSE: u8 = 0x14;
pub const INS_REVERSE: u8 = 0x16;
pub const INS_VERIFY_NOT_DEBITED: u8 = 0x18;
pub const INS_FORGET: u8 = 0x1A;
pub const INS_PURGE_SETTLED: u8 = 0x1C;
pub const INS_LOAD_HOTLIST: u8 = 0x1E;
pub const INS_GET_STATUS: u8 = 0x30;
/// INITIALIZE CREDIT: a refund's credit command (issue 17; [`SecurityCard::issue_credit`]).
pub const INS_INITIALIZE_CREDIT: u8 = 0x20;
/// CREDIT RESPONSE: the card's signed answer to CREDIT ([`SecurityCard::complete_credit`]).
pub const INS_CREDIT_RESPONSE: u8 = 0x22;
/// RESOLVE CREDIT: an issued refund settled on the card's later INITIALIZE
/// ([`SecurityCard::resolve_credit`]).
pub const INS_RESOLVE_CREDIT: u8 = 0x24;
pub const INS_GET_LAST_ERROR: u8 = 0x3E;
/// INITIALIZE P1 bit 0: early release (FIG. 5–7).
pub const P1_EARLY_RELEASE: u8 = 0x01;
/// The most data one command block carries here (short APDUs; chained past it).
pub const BLOCK: usize = 252;
/// The most a chained command may carry in all (a hotlist of about 30,000 cards).
pub const MAX_CHAINED: usize = 256 * 1024;
/// The PSAM's answer to reset: T=0, historical bytes "PURSELINK-SAM".
pub const PSAM_ATR: [u8; 15] = [
    0x3B, 0x0D, b'P', b'U', b'R', b'S', b'E', b'L', b'I', b'N', b'K', b'-', b'S', b'A', b'M',
];

/// The status word a refusal answers with (`94xx`, one per kind; see the module table).
pub fn status_word(e: &SecurityCardError) -> StatusWord {
    use SecurityCardError::*;
    StatusWord(match e {
        BadCardData => 0x9481,
        UnknownKeyVersion { .. } => 0x9482,
        WrongCurrency { .. } => 0x9483,
        Expired => 0x9484,
        InsufficientValue { .. } => 0x9485,
        ZeroAmount => 0x9486,
        UnknownTransaction(_) => 0x9487,
        BadCardSignature => 0x9488,
        ResponseMismatch => 0x9489,
        AlreadyCompleted(_) => 0x948A,
        CounterExhausted => 0x948B,
        NoKey => 0x948C,
        StaleProof => 0x948D,
        CounterMoved { .. } => 0x948E,
        Hotlisted { .. } => 0x948F,
        RetiredKeyVersion { .. } => 0x9490,
        ValueInAuthentication { .. } => 0x9491,
        RefundExceedsTotals { .. } => 0x9492,
        CreditNeedsProof(_) => 0x9493,
        InitializeUsed { .. } => 0x9494,
        ProofUnavailable(_) => 0x9495,
        Terminal(_) => 0x94FF,
    })
}

/// What GET STATUS answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PsamStatus {
    pub security_card_id: u64,
    pub txn_counter: u32,
    pub newest_key_version: u8,
    pub hotlist_version: u64,
    pub totals: std::collections::BTreeMap<Currency, Totals>,
}

impl PsamStatus {
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::default();
        w.u64(self.security_card_id)
            .u32(self.txn_counter)
            .u8(self.newest_key_version)
            .u64(self.hotlist_version)
            .u8(self.totals.len() as u8);
        for (c, t) in &self.totals {
            write_currency(&mut w, *c);
            w.u64(t.count).u64(t.amount);
        }
        w.finish()
    }

    /// # Errors
    /// Short or trailing bytes.
    pub fn decode(b: &[u8]) -> Result<Self, LayoutError> {
        let mut r = Reader::new(b);
        let security_card_id = r.u64()?;
        let txn_counter = r.u32()?;
        let newest_key_version = r.u8()?;
        let hotlist_version = r.u64()?;
        let n = r.u8()?;
        let mut totals = std::collections::BTreeMap::new();
        for _ in 0..n {
            let c = read_currency(&mut r)?;
            let t = Totals {
                count: r.u64()?,
                amount: r.u64()?,
            };
            totals.insert(c, t);
        }
        r.end()?;
        Ok(Self {
            security_card_id,
            txn_counter,
            newest_key_version,
            hotlist_version,
            totals,
        })
    }
}

/// The draw part of INITIALIZE (before the card's response): see the table.
fn write_draw(w: &mut Writer, draw: &DrawData, today: Date) {
    w.u64(draw.amount.minor);
    write_currency(w, draw.amount.currency);
    today.write(w);
    for s in [&draw.merchant_id, &draw.transaction_id] {
        let b = s.as_bytes();
        w.u8(b.len().min(255) as u8).bytes(&b[..b.len().min(255)]);
    }
}

fn read_text(r: &mut Reader) -> Result<String, LayoutError> {
    let n = r.u8()?;
    let mut v = Vec::with_capacity(n.into());
    for _ in 0..n {
        v.push(r.u8()?);
    }
    String::from_utf8(v).map_err(|_| LayoutError(0))
}

/// Builders of the PSAM's command APDUs (the terminal's side), and the decoders of their
/// answers.
pub mod commands {
    use super::*;

    pub fn select() -> Vec<u8> {
        Command::new(0x00, 0xA4, 0x04, 0x00, PSAM_AID.to_vec(), None).to_bytes()
    }
    pub fn card_atr(atr: &[u8]) -> Vec<u8> {
        Command::new(CLA, INS_CARD_ATR, 0, 0, atr.to_vec(), None).to_bytes()
    }
    /// INITIALIZE; `None` if the data does not fit one block (a merchant or transaction id
    /// far longer than any the head end makes).
    pub fn initialize(draw: &DrawData, today: Date, early_release: bool) -> Option<Vec<u8>> {
        let mut w = Writer::default();
        write_draw(&mut w, draw, today);
        w.bytes(&draw.init.encode());
        let data = w.finish();
        let p1 = if early_release { P1_EARLY_RELEASE } else { 0 };
        (data.len() <= BLOCK)
            .then(|| Command::new(CLA, INS_INITIALIZE, p1, 0, data, None).to_bytes())
    }
    /// INITIALIZE CREDIT for a refund of `credit.amount` (`credit.init`: the card's
    /// INITIALIZE FOR CREDIT answer); `None` if it does not fit one block.
    pub fn initialize_credit(credit: &DrawData, today: Date) -> Option<Vec<u8>> {
        let mut w = Writer::default();
        write_draw(&mut w, credit, today);
        w.bytes(&credit.init.encode());
        let data = w.finish();
        (data.len() <= BLOCK)
            .then(|| Command::new(CLA, INS_INITIALIZE_CREDIT, 0, 0, data, None).to_bytes())
    }
    pub fn credit_response(txn: u32, resp: &CreditResponse) -> Vec<u8> {
        let mut data = txn.to_be_bytes().to_vec();
        data.extend(resp.encode());
        Command::new(CLA, INS_CREDIT_RESPONSE, 0, 0, data, None).to_bytes()
    }
    pub fn resolve_credit(txn: u32, later: &PurchaseInit) -> Vec<u8> {
        let mut data = txn.to_be_bytes().to_vec();
        data.extend(later.encode());
        Command::new(CLA, INS_RESOLVE_CREDIT, 0, 0, data, None).to_bytes()
    }
    pub fn debit_response(txn: u32, resp: &DebitResponse) -> Vec<u8> {
        let mut data = txn.to_be_bytes().to_vec();
        data.extend(resp.encode());
        Command::new(CLA, INS_DEBIT_RESPONSE, 0, 0, data, None).to_bytes()
    }
    pub fn reverse(txn: u32) -> Vec<u8> {
        Command::new(CLA, INS_REVERSE, 0, 0, txn.to_be_bytes().to_vec(), None).to_bytes()
    }
    pub fn verify_not_debited(txn: u32, proof: &PurchaseInit) -> Vec<u8> {
        let mut data = txn.to_be_bytes().to_vec();
        data.extend(proof.encode());
        Command::new(CLA, INS_VERIFY_NOT_DEBITED, 0, 0, data, None).to_bytes()
    }
    pub fn forget(txn: u32) -> Vec<u8> {
        Command::new(CLA, INS_FORGET, 0, 0, txn.to_be_bytes().to_vec(), Some(0)).to_bytes()
    }
    /// PURGE SETTLED, as one or more chained blocks.
    pub fn purge_settled(open: &[u32]) -> Vec<Vec<u8>> {
        let data: Vec<u8> = open.iter().flat_map(|n| n.to_be_bytes()).collect();
        chained(INS_PURGE_SETTLED, &data)
    }
    /// LOAD HOTLIST, as one or more chained blocks.
    pub fn load_hotlist(hotlist: &Hotlist) -> Vec<Vec<u8>> {
        chained(
            INS_LOAD_HOTLIST,
            &postcard::to_allocvec(hotlist).expect("in-memory serialization"),
        )
    }
    pub fn get_status() -> Vec<u8> {
        Command::new(CLA, INS_GET_STATUS, 0, 0, Vec::new(), Some(0)).to_bytes()
    }
    pub fn get_last_error() -> Vec<u8> {
        Command::new(CLA, INS_GET_LAST_ERROR, 0, 0, Vec::new(), Some(0)).to_bytes()
    }

    /// `data` in blocks of at most [`BLOCK`] bytes, all but the last with [`CLA_CHAINED`];
    /// no data is one case-1 command.
    fn chained(ins: u8, data: &[u8]) -> Vec<Vec<u8>> {
        if data.is_empty() {
            return vec![Command::new(CLA, ins, 0, 0, Vec::new(), None).to_bytes()];
        }
        let blocks: Vec<&[u8]> = data.chunks(BLOCK).collect();
        let last = blocks.len() - 1;
        blocks
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let cla = if i == last { CLA } else { CLA_CHAINED };
                Command::new(cla, ins, 0, 0, b.to_vec(), None).to_bytes()
            })
            .collect()
    }

    /// INITIALIZE's answer: the debit command and (early release) the expected signature.
    ///
    /// # Errors
    /// Not the length of a debit command, with or without 8 signature bytes.
    pub fn decode_authorization(
        data: &[u8],
        early_release: bool,
    ) -> Result<DebitAuthorization, LayoutError> {
        let (command, expected) = if early_release {
            let (c, e) = data.split_last_chunk::<8>().ok_or(LayoutError(0))?;
            (c, Some(*e))
        } else {
            (data, None)
        };
        Ok(DebitAuthorization {
            command: DebitCommand::decode(command)?,
            expected_card_signature: expected,
        })
    }
}

/// The PSAM's persistent state: its keys (as its key file holds them), its hotlist and the
/// security card's transactions, counter and totals. A file-backed card persists this.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PsamState {
    pub keys: MasterKeysFile,
    pub hotlist: Hotlist,
    pub card: SecurityCard,
}

/// The result of one APDU (like [`crate::card::Outcome`]): the response, and whether the
/// persistent state changed (a file-backed card persists before it answers).
pub struct Outcome {
    pub response: Vec<u8>,
    pub state_changed: bool,
}

/// The PSAM application: [`SecurityCard`] behind the APDU interface of the module table.
pub struct Psam {
    keys: MasterKeysFile,
    card: SecurityCard,
    selected: bool,
    /// The replayed ATR of the purse card whose INITIALIZE comes next.
    session_atr: Option<Vec<u8>>,
    /// Blocks of a chained command so far: (INS, data).
    chain: Option<(u8, Vec<u8>)>,
    last_error: Option<SecurityCardError>,
}

type Answer = Result<(Vec<u8>, bool), StatusWord>;

impl Psam {
    /// A PSAM from its persistent state.
    ///
    /// # Errors
    /// Its key file is not valid ([`MasterKeysFile::to_keys`]).
    pub fn new(state: PsamState) -> Result<Self, String> {
        let keys = state.keys.to_keys()?;
        let mut card = state.card.with_key(keys);
        card.set_hotlist(&state.hotlist);
        Ok(Self {
            keys: state.keys,
            card,
            selected: false,
            session_atr: None,
            chain: None,
            last_error: None,
        })
    }

    /// A new PSAM: security card `id` with the issuer's purchase master keys.
    ///
    /// # Errors
    /// The keys are not valid.
    pub fn personalise(id: u64, keys: MasterKeysFile) -> Result<Self, String> {
        let parsed = keys.to_keys()?;
        Self::new(PsamState {
            keys,
            hotlist: Hotlist::default(),
            card: SecurityCard::new(id, parsed),
        })
    }

    /// The persistent state, to write (it holds the keys).
    pub fn state(&self) -> PsamState {
        PsamState {
            keys: self.keys.clone(),
            hotlist: self.card.hotlist().clone(),
            card: self.card.clone(),
        }
    }

    /// The security card inside (its totals, transactions).
    pub fn card(&self) -> &SecurityCard {
        &self.card
    }

    pub fn atr(&self) -> Vec<u8> {
        PSAM_ATR.to_vec()
    }

    /// A reset: the selection, the replay session and a half-chained command are gone.
    pub fn reset(&mut self) {
        self.selected = false;
        self.session_atr = None;
        self.chain = None;
    }

    /// Processes one APDU; never panics, whatever the bytes.
    pub fn process(&mut self, apdu: &[u8]) -> Outcome {
        let (response, state_changed) = match Command::parse(apdu) {
            Err(_) => (Response::status(StatusWord::WRONG_LENGTH), false),
            Ok(cmd) => match self.dispatch(cmd) {
                Ok((data, changed)) => (Response::ok(data), changed),
                Err(sw) => (Response::status(sw), false),
            },
        };
        Outcome {
            response: response.to_bytes(),
            state_changed,
        }
    }

    fn dispatch(&mut self, cmd: Command) -> Answer {
        if cmd.cla == 0x00 && cmd.ins == 0xA4 {
            if cmd.p1 != 0x04 || cmd.p2 != 0x00 {
                return Err(StatusWord::WRONG_P1P2);
            }
            if cmd.data != PSAM_AID {
                self.reset();
                return Err(StatusWord::APP_NOT_FOUND);
            }
            self.reset();
            self.selected = true;
            return Ok((Vec::new(), false));
        }
        if cmd.cla != CLA && cmd.cla != CLA_CHAINED {
            return Err(StatusWord::CLASS_NOT_SUPPORTED);
        }
        if !self.selected {
            return Err(StatusWord::WRONG_STATE);
        }
        // Command chaining (ISO 7816-4 5.3.3): blocks of one INS gather until the last.
        let data = match (self.chain.take(), cmd.cla == CLA_CHAINED) {
            (Some((ins, _)), _) if ins != cmd.ins => return Err(StatusWord::WRONG_STATE),
            (Some((ins, mut so_far)), more) => {
                so_far.extend_from_slice(&cmd.data);
                if so_far.len() > MAX_CHAINED {
                    return Err(StatusWord::WRONG_LENGTH);
                }
                if more {
                    self.chain = Some((ins, so_far));
                    return Ok((Vec::new(), false));
                }
                so_far
            }
            (None, true) => {
                if !matches!(cmd.ins, INS_PURGE_SETTLED | INS_LOAD_HOTLIST) {
                    return Err(StatusWord::WRONG_STATE);
                }
                self.chain = Some((cmd.ins, cmd.data));
                return Ok((Vec::new(), false));
            }
            (None, false) => cmd.data,
        };
        let bad = |_| StatusWord::BAD_DATA;
        let txn_of = |d: &[u8]| -> Result<(u32, Vec<u8>), StatusWord> {
            let (n, rest) = d.split_first_chunk::<4>().ok_or(StatusWord::BAD_DATA)?;
            Ok((u32::from_be_bytes(*n), rest.to_vec()))
        };
        match cmd.ins {
            INS_CARD_ATR => {
                let plausible = (2..=33).contains(&data.len()) && matches!(data[0], 0x3B | 0x3F);
                if !plausible {
                    self.session_atr = None;
                    return Err(StatusWord::BAD_DATA);
                }
                self.session_atr = Some(data);
                Ok((Vec::new(), false))
            }
            INS_INITIALIZE => {
                if self.session_atr.take().is_none() {
                    return Err(StatusWord::WRONG_STATE);
                }
                let (draw, today) = decode_initialize(&data).map_err(bad)?;
                let early = cmd.p1 & P1_EARLY_RELEASE != 0;
                let r = self.card.issue_debit(&draw, today, early);
                let auth = self.refuse(r)?;
                let mut out = auth.command.encode();
                if let Some(e) = auth.expected_card_signature {
                    out.extend_from_slice(&e);
                }
                Ok((out, true))
            }
            INS_INITIALIZE_CREDIT => {
                if self.session_atr.take().is_none() {
                    return Err(StatusWord::WRONG_STATE);
                }
                let (credit, today) = decode_initialize(&data).map_err(bad)?;
                let r = self.card.issue_credit(&credit, today);
                let command = self.refuse(r)?;
                Ok((command.encode(), true))
            }
            INS_CREDIT_RESPONSE => {
                let (txn, rest) = txn_of(&data)?;
                let resp = CreditResponse::decode(&rest).map_err(bad)?;
                let r = self.card.complete_credit(txn, &resp);
                self.refuse(r)?;
                Ok((self.status().encode(), true))
            }
            INS_RESOLVE_CREDIT => {
                let (txn, rest) = txn_of(&data)?;
                let later = PurchaseInit::decode(&rest).map_err(bad)?;
                let r = self.card.resolve_credit(txn, &later);
                let credited = self.refuse(r)?;
                let mut out = vec![u8::from(credited)];
                out.extend(self.status().encode());
                Ok((out, true))
            }
            INS_DEBIT_RESPONSE => {
                let (txn, rest) = txn_of(&data)?;
                let resp = DebitResponse::decode(&rest).map_err(bad)?;
                let r = self.card.complete(txn, &resp);
                self.refuse(r)?;
                Ok((self.status().encode(), true))
            }
            INS_REVERSE => {
                let (txn, rest) = txn_of(&data)?;
                if !rest.is_empty() {
                    return Err(StatusWord::BAD_DATA);
                }
                let r = self.card.reverse(txn);
                self.refuse(r)?;
                Ok((self.status().encode(), true))
            }
            INS_VERIFY_NOT_DEBITED => {
                let (txn, rest) = txn_of(&data)?;
                let proof = PurchaseInit::decode(&rest).map_err(bad)?;
                let r = self.card.verify_not_debited(txn, &proof);
                self.refuse(r)?;
                Ok((Vec::new(), false))
            }
            INS_FORGET => {
                let (txn, rest) = txn_of(&data)?;
                if !rest.is_empty() {
                    return Err(StatusWord::BAD_DATA);
                }
                let dropped = self.card.forget(txn);
                Ok((vec![u8::from(dropped)], dropped))
            }
            INS_PURGE_SETTLED => {
                if data.len() % 4 != 0 {
                    return Err(StatusWord::BAD_DATA);
                }
                let open: Vec<u32> = data
                    .chunks_exact(4)
                    .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
                    .collect();
                let n = self.card.purge_settled_except(&open);
                Ok(((n as u32).to_be_bytes().to_vec(), n > 0))
            }
            INS_LOAD_HOTLIST => {
                let list: Hotlist =
                    postcard::from_bytes(&data).map_err(|_| StatusWord::BAD_DATA)?;
                // An older list is ignored, as the software card does ([`Hotlist::update`]).
                let takes = list.version >= self.card.hotlist_version();
                self.card.set_hotlist(&list);
                Ok((Vec::new(), takes))
            }
            INS_GET_STATUS => Ok((self.status().encode(), false)),
            INS_GET_LAST_ERROR => match &self.last_error {
                Some(e) => Ok((
                    postcard::to_allocvec(e).expect("in-memory serialization"),
                    false,
                )),
                None => Err(StatusWord::WRONG_STATE),
            },
            _ => Err(StatusWord::UNKNOWN_INSTRUCTION),
        }
    }

    /// A refusal becomes its `94xx` and is kept for GET LAST ERROR.
    fn refuse<T>(&mut self, r: Result<T, SecurityCardError>) -> Result<T, StatusWord> {
        r.map_err(|e| {
            let sw = status_word(&e);
            self.last_error = Some(e);
            sw
        })
    }

    /// What GET STATUS answers.
    pub fn status(&self) -> PsamStatus {
        PsamStatus {
            security_card_id: self.card.id,
            txn_counter: self.card.txn_counter,
            newest_key_version: self.card.newest_key_version().unwrap_or(0),
            hotlist_version: self.card.hotlist_version(),
            totals: self.card.totals.clone(),
        }
    }
}

/// INITIALIZE's data: the draw, the date and the card's response.
fn decode_initialize(data: &[u8]) -> Result<(DrawData, Date), LayoutError> {
    let mut r = Reader::new(data);
    let minor = r.u64()?;
    let currency = read_currency(&mut r)?;
    let today = Date::read(&mut r)?;
    let merchant_id = read_text(&mut r)?;
    let transaction_id = read_text(&mut r)?;
    let init = PurchaseInit::decode(r.rest())?;
    Ok((
        DrawData {
            merchant_id,
            transaction_id,
            amount: Money::new(minor, currency),
            init,
        },
        today,
    ))
}
