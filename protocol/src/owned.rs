//! The owned frame and the serde control types (feature `alloc`): what the gateway, the proxy
//! and the tests build and read. A device reads the same bodies in place with [`crate::body`].

use alloc::borrow::Cow;
use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use serde::{Deserialize, Serialize};

use crate::{ErrorCode, HEADER, Kind, PREFIX, ProtocolError};

/// One frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: Kind,
    pub seq: u64,
    pub body: Vec<u8>,
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
        out.reserve(PREFIX + HEADER + self.body.len());
        out.extend_from_slice(&crate::header_bytes(self.kind, self.seq, self.body.len()));
        out.extend_from_slice(&self.body);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.encode_into(&mut out);
        out
    }
}

/// Decodes the frame at the start of `buf` into an owned [`Frame`]: [`crate::split`], copied.
pub fn decode(buf: &[u8], max: usize) -> Result<Option<(Frame, usize)>, ProtocolError> {
    Ok(crate::split(buf, max)?.map(|(f, used)| {
        (
            Frame {
                kind: f.kind,
                seq: f.seq,
                body: f.body.to_vec(),
            },
            used,
        )
    }))
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
    pub fn code_name(&self) -> Cow<'static, str> {
        match ErrorCode::from_u16(self.code) {
            Some(c) => c.as_str().into(),
            None => format!("code {}", self.code).into(),
        }
    }
}

impl core::fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{} ({})", self.code_name(), self.text)
    }
}

/// GOAWAY: the gateway is leaving; reconnect (through the proxy) and resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goaway {
    pub reason: String,
}

impl ErrorCode {
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
