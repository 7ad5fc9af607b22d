//! A Phoenix or Smartmouse reader with a card in it, on a real pty, for the serial driver's
//! tests, the benchmark and `vcard serial-pty`. It drives any [`CardApplication`] and plays the
//! card side of ISO 7816-3: the ATR on reset (direct or inverse convention, bytes trailing it
//! if asked), specific mode (TA2: TA1's speed at once), PPS, T=0 procedure bytes (ACK,
//! byte-at-a-time ACK, NULL, `61xx` when response data is pending, `6Cxx` on a wrong Le), and
//! T=1 ([`super::t1card`]); and it echoes every byte the host sends as a real Phoenix does.
//! Fault modes: a mute card, a card that goes silent on a given INS, a card that ignores PPS,
//! and T=1 faults (a damaged block, a block cut off mid-way, S(WTX), S(IFS), several damaged
//! blocks in a row that force a resynchronisation).
//!
//! Timing: a pty delivers bytes at once, so the emulator models the line. Each of the card's
//! characters occupies 12 etu; it becomes readable 10.5 etu after its leading edge (when a UART
//! has sampled the first stop bit), and that is when the emulator writes it. The [`timeline`]
//! records the leading edge of every card character and the arrival of every host character,
//! so tests measure the host's turnaround and guard times in etu.
//!
//! Modem lines: Linux ptys refuse modem-control ioctls, so the reader's pins (RTS/DTR in, which
//! reset the card per the reader's wiring; CD/DSR/CTS/RI out, the card switch) are served on a
//! Unix socket ([`PhoenixEmulator::serve_lines`], the [`crate::serial::line::sideband`]
//! protocol a driver reaches with `modem_lines = socket:PATH`), or in-process through
//! [`EmulatorLines`]. Opening the sideband is opening the port: RTS and DTR go high, as the
//! kernel raises them on a real port; closing drops them. Every data byte crosses the pty.
//!
//! [`timeline`]: PhoenixEmulator::timeline

use std::collections::VecDeque;
use std::io::{self, BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::apdu::CardApplication;

use super::t1card::{CardStep, CardT1Stats, T1Card};
use crate::serial::LinesFactory;
use crate::serial::atr::{Atr, FiDi};
use crate::serial::line::{CardDetect, InputLine, LineConfig, LineControl, OutputLine, sideband};
use crate::serial::t1::BlockReader;

/// How the emulated reader and card behave.
#[derive(Debug, Clone)]
pub struct PhoenixConfig {
    /// What the card sends on reset, as values (3B… or 3F…), trailing bytes included if a
    /// test wants them; `None` takes the application's ATR.
    pub atr: Option<Vec<u8>>,
    /// Card clock; with Fi/Di it gives the line speed (3.5712 MHz → 9600 baud).
    pub clock_hz: u32,
    /// Pace output at the line speed.
    pub pace: bool,
    /// Echo the host's bytes (Phoenix and Smartmouse do).
    pub echo: bool,
    /// How reset and card detect are wired in this reader.
    pub wiring: LineConfig,
    /// INS codes the card treats as case 2 (P3 = Le, data flows to the host). Everything
    /// else is case 1/3 (P3 = Lc): a T=0 card knows this from its command set.
    pub case2_ins: Vec<u8>,
}

impl Default for PhoenixConfig {
    fn default() -> Self {
        Self {
            atr: None,
            clock_hz: 3_571_200,
            pace: true,
            echo: true,
            wiring: LineConfig::PHOENIX,
            case2_ins: vec![0xB0, 0xB2, 0xC0, 0xCA, 0x84],
        }
    }
}

/// Misbehaviour to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Fault {
    #[default]
    None,
    /// No ATR after reset.
    Mute,
    /// Takes the header of a command with this INS and then says nothing (T=0).
    SilentOnIns(u8),
    /// Does not answer PPS requests.
    IgnorePps,
}

