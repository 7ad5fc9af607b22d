//! The card's side of T=1 (sans-IO), for the emulator: takes the host's blocks, acknowledges
//! chained commands, chains responses longer than the host's IFSD, answers S-blocks, and
//! retransmits on request. The emulator (`phoenix`) adds the faults a test asks for (a damaged
//! block, a block cut off, S(WTX) and S(IFS) requests) on the line.

use crate::serial::atr::Edc;
use crate::serial::t1::{Block, NAD, RError, SKind, decode, encode};

/// What the card does after a block from the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CardStep {
    Send(Vec<u8>),
    /// A whole command APDU arrived: process it and [`T1Card::respond`].
    Command(Vec<u8>),
    /// The host answered our S(WTX) or S(IFS) request: send what was pending.
    Resume,
}

/// Counters for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CardT1Stats {
    pub blocks_received: u32,
    pub bad_received: u32,
    pub r_received: u32,
    /// R-blocks from the host with an error indication (it got a bad block from us).
    pub r_error_received: u32,
    pub retransmitted: u32,
    pub resynchs: u32,
    /// The host's chained I-blocks (M = 1) and the largest INF it sent.
    pub host_chained: u32,
    pub host_max_inf: u8,
    /// Our chained I-blocks.
    pub card_chained: u32,
    /// IFSD the host told us.
    pub ifsd: u8,
}

pub struct T1Card {
    edc: Edc,
    ifsd: u8,
    ns: bool,
    nr: bool,
    rx: Vec<u8>,
    tx: Option<(Vec<u8>, usize)>,
    last_i: Option<Vec<u8>>,
    last_i_ns: bool,
    pub stats: CardT1Stats,
}

impl T1Card {
    pub fn new(edc: Edc) -> Self {
        Self {
            edc,
            ifsd: 32,
            ns: false,
            nr: false,
            rx: Vec::new(),
            tx: None,
            last_i: None,
            last_i_ns: false,
            stats: CardT1Stats {
                ifsd: 32,
                ..CardT1Stats::default()
            },
        }
    }

    /// After a reset: everything back to the initial state.
    pub fn reset(&mut self) {
        let stats = self.stats;
        *self = Self::new(self.edc);
        self.stats = stats;
    }

    fn block(&self, b: &Block) -> Vec<u8> {
        encode(NAD, b, self.edc)
    }

    pub fn on_block(&mut self, raw: &[u8]) -> CardStep {
        self.stats.blocks_received += 1;
        let block = match decode(raw, self.edc) {
            Ok((_, b)) => b,
            Err(e) => {
                self.stats.bad_received += 1;
                let error = if e == crate::serial::t1::BlockError::Edc {
                    RError::Edc
                } else {
                    RError::Other
                };
                return CardStep::Send(self.block(&Block::R { nr: self.nr, error }));
            }
        };
        match block {
            Block::I { ns, more, inf } => {
                if ns != self.nr {
                    // The host did not get our answer and sent its block again.
                    if let Some(last) = self.last_i.clone() {
                        self.stats.retransmitted += 1;
                        return CardStep::Send(last);
                    }
                    return CardStep::Send(self.block(&Block::R {
                        nr: self.nr,
                        error: RError::Other,
                    }));
                }
                self.nr = !self.nr;
                self.stats.host_max_inf = self.stats.host_max_inf.max(inf.len() as u8);
                self.rx.extend_from_slice(&inf);
                if more {
                    self.stats.host_chained += 1;
                    CardStep::Send(self.block(&Block::R {
                        nr: self.nr,
                        error: RError::None,
                    }))
                } else {
                    self.tx = None;
                    CardStep::Command(std::mem::take(&mut self.rx))
                }
            }
            Block::R { nr, error } => {
                self.stats.r_received += 1;
                if error != RError::None {
                    self.stats.r_error_received += 1;
                }
                if self.tx.is_some() && nr == self.ns {
                    return CardStep::Send(self.next_chunk());
                }
                if let Some(last) = self.last_i.clone().filter(|_| nr == self.last_i_ns) {
                    self.stats.retransmitted += 1;
                    return CardStep::Send(last);
                }
                CardStep::Send(self.block(&Block::R {
                    nr: self.nr,
                    error: RError::Other,
                }))
            }
            Block::S {
                kind,
                response: false,
                inf,
            } => match kind {
                SKind::Ifs if inf.len() == 1 => {
                    self.ifsd = inf[0].max(1);
                    self.stats.ifsd = self.ifsd;
                    CardStep::Send(self.block(&Block::S {
                        kind,
                        response: true,
                        inf,
                    }))
                }
                SKind::Resynch => {
                    self.reset();
                    self.stats.resynchs += 1;
                    CardStep::Send(self.block(&Block::S {
                        kind,
                        response: true,
                        inf: Vec::new(),
                    }))
                }
                SKind::Abort => {
                    self.rx.clear();
                    self.tx = None;
                    CardStep::Send(self.block(&Block::S {
                        kind,
                        response: true,
                        inf: Vec::new(),
                    }))
                }
                _ => CardStep::Send(self.block(&Block::R {
                    nr: self.nr,
                    error: RError::Other,
                })),
            },
            Block::S { response: true, .. } => CardStep::Resume,
        }
    }

