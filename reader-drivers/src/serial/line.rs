//! The modem-control lines: how a Phoenix/Smartmouse reader is reset (RTS or DTR, asserted high
//! or low) and how it reports a card (CD, DSR, CTS or RI, present high or low, or no switch at
//! all).
//!
//! [`LineControl`] is the raw pin interface, with two implementations:
//! - [`IoctlLines`]: the port's own pins through `TIOCMGET`/`TIOCMBIS`/`TIOCMBIC` on (a
//!   duplicate of) the port's file descriptor — the port is opened once;
//! - [`SocketLines`]: for a pty, which has no modem lines (the kernel refuses those ioctls with
//!   ENOTTY): the pins of an emulated reader (`vcard serial-pty`) over a Unix socket it serves,
//!   one connection per open port (see [`sideband`]).
//!
//! The wiring policy — which pin, which polarity — is [`LineConfig`], with the two profiles
//! [`LineConfig::PHOENIX`] and [`LineConfig::SMARTMOUSE`].

use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

impl OutputLine {
    pub fn name(self) -> &'static str {
        match self {
            OutputLine::Rts => "RTS",
            OutputLine::Dtr => "DTR",
        }
    }
    fn tiocm(self) -> libc::c_int {
        match self {
            OutputLine::Rts => libc::TIOCM_RTS,
            OutputLine::Dtr => libc::TIOCM_DTR,
        }
    }
}

impl InputLine {
    pub fn name(self) -> &'static str {
        match self {
            InputLine::Cd => "CD",
            InputLine::Dsr => "DSR",
            InputLine::Cts => "CTS",
            InputLine::Ri => "RI",
        }
    }
    fn tiocm(self) -> libc::c_int {
        match self {
            InputLine::Cd => libc::TIOCM_CAR,
            InputLine::Dsr => libc::TIOCM_DSR,
            InputLine::Cts => libc::TIOCM_CTS,
            InputLine::Ri => libc::TIOCM_RNG,
        }
    }
}

/// Raw access to the modem-control pins.
pub trait LineControl: Send {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()>;
    fn read_line(&mut self, line: InputLine) -> io::Result<bool>;
}

/// Card detection wiring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CardDetect {
    /// The reader has no card switch (or it is not wired): a card is assumed present (a mute
    /// card then shows as mute, not absent).
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

impl LineConfig {
    /// Phoenix: RTS high holds the card in reset; CD high reports a card.
    pub const PHOENIX: LineConfig = LineConfig {
        reset: OutputLine::Rts,
        reset_inverted: false,
        detect: CardDetect::Line {
            line: InputLine::Cd,
            inverted: false,
        },
    };
    /// Smartmouse: RTS *low* holds the card in reset (so opening the port, which raises RTS,
    /// lets the card run); CD high reports a card.
    pub const SMARTMOUSE: LineConfig = LineConfig {
        reset: OutputLine::Rts,
        reset_inverted: true,
        detect: CardDetect::Line {
            line: InputLine::Cd,
            inverted: false,
        },
    };

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

    /// "RTS high resets, CD high = card" for logs and `stbd readers`.
    pub fn describe(&self) -> String {
        let reset = format!(
            "{} {} resets",
            self.reset.name(),
            if self.reset_inverted { "low" } else { "high" }
        );
        match self.detect {
            CardDetect::None => format!("{reset}, no card switch (card assumed present)"),
            CardDetect::Line { line, inverted } => format!(
                "{reset}, {} {} = card",
                line.name(),
                if inverted { "low" } else { "high" }
            ),
        }
    }
}

impl Default for LineConfig {
    fn default() -> Self {
        Self::PHOENIX
    }
}

/// Where the pins are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModemLines {
    /// The serial port's own pins (ioctl on the port's descriptor).
    Port,
    /// An emulated reader's pins served on this Unix socket (`vcard serial-pty`).
    Socket(PathBuf),
}

/// The port's own pins, through ioctls on a duplicate of the port's descriptor (the same open
/// file, so nothing is opened twice).
pub struct IoctlLines {
    fd: OwnedFd,
    path: String,
}

impl IoctlLines {
    /// Checks that the device has modem lines at all (a pty has none: ENOTTY).
    pub fn new(port: BorrowedFd<'_>, path: &str) -> io::Result<Self> {
        let fd = port.try_clone_to_owned()?;
        let lines = Self {
            fd,
            path: path.to_string(),
        };
        lines.get().map_err(|e| lines.explain(e))?;
        Ok(lines)
    }

    fn explain(&self, e: io::Error) -> io::Error {
        if e.raw_os_error() == Some(libc::ENOTTY) || e.raw_os_error() == Some(libc::EINVAL) {
            io::Error::new(
                e.kind(),
                format!(
                    "{} has no modem-control lines ({e}); a pty has none — for `vcard \
                     serial-pty` set modem_lines = \"socket:PATH\" to the path it prints",
                    self.path
                ),
            )
        } else {
            e
        }
    }

    fn get(&self) -> io::Result<libc::c_int> {
        let mut bits: libc::c_int = 0;
        // SAFETY: TIOCMGET writes one c_int to the pointer; the fd is ours.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TIOCMGET, &mut bits) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(bits)
    }
}