/// One-shot T=1 faults, applied to the card's next blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum T1Fault {
    /// The next block goes out with a wrong EDC.
    CorruptNext,
    /// The next block stops half-way (the card falls silent mid-block).
    TruncateNext,
    /// The next `n` blocks go out with a wrong EDC (the host has to resynchronise).
    Garble(u8),
    /// Before answering the next command, ask for `multiplier` × BWT and then take `delay`.
    Wtx { multiplier: u8, delay: Duration },
    /// Before answering the next command, announce a new IFSC.
    IfsRequest(u8),
}

/// One character on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineEvent {
    /// The card's characters: the leading edge (start bit); the host's: when it arrived.
    pub at: Instant,
    pub from_card: bool,
    /// The value (in the card's convention).
    pub value: u8,
    /// One etu at the speed then in force.
    pub etu: Duration,
}

/// What the emulator saw, for tests to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub resets: u32,
    /// ATRs sent (a Smartmouse card also answers when the port opens).
    pub atrs: u32,
    pub commands: u32,
    pub get_responses: u32,
    pub wrong_le: u32,
    pub nulls_sent: u32,
    /// PPS1 agreed on in the last PPS exchange.
    pub pps1: Option<u8>,
    pub pps_requests: u32,
    /// The protocol the card runs after the last reset (and PPS).
    pub protocol: u8,
    /// The line speed the card runs at now.
    pub baud: u32,
    /// Bytes on the line in both directions (host → card, card → host), echoes not counted.
    pub host_bytes: u64,
    pub card_bytes: u64,
    pub t1: CardT1Stats,
    /// The levels of RTS and DTR as the reader sees them.
    pub rts: bool,
    pub dtr: bool,
}

/// The slave side's termios, as the driver set it (read through the master).
///
/// The Linux pty driver forces CS8 and clears PARENB on every termios change, so whether
/// parity is enabled cannot be seen here; the parity *sense* (PARODD) and the request to
/// check it (INPCK) survive and are what tests check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineSettings {
    pub data_bits: u8,
    /// INPCK: input parity checking requested.
    pub parity_check: bool,
    /// PARODD: odd parity (even when false).
    pub odd_parity: bool,
    pub stop_bits: u8,
    /// PARMRK: parity errors marked in the byte stream.
    pub parmrk: bool,
    /// The speed the driver set (termios2).
    pub baud: u32,
}

#[derive(Debug)]
struct Knobs {
    card_present: bool,
    fault: Fault,
    t1_faults: VecDeque<T1Fault>,
    nulls_before_procedure: u8,
    ack_byte_by_byte: bool,
    stats: Stats,
    timeline: Vec<LineEvent>,
}

/// Keep at most this many line events.
const TIMELINE_CAP: usize = 100_000;

enum Msg {
    Pin {
        line: OutputLine,
        level: bool,
        done: mpsc::Sender<()>,
    },
    Port {
        open: bool,
        done: mpsc::Sender<()>,
    },
    Shutdown,
}

/// A running emulator; stops when dropped.
pub struct PhoenixEmulator {
    path: String,
    master: Arc<OwnedFd>,
    knobs: Arc<Mutex<Knobs>>,
    ctl: mpsc::Sender<Msg>,
    wiring: LineConfig,
    thread: Option<JoinHandle<()>>,
    socket: Option<PathBuf>,
}

impl PhoenixEmulator {
    pub fn start(app: Box<dyn CardApplication>, config: PhoenixConfig) -> io::Result<Self> {
        let (master, slave) = open_pty()?;
        let path = pty_name(&master)?;
        let master = Arc::new(master);
        let knobs = Arc::new(Mutex::new(Knobs {
            card_present: true,
            fault: Fault::None,
            t1_faults: VecDeque::new(),
            nulls_before_procedure: 0,
            ack_byte_by_byte: false,
            stats: Stats::default(),
            timeline: Vec::new(),
        }));
        let (ctl, rx) = mpsc::channel();
        let wiring = config.wiring;
        let atr = config.atr.clone().unwrap_or_else(|| app.atr());
        let parsed =
            Atr::parse(&atr).map_err(|e| io::Error::other(format!("emulator ATR: {e}")))?;
        let baud = FiDi::DEFAULT.baud(config.clock_hz);
        let mut card = CardSide {
            app,
            config,
            atr,
            parsed,
            master: master.clone(),
            knobs: knobs.clone(),
            phase: Phase::Held,
            pending: None,
            protocol: 0,
            t1: T1Card::new(crate::serial::atr::Edc::Lrc),
            t1_pending: None,
            baud,
            line_free: Instant::now(),
            // Without a sideband the port counts as open with RTS and DTR raised.
            port_open: true,
            rts: true,
            dtr: true,
        };
        card.t1 = T1Card::new(card.parsed.t1_params().edc);
        card.phase = if card.reset_asserted() {
            Phase::Held
        } else {
            Phase::Silent
        };
        let thread = std::thread::Builder::new()
            .name("phoenix-emulator".into())
            .spawn(move || {
                // The emulator keeps the slave open so the master never sees a hangup when
                // the driver closes the port between sessions.
                let _slave = slave;
                card.run(rx);
            })?;
        Ok(Self {
            path,
            master,
            knobs,
            ctl,
            wiring,
            thread: Some(thread),
            socket: None,
        })
    }

