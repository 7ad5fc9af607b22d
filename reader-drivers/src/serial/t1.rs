//! Sans-IO ISO 7816-3 T=1 (block transmission protocol), interface-device side, and the block
//! codec both sides share.
//!
//! A block is NAD PCB LEN INF EDC. I-blocks carry the APDU and its response (chained with the
//! M bit when longer than the receiver's information field size); R-blocks acknowledge a
//! chained I-block or ask for a block again; S-blocks negotiate (IFS), extend the waiting time
//! (WTX), abort a chain and resynchronise. The EDC is an LRC, or a CRC when TC3 asks for it.
//!
//! [`T1Host`] lives as long as the card session (sequence numbers and IFSC carry over between
//! APDUs). The serial shell feeds it whole blocks (or "this block was bad", or "the block
//! waiting time ran out") and sends what it answers; the waiting times (BWT, CWT from TB3,
//! the WTX multiplier) are the shell's to keep, from [`T1Host::wait_factor`].
//!
//! Error handling follows ISO 7816-3 11.6.3: an invalid block or a timeout is answered with an
//! R-block naming the expected block; an R-block naming our last I-block gets it again; after
//! three failed attempts on the same block the host sends S(RESYNCH request), and after a
//! successful resynchronisation sends the command again from its first block (sequence numbers
//! and information field sizes back at their initial values). Three failed resynchronisations
//! end the session.

use super::atr::{Edc, T1Params};

/// Attempts on one block before the host resynchronises (ISO 7816-3: at most 3 repetitions).
pub const MAX_RETRIES: u8 = 3;
/// Resynchronisations tried before the card is given up.
pub const MAX_RESYNCHS: u8 = 3;
/// The node address byte: no addressing.
pub const NAD: u8 = 0x00;

/// The error field of an R-block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RError {
    None,
    /// EDC or parity error.
    Edc,
    Other,
}

/// S-block types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SKind {
    Resynch,
    Ifs,
    Abort,
    Wtx,
}

impl SKind {
    fn code(self) -> u8 {
        match self {
            SKind::Resynch => 0,
            SKind::Ifs => 1,
            SKind::Abort => 2,
            SKind::Wtx => 3,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => SKind::Resynch,
            1 => SKind::Ifs,
            2 => SKind::Abort,
            3 => SKind::Wtx,
            _ => return None,
        })
    }
}

/// A decoded block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Block {
    I {
        ns: bool,
        more: bool,
        inf: Vec<u8>,
    },
    R {
        nr: bool,
        error: RError,
    },
    S {
        kind: SKind,
        response: bool,
        inf: Vec<u8>,
    },
}

/// Why received bytes are not a valid block.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlockError {
    #[error("block of {0} bytes is shorter than its prologue and EDC")]
    Short(usize),
    #[error("block length does not match LEN")]
    Length,
    #[error("EDC does not check")]
    Edc,
    #[error("PCB {0:#04x} is not a valid block type")]
    Pcb(u8),
}

/// Bytes of EDC.
pub fn edc_len(edc: Edc) -> usize {
    match edc {
        Edc::Lrc => 1,
        Edc::Crc => 2,
    }
}

/// The longitudinal redundancy check: XOR of every byte.
pub fn lrc(data: &[u8]) -> u8 {
    data.iter().fold(0, |a, b| a ^ b)
}

/// The T=1 CRC (TC3 b1 = 1): CRC-16 with polynomial x^16 + x^12 + x^5 + 1, bits reflected,
/// initial value FFFF, no final XOR (what pcsc-lite's CCID driver and OpenCT compute), sent
/// high byte first.
pub fn crc(data: &[u8]) -> [u8; 2] {
    const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_MCRF4XX);
    CRC16.checksum(data).to_be_bytes()
}

fn append_edc(mut block: Vec<u8>, edc: Edc) -> Vec<u8> {
    match edc {
        Edc::Lrc => {
            let l = lrc(&block);
            block.push(l);
        }
        Edc::Crc => {
            let c = crc(&block);
            block.extend_from_slice(&c);
        }
    }
    block
}

