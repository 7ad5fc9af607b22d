//! The thin tokio shell: a [`ReaderDriver`] for one Phoenix/Smartmouse reader on a serial
//! port, and its [`CardSession`]. It owns the IO and every wait; the protocol decisions are in
//! [`super::atr`], [`super::t0`] and [`super::t1`].
//!
//! - The port is opened once, when first needed, and kept open (a serial port's open and close
//!   move DTR/RTS, so opening per poll would reset the card); the modem lines go through the
//!   port's own descriptor ([`super::line::IoctlLines`]) or, for a pty, an emulated reader's
//!   sideband socket ([`super::line::SocketLines`]).
//! - The ATR is read until the line goes quiet: up to the initial waiting time (9600 etu) for
//!   each interface and historical byte, then a short quiet time for the TCK and whatever
//!   trails it, which is reported and discarded, never taken for an echo.
//! - Speeds go as high as the card offers and `max_baud` and the tty allow (custom rates via
//!   termios2 BOTHER, read back to check the tty met them); a card in specific mode whose speed
//!   cannot be met is refused, never run at a mismatched speed. After a failed PPS the card is
//!   reset and used at the default speed, with every other ATR parameter (TC1 guard time,
//!   waiting times, protocol) still applied.
//! - Timing: at least 16 etu between the leading edges of the card's last character and our
//!   next (22 etu, the block guard time, in T=1), TC1's extra guard time between our own
//!   characters, and T=0 NULL bytes bounded only by the work waiting time each one restarts.
//!   A margin ([`SerialConfig::os_margin`]) covers scheduling and USB-serial latency on top of
//!   every ISO waiting time. Parity errors are seen through PARMRK ([`super::wire`]).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio_serial::{
    ClearBuffer, DataBits, FlowControl, Parity, SerialPort, SerialStream, StopBits,
};

use super::atr::{
    self, Atr, AtrError, Convention, FiDi, MAX_LINE_BYTES, Progress, RAW_INVERSE_TS, di_from_ta1,
};
use super::line::{IoctlLines, LineConfig, LineControl, ModemLines, SocketLines};
use super::t0::{PpsExchange, PpsStep, T0Exchange, T0Step};
use super::t1::{BlockReader, T1Host, T1Stats, T1Step};
use super::wire::{ParmrkDecoder, RxByte};
use crate::api::{
    BoxFuture, CardPresence, CardSession, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo,
};

/// Bits in one character on the line (start, 8 data, parity, 2 stop/guard): 12 etu.
pub const CHAR_ETU: u64 = 12;
/// The earliest a UART hands us a character after its leading edge (start + 8 data +
/// parity): the turnaround waits count from here, so they hold whatever the UART does.
const READABLE_ETU: u64 = 10;
/// ISO 7816-3 / EMV: at least 16 etu between the leading edges of the last character
/// received and the next one sent (T=0, PPS).
pub const TURNAROUND_ETU: u64 = 16;
/// T=1 block guard time: 22 etu between the leading edges of characters in opposite
/// directions.
pub const BGT_ETU: u64 = 22;
/// After the ATR's last expected byte, how long the line must stay quiet before the ATR is
/// taken as complete (etu, plus the OS margin).
pub const ATR_QUIET_ETU: u64 = 200;

/// Named wirings of common readers (see [`LineConfig`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// Phoenix: RTS high holds reset, CD reports the card, echoes every byte, 3.5712 MHz.
    Phoenix,
    /// Smartmouse: RTS *low* holds reset, CD reports the card, echoes like a Phoenix,
    /// 3.5712 MHz.
    Smartmouse,
}

impl Profile {
    pub fn lines(self) -> LineConfig {
        match self {
            Profile::Phoenix => LineConfig::PHOENIX,
            Profile::Smartmouse => LineConfig::SMARTMOUSE,
        }
    }
    pub fn echo(self) -> bool {
        true
    }
}

/// When to negotiate a faster speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PpsPolicy {
    /// PPS to the fastest Fi/Di the card offers in TA1 that `max_baud` and the tty allow.
    Negotiate,
    /// Never send PPS: stay at the default speed (specific-mode cards still get TA1's).
    Off,
}

/// Configuration of one serial reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialConfig {
    /// The reader's name in the Reader API.
    pub name: String,
    /// The serial device, e.g. `/dev/ttyUSB0`.
    pub path: String,
    /// The clock the reader gives the card (Phoenix: 3.5712 MHz, so 9600 baud at Fi/Di = 372).
    pub clock_hz: u32,
    /// The initial line speed; `None` derives it from the clock (clock / 372).
    pub baud: Option<u32>,
    pub lines: LineConfig,
    /// Where the modem lines are.
    pub modem_lines: ModemLines,
    /// The reader echoes every byte sent (single-wire I/O): Phoenix and Smartmouse do.
    pub echo: bool,
    pub pps: PpsPolicy,
    /// Never go faster than this (what the UART and the cable manage).
    pub max_baud: u32,
    /// Extra guard time in etu we always leave between our characters (TC1's when larger).
    pub guard_etu: u8,
    /// The T=1 information field size we offer the card (S(IFS request) after the ATR).
    pub ifsd: u8,
    /// Added to every ISO waiting time for OS and USB-serial latency.
    pub os_margin: Duration,
    /// How long reset is held asserted.
    pub reset_hold: Duration,
    /// How often the event watcher polls the card-detect line.
    pub poll_interval: Duration,
}

impl SerialConfig {
    /// A Phoenix reader.
    pub fn new(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self::with_profile(name, path, Profile::Phoenix)
    }

    pub fn with_profile(name: impl Into<String>, path: impl Into<String>, p: Profile) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            clock_hz: 3_571_200,
            baud: None,
            lines: p.lines(),
            modem_lines: ModemLines::Port,
            echo: p.echo(),
            pps: PpsPolicy::Negotiate,
            max_baud: 230_400,
            guard_etu: 0,
            ifsd: 254,
            os_margin: Duration::from_millis(100),
            reset_hold: Duration::from_millis(20),
            poll_interval: Duration::from_millis(250),
        }
    }

    pub fn initial_baud(&self) -> u32 {
        self.baud
            .unwrap_or_else(|| FiDi::DEFAULT.baud(self.clock_hz))
    }
}

/// Makes the pin interface for the open port. The default follows
/// [`SerialConfig::modem_lines`]; in-process tests may substitute their own.
pub type LinesFactory =
    Arc<dyn Fn(&SerialStream) -> io::Result<Box<dyn LineControl>> + Send + Sync>;

