//! ISO 7816-3 answer-to-reset parser that reads what cards in the field send: TS (direct or
//! inverse convention), T0, the interface bytes TA1…TDi, the historical bytes and the TCK; and
//! the parameters the serial driver takes from the ATR (Fi/Di, extra guard time, WI, specific
//! mode, offered protocols, T=1's IFSC/CWI/BWI/EDC).
//!
//! Real cards break the letter of ISO 7816-3 in ways a reader stack has to live with (the
//! pcsc-tools ATR list is full of them): a wrong TCK, a missing TCK, a stray byte after a T=0
//! ATR, bytes after the TCK, historical bytes cut short, reserved TA1 values. Like OSCam and
//! pcsc-lite's CCID driver, [`Atr::parse`] reads what is there and records each of these as an
//! [`AtrWarning`]; only a byte string with no interface structure (no TS, interface bytes cut
//! off) is an [`AtrError`]. [`accept`] adds the one refusal that matters to a driver: no
//! protocol it speaks (T=0 or T=1).
//!
//! Sans-IO and total: any byte string yields an [`Atr`] or an [`AtrError`], never a panic.
//! [`progress`] tells the serial shell, byte by byte, how much of the ATR has arrived, so it
//! can wait the ISO waiting time for the interface and historical bytes and then only a short
//! quiet time for the TCK and whatever trails it.

use std::time::Duration;

/// The longest ATR ISO 7816-3 allows (TS + 32 characters).
pub const MAX_ATR_LEN: usize = 33;

/// The most bytes the serial shell reads after a reset (an ATR plus what trails it) before it
/// stops listening and flushes the rest.
pub const MAX_LINE_BYTES: usize = 64;

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

/// Why a byte string is not an ATR a reader can use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AtrError {
    #[error("empty ATR")]
    Empty,
    #[error("TS is {0:#04x}; expected 3B (direct convention) or 3F (inverse convention)")]
    BadTs(u8),
    #[error(
        "ATR ends inside its interface bytes ({have} bytes, T0 and the TDi announce at least {needed})"
    )]
    IncompleteInterface { have: usize, needed: usize },
    #[error("the card offers only T={protocols:?}; a serial reader speaks T=0 and T=1")]
    NoUsableProtocol { protocols: Vec<u8> },
}

/// What a field-grade reader notes about an ATR and then lives with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtrWarning {
    /// The TCK does not check (XOR of T0…TCK is not zero).
    BadTck { received: u8, computed: u8 },
    /// A protocol other than T=0 is indicated, so a TCK is required, but none came.
    MissingTck,
    /// Only T=0 is indicated, yet a byte that checks as a TCK followed.
    UnneededTck,
    /// Bytes after the end of the ATR (after the TCK, or after a T=0 ATR).
    TrailingBytes { count: usize },
    /// T0 announced `expected` historical bytes, only `got` came.
    HistoricalTruncated { expected: usize, got: usize },
    /// TA1 holds a value ISO 7816-3 reserves (Fi or Di RFU): the defaults apply.
    ReservedTa1 { ta1: u8 },
    /// TC2 = 0 is reserved: WI = 10 applies.
    ReservedWi,
    /// The ATR proper is longer than the 33 bytes ISO 7816-3 allows.
    TooLong { len: usize },
}

impl std::fmt::Display for AtrWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AtrWarning::BadTck { received, computed } => write!(
                f,
                "TCK {received:02X} does not check (expected {computed:02X}); ignored"
            ),
            AtrWarning::MissingTck => write!(f, "TCK missing; ignored"),
            AtrWarning::UnneededTck => write!(f, "a TCK follows although only T=0 is indicated"),
            AtrWarning::TrailingBytes { count } => {
                write!(f, "{count} byte(s) after the end of the ATR; discarded")
            }
            AtrWarning::HistoricalTruncated { expected, got } => write!(
                f,
                "{got} of the {expected} historical bytes T0 announces; the rest never came"
            ),
            AtrWarning::ReservedTa1 { ta1 } => write!(
                f,
                "TA1 {ta1:02X} holds a reserved Fi or Di; the default speed applies"
            ),
            AtrWarning::ReservedWi => write!(f, "TC2 = 0 is reserved; WI = 10 applies"),
            AtrWarning::TooLong { len } => {
                write!(f, "the ATR is {len} bytes, over the 33 ISO 7816-3 allows")
            }
        }
    }
}

