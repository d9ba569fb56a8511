//! Sealed session tickets: what a session is (device, app, module, last answered DATA, the
//! app's state) sealed with AES-256-GCM under the fleet's key ring, so that any gateway
//! holding the ring can resume the session and nobody else can read or forge it.
//!
//! Wire form: `version (1) | key id length (1) | key id | nonce (12) | ciphertext + tag`;
//! the first three are the associated data, so a ticket cannot be moved to another key id.
//! The plaintext is the CBOR of [`TicketBody`].
//!
//! Nonces: every gateway of the fleet seals under the same key, so a nonce must never repeat
//! across processes. Each loaded ring starts at a random 96-bit point and counts up from it
//! (one atomic add per ticket, instead of a call into the random generator): two processes'
//! ranges overlap only if their random starts fall within the number of tickets sealed of
//! each other, about `processes² × tickets / 2⁹⁶`, below the bound for random nonces.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::{Deserialize, Serialize};

/// The ticket format this gateway seals and opens.
pub const VERSION: u8 = 1;
/// Bytes of one key.
pub const KEY_LEN: usize = 32;

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

/// Why the key ring file cannot be used. Each names the file (and the entry).
#[derive(Debug, thiserror::Error)]
pub enum KeyRingError {
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
    #[error("{path}: key entry {index} ({id:?}): {problem}")]
    Entry {
        path: PathBuf,
        index: usize,
        id: String,
        problem: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRing {
    #[serde(default)]
    key: Vec<RawKey>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    id: String,
    /// 64 hex digits.
    key: String,
}

/// The fleet's keys: the first seals, all open, so keys rotate without breaking live tickets.
pub struct KeyRing {
    keys: Vec<(String, LessSafeKey)>,
    nonces: Nonces,
}

/// This ring's nonces: a random 96-bit start, then one more per sealed ticket.
struct Nonces {
    start: u128,
    sealed: AtomicU64,
}

impl Nonces {
    fn new() -> Result<Nonces, aws_lc_rs::error::Unspecified> {
        let mut start = [0u8; 16];
        aws_lc_rs::rand::fill(&mut start[16 - NONCE_LEN..])?;
        Ok(Nonces {
            start: u128::from_be_bytes(start),
            sealed: AtomicU64::new(0),
        })
    }

    fn next(&self) -> [u8; NONCE_LEN] {
        let n = self.sealed.fetch_add(1, Ordering::Relaxed);
        let bytes = self.start.wrapping_add(u128::from(n)).to_be_bytes();
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&bytes[16 - NONCE_LEN..]);
        nonce
    }
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        write!(f, "KeyRing {ids:?}")
    }
}

impl KeyRing {
    /// Reads a ring file: TOML `[[key]]` entries with `id` (1 to 64 characters, unique) and
    /// `key` (32 bytes as 64 hex digits).
    pub fn load(path: &Path) -> Result<KeyRing, KeyRingError> {
        let file = |problem: String| KeyRingError::File {
            path: path.to_owned(),
            problem,
        };
        let text = std::fs::read_to_string(path).map_err(|e| file(e.to_string()))?;
        KeyRing::from_toml(&text, path)
    }

