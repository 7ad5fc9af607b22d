//! Reading frames from a QUIC stream with `proto::frame::FrameDecoder`, bounded by the maximum
//! frame size (an oversize length is refused before its body is read). A stream carries one
//! transaction: one request and its answer ([`read_frame`], which requires the end of the
//! stream after the frame), or the steps of a purchase in turn ([`read_next_frame`]).

use proto::frame::{FrameDecoder, FrameError};
use quinn::{ReadError, RecvStream};

use super::QuicError;

/// Largest chunk taken from quinn at once; the decoder asks for no more than the frame needs.
const MAX_CHUNK: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FrameReadError {
    #[error(transparent)]
    Frame(#[from] FrameError),
    #[error("more than one frame on a one-transaction stream")]
    Trailing,
    #[error("stream ended before a frame")]
    NoFrame,
    #[error(transparent)]
    Read(#[from] ReadError),
}

impl From<FrameReadError> for QuicError {
    fn from(e: FrameReadError) -> Self {
        match e {
            FrameReadError::Frame(f) => f.into(),
            FrameReadError::Trailing => QuicError::Protocol("more than one frame on the stream"),
            FrameReadError::NoFrame => QuicError::Protocol("stream ended before a frame"),
            FrameReadError::Read(r) => r.into(),
        }
    }
}

/// Reads the next frame of a multi-step transaction stream; `None` when the peer finished the
/// stream at a frame boundary. Reads no byte past the frame.
pub async fn read_next_frame(
    recv: &mut RecvStream,
    max: usize,
) -> Result<Option<Vec<u8>>, FrameReadError> {
    let mut decoder = FrameDecoder::new(max);
    let mut seen = 0usize;
    loop {
        if let Some(payload) = decoder.next_frame()? {
            return Ok(Some(payload));
        }
        let want = decoder.wanted().clamp(1, MAX_CHUNK);
        match recv.read_chunk(want, true).await? {
            Some(chunk) => {
                seen += chunk.bytes.len();
                decoder.push(&chunk.bytes);
            }
            None if seen == 0 => return Ok(None),
            None => {
                decoder.finish()?;
                return Err(FrameReadError::NoFrame);
            }
        }
    }
}

/// Reads one frame's payload, then requires the end of the stream.
pub async fn read_frame(recv: &mut RecvStream, max: usize) -> Result<Vec<u8>, FrameReadError> {
    let mut decoder = FrameDecoder::new(max);
    let mut seen = 0usize;
    loop {
        if let Some(payload) = decoder.next_frame()? {
            // Reading only `wanted()` bytes means nothing past the frame is buffered yet.
            return match recv.read_chunk(1, true).await? {
                None => Ok(payload),
                Some(_) => Err(FrameReadError::Trailing),
            };
        }
        let want = decoder.wanted().clamp(1, MAX_CHUNK);
        match recv.read_chunk(want, true).await? {
            Some(chunk) => {
                seen += chunk.bytes.len();
                decoder.push(&chunk.bytes);
            }
            None if seen == 0 => return Err(FrameReadError::NoFrame),
            None => {
                decoder.finish()?;
                return Err(FrameReadError::NoFrame);
            }
        }
    }
}