    /// The pty slave the driver opens (e.g. `/dev/pts/7`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Serves the reader's modem lines on a Unix socket at `path` (see the module docs).
    /// From now on the port counts as closed (RTS and DTR low) until a driver connects.
    pub fn serve_lines(&mut self, path: &Path) -> io::Result<()> {
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path)?;
        let (done, wait) = mpsc::channel();
        self.ctl
            .send(Msg::Port { open: false, done })
            .map_err(|_| io::Error::other("emulator stopped"))?;
        let _ = wait.recv_timeout(Duration::from_secs(2));
        let ctl = self.ctl.clone();
        let knobs = self.knobs.clone();
        let wiring = self.wiring;
        std::thread::Builder::new()
            .name("phoenix-lines".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    let Ok(conn) = conn else { continue };
                    let lines = EmulatorLines {
                        ctl: ctl.clone(),
                        knobs: knobs.clone(),
                        wiring,
                    };
                    if serve_connection(conn, lines, &ctl).is_err() {
                        // The emulator stopped.
                        return;
                    }
                }
            })?;
        self.socket = Some(path.to_path_buf());
        Ok(())
    }

    /// The pins of this reader, in process.
    pub fn lines(&self) -> EmulatorLines {
        EmulatorLines {
            ctl: self.ctl.clone(),
            knobs: self.knobs.clone(),
            wiring: self.wiring,
        }
    }

    /// For [`crate::serial::SerialDriver::with_lines`].
    pub fn lines_factory(&self) -> LinesFactory {
        let (ctl, knobs, wiring) = (self.ctl.clone(), self.knobs.clone(), self.wiring);
        Arc::new(move |_port| {
            Ok(Box::new(EmulatorLines {
                ctl: ctl.clone(),
                knobs: knobs.clone(),
                wiring,
            }) as Box<dyn LineControl>)
        })
    }

    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_card_present(&self, present: bool) {
        self.knobs().card_present = present;
    }
    pub fn set_fault(&self, fault: Fault) {
        self.knobs().fault = fault;
    }
    /// Queues a one-shot T=1 fault.
    pub fn push_t1_fault(&self, fault: T1Fault) {
        self.knobs().t1_faults.push_back(fault);
    }
    /// NULL bytes the card sends before each procedure byte (a slow card).
    pub fn set_nulls(&self, n: u8) {
        self.knobs().nulls_before_procedure = n;
    }
    /// Acknowledge data one byte at a time (INS ^ FF).
    pub fn set_ack_byte_by_byte(&self, on: bool) {
        self.knobs().ack_byte_by_byte = on;
    }
    pub fn stats(&self) -> Stats {
        self.knobs().stats.clone()
    }
    /// Every character on the line so far (see the module docs).
    pub fn timeline(&self) -> Vec<LineEvent> {
        self.knobs().timeline.clone()
    }
    pub fn clear_timeline(&self) {
        self.knobs().timeline.clear();
    }

    /// The termios of the slave as the driver configured it. Termios requests on a pty
    /// master act on its slave, so this shows what the driver asked the "UART" for.
    pub fn line_settings(&self) -> io::Result<LineSettings> {
        // SAFETY: TCGETS2 fills a zeroed termios2 for an fd we own.
        let t = unsafe {
            let mut t: libc::termios2 = std::mem::zeroed();
            if libc::ioctl(self.master.as_raw_fd(), libc::TCGETS2, &mut t) != 0 {
                return Err(io::Error::last_os_error());
            }
            t
        };
        let data_bits = match t.c_cflag & libc::CSIZE {
            libc::CS5 => 5,
            libc::CS6 => 6,
            libc::CS7 => 7,
            _ => 8,
        };
        Ok(LineSettings {
            data_bits,
            parity_check: t.c_iflag & libc::INPCK != 0,
            odd_parity: t.c_cflag & libc::PARODD != 0,
            stop_bits: if t.c_cflag & libc::CSTOPB != 0 { 2 } else { 1 },
            parmrk: t.c_iflag & libc::PARMRK != 0,
            baud: t.c_ospeed,
        })
    }
}