/// The check character as found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tck {
    /// Only T=0 is indicated: no TCK expected, and none (that checks) came.
    NotRequired,
    Ok(u8),
    Bad {
        received: u8,
        computed: u8,
    },
    Missing,
    /// Only T=0 is indicated, and a byte that checks as TCK followed anyway.
    Unneeded(u8),
}

/// One group of interface bytes TAi TBi TCi TDi (i = 1, 2, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InterfaceGroup {
    pub ta: Option<u8>,
    pub tb: Option<u8>,
    pub tc: Option<u8>,
    pub td: Option<u8>,
}

/// Fi from the high nibble of TA1, with the highest clock it allows; `None` when reserved.
pub fn fi_from_ta1(ta1: u8) -> Option<(u16, u32)> {
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
    let (fi, f) = FI[usize::from(ta1 >> 4)];
    (fi != 0).then_some((fi, f))
}

/// Di from the low nibble of TA1; `None` when reserved.
pub fn di_from_ta1(ta1: u8) -> Option<u8> {
    const DI: [u8; 16] = [0, 1, 2, 4, 8, 16, 32, 64, 12, 20, 0, 0, 0, 0, 0, 0];
    let di = DI[usize::from(ta1 & 0x0F)];
    (di != 0).then_some(di)
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

    /// Decodes TA1; `None` when Fi or Di holds a value ISO 7816-3 reserves.
    pub fn from_ta1(ta1: u8) -> Option<FiDi> {
        let (fi, fmax_hz) = fi_from_ta1(ta1)?;
        let di = di_from_ta1(ta1)?;
        Some(FiDi { fi, di, fmax_hz })
    }

    /// The TA1/PPS1 byte coding this Fi/Di (for Fi = 372 the 5 MHz code, 1x).
    pub fn to_ta1(self) -> Option<u8> {
        let fi = (0..16u8)
            .rev()
            .find(|&n| fi_from_ta1(n << 4).is_some_and(|(fi, _)| fi == self.fi))?;
        let di = (0..16u8).find(|&n| di_from_ta1(n) == Some(self.di))?;
        Some(fi << 4 | di)
    }

    /// Same Fi/Di (fmax aside).
    pub fn same_speed(self, other: FiDi) -> bool {
        (self.fi, self.di) == (other.fi, other.di)
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

/// T=1 error detection code (TC3 b1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edc {
    Lrc,
    Crc,
}

/// T=1 parameters from the first TAi/TBi/TCi (i ≥ 3) after a TD naming T=1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct T1Params {
    /// Information field size of the card (TA; default 32).
    pub ifsc: u8,
    /// Character waiting time integer (TB low nibble; default 13).
    pub cwi: u8,
    /// Block waiting time integer (TB high nibble; default 4).
    pub bwi: u8,
    pub edc: Edc,
}

impl Default for T1Params {
    fn default() -> Self {
        Self {
            ifsc: 32,
            cwi: 13,
            bwi: 4,
            edc: Edc::Lrc,
        }
    }
}

/// How far an ATR that is still arriving has come (see [`progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// TS, T0 or interface bytes still to come.
    Interface,
    /// The interface bytes are in; `total` bytes make the whole ATR (historical bytes and the
    /// TCK when one is required).
    Body { total: usize, tck_required: bool },
}

/// Where an ATR being read off the line stands: the shell waits up to the ATR waiting time for
/// each interface and historical byte, and only a short quiet time once the historical bytes
/// are in (for the TCK and whatever trails).
pub fn progress(values: &[u8]) -> Result<Progress, AtrError> {
    match structure(values)? {
        Structure::Incomplete { .. } => Ok(Progress::Interface),
        Structure::Complete {
            hist_end,
            tck_required,
            ..
        } => Ok(Progress::Body {
            total: hist_end + usize::from(tck_required),
            tck_required,
        }),
    }
}

