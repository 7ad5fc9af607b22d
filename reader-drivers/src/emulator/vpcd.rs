//! vsmartcard vpcd client: attaches a [`CardApplication`] to pcscd's "Virtual PCD" reader.
//!
//! vpcd is a pcscd reader driver (Debian package vsmartcard-vpcd) that listens on TCP port
//! 35963 for reader "Virtual PCD 00 00" (35964 for "00 01", …). A virtual card ("vicc")
//! connects as a client; while the connection is up pcscd sees a card in the reader, and when
//! it closes pcscd sees the card removed. Every message in both directions is a 2-byte
//! big-endian length followed by the payload. A 1-byte payload from vpcd is a control message
//! (0 power off, 1 power on, 2 reset, 4 get ATR — only the last is answered, with the ATR);
//! any other payload is a command APDU, answered with the response APDU. A 1-byte command
//! APDU that is not one of those four values (a program sending one through pcscd) goes to
//! the card like any APDU, which answers `6700`: ignoring it would leave pcscd waiting for
//! an answer and wedge the reader for every program. (A 1-byte APDU whose value is a
//! control code is indistinguishable from the control message on vpcd's wire: a limit of
//! the protocol.)
//!
//! This file owns the client side of that protocol ([`attach`], [`VpcdAttachment`]) and a
//! cross-process lock on a vpcd port ([`VpcdPortLock`]) so tests in different processes do not
//! attach two cards to the same reader at once.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::apdu::CardApplication;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// vpcd's port for reader "Virtual PCD 00 00".
pub const DEFAULT_PORT: u16 = 35963;

/// vpcd's port for the payment server's first security-card reader, "Purselink PSAM 00 00"
/// (35966 is "… 00 01"): the vpcd entry `scripts/system-setup.sh` adds, with its own driver
/// instance.
pub const PSAM_PORT: u16 = 35965;

/// The PC/SC name of the vpcd reader on `port`: 35963 → "Virtual PCD 00 00", 35964 →
/// "… 00 01" (the default vpcd entry); 35965 → "Purselink PSAM 00 00", 35966 → "… 00 01"
/// ([`PSAM_PORT`]).
pub fn reader_name(port: u16) -> String {
    if port >= PSAM_PORT {
        format!("Purselink PSAM 00 {:02X}", port - PSAM_PORT)
    } else {
        let slot = port.saturating_sub(DEFAULT_PORT);
        format!("Virtual PCD 00 {slot:02X}")
    }
}

/// Whether pcscd lists the vpcd reader on `port` ([`reader_name`]), asked through PC/SC.
///
/// This is how a test checks that vpcd is installed. It never connects to vpcd's own port:
/// vpcd takes the next connection waiting in its listen backlog as a card, so a probe that
/// connected and closed would later be served to pcscd as a dead card in the reader, in the
/// middle of whichever test holds that reader then (the card it attaches is not seen until
/// pcscd gives up on the dead one).
///
/// # Errors
///
/// The PC/SC error when pcscd cannot be reached or cannot list its readers.
pub fn listed_by_pcscd(port: u16) -> Result<bool, pcsc::Error> {
    let ctx = pcsc::Context::establish(pcsc::Scope::User)?;
    let want = reader_name(port);
    let names = match ctx.list_readers_owned() {
        Ok(names) => names,
        Err(pcsc::Error::NoReadersAvailable) => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(names.iter().any(|n| n.to_str() == Ok(want.as_str())))
}

const CTRL_OFF: u8 = 0;
const CTRL_ON: u8 = 1;
const CTRL_RESET: u8 = 2;
const CTRL_ATR: u8 = 4;

/// A card shared between the vpcd connection and its owner, so it survives detach/re-attach.
pub type SharedCard = Arc<Mutex<Box<dyn CardApplication>>>;

/// Wraps a card for [`attach`].
pub fn shared(card: Box<dyn CardApplication>) -> SharedCard {
    Arc::new(Mutex::new(card))
}

#[derive(Debug, thiserror::Error)]
pub enum VpcdError {
    #[error(
        "cannot connect to vpcd at {addr}: {source} — is pcscd running with vsmartcard-vpcd installed \
         (scripts/start-pcscd.sh)?"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vpcd at {addr} closed the connection (pcscd stopped?)")]
    Closed { addr: String },
    #[error("vpcd at {addr}: I/O error: {source}")]
    Io {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("vpcd at {addr}: {detail}")]
    Protocol { addr: String, detail: String },
    #[error("cannot lock vpcd port {port} via {path}: {source}")]
    Lock {
        port: u16,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A card attached to vpcd. Dropping it without [`detach`](Self::detach) also closes the
/// connection (the serving task is aborted).
pub struct VpcdAttachment {
    addr: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), VpcdError>>>,
}

/// Connects to vpcd at `host:port` and serves `card` until detached or until vpcd closes.
pub async fn attach(card: SharedCard, host: &str, port: u16) -> Result<VpcdAttachment, VpcdError> {
    let addr = format!("{host}:{port}");
    let stream = TcpStream::connect(&addr)
        .await
        .map_err(|source| VpcdError::Connect {
            addr: addr.clone(),
            source,
        })?;
    // Small frames in lock-step: Nagle would only add latency.
    let _ = stream.set_nodelay(true);
    tracing::info!(addr = %addr, reader = %reader_name(port), "card attached to vpcd");
    let (stop_tx, stop_rx) = oneshot::channel();
    let task = tokio::spawn(serve(stream, card, addr.clone(), stop_rx));
    Ok(VpcdAttachment {
        addr,
        stop: Some(stop_tx),
        task: Some(task),
    })
}

impl VpcdAttachment {
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Closes the connection, so pcscd sees the card removed, and waits until it is closed.
    /// An APDU in progress is abandoned (pcscd's transmit fails), as when a card is pulled.
    pub async fn detach(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(error = %e, "vpcd connection ended with an error"),
                Err(e) => tracing::warn!(error = %e, "vpcd serving task failed"),
            }
        }
        tracing::info!(addr = %self.addr, "card detached from vpcd");
    }

    /// Serves until vpcd closes the connection (pcscd stopped) or an I/O error occurs.
    /// Cancel-safe: if this future is dropped, the card stays attached.
    pub async fn wait(&mut self) -> Result<(), VpcdError> {
        let Some(task) = self.task.as_mut() else {
            return Ok(());
        };
        let r = task.await;
        self.task = None;
        match r {
            Ok(r) => r,
            Err(e) => Err(VpcdError::Protocol {
                addr: self.addr.clone(),
                detail: format!("serving task failed: {e}"),
            }),
        }
    }
}