/// Encodes a block with the given NAD and EDC.
pub fn encode(nad: u8, block: &Block, edc: Edc) -> Vec<u8> {
    let (pcb, inf): (u8, &[u8]) = match block {
        Block::I { ns, more, inf } => (u8::from(*ns) << 6 | u8::from(*more) << 5, inf),
        Block::R { nr, error } => (
            0x80 | u8::from(*nr) << 4
                | match error {
                    RError::None => 0,
                    RError::Edc => 1,
                    RError::Other => 2,
                },
            &[],
        ),
        Block::S {
            kind,
            response,
            inf,
        } => (0xC0 | u8::from(*response) << 5 | kind.code(), inf),
    };
    let mut out = vec![nad, pcb, inf.len() as u8];
    out.extend_from_slice(inf);
    append_edc(out, edc)
}

/// Decodes and checks a whole block; returns its NAD and content.
pub fn decode(raw: &[u8], edc: Edc) -> Result<(u8, Block), BlockError> {
    let n = edc_len(edc);
    if raw.len() < 3 + n {
        return Err(BlockError::Short(raw.len()));
    }
    let len = usize::from(raw[2]);
    if raw.len() != 3 + len + n || len == 255 {
        return Err(BlockError::Length);
    }
    let (body, check) = raw.split_at(3 + len);
    let ok = match edc {
        Edc::Lrc => lrc(body) == check[0],
        Edc::Crc => crc(body) == check,
    };
    if !ok {
        return Err(BlockError::Edc);
    }
    let pcb = raw[1];
    let inf = body[3..].to_vec();
    let block = if pcb & 0x80 == 0 {
        Block::I {
            ns: pcb & 0x40 != 0,
            more: pcb & 0x20 != 0,
            inf,
        }
    } else if pcb & 0x40 == 0 {
        if !inf.is_empty() || pcb & 0x20 != 0 {
            return Err(BlockError::Pcb(pcb));
        }
        let error = match pcb & 0x0F {
            0 => RError::None,
            1 => RError::Edc,
            _ => RError::Other,
        };
        Block::R {
            nr: pcb & 0x10 != 0,
            error,
        }
    } else {
        let kind = SKind::from_code(pcb & 0x1F).ok_or(BlockError::Pcb(pcb))?;
        Block::S {
            kind,
            response: pcb & 0x20 != 0,
            inf,
        }
    };
    Ok((raw[0], block))
}

/// Collects a block byte by byte off the line.
#[derive(Debug, Clone)]
pub struct BlockReader {
    edc: Edc,
    buf: Vec<u8>,
}

impl BlockReader {
    pub fn new(edc: Edc) -> Self {
        Self {
            edc,
            buf: Vec::new(),
        }
    }

    /// Adds a byte; true when the block is complete (by its LEN).
    pub fn push(&mut self, b: u8) -> bool {
        self.buf.push(b);
        self.expected().is_some_and(|n| self.buf.len() >= n)
    }

    /// The block's total length, once LEN is in.
    pub fn expected(&self) -> Option<usize> {
        self.buf
            .get(2)
            .map(|&len| 3 + usize::from(len) + edc_len(self.edc))
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}

/// Why a T=1 exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum T1Error {
    #[error("empty APDU")]
    EmptyApdu,
    #[error("the card did not answer T=1 after {MAX_RESYNCHS} resynchronisations — reset the card")]
    ResynchFailed,
    #[error("the card aborted the exchange (S(ABORT))")]
    Aborted,
    #[error("no exchange in progress")]
    Idle,
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum T1Step {
    /// Send this block, then wait for the card's next block (BWT × [`T1Host::wait_factor`]).
    Send(Vec<u8>),
    /// The exchange is over: the response APDU (empty for an IFS negotiation).
    Done(Vec<u8>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    /// We sent an I-block of the command: `last` is whether it was the final one.
    Sending {
        last: bool,
    },
    /// The card is chaining its response to us; we acknowledged its last block.
    Receiving,
    /// We asked the card to take our IFSD.
    Ifs,
    /// We sent S(RESYNCH request); `after` is what to do on success.
    Resynch {
        ifs: bool,
    },
}

/// Counters for tests and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct T1Stats {
    pub blocks_sent: u32,
    pub blocks_received: u32,
    pub invalid_received: u32,
    pub r_blocks_sent: u32,
    pub retransmissions: u32,
    pub resynchs: u32,
    pub wtx_requests: u32,
    pub ifs_requests: u32,
    pub chained_sent: u32,
    pub chained_received: u32,
}

/// The interface device's side of T=1 for one card session.
#[derive(Debug, Clone)]
pub struct T1Host {
    edc: Edc,
    initial_ifsc: u8,
    /// The card's information field size: our I-blocks carry at most this.
    ifsc: u8,
    /// Ours, as the card knows it (32 until an S(IFS) exchange changes it).
    ifsd: u8,
    /// The IFSD being negotiated.
    ifsd_wanted: u8,
    /// N(S) of our next new I-block.
    ns: bool,
    /// N(S) expected in the card's next I-block.
    nr: bool,
    state: State,
    /// The last block we sent (for retransmission).
    last_sent: Vec<u8>,
    /// N(S) of the last I-block we sent.
    last_i_ns: bool,
    retries: u8,
    resynchs: u8,
    wtx: u8,
    apdu: Vec<u8>,
    /// Start of the chunk in flight, and its length.
    offset: usize,
    chunk: usize,
    response: Vec<u8>,
    stats: T1Stats,
}

impl T1Host {
    pub fn new(params: &T1Params) -> Self {
        Self {
            edc: params.edc,
            initial_ifsc: params.ifsc,
            ifsc: params.ifsc,
            ifsd: 32,
            ifsd_wanted: 32,
            ns: false,
            nr: false,
            state: State::Idle,
            last_sent: Vec::new(),
            last_i_ns: false,
            retries: 0,
            resynchs: 0,
            wtx: 1,
            apdu: Vec::new(),
            offset: 0,
            chunk: 0,
            response: Vec::new(),
            stats: T1Stats::default(),
        }
    }

