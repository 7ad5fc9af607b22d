//! One stream, one transaction: read a request frame, ask the service, write the response
//! frame — and again for each further step the peer sends on the same stream (a purchase's
//! draw request and then its debit response), until the peer finishes the stream. A
//! malformed, oversize or late request resets the stream with its code; the connection and
//! its other streams carry on.

use std::sync::Arc;

use proto::frame::{self, FrameError};
use quinn::{RecvStream, SendStream};

use super::frame_io::{FrameReadError, read_next_frame};
use super::{AppCode, Peer, Service, TransportSettings};

pub(crate) async fn serve_stream(
    peer: Arc<Peer>,
    mut send: SendStream,
    mut recv: RecvStream,
    service: Arc<dyn Service>,
    settings: Arc<TransportSettings>,
) {
    let stream = send.id().index();
    let mut step = 0u32;
    loop {
        // The first request must arrive promptly; a later step may wait on the card (a
        // DEBIT through a slow serial reader), so it gets the idle timeout.
        let limit = if step == 0 {
            settings.request_timeout()
        } else {
            settings.idle_timeout()
        };
        let read =
            tokio::time::timeout(limit, read_next_frame(&mut recv, settings.max_frame)).await;
        let request = match read {
            Ok(Ok(Some(request))) => request,
            Ok(Ok(None)) if step > 0 => break,
            Ok(Ok(None)) => {
                tracing::warn!(peer = ?peer.identity, stream, "request refused: stream ended before a frame");
                return refuse(send, recv, AppCode::BadFrame);
            }
            Ok(Err(FrameReadError::Read(e))) => {
                tracing::debug!(peer = ?peer.identity, stream, error = %e, "request stream lost");
                return;
            }
            Ok(Err(FrameReadError::Frame(FrameError::Oversize { len, max }))) => {
                tracing::warn!(peer = ?peer.identity, stream, len, max, "request refused: frame too large");
                return refuse(send, recv, AppCode::FrameTooLarge);
            }
            Ok(Err(e)) => {
                tracing::warn!(peer = ?peer.identity, stream, error = %e, "request refused: bad frame");
                return refuse(send, recv, AppCode::BadFrame);
            }
            Err(_) => {
                tracing::warn!(peer = ?peer.identity, stream, timeout_ms = limit.as_millis() as u64, "request refused: timed out");
                return refuse(send, recv, AppCode::RequestTimeout);
            }
        };
        let response = match service.call(peer.clone(), request).await {
            Ok(response) => response,
            Err(e) => {
                tracing::warn!(peer = ?peer.identity, stream, error = %e, "service failed");
                return refuse(send, recv, AppCode::ServiceFailed);
            }
        };
        let bytes = match frame::encode(&response, settings.max_frame) {
            Ok(bytes) => bytes,
            Err(e) => {
                tracing::error!(peer = ?peer.identity, stream, error = %e, "service response exceeds the frame limit");
                return refuse(send, recv, AppCode::ServiceFailed);
            }
        };
        // Bounded: a box that stops reading must not hold the task (and its stream slot).
        match tokio::time::timeout(settings.idle_timeout(), send.write_all(&bytes)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::debug!(peer = ?peer.identity, stream, error = %e, "response not delivered");
                return;
            }
            Err(_) => {
                tracing::warn!(peer = ?peer.identity, stream, "response not taken in time");
                let _ = send.reset(AppCode::RequestTimeout.varint());
                return;
            }
        }
        step += 1;
    }
    let delivered = tokio::time::timeout(settings.idle_timeout(), async {
        let _ = send.finish();
        // Stay until the peer has the responses: a shutdown that closes the connection after
        // the handlers drain would otherwise throw away unacknowledged data.
        let _ = send.stopped().await;
    })
    .await;
    if delivered.is_err() {
        tracing::warn!(peer = ?peer.identity, stream, "response not acknowledged in time");
        let _ = send.reset(AppCode::RequestTimeout.varint());
    }
}

/// Tells the peer why: stop reading its request and reset our response with the same code.
fn refuse(mut send: SendStream, mut recv: RecvStream, code: AppCode) {
    let _ = recv.stop(code.varint());
    let _ = send.reset(code.varint());
}
