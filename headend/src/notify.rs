//! systemd readiness and watchdog notifications (`sd_notify(3)`): datagrams such as `READY=1`
//! and `WATCHDOG=1` sent to the unix socket named by `$NOTIFY_SOCKET`. Outside systemd the
//! variable is unset and every call is a no-op.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::PathBuf;
use std::time::Duration;

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyTarget {
    /// A socket file.
    Path(PathBuf),
    /// A Linux abstract-namespace socket (`$NOTIFY_SOCKET` starting with `@`).
    Abstract(Vec<u8>),
}

/// A handle on the service manager's notification socket.
#[derive(Debug, Clone)]
pub struct Notifier {
    target: NotifyTarget,
}

impl Notifier {
    pub fn new(target: NotifyTarget) -> Self {
        Self { target }
    }

    /// From `$NOTIFY_SOCKET`; `None` when not started by systemd with `Type=notify`.
    pub fn from_env() -> Option<Self> {
        let raw = std::env::var_os("NOTIFY_SOCKET")?;
        let raw = {
            use std::os::unix::ffi::OsStringExt;
            raw.into_vec()
        };
        let target = match raw.split_first() {
            None => return None,
            Some((b'@', name)) => NotifyTarget::Abstract(name.to_vec()),
            Some(_) => {
                use std::os::unix::ffi::OsStringExt;
                NotifyTarget::Path(PathBuf::from(std::ffi::OsString::from_vec(raw)))
            }
        };
        Some(Self::new(target))
    }

    /// Sends one notification, e.g. `"READY=1"` or `"STATUS=serving\nWATCHDOG=1"`.
    pub fn send(&self, state: &str) -> io::Result<()> {
        let sock = UnixDatagram::unbound()?;
        let addr = match &self.target {
            NotifyTarget::Path(p) => SocketAddr::from_pathname(p)?,
            NotifyTarget::Abstract(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
        };
        sock.send_to_addr(state.as_bytes(), &addr)?;
        Ok(())
    }

    pub fn ready(&self) -> io::Result<()> {
        self.send("READY=1")
    }

    pub fn watchdog(&self) -> io::Result<()> {
        self.send("WATCHDOG=1")
    }

    pub fn stopping(&self) -> io::Result<()> {
        self.send("STOPPING=1")
    }

    pub fn status(&self, status: &str) -> io::Result<()> {
        // A newline would start another assignment.
        self.send(&format!("STATUS={}", status.replace('\n', " ")))
    }
}

/// The watchdog period systemd expects (`$WATCHDOG_USEC`), if it is meant for this process.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok()? != std::process::id() {
            return None;
        }
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Pings the watchdog at half its period for as long as the runtime lives. The task runs on the
/// same runtime as the service, so a wedged runtime stops the pings and systemd restarts us.
pub fn spawn_watchdog(notifier: Notifier, period: Duration) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period / 2);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(e) = notifier.watchdog() {
                tracing::warn!(error = %e, "watchdog notification failed");
            }
        }
    })
}

/// Tells systemd we are ready and starts the watchdog pings when it asked for them. A no-op
/// outside systemd.
pub fn ready_and_watchdog() -> Option<tokio::task::JoinHandle<()>> {
    let notifier = Notifier::from_env()?;
    if let Err(e) = notifier.ready() {
        tracing::warn!(error = %e, "READY notification failed");
    }
    let period = watchdog_interval()?;
    tracing::info!(
        period_ms = period.as_millis() as u64,
        "systemd watchdog armed"
    );
    Some(spawn_watchdog(notifier, period))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 256];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_and_watchdog_reach_a_real_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n = Notifier::new(NotifyTarget::Path(path));
        n.ready().unwrap();
        assert_eq!(recv(&listener), "READY=1");
        n.watchdog().unwrap();
        assert_eq!(recv(&listener), "WATCHDOG=1");
        n.status("serving\nboxes").unwrap();
        assert_eq!(recv(&listener), "STATUS=serving boxes");
    }

    #[test]
    fn abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("purselink-notify-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        Notifier::new(NotifyTarget::Abstract(name.into_bytes()))
            .ready()
            .unwrap();
        assert_eq!(recv(&listener), "READY=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_not_a_panic() {
        let n = Notifier::new(NotifyTarget::Path("/nonexistent/purselink.sock".into()));
        assert!(n.ready().is_err());
    }

    #[tokio::test]
    async fn watchdog_task_pings_periodically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("wd.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let period = Duration::from_millis(200);
        let task = spawn_watchdog(Notifier::new(NotifyTarget::Path(path)), period);
        // Ticks at 0, 100, 200, ... ms: after 450 ms at least two must have gone out, even on a
        // loaded machine (a count, not a timing assertion).
        tokio::time::sleep(Duration::from_millis(450)).await;
        task.abort();
        let mut pings = 0;
        let mut buf = [0u8; 64];
        while let Ok(n) = listener.recv(&mut buf) {
            assert_eq!(&buf[..n], b"WATCHDOG=1");
            pings += 1;
        }
        assert!(pings >= 2, "only {pings} watchdog pings");
    }
}
