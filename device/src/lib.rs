//! The device side of a Wasmbed session, as a state machine with no I/O and no clock of its
//! own (the quinn-proto pattern), for firmware (`no_std`, no allocation) and for the fleet
//! simulator alike.
//!
//! A [`Session`] lives in memory the caller gives it (sized by [`Config`]: [`Session::memory`]
//! says how much) and is driven by a loop of the caller's, over any transport that carries
//! bytes in order (TLS over TCP, a QUIC stream):
//!
//! - [`Session::status`] says what the transport should do: open a connection
//!   ([`Status::Connect`], then [`Session::connected`]), wait ([`Status::Wait`]), carry bytes
//!   ([`Status::Connected`]), close it ([`Status::Close`], then [`Session::closed`]), or nothing
//!   more ([`Status::Done`]).
//! - Bytes received go to [`Session::feed`]; bytes to send come from [`Session::poll_send`]
//!   (then [`Session::sent`]); [`Session::poll_timeout`] says when to call
//!   [`Session::handle_timeout`]; [`Session::poll_event`] gives the application its events.
//! - The application sends with [`Session::send_data`], at any time: DATA waits in the window
//!   until a session is open, and stays there until a ticket covers it.
//!
//! What it does for the device: HELLO (with the latest ticket), WELCOME and its `resumed` /
//! `resume_refused`, the window of DATA not covered by a ticket and its resend after a drop,
//! every DATA answered exactly once to the application (answers a resend brings twice are
//! dropped), GOAWAY (stop sending, read what is owed, reconnect), keep-alive PINGs and PONGs,
//! backoff with jitter between failed attempts, and what each ERROR code means for the device
//! ([`Action`]). Everything a peer sends is checked: a frame over the maximum, garbage, a frame
//! out of place, a resume that does not fit what was sent, end the connection with a
//! [`Cause::Violation`] — never a panic, never memory beyond what the caller gave.
//!
//! Modules: `window` (the DATA frames kept for resend), `session` (the state machine: its
//! phases and what goes out), `session::recv` (what comes in, as events), `session::memory`
//! (where each part lives in the caller's memory).

#![no_std]
#![forbid(unsafe_code)]

mod session;
mod window;

pub use session::{Session, Stats};
pub use wasmbed_protocol::ErrorCode;

/// What a session is made of. Sizes are in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Config<'a> {
    /// The device's id (the subject common name of its certificate).
    pub device: &'a str,
    /// The application to open the session with.
    pub app: &'a str,
    /// DATA kept for resend: each DATA takes 13 bytes plus its body until a ticket covers it.
    pub window: usize,
    /// The largest frame accepted from the peer (its length field; REPLY, PUSH, CHECKPOINT).
    pub max_frame: usize,
    /// The largest ticket kept; a CHECKPOINT with a larger one is not kept (counted).
    pub max_ticket: usize,
    /// With no frame from the peer for this long a PING goes; with no answer for as long
    /// again the connection is taken for dead. 0: no keep-alive.
    pub keepalive_ms: u64,
    /// How long WELCOME may take after HELLO, and the answers after GOAWAY.
    pub answer_timeout_ms: u64,
    /// Backoff between failed attempts: the first wait, doubled each time up to the last.
    pub first_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Seeds the jitter of the backoff (any value; give each device its own).
    pub seed: u64,
}

impl<'a> Config<'a> {
    /// Defaults that suit a small device: a 4 KiB window, frames up to 2 KiB, tickets up to
    /// 1 KiB, keep-alive every 30 s, answers within 5 s, backoff 100 ms to 30 s.
    pub fn new(device: &'a str, app: &'a str) -> Config<'a> {
        Config {
            device,
            app,
            window: 4096,
            max_frame: 2048,
            max_ticket: 1024,
            keepalive_ms: 30_000,
            answer_timeout_ms: 5_000,
            first_backoff_ms: 100,
            max_backoff_ms: 30_000,
            seed: 0,
        }
    }
}

/// What the transport should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Open a connection; then [`Session::connected`] (or [`Session::closed`] if it failed).
    Connect,
    /// Nothing to do until [`Session::poll_timeout`].
    Wait,
    /// Connected: carry bytes both ways.
    Connected,
    /// Close the connection (after writing what [`Session::poll_send`] still has, if
    /// possible); then [`Session::closed`].
    Close,
    /// The session is over for good ([`Action::GiveUp`]): nothing more will connect.
    Done,
}

