use super::pki::{DevCa, KeyKind};
use super::*;

/// `body` written to `name` in `dir` (removed with it at the test's end).
fn temp_file(dir: &tempfile::TempDir, name: &str, body: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn issued_certificates_build_server_and_client_configs() {
    let ca = DevCa::generate("test CA").unwrap();
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
        let server = ca.issue_server(&["localhost", "127.0.0.1"], kind).unwrap();
        let cfg = server_config(
            server.chain(),
            server.key().unwrap(),
            Some(&[ca.cert_der()]),
            &[],
        );
        assert!(cfg.is_ok(), "{kind:?}");
    }
    let device = ca.issue_client("device-0042", KeyKind::EcdsaP256).unwrap();
    let chain = device.chain();
    assert_eq!(peer_identity(&chain[0]).as_deref(), Some("device-0042"));
    assert!(client_config(&[ca.cert_der()], Some((chain, device.key().unwrap()))).is_ok());
}

#[test]
fn pem_files_round_trip() {
    let ca = DevCa::generate("test CA").unwrap();
    let issued = ca.issue_server(&["localhost"], KeyKind::EcdsaP256).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cert = temp_file(&dir, "server.pem", &issued.cert_pem);
    let key = temp_file(&dir, "server.key", &issued.key_pem);
    assert_eq!(load_certs(&cert).unwrap().len(), 1);
    assert!(load_key(&key).is_ok());
}

#[test]
fn bad_pem_files_are_named() {
    let missing = Path::new("/nonexistent/ca.pem");
    let e = load_certs(missing).unwrap_err().to_string();
    assert!(e.starts_with("/nonexistent/ca.pem:"), "{e}");
    let dir = tempfile::tempdir().unwrap();
    let garbage = temp_file(&dir, "garbage.pem", "hello, not a certificate\n");
    let e = load_certs(&garbage).unwrap_err().to_string();
    assert!(
        e.contains("garbage.pem") && e.contains("no CERTIFICATE"),
        "{e}"
    );
    let e = load_key(&garbage).unwrap_err().to_string();
    assert!(
        e.contains("garbage.pem") && e.contains("private key"),
        "{e}"
    );
}

#[test]
fn a_loaded_ca_issues_certificates_that_chain_to_the_file() {
    let ca = DevCa::generate("test CA").unwrap();
    let loaded = DevCa::load(&ca.cert_pem(), ca.key_pem()).unwrap();
    let device = loaded.issue_client("device-7", KeyKind::EcdsaP256).unwrap();
    let server = ca.issue_server(&["localhost"], KeyKind::EcdsaP256).unwrap();
    // A server trusting the original CA accepts the loaded CA's device certificate.
    let server_cfg = server_config(
        server.chain(),
        server.key().unwrap(),
        Some(&[ca.cert_der()]),
        &[],
    )
    .unwrap();
    let client_cfg = client_config(
        &[ca.cert_der()],
        Some((device.chain(), device.key().unwrap())),
    )
    .unwrap();
    let mut client =
        rustls::ClientConnection::new(client_cfg, "localhost".try_into().unwrap()).unwrap();
    let mut server = rustls::ServerConnection::new(server_cfg).unwrap();
    for _ in 0..10 {
        let mut buf = Vec::new();
        client.write_tls(&mut buf).unwrap();
        server.read_tls(&mut buf.as_slice()).unwrap();
        server
            .process_new_packets()
            .expect("server accepts the device certificate");
        let mut back = Vec::new();
        server.write_tls(&mut back).unwrap();
        client.read_tls(&mut back.as_slice()).unwrap();
        client.process_new_packets().unwrap();
    }
    assert!(!client.is_handshaking() && !server.is_handshaking());
}

/// Servers choose TLS_AES_128_GCM_SHA256 even from a client that lists AES-256 first (as
/// OpenSSL and rustls' own defaults do): its SHA-256 handshake hashing runs on SHA
/// instructions most CPUs have, SHA-384 does not (about 15% of a terminating proxy's cost
/// per handshake on an AMD EPYC host, docs/performance.md).
#[test]
fn servers_prefer_aes_128_gcm_whatever_the_client_lists_first() {
    let ca = DevCa::generate("test CA").unwrap();
    let server = ca.issue_server(&["localhost"], KeyKind::EcdsaP256).unwrap();
    let server = server_config(server.chain(), server.key().unwrap(), None, &[]).unwrap();
    // A client with rustls' default order: AES-256 first.
    let client = ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots(&[ca.cert_der()]).unwrap())
    .with_no_client_auth();
    assert_eq!(
        client.crypto_provider().cipher_suites[0].suite(),
        rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
    );
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut c = rustls::ClientConnection::new(Arc::new(client), name).unwrap();
    let mut s = rustls::ServerConnection::new(server).unwrap();
    // Handshake in memory: each side's bytes to the other until neither has more to say.
    for _ in 0..10 {
        let mut buf = Vec::new();
        c.write_tls(&mut buf).unwrap();
        s.read_tls(&mut &buf[..]).unwrap();
        s.process_new_packets().unwrap();
        let mut buf = Vec::new();
        s.write_tls(&mut buf).unwrap();
        c.read_tls(&mut &buf[..]).unwrap();
        c.process_new_packets().unwrap();
    }
    assert!(!c.is_handshaking() && !s.is_handshaking());
    assert_eq!(
        s.negotiated_cipher_suite().map(|x| x.suite()),
        Some(rustls::CipherSuite::TLS13_AES_128_GCM_SHA256)
    );
}