impl Drop for VpcdAttachment {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn serve(
    mut stream: TcpStream,
    card: SharedCard,
    addr: String,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), VpcdError> {
    loop {
        let msg = tokio::select! {
            _ = &mut stop => return Ok(()),
            msg = read_frame(&mut stream, &addr) => msg?,
        };
        let reply = match msg.as_slice() {
            [CTRL_OFF] => {
                tracing::debug!(addr = %addr, "vpcd: power off");
                None
            }
            [CTRL_ON] | [CTRL_RESET] => {
                tracing::debug!(addr = %addr, ctrl = msg[0], "vpcd: power on / reset");
                with_card(&card, |c| c.reset());
                None
            }
            // vpcd asks for the ATR on every presence poll, so this is answered inline.
            [CTRL_ATR] => Some(with_card(&card, |c| c.atr())),
            [] => {
                tracing::warn!(addr = %addr, "vpcd: empty message ignored");
                None
            }
            apdu => {
                let apdu = apdu.to_vec();
                let card = card.clone();
                // The card may do blocking file I/O (the file-backed purse persists state).
                let work = tokio::task::spawn_blocking(move || {
                    with_card(&card, |c| c.process_apdu(&apdu))
                });
                let resp = tokio::select! {
                    // Detaching mid-APDU abandons the command, like pulling a card.
                    _ = &mut stop => return Ok(()),
                    r = work => r.map_err(|e| VpcdError::Protocol {
                        addr: addr.clone(),
                        detail: format!("card task failed: {e}"),
                    })?,
                };
                tracing::trace!(addr = %addr, command = %hex::encode(&msg), response = %hex::encode(&resp), "vpcd: APDU");
                Some(resp)
            }
        };
        if let Some(reply) = reply {
            write_frame(&mut stream, &reply, &addr).await?;
        }
    }
}

fn with_card<T>(card: &SharedCard, f: impl FnOnce(&mut dyn CardApplication) -> T) -> T {
    // A poisoned lock means a card panicked earlier; its state is still the best we have.
    let mut guard = card.lock().unwrap_or_else(|p| p.into_inner());
    f(guard.as_mut())
}

/// ACKs at once what comes next on `stream` (Linux `TCP_QUICKACK`, which the kernel turns
/// off again by itself, so it is set before every read). pcscd's vpcd driver sends a frame's
/// length and its data in two writes with Nagle's algorithm on: a delayed ACK of the first
/// held the second back 40 ms, every APDU.
fn ack_at_once(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_tcp_quickack(true);
}

async fn read_frame(stream: &mut TcpStream, addr: &str) -> Result<Vec<u8>, VpcdError> {
    let mut len = [0u8; 2];
    ack_at_once(stream);
    if let Err(e) = stream.read_exact(&mut len).await {
        return Err(if e.kind() == std::io::ErrorKind::UnexpectedEof {
            VpcdError::Closed {
                addr: addr.to_string(),
            }
        } else {
            VpcdError::Io {
                addr: addr.to_string(),
                source: e,
            }
        });
    }
    let mut buf = vec![0u8; u16::from_be_bytes(len) as usize];
    ack_at_once(stream);
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|source| VpcdError::Io {
            addr: addr.to_string(),
            source,
        })?;
    Ok(buf)
}

