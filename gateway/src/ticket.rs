//! Sealed session tickets: what a session is (device, app, module, last answered DATA, the
//! app's state) sealed with AES-256-GCM under the fleet's key ring, so that any gateway
//! holding the ring can resume the session and nobody else can read or forge it.
//!
//! The ring and its wire form are [`wasmbed_certs::ring`]'s (shared with the proxies' TLS
//! tickets); a session ticket's domain byte is its format [`VERSION`], and its plaintext is
//! the CBOR of [`TicketBody`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The ticket format this gateway seals and opens.
pub const VERSION: u8 = 1;

/// What a ticket holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TicketBody {
    pub device: String,
    pub app: String,
    /// SHA-256 of the module that sealed it (a different one still gets the state offered).
    pub module: serde_bytes::ByteBuf,
    pub session: String,
    /// The last DATA answered when it was sealed.
    pub seq: u64,
    /// The last PUSH sequence sent.
    pub pushes: u64,
    /// Seconds since the Unix epoch.
    pub issued: u64,
    pub expires: u64,
    /// The app's `snapshot`, when it has one.
    pub state: Option<serde_bytes::ByteBuf>,
}

/// Why a ticket was not taken: the `resume_refused` of WELCOME.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Expired,
    BadTicket,
    OtherDevice,
    OtherApp,
    RestoreFailed,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::Expired => "expired",
            Refused::BadTicket => "bad_ticket",
            Refused::OtherDevice => "other_device",
            Refused::OtherApp => "other_app",
            Refused::RestoreFailed => "restore_failed",
        }
    }
}

pub use wasmbed_certs::ring::{GATEWAY_TLS, KEY_LEN, KeyRing, KeyRingError, RingTicketer};

/// Session tickets under a [`KeyRing`]: sealed in their own domain (the format version), so
/// that no TLS ticket is ever taken for one, nor one for a TLS ticket.
pub trait SessionTickets {
    /// Seals `body` under the first key.
    fn seal(&self, body: &TicketBody) -> Option<Vec<u8>>;
    /// Opens a ticket sealed under any key of the ring, and checks its expiry against `now`.
    fn open(&self, ticket: &[u8], now: SystemTime) -> Result<TicketBody, Refused>;
}

impl SessionTickets for KeyRing {
    fn seal(&self, body: &TicketBody) -> Option<Vec<u8>> {
        self.seal_in(VERSION, |out| ciborium::into_writer(body, out).ok())
    }

    fn open(&self, ticket: &[u8], now: SystemTime) -> Result<TicketBody, Refused> {
        let plain = self.open_in(VERSION, ticket).ok_or(Refused::BadTicket)?;
        read_plaintext(&plain, now)
    }
}

/// The second half of [`SessionTickets::open`]: what an authenticated plaintext says, and
/// whether it is still good at `now`. (Public for the fuzz target, which cannot forge a tag
/// to reach it through `open`.)
#[doc(hidden)]
pub fn read_plaintext(plain: &[u8], now: SystemTime) -> Result<TicketBody, Refused> {
    let body: TicketBody = ciborium::from_reader(plain).map_err(|_| Refused::BadTicket)?;
    if unix(now) >= body.expires {
        return Err(Refused::Expired);
    }
    Ok(body)
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

#[cfg(test)]
mod tests;
