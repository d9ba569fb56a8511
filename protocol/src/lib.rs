//! The device session protocol: frames over any byte stream, with no I/O here.
//!
//! A frame is `u32` big-endian length of the rest, `u8` type, `u64` sequence, body. The header
//! is fixed so a proxy can track and replay frames without decoding bodies. Control bodies
//! are CBOR; DATA, REPLY and PUSH bodies are the application's opaque bytes. See PROTOCOL.md.

#![forbid(unsafe_code)]

use serde::{Deserialize, Serialize};

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

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub body: Vec<u8>,
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
    #[error("malformed {what} body: {detail}")]
    Body { what: &'static str, detail: String },
}

impl ProtocolError {
    /// The ERROR code this problem is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ProtocolError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            ProtocolError::UnknownType(_) => ErrorCode::UnknownType,
            ProtocolError::TooShort(_) | ProtocolError::Body { .. } => ErrorCode::BadFrame,
        }
    }
}

impl Frame {
    pub fn new(kind: Kind, seq: u64, body: impl Into<Vec<u8>>) -> Frame {
        Frame {
            kind,
            seq,
            body: body.into(),
        }
    }

    /// A control frame whose body is `value` as CBOR.
    pub fn control<T: Serialize>(kind: Kind, seq: u64, value: &T) -> Frame {
        let mut body = Vec::new();
        // Writing CBOR into a Vec cannot fail for these plain structs.
        let _ = ciborium::into_writer(value, &mut body);
        Frame { kind, seq, body }
    }

    /// The body decoded as the CBOR control structure `T`.
    pub fn decode_body<T: for<'de> Deserialize<'de>>(
        &self,
        what: &'static str,
    ) -> Result<T, ProtocolError> {
        ciborium::from_reader(self.body.as_slice()).map_err(|e| ProtocolError::Body {
            what,
            detail: e.to_string(),
        })
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let len = (HEADER + self.body.len()) as u32;
        out.reserve(PREFIX + HEADER + self.body.len());
        out.extend_from_slice(&len.to_be_bytes());
        out.push(self.kind as u8);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.body);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// The fixed header of the frame at the start of `buf`, without decoding its body:
/// `(kind byte, sequence, total encoded length)`; `None` while fewer than 13 bytes are there.
pub fn peek_header(buf: &[u8]) -> Option<(u8, u64, usize)> {
    let h = buf.get(..PREFIX + HEADER)?;
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let seq = u64::from_be_bytes([h[5], h[6], h[7], h[8], h[9], h[10], h[11], h[12]]);
    Some((h[4], seq, PREFIX + len))
}

/// Decodes the frame at the start of `buf`. `Ok(None)`: more bytes are needed. `Ok(Some((frame,
/// used)))`: a frame and how many bytes it took. A length over `max` is refused as soon as
/// the length prefix is read, before anything is allocated.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, ProtocolError> {
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
        Frame {
            kind,
            seq: u64::from_be_bytes(seq),
            body: frame[PREFIX + HEADER..].to_vec(),
        },
        PREFIX + len,
    )))
}

/// HELLO: the device opens a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub device: String,
    pub app: String,
    /// A sealed ticket from an earlier CHECKPOINT: resume that session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume: Option<serde_bytes::ByteBuf>,
}

/// WELCOME: the gateway took the session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub session: String,
    pub gateway: String,
    /// HELLO carried a ticket and the session resumed from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed: Option<Resumed>,
    /// HELLO carried a ticket that was not taken; the session started fresh. One of
    /// `expired`, `bad_ticket`, `other_device`, `other_app`, `restore_failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_refused: Option<String>,
}

/// WELCOME's account of a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resumed {
    /// The last DATA the ticket covers: DATA up to it is answered ERROR `duplicate`.
    pub seq: u64,
    /// `restored`: the app got its state back; `fresh`: the app keeps no state it can hand
    /// over, so it starts afresh.
    pub state: String,
}

/// CHECKPOINT: the session so far, sealed; the frame's sequence is the last DATA it covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub ticket: serde_bytes::ByteBuf,
}

/// ERROR: a problem, by code; `text` is for humans.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: u16,
    pub text: String,
}

impl ErrorBody {
    /// The code's name, or `code N` for a code this version does not know.
    pub fn code_name(&self) -> std::borrow::Cow<'static, str> {
        match ErrorCode::from_u16(self.code) {
            Some(c) => c.as_str().into(),
            None => format!("code {}", self.code).into(),
        }
    }
}

impl std::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.code_name(), self.text)
    }
}

/// GOAWAY: the gateway is leaving; reconnect (through the proxy) and resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goaway {
    pub reason: String,
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

    pub fn frame(self, seq: u64, text: impl Into<String>) -> Frame {
        Frame::control(
            Kind::Error,
            seq,
            &ErrorBody {
                code: self as u16,
                text: text.into(),
            },
        )
    }
}

#[cfg(feature = "codec")]
pub mod codec;
#[cfg(feature = "codec")]
pub use codec::FrameCodec;

#[cfg(test)]
mod tests;
