//! The purse card's side of card-to-card transfer (seed 004 FIG. 4A–4B; the protocol, its
//! packets and how it settles are in [`crate::transfer`]). Every command is `80 5A P1 00`:
//!
//! | P1 | command | data in | data out |
//! |---|---|---|---|
//! | 00 | READ KEY EPOCHS | — | the four epochs, oldest first |
//! | 01 | RECEIVE (payee) | date, amount, currency | card id ‖ epochs ‖ challenge R0 (kept until the next RECEIVE or P1) |
//! | 02 | SEND (payer) | date, amount, currency, payee card id, payee epochs, R0 | AK0 ‖ AK1 ‖ P1 |
//! | 03 | P1 (payee) | AK0 ‖ AK1 ‖ P1 | P2 ‖ P3 (length-prefixed) |
//! | 04 | P2 P3 (payer) | P2 ‖ P3 (length-prefixed) | P4 (the payer is debited) |
//! | 05 | P4 (payee) | date ‖ P4 | the receipt, a [`Settlement`] (the payee is credited) |
//! | 06 | CANCEL (payee) | R2 | a [`Settlement`]: the cancellation of the pending R2, or the outcome of a settled one |
//! | 07 | RESOLVE (payer) | date ‖ [`Settlement`] | — (a cancellation credits the payer back) |
//! | 08 | STATUS | — | [`TransferStatus`] |
//!
//! Status words besides the card's own: `9408` fewer than two application keys in common
//! (or none held), `9409` an earlier transfer of this card not settled, `6982` a packet or
//! settlement that does not open or does not answer this card's challenge — a P4 or a
//! RESOLVE counts toward the lock (a replayed P4 is one), a P1 or P2 P3 does not (neither
//! credits the card) — `6A83` CANCEL of an R2 the card never saw.

use super::{Answer, Command, PurseCard, Session, parse_date};
use crate::apdu::StatusWord;
use crate::codec::{Reader, Writer};
use crate::crypto;
use crate::money::Currency;
use crate::purse::{Date, LogKind, LogRecord, read_currency};
use crate::transfer::{
    APPLICATION_NUMBER, CREDIT_CODE, DEBIT_CODE, Expecting, Greeting, Receiving, Remembered, Sent,
    Settled, Settlement, TRANSFER_MEMORY, TransferStatus, ValuePacket, common_epochs, public_name,
    read_parts, valid_name, write_parts,
};

pub const P1_READ_EPOCHS: u8 = 0x00;
pub const P1_RECEIVE: u8 = 0x01;
pub const P1_SEND: u8 = 0x02;
pub const P1_PACKET1: u8 = 0x03;
pub const P1_PACKETS23: u8 = 0x04;
pub const P1_PACKET4: u8 = 0x05;
pub const P1_CANCEL: u8 = 0x06;
pub const P1_RESOLVE: u8 = 0x07;
pub const P1_STATUS: u8 = 0x08;

fn bad_data<T>(_: T) -> StatusWord {
    StatusWord::BAD_DATA
}

impl PurseCard {
    pub(super) fn transfer(&mut self, cmd: &Command) -> Answer {
        if cmd.p2 != 0 {
            return Err(StatusWord::WRONG_P1P2);
        }
        let session = std::mem::replace(&mut self.session, Session::None);
        match cmd.p1 {
            P1_READ_EPOCHS => {
                let keys = self.state.app_keys.as_ref();
                Ok(keys.ok_or(StatusWord::NO_COMMON_KEYS)?.epochs().to_vec())
            }
            P1_RECEIVE => self.transfer_receive(&cmd.data),
            P1_SEND => {
                let pin_verified = std::mem::take(&mut self.pin_verified);
                self.transfer_send(&cmd.data, pin_verified)
            }
            P1_PACKET1 => self.transfer_p1(&cmd.data),
            P1_PACKETS23 => self.transfer_p23(session, &cmd.data),
            P1_PACKET4 => self.transfer_p4(&cmd.data),
            P1_CANCEL => self.transfer_cancel(&cmd.data),
            P1_RESOLVE => self.transfer_resolve(&cmd.data),
            P1_STATUS => Ok(TransferStatus {
                sent: self.state.sent.clone(),
                receiving: self.state.receiving.clone(),
            }
            .encode()),
            _ => Err(StatusWord::WRONG_P1P2),
        }
    }