impl LineControl for IoctlLines {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()> {
        let bits: libc::c_int = line.tiocm();
        let req = if level {
            libc::TIOCMBIS
        } else {
            libc::TIOCMBIC
        };
        // SAFETY: TIOCMBIS/TIOCMBIC read one c_int through the pointer; the fd is ours.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), req, &bits) };
        if rc != 0 {
            return Err(self.explain(io::Error::last_os_error()));
        }
        Ok(())
    }

    fn read_line(&mut self, line: InputLine) -> io::Result<bool> {
        let bits = self.get().map_err(|e| self.explain(e))?;
        Ok(bits & line.tiocm() != 0)
    }
}

/// The modem-line sideband of an emulated reader: a line-oriented protocol on a Unix socket.
///
/// One connection stands for one open port: when it opens, the reader sees RTS and DTR raised
/// (as the kernel raises them when a real port is opened), and when it closes they drop. The
/// client sends `SET RTS 1`, `SET DTR 0` (answered `OK` once the pin has changed, so a reset is
/// in force when the call returns) and `GET CD` (answered `1` or `0`).
pub mod sideband {
    use super::{InputLine, OutputLine};

    pub fn set(line: OutputLine, level: bool) -> String {
        format!("SET {} {}\n", line.name(), u8::from(level))
    }

    pub fn get(line: InputLine) -> String {
        format!("GET {}\n", line.name())
    }

    /// A request as the server reads it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Request {
        Set(OutputLine, bool),
        Get(InputLine),
    }

    pub fn parse(line: &str) -> Option<Request> {
        let mut w = line.split_whitespace();
        match (w.next()?, w.next()?, w.next()) {
            ("SET", pin, Some(level)) => {
                let pin = match pin {
                    "RTS" => OutputLine::Rts,
                    "DTR" => OutputLine::Dtr,
                    _ => return None,
                };
                let level = match level {
                    "1" => true,
                    "0" => false,
                    _ => return None,
                };
                Some(Request::Set(pin, level))
            }
            ("GET", pin, None) => Some(Request::Get(match pin {
                "CD" => InputLine::Cd,
                "DSR" => InputLine::Dsr,
                "CTS" => InputLine::Cts,
                "RI" => InputLine::Ri,
                _ => return None,
            })),
            _ => None,
        }
    }
}

/// An emulated reader's pins over its sideband socket.
pub struct SocketLines {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl SocketLines {
    pub fn connect(path: &Path) -> io::Result<Self> {
        let s = UnixStream::connect(path).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "modem-line socket {}: {e} — is `vcard serial-pty` running?",
                    path.display()
                ),
            )
        })?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.set_write_timeout(Some(Duration::from_secs(2)))?;
        Ok(Self {
            reader: BufReader::new(s.try_clone()?),
            writer: s,
        })
    }

    fn call(&mut self, req: &str) -> io::Result<String> {
        self.writer.write_all(req.as_bytes())?;
        let mut answer = String::new();
        if self.reader.read_line(&mut answer)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the emulated reader closed its modem-line socket",
            ));
        }
        Ok(answer.trim().to_string())
    }
}

impl LineControl for SocketLines {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()> {
        match self.call(&sideband::set(line, level))?.as_str() {
            "OK" => Ok(()),
            other => Err(io::Error::other(format!(
                "emulated reader: {} → {other}",
                line.name()
            ))),
        }
    }

    fn read_line(&mut self, line: InputLine) -> io::Result<bool> {
        match self.call(&sideband::get(line))?.as_str() {
            "1" => Ok(true),
            "0" => Ok(false),
            other => Err(io::Error::other(format!(
                "emulated reader: {} → {other}",
                line.name()
            ))),
        }
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
    fn phoenix_resets_with_rts_high_smartmouse_with_rts_low() {
        let mut fake = FakeLines::default();
        LineConfig::PHOENIX.set_reset(&mut fake, true).unwrap();
        LineConfig::PHOENIX.set_reset(&mut fake, false).unwrap();
        LineConfig::SMARTMOUSE.set_reset(&mut fake, true).unwrap();
        LineConfig::SMARTMOUSE.set_reset(&mut fake, false).unwrap();
        assert_eq!(
            fake.writes,
            vec![
                (OutputLine::Rts, true),
                (OutputLine::Rts, false),
                (OutputLine::Rts, false),
                (OutputLine::Rts, true)
            ]
        );
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
    fn a_pty_has_no_modem_lines_and_says_so() {
        let mut master = -1;
        let mut slave = -1;
        // SAFETY: openpty writes two fds; null name/termios/winsize are allowed.
        let rc = unsafe {
            libc::openpty(
                &mut master,
                &mut slave,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // SAFETY: both fds were just opened and are owned here.
        let (m, s) = unsafe {
            use std::os::fd::FromRawFd;
            (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave))
        };
        use std::os::fd::AsFd;
        let err = IoctlLines::new(s.as_fd(), "/dev/pts/X")
            .err()
            .expect("ENOTTY");
        assert!(err.to_string().contains("no modem-control lines"), "{err}");
        assert!(err.to_string().contains("modem_lines"), "{err}");
        drop(m);
    }

    #[test]
    fn sideband_requests_parse() {
        assert_eq!(
            sideband::parse(&sideband::set(OutputLine::Rts, true)),
            Some(sideband::Request::Set(OutputLine::Rts, true))
        );
        assert_eq!(
            sideband::parse(&sideband::get(InputLine::Ri)),
            Some(sideband::Request::Get(InputLine::Ri))
        );
        assert_eq!(sideband::parse("SET CD 1"), None);
        assert_eq!(sideband::parse("GET"), None);
    }
}
