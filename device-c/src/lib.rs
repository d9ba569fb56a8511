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
//!   are copied before the call returns.
//! - **Time** is the caller's monotonic clock in milliseconds.
//! - **Null pointers** are refused (a `false`, a 0, or `WASMBED_RESULT_NULL`), never
//!   dereferenced. A panic cannot cross into C: the library aborts instead (it has none on
//!   peer data: see the `wasmbed-device` crate's tests).

#![allow(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]

use core::ffi::{CStr, c_char};
use core::ptr;

use wasmbed_device::{
    Action, Cause, Config, Event, Resume, SendError, Session, SetupError, Status, Violation,
};

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

/// Bytes before the session's own memory: the handle, rounded up to 8.
const HEAD: usize = core::mem::size_of::<WasmbedSession>().next_multiple_of(8);

/// The config as the library takes it; `None` for a null or non-UTF-8 name.
///
/// # Safety
/// `c` is null or points to a valid `wasmbed_config` whose names are null or
/// NUL-terminated.
unsafe fn config<'a>(c: *const WasmbedConfig) -> Option<Config<'a>> {
    // SAFETY: the caller's promise above.
    let c = unsafe { c.as_ref() }?;
    let name = |p: *const c_char| {
        // SAFETY: non-null and NUL-terminated, as promised.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().ok())?
    };
    Some(Config {
        device: name(c.device)?,
        app: name(c.app)?,
        window: c.window,
        max_frame: c.max_frame,
        max_ticket: c.max_ticket,
        keepalive_ms: c.keepalive_ms,
        answer_timeout_ms: c.answer_timeout_ms,
        first_backoff_ms: c.first_backoff_ms,
        max_backoff_ms: c.max_backoff_ms,
        seed: c.seed,
    })
}

/// Fills `config` with the defaults (a 4 KiB window, frames up to 2 KiB, tickets up to 1 KiB,
/// keep-alive 30 s, answers within 5 s, backoff 100 ms to 30 s) for `device` and `app`
/// (NUL-terminated; the pointers are kept in `config`, the strings copied only at init).
///
/// # Safety
/// `config` is null or points to writable memory for a `wasmbed_config`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_config_init(
    config: *mut WasmbedConfig,
    device: *const c_char,
    app: *const c_char,
) {
    let d = Config::new("", "");
    let c = WasmbedConfig {
        device,
        app,
        window: d.window,
        max_frame: d.max_frame,
        max_ticket: d.max_ticket,
        keepalive_ms: d.keepalive_ms,
        answer_timeout_ms: d.answer_timeout_ms,
        first_backoff_ms: d.first_backoff_ms,
        max_backoff_ms: d.max_backoff_ms,
        seed: d.seed,
    };
    if !config.is_null() {
        // SAFETY: non-null and writable, as promised.
        unsafe { config.write(c) };
    }
}

/// The bytes of memory (aligned to 8) a session with `config` needs; 0 for a config that
/// cannot make one.
///
/// # Safety
/// As for `wasmbed_config_init`'s config, read only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_memory(config: *const WasmbedConfig) -> usize {
    // SAFETY: passed on.
    match unsafe { self::config(config) } {
        Some(c) => HEAD + Session::<&mut [u8]>::memory(&c),
        None => 0,
    }
}

/// Makes a session in `memory` (`len` bytes, aligned to 8); the handle, or null with the
/// reason in `*result` (when `result` is not null).
///
/// # Safety
/// `memory` is null or valid for `len` bytes, aligned to 8, and stays valid and untouched by
/// the caller while the handle is used; `config` as for `wasmbed_session_memory`; `result`
/// is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_init(
    memory: *mut u8,
    len: usize,
    config: *const WasmbedConfig,
    result: *mut WasmbedResult,
) -> *mut WasmbedSession {
    let fail = |r| {
        if !result.is_null() {
            // SAFETY: non-null and writable, as promised.
            unsafe { result.write(r) };
        }
        ptr::null_mut()
    };
    if memory.is_null() || config.is_null() {
        return fail(WasmbedResult::Null);
    }
    if !(memory as usize).is_multiple_of(core::mem::align_of::<WasmbedSession>().max(8)) {
        return fail(WasmbedResult::Alignment);
    }
    // SAFETY: passed on.
    let Some(c) = (unsafe { self::config(config) }) else {
        return fail(WasmbedResult::Config);
    };
    if len < HEAD {
        return fail(WasmbedResult::Memory);
    }
    // SAFETY: `memory` is valid for `len` bytes and the caller gives it to the session for
    // as long as the handle is used; the handle's bytes and the session's do not overlap.
    let arena: &'static mut [u8] =
        unsafe { core::slice::from_raw_parts_mut(memory.add(HEAD), len - HEAD) };
    let session = match Session::new(&c, arena) {
        Ok(s) => s,
        Err(SetupError::Memory { .. }) => return fail(WasmbedResult::Memory),
        Err(SetupError::Config) => return fail(WasmbedResult::Config),
    };
    let handle = memory.cast::<WasmbedSession>();
    // SAFETY: aligned (checked), room for it (HEAD), and ours (the caller's promise).
    unsafe { handle.write(WasmbedSession { session }) };
    if !result.is_null() {
        // SAFETY: as above.
        unsafe { result.write(WasmbedResult::Ok) };
    }
    handle
}

