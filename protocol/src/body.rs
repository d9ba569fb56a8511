//! The control bodies read and written in place: no allocation, no copy (`no_std`).
//!
//! Each `…Ref` borrows the bytes it was read from; `encode` writes into a caller's slice. The
//! bytes are the same CBOR maps the owned serde types make (see PROTOCOL.md; the crate's tests
//! check that each side reads what the other writes, and the documented examples byte for
//! byte). Readers take the keys in any order, skip keys they do not know, and refuse a body
//! missing a key they need or holding one of the wrong type.

use minicbor::data::Type;
use minicbor::decode::Decoder;
use minicbor::encode::Encoder;
use minicbor::encode::write::{Cursor, EndOfSlice};

/// A control body that is not the CBOR map its frame type needs; names the frame type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("malformed {0} body")]
pub struct BadBody(pub &'static str);

/// The slice given to an `encode` is too small for the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the buffer is too small for the body")]
pub struct TooSmall;

impl From<minicbor::encode::Error<EndOfSlice>> for TooSmall {
    fn from(_: minicbor::encode::Error<EndOfSlice>) -> TooSmall {
        TooSmall
    }
}

/// Reads a map, calling `field` with each key and the decoder positioned on its value;
/// `field` returns false for a key it does not know (its value is skipped).
fn read_map<'b>(
    bytes: &'b [u8],
    what: &'static str,
    mut field: impl FnMut(&'b str, &mut Decoder<'b>) -> Result<bool, minicbor::decode::Error>,
) -> Result<(), BadBody> {
    let bad = |_| BadBody(what);
    let mut d = Decoder::new(bytes);
    let len = d.map().map_err(bad)?;
    let mut i = 0u64;
    loop {
        match len {
            Some(n) if i == n => break,
            None if d.datatype().map_err(bad)? == Type::Break => {
                d.skip().map_err(bad)?;
                break;
            }
            _ => {}
        }
        let key = d.str().map_err(bad)?;
        if !field(key, &mut d).map_err(bad)? {
            d.skip().map_err(bad)?;
        }
        i += 1;
    }
    // One map, and nothing after it.
    if d.position() != bytes.len() {
        return Err(BadBody(what));
    }
    Ok(())
}

/// Writes with `f` into `out`; the number of bytes written.
fn write(
    out: &mut [u8],
    f: impl FnOnce(&mut Encoder<Cursor<&mut [u8]>>) -> Result<(), minicbor::encode::Error<EndOfSlice>>,
) -> Result<usize, TooSmall> {
    let mut e = Encoder::new(Cursor::new(out));
    f(&mut e)?;
    Ok(e.into_writer().position())
}

/// Bytes a CBOR header for a text or byte string of `len` takes, at most.
const fn head(len: usize) -> usize {
    match len {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        _ => 5,
    }
}

/// HELLO's body: `{device, app, resume?}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HelloRef<'a> {
    pub device: &'a str,
    pub app: &'a str,
    /// A sealed ticket from an earlier CHECKPOINT: resume that session.
    pub resume: Option<&'a [u8]>,
}

impl<'a> HelloRef<'a> {
    /// The most bytes the body of a HELLO with these lengths takes.
    pub const fn max_len(device: usize, app: usize, ticket: usize) -> usize {
        1 + (1 + 6)
            + head(device)
            + device
            + (1 + 3)
            + head(app)
            + app
            + (1 + 6)
            + head(ticket)
            + ticket
    }

    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooSmall> {
        write(out, |e| {
            e.map(if self.resume.is_some() { 3 } else { 2 })?
                .str("device")?
                .str(self.device)?
                .str("app")?
                .str(self.app)?;
            if let Some(t) = self.resume {
                e.str("resume")?.bytes(t)?;
            }
            Ok(())
        })
    }