type SharedLines = Arc<Mutex<Box<dyn LineControl>>>;

#[derive(Default)]
struct Shared {
    /// The open port while no session holds it.
    port: Option<SerialStream>,
    lines: Option<SharedLines>,
    /// A session holds the port.
    busy: bool,
    last_atr: Option<Vec<u8>>,
    /// The last problem logged, so a poll loop does not repeat it.
    last_problem: Option<String>,
}

/// What `stbd readers` shows about the card in a serial reader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SerialCardInfo {
    pub atr: Vec<u8>,
    pub warnings: Vec<String>,
    pub protocol: u8,
    pub baud: u32,
    pub convention: Convention,
}

/// A Phoenix/Smartmouse reader on a serial port.
#[derive(Clone)]
pub struct SerialDriver {
    config: Arc<SerialConfig>,
    lines: Option<LinesFactory>,
    shared: Arc<Mutex<Shared>>,
}

impl SerialDriver {
    /// A driver using the modem lines the config names.
    pub fn new(config: SerialConfig) -> Self {
        Self {
            config: Arc::new(config),
            lines: None,
            shared: Arc::default(),
        }
    }

    /// A driver whose reset and card detect go through `lines` (an in-process test seam).
    pub fn with_lines(config: SerialConfig, lines: LinesFactory) -> Self {
        Self {
            config: Arc::new(config),
            lines: Some(lines),
            shared: Arc::default(),
        }
    }

    pub fn config(&self) -> &SerialConfig {
        &self.config
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn io_err(&self, what: &str, e: impl std::fmt::Display) -> ReaderError {
        ReaderError::Io {
            reader: self.config.name.clone(),
            detail: format!("{what} {}: {e}", self.config.path),
        }
    }

    /// Logs a problem at warn level once, until it changes or clears.
    fn note_problem(&self, problem: Option<String>) {
        let mut shared = self.shared();
        if shared.last_problem != problem {
            if let Some(p) = &problem {
                tracing::warn!(reader = %self.config.name, device = %self.config.path, problem = %p, "serial reader");
            } else if shared.last_problem.is_some() {
                tracing::info!(reader = %self.config.name, "serial reader works again");
            }
            shared.last_problem = problem;
        }
    }

    fn open_port(&self) -> Result<(SerialStream, SharedLines), ReaderError> {
        let cfg = &self.config;
        let builder = tokio_serial::new(&cfg.path, cfg.initial_baud())
            .data_bits(DataBits::Eight)
            .parity(Parity::Even)
            .stop_bits(StopBits::Two)
            .flow_control(FlowControl::None);
        let port = SerialStream::open(&builder).map_err(|e| match e.kind() {
            tokio_serial::ErrorKind::NoDevice => ReaderError::InUse {
                reader: cfg.name.clone(),
            },
            _ => self.io_err(
                "cannot open",
                format!("{e} — check the device path and that you are in the dialout group"),
            ),
        })?;
        enable_parmrk(port.as_raw_fd()).map_err(|e| self.io_err("cannot set PARMRK on", e))?;
        let lines: Box<dyn LineControl> = match (&self.lines, &cfg.modem_lines) {
            (Some(f), _) => f(&port),
            (None, ModemLines::Port) => {
                // SAFETY: the port's descriptor is open for the whole call; IoctlLines keeps
                // a duplicate of its own.
                let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(port.as_raw_fd()) };
                IoctlLines::new(fd, &cfg.path).map(|l| Box::new(l) as Box<dyn LineControl>)
            }
            (None, ModemLines::Socket(p)) => {
                SocketLines::connect(p).map(|l| Box::new(l) as Box<dyn LineControl>)
            }
        }
        .map_err(|e| self.io_err("modem-control lines of", e))?;
        let lines = Arc::new(Mutex::new(lines));
        // Hold the card in reset while nobody uses it (opening the port raised RTS and DTR,
        // which lets a Smartmouse card run and chatter).
        cfg.lines
            .set_reset(lock(&lines).as_mut(), true)
            .map_err(|e| self.io_err("reset line of", e))?;
        Ok((port, lines))
    }

    /// The port's lines, opening the port on first use.
    fn ensure_open(&self) -> Result<SharedLines, ReaderError> {
        if let Some(l) = self.shared().lines.clone() {
            return Ok(l);
        }
        let (port, lines) = self.open_port()?;
        let mut shared = self.shared();
        shared.port = Some(port);
        shared.lines = Some(lines.clone());
        Ok(lines)
    }

    /// Forgets the open port (after an IO error: the device may have gone).
    fn close(&self) {
        let mut shared = self.shared();
        shared.port = None;
        shared.lines = None;
    }

    /// Takes the port for a session: resets the card and reads its ATR.
    async fn open_session(&self) -> Result<(SerialSession, Vec<u8>), ReaderError> {
        let lines = self.ensure_open()?;
        let port = {
            let mut shared = self.shared();
            if shared.busy {
                return Err(ReaderError::InUse {
                    reader: self.config.name.clone(),
                });
            }
            let Some(port) = shared.port.take() else {
                return Err(self.io_err("port is gone", "reopen"));
            };
            shared.busy = true;
            port
        };
        // From here the session's Drop gives the port back, whatever fails.
        let mut session = SerialSession {
            cfg: self.config.clone(),
            driver: self.clone(),
            wire: Some(Wire::new(port)),
            lines: Some(lines),
            atr: None,
            protocol: Protocol::T0 {
                wwt: Duration::from_secs(1),
            },
            fi_di: FiDi::DEFAULT,
            baud: self.config.initial_baud(),
            guard_etu: 0,
            speed_note: None,
        };
        let atr = session.reset_card().await?;
        Ok((session, atr))
    }

    fn card_present(&self) -> Result<bool, ReaderError> {
        let lines = self.ensure_open()?;
        let r = self.config.lines.card_present(lock(&lines).as_mut());
        r.map_err(|e| {
            self.close();
            self.io_err("cannot read card detect on", e)
        })
    }

    /// Card presence without disturbing a session that holds the port.
    fn probe(&self) -> Result<CardPresence, ReaderError> {
        let present = self.card_present()?;
        let atr = self.shared().last_atr.clone().unwrap_or_default();
        Ok(if present {
            CardPresence::Present { atr }
        } else {
            CardPresence::Absent
        })
    }

    fn attached(&self) -> bool {
        std::path::Path::new(&self.config.path).exists()
    }

