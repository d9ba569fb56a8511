//! Frames over a byte stream: a [`tokio_util::codec`] `Decoder` and `Encoder` (feature
//! `codec`). Used with `Framed` by everything that speaks the protocol over a socket: the
//! gateway, the proxy's HELLO check, the load test, the benches and the tests.

use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::{Frame, HEADER, Kind, PREFIX, ProtocolError};

/// Why a stream of frames stopped.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes broke the protocol; answer with ERROR `code()` and close.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Decodes and encodes frames, refusing any frame longer than `max` (length prefix
/// excluded) as soon as its 4-byte prefix arrives, before anything is allocated for it.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    max: usize,
}

impl FrameCodec {
    pub fn new(max: usize) -> FrameCodec {
        FrameCodec { max }
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

impl Default for FrameCodec {
    fn default() -> FrameCodec {
        FrameCodec::new(crate::DEFAULT_MAX_FRAME)
    }
}

impl Decoder for FrameCodec {
    type Item = Frame;
    type Error = CodecError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, CodecError> {
        let Some(prefix) = src.get(..PREFIX) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
        if len > self.max {
            return Err(ProtocolError::TooLarge { len, max: self.max }.into());
        }
        if len < HEADER {
            return Err(ProtocolError::TooShort(len).into());
        }
        let Some(&kind) = src.get(PREFIX) else {
            return Ok(None);
        };
        let kind = Kind::from_u8(kind).ok_or(ProtocolError::UnknownType(kind))?;
        if src.len() < PREFIX + len {
            // Room for the rest of this frame, bounded by `max` (checked above).
            src.reserve(PREFIX + len - src.len());
            return Ok(None);
        }
        src.advance(PREFIX + 1);
        let seq = src.get_u64();
        let body = src.split_to(len - HEADER).to_vec();
        Ok(Some(Frame { kind, seq, body }))
    }
}

impl Encoder<Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        self.encode(&frame, dst)
    }
}

impl Encoder<&Frame> for FrameCodec {
    type Error = CodecError;

    fn encode(&mut self, frame: &Frame, dst: &mut BytesMut) -> Result<(), CodecError> {
        let len = HEADER + frame.body.len();
        // Never send what the peer is bound to refuse.
        if len > self.max {
            return Err(ProtocolError::TooLarge { len, max: self.max }.into());
        }
        dst.reserve(PREFIX + len);
        dst.put_u32(len as u32);
        dst.put_u8(frame.kind as u8);
        dst.put_u64(frame.seq);
        dst.put_slice(&frame.body);
        Ok(())
    }
}
