//! The length-prefixed frame every hop speaks, over a QUIC stream or in process.
//!
//! ```text
//! +----------------+---------+---------------------------+
//! | length: u32 BE | version | payload (postcard message) |
//! +----------------+---------+---------------------------+
//!   length = 1 + payload length; it never exceeds the receiver's maximum frame size.
//! ```
//!
//! The decoder is incremental (feed it whatever the stream delivered) and refuses an
//! oversize frame as soon as it has read the length, before buffering the body, so a peer
//! cannot make the receiver allocate more than its limit.

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u8 = 1;
/// Default maximum frame size (length field value), generous for every message we send.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;
const HEADER: usize = 4;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    Oversize { len: usize, max: usize },
    #[error("unknown protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    UnknownVersion(u8),
    #[error("empty frame (no version byte)")]
    Empty,
    #[error("stream ended inside a frame ({0} bytes buffered)")]
    Truncated(usize),
}

/// Encodes one frame around `payload`.
pub fn encode(payload: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let len = payload.len() + 1;
    if len > max || len > u32::MAX as usize {
        return Err(FrameError::Oversize { len, max });
    }
    let mut out = Vec::with_capacity(HEADER + len);
    out.extend_from_slice(&(len as u32).to_be_bytes());
    out.push(PROTOCOL_VERSION);
    out.extend_from_slice(payload);
    Ok(out)
}

/// Incremental frame decoder.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    max: usize,
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
        }
    }

    /// Appends bytes received from the peer.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes of the current frame still needed before [`Self::next_frame`] can make progress,
    /// or 0 when a frame (or an error) is ready. Lets a reader ask for exactly that much.
    pub fn wanted(&self) -> usize {
        match self.buf.first_chunk::<HEADER>() {
            None => HEADER - self.buf.len(),
            Some(h) => {
                let len = u32::from_be_bytes(*h) as usize;
                if len > self.max {
                    0
                } else {
                    (HEADER + len).saturating_sub(self.buf.len())
                }
            }
        }
    }

    /// Returns the next complete frame's payload, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(h) = self.buf.first_chunk::<HEADER>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*h) as usize;
        if len > self.max {
            return Err(FrameError::Oversize { len, max: self.max });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if self.buf.len() < HEADER + len {
            return Ok(None);
        }
        let version = self.buf[HEADER];
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnknownVersion(version));
        }
        let payload = self.buf[HEADER + 1..HEADER + len].to_vec();
        self.buf.drain(..HEADER + len);
        Ok(Some(payload))
    }

    /// Call at end of stream: an error if a partial frame is left over.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}

/// Decodes exactly one frame from a complete buffer (e.g. a whole QUIC stream).
pub fn decode_one(bytes: &[u8], max: usize) -> Result<Vec<u8>, FrameError> {
    let mut d = FrameDecoder::new(max);
    d.push(bytes);
    match d.next_frame()? {
        Some(p) if d.buf.is_empty() => Ok(p),
        Some(_) => Err(FrameError::Truncated(d.buf.len())),
        None => Err(FrameError::Truncated(bytes.len())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_in_pieces() {
        let f = encode(b"hello", DEFAULT_MAX_FRAME).unwrap();
        let mut d = FrameDecoder::new(DEFAULT_MAX_FRAME);
        for b in &f[..f.len() - 1] {
            d.push(&[*b]);
            assert_eq!(d.next_frame(), Ok(None));
        }
        d.push(&f[f.len() - 1..]);
        assert_eq!(d.next_frame(), Ok(Some(b"hello".to_vec())));
        assert!(d.finish().is_ok());
    }

    #[test]
    fn refuses_oversize_before_buffering() {
        let mut d = FrameDecoder::new(16);
        d.push(&1000u32.to_be_bytes());
        assert_eq!(d.wanted(), 0);
        assert_eq!(
            d.next_frame(),
            Err(FrameError::Oversize { len: 1000, max: 16 })
        );
        assert!(matches!(
            encode(&[0; 16], 16),
            Err(FrameError::Oversize { len: 17, max: 16 })
        ));
    }

    #[test]
    fn refuses_unknown_version_and_empty() {
        let mut bytes = encode(b"x", 64).unwrap();
        bytes[4] = 9;
        assert_eq!(decode_one(&bytes, 64), Err(FrameError::UnknownVersion(9)));
        assert_eq!(decode_one(&[0, 0, 0, 0], 64), Err(FrameError::Empty));
        assert_eq!(decode_one(&[0, 0], 64), Err(FrameError::Truncated(2)));
    }

    proptest! {
        #[test]
        fn decoder_never_panics(chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 0..8)) {
            let mut d = FrameDecoder::new(128);
            for c in &chunks {
                d.push(c);
                while let Ok(Some(_)) = d.next_frame() {}
            }
            let _ = d.finish();
        }
    }
}