/// A CRL revokes by issuer and serial number: two CAs (a rotation's old and new) whose
/// serials meet do not revoke each other's certificates, as the handshake's own check does
/// not (it scopes a CRL to its issuer).
#[test]
fn a_crl_revokes_its_own_issuers_certificates_only() {
    let (old, new) = (
        DevCa::generate("devices, 2026").unwrap(),
        DevCa::generate("devices, 2027").unwrap(),
    );
    let revoked = old.issue_client_numbered("device-0010", 10).unwrap();
    let namesake = new.issue_client_numbered("device-0011", 10).unwrap();
    let (revoked, namesake) = (&revoked.chain()[0], &namesake.chain()[0]);
    assert_eq!(serial_of(revoked), serial_of(namesake), "the serials meet");
    let crl_pem = old
        .crl(
            &[serial_of(revoked).unwrap()],
            1,
            std::time::Duration::from_secs(3600),
        )
        .unwrap();
    let crls: Vec<_> =
        rustls::pki_types::CertificateRevocationListDer::pem_slice_iter(crl_pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap();
    let keys = revoked_keys(&crls);
    assert!(keys.contains(&key_of(revoked)), "revoked");
    assert!(!keys.contains(&key_of(namesake)), "another CA's");
}

#[test]
fn a_leaf_reads_the_key_the_name_and_the_attributes_in_one_parse() {
    let ca = DevCa::generate("test CA").unwrap();
    let named = ca
        .issue_client_with("device-7", &["fleet-a"], &["wasmbed://region/eu"])
        .unwrap();
    let unnamed = ca.issue_client_unnamed(&["wasmbed://region/eu"]).unwrap();
    for issued in [&named, &unnamed] {
        let chain = issued.chain();
        let leaf = Leaf::of(&chain).unwrap();
        assert_eq!(leaf.identity, peer_identity(&chain[0]));
        let (_, parsed) = x509_parser::parse_x509_certificate(chain[0].as_ref()).unwrap();
        let key = key(parsed.issuer().as_raw(), parsed.raw_serial());
        assert_eq!(leaf.revocation_key, Some(key));
    }
    let leaf = Leaf::of(&named.chain()).unwrap();
    assert_eq!(leaf.identity.as_deref(), Some("device-7"));
    assert_eq!(leaf.attributes.ous, ["fleet-a"]);
    assert_eq!(leaf.attributes.uris, ["wasmbed://region/eu"]);
    assert_eq!(
        device_identity(Some(&leaf)).unwrap().as_deref(),
        Some("device-7")
    );
    let unnamed = Leaf::of(&unnamed.chain()).unwrap();
    assert!(device_identity(Some(&unnamed)).is_err(), "names no device");
    assert_eq!(device_identity(None), Ok(None), "no chain: anonymous");
    let garbage = [CertificateDer::from(vec![0x30, 0x03, 0x02, 0x01, 0x00])];
    assert_eq!(Leaf::of(&garbage), Some(Leaf::default()), "unreadable");
    assert!(device_identity(Leaf::of(&garbage).as_ref()).is_err());
}

/// A certificate's [`Leaf::revocation_key`].
fn key_of(cert: &CertificateDer<'_>) -> Vec<u8> {
    Leaf::of(std::slice::from_ref(cert))
        .and_then(|l| l.revocation_key)
        .unwrap()
}

/// A validity as webpki reads one: `notBefore` to `notAfter`, both included, in whole
/// seconds; a chain's is its certificates' narrowest, a leaf's its own; none for no chain.
#[test]
fn a_validity_holds_from_not_before_to_not_after_both_included() {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};
    let ca = DevCa::generate("test CA").unwrap();
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_secs();
    let at = |s: u64| UnixTime::since_unix_epoch(Duration::from_secs(s));
    let now = UNIX_EPOCH + Duration::from_secs(secs(SystemTime::now()));
    let (from, until) = (now - Duration::from_secs(60), now + Duration::from_secs(60));
    let leaf = ca.issue_client_between("device-0001", from, until).unwrap();
    let v = Validity::of_leaf(&leaf.chain()).unwrap();
    assert_eq!((v.from, v.until), (secs(from), secs(until)));
    assert!(!v.holds(at(secs(from) - 1)));
    assert!(v.holds(at(secs(from))) && v.holds(at(secs(until))));
    assert!(!v.holds(at(secs(until) + 1)));
    assert!(v.holds_now());
    // With a certificate after the leaf that runs out sooner (an intermediate, or one sent
    // and not used): the chain's ends with it, the leaf's is its own.
    let sooner = until - Duration::from_secs(30);
    let other = ca
        .issue_client_between("device-0002", from, sooner)
        .unwrap();
    let chain = [leaf.chain()[0].clone(), other.chain()[0].clone()];
    let (whole, own) = (
        Validity::of_parts(&chain[0], &chain[1..]).unwrap(),
        Validity::of_leaf(&chain).unwrap(),
    );
    assert_eq!((whole.until, own.until), (secs(sooner), secs(until)));
    assert_eq!(Validity::of_leaf(&[]), None);
    assert_eq!(
        Validity::of_leaf(&[CertificateDer::from(vec![1, 2, 3])]),
        None
    );
}