/// The session behind a handle.
///
/// # Safety
/// `s` is null or a handle from `wasmbed_session_init` whose memory is still valid, used by
/// one caller at a time.
unsafe fn session<'a>(s: *mut WasmbedSession) -> Option<&'a mut Session<&'static mut [u8]>> {
    // SAFETY: the caller's promise above.
    unsafe { s.as_mut() }.map(|h| &mut h.session)
}

/// What the transport should do now. A null handle reads as DONE.
///
/// # Safety
/// `s` as everywhere: null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_status(s: *mut WasmbedSession) -> WasmbedStatus {
    // SAFETY: passed on.
    match unsafe { session(s) }.map(|s| s.status()) {
        Some(Status::Connect) => WasmbedStatus::Connect,
        Some(Status::Wait) => WasmbedStatus::Wait,
        Some(Status::Connected) => WasmbedStatus::Connected,
        Some(Status::Close) => WasmbedStatus::Close,
        Some(Status::Done) | None => WasmbedStatus::Done,
    }
}

/// The connection is open (TLS done); HELLO goes first.
///
/// # Safety
/// `s`: null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_connected(s: *mut WasmbedSession, now_ms: u64) {
    // SAFETY: passed on.
    if let Some(s) = unsafe { session(s) } {
        s.connected(now_ms);
    }
}

/// The connection ended (closed by either side, failed, or never opened).
///
/// # Safety
/// `s`: null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_closed(s: *mut WasmbedSession, now_ms: u64) {
    // SAFETY: passed on.
    if let Some(s) = unsafe { session(s) } {
        s.closed(now_ms);
    }
}

/// Bytes received; how many were taken. Take the events (`wasmbed_session_poll_event` until
/// false) and feed the rest again.
///
/// # Safety
/// `s`: null or a live handle; `bytes` null or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_feed(
    s: *mut WasmbedSession,
    bytes: *const u8,
    len: usize,
    now_ms: u64,
) -> usize {
    // SAFETY: passed on.
    let Some(s) = (unsafe { session(s) }) else {
        return 0;
    };
    if bytes.is_null() {
        return 0;
    }
    // SAFETY: valid for `len` bytes, as promised; copied before returning.
    s.feed(unsafe { core::slice::from_raw_parts(bytes, len) }, now_ms)
}

/// Bytes to write now: their count, and `*bytes` pointing at them (in the session's memory,
/// valid until the next call on it). Then `wasmbed_session_sent` with how many went.
///
/// # Safety
/// `s`: null or a live handle; `bytes` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_poll_send(
    s: *mut WasmbedSession,
    bytes: *mut *const u8,
) -> usize {
    // SAFETY: passed on.
    let Some(s) = (unsafe { session(s) }) else {
        return 0;
    };
    if bytes.is_null() {
        return 0;
    }
    let out = s.poll_send();
    // SAFETY: non-null and writable, as promised.
    unsafe { bytes.write(out.as_ptr()) };
    out.len()
}

/// `n` of the bytes `wasmbed_session_poll_send` gave were written.
///
/// # Safety
/// `s`: null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_sent(s: *mut WasmbedSession, n: usize) {
    // SAFETY: passed on.
    if let Some(s) = unsafe { session(s) } {
        s.sent(n);
    }
}

