//! A key ring shared by the processes of a fleet: AES-256-GCM keys read from a TOML file, the
//! first seals, every one opens, so keys rotate without breaking what is already sealed.
//! Gateways seal session tickets (the app's state) under it and TLS session tickets; proxy
//! replicas seal the devices' TLS session tickets under theirs, so a device resumes TLS on
//! whichever replica it reaches next.
//!
//! Wire form: `domain (1) | key id length (1) | key id | nonce (12) | ciphertext + tag`; the
//! first three are the associated data, so a sealed value cannot be moved to another key id
//! or taken for one of another domain (a session ticket for a TLS ticket, a gateway's TLS
//! ticket for a proxy's).
//!
//! Nonces: every process of the fleet seals under the same key, so a nonce must never repeat
//! across processes. Each loaded ring starts at a random 96-bit point and counts up from it
//! (one atomic add per seal, instead of a call into the random generator): two processes'
//! ranges overlap only if their random starts fall within the number of values sealed of
//! each other, about `processes² × sealed / 2⁹⁶`, below the bound for random nonces.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use serde::Deserialize;

/// Bytes of one key.
pub const KEY_LEN: usize = 32;

/// Why a key ring file cannot be used. Each names the file (and the entry).
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

/// The fleet's keys: the first seals, all open.
pub struct KeyRing {
    keys: Vec<(String, LessSafeKey)>,
    nonces: Nonces,
}

/// This ring's nonces: a random 96-bit start, then one more per sealed value.
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
        write!(f, "KeyRing {:?}", self.ids())
    }
}

impl KeyRing {
    /// Reads a ring file: TOML `[[key]]` entries with `id` (1 to 64 characters, unique) and
    /// `key` (32 bytes as 64 hex digits).
    pub fn load(path: &Path) -> Result<KeyRing, KeyRingError> {
        let text = std::fs::read_to_string(path).map_err(|e| KeyRingError::File {
            path: path.to_owned(),
            problem: e.to_string(),
        })?;
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

    /// A new ring file's text with one random key (for `certs init`); `what` says in its
    /// comment what the ring seals.
    pub fn generate_for(id: &str, what: &str) -> Result<String, aws_lc_rs::error::Unspecified> {
        let mut key = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut key)?;
        let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
        Ok(format!(
            "# {what}: the first key seals, every key opens.\n\
             # To rotate: put a new key first, keep the old ones until what they sealed expires.\n\
             [[key]]\nid = \"{id}\"\nkey = \"{hex}\"\n"
        ))
    }

    /// A new session key ring file's text with one random key.
    pub fn generate(id: &str) -> Result<String, aws_lc_rs::error::Unspecified> {
        KeyRing::generate_for(id, "The fleet's session key ring")
    }

    pub fn ids(&self) -> Vec<&str> {
        self.keys.iter().map(|(id, _)| id.as_str()).collect()
    }

    /// Seals what `write` appends under the first key, in `domain` (the first byte,
    /// authenticated). The plaintext is written in place, after the header and nonce.
    pub fn seal_in(
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

    /// The plaintext of a value sealed in `domain` under any key of the ring; `None` for
    /// anything else (another domain, an unknown key, a forged or damaged value).
    pub fn open_in(&self, domain: u8, sealed: &[u8]) -> Option<Vec<u8>> {
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

/// The domain byte of a gateway's TLS session tickets.
pub const GATEWAY_TLS: u8 = b'T';
/// The domain byte of a proxy's TLS session tickets (devices in terminate mode).
pub const PROXY_TLS: u8 = b'P';

/// TLS 1.3 session tickets sealed under a key ring: a client resumes its TLS session on any
/// process holding the ring instead of running a full handshake (the way NGINX and Envoy
/// share ticket keys). The ring is read at each use, so a reload takes effect at once.
#[derive(Debug)]
pub struct RingTicketer {
    pub keys: Arc<arc_swap::ArcSwapOption<KeyRing>>,
    /// Seconds a ticket is good for (a hint to the client).
    pub lifetime: u32,
    /// [`GATEWAY_TLS`] or [`PROXY_TLS`]: whose tickets these are.
    pub domain: u8,
}

impl rustls::server::ProducesTickets for RingTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        self.lifetime
    }

    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        self.keys.load().as_ref()?.seal_in(self.domain, |out| {
            out.extend_from_slice(plain);
            Some(())
        })
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        self.keys.load().as_ref()?.open_in(self.domain, cipher)
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    let t = text.trim();
    // Digits only: `from_str_radix` would also take a sign ("+f").
    if !t.len().is_multiple_of(2) || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..t.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(t.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests;