    /// Resets the card, reads and describes it, and powers it down (`stbd readers`).
    pub async fn card_info(&self) -> Result<SerialCardInfo, ReaderError> {
        let (mut session, atr) = self.open_session().await?;
        let parsed = session.atr.clone();
        let info = SerialCardInfo {
            atr,
            warnings: parsed
                .as_ref()
                .map(|a| a.warnings.iter().map(|w| w.to_string()).collect())
                .unwrap_or_default(),
            protocol: session.protocol_number(),
            baud: session.baud,
            convention: parsed.map_or(Convention::Direct, |a| a.convention),
        };
        let mut warnings = info.warnings.clone();
        if let Some(n) = session.speed_note.take() {
            warnings.push(n);
        }
        session.power_down().await?;
        Ok(SerialCardInfo { warnings, ..info })
    }
}

fn lock(lines: &SharedLines) -> std::sync::MutexGuard<'_, Box<dyn LineControl>> {
    lines.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReaderDriver for SerialDriver {
    fn kind(&self) -> &'static str {
        "serial"
    }

    fn list(&self) -> BoxFuture<'_, Result<Vec<ReaderInfo>, ReaderError>> {
        Box::pin(async move {
            if !self.attached() {
                return Ok(Vec::new());
            }
            let card = match self.probe() {
                Ok(card) => card,
                Err(ReaderError::InUse { .. }) => CardPresence::InUse,
                Err(e) => return Err(e),
            };
            Ok(vec![ReaderInfo {
                name: self.config.name.clone(),
                card,
            }])
        })
    }

    fn events(&self) -> mpsc::Receiver<ReaderEvent> {
        let (tx, rx) = mpsc::channel(16);
        let driver = self.clone();
        tokio::spawn(async move { driver.watch(tx).await });
        rx
    }

    fn connect<'a>(
        &'a self,
        reader: &'a str,
    ) -> BoxFuture<'a, Result<(Box<dyn CardSession>, Vec<u8>), ReaderError>> {
        Box::pin(async move {
            if reader != self.config.name {
                return Err(ReaderError::UnknownReader {
                    reader: reader.to_string(),
                });
            }
            let (session, atr) = self.open_session().await?;
            Ok((Box::new(session) as Box<dyn CardSession>, atr))
        })
    }
}

