//! The client side of a hop (box → gateway, gateway → role): connect with the device or role
//! certificate, then one bidirectional stream per transaction via [`call`].

use std::net::SocketAddr;

use proto::frame::{self, DEFAULT_MAX_FRAME};
use quinn::{Connection, Endpoint};

use super::frame_io::read_frame;
use super::{ClientTls, QuicError, TransportSettings, client_config};

/// A client endpoint (its own UDP socket) using `tls` and `settings` for every connection.
pub fn client_endpoint(
    bind: SocketAddr,
    tls: &ClientTls,
    settings: &TransportSettings,
) -> Result<Endpoint, QuicError> {
    let mut endpoint = Endpoint::client(bind)?;
    endpoint.set_default_client_config(client_config(tls, settings)?);
    Ok(endpoint)
}

/// Connects to `addr`, checking the server's certificate names `server_name`.
pub async fn connect(
    endpoint: &Endpoint,
    addr: SocketAddr,
    server_name: &str,
) -> Result<Connection, QuicError> {
    Ok(endpoint.connect(addr, server_name)?.await?)
}

/// One transaction with the default maximum frame size: see [`call_with_max`].
pub async fn call(conn: &Connection, payload: &[u8]) -> Result<Vec<u8>, QuicError> {
    call_with_max(conn, payload, DEFAULT_MAX_FRAME).await
}

/// One transaction on a new bidirectional stream: write one frame, finish, read one frame of at
/// most `max_frame`. Opening the stream waits while the server's stream limit is reached
/// (back-pressure); a refusal comes back as its specific [`QuicError`].
pub async fn call_with_max(
    conn: &Connection,
    payload: &[u8],
    max_frame: usize,
) -> Result<Vec<u8>, QuicError> {
    let request = frame::encode(payload, max_frame)?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let written = async {
        send.write_all(&request).await?;
        send.finish().map_err(|e| QuicError::Stream(e.to_string()))
    }
    .await;
    match written {
        Ok(()) => Ok(read_frame(&mut recv, max_frame).await?),
        // The server may have refused the request mid-write; its reset on our receive side says
        // why more precisely than the write error does (e.g. a stop after an oversize header).
        Err(write_err) => match read_frame(&mut recv, max_frame).await {
            Err(read_err) => Err(read_err.into()),
            Ok(_) => Err(write_err),
        },
    }
}

/// A transaction's stream: its steps go back and forth on one bidirectional stream (a
/// purchase: draw request → debit command, then debit response → receipt).
pub struct TxnStream {
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    max_frame: usize,
}

impl TxnStream {
    /// One step that is not the last: the stream stays open for the next.
    pub async fn exchange(&mut self, payload: &[u8]) -> Result<Vec<u8>, QuicError> {
        let request = frame::encode(payload, self.max_frame)?;
        self.send.write_all(&request).await?;
        match super::frame_io::read_next_frame(&mut self.recv, self.max_frame).await? {
            Some(answer) => Ok(answer),
            None => Err(QuicError::Protocol("stream ended before the answer")),
        }
    }

    /// The last step: finishes our side, then reads the final answer and the end.
    pub async fn last(mut self, payload: &[u8]) -> Result<Vec<u8>, QuicError> {
        let request = frame::encode(payload, self.max_frame)?;
        self.send.write_all(&request).await?;
        self.send
            .finish()
            .map_err(|e| QuicError::Stream(e.to_string()))?;
        Ok(read_frame(&mut self.recv, self.max_frame).await?)
    }
}

/// A connected client: its own endpoint and one connection.
#[derive(Debug, Clone)]
pub struct QuicClient {
    endpoint: Endpoint,
    conn: Connection,
    max_frame: usize,
}

impl QuicClient {
    /// Binds an ephemeral UDP socket on loopback or any address matching `addr`'s family, and
    /// connects.
    pub async fn connect(
        tls: &ClientTls,
        settings: &TransportSettings,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Self, QuicError> {
        let bind: SocketAddr = if addr.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let endpoint = client_endpoint(bind, tls, settings)?;
        let conn = connect(&endpoint, addr, server_name).await?;
        Ok(Self {
            endpoint,
            conn,
            max_frame: settings.max_frame,
        })
    }

    /// Connects over an existing client `endpoint` (one UDP socket shared by many
    /// connections, e.g. a fleet of simulated boxes in one process), with `tls` (this
    /// connection's own device certificate) and `settings` for this connection only. Don't
    /// [`close`](Self::close) such a client: that waits for the whole shared endpoint; close
    /// its [`connection`](Self::connection) instead.
    pub async fn connect_shared(
        endpoint: &Endpoint,
        tls: &ClientTls,
        settings: &TransportSettings,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<Self, QuicError> {
        let conn = endpoint
            .connect_with(client_config(tls, settings)?, addr, server_name)?
            .await?;
        Ok(Self {
            endpoint: endpoint.clone(),
            conn,
            max_frame: settings.max_frame,
        })
    }

    pub async fn call(&self, payload: &[u8]) -> Result<Vec<u8>, QuicError> {
        call_with_max(&self.conn, payload, self.max_frame).await
    }

    /// Opens a stream for a transaction's steps (see [`TxnStream`]).
    pub async fn transaction(&self) -> Result<TxnStream, QuicError> {
        let (send, recv) = self.conn.open_bi().await?;
        Ok(TxnStream {
            send,
            recv,
            max_frame: self.max_frame,
        })
    }

    pub fn connection(&self) -> &Connection {
        &self.conn
    }

    /// The client's endpoint, e.g. to `rebind` it to a new socket (a box whose address changed).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// Closes the connection and waits until the server has been told.
    pub async fn close(self) {
        self.conn
            .close(super::AppCode::Closed.varint(), b"client done");
        self.endpoint.wait_idle().await;
    }
}