    /// The response to the command; returns its first block.
    pub fn respond(&mut self, response: Vec<u8>) -> Vec<u8> {
        self.tx = Some((response, 0));
        self.next_chunk()
    }

    fn next_chunk(&mut self) -> Vec<u8> {
        let Some((data, offset)) = self.tx.take() else {
            return self.block(&Block::R {
                nr: self.nr,
                error: RError::Other,
            });
        };
        let n = (data.len() - offset).min(usize::from(self.ifsd));
        let more = offset + n < data.len();
        let ns = self.ns;
        self.ns = !self.ns;
        let raw = self.block(&Block::I {
            ns,
            more,
            inf: data[offset..offset + n].to_vec(),
        });
        if more {
            self.stats.card_chained += 1;
            self.tx = Some((data, offset + n));
        }
        self.last_i = Some(raw.clone());
        self.last_i_ns = ns;
        raw
    }

    /// S(IFS request): the card announces a new IFSC.
    pub fn ifs_request(&self, ifsc: u8) -> Vec<u8> {
        self.block(&Block::S {
            kind: SKind::Ifs,
            response: false,
            inf: vec![ifsc],
        })
    }

    /// S(WTX request) for `multiplier` × BWT.
    pub fn wtx_request(&self, multiplier: u8) -> Vec<u8> {
        self.block(&Block::S {
            kind: SKind::Wtx,
            response: false,
            inf: vec![multiplier],
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serial::atr::T1Params;
    use crate::serial::t1::{T1Host, T1Step};

    /// The host engine against the card engine, with no line in between.
    fn exchange(
        host: &mut T1Host,
        card: &mut T1Card,
        apdu: &[u8],
        answer: &dyn Fn(&[u8]) -> Vec<u8>,
    ) -> Vec<u8> {
        let mut to_card = host.start(apdu).unwrap();
        loop {
            let to_host = match card.on_block(&to_card) {
                CardStep::Send(b) => b,
                CardStep::Command(c) => card.respond(answer(&c)),
                CardStep::Resume => unreachable!(),
            };
            match host.on_block(&to_host).unwrap() {
                T1Step::Send(b) => to_card = b,
                T1Step::Done(r) => return r,
            }
        }
    }

    #[test]
    fn long_command_and_long_response_chain_both_ways() {
        let mut host = T1Host::new(&T1Params::default());
        let mut card = T1Card::new(Edc::Lrc);
        let apdu: Vec<u8> = (0..=255u8).cycle().take(260).collect();
        let resp = exchange(&mut host, &mut card, &apdu, &|c| {
            let mut r = c.iter().rev().copied().collect::<Vec<_>>();
            r.extend_from_slice(&[0x90, 0]);
            r
        });
        assert_eq!(resp.len(), 262);
        assert_eq!(resp[0], apdu[259]);
        assert!(card.stats.host_chained >= 8 && card.stats.card_chained >= 8);
        // Sequence numbers carry over to the next exchange.
        let resp = exchange(&mut host, &mut card, &[0, 0xB0, 0, 0, 0], &|_| {
            vec![0x90, 0]
        });
        assert_eq!(resp, [0x90, 0]);
    }

    #[test]
    fn crc_blocks_work_too() {
        let mut host = T1Host::new(&T1Params {
            edc: Edc::Crc,
            ..T1Params::default()
        });
        let mut card = T1Card::new(Edc::Crc);
        let resp = exchange(&mut host, &mut card, &[0, 0xA4, 4, 0, 1, 7], &|_| {
            vec![0x90, 0]
        });
        assert_eq!(resp, [0x90, 0]);
    }
}