impl SerialDriver {
    /// Polls the device path and card detect; stops when the receiver is dropped.
    async fn watch(self, tx: mpsc::Sender<ReaderEvent>) {
        let name = self.config.name.clone();
        let mut attached = false;
        let mut present = false;
        loop {
            let now_attached = self.attached();
            let mut events = Vec::new();
            if now_attached != attached {
                if now_attached {
                    events.push(ReaderEvent::ReaderAttached {
                        reader: name.clone(),
                    });
                } else {
                    self.close();
                    if present {
                        events.push(ReaderEvent::CardRemoved {
                            reader: name.clone(),
                        });
                        present = false;
                    }
                    events.push(ReaderEvent::ReaderDetached {
                        reader: name.clone(),
                    });
                    self.note_problem(Some(format!("{} is gone", self.config.path)));
                }
                attached = now_attached;
            }
            if attached {
                match self.probe() {
                    Ok(CardPresence::Absent) => {
                        self.note_problem(None);
                        if present {
                            present = false;
                            events.push(ReaderEvent::CardRemoved {
                                reader: name.clone(),
                            });
                        }
                    }
                    Ok(CardPresence::Present { .. }) if !present => {
                        // Read the ATR when nobody holds the card; a mute card is reported
                        // with an empty ATR.
                        let atr = match self.open_session().await {
                            Ok((mut session, atr)) => {
                                let _ = session.power_down().await;
                                self.note_problem(None);
                                Some(atr)
                            }
                            Err(ReaderError::InUse { .. }) => None,
                            Err(e) => {
                                self.note_problem(Some(format!("no usable ATR: {e}")));
                                Some(Vec::new())
                            }
                        };
                        if let Some(atr) = atr {
                            present = true;
                            events.push(ReaderEvent::CardInserted {
                                reader: name.clone(),
                                atr,
                            });
                        }
                    }
                    Ok(_) => {}
                    Err(e) => self.note_problem(Some(e.to_string())),
                }
            }
            for event in events {
                if tx.send(event).await.is_err() {
                    return;
                }
            }
            tokio::select! {
                _ = tx.closed() => return,
                _ = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
    }
}

/// Turns on parity marking (see [`super::wire`]): serialport's raw mode sets INPCK without
/// PARMRK, which would hand us a bad character as a plain 0x00.
fn enable_parmrk(fd: i32) -> io::Result<()> {
    // SAFETY: plain termios calls on an fd we own, with a zeroed struct tcgetattr fills in.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) != 0 {
            return Err(io::Error::last_os_error());
        }
        t.c_iflag |= libc::PARMRK | libc::INPCK;
        t.c_iflag &= !(libc::IGNPAR | libc::ISTRIP | libc::IGNBRK | libc::BRKINT);
        if libc::tcsetattr(fd, libc::TCSANOW, &t) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Waits until `t` precisely: the timer for the bulk, a short sleep for the rest (tokio's
/// timer has millisecond resolution; a turnaround at 9600 baud is 0.6 ms).
async fn wait_until(t: Instant) {
    let now = Instant::now();
    if t <= now {
        return;
    }
    let left = t - now;
    if left > Duration::from_millis(3) {
        tokio::time::sleep(left - Duration::from_millis(2)).await;
    }
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

/// A failure on the line, before it is given a reader name and a meaning.
#[derive(Debug)]
enum WireError {
    Timeout(Duration),
    Parity,
    Io(io::Error),
}

/// The byte stream: PARMRK decoding, convention, echo, and the timing rules.
struct Wire {
    port: SerialStream,
    decoder: ParmrkDecoder,
    rx: VecDeque<RxByte>,
    convention: Convention,
    /// When the card's last character became readable.
    card_rx_at: Option<Instant>,
}

impl Wire {
    fn new(port: SerialStream) -> Self {
        Self {
            port,
            decoder: ParmrkDecoder::default(),
            rx: VecDeque::new(),
            convention: Convention::Direct,
            card_rx_at: None,
        }
    }

    /// The next character as the UART read it, within `wait`.
    async fn read_raw(&mut self, wait: Duration) -> Result<RxByte, WireError> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut buf = [0u8; 64];
        let mut decoded = Vec::new();
        // Bounded by the deadline: every read either delivers or runs into it.
        while self.rx.is_empty() {
            match tokio::time::timeout_at(deadline, self.port.read(&mut buf)).await {
                Err(_) => return Err(WireError::Timeout(wait)),
                Ok(Ok(0)) => return Err(WireError::Io(io::ErrorKind::UnexpectedEof.into())),
                Ok(Ok(n)) => {
                    for &b in &buf[..n] {
                        self.decoder.push(b, &mut decoded);
                    }
                    self.rx.extend(decoded.drain(..));
                }
                Ok(Err(e)) => return Err(WireError::Io(e)),
            }
        }
        Ok(self.rx.pop_front().unwrap_or(RxByte::Ok(0)))
    }

    /// A character from the card, raw.
    async fn recv_raw(&mut self, wait: Duration) -> Result<RxByte, WireError> {
        let b = self.read_raw(wait).await?;
        self.card_rx_at = Some(Instant::now());
        Ok(b)
    }

    /// The next character's value in the card's convention.
    async fn recv(&mut self, wait: Duration) -> Result<u8, WireError> {
        match self.recv_raw(wait).await? {
            RxByte::Ok(b) => Ok(self.convention.decode(b)),
            RxByte::ParityError(_) => Err(WireError::Parity),
        }
    }

    /// Sends values: first waits out the turnaround after the card's last character, paces
    /// characters apart by the extra guard time, and on an echoing reader reads each back.
    async fn send(&mut self, values: &[u8], t: &SendTiming) -> Result<(), SendError> {
        let raw: Vec<u8> = values.iter().map(|&v| self.convention.encode(v)).collect();
        if let Some(at) = self.card_rx_at {
            wait_until(at + t.etu * (t.turnaround_etu - READABLE_ETU) as u32).await;
        }
        if t.guard_etu == 0 {
            self.port.write_all(&raw).await.map_err(WireError::Io)?;
        } else {
            // Extra guard time (TC1): the UART cannot stretch stop bits, so pace by hand.
            let spacing = t.etu * (CHAR_ETU as u32 + u32::from(t.guard_etu));
            let mut next = Instant::now();
            for b in &raw {
                wait_until(next).await;
                next = Instant::now() + spacing;
                self.port.write_all(&[*b]).await.map_err(WireError::Io)?;
            }
        }
        self.port.flush().await.map_err(WireError::Io)?;
        if t.echo {
            let char_time = t.etu * CHAR_ETU as u32;
            let wait = char_time * (raw.len() as u32 + 1) + t.margin;
            for &sent in &raw {
                match self.read_raw(wait).await {
                    Ok(RxByte::Ok(got)) if got == sent => {}
                    Ok(RxByte::Ok(got)) => return Err(SendError::EchoMismatch { sent, got }),
                    Ok(RxByte::ParityError(_)) => return Err(WireError::Parity.into()),
                    Err(WireError::Timeout(_)) => return Err(SendError::NoEcho),
                    Err(e) => return Err(e.into()),
                }
            }
        }
        Ok(())
    }

    fn flush_input(&mut self) -> io::Result<()> {
        self.port
            .clear(ClearBuffer::Input)
            .map_err(io::Error::from)?;
        self.rx.clear();
        self.decoder = ParmrkDecoder::default();
        Ok(())
    }
}

struct SendTiming {
    etu: Duration,
    turnaround_etu: u64,
    guard_etu: u8,
    echo: bool,
    margin: Duration,
}

#[derive(Debug)]
enum SendError {
    Wire(WireError),
    EchoMismatch { sent: u8, got: u8 },
    NoEcho,
}

impl From<WireError> for SendError {
    fn from(e: WireError) -> Self {
        SendError::Wire(e)
    }
}

fn ended(reader: &str) -> ReaderError {
    ReaderError::Protocol {
        reader: reader.to_string(),
        detail: "session powered down — connect again".into(),
    }
}

/// The transmission protocol in force and its waiting times (margin included).
enum Protocol {
    T0 {
        /// Work waiting time, restarted by every character (NULL bytes included).
        wwt: Duration,
    },
    T1 {
        host: Box<T1Host>,
        /// Block waiting time, before the first character of the card's block.
        bwt: Duration,
        /// Character waiting time, between characters of a block.
        cwt: Duration,
    },
}

/// What a speed plan says.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Plan {
    protocol: u8,
    /// The speed to use at once (specific mode).
    specific: Option<FiDi>,
    /// PPS to send: protocol and PPS1.
    pps: Option<(u8, Option<u8>)>,
}

/// Why no plan: refuse, or warm-reset a specific-mode card into negotiable mode.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NoPlan {
    Refuse(String),
    WarmReset(String),
}

/// Chooses protocol and speed from the ATR and what the line allows (`tty_ok(baud)`).
fn plan(atr: &Atr, cfg: &SerialConfig, tty_ok: &dyn Fn(u32) -> bool) -> Result<Plan, NoPlan> {
    let protocol = atr.usable_protocol().ok_or_else(|| {
        NoPlan::Refuse(
            AtrError::NoUsableProtocol {
                protocols: atr.protocols(),
            }
            .to_string(),
        )
    })?;
    let why_not = |f: FiDi| -> Option<String> {
        let baud = f.baud(cfg.clock_hz);
        if cfg.clock_hz > f.fmax_hz {
            Some(format!(
                "the reader's clock {} Hz is above the card's {} Hz",
                cfg.clock_hz, f.fmax_hz
            ))
        } else if baud > cfg.max_baud {
            Some(format!(
                "that is above max_baud = {} (raise it if the reader's UART can do {baud})",
                cfg.max_baud
            ))
        } else if !tty_ok(baud) {
            Some(format!("the tty cannot run at {baud} baud"))
        } else {
            None
        }
    };
    if let Some(mode) = atr.specific_mode() {
        let f = if mode.implicit_parameters {
            FiDi::DEFAULT
        } else {
            atr.offered_fi_di().unwrap_or(FiDi::DEFAULT)
        };
        return match why_not(f) {
            None => Ok(Plan {
                protocol,
                specific: Some(f),
                pps: None,
            }),
            Some(why) => {
                let msg = format!(
                    "the card runs in specific mode at {} baud (TA1 {}, TA2 {:02X}) but {why}",
                    f.baud(cfg.clock_hz),
                    atr.ta1().map_or("absent".into(), |t| format!("{t:02X}")),
                    atr.ta2().unwrap_or(0)
                );
                Err(if mode.can_change {
                    NoPlan::WarmReset(msg)
                } else {
                    NoPlan::Refuse(msg)
                })
            }
        };
    }
    let default_protocol = atr.protocols().first().copied().unwrap_or(0);
    let mut pps1 = None;
    if cfg.pps == PpsPolicy::Negotiate {
        if let Some(offered) = atr.offered_fi_di() {
            // The fastest Di up to the offered one that the line allows, at the card's Fi.
            let mut dis: Vec<u8> = (1..10).filter_map(di_from_ta1).collect();
            dis.sort_unstable();
            let best = dis
                .into_iter()
                .filter(|&d| d <= offered.di)
                .map(|di| FiDi { di, ..offered })
                .filter(|f| why_not(*f).is_none())
                .max_by_key(|f| f.baud(cfg.clock_hz));
            if let Some(f) =
                best.filter(|f| f.baud(cfg.clock_hz) > FiDi::DEFAULT.baud(cfg.clock_hz))
            {
                pps1 = f.to_ta1();
            }
        }
    }
    // Without PPS the card uses the first protocol it offers; PPS selects another one when
    // that first one is not one we speak.
    let pps = if pps1.is_some() || protocol != default_protocol {
        Some((protocol, pps1))
    } else {
        None
    };
    Ok(Plan {
        protocol,
        specific: None,
        pps,
    })
}

/// A powered card in a serial reader.
pub struct SerialSession {
    cfg: Arc<SerialConfig>,
    driver: SerialDriver,
    wire: Option<Wire>,
    lines: Option<SharedLines>,
    atr: Option<Atr>,
    protocol: Protocol,
    /// Fi/Di in force (after PPS or specific mode).
    fi_di: FiDi,
    /// The line speed in force.
    baud: u32,
    /// Extra guard time in etu between our characters.
    guard_etu: u8,
    /// A speed the card offered that we did not use, and why.
    speed_note: Option<String>,
}

impl Drop for SerialSession {
    fn drop(&mut self) {
        let mut shared = self.driver.shared();
        shared.busy = false;
        match self.wire.take() {
            Some(w) if shared.lines.is_some() => shared.port = Some(w.port),
            _ => {
                shared.port = None;
                shared.lines = None;
            }
        }
    }
}

impl SerialSession {
    /// The parsed ATR of the last reset.
    pub fn atr(&self) -> Option<&Atr> {
        self.atr.as_ref()
    }

