//! The Unix-socket listener of the local app API.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot};

use super::protocol::{self, Request, Response};
use crate::daemon::event::Event;

#[derive(Debug, thiserror::Error)]
pub enum LocalApiError {
    #[error("local API socket {path}: {detail}")]
    Socket { path: PathBuf, detail: String },
    #[error("local API: group {0:?} does not exist")]
    NoGroup(String),
}

/// Longest request line accepted; a longer one is refused, not buffered.
const MAX_LINE: usize = 4096;

/// The bound socket, with its access rules.
pub struct LocalApi {
    listener: UnixListener,
    path: PathBuf,
    allowed: Vec<u32>,
}

fn gid_of(group: &str) -> Result<u32, LocalApiError> {
    let c = std::ffi::CString::new(group).map_err(|_| LocalApiError::NoGroup(group.into()))?;
    // SAFETY: getgrnam reads a NUL-terminated name; we copy gr_gid before any other call.
    let g = unsafe { libc::getgrnam(c.as_ptr()) };
    if g.is_null() {
        return Err(LocalApiError::NoGroup(group.into()));
    }
    Ok(unsafe { (*g).gr_gid })
}

impl LocalApi {
    /// Binds `path` (replacing a stale socket file), sets its mode and group.
    pub fn bind(
        path: &Path,
        mode: u32,
        group: Option<&str>,
        allowed_uids: &[u32],
    ) -> Result<Self, LocalApiError> {
        let err = |detail: String| LocalApiError::Socket {
            path: path.into(),
            detail,
        };
        if let Ok(m) = std::fs::symlink_metadata(path) {
            use std::os::unix::fs::FileTypeExt;
            if m.file_type().is_socket() {
                std::fs::remove_file(path)
                    .map_err(|e| err(format!("cannot remove the old socket: {e}")))?;
            } else {
                return Err(err(
                    "exists and is not a socket; refusing to replace it".into()
                ));
            }
        }
        let listener = UnixListener::bind(path).map_err(|e| err(e.to_string()))?;
        if let Some(g) = group {
            let gid = gid_of(g)?;
            std::os::unix::fs::chown(path, None, Some(gid))
                .map_err(|e| err(format!("chown to group {g}: {e}")))?;
        }
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .map_err(|e| err(format!("chmod {mode:o}: {e}")))?;
        // SAFETY: getuid has no preconditions.
        let me = unsafe { libc::getuid() };
        let mut allowed = allowed_uids.to_vec();
        allowed.push(me);
        Ok(Self {
            listener,
            path: path.into(),
            allowed,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until the daemon's event channel closes.
    pub async fn serve(self, events: mpsc::Sender<Event>) {
        loop {
            let (stream, _) = tokio::select! {
                r = self.listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "local API accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = events.closed() => break,
            };
            let uid = match stream.peer_cred() {
                Ok(c) => c.uid(),
                Err(e) => {
                    tracing::warn!(error = %e, "local API: no peer credentials; refused");
                    continue;
                }
            };
            if !self.allowed.contains(&uid) {
                tracing::warn!(uid, "local API: uid not allowed; refused");
                let mut s = stream;
                let _ = write_line(
                    &mut s,
                    &Response::Error {
                        reason: format!("uid {uid} is not allowed to request payments"),
                    },
                )
                .await;
                continue;
            }
            tokio::spawn(connection(stream, uid, events.clone()));
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

async fn write_line(s: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_string(r).map_err(std::io::Error::other)?;
    line.push('\n');
    s.write_all(line.as_bytes()).await
}

/// One client: requests one after another on the same connection.
async fn connection(stream: UnixStream, uid: u32, events: mpsc::Sender<Event>) {
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        let n = match (&mut rd)
            .take(MAX_LINE as u64 + 1)
            .read_line(&mut line)
            .await
        {
            Ok(n) => n,
            Err(_) => break,
        };
        if n == 0 {
            break;
        }
        let resp = if n > MAX_LINE {
            Response::Error {
                reason: format!("request longer than {MAX_LINE} bytes"),
            }
        } else {
            match protocol::parse(line.trim_end()) {
                Err(reason) => Response::Error { reason },
                Ok(Request::Pay {
                    id,
                    merchant_id,
                    item_id,
                }) => {
                    tracing::info!(uid, %merchant_id, %item_id, "local app asks for a payment");
                    let (tx, rx) = oneshot::channel();
                    if events
                        .send(Event::Pay {
                            merchant_id,
                            item_id,
                            reply: tx,
                        })
                        .await
                        .is_err()
                    {
                        Response::Error {
                            reason: "stbd is shutting down".into(),
                        }
                    } else {
                        match rx.await {
                            Ok(o) => Response::from_outcome(id, o),
                            Err(_) => Response::Error {
                                reason: "stbd is shutting down".into(),
                            },
                        }
                    }
                }
            }
        };
        let mut s =
            serde_json::to_string(&resp).unwrap_or_else(|_| "{\"result\":\"error\"}".into());
        s.push('\n');
        if wr.write_all(s.as_bytes()).await.is_err() {
            break;
        }
        if n > MAX_LINE {
            break;
        }
    }
}
