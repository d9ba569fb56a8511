//! The C API of `wasmbed-device`: the same state machine, for firmware written in C.
//!
//! This crate is the one place the device library meets C, so it is the one place with
//! `unsafe`: every function takes pointers from C, and the session lives in memory the caller
//! owns. What each pointer must be is said on each function (and in the generated header,
//! `include/wasmbed_device.h`). The rules, once:
//!
//! - **No global state, no allocation.** A session is a region of the caller's memory
//!   (`wasmbed_session_memory` bytes, aligned to 8) given to `wasmbed_session_init`; the
//!   handle it returns points into that region. The region must stay valid and untouched
//!   while the handle is used; to end a session, stop using it (nothing to free).
//! - **Borrowed bytes.** What `wasmbed_session_poll_send`, `wasmbed_session_poll_event` and
//!   `wasmbed_session_ticket` point at lies in the session's memory and is valid until the
//!   next call on that session. Bytes the caller passes in (`feed`, `send_data`, `restore`)
//!   are copied before the call returns, and must not lie in the session's memory (copy an
//!   event's bytes out first): such a call is refused (`WASMBED_RESULT_OVERLAP`, 0, false).
//! - **Time** is the caller's monotonic clock in milliseconds.
//! - **Null pointers** are refused (a `false`, a 0, or `WASMBED_RESULT_NULL`), never
//!   dereferenced. A panic cannot cross into C: the library aborts instead (it has none on
//!   peer data: see the `wasmbed-device` crate's tests).

#![no_std]
#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

// A host library (the default) links std, and its panic machinery; a firmware's (`no_std`,
// `--no-default-features`) has this crate's own panic handler.
#[cfg(any(feature = "std", test))]
extern crate std;

/// A panic in a `no_std` build (none is reachable from peer data: the `wasmbed-device`
/// crate's tests): the library stops where it is, as a C firmware without unwinding would
/// (its watchdog resets the device). Build it with `panic = "abort"`.
#[cfg(not(any(feature = "std", test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo<'_>) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

use core::ffi::c_char;
use core::ptr;

use wasmbed_device::{Action, Cause, Event, Resume, Session, Violation};

/// A session's settings. `wasmbed_config_init` fills in the defaults.
#[repr(C)]
pub struct WasmbedConfig {
    /// The device's id (its certificate's common name), NUL-terminated UTF-8; copied.
    pub device: *const c_char,
    /// The application to open, NUL-terminated UTF-8; copied.
    pub app: *const c_char,
    /// Bytes kept for resend: each DATA takes 13 bytes plus its body until a ticket covers
    /// it.
    pub window: usize,
    /// The largest frame accepted (its length field).
    pub max_frame: usize,
    /// The largest ticket kept.
    pub max_ticket: usize,
    /// A PING after this long without a frame from the peer; 0: none.
    pub keepalive_ms: u64,
    /// How long WELCOME (and the answers after GOAWAY) may take.
    pub answer_timeout_ms: u64,
    /// Backoff between failed attempts, doubled each time up to the maximum.
    pub first_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Seeds the backoff's jitter: give each device its own (a hardware random number).
    pub seed: u64,
}

/// A session (opaque): lives at the start of the caller's memory.
pub struct WasmbedSession {
    session: Session<&'static mut [u8]>,
    /// The caller's memory, all of it: bytes passed in must lie outside.
    memory: core::ops::Range<usize>,
}

impl WasmbedSession {
    /// Whether `len` bytes at `p` lie (partly) in this session's memory.
    fn holds(&self, p: *const u8, len: usize) -> bool {
        let start = p as usize;
        let end = start.saturating_add(len);
        start < self.memory.end && self.memory.start < end
    }
}

/// What the transport should do now (`wasmbed_session_status`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmbedStatus {
    /// Open a connection (TCP, then TLS), then `wasmbed_session_connected`, or
    /// `wasmbed_session_closed` if it failed.
    Connect,
    /// Nothing to do until `wasmbed_session_poll_timeout`.
    Wait,
    /// Connected: write what `wasmbed_session_poll_send` gives, feed what arrives.
    Connected,
    /// Close the connection, then `wasmbed_session_closed`.
    Close,
    /// Over for good (the gateway refused the device: see the DISCONNECTED event's action).
    Done,
}

/// Results of calls that can fail.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmbedResult {
    Ok,
    /// A pointer that must not be null was null.
    Null,
    /// `wasmbed_session_init`: the memory is smaller than `wasmbed_session_memory`.
    Memory,
    /// `wasmbed_session_init`: the memory is not aligned to 8 bytes.
    Alignment,
    /// `wasmbed_session_init`: an empty or non-UTF-8 name, or a size too small.
    Config,
    /// `wasmbed_session_send_data`: the window is full; try again after an answer.
    WindowFull,
    /// `wasmbed_session_send_data`: the body can never fit the window.
    TooLarge,
    /// `wasmbed_session_send_data`: the session is over.
    Done,
    /// Bytes passed in lie in the session's own memory (an event's bytes, say): copy them
    /// out first.
    Overlap,
}

