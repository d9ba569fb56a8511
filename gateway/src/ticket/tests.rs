use std::path::Path;
use std::time::{Duration, SystemTime};

use super::*;
use aws_lc_rs::aead::NONCE_LEN;

fn ring(dir: &Path, name: &str, text: &str) -> Result<KeyRing, KeyRingError> {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    KeyRing::load(&path)
}

fn key(id: &str, byte: u8) -> String {
    format!(
        "[[key]]\nid = \"{id}\"\nkey = \"{}\"\n",
        format!("{byte:02x}").repeat(32)
    )
}

fn body(now: SystemTime) -> TicketBody {
    TicketBody {
        device: "device-0001".into(),
        app: "counter".into(),
        module: serde_bytes::ByteBuf::from(vec![7u8; 32]),
        session: "s1".into(),
        seq: 50,
        pushes: 3,
        issued: unix(now),
        expires: unix(now) + 3600,
        state: Some(serde_bytes::ByteBuf::from(vec![1, 2, 3])),
    }
}

#[test]
fn a_sealed_ticket_opens_under_any_key_of_the_ring_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let old = ring(dir.path(), "old.toml", &key("k1", 1)).unwrap();
    let ticket = old.seal(&body(now)).unwrap();
    assert_eq!(old.open(&ticket, now), Ok(body(now)));
    // Rotated: a new first key seals, the old one still opens.
    let rotated = ring(dir.path(), "rot.toml", &(key("k2", 2) + &key("k1", 1))).unwrap();
    assert_eq!(rotated.open(&ticket, now), Ok(body(now)));
    assert!(rotated.seal(&body(now)).unwrap()[2..4] == *b"k2");
    // The old key removed: its tickets no longer open.
    let without = ring(dir.path(), "new.toml", &key("k2", 2)).unwrap();
    assert_eq!(without.open(&ticket, now), Err(Refused::BadTicket));
    // Same id, another key: the tag does not verify.
    let forged = ring(dir.path(), "forged.toml", &key("k1", 9)).unwrap();
    assert_eq!(forged.open(&ticket, now), Err(Refused::BadTicket));
}

#[test]
fn no_nonce_repeats_within_a_ring_or_across_gateways_sharing_a_key() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    // Two gateways loading the same file: the same key, each its own nonce start.
    let a = ring(dir.path(), "a.toml", &key("k1", 1)).unwrap();
    let b = ring(dir.path(), "b.toml", &key("k1", 1)).unwrap();
    let nonce = |t: &[u8]| t[4..4 + NONCE_LEN].to_vec();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..1000 {
        for r in [&a, &b] {
            let t = r.seal(&body(now)).unwrap();
            assert!(seen.insert(nonce(&t)), "a nonce was used twice");
            // Each opens anywhere the key is.
            assert_eq!(a.open(&t, now), Ok(body(now)));
            assert_eq!(b.open(&t, now), Ok(body(now)));
        }
    }
    // Within one ring, consecutive: a counter from a random start.
    let (x, y) = (a.seal(&body(now)).unwrap(), a.seal(&body(now)).unwrap());
    let n = |t: &[u8]| {
        let mut v = [0u8; 16];
        v[16 - NONCE_LEN..].copy_from_slice(&nonce(t));
        u128::from_be_bytes(v)
    };
    assert_eq!(n(&y), n(&x) + 1);
}

#[test]
fn tampered_truncated_and_expired_tickets_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let now = SystemTime::now();
    let r = ring(dir.path(), "k.toml", &key("k1", 1)).unwrap();
    let ticket = r.seal(&body(now)).unwrap();
    for i in 0..ticket.len() {
        let mut t = ticket.clone();
        t[i] ^= 0x40;
        assert_eq!(r.open(&t, now), Err(Refused::BadTicket), "byte {i} flipped");
    }
    for n in 0..ticket.len() {
        assert_eq!(
            r.open(&ticket[..n], now),
            Err(Refused::BadTicket),
            "{n} bytes"
        );
    }
    let later = now + Duration::from_secs(3601);
    assert_eq!(r.open(&ticket, later), Err(Refused::Expired));
}
