//! The functions C calls. Every one takes its pointers as the crate's documentation says
//! (null or valid); each `unsafe` block names what it relies on.

use core::ffi::{CStr, c_char};
use core::ptr;

use wasmbed_device::{Config, SendError, Session, SetupError, Status};

use crate::{WasmbedConfig, WasmbedEvent, WasmbedResult, WasmbedSession, WasmbedStatus};

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
        // `usize::MAX`: no memory is enough, or the config is refused.
        Some(c) => match Session::<&mut [u8]>::memory(&c) {
            usize::MAX => 0,
            n => n.checked_add(HEAD).unwrap_or(0),
        },
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
    let memory = memory as usize..memory as usize + len;
    // SAFETY: aligned (checked), room for it (HEAD), and ours (the caller's promise).
    unsafe { handle.write(WasmbedSession { session, memory }) };
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
    unsafe { handle(s) }.map(|h| &mut h.session)
}

/// The handle itself.
///
/// # Safety
/// As for [`session`].
unsafe fn handle<'a>(s: *mut WasmbedSession) -> Option<&'a mut WasmbedSession> {
    // SAFETY: the caller's promise above.
    unsafe { s.as_mut() }
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
    let Some(h) = (unsafe { handle(s) }) else {
        return 0;
    };
    if bytes.is_null() || h.holds(bytes, len) {
        return 0;
    }
    // SAFETY: valid for `len` bytes, as promised, and not in the session's memory (checked);
    // copied before returning.
    h.session
        .feed(unsafe { core::slice::from_raw_parts(bytes, len) }, now_ms)
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
    let Some(h) = (unsafe { handle(s) }) else {
        return WasmbedResult::Null;
    };
    let body: &[u8] = match (body.is_null(), len) {
        (true, 0) => &[],
        (true, _) => return WasmbedResult::Null,
        (false, _) if h.holds(body, len) => return WasmbedResult::Overlap,
        // SAFETY: valid for `len` bytes, as promised, and not in the session's memory
        // (checked); copied before returning.
        (false, _) => unsafe { core::slice::from_raw_parts(body, len) },
    };
    match h.session.send_data(body) {
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

/// A ticket kept across a reboot (copied), before any DATA and any connection: the first
/// connection resumes from it. False when DATA was already queued, a connection was made, or
/// the ticket is too large.
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
    let Some(h) = (unsafe { handle(s) }) else {
        return false;
    };
    if ticket.is_null() || h.holds(ticket, len) {
        return false;
    }
    // SAFETY: valid for `len` bytes, as promised, and not in the session's memory (checked);
    // copied before returning.
    h.session
        .restore(seq, unsafe { core::slice::from_raw_parts(ticket, len) })
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
