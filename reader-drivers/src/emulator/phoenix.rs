//! A Phoenix reader with a card in it, on a real pty, for the serial driver's tests and
//! benchmark. It drives any [`CardApplication`] and plays the card side of ISO 7816-3: the
//! ATR on reset (direct or inverse convention), PPS, T=0 procedure bytes (ACK, byte-at-a-time
//! ACK, NULL, `61xx` when response data is pending, `6Cxx` on a wrong Le), and echoes every
//! byte the host sends as a real Phoenix does. Fault modes: a mute card, a card that goes
//! silent on a given INS.
//!
//! Output is paced at the line speed (12 bits a character for 8E2; the speed follows PPS),
//! because a pty delivers bytes instantly and timings would otherwise mean nothing.
//!
//! Test seam: Linux ptys refuse modem-control ioctls, so RTS/DTR (reset) and CD/DSR/CTS/RI
//! (card detect) go through [`EmulatorLines`], an in-process [`LineControl`] that signals the
//! emulator thread directly. Only the pins are simulated; every data byte crosses the pty.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proto::apdu::CardApplication;

use crate::serial::LinesFactory;
use crate::serial::atr::{Atr, Convention, FiDi};
use crate::serial::line::{CardDetect, InputLine, LineConfig, LineControl, OutputLine};

/// How the emulated reader and card behave.
#[derive(Debug, Clone)]
pub struct PhoenixConfig {
    /// The ATR as values (3B… or 3F…); `None` takes the application's.
    pub atr: Option<Vec<u8>>,
    /// Card clock; with Fi/Di it gives the line speed (3.5712 MHz → 9600 baud).
    pub clock_hz: u32,
    /// Pace output at the line speed.
    pub pace: bool,
    /// Echo the host's bytes (Phoenix); off for readers without echo.
    pub echo: bool,
    /// How reset and card detect are wired (must match the driver's).
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
            wiring: LineConfig::default(),
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
    /// Takes the header of a command with this INS and then says nothing.
    SilentOnIns(u8),
}

/// What the emulator saw, for tests to check.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub resets: u32,
    pub commands: u32,
    pub get_responses: u32,
    pub wrong_le: u32,
    pub nulls_sent: u32,
    /// PPS1 agreed on in the last PPS exchange.
    pub pps1: Option<u8>,
    /// Bytes on the line in both directions (host → card, card → host), echoes not counted.
    pub host_bytes: u64,
    pub card_bytes: u64,
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
}

#[derive(Debug)]
struct Knobs {
    card_present: bool,
    fault: Fault,
    nulls_before_procedure: u8,
    ack_byte_by_byte: bool,
    stats: Stats,
}

enum Msg {
    Reset {
        asserted: bool,
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
}

impl PhoenixEmulator {
    pub fn start(app: Box<dyn CardApplication>, config: PhoenixConfig) -> io::Result<Self> {
        let (master, slave) = open_pty()?;
        let path = pty_name(&master)?;
        let master = Arc::new(master);
        let knobs = Arc::new(Mutex::new(Knobs {
            card_present: true,
            fault: Fault::None,
            nulls_before_procedure: 0,
            ack_byte_by_byte: false,
            stats: Stats::default(),
        }));
        let (ctl, rx) = mpsc::channel();
        let wiring = config.wiring;
        let atr = config.atr.clone().unwrap_or_else(|| app.atr());
        let parsed =
            Atr::parse(&atr).map_err(|e| io::Error::other(format!("emulator ATR: {e}")))?;
        let mut card = CardSide {
            app,
            config,
            atr,
            convention: parsed.convention,
            ta1: parsed.ta1(),
            master: master.clone(),
            knobs: knobs.clone(),
            phase: Phase::Held,
            pending: None,
            baud: 0,
            next_slot: Instant::now(),
        };
        card.baud = FiDi::DEFAULT.baud(card.config.clock_hz);
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
        })
    }

    /// The pty slave the driver opens (e.g. `/dev/pts/7`).
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The pins of this reader.
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

    /// The termios of the slave as the driver configured it. Termios requests on a pty
    /// master act on its slave, so this shows what the driver asked the "UART" for.
    pub fn line_settings(&self) -> io::Result<LineSettings> {
        // SAFETY: tcgetattr fills a zeroed termios for an fd we own.
        let t = unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(self.master.as_raw_fd(), &mut t) != 0 {
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
        })
    }
}