enum Structure {
    Incomplete {
        needed: usize,
    },
    Complete {
        groups: Vec<InterfaceGroup>,
        /// Index just past the interface bytes.
        hist_start: usize,
        hist_end: usize,
        tck_required: bool,
    },
}

fn structure(bytes: &[u8]) -> Result<Structure, AtrError> {
    match bytes.first() {
        None => return Err(AtrError::Empty),
        Some(0x3B | 0x3F) => {}
        Some(&ts) => return Err(AtrError::BadTs(ts)),
    }
    let Some(&t0) = bytes.get(1) else {
        return Ok(Structure::Incomplete { needed: 2 });
    };
    let k = usize::from(t0 & 0x0F);
    let mut y = t0 >> 4;
    let mut pos = 2;
    let mut groups = Vec::new();
    let mut tck_required = false;
    // Each round consumes TDi, so the loop ends with the input.
    loop {
        let mut group = InterfaceGroup::default();
        for (bit, slot) in [
            (0x1, &mut group.ta),
            (0x2, &mut group.tb),
            (0x4, &mut group.tc),
            (0x8, &mut group.td),
        ] {
            if y & bit != 0 {
                let Some(&b) = bytes.get(pos) else {
                    return Ok(Structure::Incomplete {
                        needed: pos + (y & !(bit - 1)).count_ones() as usize,
                    });
                };
                *slot = Some(b);
                pos += 1;
            }
        }
        groups.push(group);
        match group.td {
            Some(td) => {
                // TCK is present unless only T=0 is indicated (T=15 counts as "other").
                if td & 0x0F != 0 {
                    tck_required = true;
                }
                y = td >> 4;
            }
            None => break,
        }
    }
    Ok(Structure::Complete {
        groups,
        hist_start: pos,
        hist_end: pos + k,
        tck_required,
    })
}

/// A parsed answer to reset, holding its bytes as values (TS is 3B or 3F).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Atr {
    pub convention: Convention,
    pub t0: u8,
    /// Interface byte groups; `groups[0]` is TA1 TB1 TC1 TD1.
    pub groups: Vec<InterfaceGroup>,
    /// The historical bytes that came (see [`AtrWarning::HistoricalTruncated`]).
    pub historical: Vec<u8>,
    /// How many historical bytes T0 announced.
    pub historical_expected: usize,
    pub tck: Tck,
    /// Bytes that came after the ATR.
    pub trailing: Vec<u8>,
    pub warnings: Vec<AtrWarning>,
    /// The ATR proper (TS … TCK), without trailing bytes.
    bytes: Vec<u8>,
}