    pub fn decode(bytes: &'a [u8]) -> Result<HelloRef<'a>, BadBody> {
        let (mut device, mut app, mut resume) = (None, None, None);
        read_map(bytes, "HELLO", |k, d| {
            match k {
                "device" => device = Some(d.str()?),
                "app" => app = Some(d.str()?),
                "resume" => resume = Some(d.bytes()?),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(HelloRef {
            device: device.ok_or(BadBody("HELLO"))?,
            app: app.ok_or(BadBody("HELLO"))?,
            resume,
        })
    }
}

/// WELCOME's account of a resume: `{seq, state}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumedRef<'a> {
    /// The last DATA the ticket covers.
    pub seq: u64,
    /// `restored` or `fresh`.
    pub state: &'a str,
}

/// WELCOME's body: `{session, gateway, resumed?, resume_refused?}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WelcomeRef<'a> {
    pub session: &'a str,
    pub gateway: &'a str,
    pub resumed: Option<ResumedRef<'a>>,
    pub resume_refused: Option<&'a str>,
}

impl<'a> WelcomeRef<'a> {
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooSmall> {
        write(out, |e| {
            let n =
                2 + u64::from(self.resumed.is_some()) + u64::from(self.resume_refused.is_some());
            e.map(n)?
                .str("session")?
                .str(self.session)?
                .str("gateway")?
                .str(self.gateway)?;
            if let Some(r) = self.resumed {
                e.str("resumed")?
                    .map(2)?
                    .str("seq")?
                    .u64(r.seq)?
                    .str("state")?
                    .str(r.state)?;
            }
            if let Some(r) = self.resume_refused {
                e.str("resume_refused")?.str(r)?;
            }
            Ok(())
        })
    }

    pub fn decode(bytes: &'a [u8]) -> Result<WelcomeRef<'a>, BadBody> {
        let (mut session, mut gateway, mut resumed, mut refused) = (None, None, None, None);
        read_map(bytes, "WELCOME", |k, d| {
            match k {
                "session" => session = Some(d.str()?),
                "gateway" => gateway = Some(d.str()?),
                "resume_refused" => refused = Some(d.str()?),
                "resumed" => {
                    // The nested map, read in place: its own bytes are the value's span.
                    let start = d.position();
                    d.skip()?;
                    let inner = &d.input()[start..d.position()];
                    let (mut seq, mut state) = (None, None);
                    read_map(inner, "WELCOME", |k, d| {
                        match k {
                            "seq" => seq = Some(d.u64()?),
                            "state" => state = Some(d.str()?),
                            _ => return Ok(false),
                        }
                        Ok(true)
                    })
                    .map_err(|_| minicbor::decode::Error::message("resumed"))?;
                    match (seq, state) {
                        (Some(seq), Some(state)) => resumed = Some(ResumedRef { seq, state }),
                        _ => return Err(minicbor::decode::Error::message("resumed")),
                    }
                }
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(WelcomeRef {
            session: session.ok_or(BadBody("WELCOME"))?,
            gateway: gateway.ok_or(BadBody("WELCOME"))?,
            resumed,
            resume_refused: refused,
        })
    }
}

/// CHECKPOINT's body: `{ticket}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointRef<'a> {
    pub ticket: &'a [u8],
}

impl<'a> CheckpointRef<'a> {
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooSmall> {
        write(out, |e| {
            e.map(1)?.str("ticket")?.bytes(self.ticket)?;
            Ok(())
        })
    }

    pub fn decode(bytes: &'a [u8]) -> Result<CheckpointRef<'a>, BadBody> {
        let mut ticket = None;
        read_map(bytes, "CHECKPOINT", |k, d| {
            if k != "ticket" {
                return Ok(false);
            }
            ticket = Some(d.bytes()?);
            Ok(true)
        })?;
        Ok(CheckpointRef {
            ticket: ticket.ok_or(BadBody("CHECKPOINT"))?,
        })
    }
}

/// ERROR's body: `{code, text}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorRef<'a> {
    pub code: u16,
    pub text: &'a str,
}

impl<'a> ErrorRef<'a> {
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooSmall> {
        write(out, |e| {
            e.map(2)?
                .str("code")?
                .u16(self.code)?
                .str("text")?
                .str(self.text)?;
            Ok(())
        })
    }

    pub fn decode(bytes: &'a [u8]) -> Result<ErrorRef<'a>, BadBody> {
        let (mut code, mut text) = (None, None);
        read_map(bytes, "ERROR", |k, d| {
            match k {
                "code" => code = Some(d.u16()?),
                "text" => text = Some(d.str()?),
                _ => return Ok(false),
            }
            Ok(true)
        })?;
        Ok(ErrorRef {
            code: code.ok_or(BadBody("ERROR"))?,
            text: text.ok_or(BadBody("ERROR"))?,
        })
    }
}

/// GOAWAY's body: `{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GoawayRef<'a> {
    pub reason: &'a str,
}

impl<'a> GoawayRef<'a> {
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, TooSmall> {
        write(out, |e| {
            e.map(1)?.str("reason")?.str(self.reason)?;
            Ok(())
        })
    }

    pub fn decode(bytes: &'a [u8]) -> Result<GoawayRef<'a>, BadBody> {
        let mut reason = None;
        read_map(bytes, "GOAWAY", |k, d| {
            if k != "reason" {
                return Ok(false);
            }
            reason = Some(d.str()?);
            Ok(true)
        })?;
        Ok(GoawayRef {
            reason: reason.ok_or(BadBody("GOAWAY"))?,
        })
    }
}
