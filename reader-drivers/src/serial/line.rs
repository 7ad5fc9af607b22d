//! The modem-control seam: how a Phoenix/Smartmouse reader is reset (RTS or DTR) and how it
//! reports a card (CD, DSR, CTS or RI, possibly inverted, or not at all).
//!
//! [`LineControl`] is the raw pin interface. [`SerialLines`] implements it over a serial port
//! (tokio-serial's `write_request_to_send`, `read_carrier_detect`, …). Linux ptys refuse those
//! ioctls (ENOTTY), so pty tests plug in the emulator's implementation instead
//! (`emulator::phoenix::EmulatorLines`). The wiring policy — which pin, which polarity — is
//! [`LineConfig`], tested here against a scripted fake.

use std::io;

/// An output pin of the serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutputLine {
    Rts,
    Dtr,
}

/// An input pin of the serial port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InputLine {
    Cd,
    Dsr,
    Cts,
    Ri,
}

/// Raw access to the modem-control pins.
pub trait LineControl: Send {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()>;
    fn read_line(&mut self, line: InputLine) -> io::Result<bool>;
}

/// Card detection wiring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CardDetect {
    /// The reader has no card switch: a card is assumed present (a mute card then shows as
    /// mute, not absent).
    None,
    /// `line` high means a card is in, or low when `inverted`.
    Line { line: InputLine, inverted: bool },
}

/// How the reader is wired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LineConfig {
    pub reset: OutputLine,
    /// Reset is asserted by driving the line low instead of high.
    pub reset_inverted: bool,
    pub detect: CardDetect,
}

impl Default for LineConfig {
    /// The Phoenix wiring: RTS high holds the card in reset, CD reports the card switch.
    fn default() -> Self {
        Self {
            reset: OutputLine::Rts,
            reset_inverted: false,
            detect: CardDetect::Line {
                line: InputLine::Cd,
                inverted: false,
            },
        }
    }
}

impl LineConfig {
    /// Holds the card in reset (`true`) or lets it run (`false`); on release the card sends
    /// its ATR.
    pub fn set_reset(&self, lines: &mut dyn LineControl, asserted: bool) -> io::Result<()> {
        lines.write_line(self.reset, asserted != self.reset_inverted)
    }

    /// Whether a card is in; always true without a card switch.
    pub fn card_present(&self, lines: &mut dyn LineControl) -> io::Result<bool> {
        match self.detect {
            CardDetect::None => Ok(true),
            CardDetect::Line { line, inverted } => Ok(lines.read_line(line)? != inverted),
        }
    }

    pub fn has_card_detect(&self) -> bool {
        self.detect != CardDetect::None
    }
}

/// The real pins of a serial port, through tokio-serial (a duplicate handle of the port
/// the driver talks through).
pub struct SerialLines {
    port: Box<dyn tokio_serial::SerialPort>,
}

impl SerialLines {
    pub fn new(port: Box<dyn tokio_serial::SerialPort>) -> Self {
        Self { port }
    }
}

impl LineControl for SerialLines {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()> {
        match line {
            OutputLine::Rts => self.port.write_request_to_send(level),
            OutputLine::Dtr => self.port.write_data_terminal_ready(level),
        }
        .map_err(io::Error::from)
    }

    fn read_line(&mut self, line: InputLine) -> io::Result<bool> {
        match line {
            InputLine::Cd => self.port.read_carrier_detect(),
            InputLine::Dsr => self.port.read_data_set_ready(),
            InputLine::Cts => self.port.read_clear_to_send(),
            InputLine::Ri => self.port.read_ring_indicator(),
        }
        .map_err(io::Error::from)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A fake pin interface: records writes, answers reads from a script.
    #[derive(Default)]
    pub struct FakeLines {
        pub writes: Vec<(OutputLine, bool)>,
        pub reads: VecDeque<(InputLine, io::Result<bool>)>,
    }

    impl LineControl for FakeLines {
        fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()> {
            self.writes.push((line, level));
            Ok(())
        }
        fn read_line(&mut self, line: InputLine) -> io::Result<bool> {
            match self.reads.pop_front() {
                Some((expected, result)) => {
                    assert_eq!(expected, line, "read the wrong pin");
                    result
                }
                None => panic!("unscripted read of {line:?}"),
            }
        }
    }

    #[test]
    fn phoenix_default_resets_with_rts_high() {
        let mut fake = FakeLines::default();
        let cfg = LineConfig::default();
        cfg.set_reset(&mut fake, true).unwrap();
        cfg.set_reset(&mut fake, false).unwrap();
        assert_eq!(
            fake.writes,
            vec![(OutputLine::Rts, true), (OutputLine::Rts, false)]
        );
    }

    #[test]
    fn inverted_dtr_reset() {
        let mut fake = FakeLines::default();
        let cfg = LineConfig {
            reset: OutputLine::Dtr,
            reset_inverted: true,
            detect: CardDetect::None,
        };
        cfg.set_reset(&mut fake, true).unwrap();
        assert_eq!(fake.writes, vec![(OutputLine::Dtr, false)]);
    }

    #[test]
    fn detect_on_each_line_with_and_without_inversion() {
        for line in [InputLine::Cd, InputLine::Dsr, InputLine::Cts, InputLine::Ri] {
            for inverted in [false, true] {
                let cfg = LineConfig {
                    detect: CardDetect::Line { line, inverted },
                    ..LineConfig::default()
                };
                let mut fake = FakeLines::default();
                fake.reads.push_back((line, Ok(true)));
                fake.reads.push_back((line, Ok(false)));
                assert_eq!(cfg.card_present(&mut fake).unwrap(), !inverted);
                assert_eq!(cfg.card_present(&mut fake).unwrap(), inverted);
            }
        }
    }

    #[test]
    fn no_detect_means_present_without_touching_pins() {
        let cfg = LineConfig {
            detect: CardDetect::None,
            ..LineConfig::default()
        };
        let mut fake = FakeLines::default();
        assert!(cfg.card_present(&mut fake).unwrap());
        assert!(!cfg.has_card_detect());
    }

    #[test]
    fn pin_errors_propagate() {
        let cfg = LineConfig::default();
        let mut fake = FakeLines::default();
        fake.reads.push_back((
            InputLine::Cd,
            Err(io::Error::from_raw_os_error(libc::ENOTTY)),
        ));
        let err = cfg.card_present(&mut fake).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOTTY));
    }
}