impl Atr {
    /// Reads everything the card sent after reset, given as values (TS = 3B or 3F, as PC/SC
    /// reports ATRs). Refuses only what has no interface structure; everything else that is
    /// off is a warning.
    pub fn parse(bytes: &[u8]) -> Result<Atr, AtrError> {
        let convention = match bytes.first() {
            Some(0x3F) => Convention::Inverse,
            _ => Convention::Direct,
        };
        let (groups, hist_start, hist_end, tck_required) = match structure(bytes)? {
            Structure::Incomplete { needed } => {
                return Err(AtrError::IncompleteInterface {
                    have: bytes.len(),
                    needed,
                });
            }
            Structure::Complete {
                groups,
                hist_start,
                hist_end,
                tck_required,
            } => (groups, hist_start, hist_end, tck_required),
        };
        let t0 = bytes[1];
        let mut warnings = Vec::new();
        let historical_expected = hist_end - hist_start;
        let historical = bytes[hist_start..hist_end.min(bytes.len())].to_vec();
        if historical.len() < historical_expected {
            warnings.push(AtrWarning::HistoricalTruncated {
                expected: historical_expected,
                got: historical.len(),
            });
        }
        let xor = |upto: usize| bytes[1..upto].iter().fold(0u8, |a, b| a ^ b);
        let (tck, end) = match bytes.get(hist_end) {
            None if tck_required => {
                warnings.push(AtrWarning::MissingTck);
                (Tck::Missing, bytes.len())
            }
            None => (Tck::NotRequired, bytes.len()),
            Some(&received) if tck_required => {
                let computed = xor(hist_end);
                if computed == received {
                    (Tck::Ok(received), hist_end + 1)
                } else {
                    warnings.push(AtrWarning::BadTck { received, computed });
                    (Tck::Bad { received, computed }, hist_end + 1)
                }
            }
            // Only T=0: one more byte that checks is a TCK the card need not have sent.
            Some(&b) if bytes.len() == hist_end + 1 && xor(hist_end) == b => {
                warnings.push(AtrWarning::UnneededTck);
                (Tck::Unneeded(b), hist_end + 1)
            }
            Some(_) => (Tck::NotRequired, hist_end),
        };
        let trailing = bytes[end..].to_vec();
        if !trailing.is_empty() {
            warnings.push(AtrWarning::TrailingBytes {
                count: trailing.len(),
            });
        }
        if end > MAX_ATR_LEN {
            warnings.push(AtrWarning::TooLong { len: end });
        }
        let atr = Atr {
            convention,
            t0,
            groups,
            historical,
            historical_expected,
            tck,
            trailing,
            warnings,
            bytes: bytes[..end].to_vec(),
        };
        let mut atr = atr;
        if let Some(ta1) = atr.ta1() {
            if FiDi::from_ta1(ta1).is_none() {
                atr.warnings.push(AtrWarning::ReservedTa1 { ta1 });
            }
        }
        if atr.group(2).and_then(|g| g.tc) == Some(0) {
            atr.warnings.push(AtrWarning::ReservedWi);
        }
        Ok(atr)
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

    /// The ATR proper as values (TS = 3B or 3F), as PC/SC would report it.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    fn group(&self, i: usize) -> Option<&InterfaceGroup> {
        i.checked_sub(1).and_then(|i| self.groups.get(i))
    }

    pub fn ta1(&self) -> Option<u8> {
        self.group(1).and_then(|g| g.ta)
    }

    /// Whether a TCK is required (some TDi names a protocol other than T=0).
    pub fn tck_required(&self) -> bool {
        self.groups
            .iter()
            .filter_map(|g| g.td)
            .any(|td| td & 0x0F != 0)
    }

    /// Fi/Di offered in TA1; `None` when TA1 is absent or holds reserved values.
    pub fn offered_fi_di(&self) -> Option<FiDi> {
        self.ta1().and_then(FiDi::from_ta1)
    }

    /// Fi from TA1 (372 when TA1 is absent); `None` when reserved.
    pub fn fi(&self) -> Option<u16> {
        match self.ta1() {
            None => Some(FiDi::DEFAULT.fi),
            Some(ta1) => fi_from_ta1(ta1).map(|(fi, _)| fi),
        }
    }

