//! ISO 7816-3 answer-to-reset parser: TS (direct or inverse convention), T0, the interface
//! bytes TA1…TDi, the historical bytes and the TCK check; and the timing parameters the serial
//! driver takes from the ATR (Fi/Di, extra guard time, WI, offered protocols).
//!
//! Sans-IO and total: any byte string yields an [`Atr`] or a specific [`AtrError`], never a
//! panic. [`AtrError::Truncated`] doubles as "need more bytes" when the ATR is read one byte at
//! a time off the line.

use std::time::Duration;

/// The longest ATR ISO 7816-3 allows (TS + 32 characters).
pub const MAX_ATR_LEN: usize = 33;

/// How the card codes its characters on the line, given by TS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Convention {
    /// TS = 3B: high level is 1, least significant bit first.
    Direct,
    /// TS = 3F: low level is 1, most significant bit first. A UART that assumes the direct
    /// convention reads the TS character as 0x03.
    Inverse,
}

/// TS as a direct-convention UART receives it from an inverse-convention card.
pub const RAW_INVERSE_TS: u8 = 0x03;

/// Converts a byte between its inverse-convention line form and its value: bit order
/// reversed and complemented. The conversion is its own inverse.
pub fn invert_byte(b: u8) -> u8 {
    (!b).reverse_bits()
}

impl Convention {
    /// Decodes a byte as received by a direct-convention UART into its value.
    pub fn decode(self, raw: u8) -> u8 {
        match self {
            Convention::Direct => raw,
            Convention::Inverse => invert_byte(raw),
        }
    }
    /// Encodes a value into the byte a direct-convention UART must send.
    pub fn encode(self, value: u8) -> u8 {
        // The inversion is an involution, so encoding and decoding are the same operation.
        self.decode(value)
    }
}

/// Why a byte string is not a well-formed ATR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtrError {
    #[error("empty ATR")]
    Empty,
    #[error("TS is {0:#04x}; expected 3B (direct convention) or 3F (inverse convention)")]
    BadTs(u8),
    #[error("ATR truncated: {have} bytes, at least {needed} needed")]
    Truncated { needed: usize, have: usize },
    #[error(
        "TCK mismatch: received {received:#04x}, XOR of T0..historical bytes gives {computed:#04x}"
    )]
    BadTck { computed: u8, received: u8 },
    #[error("ATR of {len} bytes exceeds the {MAX_ATR_LEN}-byte maximum")]
    TooLong { len: usize },
    #[error("{extra} bytes after the end of the ATR")]
    TrailingBytes { extra: usize },
}

/// One group of interface bytes TAi TBi TCi TDi (i = 1, 2, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceGroup {
    pub ta: Option<u8>,
    pub tb: Option<u8>,
    pub tc: Option<u8>,
    pub td: Option<u8>,
}

/// The clock rate conversion factor and baud rate adjustment factor coded in TA1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FiDi {
    pub fi: u16,
    pub di: u8,
    /// The highest clock frequency the card accepts with this Fi, in Hz.
    pub fmax_hz: u32,
}

impl FiDi {
    /// The defaults that hold until a PPS exchange (or specific mode) changes them.
    pub const DEFAULT: FiDi = FiDi {
        fi: 372,
        di: 1,
        fmax_hz: 5_000_000,
    };

    /// Decodes TA1; `None` for the values ISO 7816-3 reserves for future use.
    pub fn from_ta1(ta1: u8) -> Option<FiDi> {
        const FI: [(u16, u32); 16] = [
            (372, 4_000_000),
            (372, 5_000_000),
            (558, 6_000_000),
            (744, 8_000_000),
            (1116, 12_000_000),
            (1488, 16_000_000),
            (1860, 20_000_000),
            (0, 0),
            (0, 0),
            (512, 5_000_000),
            (768, 7_500_000),
            (1024, 10_000_000),
            (1536, 15_000_000),
            (2048, 20_000_000),
            (0, 0),
            (0, 0),
        ];
        const DI: [u8; 16] = [0, 1, 2, 4, 8, 16, 32, 64, 12, 20, 0, 0, 0, 0, 0, 0];
        let (fi, fmax_hz) = FI[usize::from(ta1 >> 4)];
        let di = DI[usize::from(ta1 & 0x0F)];
        (fi != 0 && di != 0).then_some(FiDi { fi, di, fmax_hz })
    }

