//! events: the proxy's counts and timeline, at the bottom of the crate. Every path that
//! refuses, accepts, moves or cuts a session bumps [`COUNTS`]; health, discovery, reloads
//! and moves add to the timeline with [`event`]. Nothing here imports another module of
//! the crate: the dashboard only reads what is here, everything else only writes. Here too,
//! being the bottom, is [`Counted`]: the guard any layer uses to count a holder while it
//! lives.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Events kept (and sent) for the timeline.
pub const EVENTS: usize = 50;

/// Counters the page turns into rates, bumped on the paths that count the same in metrics.
pub struct Counts {
    pub accepted: AtomicU64,
    pub refused: AtomicU64,
    pub moved: AtomicU64,
    /// Passthrough sessions cut because their gateway went down (their devices re-home).
    pub cut: AtomicU64,
}

pub static COUNTS: Counts = Counts {
    accepted: AtomicU64::new(0),
    refused: AtomicU64::new(0),
    moved: AtomicU64::new(0),
    cut: AtomicU64::new(0),
};

/// The sessions counted since the process started, on every listener and transport: what
/// the dashboard's rates are made of (for tests and embedding programs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Devices taken in: a TCP connection at its accept, a QUIC device once the listener
    /// takes it past its intake (before its handshake slot and its connection's place). One
    /// refused after that counts in `refused` too, on either transport.
    pub accepted: u64,
    /// Devices refused, for any reason (`wasmbed_proxy_connections_rejected_total`).
    pub refused: u64,
    /// Terminated sessions moved to another gateway.
    pub moved: u64,
    /// Passthrough sessions cut because their gateway went down.
    pub cut: u64,
}

/// [`COUNTS`] now.
pub fn totals() -> Totals {
    Totals {
        accepted: COUNTS.accepted.load(Ordering::Relaxed),
        refused: COUNTS.refused.load(Ordering::Relaxed),
        moved: COUNTS.moved.load(Ordering::Relaxed),
        cut: COUNTS.cut.load(Ordering::Relaxed),
    }
}

/// One of something counted in a shared count while it lives: added at [`Counted::new`],
/// taken off at its drop, whichever way its holder ends (a task dropped unfinished too). A
/// worker's tasks that are not sessions (`workers`), the QUIC devices still waiting for a
/// connection's place (`quic`), a link's streams (`link`).
pub struct Counted(Arc<AtomicUsize>);

impl Counted {
    pub fn new(count: &Arc<AtomicUsize>) -> Counted {
        count.fetch_add(1, Ordering::AcqRel);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One entry of the timeline.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub id: u64,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// `up`, `down`, `drain`, `undrain`, `added`, `removed`, `moves`, `rehomes`, `reload`,
    /// `reload_failed`, `discovery`.
    pub kind: &'static str,
    pub gateway: Option<String>,
    pub text: String,
}

static LOG: Mutex<VecDeque<Event>> = Mutex::new(VecDeque::new());
static NEXT_EVENT: AtomicU64 = AtomicU64::new(1);

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Adds an event to the timeline.
pub fn event(kind: &'static str, gateway: Option<&str>, text: impl Into<String>) {
    let e = Event {
        id: NEXT_EVENT.fetch_add(1, Ordering::Relaxed),
        at: unix_ms(),
        kind,
        gateway: gateway.map(str::to_string),
        text: text.into(),
    };
    let mut log = LOG.lock().unwrap_or_else(|e| e.into_inner());
    if log.len() == EVENTS {
        log.pop_front();
    }
    log.push_back(e);
}

/// The timeline, oldest first.
pub fn recent() -> Vec<Event> {
    LOG.lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .cloned()
        .collect()
}