    /// Di from TA1 (1 when TA1 is absent); `None` when reserved.
    pub fn di(&self) -> Option<u8> {
        match self.ta1() {
            None => Some(FiDi::DEFAULT.di),
            Some(ta1) => di_from_ta1(ta1),
        }
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

    pub fn ta2(&self) -> Option<u8> {
        self.group(2).and_then(|g| g.ta)
    }

    /// TA2 (specific mode), if present.
    pub fn specific_mode(&self) -> Option<SpecificMode> {
        self.ta2().map(|ta2| SpecificMode {
            protocol: ta2 & 0x0F,
            can_change: ta2 & 0x80 == 0,
            implicit_parameters: ta2 & 0x10 != 0,
        })
    }

    /// Offered protocols in the order the TDi bytes indicate them; `[0]` when none is named.
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

    /// The protocol a serial reader uses: TA2's in specific mode when it is one we speak,
    /// else the first offered of T=0 and T=1 (the card's default); `None` when neither is.
    pub fn usable_protocol(&self) -> Option<u8> {
        if let Some(mode) = self.specific_mode() {
            if mode.protocol <= 1 && self.protocols().contains(&mode.protocol) {
                return Some(mode.protocol);
            }
        }
        self.protocols().into_iter().find(|&t| t <= 1)
    }

    /// T=1 parameters: the first TAi/TBi/TCi (i ≥ 3) following a TD(i-1) that names T=1.
    pub fn t1_params(&self) -> T1Params {
        let mut p = T1Params::default();
        for i in 1..self.groups.len() {
            let Some(td) = self.groups[i - 1].td else {
                break;
            };
            if td & 0x0F != 1 || i < 2 {
                continue;
            }
            let g = &self.groups[i];
            if let Some(ta) = g.ta {
                if (1..=254).contains(&ta) {
                    p.ifsc = ta;
                }
            }
            if let Some(tb) = g.tb {
                p.cwi = tb & 0x0F;
                p.bwi = tb >> 4;
            }
            if let Some(tc) = g.tc {
                p.edc = if tc & 1 == 1 { Edc::Crc } else { Edc::Lrc };
            }
            break;
        }
        p
    }

    /// T=0 work waiting time: 960 × WI × Fi / f seconds, with the Fi in force.
    pub fn work_waiting_time(&self, fi: u16, clock_hz: u32) -> Duration {
        let nanos = 960u128 * u128::from(self.wi()) * u128::from(fi) * 1_000_000_000
            / u128::from(clock_hz.max(1));
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The initial waiting time during the ATR: 9600 initial etu (Fi = 372, Di = 1).
    pub fn initial_waiting_time(clock_hz: u32) -> Duration {
        FiDi::DEFAULT.etus(9600, clock_hz)
    }
}

/// What a serial reader does with the bytes a card sent after reset: reads them ([`Atr::parse`])
/// and refuses the ATR only when it names no protocol the reader speaks.
pub fn accept(bytes: &[u8]) -> Result<Atr, AtrError> {
    let atr = Atr::parse(bytes)?;
    if atr.usable_protocol().is_none() {
        return Err(AtrError::NoUsableProtocol {
            protocols: atr.protocols(),
        });
    }
    Ok(atr)
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
        let atr = Atr::parse(&hex(
            "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6A",
        ))
        .unwrap();
        assert_eq!(atr.convention, Convention::Direct);
        assert_eq!(atr.groups.len(), 3);
        assert_eq!(atr.protocols(), vec![0, 1]);
        assert_eq!(atr.historical.len(), 15);
        assert_eq!(atr.tck, Tck::Ok(0x6A));
        assert!(atr.warnings.is_empty());
        assert_eq!((atr.fi(), atr.di()), (Some(372), Some(1)));
    }

    #[test]
    fn t0_only_card_has_no_tck() {
        let bytes = hex("3B 6E 00 00 80 31 80 66 B0 84 0C 01 6E 01 83 00 90 00");
        let atr = Atr::parse(&bytes).unwrap();
        assert_eq!(atr.historical, bytes[4..]);
        assert_eq!(atr.tck, Tck::NotRequired);
        assert_eq!(atr.protocols(), vec![0]);
        assert_eq!(atr.work_waiting_time(372, CLOCK), Duration::from_secs(1));
        assert!(atr.warnings.is_empty());
    }

    #[test]
    fn estonian_id_t1_parameters() {
        let atr = Atr::parse(&hex(
            "3B FE 18 00 00 80 31 FE 45 80 31 80 66 40 90 A4 16 2A 00 83 0F 90 00 EF",
        ))
        .unwrap();
        assert_eq!(atr.offered_fi_di().unwrap().baud(CLOCK), 115_200);
        assert_eq!(atr.protocols(), vec![0, 1]);
        let p = atr.t1_params();
        assert_eq!((p.ifsc, p.bwi, p.cwi, p.edc), (0xFE, 4, 5, Edc::Lrc));
        assert_eq!(atr.usable_protocol(), Some(0));
    }

    #[test]
    fn inverse_convention_as_received_by_a_uart() {
        let raw = hex("03 11 E7 FF FF BC 28 7D BF C9 F6 FF");
        let atr = Atr::parse_raw(&raw).unwrap();
        assert_eq!(atr.convention, Convention::Inverse);
        assert_eq!(atr.as_bytes(), hex("3F 77 18 00 00 C2 EB 41 02 6C 90 00"));
    }

    #[test]
    fn field_faults_are_warnings() {
        // Wrong TCK.
        let atr = Atr::parse(&hex(
            "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00 6B",
        ))
        .unwrap();
        assert_eq!(
            atr.tck,
            Tck::Bad {
                received: 0x6B,
                computed: 0x6A
            }
        );
        // Missing TCK.
        let atr = Atr::parse(&hex(
            "3B 8F 80 01 80 4F 0C A0 00 00 03 06 03 00 01 00 00 00 00",
        ))
        .unwrap();
        assert_eq!(atr.warnings, vec![AtrWarning::MissingTck]);
        // A stray byte after a T=0 ATR: trailing, not part of the ATR.
        let atr = Atr::parse(&hex("3B 00 90")).unwrap();
        assert_eq!(atr.as_bytes(), [0x3B, 0x00]);
        assert_eq!(atr.trailing, [0x90]);
        assert_eq!(atr.warnings, vec![AtrWarning::TrailingBytes { count: 1 }]);
        // A T=0 ATR followed by one byte that checks: an unneeded TCK.
        let atr = Atr::parse(&hex("3B 01 41 40")).unwrap();
        assert_eq!(atr.tck, Tck::Unneeded(0x40));
        // Historical bytes cut short.
        let atr = Atr::parse(&hex("3B 6E 00 00 80 31")).unwrap();
        assert_eq!(
            atr.warnings,
            vec![AtrWarning::HistoricalTruncated {
                expected: 14,
                got: 2
            }]
        );
        // Reserved TA1: defaults, with a word.
        let atr = Atr::parse(&hex("3B 10 7A")).unwrap();
        assert_eq!(atr.offered_fi_di(), None);
        assert_eq!(atr.warnings, vec![AtrWarning::ReservedTa1 { ta1: 0x7A }]);
    }

    #[test]
    fn refusals() {
        assert_eq!(Atr::parse(&[]), Err(AtrError::Empty));
        assert_eq!(Atr::parse(&[0x3C, 0x00]), Err(AtrError::BadTs(0x3C)));
        assert_eq!(
            Atr::parse(&[0x3B]),
            Err(AtrError::IncompleteInterface { have: 1, needed: 2 })
        );
        assert!(matches!(
            Atr::parse(&hex("3B 80")),
            Err(AtrError::IncompleteInterface { .. })
        ));
        // T=14 only.
        assert_eq!(
            accept(&hex("3B 81 8E 0E 01")),
            Err(AtrError::NoUsableProtocol {
                protocols: vec![14]
            })
        );
    }

    #[test]
    fn progress_follows_the_line() {
        let bytes = hex("3B FE 18 00 00 80 31 FE 45 80 31 80 66 40 90 A4 16 2A 00 83 0F 90 00 EF");
        for n in 1..9 {
            assert_eq!(progress(&bytes[..n]), Ok(Progress::Interface), "{n}");
        }
        assert_eq!(
            progress(&bytes[..9]),
            Ok(Progress::Body {
                total: 24,
                tck_required: true
            })
        );
    }

    #[test]
    fn fi_di_round_trip_through_ta1() {
        for ta1 in [0x11, 0x13, 0x18, 0x95, 0x96, 0x15, 0x94] {
            let f = FiDi::from_ta1(ta1).unwrap();
            assert_eq!(
                FiDi::from_ta1(f.to_ta1().unwrap()).unwrap().baud(CLOCK),
                f.baud(CLOCK)
            );
        }
        assert_eq!(FiDi::from_ta1(0x15).unwrap().baud(CLOCK), 153_600);
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Atr::parse(&bytes);
            let _ = Atr::parse_raw(&bytes);
            let _ = progress(&bytes);
            if let Ok(atr) = Atr::parse(&bytes) {
                let _ = atr.t1_params();
                let _ = atr.work_waiting_time(372, CLOCK);
            }
        }

        #[test]
        fn parsed_atrs_keep_every_byte(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(atr) = Atr::parse(&bytes) {
                let mut all = atr.as_bytes().to_vec();
                all.extend_from_slice(&atr.trailing);
                prop_assert_eq!(&all[..], &bytes[..]);
                let raw: Vec<u8> = bytes.iter().map(|&b| atr.convention.encode(b)).collect();
                prop_assert_eq!(Atr::parse_raw(&raw).unwrap(), atr);
            }
        }
    }
}