    /// The amount and currency a RECEIVE or SEND names, after its date: a non-zero amount
    /// in the card's currency, on a usable card that has not expired.
    fn transfer_terms(&self, r: &mut Reader) -> Result<(Date, u64, Currency), StatusWord> {
        let date = parse_date(r.bytes(4).map_err(bad_data)?)?;
        let amount = r.u64().map_err(bad_data)?;
        let currency = read_currency(r).map_err(bad_data)?;
        self.check_usable_on(date)?;
        if currency != self.state.currency {
            return Err(StatusWord::WRONG_CURRENCY);
        }
        if amount == 0 {
            return Err(StatusWord::BAD_AMOUNT);
        }
        Ok((date, amount, currency))
    }

    fn transfer_receive(&mut self, data: &[u8]) -> Answer {
        let mut r = Reader::new(data);
        let (_, amount, currency) = self.transfer_terms(&mut r)?;
        r.end().map_err(bad_data)?;
        let keys = self
            .state
            .app_keys
            .as_ref()
            .ok_or(StatusWord::NO_COMMON_KEYS)?;
        if self.state.receiving.is_some() {
            return Err(StatusWord::TRANSFER_UNSETTLED);
        }
        self.state
            .balance
            .checked_add(amount)
            .filter(|b| *b <= self.state.max_balance)
            .ok_or(StatusWord::OVER_MAX_BALANCE)?;
        let epochs = keys.epochs();
        // Room for the credit that may follow.
        self.state.atc.checked_add(1).ok_or(StatusWord::BLOCKED)?;
        let challenge = self.challenge()?;
        // Kept across power loss (the payer's P1 may take a while to come through the
        // gateway); a new RECEIVE replaces it, P1 uses it up.
        self.state.expecting = Some(Expecting {
            challenge,
            amount,
            currency,
        });
        self.changed = true;
        let mut w = Writer::default();
        w.u64(self.state.card_id).bytes(&epochs).bytes(&challenge);
        Ok(w.finish())
    }

