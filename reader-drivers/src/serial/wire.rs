//! Sans-IO decoding of what the tty hands us. The driver enables PARMRK so parity errors are
//! visible in the byte stream: a bad character arrives as `FF 00 x`, a real `FF` as `FF FF`
//! (and a BREAK, which a card line never sends, as `FF 00 00`).

/// One received character.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxByte {
    Ok(u8),
    /// Received with a parity (or framing) error; the byte as the UART read it.
    ParityError(u8),
}

/// Undoes PARMRK marking; state carries across reads.
#[derive(Debug, Clone, Default)]
pub struct ParmrkDecoder {
    state: MarkState,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum MarkState {
    #[default]
    Plain,
    SawFf,
    SawFf00,
}

impl ParmrkDecoder {
    pub fn push(&mut self, raw: u8, out: &mut Vec<RxByte>) {
        self.state = match (self.state, raw) {
            (MarkState::Plain, 0xFF) => MarkState::SawFf,
            (MarkState::Plain, b) => {
                out.push(RxByte::Ok(b));
                MarkState::Plain
            }
            (MarkState::SawFf, 0xFF) => {
                out.push(RxByte::Ok(0xFF));
                MarkState::Plain
            }
            (MarkState::SawFf, 0x00) => MarkState::SawFf00,
            // Not a sequence the kernel produces; keep both bytes rather than guess.
            (MarkState::SawFf, b) => {
                out.push(RxByte::Ok(0xFF));
                out.push(RxByte::Ok(b));
                MarkState::Plain
            }
            (MarkState::SawFf00, b) => {
                out.push(RxByte::ParityError(b));
                MarkState::Plain
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(raw: &[u8]) -> Vec<RxByte> {
        let mut d = ParmrkDecoder::default();
        let mut out = Vec::new();
        for &b in raw {
            d.push(b, &mut out);
        }
        out
    }

    #[test]
    fn plain_doubled_ff_and_parity_marks() {
        assert_eq!(
            decode(&[0x3B, 0xFF, 0xFF, 0x10, 0xFF, 0x00, 0x42, 0x90]),
            vec![
                RxByte::Ok(0x3B),
                RxByte::Ok(0xFF),
                RxByte::Ok(0x10),
                RxByte::ParityError(0x42),
                RxByte::Ok(0x90),
            ]
        );
    }

    #[test]
    fn marks_split_across_reads() {
        let mut d = ParmrkDecoder::default();
        let mut out = Vec::new();
        d.push(0xFF, &mut out);
        assert!(out.is_empty());
        d.push(0x00, &mut out);
        assert!(out.is_empty());
        d.push(0x00, &mut out);
        assert_eq!(out, vec![RxByte::ParityError(0)]);
    }

    proptest! {
        #[test]
        fn unmarked_streams_round_trip(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            // What the kernel does to clean input under PARMRK: double every FF.
            let mut raw = Vec::new();
            for &b in &bytes {
                if b == 0xFF { raw.push(0xFF); }
                raw.push(b);
            }
            let back: Vec<u8> = decode(&raw).into_iter().map(|r| match r {
                RxByte::Ok(b) => b,
                RxByte::ParityError(_) => panic!("spurious parity error"),
            }).collect();
            prop_assert_eq!(back, bytes);
        }

        #[test]
        fn never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let _ = decode(&bytes);
        }
    }
}
