//! The device session protocol: frames over any byte stream, with no I/O here.
//!
//! A frame is `u32` big-endian length of the rest, `u8` type, `u64` sequence, body. The header
//! is fixed so a proxy can track and replay frames without decoding bodies. Control bodies
//! are CBOR; DATA, REPLY and PUSH bodies are the application's opaque bytes. See PROTOCOL.md.
//!
//! `no_std`, and without allocation at its core: [`split`] reads a frame in place,
//! [`header_bytes`] writes a header, and [`body`] reads and writes the control bodies over
//! borrowed bytes (what a device on a microcontroller uses: `wasmbed-device`). Feature `alloc`
//! (on by default, through `std`) adds the owned [`Frame`] and the serde control types that
//! the gateway and the proxy use; feature `codec` the tokio-util framing.

#![no_std]
#![forbid(unsafe_code)]

#[cfg(feature = "alloc")]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;

pub mod body;
#[cfg(feature = "alloc")]
mod owned;
#[cfg(feature = "alloc")]
pub use owned::*;

/// Bytes of the header after the length prefix: type (1) + sequence (8).
pub const HEADER: usize = 9;
/// Bytes of the length prefix.
pub const PREFIX: usize = 4;
/// Default largest frame (length prefix excluded) a peer accepts.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// The type of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Hello = 1,
    Welcome = 2,
    Data = 3,
    Reply = 4,
    Push = 5,
    Ping = 6,
    Pong = 7,
    Error = 8,
    Goaway = 9,
    Checkpoint = 10,
}

impl Kind {
    /// Every frame type, in wire order.
    pub const ALL: [Kind; 10] = [
        Kind::Hello,
        Kind::Welcome,
        Kind::Data,
        Kind::Reply,
        Kind::Push,
        Kind::Ping,
        Kind::Pong,
        Kind::Error,
        Kind::Goaway,
        Kind::Checkpoint,
    ];

    /// The frame type's name on the wire documentation, in logs and in metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Hello => "hello",
            Kind::Welcome => "welcome",
            Kind::Data => "data",
            Kind::Reply => "reply",
            Kind::Push => "push",
            Kind::Ping => "ping",
            Kind::Pong => "pong",
            Kind::Error => "error",
            Kind::Goaway => "goaway",
            Kind::Checkpoint => "checkpoint",
        }
    }

    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Data,
            4 => Kind::Reply,
            5 => Kind::Push,
            6 => Kind::Ping,
            7 => Kind::Pong,
            8 => Kind::Error,
            9 => Kind::Goaway,
            10 => Kind::Checkpoint,
            _ => return None,
        })
    }
}

/// Why bytes are not a frame. Each is answered by ERROR and a close.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("frame of {len} bytes is over the maximum of {max}")]
    TooLarge { len: usize, max: usize },
    #[error("frame length {0} is shorter than the 9-byte header")]
    TooShort(usize),
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// A control body that is not the expected CBOR ([`body`]'s readers).
    #[error(transparent)]
    BadBody(#[from] body::BadBody),
    #[cfg(feature = "alloc")]
    #[error("malformed {what} body: {detail}")]
    Body {
        what: &'static str,
        detail: alloc::string::String,
    },
}

impl ProtocolError {
    /// The ERROR code this problem is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::UnknownType(_) => ErrorCode::UnknownType,
            ProtocolError::TooShort(_) | ProtocolError::BadBody(_) => ErrorCode::BadFrame,
            #[cfg(feature = "alloc")]
            ProtocolError::Body { .. } => ErrorCode::BadFrame,
        }
    }
}

/// The 13 bytes that start a frame of `kind` and `seq` with a body of `body_len` bytes.
pub fn header_bytes(kind: Kind, seq: u64, body_len: usize) -> [u8; PREFIX + HEADER] {
    let mut h = [0u8; PREFIX + HEADER];
    let len = (HEADER + body_len) as u32;
    h[..PREFIX].copy_from_slice(&len.to_be_bytes());
    h[PREFIX] = kind as u8;
    h[PREFIX + 1..].copy_from_slice(&seq.to_be_bytes());
    h
}