    pub fn edc(&self) -> Edc {
        self.edc
    }
    pub fn ifsc(&self) -> u8 {
        self.ifsc
    }
    pub fn ifsd(&self) -> u8 {
        self.ifsd
    }
    pub fn stats(&self) -> T1Stats {
        self.stats
    }

    /// The multiplier of BWT for the next wait (a WTX the card asked for; 1 otherwise).
    pub fn wait_factor(&self) -> u32 {
        u32::from(self.wtx.max(1))
    }

    fn send(&mut self, block: Block) -> T1Step {
        if let Block::I { ns, more, .. } = &block {
            self.last_i_ns = *ns;
            if *more {
                self.stats.chained_sent += 1;
            }
        }
        if matches!(block, Block::R { .. }) {
            self.stats.r_blocks_sent += 1;
        }
        self.last_sent = encode(NAD, &block, self.edc);
        self.stats.blocks_sent += 1;
        T1Step::Send(self.last_sent.clone())
    }

    fn resend(&mut self) -> T1Step {
        self.stats.retransmissions += 1;
        self.stats.blocks_sent += 1;
        T1Step::Send(self.last_sent.clone())
    }

    /// Asks the card to accept information fields of up to `ifsd` bytes from it (S(IFS
    /// request)); the exchange is [`T1Step::Done`] with an empty response when it agrees.
    pub fn negotiate_ifsd(&mut self, ifsd: u8) -> Vec<u8> {
        let ifsd = ifsd.clamp(1, 254);
        self.ifsd_wanted = ifsd;
        self.state = State::Ifs;
        self.retries = 0;
        self.resynchs = 0;
        self.stats.ifs_requests += 1;
        match self.send(Block::S {
            kind: SKind::Ifs,
            response: false,
            inf: vec![ifsd],
        }) {
            T1Step::Send(b) => b,
            T1Step::Done(_) => unreachable!("send always sends"),
        }
    }

    /// Starts an exchange; returns the first block to send.
    pub fn start(&mut self, apdu: &[u8]) -> Result<Vec<u8>, T1Error> {
        if apdu.is_empty() {
            return Err(T1Error::EmptyApdu);
        }
        self.apdu = apdu.to_vec();
        self.offset = 0;
        self.response.clear();
        self.retries = 0;
        self.resynchs = 0;
        match self.send_chunk() {
            T1Step::Send(b) => Ok(b),
            T1Step::Done(_) => unreachable!("a chunk is always sent"),
        }
    }

    /// Sends the I-block for the chunk at `offset`.
    fn send_chunk(&mut self) -> T1Step {
        let rest = self.apdu.len() - self.offset;
        self.chunk = rest.min(usize::from(self.ifsc.max(1)));
        let last = self.chunk == rest;
        let inf = self.apdu[self.offset..self.offset + self.chunk].to_vec();
        let ns = self.ns;
        self.ns = !self.ns;
        self.state = State::Sending { last };
        self.send(Block::I {
            ns,
            more: !last,
            inf,
        })
    }