    /// The line speed now in force.
    pub fn baud(&self) -> u32 {
        self.baud
    }

    /// 0 or 1.
    pub fn protocol_number(&self) -> u8 {
        match self.protocol {
            Protocol::T0 { .. } => 0,
            Protocol::T1 { .. } => 1,
        }
    }

    /// T=1 counters, for tests.
    pub fn t1_stats(&self) -> Option<T1Stats> {
        match &self.protocol {
            Protocol::T1 { host, .. } => Some(host.stats()),
            Protocol::T0 { .. } => None,
        }
    }

    fn name(&self) -> String {
        self.cfg.name.clone()
    }

    fn io_err(&self, e: impl std::fmt::Display) -> ReaderError {
        ReaderError::Io {
            reader: self.name(),
            detail: format!("{}: {e}", self.cfg.path),
        }
    }

    fn protocol_err(&self, detail: impl std::fmt::Display) -> ReaderError {
        ReaderError::Protocol {
            reader: self.name(),
            detail: detail.to_string(),
        }
    }

    fn ended(&self) -> ReaderError {
        ended(&self.cfg.name)
    }

    /// One etu at the speed in force.
    fn etu(&self) -> Duration {
        Duration::from_secs_f64(1.0 / f64::from(self.baud.max(1)))
    }

    fn card_present(&mut self) -> Result<bool, ReaderError> {
        let lines = self.lines.clone().ok_or_else(|| self.ended())?;
        let r = self.cfg.lines.card_present(lock(&lines).as_mut());
        r.map_err(|e| self.io_err(format!("card detect: {e}")))
    }

    fn set_reset(&mut self, asserted: bool) -> Result<(), ReaderError> {
        let lines = self.lines.clone().ok_or_else(|| self.ended())?;
        let r = self.cfg.lines.set_reset(lock(&lines).as_mut(), asserted);
        r.map_err(|e| self.io_err(format!("reset line: {e}")))
    }

    /// After a timeout: a card pulled out is "removed", otherwise it is a timeout.
    fn timeout_or_removed(&mut self, waited: Duration) -> ReaderError {
        if self.cfg.lines.has_card_detect() && matches!(self.card_present(), Ok(false)) {
            return ReaderError::CardRemoved {
                reader: self.name(),
            };
        }
        ReaderError::Timeout {
            reader: self.name(),
            millis: waited.as_millis() as u64,
        }
    }

    fn wire_err(&mut self, e: WireError) -> ReaderError {
        match e {
            WireError::Timeout(waited) => self.timeout_or_removed(waited),
            WireError::Parity => ReaderError::Parity {
                reader: self.name(),
            },
            WireError::Io(e) => self.io_err(e),
        }
    }

    fn send_err(&mut self, e: SendError) -> ReaderError {
        match e {
            SendError::Wire(e) => self.wire_err(e),
            SendError::EchoMismatch { sent, got } => self.protocol_err(format!(
                "sent {sent:#04x} but the line echoed {got:#04x} — a card answering while we \
                 send, or a reader that does not echo (set echo = false)"
            )),
            SendError::NoEcho => self.protocol_err(
                "the reader did not echo our bytes — for a reader without echo set echo = false",
            ),
        }
    }

    async fn send(&mut self, values: &[u8], turnaround_etu: u64) -> Result<(), ReaderError> {
        let timing = SendTiming {
            etu: self.etu(),
            turnaround_etu,
            guard_etu: self.guard_etu,
            echo: self.cfg.echo,
            margin: self.cfg.os_margin,
        };
        let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        match wire.send(values, &timing).await {
            Ok(()) => Ok(()),
            Err(e) => Err(self.send_err(e)),
        }
    }