impl Drop for PhoenixEmulator {
    fn drop(&mut self) {
        let _ = self.ctl.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.socket {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// One sideband connection: the port is open while it lasts.
fn serve_connection(
    conn: UnixStream,
    mut lines: EmulatorLines,
    ctl: &mpsc::Sender<Msg>,
) -> Result<(), ()> {
    let port = |open: bool| -> Result<(), ()> {
        let (done, wait) = mpsc::channel();
        ctl.send(Msg::Port { open, done }).map_err(|_| ())?;
        let _ = wait.recv_timeout(Duration::from_secs(2));
        Ok(())
    };
    port(true)?;
    let mut writer = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return port(false),
    };
    let reader = BufReader::new(conn);
    for line in reader.lines() {
        let Ok(line) = line else { break };
        let answer = match sideband::parse(&line) {
            Some(sideband::Request::Set(pin, level)) => match lines.write_line(pin, level) {
                Ok(()) => "OK".to_string(),
                Err(e) => format!("ERR {e}"),
            },
            Some(sideband::Request::Get(pin)) => match lines.read_line(pin) {
                Ok(v) => u8::from(v).to_string(),
                Err(e) => format!("ERR {e}"),
            },
            None => format!("ERR not understood: {line}"),
        };
        if writeln!(writer, "{answer}").is_err() {
            break;
        }
    }
    port(false)
}

/// The emulated reader's modem-control pins (see the module docs).
pub struct EmulatorLines {
    ctl: mpsc::Sender<Msg>,
    knobs: Arc<Mutex<Knobs>>,
    wiring: LineConfig,
}

impl LineControl for EmulatorLines {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()> {
        let (done, wait) = mpsc::channel();
        self.ctl
            .send(Msg::Pin { line, level, done })
            .map_err(|_| io::Error::other("emulator stopped"))?;
        // Synchronous like a real pin: the card is in (or out of) reset when this returns.
        wait.recv_timeout(Duration::from_secs(2))
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "emulator did not take the pin"))
    }

    fn read_line(&mut self, line: InputLine) -> io::Result<bool> {
        let present = self
            .knobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .card_present;
        Ok(match self.wiring.detect {
            CardDetect::Line { line: l, inverted } if l == line => present != inverted,
            _ => false,
        })
    }
}

fn open_pty() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut master = -1;
    let mut slave = -1;
    // SAFETY: openpty writes two fds; the termios is a raw one we built; name and winsize
    // are null (allowed).
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::cfmakeraw(&mut t);
        t.c_cflag |= libc::CREAD | libc::CLOCAL;
        if libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            &t,
            std::ptr::null(),
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok((OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)))
    }
}

fn pty_name(master: &OwnedFd) -> io::Result<String> {
    let mut buf = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes a NUL-terminated name within the given length.
    let rc = unsafe { libc::ptsname_r(master.as_raw_fd(), buf.as_mut_ptr(), buf.len()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: NUL-terminated by ptsname_r on success.
    let name = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) };
    Ok(name.to_string_lossy().into_owned())
}