    /// Bits per second on the line at clock `clock_hz`: one etu is Fi / (Di × f) seconds.
    pub fn baud(self, clock_hz: u32) -> u32 {
        let baud = u64::from(clock_hz) * u64::from(self.di) / u64::from(self.fi);
        u32::try_from(baud).unwrap_or(u32::MAX)
    }

    /// The duration of `etus` elementary time units at clock `clock_hz`.
    pub fn etus(self, etus: u64, clock_hz: u32) -> Duration {
        let nanos = u128::from(etus) * u128::from(self.fi) * 1_000_000_000
            / (u128::from(self.di) * u128::from(clock_hz.max(1)));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }
}

/// TA2: the card runs in a specific mode and PPS is not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpecificMode {
    pub protocol: u8,
    /// b8 = 0: the card can change to negotiable mode (after a warm reset).
    pub can_change: bool,
    /// b5 = 1: implicit parameters, not those of TA1.
    pub implicit_parameters: bool,
}

/// A parsed answer to reset, holding its bytes as values (TS is 3B or 3F).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atr {
    pub convention: Convention,
    pub t0: u8,
    /// Interface byte groups; `groups[0]` is TA1 TB1 TC1 TD1.
    pub groups: Vec<InterfaceGroup>,
    pub historical: Vec<u8>,
    pub tck: Option<u8>,
    bytes: Vec<u8>,
}

impl Atr {
    /// Parses an ATR given as values, the way PC/SC reports it: TS is 3B or 3F.
    pub fn parse(bytes: &[u8]) -> Result<Atr, AtrError> {
        let convention = match bytes.first() {
            None => return Err(AtrError::Empty),
            Some(0x3B) => Convention::Direct,
            Some(0x3F) => Convention::Inverse,
            Some(&ts) => return Err(AtrError::BadTs(ts)),
        };
        if bytes.len() > MAX_ATR_LEN {
            // Still parse far enough to give "trailing bytes" when the ATR itself is sound.
            let parsed = Self::parse_body(&bytes[..MAX_ATR_LEN], convention);
            return match parsed {
                Ok(atr) => Err(AtrError::TrailingBytes {
                    extra: bytes.len() - atr.bytes.len(),
                }),
                Err(AtrError::TrailingBytes { .. }) | Err(AtrError::Truncated { .. }) => {
                    Err(AtrError::TooLong { len: bytes.len() })
                }
                Err(e) => Err(e),
            };
        }
        Self::parse_body(bytes, convention)
    }

    /// Parses an ATR as a direct-convention UART receives it. A first byte of 0x03 is the
    /// inverse-convention TS: then every byte is inverted before parsing.
    pub fn parse_raw(raw: &[u8]) -> Result<Atr, AtrError> {
        match raw.first() {
            None => Err(AtrError::Empty),
            Some(&RAW_INVERSE_TS) => {
                let values: Vec<u8> = raw.iter().map(|&b| invert_byte(b)).collect();
                Self::parse(&values)
            }
            Some(0x3B) => Self::parse(raw),
            Some(&ts) => Err(AtrError::BadTs(ts)),
        }
    }