    /// A challenge (R0, R1, R2): four random bytes and the card's persisted transfer
    /// counter, so none repeats even if the random generator does.
    fn challenge(&mut self) -> Result<[u8; 8], StatusWord> {
        let n = self
            .state
            .transfer_nonce
            .checked_add(1)
            .ok_or(StatusWord::BLOCKED)?;
        self.state.transfer_nonce = n;
        self.changed = true;
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.random()[..4]);
        out[4..].copy_from_slice(&n.to_be_bytes());
        Ok(out)
    }

    fn transfer_send(&mut self, data: &[u8], pin_verified: bool) -> Answer {
        let mut r = Reader::new(data);
        let (date, amount, currency) = self.transfer_terms(&mut r)?;
        let payee = r.u64().map_err(bad_data)?;
        let theirs: [u8; 4] = r.take().map_err(bad_data)?;
        let payee_challenge: [u8; 8] = r.take().map_err(bad_data)?;
        r.end().map_err(bad_data)?;
        if payee == self.state.card_id {
            return Err(StatusWord::BAD_DATA);
        }
        let keys = self
            .state
            .app_keys
            .as_ref()
            .ok_or(StatusWord::NO_COMMON_KEYS)?;
        let (ak0, ak1) =
            common_epochs(keys.epochs(), theirs).map_err(|_| StatusWord::NO_COMMON_KEYS)?;
        if self.state.sent.is_some() {
            return Err(StatusWord::TRANSFER_UNSETTLED);
        }
        if let Some(pin) = &self.state.pin {
            if amount > pin.threshold && !pin_verified {
                return Err(StatusWord::PIN_REQUIRED);
            }
        }
        if amount > self.state.balance {
            return Err(StatusWord::INSUFFICIENT_VALUE);
        }
        // Room for the debit and a credit back.
        self.state.atc.checked_add(2).ok_or(StatusWord::BLOCKED)?;
        let r1 = self.challenge()?;
        let p1 = Greeting {
            random: r1,
            application: APPLICATION_NUMBER,
            name: self.public_name(),
            card_id: self.state.card_id,
            amount,
            currency,
            payee,
            payee_challenge,
        };
        let key = self.app_key(ak0)?;
        let sealed = crypto::seal(&key, &p1.encode(), &mut self.rng);
        self.session = Session::TransferSend {
            date,
            r1,
            ak0,
            ak1,
            amount,
            currency,
            payee,
        };
        let mut w = Writer::default();
        w.u8(ak0).u8(ak1).bytes(&sealed);
        Ok(w.finish())
    }

    fn public_name(&self) -> [u8; 8] {
        public_name(
            self.state.cardholder.as_ref().map(|c| c.name.as_str()),
            self.state.card_id,
        )
    }

    fn app_key(&self, epoch: u8) -> Result<crypto::DesKey, StatusWord> {
        self.state
            .app_keys
            .as_ref()
            .and_then(|k| k.key(epoch))
            .cloned()
            .ok_or(StatusWord::NO_COMMON_KEYS)
    }

    /// Opens a packet sealed under the key of `epoch`; one that does not open counts toward
    /// the lock (P4: it would credit the card).
    fn open_packet(&mut self, epoch: u8, sealed: &[u8]) -> Result<Vec<u8>, StatusWord> {
        let key = self.app_key(epoch)?;
        crypto::open(&key, sealed).map_err(|_| self.bad_signature())
    }

    /// Opens P1 or P2 P3: one that does not open, or does not answer this card, is refused
    /// (`6982`) but not counted toward the lock. Neither moves value onto the card, and
    /// anyone relaying a transfer could otherwise block the card with junk (the second
    /// outside attack, G1): the lock guards what credits a card, P4 and RESOLVE.
    fn open_uncounted(&self, epoch: u8, sealed: &[u8]) -> Result<Vec<u8>, StatusWord> {
        let key = self.app_key(epoch)?;
        crypto::open(&key, sealed).map_err(|_| StatusWord::BAD_SIGNATURE)
    }

    fn transfer_p1(&mut self, data: &[u8]) -> Answer {
        let Some(Expecting {
            challenge,
            amount,
            currency,
        }) = self.state.expecting.clone()
        else {
            return Err(StatusWord::WRONG_STATE);
        };
        self.check_usable()?;
        if self.state.receiving.is_some() {
            return Err(StatusWord::TRANSFER_UNSETTLED);
        }
        let mut r = Reader::new(data);
        let (ak0, ak1) = (r.u8().map_err(bad_data)?, r.u8().map_err(bad_data)?);
        let sealed = r.rest();
        if ak0 >= ak1 {
            return Err(StatusWord::BAD_DATA);
        }
        self.app_key(ak1)?;
        let p1 = Greeting::decode(&self.open_uncounted(ak0, sealed)?).map_err(bad_data)?;
        // Fresh (it answers this card's challenge) and for this card. Not a reset of the
        // bad-key count (any cardholder's card makes genuine P1s; only P4 and RESOLVE,
        // which credit, reset it).
        if p1.application != APPLICATION_NUMBER
            || !valid_name(&p1.name)
            || p1.payee_challenge != challenge
            || p1.payee != self.state.card_id
            || p1.card_id == self.state.card_id
        {
            return Err(StatusWord::BAD_SIGNATURE);
        }
        if (p1.amount, p1.currency) != (amount, currency) {
            return Err(StatusWord::BAD_AMOUNT);
        }
        let p2 = Greeting {
            random: p1.random,
            application: APPLICATION_NUMBER,
            name: self.public_name(),
            card_id: self.state.card_id,
            amount,
            currency,
            payee: self.state.card_id,
            payee_challenge: challenge,
        };
        let r2 = self.challenge()?;
        let p3 = ValuePacket {
            random: r2,
            application: APPLICATION_NUMBER,
            code: DEBIT_CODE,
            amount,
            currency,
            payer: p1.card_id,
            payee: self.state.card_id,
        };
        let (k0, k1) = (self.app_key(ak0)?, self.app_key(ak1)?);
        let p2 = crypto::seal(&k0, &p2.encode(), &mut self.rng);
        let p3 = crypto::seal(&k1, &p3.encode(), &mut self.rng);
        // From here the payee waits for P4 (or a cancellation), across power loss.
        self.state.expecting = None;
        self.state.receiving = Some(Receiving {
            random: r2,
            amount,
            currency,
            payer: p1.card_id,
            ak1,
        });
        self.changed = true;
        Ok(write_parts(&[&p2, &p3]))
    }

    fn transfer_p23(&mut self, session: Session, data: &[u8]) -> Answer {
        let Session::TransferSend {
            date,
            r1,
            ak0,
            ak1,
            amount,
            currency,
            payee,
        } = session
        else {
            return Err(StatusWord::WRONG_STATE);
        };
        self.check_usable()?;
        let [p2, p3] = read_parts::<2>(data).map_err(bad_data)?;
        let p2 = Greeting::decode(&self.open_uncounted(ak0, &p2)?).map_err(bad_data)?;
        // P2 answers this card's challenge with the payee's own (changed) name.
        if p2.random != r1 || p2.application != APPLICATION_NUMBER || !valid_name(&p2.name) {
            return Err(StatusWord::BAD_SIGNATURE);
        }
        let p3 = ValuePacket::decode(&self.open_uncounted(ak1, &p3)?).map_err(bad_data)?;
        if p3.application != APPLICATION_NUMBER || p3.code != DEBIT_CODE {
            return Err(StatusWord::BAD_SIGNATURE);
        }
        if p2.card_id != payee || p3.payee != payee || p3.payer != self.state.card_id {
            return Err(StatusWord::BAD_DATA);
        }
        if (p3.amount, p3.currency) != (amount, currency) {
            return Err(StatusWord::BAD_AMOUNT);
        }
        let atc = self.next_atc()?;
        let balance = self
            .state
            .balance
            .checked_sub(amount)
            .ok_or(StatusWord::INSUFFICIENT_VALUE)?;
        let p4 = ValuePacket {
            random: p3.random,
            application: APPLICATION_NUMBER,
            code: CREDIT_CODE,
            amount,
            currency,
            payer: self.state.card_id,
            payee,
        };
        let p4 = crypto::seal(&self.app_key(ak1)?, &p4.encode(), &mut self.rng);
        // Debited, logged and P4 kept: one state change.
        self.state.balance = balance;
        self.state.atc = atc;
        self.state.sent = Some(Sent {
            random: p3.random,
            amount,
            currency,
            payee,
            ak1,
            p4: p4.clone(),
        });
        self.log_transfer(LogKind::TransferOut, atc, amount, date, payee, p3.random);
        Ok(p4)
    }

    fn log_transfer(
        &mut self,
        kind: LogKind,
        atc: u32,
        amount: u64,
        date: Date,
        other_card: u64,
        random: [u8; 8],
    ) {
        self.state.push_log(LogRecord {
            kind,
            atc,
            amount,
            currency: self.state.currency,
            balance_after: self.state.balance,
            date,
            counterparty: other_card,
            counterparty_txn: 0,
            signature: random,
        });
        self.changed = true;
    }

    /// The payee's signed word on an incoming transfer.
    fn settlement(&self, kind: Settled, rec: &Receiving) -> Result<Settlement, StatusWord> {
        let key = self.app_key(rec.ak1)?;
        let fields =
            ValuePacket::settled_fields(&rec.random, rec.amount, rec.payer, self.state.card_id);
        Ok(Settlement {
            kind,
            random: rec.random,
            mac: crypto::sign(&key, kind.label(), &fields),
        })
    }

    /// Ends the pending receive with this word: remembered as the last of its payer's
    /// transfers (replacing the payer's earlier one), the oldest payer's forgotten beyond
    /// [`TRANSFER_MEMORY`].
    fn remember(&mut self, receiving: Receiving, word: Settlement) {
        let memory = &mut self.state.remembered;
        memory.retain(|m| m.receiving.payer != receiving.payer);
        if memory.len() == TRANSFER_MEMORY {
            memory.pop_front();
        }
        memory.push_back(Remembered { receiving, word });
        self.state.receiving = None;
        self.changed = true;
    }

    fn transfer_p4(&mut self, data: &[u8]) -> Answer {
        self.check_usable()?;
        let mut r = Reader::new(data);
        let date = parse_date(r.bytes(4).map_err(bad_data)?)?;
        let sealed = r.rest();
        // A P4 with no transfer waiting for it is a replay (or a forgery): a bad key.
        let Some(rec) = self.state.receiving.clone() else {
            return Err(self.bad_signature());
        };
        let p4 = ValuePacket::decode(&self.open_packet(rec.ak1, sealed)?).map_err(bad_data)?;
        if p4.random != rec.random
            || p4.application != APPLICATION_NUMBER
            || p4.code != CREDIT_CODE
            || (p4.amount, p4.currency, p4.payer, p4.payee)
                != (rec.amount, rec.currency, rec.payer, self.state.card_id)
        {
            return Err(self.bad_signature());
        }
        self.good_signature();
        let atc = self.next_atc()?;
        let balance = self
            .state
            .balance
            .checked_add(rec.amount)
            .filter(|b| *b <= self.state.max_balance)
            .ok_or(StatusWord::OVER_MAX_BALANCE)?;
        let receipt = self.settlement(Settled::Credited, &rec)?;
        // Credited, logged and remembered: one state change.
        self.state.balance = balance;
        self.state.atc = atc;
        self.log_transfer(
            LogKind::TransferIn,
            atc,
            rec.amount,
            date,
            rec.payer,
            rec.random,
        );
        let answer = receipt.encode();
        self.remember(rec, receipt);
        Ok(answer)
    }

    fn transfer_cancel(&mut self, data: &[u8]) -> Answer {
        let r2: [u8; 8] = data.try_into().map_err(bad_data)?;
        if let Some(rec) = self.state.receiving.clone().filter(|r| r.random == r2) {
            let word = self.settlement(Settled::Cancelled, &rec)?;
            let answer = word.encode();
            self.remember(rec, word);
            return Ok(answer);
        }
        self.state
            .remembered
            .iter()
            .find(|m| m.receiving.random == r2)
            .map(|m| m.word.encode())
            .ok_or(crate::card::SW_RECORD_NOT_FOUND)
    }

    fn transfer_resolve(&mut self, data: &[u8]) -> Answer {
        let mut r = Reader::new(data);
        let date = parse_date(r.bytes(4).map_err(bad_data)?)?;
        let s = Settlement::decode(r.rest()).map_err(bad_data)?;
        let Some(sent) = self.state.sent.clone() else {
            return Err(StatusWord::WRONG_STATE);
        };
        if s.random != sent.random {
            return Err(StatusWord::WRONG_STATE);
        }
        let key = self.app_key(sent.ak1)?;
        let fields =
            ValuePacket::settled_fields(&sent.random, sent.amount, self.state.card_id, sent.payee);
        if !crypto::verify(&key, s.kind.label(), &fields, &s.mac) {
            return Err(self.bad_signature());
        }
        self.good_signature();
        if s.kind == Settled::Cancelled {
            // The payee will never credit it: the value comes back (one state change with
            // forgetting the transfer).
            let atc = self.next_atc()?;
            self.state.balance = self
                .state
                .balance
                .checked_add(sent.amount)
                .filter(|b| *b <= self.state.max_balance)
                .ok_or(StatusWord::OVER_MAX_BALANCE)?;
            self.state.atc = atc;
            self.log_transfer(
                LogKind::TransferBack,
                atc,
                sent.amount,
                date,
                sent.payee,
                sent.random,
            );
        }
        self.state.sent = None;
        self.changed = true;
        Ok(Vec::new())
    }
}