    async fn recv(&mut self, wait: Duration) -> Result<u8, ReaderError> {
        let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        match wire.recv(wait).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.wire_err(e)),
        }
    }

    /// Resets, reads the ATR, chooses protocol and speed, and applies every ATR parameter.
    /// A failed PPS costs one more reset; the card is then used at the default speed with the
    /// rest of its parameters. A specific-mode card whose speed cannot be met is warm-reset
    /// once if it says it can change mode, and refused otherwise.
    async fn reset_card(&mut self) -> Result<Vec<u8>, ReaderError> {
        let mut warm_resets = 0;
        loop {
            let atr = self.reset_and_read_atr().await?;
            let tty_ok = |baud: u32| self.tty_can(baud);
            let plan = match plan(&atr, &self.cfg, &tty_ok) {
                Ok(p) => p,
                Err(NoPlan::WarmReset(why)) if warm_resets == 0 => {
                    tracing::warn!(reader = %self.cfg.name, reason = %why, "warm reset to leave specific mode");
                    warm_resets += 1;
                    continue;
                }
                Err(NoPlan::WarmReset(why) | NoPlan::Refuse(why)) => {
                    let _ = self.set_reset(true);
                    return Err(ReaderError::BadAtr {
                        reader: self.name(),
                        detail: format!("{why} ({})", hex::encode_upper(atr.as_bytes())),
                    });
                }
            };
            if let Some(f) = plan.specific {
                self.apply_speed(f)?;
            }
            self.configure(&atr, plan.protocol);
            if let Some((protocol, pps1)) = plan.pps {
                match self.pps(protocol, pps1).await {
                    Ok(f) => {
                        self.apply_speed(f)?;
                        self.configure(&atr, protocol);
                    }
                    Err(e) => {
                        tracing::warn!(reader = %self.cfg.name, error = %e, "PPS failed; resetting and staying at the default speed");
                        self.speed_note = Some(format!("PPS failed ({e}); default speed"));
                        let atr = self.reset_and_read_atr().await?;
                        let default = atr.usable_protocol().unwrap_or(0);
                        self.configure(&atr, default);
                        return self.finish_reset(atr).await;
                    }
                }
            }
            return self.finish_reset(atr).await;
        }
    }

    /// Whether the tty can run at `baud` (termios2 read back within 2 %). Leaves the line at
    /// the speed in force.
    fn tty_can(&self, baud: u32) -> bool {
        let Some(wire) = self.wire.as_ref() else {
            return false;
        };
        // `SerialPort` setters need `&mut`; a clone of the termios calls is not needed: probe
        // on a duplicate descriptor (the same open file).
        let fd = wire.port.as_raw_fd();
        probe_baud(fd, baud, self.baud)
    }

    /// T=1 IFSD negotiation, logging, bookkeeping.
    async fn finish_reset(&mut self, atr: Atr) -> Result<Vec<u8>, ReaderError> {
        for w in &atr.warnings {
            tracing::warn!(reader = %self.cfg.name, atr = %hex::encode_upper(atr.as_bytes()), warning = %w, "ATR");
        }
        tracing::debug!(reader = %self.cfg.name, atr = %hex::encode_upper(atr.as_bytes()), baud = self.baud, protocol = self.protocol_number(), guard_etu = self.guard_etu, "card reset");
        let bytes = atr.as_bytes().to_vec();
        self.driver.shared().last_atr = Some(bytes.clone());
        self.atr = Some(atr);
        if let Protocol::T1 { host, .. } = &mut self.protocol {
            let first = host.negotiate_ifsd(self.cfg.ifsd);
            if let Err(e) = self.t1_exchange(first).await {
                tracing::warn!(reader = %self.cfg.name, error = %e, "the card did not take our IFSD; staying at 32");
            }
        }
        Ok(bytes)
    }

    /// Applies the ATR's parameters at the speed in force: guard time, waiting times, and
    /// the protocol engine.
    fn configure(&mut self, atr: &Atr, protocol: u8) {
        let n = atr.extra_guard_time();
        // 255: the minimum character distance, which the 8E2 framing already gives.
        let tc1 = if n == 255 { 0 } else { n };
        self.guard_etu = tc1.max(self.cfg.guard_etu);
        let margin = self.cfg.os_margin;
        self.protocol = if protocol == 1 {
            let p = atr.t1_params();
            let etu = self.etu();
            let bwt =
                etu * 11 + FiDi::DEFAULT.etus(960u64 << p.bwi.min(9), self.cfg.clock_hz) + margin;
            let cwt = etu * (11 + (1u32 << p.cwi.min(15))) + margin;
            Protocol::T1 {
                host: Box::new(T1Host::new(&p)),
                bwt,
                cwt,
            }
        } else {
            Protocol::T0 {
                wwt: atr.work_waiting_time(self.fi_di.fi, self.cfg.clock_hz) + margin,
            }
        };
    }

    async fn reset_and_read_atr(&mut self) -> Result<Atr, ReaderError> {
        if !self.card_present()? {
            return Err(ReaderError::NoCard {
                reader: self.name(),
            });
        }
        self.atr = None;
        self.fi_di = FiDi::DEFAULT;
        self.guard_etu = 0;
        self.baud = self.cfg.initial_baud();
        let baud = self.baud;
        {
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            wire.convention = Convention::Direct;
            wire.card_rx_at = None;
            let r = wire
                .port
                .set_baud_rate(baud)
                .and_then(|()| wire.port.set_parity(Parity::Even));
            r.map_err(|e| self.io_err(format!("line settings: {e}")))?;
        }
        self.set_reset(true)?;
        tokio::time::sleep(self.cfg.reset_hold).await;
        {
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            let r = wire.flush_input();
            r.map_err(|e| self.io_err(format!("flush: {e}")))?;
        }
        self.set_reset(false)?;

        let margin = self.cfg.os_margin;
        let wait = Atr::initial_waiting_time(self.cfg.clock_hz) + margin;
        let quiet = FiDi::DEFAULT.etus(ATR_QUIET_ETU, self.cfg.clock_hz) + margin;
        let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        // TS: a parity error is tolerated here, because an inverse-convention TS (0x03 on a
        // direct UART) fails even parity; TS itself tells us which parity to use next.
        let ts = match wire.recv_raw(wait).await {
            Ok(RxByte::Ok(b) | RxByte::ParityError(b)) => b,
            Err(WireError::Timeout(_)) => {
                tracing::warn!(reader = %self.cfg.name, waited_ms = wait.as_millis() as u64, "no ATR");
                return Err(ReaderError::Mute {
                    reader: self.name(),
                });
            }
            Err(e) => return Err(self.wire_err(e)),
        };
        let mut values = match ts {
            0x3B => vec![0x3B],
            RAW_INVERSE_TS => {
                wire.convention = Convention::Inverse;
                // Even parity over the values is odd parity on a direct UART.
                let r = wire.port.set_parity(Parity::Odd);
                r.map_err(|e| self.io_err(format!("line settings: {e}")))?;
                vec![0x3F]
            }
            other => {
                return Err(ReaderError::BadAtr {
                    reader: self.name(),
                    detail: format!(
                        "first byte {other:#04x} is not a TS (3B or 03 on the line) — check the \
                         clock and speed settings, and the reset polarity (profile)"
                    ),
                });
            }
        };
        // Read until the line goes quiet: the ATR's announced bytes within the waiting time
        // each, then the TCK and anything trailing within the quiet time.
        let mut parity_errors = 0;
        while values.len() < MAX_LINE_BYTES {
            let patience = match atr::progress(&values) {
                Ok(Progress::Interface) => wait,
                Ok(Progress::Body {
                    total,
                    tck_required,
                }) => {
                    let hist_done = values.len() + usize::from(tck_required) >= total;
                    if hist_done { quiet } else { wait }
                }
                Err(_) => break,
            };
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            match wire.recv_raw(patience).await {
                Ok(RxByte::Ok(b)) => values.push(wire.convention.decode(b)),
                Ok(RxByte::ParityError(b)) => {
                    parity_errors += 1;
                    values.push(wire.convention.decode(b));
                }
                Err(WireError::Timeout(_)) => break,
                Err(e) => return Err(self.wire_err(e)),
            }
        }
        if values.len() >= MAX_LINE_BYTES {
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            let _ = wire.flush_input();
        }
        if parity_errors > 0 {
            tracing::warn!(reader = %self.cfg.name, parity_errors, "parity errors in the ATR");
        }
        atr::accept(&values).map_err(|e| ReaderError::BadAtr {
            reader: self.name(),
            detail: format!("{e} (received {})", hex::encode_upper(&values)),
        })
    }

    /// PPS: asks for `protocol` and Fi/Di `pps1`; the Fi/Di now in force.
    async fn pps(&mut self, protocol: u8, pps1: Option<u8>) -> Result<FiDi, ReaderError> {
        let mut pps = PpsExchange::new(protocol, pps1);
        let request = pps.request().to_vec();
        self.send(&request, TURNAROUND_ETU).await?;
        let wait = Atr::initial_waiting_time(self.cfg.clock_hz) + self.cfg.os_margin;
        // A PPS response is at most 6 bytes; the engine says Done by then.
        for _ in 0..6 {
            let b = self.recv(wait).await?;
            match pps.on_byte(b) {
                PpsStep::Receive => {}
                PpsStep::Done(Ok(outcome)) => {
                    tracing::debug!(reader = %self.cfg.name, pps1 = ?outcome.pps1, "PPS accepted");
                    return Ok(outcome.fi_di);
                }
                PpsStep::Done(Err(e)) => return Err(self.protocol_err(format!("PPS: {e}"))),
            }
        }
        Err(self.protocol_err("PPS response too long"))
    }

    /// Switches the line to `fi_di` and checks the tty took it.
    fn apply_speed(&mut self, fi_di: FiDi) -> Result<(), ReaderError> {
        let baud = fi_di.baud(self.cfg.clock_hz);
        let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        let set = wire.port.set_baud_rate(baud);
        let actual = wire.port.baud_rate();
        match (set, actual) {
            (Ok(()), Ok(actual)) if within(actual, baud) => {
                self.fi_di = fi_di;
                self.baud = baud;
                Ok(())
            }
            (set, actual) => Err(ReaderError::Protocol {
                reader: self.name(),
                detail: format!(
                    "cannot run the line at {baud} baud ({:?}, tty reports {:?}) — the card and \
                     the reader would talk at different speeds",
                    set.err().map(|e| e.to_string()),
                    actual.map_err(|e| e.to_string())
                ),
            }),
        }
    }

    async fn transmit(&mut self, apdu: &[u8]) -> Result<Vec<u8>, ReaderError> {
        if self.atr.is_none() {
            return Err(self.ended());
        }
        if !self.card_present()? {
            return Err(ReaderError::CardRemoved {
                reader: self.name(),
            });
        }
        match &mut self.protocol {
            Protocol::T0 { wwt } => {
                let wwt = *wwt;
                self.transmit_t0(apdu, wwt).await
            }
            Protocol::T1 { host, .. } => {
                let first = host
                    .start(apdu)
                    .map_err(|e| self.protocol_err(format!("T=1: {e}")))?;
                self.t1_exchange(first).await
            }
        }
    }

    async fn transmit_t0(&mut self, apdu: &[u8], wwt: Duration) -> Result<Vec<u8>, ReaderError> {
        let mut ex = T0Exchange::new(apdu)
            .map_err(|e| self.protocol_err(format!("cannot send APDU: {e}")))?;
        self.send(&ex.header(), TURNAROUND_ETU).await?;
        // Each byte within the work waiting time; a NULL restarts it. The engine ends after
        // the status word or on the first byte out of place.
        loop {
            let b = self.recv(wwt).await?;
            match ex.on_byte(b) {
                Ok(T0Step::Receive) => {}
                Ok(T0Step::Send(data)) => self.send(&data, TURNAROUND_ETU).await?,
                Ok(T0Step::Done(resp)) => {
                    tracing::trace!(reader = %self.cfg.name, nulls = ex.nulls(), len = resp.len(), "T=0 response");
                    return Ok(resp);
                }
                Err(e) => return Err(self.protocol_err(format!("T=0: {e}"))),
            }
        }
    }

    /// Runs a T=1 exchange from its first block to the response.
    async fn t1_exchange(&mut self, first: Vec<u8>) -> Result<Vec<u8>, ReaderError> {
        let mut block = first;
        loop {
            self.send(&block, BGT_ETU).await?;
            let (bwt, cwt, edc, factor) = match &self.protocol {
                Protocol::T1 { host, bwt, cwt } => (*bwt, *cwt, host.edc(), host.wait_factor()),
                Protocol::T0 { .. } => return Err(self.protocol_err("not in T=1")),
            };
            let margin = self.cfg.os_margin;
            let first_wait = (bwt - margin) * factor + margin;
            let received = self.recv_block(first_wait, cwt, edc).await?;
            let Protocol::T1 { host, .. } = &mut self.protocol else {
                return Err(self.protocol_err("not in T=1"));
            };
            let step = match received {
                RxBlock::Whole(raw) => host.on_block(&raw),
                RxBlock::Damaged { parity } => host.on_bad_block(parity),
                RxBlock::Nothing => host.on_timeout(),
            };
            match step {
                Ok(T1Step::Send(b)) => block = b,
                Ok(T1Step::Done(resp)) => return Ok(resp),
                Err(e) => return Err(self.protocol_err(format!("T=1: {e}"))),
            }
        }
    }

    /// One block off the line: the first character within `first_wait`, the rest each within
    /// the character waiting time.
    async fn recv_block(
        &mut self,
        first_wait: Duration,
        cwt: Duration,
        edc: atr::Edc,
    ) -> Result<RxBlock, ReaderError> {
        let mut reader = BlockReader::new(edc);
        let mut parity = false;
        let mut wait = first_wait;
        loop {
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            let b = match wire.recv_raw(wait).await {
                Ok(RxByte::Ok(b)) => wire.convention.decode(b),
                Ok(RxByte::ParityError(b)) => {
                    parity = true;
                    wire.convention.decode(b)
                }
                Err(WireError::Timeout(waited)) if reader.is_empty() => {
                    if self.cfg.lines.has_card_detect() && matches!(self.card_present(), Ok(false))
                    {
                        return Err(self.timeout_or_removed(waited));
                    }
                    return Ok(RxBlock::Nothing);
                }
                // The card stopped in the middle of a block.
                Err(WireError::Timeout(_)) => return Ok(RxBlock::Damaged { parity }),
                Err(e) => return Err(self.wire_err(e)),
            };
            wait = cwt;
            if reader.push(b) {
                return Ok(if parity {
                    RxBlock::Damaged { parity }
                } else {
                    RxBlock::Whole(reader.bytes().to_vec())
                });
            }
        }
    }
}