impl Drop for PhoenixEmulator {
    fn drop(&mut self) {
        let _ = self.ctl.send(Msg::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The emulated reader's modem-control pins (test seam; see the module docs).
pub struct EmulatorLines {
    ctl: mpsc::Sender<Msg>,
    knobs: Arc<Mutex<Knobs>>,
    wiring: LineConfig,
}

impl LineControl for EmulatorLines {
    fn write_line(&mut self, line: OutputLine, level: bool) -> io::Result<()> {
        if line != self.wiring.reset {
            return Ok(()); // not connected to anything in this reader
        }
        let (done, wait) = mpsc::channel();
        let asserted = level != self.wiring.reset_inverted;
        self.ctl
            .send(Msg::Reset { asserted, done })
            .map_err(|_| io::Error::other("emulator stopped"))?;
        // Synchronous like a real pin: the card is in (or out of) reset when this returns.
        wait.recv_timeout(Duration::from_secs(2))
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "emulator did not take reset"))
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
}

struct CardSide {
    app: Box<dyn CardApplication>,
    config: PhoenixConfig,
    atr: Vec<u8>,
    convention: Convention,
    ta1: Option<u8>,
    master: Arc<OwnedFd>,
    knobs: Arc<Mutex<Knobs>>,
    phase: Phase,
    /// Response data waiting for GET RESPONSE.
    pending: Option<VecDeque<u8>>,
    baud: u32,
    next_slot: Instant,
}

impl CardSide {
    fn knobs(&self) -> std::sync::MutexGuard<'_, Knobs> {
        self.knobs.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn run(&mut self, rx: mpsc::Receiver<Msg>) {
        let fd = self.master.as_raw_fd();
        let mut buf = [0u8; 512];
        loop {
            loop {
                match rx.try_recv() {
                    Ok(Msg::Shutdown) | Err(mpsc::TryRecvError::Disconnected) => return,
                    Ok(Msg::Reset { asserted, done }) => {
                        self.reset(asserted);
                        let _ = done.send(());
                        if !asserted {
                            self.power_up();
                        }
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
            let n = unsafe { libc::poll(&mut pfd, 1, 5) };
            if n <= 0 || pfd.revents & libc::POLLIN == 0 {
                if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    std::thread::sleep(Duration::from_millis(5));
                }
                continue;
            }
            // SAFETY: reading into our buffer from our fd.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n <= 0 {
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
            for &raw in &buf[..n as usize] {
                if self.config.echo {
                    self.write_raw(&[raw]);
                }
                if self.phase != Phase::Held && self.phase != Phase::Silent {
                    self.knobs().stats.host_bytes += 1;
                    let value = self.convention.decode(raw);
                    self.on_byte(value);
                }
            }
        }
    }

    fn reset(&mut self, asserted: bool) {
        if asserted {
            self.phase = Phase::Held;
            self.pending = None;
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
        self.next_slot = Instant::now();
        let atr = self.atr.clone();
        self.send(&atr);
        self.phase = Phase::AfterAtr;
    }

    /// Writes raw line bytes, each when the previous one has had its 12 bits of wire time.
    fn write_raw(&mut self, raw: &[u8]) {
        let fd = self.master.as_raw_fd();
        let char_time = Duration::from_secs_f64(12.0 / f64::from(self.baud.max(1)));
        for b in raw {
            if self.config.pace {
                let slot = self.next_slot.max(Instant::now()) + char_time;
                let now = Instant::now();
                if slot > now {
                    std::thread::sleep(slot - now);
                }
                self.next_slot = slot;
            }
            // SAFETY: writing one byte from our buffer to our fd. A full pty buffer or a
            // closed slave loses the byte, as a line would.
            unsafe { libc::write(fd, (b as *const u8).cast(), 1) };
        }
    }

    /// Sends card values, converted to the card's convention.
    fn send(&mut self, values: &[u8]) {
        self.knobs().stats.card_bytes += values.len() as u64;
        let raw: Vec<u8> = values.iter().map(|&v| self.convention.encode(v)).collect();
        self.write_raw(&raw);
    }

    fn on_byte(&mut self, b: u8) {
        let phase = std::mem::replace(&mut self.phase, Phase::Silent);
        self.phase = match phase {
            Phase::Held | Phase::Silent => phase,
            Phase::AfterAtr if b == 0xFF => Phase::Pps(vec![b]),
            Phase::AfterAtr => Phase::Header(vec![b]),
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
        };
    }

    fn answer_pps(&mut self, req: &[u8]) -> Phase {
        if req.iter().fold(0u8, |a, b| a ^ b) != 0 {
            // ISO 7816-3: a card that receives an erroneous PPS request does not answer.
            return Phase::Silent;
        }
        let pps1 = (req[1] & 0x10 != 0).then(|| req[2]);
        let accepted = pps1.filter(|p| Some(*p) == self.ta1);
        let resp = match accepted {
            Some(_) => req.to_vec(),
            None => {
                let pps0 = req[1] & 0x0F;
                vec![0xFF, pps0, 0xFF ^ pps0]
            }
        };
        self.send(&resp);
        self.knobs().stats.pps1 = accepted;
        if let Some(fi_di) = accepted.and_then(FiDi::from_ta1) {
            self.baud = fi_di.baud(self.config.clock_hz);
        }
        Phase::Header(Vec::new())
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
}