/// Sleeps until `t`, the last stretch spinning (thread sleeps overshoot by tens of µs, a
/// noticeable part of an etu at high speeds).
fn sleep_until(t: Instant) {
    let spin = Duration::from_micros(100);
    let now = Instant::now();
    if t > now + spin {
        std::thread::sleep(t - now - spin);
    }
    while Instant::now() < t {
        std::hint::spin_loop();
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    /// In reset, or no card: ignores the line.
    Held,
    /// Mute or gone silent.
    Silent,
    /// Just sent the ATR: a PPS may come.
    AfterAtr,
    Header(Vec<u8>),
    Pps(Vec<u8>),
    Data {
        header: [u8; 5],
        got: Vec<u8>,
    },
    T1(Vec<u8>),
}

struct CardSide {
    app: Box<dyn CardApplication>,
    config: PhoenixConfig,
    atr: Vec<u8>,
    parsed: Atr,
    master: Arc<OwnedFd>,
    knobs: Arc<Mutex<Knobs>>,
    phase: Phase,
    /// Response data waiting for GET RESPONSE.
    pending: Option<VecDeque<u8>>,
    protocol: u8,
    t1: T1Card,
    /// A T=1 response held back while an S(WTX)/S(IFS) request is answered, and the delay
    /// to take before sending it.
    t1_pending: Option<(Vec<u8>, Duration)>,
    baud: u32,
    /// When the line is free for the card's next character (its leading edge).
    line_free: Instant,
    port_open: bool,
    rts: bool,
    dtr: bool,
}

impl CardSide {
    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn etu(&self) -> Duration {
        Duration::from_secs_f64(1.0 / f64::from(self.baud.max(1)))
    }

    fn reset_asserted(&self) -> bool {
        let level = match self.config.wiring.reset {
            OutputLine::Rts => self.rts,
            OutputLine::Dtr => self.dtr,
        };
        level != self.config.wiring.reset_inverted
    }

    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let fd = self.master.as_raw_fd();
        let mut buf = [0u8; 512];
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(Msg::Pin { line, level, done }) => {
                        let before = self.reset_asserted();
                        match line {
                            OutputLine::Rts => self.rts = level,
                            OutputLine::Dtr => self.dtr = level,
                        }
                        self.pins_changed(before, done);
                    }
                    Ok(Msg::Port { open, done }) => {
                        let before = self.reset_asserted();
                        self.port_open = open;
                        // Opening a port raises RTS and DTR; closing drops them.
                        self.rts = open;
                        self.dtr = open;
                        self.pins_changed(before, done);
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut pfd, 1, 2) };
            if n <= 0 || pfd.revents & libc::POLLIN == 0 {
                if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    std::thread::sleep(Duration::from_millis(2));
                }
                continue;
            }
            // SAFETY: reading into our buffer from our fd.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
            let arrived = Instant::now();
            for &raw in &buf[..n as usize] {
                let value = self.parsed.convention.decode(raw);
                if self.phase != Phase::Held && self.phase != Phase::Silent {
                    let etu = self.etu();
                    let mut k = self.knobs();
                    k.stats.host_bytes += 1;
                    if k.timeline.len() < TIMELINE_CAP {
                        k.timeline.push(LineEvent {
                            at: arrived,
                            from_card: false,
                            value,
                            etu,
                        });
                    }
                }
                if self.config.echo {
                    self.write_line(&[raw], false);
                }
                if self.phase != Phase::Held && self.phase != Phase::Silent {
                    self.on_byte(value);
                }
            }
        }
    }

    fn pins_changed(&mut self, before: bool, done: mpsc::Sender<()>) {
        let after = self.reset_asserted();
        {
            let mut k = self.knobs();
            k.stats.rts = self.rts;
            k.stats.dtr = self.dtr;
        }
        if after && !before {
            self.hold();
        }
        let _ = done.send(());
        if before && !after {
            self.power_up();
        }
    }

    fn hold(&mut self) {
        self.phase = Phase::Held;
        self.pending = None;
        self.t1_pending = None;
        self.baud = FiDi::DEFAULT.baud(self.config.clock_hz);
        self.knobs().stats.resets += 1;
        // Discard what the host sent to a card in reset.
        let fd = self.master.as_raw_fd();
        let mut buf = [0u8; 256];
        loop {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: as in run().
            let ready =
                unsafe { libc::poll(&mut pfd, 1, 0) } > 0 && pfd.revents & libc::POLLIN != 0;
            if !ready || unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) } <= 0 {
                break;
            }
        }
    }

    fn power_up(&mut self) {
        let (present, fault) = {
            let k = self.knobs();
            (k.card_present, k.fault)
        };
        if !present || fault == Fault::Mute {
            self.phase = Phase::Silent;
            return;
        }
        self.app.reset();
        self.t1.reset();
        self.baud = FiDi::DEFAULT.baud(self.config.clock_hz);
        // The card's default protocol: TA2's in specific mode, else the first offered.
        self.protocol = match self.parsed.specific_mode() {
            Some(m) => m.protocol,
            None => self.parsed.protocols()[0],
        };
        self.line_free = Instant::now();
        let atr = self.atr.clone();
        self.send(&atr);
        {
            let mut k = self.knobs();
            k.stats.atrs += 1;
            k.stats.protocol = self.protocol;
        }
        // Specific mode with TA1's parameters: that speed from now on.
        if let Some(mode) = self.parsed.specific_mode() {
            if !mode.implicit_parameters {
                if let Some(f) = self.parsed.offered_fi_di() {
                    self.baud = f.baud(self.config.clock_hz);
                }
            }
            self.phase = self.command_phase();
        } else {
            self.phase = Phase::AfterAtr;
        }
        self.knobs().stats.baud = self.baud;
    }

    fn command_phase(&self) -> Phase {
        if self.protocol == 1 {
            Phase::T1(Vec::new())
        } else {
            Phase::Header(Vec::new())
        }
    }

    /// Puts raw bytes on the line: each character's leading edge when the line is free, and
    /// written (made readable) 10.5 etu after it.
    fn write_line(&mut self, raw: &[u8], from_card: bool) {
        if !self.port_open {
            return;
        }
        let fd = self.master.as_raw_fd();
        let etu = self.etu();
        for &b in raw {
            let leading = if self.config.pace {
                let leading = self.line_free.max(Instant::now());
                sleep_until(leading + etu.mul_f64(10.5));
                // What a UART would have seen: the leading edge 10.5 etu before now.
                Instant::now() - etu.mul_f64(10.5)
            } else {
                Instant::now()
            };
            self.line_free = leading + etu * 12;
            // SAFETY: writing one byte from our buffer to our fd. A full pty buffer or a
            // closed slave loses the byte, as a line would.
            unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
            if from_card {
                let mut k = self.knobs();
                if k.timeline.len() < TIMELINE_CAP {
                    k.timeline.push(LineEvent {
                        at: leading,
                        from_card: true,
                        value: self.parsed.convention.decode(b),
                        etu,
                    });
                }
            }
        }
    }

    /// Sends card values, converted to the card's convention.
    fn send(&mut self, values: &[u8]) {
        self.knobs().stats.card_bytes += values.len() as u64;
        let raw: Vec<u8> = values
            .iter()
            .map(|&v| self.parsed.convention.encode(v))
            .collect();
        self.write_line(&raw, true);
    }

    fn on_byte(&mut self, b: u8) {
        let phase = std::mem::replace(&mut self.phase, Phase::Silent);
        self.phase = match phase {
            Phase::Held | Phase::Silent => phase,
            Phase::AfterAtr if b == 0xFF => Phase::Pps(vec![b]),
            Phase::AfterAtr => {
                self.phase = self.command_phase();
                self.on_byte(b);
                return;
            }
            Phase::Pps(mut req) => {
                req.push(b);
                let len = 3 + (req[1] >> 4 & 0x7).count_ones() as usize;
                if req.len() < len {
                    Phase::Pps(req)
                } else {
                    self.answer_pps(&req)
                }
            }
            Phase::Header(mut h) => {
                h.push(b);
                match <[u8; 5]>::try_from(h.as_slice()) {
                    Ok(header) => self.command(header),
                    Err(_) => Phase::Header(h),
                }
            }
            Phase::Data { header, mut got } => {
                got.push(b);
                if got.len() < usize::from(header[4]) {
                    if self.knobs().ack_byte_by_byte {
                        self.procedure(&[header[1] ^ 0xFF]);
                    }
                    Phase::Data { header, got }
                } else {
                    let mut apdu = header.to_vec();
                    apdu.extend_from_slice(&got);
                    let resp = self.app.process_apdu(&apdu);
                    self.answer_case34(resp)
                }
            }
            Phase::T1(mut block) => {
                block.push(b);
                let mut reader = BlockReader::new(self.parsed.t1_params().edc);
                let mut complete = false;
                for &x in &block {
                    complete = reader.push(x);
                }
                if complete {
                    self.t1_block(&block);
                    Phase::T1(Vec::new())
                } else {
                    Phase::T1(block)
                }
            }
        };
    }

    fn answer_pps(&mut self, req: &[u8]) -> Phase {
        self.knobs().stats.pps_requests += 1;
        if req.iter().fold(0u8, |a, b| a ^ b) != 0 || self.knobs().fault == Fault::IgnorePps {
            // ISO 7816-3: a card that receives an erroneous PPS request does not answer.
            return Phase::Silent;
        }
        let protocol = req[1] & 0x0F;
        if !self.parsed.protocols().contains(&protocol) {
            return Phase::Silent;
        }
        let offered = self.parsed.offered_fi_di();
        // PPS1 is taken when it names the card's Fi and a Di no higher than it offers.
        let accepted =
            (req[1] & 0x10 != 0)
                .then(|| req[2])
                .filter(|&p| match (FiDi::from_ta1(p), offered) {
                    (Some(want), Some(off)) => want.fi == off.fi && want.di <= off.di,
                    _ => false,
                });
        let resp = match accepted {
            Some(_) => req.to_vec(),
            None => vec![0xFF, protocol, 0xFF ^ protocol],
        };
        self.send(&resp);
        self.protocol = protocol;
        {
            let mut k = self.knobs();
            k.stats.pps1 = accepted;
            k.stats.protocol = protocol;
        }
        if let Some(fi_di) = accepted.and_then(FiDi::from_ta1) {
            self.baud = fi_di.baud(self.config.clock_hz);
        }
        self.knobs().stats.baud = self.baud;
        self.command_phase()
    }

    /// Sends NULLs first if a slow card is being simulated, then the procedure bytes.
    fn procedure(&mut self, bytes: &[u8]) {
        let nulls = self.knobs().nulls_before_procedure;
        if nulls > 0 {
            self.knobs().stats.nulls_sent += u32::from(nulls);
            self.send(&vec![0x60; usize::from(nulls)]);
        }
        self.send(bytes);
    }

    fn command(&mut self, h: [u8; 5]) -> Phase {
        let (fault, byte_by_byte) = {
            let mut k = self.knobs();
            k.stats.commands += 1;
            (k.fault, k.ack_byte_by_byte)
        };
        if fault == Fault::SilentOnIns(h[1]) {
            return Phase::Silent;
        }
        let (ins, p3) = (h[1], h[4]);
        if self.config.case2_ins.contains(&ins) {
            let le = if p3 == 0 { 256 } else { usize::from(p3) };
            let data = if ins == 0xC0 {
                self.knobs().stats.get_responses += 1;
                match self.pending.take() {
                    Some(p) => Vec::from(p),
                    None => {
                        self.procedure(&[0x69, 0x85]);
                        return Phase::Header(Vec::new());
                    }
                }
            } else {
                let resp = self.app.process_apdu(&h);
                let Some((data, sw)) = resp.split_last_chunk::<2>() else {
                    self.procedure(&[0x6F, 0x00]);
                    return Phase::Header(Vec::new());
                };
                if data.is_empty() {
                    self.procedure(sw);
                    return Phase::Header(Vec::new());
                }
                let mut d = data.to_vec();
                d.extend_from_slice(sw);
                d
            };
            // For GET RESPONSE `data` has no SW yet; for other commands it ends with the SW.
            let (body, sw) = if ins == 0xC0 {
                (data, [0x90, 0x00])
            } else {
                let (b, sw) = data.split_at(data.len() - 2);
                (b.to_vec(), [sw[0], sw[1]])
            };
            if body.len() != le {
                if ins == 0xC0 {
                    self.pending = Some(body.iter().copied().collect());
                }
                self.knobs().stats.wrong_le += 1;
                self.procedure(&[0x6C, body.len() as u8]);
                return Phase::Header(Vec::new());
            }
            if byte_by_byte {
                for &b in &body {
                    self.procedure(&[ins ^ 0xFF]);
                    self.send(&[b]);
                }
            } else {
                self.procedure(&[ins]);
                self.send(&body);
            }
            self.send(&sw);
            return Phase::Header(Vec::new());
        }
        if p3 == 0 {
            let resp = self.app.process_apdu(&h[..4]);
            return self.answer_case34(resp);
        }
        self.procedure(&[if byte_by_byte { ins ^ 0xFF } else { ins }]);
        Phase::Data {
            header: h,
            got: Vec::new(),
        }
    }

    /// Case 1/3/4 answer: status only, or 61xx with the data kept for GET RESPONSE.
    fn answer_case34(&mut self, resp: Vec<u8>) -> Phase {
        match resp.split_last_chunk::<2>() {
            Some((data, _)) if !data.is_empty() => {
                let len = data.len().min(256);
                self.pending = Some(data[..len].iter().copied().collect());
                self.procedure(&[0x61, len as u8]);
            }
            Some((_, sw)) => self.procedure(sw),
            None => self.procedure(&[0x6F, 0x00]),
        }
        Phase::Header(Vec::new())
    }

    /// A whole T=1 block from the host.
    fn t1_block(&mut self, raw: &[u8]) {
        let step = self.t1.on_block(raw);
        self.knobs().stats.t1 = self.t1.stats;
        match step {
            CardStep::Send(b) => self.send_t1(b),
            CardStep::Command(apdu) => {
                self.knobs().stats.commands += 1;
                let resp = self.app.process_apdu(&apdu);
                let next = self.knobs().t1_faults.front().copied();
                match next {
                    Some(T1Fault::Wtx { multiplier, delay }) => {
                        self.knobs().t1_faults.pop_front();
                        self.t1_pending = Some((resp, delay));
                        let req = self.t1.wtx_request(multiplier);
                        self.send_t1(req);
                    }
                    Some(T1Fault::IfsRequest(ifsc)) => {
                        self.knobs().t1_faults.pop_front();
                        self.t1_pending = Some((resp, Duration::ZERO));
                        let req = self.t1.ifs_request(ifsc);
                        self.send_t1(req);
                    }
                    _ => {
                        let b = self.t1.respond(resp);
                        self.send_t1(b);
                    }
                }
            }
            CardStep::Resume => {
                if let Some((resp, delay)) = self.t1_pending.take() {
                    if !delay.is_zero() {
                        std::thread::sleep(delay);
                        self.line_free = Instant::now();
                    }
                    let b = self.t1.respond(resp);
                    self.send_t1(b);
                }
            }
        }
        self.knobs().stats.t1 = self.t1.stats;
    }

    /// Sends a T=1 block, damaged or cut short when a fault says so.
    fn send_t1(&mut self, mut block: Vec<u8>) {
        let fault = {
            let mut k = self.knobs();
            match k.t1_faults.front().copied() {
                Some(T1Fault::CorruptNext) | Some(T1Fault::TruncateNext) => k.t1_faults.pop_front(),
                Some(T1Fault::Garble(n)) => {
                    k.t1_faults.pop_front();
                    if n > 1 {
                        k.t1_faults.push_front(T1Fault::Garble(n - 1));
                    }
                    Some(T1Fault::CorruptNext)
                }
                _ => None,
            }
        };
        match fault {
            Some(T1Fault::CorruptNext) => {
                if let Some(last) = block.last_mut() {
                    *last ^= 0x5A;
                }
                self.send(&block);
            }
            Some(T1Fault::TruncateNext) => {
                let half = block.len() / 2;
                block.truncate(half.max(1));
                self.send(&block);
            }
            _ => self.send(&block),
        }
    }
}
