//! The thin tokio shell: a [`ReaderDriver`] for one Phoenix/Smartmouse reader on a serial
//! port, and its [`CardSession`]. It owns the IO and every wait; the protocol decisions are
//! in [`super::atr`] and [`super::t0`].
//!
//! Every wait is bounded: the ATR by the initial waiting time, each T=0 byte by the work
//! waiting time from the ATR, NULL bytes by a count, echoes by the character time. A margin
//! ([`SerialConfig::os_margin`]) covers scheduling and USB-serial latency on top of the ISO
//! times. Parity errors are seen through PARMRK ([`super::wire`]).

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_serial::{
    ClearBuffer, DataBits, FlowControl, Parity, SerialPort, SerialStream, StopBits,
};

use super::atr::{Atr, AtrError, Convention, FiDi, MAX_ATR_LEN, RAW_INVERSE_TS};
use super::line::{LineConfig, LineControl, SerialLines};
use super::t0::{PpsExchange, PpsStep, T0Exchange, T0Step};
use super::wire::{ParmrkDecoder, RxByte};
use crate::api::{
    BoxFuture, CardPresence, CardSession, ReaderDriver, ReaderError, ReaderEvent, ReaderInfo,
};

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
    /// Phoenix readers echo every byte sent (single-wire I/O); some Smartmouse clones do not.
    pub echo: bool,
    /// Negotiate a faster speed by PPS when TA1 offers one.
    pub pps: bool,
    /// Never go faster than this (what the UART and the cable manage).
    pub max_baud: u32,
    /// NULL procedure bytes accepted per command before giving up.
    pub max_null_bytes: u32,
    /// Added to every ISO waiting time for OS and USB-serial latency.
    pub os_margin: Duration,
    /// How long reset is held asserted.
    pub reset_hold: Duration,
    /// How often the event watcher polls the card-detect line.
    pub poll_interval: Duration,
}