    /// The block the card sent, whole (by LEN) but not yet checked.
    pub fn on_block(&mut self, raw: &[u8]) -> Result<T1Step, T1Error> {
        if self.state == State::Idle {
            return Err(T1Error::Idle);
        }
        self.stats.blocks_received += 1;
        self.wtx = 1;
        match decode(raw, self.edc) {
            Ok((_, block)) => self.on_valid(block),
            Err(BlockError::Edc) => self.invalid(RError::Edc),
            Err(_) => self.invalid(RError::Other),
        }
    }

    /// A block that arrived damaged: a parity error, or the character waiting time ran out in
    /// the middle of it.
    pub fn on_bad_block(&mut self, edc_or_parity: bool) -> Result<T1Step, T1Error> {
        if self.state == State::Idle {
            return Err(T1Error::Idle);
        }
        self.stats.blocks_received += 1;
        self.wtx = 1;
        self.invalid(if edc_or_parity {
            RError::Edc
        } else {
            RError::Other
        })
    }

    /// The block waiting time ran out with nothing received.
    pub fn on_timeout(&mut self) -> Result<T1Step, T1Error> {
        if self.state == State::Idle {
            return Err(T1Error::Idle);
        }
        self.wtx = 1;
        self.invalid(RError::Other)
    }

    fn invalid(&mut self, error: RError) -> Result<T1Step, T1Error> {
        self.stats.invalid_received += 1;
        self.retries += 1;
        if self.retries > MAX_RETRIES {
            return self.resynch();
        }
        Ok(match self.state {
            State::Resynch { .. } | State::Ifs => self.resend(),
            _ => self.send(Block::R { nr: self.nr, error }),
        })
    }

    fn resynch(&mut self) -> Result<T1Step, T1Error> {
        self.resynchs += 1;
        if self.resynchs > MAX_RESYNCHS {
            self.state = State::Idle;
            return Err(T1Error::ResynchFailed);
        }
        self.stats.resynchs += 1;
        self.retries = 0;
        let ifs = matches!(self.state, State::Ifs | State::Resynch { ifs: true });
        self.state = State::Resynch { ifs };
        Ok(self.send(Block::S {
            kind: SKind::Resynch,
            response: false,
            inf: Vec::new(),
        }))
    }