/// The kind of an event (`wasmbed_event.kind`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmbedEventKind {
    /// A session opened: `data`/`len` the gateway's name, `resume` how, `seq` the DATA it
    /// resumed after, `text`/`text_len` why a ticket was refused.
    Welcome,
    /// The answer to DATA `seq`: `data`/`len`.
    Reply,
    /// DATA `seq` was answered ERROR `code` (the app failed on it).
    Failed,
    /// DATA `seq` is in the resumed state; its answer was lost with the connection.
    Covered,
    /// DATA `seq` will never be answered.
    Lost,
    /// Bytes the app sent unprompted: `data`/`len`, its `seq`.
    Push,
    /// A new ticket covering DATA up to `seq`: store `wasmbed_session_ticket` to survive a
    /// reboot.
    Checkpoint,
    /// The gateway is leaving; the session will resume elsewhere by itself.
    Goaway,
    /// The connection ended: `cause`, and for REFUSED the ERROR `code` and `action`.
    Disconnected,
}

/// How a session started (`wasmbed_event.resume`, WELCOME).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmbedResume {
    /// No ticket was presented.
    New,
    /// The ticket was taken: the app's state is back.
    Restored,
    /// The ticket was taken; the app keeps no state.
    Stateless,
    /// The ticket was refused (`text` says why): the app's state restarted.
    Refused,
}

/// Why a connection ended (`wasmbed_event.cause`, DISCONNECTED).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmbedCause {
    Closed,
    Goaway,
    /// No WELCOME, no answers after GOAWAY, or no PONG in time.
    Silent,
    /// ERROR `code` about the session; `action` says what the device does.
    Refused,
    /// The peer broke the protocol (`code`: the ERROR code naming it, 0 for other breaks).
    Violation,
}

/// What a session-level ERROR means (`wasmbed_event.action`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmbedAction {
    /// Reconnect after a backoff and resume.
    Retry,
    /// Reconnect after a backoff without the ticket.
    Fresh,
    /// Stop: an operator must act (unknown app, identity mismatch, revoked).
    GiveUp,
}

/// One event. Pointers are into the session's memory, valid until the next call on it.
#[repr(C)]
pub struct WasmbedEvent {
    pub kind: WasmbedEventKind,
    pub seq: u64,
    pub code: u16,
    pub data: *const u8,
    pub len: usize,
    pub text: *const u8,
    pub text_len: usize,
    pub resume: WasmbedResume,
    pub cause: WasmbedCause,
    pub action: WasmbedAction,
}

impl WasmbedEvent {
    fn of(kind: WasmbedEventKind) -> WasmbedEvent {
        WasmbedEvent {
            kind,
            seq: 0,
            code: 0,
            data: ptr::null(),
            len: 0,
            text: ptr::null(),
            text_len: 0,
            resume: WasmbedResume::New,
            cause: WasmbedCause::Closed,
            action: WasmbedAction::Retry,
        }
    }

    fn from(e: Event<'_>) -> WasmbedEvent {
        use WasmbedEventKind as K;
        let with = |kind, seq| WasmbedEvent {
            seq,
            ..WasmbedEvent::of(kind)
        };
        match e {
            Event::Welcome {
                gateway, resume, ..
            } => {
                let (resume, seq, text) = match resume {
                    Resume::New => (WasmbedResume::New, 0, ""),
                    Resume::Restored { seq } => (WasmbedResume::Restored, seq, ""),
                    Resume::Stateless { seq } => (WasmbedResume::Stateless, seq, ""),
                    Resume::Refused { reason } => (WasmbedResume::Refused, 0, reason),
                };
                WasmbedEvent {
                    data: gateway.as_ptr(),
                    len: gateway.len(),
                    text: text.as_ptr(),
                    text_len: text.len(),
                    resume,
                    ..with(K::Welcome, seq)
                }
            }
            Event::Reply { seq, body } | Event::Push { seq, body } => WasmbedEvent {
                data: body.as_ptr(),
                len: body.len(),
                ..with(
                    if matches!(e, Event::Reply { .. }) {
                        K::Reply
                    } else {
                        K::Push
                    },
                    seq,
                )
            },
            Event::Failed { seq, code } => WasmbedEvent {
                code,
                ..with(K::Failed, seq)
            },
            Event::Covered { seq } => with(K::Covered, seq),
            Event::Lost { seq } => with(K::Lost, seq),
            Event::Checkpoint { seq } => with(K::Checkpoint, seq),
            Event::Goaway => with(K::Goaway, 0),
            Event::Disconnected { cause } => {
                let mut ev = with(K::Disconnected, 0);
                ev.cause = match cause {
                    Cause::Closed => WasmbedCause::Closed,
                    Cause::Goaway => WasmbedCause::Goaway,
                    Cause::Silent => WasmbedCause::Silent,
                    Cause::Refused { code, action } => {
                        ev.code = code;
                        ev.action = match action {
                            Action::Retry => WasmbedAction::Retry,
                            Action::Fresh => WasmbedAction::Fresh,
                            Action::GiveUp => WasmbedAction::GiveUp,
                        };
                        WasmbedCause::Refused
                    }
                    Cause::Violation(v) => {
                        if let Violation::Frame(code) = v {
                            ev.code = code as u16;
                        }
                        WasmbedCause::Violation
                    }
                };
                ev
            }
        }
    }
}

mod api;

pub use api::*;