/// What an ERROR about the whole session means for the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Reconnect after a backoff and resume (the gateway is full or draining, no gateway took
    /// the session, the session went idle, the connection broke the protocol).
    Retry,
    /// Reconnect after a backoff without the ticket: the restored state itself keeps failing.
    Fresh,
    /// Stop: retrying cannot help (unknown app, an identity the certificate does not match,
    /// a revoked certificate, a HELLO the gateway cannot read). An operator must act.
    GiveUp,
}

impl Action {
    /// What ERROR `code` (sequence 0) means for the device; a code this version does not
    /// know is retried.
    pub fn of(code: u16) -> Action {
        match ErrorCode::from_u16(code) {
            Some(
                ErrorCode::UnknownApp
                | ErrorCode::IdentityMismatch
                | ErrorCode::Revoked
                | ErrorCode::BadHello,
            ) => Action::GiveUp,
            Some(ErrorCode::TooManyTraps) => Action::Fresh,
            _ => Action::Retry,
        }
    }
}

/// How a resumed or new session started (WELCOME).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume<'a> {
    /// A new session: there was no ticket to present.
    New,
    /// The ticket was taken: the app's state is back and the session continues after DATA
    /// `seq`.
    Restored { seq: u64 },
    /// The ticket was taken but the app keeps no state it can hand over: it starts afresh;
    /// the session continues after DATA `seq`.
    Stateless { seq: u64 },
    /// The ticket was not taken (`expired`, `bad_ticket`, ...): a new session, the app's
    /// state restarted.
    Refused { reason: &'a str },
}

/// Why a connection ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The transport closed or failed (or never opened).
    Closed,
    /// After the peer's GOAWAY.
    Goaway,
    /// No WELCOME, no answer after GOAWAY, or no PONG, in time.
    Silent,
    /// The peer's ERROR about the session (its code, and what the device does).
    Refused { code: u16, action: Action },
    /// The peer broke the protocol.
    Violation(Violation),
}

/// How the peer broke the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Violation {
    /// Bytes that are not a frame, or one over [`Config::max_frame`]: the ERROR code that
    /// names it (`bad_frame`, `frame_too_large`, `unknown_type`).
    Frame(ErrorCode),
    /// A control body that is not what its type needs.
    Body,
    /// A frame a gateway does not send at this point (its type byte).
    Unexpected(u8),
    /// WELCOME resumed after a DATA never sent, or before what the ticket covers.
    Resume,
}

/// What the application learns, from [`Session::poll_event`]. Every DATA the application
/// gave gets exactly one of `Reply`, `Failed`, `Covered` or `Lost`, in sequence order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event<'a> {
    /// A session opened (the first, or again after a drop).
    Welcome {
        gateway: &'a str,
        session: &'a str,
        resume: Resume<'a>,
    },
    /// The answer to DATA `seq`.
    Reply { seq: u64, body: &'a [u8] },
    /// DATA `seq` was answered by ERROR `code`: the app failed on it (trapped, ran too long,
    /// ran out of memory).
    Failed { seq: u64, code: u16 },
    /// DATA `seq` is in the resumed session's state, but its answer was lost with the
    /// connection (or the gateway answered ERROR `duplicate`).
    Covered { seq: u64 },
    /// DATA `seq` will never be answered: the session gave up, or the peer skipped it.
    Lost { seq: u64 },
    /// Bytes the app sent unprompted.
    Push { seq: u64, body: &'a [u8] },
    /// A new ticket, covering DATA up to `seq`: keep [`Session::ticket`] across a reboot.
    Checkpoint { seq: u64 },
    /// The gateway is leaving: nothing new is sent; the answers owed still come, then the
    /// session reconnects and resumes by itself.
    Goaway,
    /// The connection ended; the session reconnects by itself unless it is [`Status::Done`].
    Disconnected { cause: Cause },
}

/// Why [`Session::new`] cannot make a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupError {
    /// The memory given is smaller than [`Session::memory`] asks.
    Memory { needed: usize, given: usize },
    /// An empty device or app name, or a size of 0 (window, frame).
    Config,
}

/// Why [`Session::send_data`] did not take a DATA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    /// The window is full of DATA no ticket covers yet: try again after an answer.
    WindowFull,
    /// The body can never fit the window.
    TooLarge,
    /// The session is over ([`Status::Done`]).
    Done,
}

#[cfg(any(test, feature = "model"))]
#[doc(hidden)]
pub mod model;

#[cfg(test)]
mod tests;