/// When `wasmbed_session_handle_timeout` is due: true and `*at_ms`, or false (not until
/// something happens).
///
/// # Safety
/// `s`: null or a live handle; `at_ms` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_poll_timeout(
    s: *mut WasmbedSession,
    at_ms: *mut u64,
) -> bool {
    // SAFETY: passed on.
    let Some(t) = (unsafe { session(s) }).and_then(|s| s.poll_timeout()) else {
        return false;
    };
    if !at_ms.is_null() {
        // SAFETY: non-null and writable, as promised.
        unsafe { at_ms.write(t) };
    }
    true
}

/// The time is `now_ms`: back-off over, answers overdue, keep-alive.
///
/// # Safety
/// `s`: null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_handle_timeout(s: *mut WasmbedSession, now_ms: u64) {
    // SAFETY: passed on.
    if let Some(s) = unsafe { session(s) } {
        s.handle_timeout(now_ms);
    }
}

/// Queues DATA (`len` bytes, copied); its sequence in `*seq` (when not null). It goes when a
/// session is open and is resent until a ticket covers it.
///
/// # Safety
/// `s`: null or a live handle; `body` null (with `len` 0) or valid for `len` bytes; `seq`
/// null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_send_data(
    s: *mut WasmbedSession,
    body: *const u8,
    len: usize,
    seq: *mut u64,
) -> WasmbedResult {
    // SAFETY: passed on.
    let Some(s) = (unsafe { session(s) }) else {
        return WasmbedResult::Null;
    };
    let body: &[u8] = match (body.is_null(), len) {
        (true, 0) => &[],
        (true, _) => return WasmbedResult::Null,
        // SAFETY: valid for `len` bytes, as promised; copied before returning.
        (false, _) => unsafe { core::slice::from_raw_parts(body, len) },
    };
    match s.send_data(body) {
        Ok(n) => {
            if !seq.is_null() {
                // SAFETY: non-null and writable, as promised.
                unsafe { seq.write(n) };
            }
            WasmbedResult::Ok
        }
        Err(SendError::WindowFull) => WasmbedResult::WindowFull,
        Err(SendError::TooLarge) => WasmbedResult::TooLarge,
        Err(SendError::Done) => WasmbedResult::Done,
    }
}

/// The next event into `*event`: true, or false when there is none. Call it until false
/// after every feed, close and timeout.
///
/// # Safety
/// `s`: null or a live handle; `event` null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_poll_event(
    s: *mut WasmbedSession,
    event: *mut WasmbedEvent,
) -> bool {
    if event.is_null() {
        return false;
    }
    // SAFETY: passed on.
    let Some(e) = (unsafe { session(s) }).and_then(|s| s.poll_event()) else {
        return false;
    };
    // SAFETY: non-null and writable, as promised.
    unsafe { event.write(WasmbedEvent::from(e)) };
    true
}

/// The latest ticket: true with `*seq` (the last DATA it covers), `*ticket` and `*len` (in
/// the session's memory, valid until the next call); false when there is none.
///
/// # Safety
/// `s`: null or a live handle; the out pointers null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_ticket(
    s: *mut WasmbedSession,
    seq: *mut u64,
    ticket: *mut *const u8,
    len: *mut usize,
) -> bool {
    // SAFETY: passed on.
    let Some((n, t)) = (unsafe { session(s) }).and_then(|s| s.ticket()) else {
        return false;
    };
    if seq.is_null() || ticket.is_null() || len.is_null() {
        return false;
    }
    // SAFETY: non-null and writable, as promised.
    unsafe {
        seq.write(n);
        ticket.write(t.as_ptr());
        len.write(t.len());
    }
    true
}

/// A ticket kept across a reboot (copied), before any DATA: the first connection resumes
/// from it. False when DATA was already queued or the ticket is too large.
///
/// # Safety
/// `s`: null or a live handle; `ticket` null or valid for `len` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_restore(
    s: *mut WasmbedSession,
    seq: u64,
    ticket: *const u8,
    len: usize,
) -> bool {
    // SAFETY: passed on.
    let Some(s) = (unsafe { session(s) }) else {
        return false;
    };
    if ticket.is_null() {
        return false;
    }
    // SAFETY: valid for `len` bytes, as promised; copied before returning.
    s.restore(seq, unsafe { core::slice::from_raw_parts(ticket, len) })
}

/// DATA given that has no answer event yet.
///
/// # Safety
/// `s`: null or a live handle.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn wasmbed_session_owed(s: *mut WasmbedSession) -> u64 {
    // SAFETY: passed on.
    unsafe { session(s) }.map_or(0, |s| s.owed())
}
