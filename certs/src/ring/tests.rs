use super::*;

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

fn seal(r: &KeyRing, domain: u8, plain: &[u8]) -> Vec<u8> {
    r.seal_in(domain, |out| {
        out.extend_from_slice(plain);
        Some(())
    })
    .unwrap()
}

#[test]
fn a_value_opens_in_its_domain_under_any_key_of_the_ring_and_nowhere_else() {
    let dir = tempfile::tempdir().unwrap();
    let old = ring(dir.path(), "old.toml", &key("k1", 1)).unwrap();
    let sealed = seal(&old, PROXY_TLS, b"session");
    assert_eq!(
        old.open_in(PROXY_TLS, &sealed).as_deref(),
        Some(&b"session"[..])
    );
    // Another domain: a proxy's TLS ticket is not a gateway's.
    assert_eq!(old.open_in(GATEWAY_TLS, &sealed), None);
    // Rotated: a new first key seals, the old one still opens.
    let rotated = ring(dir.path(), "rot.toml", &(key("k2", 2) + &key("k1", 1))).unwrap();
    assert!(rotated.open_in(PROXY_TLS, &sealed).is_some());
    assert_eq!(seal(&rotated, PROXY_TLS, b"x")[2..4], *b"k2");
    // The old key removed, or another key under its id: nothing opens.
    let without = ring(dir.path(), "new.toml", &key("k2", 2)).unwrap();
    assert_eq!(without.open_in(PROXY_TLS, &sealed), None);
    let forged = ring(dir.path(), "forged.toml", &key("k1", 9)).unwrap();
    assert_eq!(forged.open_in(PROXY_TLS, &sealed), None);
    // Any byte changed or any truncation: refused.
    for i in 0..sealed.len() {
        let mut t = sealed.clone();
        t[i] ^= 1;
        assert_eq!(old.open_in(PROXY_TLS, &t), None, "byte {i} flipped");
    }
    for n in 0..sealed.len() {
        assert_eq!(old.open_in(PROXY_TLS, &sealed[..n]), None, "{n} bytes");
    }
}

#[test]
fn the_ticketer_reads_the_ring_at_each_use() {
    use rustls::server::ProducesTickets;
    let dir = tempfile::tempdir().unwrap();
    let keys = Arc::new(arc_swap::ArcSwapOption::from_pointee(
        ring(dir.path(), "a.toml", &key("k1", 1)).unwrap(),
    ));
    let t = RingTicketer {
        keys: keys.clone(),
        lifetime: 60,
        domain: PROXY_TLS,
    };
    let ticket = t.encrypt(b"state").unwrap();
    assert_eq!(t.decrypt(&ticket).as_deref(), Some(&b"state"[..]));
    // Another replica holding the same ring opens it; a gateway's ticketer does not.
    let other = RingTicketer {
        keys: keys.clone(),
        lifetime: 60,
        domain: GATEWAY_TLS,
    };
    assert_eq!(other.decrypt(&ticket), None);
    // A reload to a ring without the key: the old ticket no longer opens.
    keys.store(Some(Arc::new(
        ring(dir.path(), "b.toml", &key("k2", 2)).unwrap(),
    )));
    assert_eq!(t.decrypt(&ticket), None);
}

#[test]
fn bad_ring_files_name_the_file_and_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("", "no [[key]] entry"),
        ("not toml", "k.toml"),
        (
            &*key("k1", 1).replace(&"01".repeat(32), "xyz"),
            "64 hex digits",
        ),
        (&*(key("k1", 1) + &key("k1", 2)), "used twice"),
        (
            &*key("k1", 1).replace(&"01".repeat(32), &"+f".repeat(32)),
            "64 hex digits",
        ),
        (&*key("", 1), "1 to 64"),
    ];
    for (text, want) in cases {
        let e = ring(dir.path(), "k.toml", text).unwrap_err().to_string();
        assert!(e.contains("k.toml") && e.contains(want), "{text:?}: {e}");
    }
    let missing = KeyRing::load(&dir.path().join("none.toml"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("none.toml"), "{missing}");
    // A generated ring loads.
    let text = KeyRing::generate("k1").unwrap();
    assert_eq!(
        ring(dir.path(), "gen.toml", &text).unwrap().ids(),
        vec!["k1"]
    );
}
