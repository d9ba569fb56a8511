use std::sync::Arc;

use proptest::prelude::*;
use rustls::{ClientConfig, ClientConnection, RootCertStore};

use super::*;

const MAX: usize = 16 * 1024;

/// A real ClientHello, as rustls (aws-lc-rs, post-quantum key share) sends it.
pub(crate) fn hello_bytes(sni: &str, alpn: &[&[u8]]) -> Vec<u8> {
    let mut config = ClientConfig::builder_with_provider(wasmbed_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let name = sni.to_string().try_into().unwrap();
    let mut conn = ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// The same handshake message cut into records of at most `size` bytes.
fn refragment(hello: &[u8], size: usize) -> Vec<u8> {
    let message = &hello[5..];
    let mut out = Vec::new();
    for chunk in message.chunks(size) {
        out.extend_from_slice(&[22, 3, 1]);
        out.extend_from_slice(&(chunk.len() as u16).to_be_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

#[test]
fn finds_sni_and_alpn_in_a_real_hello() {
    let bytes = hello_bytes("Device-7.Devices.Example", &[b"wasmbed/1", b"h2"]);
    assert!(
        bytes.len() > 1000,
        "post-quantum hello is large: {}",
        bytes.len()
    );
    let hello = parse(&bytes, MAX).unwrap();
    assert_eq!(hello.sni.as_deref(), Some("device-7.devices.example"));
    let alpn: Vec<&[u8]> = hello.alpn.iter().collect();
    assert_eq!(alpn, [b"wasmbed/1".as_slice(), b"h2"]);
    assert_eq!(hello.alpn.first(), Some(b"wasmbed/1".as_slice()));
    assert_eq!(format!("{:?}", hello.alpn), r#"["wasmbed/1", "h2"]"#);
    assert_eq!(hello.len, bytes.len());
}

#[test]
fn every_prefix_needs_more_bytes() {
    let bytes = hello_bytes("gw.example", &[]);
    for n in 0..bytes.len() {
        assert_eq!(
            parse(&bytes[..n], MAX),
            Err(HelloError::Incomplete),
            "prefix {n}"
        );
    }
}

#[test]
fn a_hello_over_several_records_is_reassembled() {
    let bytes = hello_bytes("frag.example", &[b"x"]);
    for size in [1, 7, 100, 512] {
        let split = refragment(&bytes, size);
        let hello = parse(&split, 64 * 1024).unwrap();
        assert_eq!(hello.sni.as_deref(), Some("frag.example"), "size {size}");
        assert_eq!(hello.len, split.len());
        for n in (0..split.len()).step_by(97) {
            assert_eq!(parse(&split[..n], 64 * 1024), Err(HelloError::Incomplete));
        }
    }
}

#[test]
fn a_hello_over_the_maximum_is_refused() {
    let bytes = hello_bytes("big.example", &[]);
    assert_eq!(parse(&bytes[..600], 600), Err(HelloError::TooLarge));
    assert_eq!(parse(&bytes, 600), Err(HelloError::TooLarge));
}

#[test]
fn plain_bytes_are_not_tls() {
    assert_eq!(parse(b"GET / HTTP/1.1\r\n", MAX), Err(HelloError::NotTls));
    assert_eq!(parse(&[22, 2, 0, 0, 1, 0], MAX), Err(HelloError::NotTls));
    assert_eq!(parse(&[0x80, 0x2e, 0x01], MAX), Err(HelloError::NotTls)); // SSLv2 hello
}

/// Replaces the server name in a real hello with `name` (same length), keeping every length.
fn with_server_name(name: &[u8]) -> Vec<u8> {
    let original = b"abcdefgh.example";
    assert_eq!(name.len(), original.len());
    let mut bytes = hello_bytes("abcdefgh.example", &[]);
    let at = bytes
        .windows(original.len())
        .position(|w| w == original)
        .unwrap();
    bytes[at..at + name.len()].copy_from_slice(name);
    bytes
}

#[test]
fn malformed_server_names_are_refused_by_reason() {
    for bad in [
        &b"abc\0efgh.example"[..],
        b"abc efgh.example",
        b"abcdefgh..xample",
        b".bcdefgh.example",
    ] {
        let e = parse(&with_server_name(bad), MAX).unwrap_err();
        assert!(matches!(e, HelloError::BadSni(_)), "{bad:?}: {e:?}");
        assert_eq!(crate::refusal::Refusal::of_hello(&e).as_label(), "bad_sni");
    }
    // An SNI extension whose inner list length overruns the extension.
    let mut bytes = hello_bytes("abcdefgh.example", &[]);
    let at = bytes
        .windows(16)
        .position(|w| w == b"abcdefgh.example")
        .unwrap();
    // layout before the name: list_len(2) type(1) name_len(2)
    bytes[at - 5] = 0xff;
    assert!(matches!(parse(&bytes, MAX), Err(HelloError::BadSni(_))));
}

#[test]
fn truncated_inner_lengths_are_malformed_not_panics() {
    let bytes = hello_bytes("t.example", &[b"p"]);
    // Cut the handshake message short but fix the record length to match: the inner lengths
    // now overrun the message.
    for cut in [10, 40, 80, 200] {
        let message = &bytes[5..bytes.len() - cut];
        let mut b = vec![22, 3, 1];
        b.extend_from_slice(&(message.len() as u16).to_be_bytes());
        b.extend_from_slice(message);
        // The handshake header still announces the full length: reassembly waits for more.
        assert_eq!(parse(&b, MAX), Err(HelloError::Incomplete));
        // With the header's length shortened too, the body is malformed.
        let n = message.len() - 4;
        b[6..9].copy_from_slice(&[(n >> 16) as u8, (n >> 8) as u8, n as u8]);
        assert!(
            matches!(parse(&b, MAX), Err(HelloError::Malformed(_))),
            "cut {cut}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = parse(&bytes, MAX);
    }

    #[test]
    fn random_bytes_after_a_tls_header_never_panic(
        body in proptest::collection::vec(any::<u8>(), 0..2048),
        len in 0u16..3000,
    ) {
        let mut bytes = vec![22, 3, 1];
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(&body);
        let _ = parse(&bytes, MAX);
    }

    #[test]
    fn mutated_real_hellos_never_panic(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = hello_bytes("m.example", &[b"a", b"bc"]);
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] = value;
        }
        if let Ok(hello) = parse(&bytes, MAX) {
            // Whatever ALPN list was accepted is walked whole: names, none empty, that
            // together with their length bytes are the list.
            let names: Vec<&[u8]> = hello.alpn.iter().collect();
            prop_assert!(names.iter().all(|n| !n.is_empty()));
            prop_assert_eq!(names.iter().map(|n| n.len() + 1).sum::<usize>(), hello.alpn.0.len());
        }
    }
}

#[test]
fn a_server_name_is_lowercased_without_its_trailing_dot() {
    assert_eq!(host_name(b"MiXed.Example.").unwrap(), "mixed.example");
    assert_eq!(host_name(b"gw-1.example").unwrap(), "gw-1.example");
    assert!(host_name(b"a..b").is_err());
    assert!(host_name(b".a").is_err());
}