enum RxBlock {
    Whole(Vec<u8>),
    Damaged { parity: bool },
    Nothing,
}

/// Within 2 % (what UARTs and cards tolerate).
fn within(actual: u32, wanted: u32) -> bool {
    let (a, w) = (f64::from(actual), f64::from(wanted.max(1)));
    ((a - w) / w).abs() <= 0.02
}

/// Sets `baud` through termios2 (BOTHER), reads back what the driver made of it, and restores
/// `restore`.
fn probe_baud(fd: i32, baud: u32, restore: u32) -> bool {
    fn set(fd: i32, baud: u32) -> Option<u32> {
        // SAFETY: TCGETS2/TCSETS2 on a tty fd we own, with a zeroed termios2 they fill in.
        unsafe {
            let mut t: libc::termios2 = std::mem::zeroed();
            if libc::ioctl(fd, libc::TCGETS2, &mut t) != 0 {
                return None;
            }
            t.c_cflag &= !(libc::CBAUD | libc::CIBAUD);
            t.c_cflag |= libc::BOTHER;
            t.c_ispeed = baud;
            t.c_ospeed = baud;
            if libc::ioctl(fd, libc::TCSETS2, &t) != 0 {
                return None;
            }
            let mut back: libc::termios2 = std::mem::zeroed();
            if libc::ioctl(fd, libc::TCGETS2, &mut back) != 0 {
                return None;
            }
            Some(back.c_ospeed)
        }
    }
    let ok = set(fd, baud).is_some_and(|actual| within(actual, baud));
    let _ = set(fd, restore);
    ok
}