impl SerialConfig {
    pub fn new(name: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            path: path.into(),
            clock_hz: 3_571_200,
            baud: None,
            lines: LineConfig::default(),
            echo: true,
            pps: true,
            max_baud: 115_200,
            max_null_bytes: 100,
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

/// Makes the pin interface for an open port. The default duplicates the port handle
/// ([`SerialLines`]); pty tests substitute the emulator's.
pub type LinesFactory =
    Arc<dyn Fn(&SerialStream) -> io::Result<Box<dyn LineControl>> + Send + Sync>;

#[derive(Debug, Default)]
struct Shared {
    /// A session holds the port.
    busy: bool,
    last_atr: Option<Vec<u8>>,
}

/// A Phoenix/Smartmouse reader on a serial port.
#[derive(Clone)]
pub struct SerialDriver {
    config: Arc<SerialConfig>,
    lines: LinesFactory,
    shared: Arc<Mutex<Shared>>,
}

impl SerialDriver {
    /// A driver using the port's own modem-control pins.
    pub fn new(config: SerialConfig) -> Self {
        Self::with_lines(
            config,
            Arc::new(|port: &SerialStream| {
                let clone = port.try_clone().map_err(io::Error::from)?;
                Ok(Box::new(SerialLines::new(clone)) as Box<dyn LineControl>)
            }),
        )
    }

    /// A driver whose reset and card detect go through `lines` (the test seam for ptys).
    pub fn with_lines(config: SerialConfig, lines: LinesFactory) -> Self {
        Self {
            config: Arc::new(config),
            lines,
            shared: Arc::default(),
        }
    }

    pub fn config(&self) -> &SerialConfig {
        &self.config
    }

    fn io_err(&self, what: &str, e: impl std::fmt::Display) -> ReaderError {
        ReaderError::Io {
            reader: self.config.name.clone(),
            detail: format!("{what} {}: {e}", self.config.path),
        }
    }

    fn open_port(&self) -> Result<(SerialStream, Box<dyn LineControl>), ReaderError> {
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
        let lines = (self.lines)(&port).map_err(|e| self.io_err("no modem-control lines on", e))?;
        Ok((port, lines))
    }

    /// Opens the port, resets the card and reads its ATR.
    async fn open_session(&self) -> Result<(SerialSession, Vec<u8>), ReaderError> {
        {
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if shared.busy {
                return Err(ReaderError::InUse {
                    reader: self.config.name.clone(),
                });
            }
            shared.busy = true;
        }
        // From here the session's Drop clears `busy`, whatever fails.
        let mut session = SerialSession {
            cfg: self.config.clone(),
            shared: self.shared.clone(),
            wire: None,
            lines: None,
            atr: None,
            fi_di: FiDi::DEFAULT,
            wwt: Duration::ZERO,
            guard: Duration::ZERO,
        };
        let (port, lines) = self.open_port()?;
        session.wire = Some(Wire::new(port));
        session.lines = Some(lines);
        let atr = session.reset_card().await?;
        Ok((session, atr))
    }

    /// Card presence without disturbing a session that holds the port.
    fn probe(&self) -> Result<CardPresence, ReaderError> {
        let last_atr = {
            let shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            if shared.busy {
                return Ok(CardPresence::Present {
                    atr: shared.last_atr.clone().unwrap_or_default(),
                });
            }
            shared.last_atr.clone().unwrap_or_default()
        };
        let (_port, mut lines) = self.open_port()?;
        let present = self
            .config
            .lines
            .card_present(lines.as_mut())
            .map_err(|e| self.io_err("cannot read card detect on", e))?;
        Ok(if present {
            CardPresence::Present { atr: last_atr }
        } else {
            CardPresence::Absent
        })
    }

    fn attached(&self) -> bool {
        std::path::Path::new(&self.config.path).exists()
    }
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
                    if present {
                        events.push(ReaderEvent::CardRemoved {
                            reader: name.clone(),
                        });
                        present = false;
                    }
                    events.push(ReaderEvent::ReaderDetached {
                        reader: name.clone(),
                    });
                }
                attached = now_attached;
            }
            if attached {
                match self.probe() {
                    Ok(CardPresence::Absent) if present => {
                        present = false;
                        events.push(ReaderEvent::CardRemoved {
                            reader: name.clone(),
                        });
                    }
                    Ok(CardPresence::Present { .. }) if !present => {
                        present = true;
                        // Read the ATR when nobody holds the card; a mute card is reported
                        // with an empty ATR.
                        let atr = match self.open_session().await {
                            Ok((mut session, atr)) => {
                                let _ = session.power_down().await;
                                atr
                            }
                            Err(e) => {
                                tracing::warn!(reader = %name, error = %e, "no ATR on insertion");
                                Vec::new()
                            }
                        };
                        events.push(ReaderEvent::CardInserted {
                            reader: name.clone(),
                            atr,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::debug!(reader = %name, error = %e, "card detect probe failed")
                    }
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

/// A failure on the line, before it is given a reader name and a meaning.
#[derive(Debug)]
enum WireError {
    Timeout(Duration),
    Parity,
    Io(io::Error),
}

/// The byte stream: PARMRK decoding, convention, echo.
struct Wire {
    port: SerialStream,
    decoder: ParmrkDecoder,
    rx: VecDeque<RxByte>,
    convention: Convention,
}

impl Wire {
    fn new(port: SerialStream) -> Self {
        Self {
            port,
            decoder: ParmrkDecoder::default(),
            rx: VecDeque::new(),
            convention: Convention::Direct,
        }
    }

    /// The next character as the UART read it, within `wait`.
    async fn recv_raw(&mut self, wait: Duration) -> Result<RxByte, WireError> {
        let deadline = Instant::now() + wait;
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

    /// The next character's value in the card's convention.
    async fn recv(&mut self, wait: Duration) -> Result<u8, WireError> {
        match self.recv_raw(wait).await? {
            RxByte::Ok(b) => Ok(self.convention.decode(b)),
            RxByte::ParityError(_) => Err(WireError::Parity),
        }
    }

    /// Sends values and, on an echoing reader, reads each one back.
    async fn send(
        &mut self,
        values: &[u8],
        echo: bool,
        char_time: Duration,
        guard: Duration,
        margin: Duration,
    ) -> Result<(), SendError> {
        let raw: Vec<u8> = values.iter().map(|&v| self.convention.encode(v)).collect();
        if guard.is_zero() {
            self.port.write_all(&raw).await.map_err(WireError::Io)?;
        } else {
            // Extra guard time (TC1): the UART cannot stretch stop bits, so pace by hand.
            for b in &raw {
                self.port.write_all(&[*b]).await.map_err(WireError::Io)?;
                tokio::time::sleep(guard).await;
            }
        }
        self.port.flush().await.map_err(WireError::Io)?;
        if echo {
            let wait = char_time * (raw.len() as u32 + 1) + margin;
            for &sent in &raw {
                match self.recv_raw(wait).await {
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

/// A powered card in a serial reader.
pub struct SerialSession {
    cfg: Arc<SerialConfig>,
    shared: Arc<Mutex<Shared>>,
    wire: Option<Wire>,
    lines: Option<Box<dyn LineControl>>,
    atr: Option<Atr>,
    /// Fi/Di in force (after PPS or specific mode).
    fi_di: FiDi,
    /// Work waiting time plus margin.
    wwt: Duration,
    /// Extra guard time between our characters.
    guard: Duration,
}

impl Drop for SerialSession {
    fn drop(&mut self) {
        self.shared.lock().unwrap_or_else(|p| p.into_inner()).busy = false;
    }
}

impl SerialSession {
    /// The parsed ATR of the last reset.
    pub fn atr(&self) -> Option<&Atr> {
        self.atr.as_ref()
    }

    /// The line speed now in force.
    pub fn baud(&self) -> u32 {
        if self.fi_di == FiDi::DEFAULT {
            self.cfg.initial_baud()
        } else {
            self.fi_di.baud(self.cfg.clock_hz)
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

    /// One character time (12 etu: start, 8 data, parity, 2 stop/guard) at the current speed.
    fn char_time(&self) -> Duration {
        Duration::from_secs_f64(12.0 / f64::from(self.baud().max(1)))
    }

    fn card_present(&mut self) -> Result<bool, ReaderError> {
        let cfg = self.cfg.clone();
        let lines = self.lines.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        cfg.lines
            .card_present(lines.as_mut())
            .map_err(|e| self.io_err(format!("card detect: {e}")))
    }

    fn set_reset(&mut self, asserted: bool) -> Result<(), ReaderError> {
        let cfg = self.cfg.clone();
        let lines = self.lines.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        cfg.lines
            .set_reset(lines.as_mut(), asserted)
            .map_err(|e| self.io_err(format!("reset line: {e}")))
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

    async fn send(&mut self, values: &[u8]) -> Result<(), ReaderError> {
        let (echo, char_time, guard, margin) = (
            self.cfg.echo,
            self.char_time(),
            self.guard,
            self.cfg.os_margin,
        );
        let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        match wire.send(values, echo, char_time, guard, margin).await {
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

    /// Resets to the initial line settings, pulses reset, reads and applies the ATR; then
    /// raises the speed by PPS when offered. A failed PPS costs one more reset, no more.
    async fn reset_card(&mut self) -> Result<Vec<u8>, ReaderError> {
        let atr = self.reset_and_read_atr().await?;
        if let Err(e) = self.negotiate(&atr).await {
            tracing::warn!(reader = %self.cfg.name, error = %e, "PPS failed; resetting at the default speed");
            let atr = self.reset_and_read_atr().await?;
            self.finish_reset(atr.clone());
            return Ok(atr.as_bytes().to_vec());
        }
        let bytes = atr.as_bytes().to_vec();
        self.finish_reset(atr);
        Ok(bytes)
    }

    fn finish_reset(&mut self, atr: Atr) {
        tracing::debug!(reader = %self.cfg.name, atr = %hex::encode_upper(atr.as_bytes()), baud = self.baud(), "card reset");
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last_atr = Some(atr.as_bytes().to_vec());
        self.atr = Some(atr);
    }

    async fn reset_and_read_atr(&mut self) -> Result<Atr, ReaderError> {
        if !self.card_present()? {
            return Err(ReaderError::NoCard {
                reader: self.name(),
            });
        }
        self.atr = None;
        self.fi_di = FiDi::DEFAULT;
        self.guard = Duration::ZERO;
        let baud = self.cfg.initial_baud();
        {
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            wire.convention = Convention::Direct;
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

        let wait = Atr::initial_waiting_time(self.cfg.clock_hz) + self.cfg.os_margin;
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
                         clock and speed settings"
                    ),
                });
            }
        };
        loop {
            match Atr::parse(&values) {
                Ok(atr) => return Ok(atr),
                Err(AtrError::Truncated { .. }) if values.len() < MAX_ATR_LEN => {}
                Err(e) => {
                    return Err(ReaderError::BadAtr {
                        reader: self.name(),
                        detail: format!("{e} (received {})", hex::encode_upper(&values)),
                    });
                }
            }
            let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
            match wire.recv(wait).await {
                Ok(b) => values.push(b),
                Err(WireError::Timeout(_)) => {
                    return Err(ReaderError::BadAtr {
                        reader: self.name(),
                        detail: format!(
                            "ATR stopped after {} bytes ({}) — reinsert the card",
                            values.len(),
                            hex::encode_upper(&values)
                        ),
                    });
                }
                Err(e) => return Err(self.wire_err(e)),
            }
        }
    }

    /// Applies the ATR's parameters: T=0 check, waiting time, guard time, speed.
    async fn negotiate(&mut self, atr: &Atr) -> Result<(), ReaderError> {
        if !atr.protocols().contains(&0) {
            return Err(self.protocol_err(format!(
                "card offers only T={:?}; this reader driver speaks T=0",
                atr.protocols()
            )));
        }
        self.wwt = atr.work_waiting_time(self.cfg.clock_hz) + self.cfg.os_margin;
        let n = atr.extra_guard_time();
        self.guard = if n == 0 || n == 255 {
            Duration::ZERO
        } else {
            FiDi::DEFAULT.etus(u64::from(n), self.cfg.clock_hz)
        };
        let Some(offered) = atr.offered_fi_di() else {
            return Ok(());
        };
        if offered == FiDi::DEFAULT || (offered.fi, offered.di) == (372, 1) {
            return Ok(());
        }
        let target = offered.baud(self.cfg.clock_hz);
        if target > self.cfg.max_baud || self.cfg.clock_hz > offered.fmax_hz {
            tracing::debug!(reader = %self.cfg.name, target, max = self.cfg.max_baud, "offered speed out of range; staying at default");
            return Ok(());
        }
        match atr.specific_mode() {
            // Specific mode: TA1's parameters apply at once (unless implicit), no PPS.
            Some(mode) if mode.implicit_parameters => return Ok(()),
            Some(_) => return self.apply_speed(offered),
            None if !self.cfg.pps => return Ok(()),
            None => {}
        }
        let Some(ta1) = atr.ta1() else {
            return Ok(());
        };
        let mut pps = PpsExchange::new(0, ta1);
        let request = pps.request().to_vec();
        self.send(&request).await?;
        let wait = Atr::initial_waiting_time(self.cfg.clock_hz) + self.cfg.os_margin;
        // A PPS response is at most 6 bytes; the engine says Done by then.
        for _ in 0..6 {
            let b = self.recv(wait).await?;
            match pps.on_byte(b) {
                PpsStep::Receive => {}
                PpsStep::Done(Ok(outcome)) => {
                    tracing::debug!(reader = %self.cfg.name, pps1 = ?outcome.pps1, "PPS accepted");
                    return self.apply_speed(outcome.fi_di);
                }
                PpsStep::Done(Err(e)) => return Err(self.protocol_err(format!("PPS: {e}"))),
            }
        }
        Err(self.protocol_err("PPS response too long"))
    }

    fn apply_speed(&mut self, fi_di: FiDi) -> Result<(), ReaderError> {
        self.fi_di = fi_di;
        let baud = self.baud();
        let wire = self.wire.as_mut().ok_or_else(|| ended(&self.cfg.name))?;
        let r = wire.port.set_baud_rate(baud);
        r.map_err(|e| self.io_err(format!("cannot set {baud} baud: {e}")))
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
        let mut ex = T0Exchange::new(apdu, self.cfg.max_null_bytes)
            .map_err(|e| self.protocol_err(format!("cannot send APDU: {e}")))?;
        self.send(&ex.header()).await?;
        // Bounded: every round consumes a byte, and the engine ends after the status word,
        // after `max_null_bytes` NULLs, or on the first byte out of place.
        loop {
            let b = self.recv(self.wwt).await?;
            match ex.on_byte(b) {
                Ok(T0Step::Receive) => {}
                Ok(T0Step::Send(data)) => self.send(&data).await?,
                Ok(T0Step::Done(resp)) => {
                    tracing::trace!(reader = %self.cfg.name, nulls = ex.nulls(), len = resp.len(), "T=0 response");
                    return Ok(resp);
                }
                Err(e) => return Err(self.protocol_err(format!("T=0: {e}"))),
            }
        }
    }
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
            self.wire = None;
            self.lines = None;
            r
        })
    }
}