/// The command APDUs of a transfer.
pub mod commands {
    use super::*;
    use crate::apdu::Command;
    use crate::card::{CLA_PURSE, INS_TRANSFER};
    use crate::purse::write_currency;

    fn apdu(p1: u8, data: Vec<u8>) -> Vec<u8> {
        Command::new(CLA_PURSE, INS_TRANSFER, p1, 0, data, Some(0)).to_bytes()
    }

    fn terms(date: Date, amount: u64, currency: Currency) -> Writer {
        let mut w = Writer::default();
        w.u16(date.year).u8(date.month).u8(date.day).u64(amount);
        write_currency(&mut w, currency);
        w
    }

    pub fn read_epochs() -> Vec<u8> {
        apdu(P1_READ_EPOCHS, Vec::new())
    }
    pub fn receive(date: Date, amount: u64, currency: Currency) -> Vec<u8> {
        apdu(P1_RECEIVE, terms(date, amount, currency).finish())
    }
    /// SEND, with what the payee's RECEIVE answered: its card id, epochs and challenge.
    pub fn send(
        date: Date,
        amount: u64,
        currency: Currency,
        payee: u64,
        epochs: [u8; 4],
        challenge: [u8; 8],
    ) -> Vec<u8> {
        let mut w = terms(date, amount, currency);
        w.u64(payee).bytes(&epochs).bytes(&challenge);
        apdu(P1_SEND, w.finish())
    }
    /// P1 as SEND answered it (AK0 ‖ AK1 ‖ P1).
    pub fn packet1(send_answer: &[u8]) -> Vec<u8> {
        apdu(P1_PACKET1, send_answer.to_vec())
    }
    /// P2 ‖ P3 as the payee's P1 answered them.
    pub fn packets23(p1_answer: &[u8]) -> Vec<u8> {
        apdu(P1_PACKETS23, p1_answer.to_vec())
    }
    pub fn packet4(date: Date, p4: &[u8]) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(date.year).u8(date.month).u8(date.day).bytes(p4);
        apdu(P1_PACKET4, w.finish())
    }
    pub fn cancel(r2: [u8; 8]) -> Vec<u8> {
        apdu(P1_CANCEL, r2.to_vec())
    }
    pub fn resolve(date: Date, settlement: &Settlement) -> Vec<u8> {
        let mut w = Writer::default();
        w.u16(date.year)
            .u8(date.month)
            .u8(date.day)
            .bytes(&settlement.encode());
        apdu(P1_RESOLVE, w.finish())
    }
    pub fn status() -> Vec<u8> {
        apdu(P1_STATUS, Vec::new())
    }
}