async fn write_frame(stream: &mut TcpStream, payload: &[u8], addr: &str) -> Result<(), VpcdError> {
    let len = u16::try_from(payload.len()).map_err(|_| VpcdError::Protocol {
        addr: addr.to_string(),
        detail: format!(
            "response of {} bytes does not fit a vpcd frame",
            payload.len()
        ),
    })?;
    let mut frame = Vec::with_capacity(payload.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(payload);
    stream
        .write_all(&frame)
        .await
        .map_err(|source| VpcdError::Io {
            addr: addr.to_string(),
            source,
        })
}

/// Attaches `card` and re-attaches whenever the connection drops (pcscd restarted), until
/// `shutdown` resolves. Connection failures are retried every `retry`; they are logged, not
/// fatal, because pcscd may come back.
pub async fn serve_forever(
    card: SharedCard,
    host: &str,
    port: u16,
    retry: Duration,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        let attempt = async {
            match attach(card.clone(), host, port).await {
                Ok(mut att) => {
                    let r = att.wait().await;
                    tracing::warn!(result = ?r.err().map(|e| e.to_string()), "vpcd connection ended; re-attaching");
                }
                Err(e) => tracing::warn!(error = %e, "vpcd attach failed; retrying"),
            }
            tokio::time::sleep(retry).await;
        };
        tokio::select! {
            _ = &mut shutdown => return,
            _ = attempt => {}
        }
    }
}

/// An exclusive, cross-process lock on one vpcd port (an `flock` on a file in the temp dir),
/// so concurrent tests — in one process or several — take turns with the shared reader.
/// Released on drop.
pub struct VpcdPortLock {
    _file: File,
}

impl VpcdPortLock {
    /// Blocks until the lock is ours. Call from a blocking context (or `spawn_blocking`).
    pub fn acquire(port: u16) -> Result<Self, VpcdError> {
        let path = std::env::temp_dir().join(format!("purselink-vpcd-{port}.lock"));
        let err = |source| VpcdError::Lock {
            port,
            path: path.clone(),
            source,
        };
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(err)?;
        loop {
            // SAFETY: flock on a file descriptor we own; no memory is passed.
            let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Self { _file: file });
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(err(e));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A fake card for the framing test: echoes the APDU header with 9000.
    struct EchoCard;
    impl CardApplication for EchoCard {
        fn atr(&self) -> Vec<u8> {
            vec![0x3B, 0x80, 0x80, 0x01, 0x01]
        }
        fn reset(&mut self) {}
        fn process_apdu(&mut self, apdu: &[u8]) -> Vec<u8> {
            let mut r = apdu.iter().take(4).copied().collect::<Vec<_>>();
            r.extend_from_slice(&[0x90, 0x00]);
            r
        }
    }

    async fn send(s: &mut TcpStream, payload: &[u8]) {
        write_frame(s, payload, "test").await.unwrap();
    }

    /// vpcd's side of the protocol played by the test (a fake vpcd: the real one is in the
    /// pcsc_vpcd integration test).
    #[tokio::test]
    async fn frames_control_messages_and_apdus() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let att = attach(shared(Box::new(EchoCard)), "127.0.0.1", port)
            .await
            .unwrap();
        let (mut s, _) = listener.accept().await.unwrap();
        send(&mut s, &[CTRL_ON]).await;
        send(&mut s, &[CTRL_ATR]).await;
        assert_eq!(
            read_frame(&mut s, "t").await.unwrap(),
            vec![0x3B, 0x80, 0x80, 0x01, 0x01]
        );
        send(&mut s, &[0x00, 0xA4, 0x04, 0x00, 0x01, 0xAA]).await;
        assert_eq!(
            read_frame(&mut s, "t").await.unwrap(),
            vec![0x00, 0xA4, 0x04, 0x00, 0x90, 0x00]
        );
        send(&mut s, &[CTRL_OFF]).await;
        // A 1-byte APDU that is no control code is answered like any APDU (here, echoed).
        send(&mut s, &[9]).await;
        assert_eq!(read_frame(&mut s, "t").await.unwrap(), vec![9, 0x90, 0x00]);
        send(&mut s, &[CTRL_ATR]).await;
        assert_eq!(read_frame(&mut s, "t").await.unwrap().len(), 5);
        att.detach().await;
        // Detach closed the connection: the fake vpcd reads EOF.
        let mut b = [0u8; 1];
        assert_eq!(s.read(&mut b).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn connect_refused_names_vpcd_and_pcscd() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let err = attach(shared(Box::new(EchoCard)), "127.0.0.1", port)
            .await
            .err()
            .expect("attach to a closed port must fail");
        let msg = err.to_string();
        assert!(msg.contains("vpcd") && msg.contains("pcscd"), "{msg}");
    }

    #[test]
    fn reader_names_follow_vpcd_ports() {
        assert_eq!(reader_name(35963), "Virtual PCD 00 00");
        assert_eq!(reader_name(35964), "Virtual PCD 00 01");
        assert_eq!(reader_name(35965), "Purselink PSAM 00 00");
        assert_eq!(reader_name(35966), "Purselink PSAM 00 01");
    }
}