    fn parse_body(bytes: &[u8], convention: Convention) -> Result<Atr, AtrError> {
        let truncated = |needed: usize| AtrError::Truncated {
            needed,
            have: bytes.len(),
        };
        let t0 = *bytes.get(1).ok_or(truncated(2))?;
        let k = usize::from(t0 & 0x0F);
        let mut y = t0 >> 4;
        let mut pos = 2;
        let mut groups = Vec::new();
        let mut needs_tck = false;
        // Each round consumes TDi, so the loop ends with the input; no separate bound needed.
        loop {
            let mut group = InterfaceGroup::default();
            for (bit, slot) in [
                (0x1, &mut group.ta),
                (0x2, &mut group.tb),
                (0x4, &mut group.tc),
                (0x8, &mut group.td),
            ] {
                if y & bit != 0 {
                    *slot = Some(*bytes.get(pos).ok_or(truncated(pos + 1 + k))?);
                    pos += 1;
                }
            }
            groups.push(group);
            match group.td {
                Some(td) => {
                    // TCK is present unless only T=0 is indicated (T=15 counts as "other").
                    if td & 0x0F != 0 {
                        needs_tck = true;
                    }
                    y = td >> 4;
                }
                None => break,
            }
        }
        let hist_end = pos + k;
        let historical = bytes
            .get(pos..hist_end)
            .ok_or(truncated(hist_end))?
            .to_vec();
        let mut end = hist_end;
        let tck = if needs_tck {
            let received = *bytes.get(hist_end).ok_or(truncated(hist_end + 1))?;
            let computed = bytes[1..hist_end].iter().fold(0u8, |acc, b| acc ^ b);
            if computed != received {
                return Err(AtrError::BadTck { computed, received });
            }
            end += 1;
            Some(received)
        } else {
            None
        };
        if bytes.len() > end {
            return Err(AtrError::TrailingBytes {
                extra: bytes.len() - end,
            });
        }
        Ok(Atr {
            convention,
            t0,
            groups,
            historical,
            tck,
            bytes: bytes[..end].to_vec(),
        })
    }