    fn on_valid(&mut self, block: Block) -> Result<T1Step, T1Error> {
        match (self.state, block) {
            // The card asks: answer and keep waiting for what we were waiting for.
            (
                _,
                Block::S {
                    kind: SKind::Ifs,
                    response: false,
                    inf,
                },
            ) if inf.len() == 1 && (1..=254).contains(&inf[0]) => {
                self.stats.ifs_requests += 1;
                self.ifsc = inf[0];
                Ok(self.send(Block::S {
                    kind: SKind::Ifs,
                    response: true,
                    inf,
                }))
            }
            (
                _,
                Block::S {
                    kind: SKind::Wtx,
                    response: false,
                    inf,
                },
            ) if inf.len() == 1 => {
                self.stats.wtx_requests += 1;
                let step = self.send(Block::S {
                    kind: SKind::Wtx,
                    response: true,
                    inf: inf.clone(),
                });
                self.wtx = inf[0].max(1);
                Ok(step)
            }
            (
                _,
                Block::S {
                    kind: SKind::Abort,
                    response: false,
                    ..
                },
            ) => {
                self.state = State::Idle;
                Err(T1Error::Aborted)
            }
            (
                State::Resynch { ifs },
                Block::S {
                    kind: SKind::Resynch,
                    response: true,
                    ..
                },
            ) => {
                // Back to the initial state: sequence numbers 0, IFSC from the ATR, IFSD 32.
                self.ns = false;
                self.nr = false;
                self.ifsc = self.initial_ifsc;
                self.ifsd = 32;
                self.retries = 0;
                if ifs {
                    self.state = State::Ifs;
                    Ok(self.send(Block::S {
                        kind: SKind::Ifs,
                        response: false,
                        inf: vec![self.ifsd_wanted],
                    }))
                } else {
                    self.offset = 0;
                    self.response.clear();
                    Ok(self.send_chunk())
                }
            }
            (
                State::Ifs,
                Block::S {
                    kind: SKind::Ifs,
                    response: true,
                    inf,
                },
            ) if inf == [self.ifsd_wanted] => {
                self.ifsd = self.ifsd_wanted;
                self.state = State::Idle;
                Ok(T1Step::Done(Vec::new()))
            }
            (State::Sending { last }, Block::R { nr, .. }) => {
                if nr == self.last_i_ns {
                    // The card asks for our last I-block again.
                    self.retries += 1;
                    if self.retries > MAX_RETRIES {
                        return self.resynch();
                    }
                    Ok(self.resend())
                } else if !last {
                    // Acknowledges our chained block: on to the next.
                    self.retries = 0;
                    self.offset += self.chunk;
                    Ok(self.send_chunk())
                } else {
                    self.invalid(RError::Other)
                }
            }
            (State::Receiving, Block::R { .. }) => {
                self.retries += 1;
                if self.retries > MAX_RETRIES {
                    return self.resynch();
                }
                Ok(self.resend())
            }
            (State::Sending { last: true } | State::Receiving, Block::I { ns, more, inf }) => {
                if ns != self.nr {
                    // A block we already took, sent again: our acknowledgement was lost.
                    if self.state == State::Receiving {
                        return Ok(self.resend());
                    }
                    return self.invalid(RError::Other);
                }
                if inf.len() > usize::from(self.ifsd) {
                    return self.invalid(RError::Other);
                }
                self.nr = !self.nr;
                self.retries = 0;
                self.response.extend_from_slice(&inf);
                if more {
                    self.stats.chained_received += 1;
                    self.state = State::Receiving;
                    Ok(self.send(Block::R {
                        nr: self.nr,
                        error: RError::None,
                    }))
                } else {
                    self.state = State::Idle;
                    Ok(T1Step::Done(std::mem::take(&mut self.response)))
                }
            }
            _ => self.invalid(RError::Other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> T1Params {
        T1Params {
            ifsc: 16,
            ..T1Params::default()
        }
    }

    #[test]
    fn block_codec_round_trips_with_lrc_and_crc() {
        for edc in [Edc::Lrc, Edc::Crc] {
            for block in [
                Block::I {
                    ns: true,
                    more: true,
                    inf: vec![1, 2, 3],
                },
                Block::R {
                    nr: true,
                    error: RError::Edc,
                },
                Block::S {
                    kind: SKind::Wtx,
                    response: true,
                    inf: vec![5],
                },
            ] {
                let raw = encode(NAD, &block, edc);
                assert_eq!(decode(&raw, edc), Ok((NAD, block.clone())));
                let mut bad = raw.clone();
                *bad.last_mut().unwrap() ^= 1;
                assert_eq!(decode(&bad, edc), Err(BlockError::Edc));
            }
        }
        // ISO 7816-3 Annex A style: I(0,0) "00 00 00" LRC.
        assert_eq!(
            encode(
                0,
                &Block::I {
                    ns: false,
                    more: false,
                    inf: vec![]
                },
                Edc::Lrc
            ),
            [0, 0, 0, 0]
        );
        // S(IFS request 254) as every T=1 trace shows it: 00 C1 01 FE 3E.
        assert_eq!(
            encode(
                0,
                &Block::S {
                    kind: SKind::Ifs,
                    response: false,
                    inf: vec![0xFE]
                },
                Edc::Lrc
            ),
            [0x00, 0xC1, 0x01, 0xFE, 0x3E]
        );
    }

    #[test]
    fn chained_command_then_response() {
        let mut h = T1Host::new(&params());
        let apdu: Vec<u8> = (0..40).collect();
        let b = h.start(&apdu).unwrap();
        let (_, first) = decode(&b, Edc::Lrc).unwrap();
        assert_eq!(
            first,
            Block::I {
                ns: false,
                more: true,
                inf: apdu[..16].to_vec()
            }
        );
        let ack = encode(
            0,
            &Block::R {
                nr: true,
                error: RError::None,
            },
            Edc::Lrc,
        );
        let T1Step::Send(b) = h.on_block(&ack).unwrap() else {
            panic!()
        };
        assert_eq!(
            decode(&b, Edc::Lrc).unwrap().1,
            Block::I {
                ns: true,
                more: true,
                inf: apdu[16..32].to_vec()
            }
        );
        let ack = encode(
            0,
            &Block::R {
                nr: false,
                error: RError::None,
            },
            Edc::Lrc,
        );
        let T1Step::Send(b) = h.on_block(&ack).unwrap() else {
            panic!()
        };
        assert_eq!(
            decode(&b, Edc::Lrc).unwrap().1,
            Block::I {
                ns: false,
                more: false,
                inf: apdu[32..].to_vec()
            }
        );
        // The card chains its answer.
        let part = encode(
            0,
            &Block::I {
                ns: false,
                more: true,
                inf: vec![1, 2],
            },
            Edc::Lrc,
        );
        let T1Step::Send(b) = h.on_block(&part).unwrap() else {
            panic!()
        };
        assert_eq!(
            decode(&b, Edc::Lrc).unwrap().1,
            Block::R {
                nr: true,
                error: RError::None
            }
        );
        let end = encode(
            0,
            &Block::I {
                ns: true,
                more: false,
                inf: vec![0x90, 0x00],
            },
            Edc::Lrc,
        );
        assert_eq!(h.on_block(&end), Ok(T1Step::Done(vec![1, 2, 0x90, 0x00])));
    }

    #[test]
    fn bad_blocks_get_r_blocks_then_resynch() {
        let mut h = T1Host::new(&params());
        h.start(&[0, 0xA4, 0, 0]).unwrap();
        for _ in 0..MAX_RETRIES {
            let T1Step::Send(b) = h.on_block(&[0, 0, 1, 0x90, 0x55]).unwrap() else {
                panic!()
            };
            assert_eq!(
                decode(&b, Edc::Lrc).unwrap().1,
                Block::R {
                    nr: false,
                    error: RError::Edc
                }
            );
        }
        let T1Step::Send(b) = h.on_timeout().unwrap() else {
            panic!()
        };
        assert_eq!(
            decode(&b, Edc::Lrc).unwrap().1,
            Block::S {
                kind: SKind::Resynch,
                response: false,
                inf: vec![]
            }
        );
        let resp = encode(
            0,
            &Block::S {
                kind: SKind::Resynch,
                response: true,
                inf: vec![],
            },
            Edc::Lrc,
        );
        let T1Step::Send(b) = h.on_block(&resp).unwrap() else {
            panic!()
        };
        // The command again from its first block, N(S) = 0.
        assert_eq!(
            decode(&b, Edc::Lrc).unwrap().1,
            Block::I {
                ns: false,
                more: false,
                inf: vec![0, 0xA4, 0, 0]
            }
        );
        assert_eq!(h.stats().resynchs, 1);
    }

    #[test]
    fn resynch_gives_up() {
        let mut h = T1Host::new(&params());
        h.start(&[1, 2, 3, 4]).unwrap();
        let mut last = Ok(T1Step::Done(vec![]));
        for _ in 0..100 {
            last = h.on_timeout();
            if last.is_err() {
                break;
            }
        }
        assert_eq!(last, Err(T1Error::ResynchFailed));
    }

    #[test]
    fn ifs_and_wtx_requests_are_answered() {
        let mut h = T1Host::new(&params());
        h.start(&[1, 2, 3, 4]).unwrap();
        let req = encode(
            0,
            &Block::S {
                kind: SKind::Wtx,
                response: false,
                inf: vec![7],
            },
            Edc::Lrc,
        );
        let T1Step::Send(b) = h.on_block(&req).unwrap() else {
            panic!()
        };
        assert_eq!(
            b,
            encode(
                0,
                &Block::S {
                    kind: SKind::Wtx,
                    response: true,
                    inf: vec![7]
                },
                Edc::Lrc
            )
        );
        assert_eq!(h.wait_factor(), 7);
        let req = encode(
            0,
            &Block::S {
                kind: SKind::Ifs,
                response: false,
                inf: vec![8],
            },
            Edc::Lrc,
        );
        h.on_block(&req).unwrap();
        assert_eq!(h.wait_factor(), 1);
        assert_eq!(h.ifsc(), 8);
    }

    proptest::proptest! {
        #[test]
        fn host_never_panics(apdu in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300),
                             blocks in proptest::collection::vec(proptest::collection::vec(proptest::prelude::any::<u8>(), 0..40), 0..30)) {
            let mut h = T1Host::new(&params());
            h.start(&apdu).unwrap();
            for b in blocks {
                if h.on_block(&b).is_err() { break; }
            }
            let _ = decode(&apdu, Edc::Crc);
        }
    }
}