impl CardSession for SerialSession {
    fn reader(&self) -> &str {
        &self.cfg.name
    }

    fn reset(&mut self) -> BoxFuture<'_, Result<Vec<u8>, ReaderError>> {
        Box::pin(async move {
            if self.wire.is_none() {
                return Err(self.ended());
            }
            self.reset_card().await
        })
    }

    fn transmit_raw<'a>(
        &'a mut self,
        apdu: &'a [u8],
    ) -> BoxFuture<'a, Result<Vec<u8>, ReaderError>> {
        Box::pin(self.transmit(apdu))
    }

    fn power_down(&mut self) -> BoxFuture<'_, Result<(), ReaderError>> {
        Box::pin(async move {
            // A Phoenix reader cannot cut the card's power: holding reset is the nearest.
            let r = if self.lines.is_some() {
                self.set_reset(true)
            } else {
                Ok(())
            };
            self.atr = None;
            // Give the port back to the driver (Drop does it).
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        s.split_whitespace()
            .map(|b| u8::from_str_radix(b, 16).unwrap())
            .collect()
    }

    fn cfg() -> SerialConfig {
        SerialConfig::new("r", "/dev/null")
    }

    #[test]
    fn nds_specific_mode_runs_at_153600_or_is_refused() {
        // TA1 = 15 (Fi 372, Di 16), TD1 → TA2 = 80: specific mode T=0, cannot change.
        let atr = Atr::parse(&hex("3B 90 15 10 80")).unwrap();
        let p = plan(&atr, &cfg(), &|_| true).unwrap();
        assert_eq!(p.specific.unwrap().baud(3_571_200), 153_600);
        let mut slow = cfg();
        slow.max_baud = 115_200;
        let Err(NoPlan::Refuse(why)) = plan(&atr, &slow, &|_| true) else {
            panic!()
        };
        assert!(why.contains("153600") && why.contains("max_baud"), "{why}");
        let Err(NoPlan::Refuse(why)) = plan(&atr, &cfg(), &|_| false) else {
            panic!()
        };
        assert!(why.contains("tty cannot"), "{why}");
        // A card that can change mode gets a warm reset instead.
        let atr = Atr::parse(&hex("3B 90 15 10 00")).unwrap();
        assert!(matches!(
            plan(&atr, &slow, &|_| true),
            Err(NoPlan::WarmReset(_))
        ));
    }

    #[test]
    fn pps_to_the_fastest_speed_the_line_allows() {
        // TA1 = 18: Di 12 → 115200.
        let atr = Atr::parse(&hex("3B 10 18")).unwrap();
        assert_eq!(
            plan(&atr, &cfg(), &|_| true).unwrap().pps,
            Some((0, Some(0x18)))
        );
        let mut c = cfg();
        c.max_baud = 40_000;
        // Di 4 → 38400 is the fastest under 40000.
        assert_eq!(
            plan(&atr, &c, &|_| true).unwrap().pps,
            Some((0, Some(0x13)))
        );
        c.pps = PpsPolicy::Off;
        assert_eq!(plan(&atr, &c, &|_| true).unwrap().pps, None);
    }

    #[test]
    fn t1_only_card_gets_t1() {
        let atr = Atr::parse(&hex("3B 80 81 31 FE 45 00")).unwrap_or_else(|e| panic!("{e}"));
        let p = plan(&atr, &cfg(), &|_| true).unwrap();
        assert_eq!((p.protocol, p.pps), (1, None));
    }

    #[test]
    fn baud_tolerance() {
        assert!(within(153_600, 153_600));
        assert!(within(151_000, 153_600));
        assert!(!within(115_200, 153_600));
    }
}