/// The fixed header of the frame at the start of `buf`, without decoding its body:
/// `(kind byte, sequence, total encoded length)`; `None` while fewer than 13 bytes are there.
pub fn peek_header(buf: &[u8]) -> Option<(u8, u64, usize)> {
    let h = buf.get(..PREFIX + HEADER)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let seq = u64::from_be_bytes([h[5], h[6], h[7], h[8], h[9], h[10], h[11], h[12]]);
    Some((h[4], seq, PREFIX + len))
}

/// A frame read in place: its body borrows the buffer it was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameRef<'a> {
    pub kind: Kind,
    pub seq: u64,
    pub body: &'a [u8],
}

/// Reads the frame at the start of `buf` without copying it. `Ok(None)`: more bytes are
/// needed. `Ok(Some((frame, used)))`: a frame and how many bytes it took. A length over `max`
/// is refused as soon as the length prefix is read, a length under the header or an unknown
/// type as soon as those bytes are there.
pub fn split(buf: &[u8], max: usize) -> Result<Option<(FrameRef<'_>, usize)>, ProtocolError> {
    let Some(prefix) = buf.get(..PREFIX) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]) as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    if len < HEADER {
        return Err(ProtocolError::TooShort(len));
    }
    if let Some(&kind) = buf.get(PREFIX)
        && Kind::from_u8(kind).is_none()
    {
        return Err(ProtocolError::UnknownType(kind));
    }
    let Some(frame) = buf.get(..PREFIX + len) else {
        return Ok(None);
    };
    let kind = Kind::from_u8(frame[PREFIX]).ok_or(ProtocolError::UnknownType(frame[PREFIX]))?;
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&frame[PREFIX + 1..PREFIX + HEADER]);
    Ok(Some((
        FrameRef {
            kind,
            seq: u64::from_be_bytes(seq),
            body: &frame[PREFIX + HEADER..],
        },
        PREFIX + len,
    )))
}

/// ERROR codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ErrorCode {
    BadFrame = 1,
    FrameTooLarge = 2,
    UnknownType = 3,
    BadHello = 4,
    UnknownApp = 5,
    IdentityMismatch = 6,
    NoSession = 7,
    AppTrap = 8,
    AppTimeout = 9,
    AppMemory = 10,
    TooManyTraps = 11,
    IdleTimeout = 12,
    Unavailable = 13,
    Duplicate = 14,
    Revoked = 15,
}

impl ErrorCode {
    /// Every code, in wire order.
    pub const ALL: [ErrorCode; 15] = [
        ErrorCode::BadFrame,
        ErrorCode::FrameTooLarge,
        ErrorCode::UnknownType,
        ErrorCode::BadHello,
        ErrorCode::UnknownApp,
        ErrorCode::IdentityMismatch,
        ErrorCode::NoSession,
        ErrorCode::AppTrap,
        ErrorCode::AppTimeout,
        ErrorCode::AppMemory,
        ErrorCode::TooManyTraps,
        ErrorCode::IdleTimeout,
        ErrorCode::Unavailable,
        ErrorCode::Duplicate,
        ErrorCode::Revoked,
    ];

    /// The code's name, as PROTOCOL.md spells it: for logs, reports and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::FrameTooLarge => "frame_too_large",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::BadHello => "bad_hello",
            ErrorCode::UnknownApp => "unknown_app",
            ErrorCode::IdentityMismatch => "identity_mismatch",
            ErrorCode::NoSession => "no_session",
            ErrorCode::AppTrap => "app_trap",
            ErrorCode::AppTimeout => "app_timeout",
            ErrorCode::AppMemory => "app_memory",
            ErrorCode::TooManyTraps => "too_many_traps",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Duplicate => "duplicate",
            ErrorCode::Revoked => "revoked",
        }
    }

    /// The code with wire value `v`; `None` for a value this version does not know.
    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| *c as u16 == v)
    }
}

#[cfg(feature = "codec")]
pub mod codec;
#[cfg(feature = "codec")]
pub use codec::FrameCodec;

#[cfg(test)]
mod tests;