    /// The ATR as values (TS = 3B or 3F), as PC/SC would report it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn group(&self, i: usize) -> Option<&InterfaceGroup> {
        i.checked_sub(1).and_then(|i| self.groups.get(i))
    }

    pub fn ta1(&self) -> Option<u8> {
        self.group(1).and_then(|g| g.ta)
    }

    /// Fi/Di offered in TA1; `None` when TA1 is absent or holds reserved values.
    pub fn offered_fi_di(&self) -> Option<FiDi> {
        self.ta1().and_then(FiDi::from_ta1)
    }

    /// Fi for waiting times: TA1's, else the default 372.
    pub fn fi(&self) -> u16 {
        self.offered_fi_di().map_or(FiDi::DEFAULT.fi, |p| p.fi)
    }

    /// Di offered in TA1, else the default 1.
    pub fn di(&self) -> u8 {
        self.offered_fi_di().map_or(FiDi::DEFAULT.di, |p| p.di)
    }

    /// TC1: extra guard time N in etu the interface adds between its characters
    /// (255 means the minimum character distance).
    pub fn extra_guard_time(&self) -> u8 {
        self.group(1).and_then(|g| g.tc).unwrap_or(0)
    }

    /// WI from TC2 (T=0 waiting time integer); 10 when absent. 0 is reserved: treated as 10.
    pub fn wi(&self) -> u8 {
        match self.group(2).and_then(|g| g.tc) {
            Some(0) | None => 10,
            Some(wi) => wi,
        }
    }

    /// TA2 (specific mode), if present.
    pub fn specific_mode(&self) -> Option<SpecificMode> {
        self.group(2).and_then(|g| g.ta).map(|ta2| SpecificMode {
            protocol: ta2 & 0x0F,
            can_change: ta2 & 0x80 == 0,
            implicit_parameters: ta2 & 0x10 != 0,
        })
    }

    /// Offered protocols in the order the TDi bytes indicate them; `[0]` when there is no TD1.
    /// T=15 (global interface bytes) is not a protocol and is left out.
    pub fn protocols(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for td in self.groups.iter().filter_map(|g| g.td) {
            let t = td & 0x0F;
            if t != 15 && !out.contains(&t) {
                out.push(t);
            }
        }
        if out.is_empty() {
            out.push(0);
        }
        out
    }

    /// T=0 work waiting time: 960 × WI × Fi / f seconds.
    pub fn work_waiting_time(&self, clock_hz: u32) -> Duration {
        let nanos = 960u128 * u128::from(self.wi()) * u128::from(self.fi()) * 1_000_000_000
            / u128::from(clock_hz.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The initial waiting time during the ATR: 9600 initial etu (Fi = 372, Di = 1).
    pub fn initial_waiting_time(clock_hz: u32) -> Duration {
        FiDi::DEFAULT.etus(9600, clock_hz)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    const CLOCK: u32 = 3_571_200;

    #[test]
    fn pcsc_storage_card_with_tck() {
        // PC/SC part 3 storage-card ATR (memory cards through CCID readers).
        let atr = Atr::parse(&hex(
            "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A",
        ))
        .unwrap();
        assert_eq!(atr.convention, Convention::Direct);
        assert_eq!(atr.groups.len(), 3);
        assert_eq!(atr.groups[0].td, Some(0x80));
        assert_eq!(atr.groups[1].td, Some(0x01));
        assert_eq!(atr.protocols(), vec![0, 1]);
        assert_eq!(atr.historical.len(), 15);
        assert_eq!(atr.historical[..4], [0x80, 0x4F, 0x0C, 0xA0]);
        assert_eq!(atr.tck, Some(0x6A));
        assert_eq!(atr.ta1(), None);
        assert_eq!((atr.fi(), atr.di()), (372, 1));
    }

    #[test]
    fn t0_only_card_has_no_tck() {
        let bytes = hex("3B 6E 00 00 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00");
        let atr = Atr::parse(&bytes).unwrap();
        assert_eq!(atr.groups[0].tb, Some(0));
        assert_eq!(atr.groups[0].tc, Some(0));
        assert_eq!(atr.extra_guard_time(), 0);
        assert_eq!(atr.historical, bytes[4..]);
        assert_eq!(atr.tck, None);
        assert_eq!(atr.protocols(), vec![0]);
        // No TC2: WI = 10, so WWT = 960 × 10 × 372 / 3.5712 MHz = 1 s.
        assert_eq!(atr.work_waiting_time(CLOCK), Duration::from_secs(1));
    }

    #[test]
    fn estonian_id_offers_fast_ta1_and_t1() {
        let atr = Atr::parse(&hex(
            "3B FE 18 00 00 80 31 FE 45 80 31 80 66 40 90 A4 16 2A 00 83 0F 90 00 EF",
        ))
        .unwrap();
        assert_eq!(atr.ta1(), Some(0x18));
        assert_eq!(
            atr.offered_fi_di(),
            Some(FiDi {
                fi: 372,
                di: 12,
                fmax_hz: 5_000_000
            })
        );
        assert_eq!(atr.offered_fi_di().unwrap().baud(CLOCK), 115_200);
        assert_eq!(atr.protocols(), vec![0, 1]);
        assert_eq!(atr.groups[2].ta, Some(0xFE)); // IFSC
        assert_eq!(atr.tck, Some(0xEF));
    }

    #[test]
    fn openpgp_card_extra_guard_time() {
        let atr = Atr::parse(&hex(
            "3B FA 13 00 FF 81 31 80 45 00 31 C1 73 C0 01 00 00 90 00 B1",
        ))
        .unwrap();
        assert_eq!(atr.extra_guard_time(), 0xFF);
        assert_eq!(atr.protocols(), vec![1]);
        assert_eq!(atr.di(), 4);
    }

    /// Viaccess card used by satellite set-top boxes: inverse convention, T=0.
    const VIACCESS: &str = "3F 77 18 00 00 C2 EB 41 02 6C 90 00";

    #[test]
    fn inverse_convention_as_values() {
        let atr = Atr::parse(&hex(VIACCESS)).unwrap();
        assert_eq!(atr.convention, Convention::Inverse);
        assert_eq!(atr.ta1(), Some(0x18));
        assert_eq!(atr.historical, hex("C2 EB 41 02 6C 90 00"));
        assert_eq!(atr.tck, None);
        assert_eq!(atr.protocols(), vec![0]);
    }

    #[test]
    fn inverse_convention_as_received_by_a_uart() {
        // What a direct-convention UART reads from that card: every byte inverted.
        let raw = hex("03 11 E7 FF FF BC 28 7D BF C9 F6 FF");
        let atr = Atr::parse_raw(&raw).unwrap();
        assert_eq!(atr.convention, Convention::Inverse);
        assert_eq!(atr.as_bytes(), hex(VIACCESS));
        // And a direct ATR passes through parse_raw unchanged.
        let direct = hex("3B 6E 00 00 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00");
        assert_eq!(Atr::parse_raw(&direct).unwrap().as_bytes(), direct);
    }

    #[test]
    fn inversion_examples() {
        assert_eq!(invert_byte(0x3F), 0x03);
        assert_eq!(invert_byte(0x03), 0x3F);
        assert_eq!(invert_byte(0x00), 0xFF);
        assert_eq!(invert_byte(0x60), 0xF9);
        for b in 0..=255u8 {
            assert_eq!(invert_byte(invert_byte(b)), b);
        }
    }

    #[test]
    fn waiting_time_from_tc2() {
        // TD1 = 40: TC2 follows, T=0. TC2 = 2 → WWT = 960 × 2 × 372 / f = 0.2 s.
        let atr = Atr::parse(&hex("3B 80 40 02")).unwrap();
        assert_eq!(atr.wi(), 2);
        assert_eq!(atr.work_waiting_time(CLOCK), Duration::from_millis(200));
        assert_eq!(Atr::initial_waiting_time(CLOCK), Duration::from_secs(1));
    }

    #[test]
    fn specific_mode_from_ta2() {
        let atr = Atr::parse(&hex("3B 90 13 10 80 0F")).unwrap_err();
        // TD1 = 10 → TA2 only, T=0; TA2 = 80 → T=0, cannot change; then K=0 … but 0F
        // is left over.
        assert_eq!(atr, AtrError::TrailingBytes { extra: 1 });
        let atr = Atr::parse(&hex("3B 90 13 10 80")).unwrap();
        assert_eq!(
            atr.specific_mode(),
            Some(SpecificMode {
                protocol: 0,
                can_change: false,
                implicit_parameters: false
            })
        );
    }

    #[test]
    fn malformed_atrs_are_refused_with_a_specific_error() {
        assert_eq!(Atr::parse(&[]), Err(AtrError::Empty));
        assert_eq!(Atr::parse(&[0x3C, 0x00]), Err(AtrError::BadTs(0x3C)));
        assert_eq!(Atr::parse_raw(&[0x3F, 0x00]), Err(AtrError::BadTs(0x3F)));
        assert_eq!(
            Atr::parse(&[0x3B]),
            Err(AtrError::Truncated { needed: 2, have: 1 })
        );
        // Historical bytes missing.
        assert_eq!(
            Atr::parse(&hex("3B 6E 00 00 80 31")),
            Err(AtrError::Truncated {
                needed: 18,
                have: 6
            })
        );
        // TCK corrupted.
        assert_eq!(
            Atr::parse(&hex(
                "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6B"
            )),
            Err(AtrError::BadTck {
                computed: 0x6A,
                received: 0x6B
            })
        );
        // TCK missing although T=1 is indicated.
        assert!(matches!(
            Atr::parse(&hex(
                "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00"
            )),
            Err(AtrError::Truncated { .. })
        ));
        // Trailing garbage after a complete T=0 ATR.
        assert_eq!(
            Atr::parse(&hex("3B 00 90")),
            Err(AtrError::TrailingBytes { extra: 1 })
        );
        // Over 33 bytes: TD chain that never ends.
        let mut endless = vec![0x3B, 0x80];
        endless.extend(std::iter::repeat_n(0x80, 40));
        assert_eq!(Atr::parse(&endless), Err(AtrError::TooLong { len: 42 }));
    }

    #[test]
    fn reserved_ta1_gives_defaults() {
        let atr = Atr::parse(&hex("3B 10 7A")).unwrap();
        assert_eq!(atr.offered_fi_di(), None);
        assert_eq!((atr.fi(), atr.di()), (372, 1));
    }

    #[test]
    fn incremental_parse_completes_exactly_at_the_end() {
        let bytes = hex("3B FE 18 00 00 80 31 FE 45 80 31 80 66 40 90 A4 16 2A 00 83 0F 90 00 EF");
        for n in 0..bytes.len() {
            assert!(
                matches!(
                    Atr::parse(&bytes[..n]),
                    Err(AtrError::Truncated { .. } | AtrError::Empty)
                ),
                "prefix of {n} bytes"
            );
        }
        assert!(Atr::parse(&bytes).is_ok());
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Atr::parse(&bytes);
            let _ = Atr::parse_raw(&bytes);
        }

        #[test]
        fn parsed_atrs_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(atr) = Atr::parse(&bytes) {
                prop_assert_eq!(atr.as_bytes(), &bytes[..]);
                let _ = atr.work_waiting_time(CLOCK);
                let raw: Vec<u8> = bytes.iter().map(|&b| atr.convention.encode(b)).collect();
                prop_assert_eq!(Atr::parse_raw(&raw).unwrap(), atr);
            }
        }
    }
}
