//! Sans-IO ISO 7816-3 T=0 transport: the interface-device side of one command (header,
//! procedure bytes, data transfer, SW1 SW2) and of the PPS exchange.
//!
//! The engines take bytes (values, already converted from the card's convention) and say
//! what to send next; the serial shell does the IO and the waiting. `61xx` and `6Cxx` are
//! returned as status words: [`crate::api::transmit_whole`] resolves them for every driver.

use super::atr::FiDi;

/// Why a T=0 exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum T0Error {
    #[error("APDU shorter than the 4-byte header ({0} bytes)")]
    ApduTooShort(usize),
    #[error("APDU length does not match its Lc ({len} bytes)")]
    BadApduLength { len: usize },
    #[error("INS {0:#04x} cannot be used with T=0 (6X and 9X are procedure bytes)")]
    InvalidIns(u8),
    #[error("card sent {byte:#04x}, which is not a T=0 procedure byte for INS {ins:#04x}")]
    BadProcedureByte { byte: u8, ins: u8 },
    #[error("card acknowledged with {byte:#04x} but there is nothing left to transfer")]
    UnexpectedAck { byte: u8 },
    #[error("exchange already finished")]
    Finished,
}

/// What the shell does after feeding a byte to [`T0Exchange::on_byte`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum T0Step {
    /// Wait for the next byte (within the work waiting time).
    Receive,
    /// Send these bytes to the card, then wait for the next byte.
    Send(Vec<u8>),
    /// The response: data followed by SW1 SW2.
    Done(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Procedure,
    /// Receiving `remaining` data bytes, then back to procedure bytes.
    Data {
        remaining: usize,
    },
    Sw2 {
        sw1: u8,
    },
    Done,
}

/// One T=0 command/response exchange.
#[derive(Debug, Clone)]
pub struct T0Exchange {
    header: [u8; 5],
    /// Data the interface still has to send (case 3/4).
    outgoing: Vec<u8>,
    sent: usize,
    /// Data bytes the card still has to send (case 2).
    incoming_left: usize,
    response: Vec<u8>,
    state: State,
    nulls: u32,
}

impl T0Exchange {
    /// Prepares a T=0 exchange for a short APDU. Case 4 is sent as case 3 (the card answers
    /// 61xx); case 2's Le (0 = 256) is P3. NULL procedure bytes are not counted against any
    /// limit: ISO 7816-3 lets each one restart the work waiting time, which the shell keeps.
    pub fn new(apdu: &[u8]) -> Result<Self, T0Error> {
        let Some((&[cla, ins, p1, p2], body)) = apdu.split_first_chunk::<4>() else {
            return Err(T0Error::ApduTooShort(apdu.len()));
        };
        if ins & 0xF0 == 0x60 || ins & 0xF0 == 0x90 {
            return Err(T0Error::InvalidIns(ins));
        }
        let (p3, outgoing, incoming_left) = match body {
            [] => (0, Vec::new(), 0),
            [le] => (
                *le,
                Vec::new(),
                if *le == 0 { 256 } else { usize::from(*le) },
            ),
            [lc, rest @ ..] => {
                let lc_len = usize::from(*lc);
                // Lc, data, and optionally Le (dropped: T=0 case 4 goes through 61xx).
                if lc_len == 0 || (rest.len() != lc_len && rest.len() != lc_len + 1) {
                    return Err(T0Error::BadApduLength { len: apdu.len() });
                }
                (*lc, rest[..lc_len].to_vec(), 0)
            }
        };
        Ok(Self {
            header: [cla, ins, p1, p2, p3],
            outgoing,
            sent: 0,
            incoming_left,
            response: Vec::new(),
            state: State::Procedure,
            nulls: 0,
        })
    }

    /// The five header bytes CLA INS P1 P2 P3 to send first.
    pub fn header(&self) -> [u8; 5] {
        self.header
    }

    /// How many NULL bytes the card has sent so far.
    pub fn nulls(&self) -> u32 {
        self.nulls
    }

    /// True while data bytes (not procedure bytes) are expected: the shell may then read
    /// several at once.
    pub fn receiving_data(&self) -> usize {
        match self.state {
            State::Data { remaining } => remaining,
            _ => 0,
        }
    }