    /// A ring from a ring file's text; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<KeyRing, KeyRingError> {
        let file = |problem: String| KeyRingError::File {
            path: path.to_owned(),
            problem,
        };
        let raw: RawRing =
            toml::from_str(text).map_err(|e| file(e.to_string().replace('\n', " ")))?;
        if raw.key.is_empty() {
            return Err(file(
                "no [[key]] entry: the ring needs at least one key".into(),
            ));
        }
        let mut keys: Vec<(String, LessSafeKey)> = Vec::new();
        for (index, k) in raw.key.iter().enumerate() {
            let entry = |problem: &str| KeyRingError::Entry {
                path: path.to_owned(),
                index,
                id: k.id.clone(),
                problem: problem.to_string(),
            };
            if k.id.is_empty() || k.id.len() > 64 {
                return Err(entry("the id must be 1 to 64 characters"));
            }
            if keys.iter().any(|(id, _)| *id == k.id) {
                return Err(entry("this id is used twice"));
            }
            let bytes = from_hex(&k.key)
                .filter(|b| b.len() == KEY_LEN)
                .ok_or_else(|| entry("the key must be 64 hex digits (32 bytes)"))?;
            let key = UnboundKey::new(&AES_256_GCM, &bytes)
                .map_err(|_| entry("not a usable AES-256 key"))?;
            keys.push((k.id.clone(), LessSafeKey::new(key)));
        }
        let nonces = Nonces::new().map_err(|_| file("no randomness for the nonces".into()))?;
        Ok(KeyRing { keys, nonces })
    }

    /// A new ring file's text with one random key (for `certs init`).
    pub fn generate(id: &str) -> Result<String, aws_lc_rs::error::Unspecified> {
        let mut key = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut key)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!(
            "# The fleet's session key ring: the first key seals tickets, every key opens them.\n\
             # To rotate: put a new key first, keep the old ones until their tickets expire.\n\
             [[key]]\nid = \"{id}\"\nkey = \"{hex}\"\n"
        ))
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Seals `body` under the first key.
    pub fn seal(&self, body: &TicketBody) -> Option<Vec<u8>> {
        self.seal_with(VERSION, |out| ciborium::into_writer(body, out).ok())
    }

    /// Opens a ticket sealed under any key of the ring, and checks its expiry against `now`.
    pub fn open(&self, ticket: &[u8], now: SystemTime) -> Result<TicketBody, Refused> {
        let plain = self.open_bytes(VERSION, ticket).ok_or(Refused::BadTicket)?;
        KeyRing::read_plaintext(&plain, now)
    }

    /// The second half of [`KeyRing::open`]: what an authenticated plaintext says, and
    /// whether it is still good at `now`. (Public for the fuzz target, which cannot forge a
    /// tag to reach it through `open`.)
    #[doc(hidden)]
    pub fn read_plaintext(plain: &[u8], now: SystemTime) -> Result<TicketBody, Refused> {
        let body: TicketBody = ciborium::from_reader(plain).map_err(|_| Refused::BadTicket)?;
        if unix(now) >= body.expires {
            return Err(Refused::Expired);
        }
        Ok(body)
    }

    /// Seals what `write` appends under the first key; `domain` (the first byte,
    /// authenticated) keeps session tickets and TLS tickets from ever being taken for one
    /// another. The plaintext is written in place, after the header and nonce.
    fn seal_with(
        &self,
        domain: u8,
        write: impl FnOnce(&mut Vec<u8>) -> Option<()>,
    ) -> Option<Vec<u8>> {
        let (id, key) = self.keys.first()?;
        let header = 2 + id.len();
        let nonce = self.nonces.next();
        let mut out = Vec::with_capacity(header + NONCE_LEN + 256);
        out.push(domain);
        out.push(id.len() as u8);
        out.extend_from_slice(id.as_bytes());
        out.extend_from_slice(&nonce);
        write(&mut out)?;
        let (head, plain) = out.split_at_mut(header + NONCE_LEN);
        let tag = key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&head[..header]),
                plain,
            )
            .ok()?;
        out.extend_from_slice(tag.as_ref());
        Some(out)
    }

    fn open_bytes(&self, domain: u8, sealed: &[u8]) -> Option<Vec<u8>> {
        let (&first, rest) = sealed.split_first()?;
        let (&id_len, rest) = rest.split_first()?;
        if first != domain || rest.len() < id_len as usize + NONCE_LEN + 16 {
            return None;
        }
        let (id, rest) = rest.split_at(id_len as usize);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let key = self
            .keys
            .iter()
            .find(|(k, _)| k.as_bytes() == id)
            .map(|(_, key)| key)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let aad = Aad::from(&sealed[..2 + id_len as usize]);
        let mut buf = body.to_vec();
        let plain = key.open_in_place(nonce, aad, &mut buf).ok()?;
        Some(plain.to_vec())
    }
}

/// TLS 1.3 session tickets under the fleet's key ring: a device that re-homes resumes its
/// TLS session on any gateway instead of a full handshake (the way NGINX and Envoy share
/// ticket keys). The ring is read at each use, so a SIGHUP reload takes effect at once.
#[derive(Debug)]
pub struct FleetTicketer {
    pub keys: std::sync::Arc<arc_swap::ArcSwapOption<KeyRing>>,
    /// Seconds a TLS ticket is good for (a hint to the client).
    pub lifetime: u32,
}

/// The domain byte of TLS tickets.
const TLS_DOMAIN: u8 = b'T';

impl rustls::server::ProducesTickets for FleetTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys.load().as_ref()?.seal_with(TLS_DOMAIN, |out| {
            out.extend_from_slice(plain);
            Some(())
        })
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.keys.load().as_ref()?.open_bytes(TLS_DOMAIN, cipher)
    }
}

/// Seconds since the Unix epoch.
pub fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    if !t.len().is_multiple_of(2) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests;