    /// Feeds one byte from the card.
    pub fn on_byte(&mut self, byte: u8) -> Result<T0Step, T0Error> {
        let ins = self.header[1];
        match self.state {
            State::Done => Err(T0Error::Finished),
            State::Sw2 { sw1 } => {
                self.response.extend_from_slice(&[sw1, byte]);
                self.state = State::Done;
                Ok(T0Step::Done(std::mem::take(&mut self.response)))
            }
            State::Data { remaining } => {
                self.response.push(byte);
                self.incoming_left -= 1;
                self.state = if remaining > 1 {
                    State::Data {
                        remaining: remaining - 1,
                    }
                } else {
                    State::Procedure
                };
                Ok(T0Step::Receive)
            }
            State::Procedure => match byte {
                0x60 => {
                    self.nulls = self.nulls.saturating_add(1);
                    Ok(T0Step::Receive)
                }
                b if b & 0xF0 == 0x60 || b & 0xF0 == 0x90 => {
                    self.state = State::Sw2 { sw1: b };
                    Ok(T0Step::Receive)
                }
                b if b == ins => self.ack(b, usize::MAX),
                b if b == ins ^ 0xFF => self.ack(b, 1),
                b => {
                    self.state = State::Done;
                    Err(T0Error::BadProcedureByte { byte: b, ins })
                }
            },
        }
    }

    /// ACK: transfer up to `max` bytes in the command's direction.
    fn ack(&mut self, byte: u8, max: usize) -> Result<T0Step, T0Error> {
        let to_send = self.outgoing.len() - self.sent;
        if to_send > 0 {
            let n = to_send.min(max);
            let chunk = self.outgoing[self.sent..self.sent + n].to_vec();
            self.sent += n;
            Ok(T0Step::Send(chunk))
        } else if self.incoming_left > 0 {
            self.state = State::Data {
                remaining: self.incoming_left.min(max),
            };
            Ok(T0Step::Receive)
        } else {
            self.state = State::Done;
            Err(T0Error::UnexpectedAck { byte })
        }
    }
}

/// Why a PPS exchange failed (the card is then reset and used at the default speed).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PpsError {
    #[error("PPS response starts with {0:#04x}, not PPSS = FF")]
    BadPpss(u8),
    #[error("PPS response check byte is wrong")]
    BadPck,
    #[error("PPS response names protocol T={got}, requested T={requested}")]
    WrongProtocol { requested: u8, got: u8 },
    #[error("PPS response PPS1 {got:#04x} differs from the requested {requested:#04x}")]
    BadPps1 { requested: u8, got: u8 },
    #[error("PPS response is longer than any PPS")]
    TooLong,
}

/// What the card agreed to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PpsOutcome {
    pub protocol: u8,
    /// The Fi/Di now in force (the defaults when the card left PPS1 out).
    pub fi_di: FiDi,
    /// TA1 value agreed on, if PPS1 was echoed.
    pub pps1: Option<u8>,
}

/// The interface side of a PPS exchange: request PPSS PPS0 PPS1 PCK, then validate the card's
/// response byte by byte.
#[derive(Debug, Clone)]
pub struct PpsExchange {
    request: Vec<u8>,
    response: Vec<u8>,
}

/// Result of feeding one response byte.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PpsStep {
    Receive,
    Done(Result<PpsOutcome, PpsError>),
}

impl PpsExchange {
    /// A request for protocol `protocol`, with PPS1 = `pps1` (a Fi/Di coded as TA1) or
    /// without (only the protocol is selected, Fi/Di stay at the defaults).
    pub fn new(protocol: u8, pps1: Option<u8>) -> Self {
        let mut request = match pps1 {
            Some(p) => vec![0xFF, 0x10 | (protocol & 0x0F), p],
            None => vec![0xFF, protocol & 0x0F],
        };
        request.push(request.iter().fold(0, |a, b| a ^ b));
        Self {
            request,
            response: Vec::new(),
        }
    }

    pub fn request(&self) -> &[u8] {
        &self.request
    }

    /// The length a PPS with this PPS0 has, once PPS0 is known.
    fn expected_len(pps0: u8) -> usize {
        3 + (pps0 >> 4 & 0x7).count_ones() as usize
    }

    pub fn on_byte(&mut self, byte: u8) -> PpsStep {
        self.response.push(byte);
        let r = &self.response;
        if r[0] != 0xFF {
            return PpsStep::Done(Err(PpsError::BadPpss(r[0])));
        }
        let Some(&pps0) = r.get(1) else {
            return PpsStep::Receive;
        };
        let len = Self::expected_len(pps0);
        if r.len() < len {
            return PpsStep::Receive;
        }
        if r.len() > len {
            return PpsStep::Done(Err(PpsError::TooLong));
        }
        PpsStep::Done(self.validate())
    }

    fn validate(&self) -> Result<PpsOutcome, PpsError> {
        let r = &self.response;
        if r.iter().fold(0u8, |a, b| a ^ b) != 0 {
            return Err(PpsError::BadPck);
        }
        let requested = self.request[1] & 0x0F;
        let got = r[1] & 0x0F;
        if got != requested {
            return Err(PpsError::WrongProtocol { requested, got });
        }
        if r[1] & 0x10 == 0 {
            // The card keeps Fi/Di at their defaults.
            return Ok(PpsOutcome {
                protocol: got,
                fi_di: FiDi::DEFAULT,
                pps1: None,
            });
        }
        let pps1 = r[2];
        if self.request[1] & 0x10 == 0 || pps1 != self.request[2] {
            return Err(PpsError::BadPps1 {
                requested: self.request[2],
                got: pps1,
            });
        }
        Ok(PpsOutcome {
            protocol: got,
            fi_di: FiDi::from_ta1(pps1).unwrap_or(FiDi::DEFAULT),
            pps1: Some(pps1),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(ex: &mut T0Exchange, card: &[u8]) -> (Vec<Vec<u8>>, Result<Vec<u8>, T0Error>) {
        let mut sent = Vec::new();
        for &b in card {
            match ex.on_byte(b) {
                Ok(T0Step::Receive) => {}
                Ok(T0Step::Send(bytes)) => sent.push(bytes),
                Ok(T0Step::Done(resp)) => return (sent, Ok(resp)),
                Err(e) => return (sent, Err(e)),
            }
        }
        (sent, Err(T0Error::Finished))
    }

    #[test]
    fn case1_status_only() {
        let mut ex = T0Exchange::new(&[0x00, 0x44, 0, 0]).unwrap();
        assert_eq!(ex.header(), [0x00, 0x44, 0, 0, 0]);
        let (sent, resp) = run(&mut ex, &[0x90, 0x00]);
        assert!(sent.is_empty());
        assert_eq!(resp, Ok(vec![0x90, 0x00]));
    }

    #[test]
    fn case3_ack_all_then_sw() {
        let apdu = [0x00, 0xA4, 0x04, 0x00, 0x03, 0xA0, 0x00, 0x01];
        let mut ex = T0Exchange::new(&apdu).unwrap();
        assert_eq!(ex.header(), [0x00, 0xA4, 0x04, 0x00, 0x03]);
        let (sent, resp) = run(&mut ex, &[0x60, 0xA4, 0x61, 0x10]);
        assert_eq!(sent, vec![vec![0xA0, 0x00, 0x01]]);
        assert_eq!(resp, Ok(vec![0x61, 0x10]));
        assert_eq!(ex.nulls(), 1);
    }

    #[test]
    fn case3_byte_at_a_time() {
        let apdu = [0x00, 0xD6, 0, 0, 0x03, 1, 2, 3];
        let mut ex = T0Exchange::new(&apdu).unwrap();
        // INS ^ FF = 0x29: one byte each; then a plain ACK for the rest.
        let (sent, resp) = run(&mut ex, &[0x29, 0x29, 0xD6, 0x90, 0x00]);
        assert_eq!(sent, vec![vec![1], vec![2], vec![3]]);
        assert_eq!(resp, Ok(vec![0x90, 0x00]));
    }

    #[test]
    fn case2_data_then_sw() {
        let mut ex = T0Exchange::new(&[0x00, 0xB0, 0, 0, 0x03]).unwrap();
        let (sent, resp) = run(&mut ex, &[0xB0, 0xAA, 0xBB, 0xCC, 0x90, 0x00]);
        assert!(sent.is_empty());
        assert_eq!(resp, Ok(vec![0xAA, 0xBB, 0xCC, 0x90, 0x00]));
    }

    #[test]
    fn case2_byte_at_a_time_with_nulls() {
        let mut ex = T0Exchange::new(&[0x00, 0xB0, 0, 0, 0x02]).unwrap();
        let (_, resp) = run(&mut ex, &[0x4F, 0x01, 0x60, 0x4F, 0x02, 0x90, 0x00]);
        assert_eq!(resp, Ok(vec![0x01, 0x02, 0x90, 0x00]));
    }

    #[test]
    fn case2_wrong_le_gives_6c() {
        let mut ex = T0Exchange::new(&[0x00, 0xB0, 0, 0, 0x00]).unwrap();
        assert_eq!(ex.header()[4], 0);
        let (_, resp) = run(&mut ex, &[0x6C, 0x08]);
        assert_eq!(resp, Ok(vec![0x6C, 0x08]));
    }

    #[test]
    fn case4_sends_lc_and_drops_le() {
        let apdu = [0x80, 0x50, 0, 0, 0x02, 0x11, 0x22, 0x00];
        let mut ex = T0Exchange::new(&apdu).unwrap();
        assert_eq!(ex.header(), [0x80, 0x50, 0, 0, 0x02]);
        let (sent, resp) = run(&mut ex, &[0x50, 0x61, 0x1C]);
        assert_eq!(sent, vec![vec![0x11, 0x22]]);
        assert_eq!(resp, Ok(vec![0x61, 0x1C]));
    }

    #[test]
    fn nulls_only_restart_the_wait() {
        // 1000 NULLs (the old engine gave up after 100): each only restarts the waiting time.
        let mut ex = T0Exchange::new(&[0x00, 0xB0, 0, 0, 1]).unwrap();
        let mut card = vec![0x60; 1000];
        card.extend_from_slice(&[0xB0, 0x42, 0x90, 0x00]);
        let (_, resp) = run(&mut ex, &card);
        assert_eq!(resp, Ok(vec![0x42, 0x90, 0x00]));
        assert_eq!(ex.nulls(), 1000);
        assert_eq!(ex.on_byte(0x90), Err(T0Error::Finished));
    }

    #[test]
    fn bad_input_is_refused() {
        assert_eq!(
            T0Exchange::new(&[0, 1]).unwrap_err(),
            T0Error::ApduTooShort(2)
        );
        assert_eq!(
            T0Exchange::new(&[0, 0x61, 0, 0]).unwrap_err(),
            T0Error::InvalidIns(0x61)
        );
        assert_eq!(
            T0Exchange::new(&[0, 0xA4, 0, 0, 3, 1]).unwrap_err(),
            T0Error::BadApduLength { len: 6 }
        );
        let mut ex = T0Exchange::new(&[0, 0xA4, 0, 0]).unwrap();
        assert_eq!(
            ex.on_byte(0x12),
            Err(T0Error::BadProcedureByte {
                byte: 0x12,
                ins: 0xA4
            })
        );
        let mut ex = T0Exchange::new(&[0, 0xA4, 0, 0]).unwrap();
        assert_eq!(ex.on_byte(0xA4), Err(T0Error::UnexpectedAck { byte: 0xA4 }));
    }

    #[test]
    fn pps_request_and_accepted_response() {
        let mut pps = PpsExchange::new(0, Some(0x13));
        assert_eq!(pps.request(), [0xFF, 0x10, 0x13, 0xFF ^ 0x10 ^ 0x13]);
        let echo = pps.request().to_vec();
        let mut step = PpsStep::Receive;
        for b in echo {
            step = pps.on_byte(b);
        }
        let PpsStep::Done(Ok(outcome)) = step else {
            panic!("{step:?}")
        };
        assert_eq!(outcome.pps1, Some(0x13));
        assert_eq!(outcome.fi_di.di, 4);
        assert_eq!(outcome.fi_di.baud(3_571_200), 38_400);
    }

    #[test]
    fn pps_response_without_pps1_keeps_defaults() {
        let mut pps = PpsExchange::new(0, Some(0x13));
        assert_eq!(pps.on_byte(0xFF), PpsStep::Receive);
        assert_eq!(pps.on_byte(0x00), PpsStep::Receive);
        let PpsStep::Done(Ok(outcome)) = pps.on_byte(0xFF) else {
            panic!()
        };
        assert_eq!(outcome.fi_di, FiDi::DEFAULT);
    }

    #[test]
    fn pps_bad_responses() {
        let mut pps = PpsExchange::new(0, Some(0x13));
        assert_eq!(
            pps.on_byte(0x3B),
            PpsStep::Done(Err(PpsError::BadPpss(0x3B)))
        );
        let mut pps = PpsExchange::new(0, Some(0x13));
        for b in [0xFF, 0x10, 0x13] {
            pps.on_byte(b);
        }
        assert_eq!(pps.on_byte(0x00), PpsStep::Done(Err(PpsError::BadPck)));
        let mut pps = PpsExchange::new(0, Some(0x13));
        for b in [0xFF, 0x10, 0x12] {
            pps.on_byte(b);
        }
        assert_eq!(
            pps.on_byte(0xFF ^ 0x10 ^ 0x12),
            PpsStep::Done(Err(PpsError::BadPps1 {
                requested: 0x13,
                got: 0x12
            }))
        );
    }

    proptest! {
        #[test]
        fn t0_engine_never_panics(
            apdu in proptest::collection::vec(any::<u8>(), 0..300),
            card in proptest::collection::vec(any::<u8>(), 0..600),
        ) {
            if let Ok(mut ex) = T0Exchange::new(&apdu) {
                let mut sent_total = 0;
                for b in card {
                    match ex.on_byte(b) {
                        Ok(T0Step::Send(bytes)) => sent_total += bytes.len(),
                        Ok(_) => {}
                        Err(_) => break,
                    }
                }
                // The engine never sends more than the APDU's data.
                prop_assert!(sent_total <= apdu.len().saturating_sub(5));
            }
        }

        #[test]
        fn pps_engine_never_panics(
            ta1 in any::<u8>(),
            resp in proptest::collection::vec(any::<u8>(), 0..10),
        ) {
            let mut pps = PpsExchange::new(0, Some(ta1));
            for b in resp {
                if let PpsStep::Done(_) = pps.on_byte(b) {
                    break;
                }
            }
        }
    }
}
