//! A device session through the front proxy, in both modes: passthrough (TLS ends at the
//! gateway) and terminate (TLS ends at the proxy, plaintext link to the gateway).

mod support;

use support::*;
use wasmbed_config::{GatewayConfig, Mode, ProxyConfig, TerminateTls, UpstreamTls};
use wasmbed_proxy::Proxy;

fn proxy_config(gateway: std::net::SocketAddr, health: std::net::SocketAddr) -> ProxyConfig {
    let mut c = ProxyConfig::from_toml(
        "admin = \"off\"\n[[listener]]\naddr = \"127.0.0.1:0\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap();
    c.gateways = vec![GatewayConfig {
        name: "gw-test".into(),
        addr: gateway.to_string(),
        health_addr: Some(health.to_string()),
        weight: 1,
        pool: "default".into(),
    }];
    c
}

/// Terminate mode in front of `gw`, with the PKI's certificate and device CA.
fn terminating(pki: &Pki, gw: &RunningGateway) -> ProxyConfig {
    let mut c = proxy_config(gw.addr, gw.admin);
    c.mode = Mode::Terminate;
    c.tls = Some(TerminateTls {
        cert: pki.path("gw.pem"),
        key: pki.path("gw.key"),
        client_ca: Some(pki.path("ca.pem")),
        client_crls: Vec::new(),
        resumption: true,
        ticket_keys: None,
    });
    c
}

async fn start_proxy(config: ProxyConfig) -> std::net::SocketAddr {
    let p = Proxy::bind(config).await.unwrap();
    let addr = p.listen_addrs()[0];
    tokio::spawn(p.run(tokio_util::sync::CancellationToken::new()));
    addr
}

#[tokio::test]
async fn passthrough_tls_ends_at_the_gateway() {
    let pki = Pki::new();
    let gw = start(settings(Some(&pki))).await;
    let proxy = start_proxy(proxy_config(gw.addr, gw.admin)).await;
    let mut d = tls_device(proxy, pki.device("device-0001", Some(&pki.ca)))
        .await
        .unwrap();
    assert_eq!(d.open("device-0001", "counter").await, "gw-test");
    let r = d.data(b"\x02\x03").await;
    assert_eq!(u64::from_le_bytes(r.body[8..16].try_into().unwrap()), 5);
}

#[tokio::test]
async fn terminate_tls_ends_at_the_proxy_with_a_plaintext_link() {
    let pki = Pki::new();
    let gw = start(settings(None)).await; // --insecure-plaintext
    let proxy = start_proxy(terminating(&pki, &gw)).await;
    let mut d = tls_device(proxy, pki.device("device-0002", Some(&pki.ca)))
        .await
        .unwrap();
    d.open("device-0002", "echo").await;
    assert_eq!(
        d.data(b"through the proxy").await.body,
        b"through the proxy"
    );
}

/// Terminate mode with TLS on the link too: the proxy presents its client certificate, the
/// gateway trusts that identity (`--proxy-identity`) to speak for the devices it checked.
/// Without the client certificate the link fails; the proxy says so and counts it.
#[tokio::test]
async fn terminate_with_tls_to_the_gateway_and_the_proxys_client_certificate() {
    let pki = Pki::new();
    let proxy_client = pki
        .ca
        .issue_client("wasmbed-proxy", wasmbed_certs::pki::KeyKind::EcdsaP256)
        .unwrap();
    std::fs::write(pki.path("proxy-client.pem"), &proxy_client.cert_pem).unwrap();
    std::fs::write(pki.path("proxy-client.key"), &proxy_client.key_pem).unwrap();
    let mut s = settings(Some(&pki));
    if let Some(tls) = s.tls.as_mut() {
        tls.proxy_identities = vec!["wasmbed-proxy".into()];
    }
    let gw = start(s).await;
    let config = |client: bool| {
        let mut c = terminating(&pki, &gw);
        c.upstream_tls = Some(UpstreamTls {
            ca: pki.path("ca.pem"),
            server_name: Some("localhost".into()),
            client: client.then(|| (pki.path("proxy-client.pem"), pki.path("proxy-client.key"))),
        });
        c
    };
    let proxy = start_proxy(config(true)).await;
    let mut d = tls_device(proxy, pki.device("device-0003", Some(&pki.ca)))
        .await
        .unwrap();
    d.open("device-0003", "echo").await;
    assert_eq!(d.data(b"both legs TLS").await.body, b"both legs TLS");
    // The proxy still refuses a HELLO naming another device: the gateway relies on that.
    let mut other = tls_device(proxy, pki.device("device-0004", Some(&pki.ca)))
        .await
        .unwrap();
    let f = other.hello("device-0003", "echo").await;
    assert_eq!(
        error_code(&f),
        wasmbed_protocol::ErrorCode::IdentityMismatch as u16
    );

    // Without its client certificate the gateway refuses the link.
    let p = Proxy::bind(config(false)).await.unwrap();
    let (proxy, gateways) = (p.listen_addrs()[0], p.gateways());
    tokio::spawn(p.run(tokio_util::sync::CancellationToken::new()));
    let mut d = tls_device(proxy, pki.device("device-0005", Some(&pki.ca)))
        .await
        .unwrap();
    d.send(wasmbed_protocol::Frame::control(
        wasmbed_protocol::Kind::Hello,
        0,
        &wasmbed_protocol::Hello {
            device: "device-0005".into(),
            app: "echo".into(),
            resume: None,
        },
    ))
    .await
    .unwrap();
    let f = d
        .recv()
        .await
        .expect("ERROR unavailable: the link could not be made");
    assert_eq!(
        error_code(&f),
        wasmbed_protocol::ErrorCode::Unavailable as u16
    );
    assert!(d.recv().await.is_none(), "then the close");
    // Counted against the gateway, in the proxy's per-gateway series.
    let metrics = wasmbed_proxy::metrics::render(&gateways);
    let m = wasmbed_testkit::Metrics::parse(&metrics);
    assert!(
        m.series("wasmbed_proxy_upstream_tls_failures_total{gateway=\"gw-test\"}") >= 1.0,
        "{metrics}"
    );
    // One process, one global metrics recorder: the gateway's, installed first; the
    // proxy's other counters land in it too.
    let metrics = wasmbed_gateway::metrics::handle().render();
    let m = wasmbed_testkit::Metrics::parse(&metrics);
    assert!(m.series("wasmbed_proxy_connections_rejected_total{reason=\"upstream_tls\"}") >= 1.0);
}

/// `--trusted-proxy-ca`: proxies get certificates from a CA of their own; any client
/// certificate from it may state devices, whatever its name. A device certificate (the
/// devices' CA) still must be the device it names, even when named like a proxy.
#[tokio::test]
async fn a_proxy_ca_of_its_own_vouches_for_the_proxies() {
    let pki = Pki::new();
    pki.proxy_ca("edge-proxy-7");
    let mut s = settings(Some(&pki));
    if let Some(tls) = s.tls.as_mut() {
        tls.trusted_proxy_ca = Some(pki.path("proxy-ca.pem"));
    }
    let gw = start(s).await;
    let mut c = terminating(&pki, &gw);
    c.upstream_tls = Some(UpstreamTls {
        ca: pki.path("ca.pem"),
        server_name: Some("localhost".into()),
        client: Some((pki.path("edge.pem"), pki.path("edge.key"))),
    });
    let proxy = start_proxy(c).await;
    let mut d = tls_device(proxy, pki.device("device-0008", Some(&pki.ca)))
        .await
        .unwrap();
    d.open("device-0008", "echo").await;
    assert_eq!(d.data(b"vouched").await.body, b"vouched");
    // Straight to the gateway with a device certificate named like the proxy: it names only
    // itself.
    let mut impostor = tls_device(gw.addr, pki.device("edge-proxy-7", Some(&pki.ca)))
        .await
        .unwrap();
    let f = impostor.hello("device-0008", "echo").await;
    assert_eq!(
        error_code(&f),
        wasmbed_protocol::ErrorCode::IdentityMismatch as u16
    );
}

/// `--client-crl` on a gateway (passthrough: the device's TLS ends here): a revoked device is
/// refused at the handshake, and a reload (SIGHUP) that revokes a connected device closes its
/// session with ERROR revoked while the others go on.
#[tokio::test]
async fn a_gateway_reload_revokes_a_connected_device() {
    let pki = Pki::new();
    let gw = with_a_crl(&pki).await;
    let (stolen_tls, stolen_serial) = identity(&pki, "device-0200");
    let (honest_tls, _) = identity(&pki, "device-0201");
    let mut stolen = tls_device(gw.addr, stolen_tls.clone()).await.unwrap();
    stolen.open("device-0200", "echo").await;
    let mut honest = tls_device(gw.addr, honest_tls).await.unwrap();
    honest.open("device-0201", "echo").await;
    std::fs::write(pki.path("crl.pem"), crl(&pki, &[stolen_serial], 2)).unwrap();
    gw.shared.reload_tls().unwrap();
    let f = stolen.recv().await.expect("ERROR revoked");
    assert_eq!(error_code(&f), wasmbed_protocol::ErrorCode::Revoked as u16);
    assert!(stolen.recv().await.is_none(), "then the close");
    assert_eq!(honest.data(b"still here").await.body, b"still here");
    // The same certificate again: refused at the handshake (TLS 1.3: seen at the first read).
    if let Ok(mut again) = tls_device(gw.addr, stolen_tls).await {
        assert!(again.no_session("device-0200", "echo").await, "no WELCOME");
    }
}

/// A certificate revoked by a reload while its device was still in the handshake (the
/// gateway had taken the connection, and the trust of then) is refused: the handshake's end
/// is held to the trust in use at that end, as a link's proxy is.
#[tokio::test]
async fn a_device_revoked_during_its_handshake_is_refused() {
    let pki = Pki::new();
    let gw = with_a_crl(&pki).await;
    let (config, serial) = identity(&pki, "device-0300");
    // Connected, no ClientHello yet: the gateway has accepted it (counted in the same step
    // as it took the trust in use).
    let accepted = "wasmbed_gateway_sessions_accepted_total";
    let before = gateway_metric(accepted);
    let tcp = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    wasmbed_testkit::until(
        std::time::Duration::from_secs(5),
        "the connection taken",
        || gateway_metric(accepted) > before,
    )
    .await;
    std::fs::write(pki.path("crl.pem"), crl(&pki, &[serial], 2)).unwrap();
    gw.shared.reload_tls().unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let rejected = "wasmbed_gateway_tls_rejected_total{reason=\"client_cert\"}";
    let before = gateway_metric(rejected);
    // The handshake completes on the device's side (TLS 1.3: the server's verdict on the
    // client's certificate comes after), and its end refuses: a close, with no ERROR (no
    // session was opened to refuse).
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("the device's side of the handshake");
    let mut late = wasmbed_testkit::Device::new(tls);
    let h = wasmbed_protocol::Hello {
        device: "device-0300".into(),
        app: "echo".into(),
        resume: None,
    };
    use wasmbed_protocol::{Frame, Kind};
    let _ = late.send(Frame::control(Kind::Hello, 0, &h)).await;
    let answer = late.recv().await;
    assert!(answer.is_none(), "a revoked device got {answer:?}");
    // At least: `cargo test` runs this file's tests in one process, whose counters they share.
    assert!(gateway_metric(rejected) - before >= 1.0);
}

/// A CRL of `pki`'s CA revoking `serials`, numbered `n`.
fn crl(pki: &Pki, serials: &[Vec<u8>], n: u64) -> String {
    pki.ca
        .crl(serials, n, std::time::Duration::from_secs(3600))
        .unwrap()
}

/// A TLS gateway whose devices' CRL is `pki.path("crl.pem")` (revoking none yet).
async fn with_a_crl(pki: &Pki) -> RunningGateway {
    std::fs::write(pki.path("crl.pem"), crl(pki, &[], 1)).unwrap();
    let mut s = settings(Some(pki));
    if let Some(tls) = s.tls.as_mut() {
        tls.client_crls = vec![pki.path("crl.pem")];
    }
    start(s).await
}

/// A device `name` of `pki`'s CA: its client config and its certificate's serial number.
fn identity(pki: &Pki, name: &str) -> (std::sync::Arc<rustls::ClientConfig>, Vec<u8>) {
    let d = pki
        .ca
        .issue_client(name, wasmbed_certs::pki::KeyKind::EcdsaP256)
        .unwrap();
    let serial = wasmbed_certs::serial_of(&d.chain()[0]).unwrap();
    let config =
        wasmbed_certs::client_config(&[pki.ca.cert_der()], Some((d.chain(), d.key().unwrap())))
            .unwrap();
    (config, serial)
}

fn gateway_metric(series: &str) -> f64 {
    let text = wasmbed_gateway::metrics::handle().render();
    wasmbed_testkit::Metrics::parse(&text).series(series)
}

/// A PROXY v2 header as a proxy sends it: `src` the device, an SSL_CN TLV naming `identity`.
fn proxy_header(identity: &str) -> Vec<u8> {
    let mut ssl = vec![3, 0, 0, 0, 0, 0x22];
    ssl.extend_from_slice(&(identity.len() as u16).to_be_bytes());
    ssl.extend_from_slice(identity.as_bytes());
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "192.0.2.50:40000".parse::<std::net::SocketAddr>().unwrap(),
            "127.0.0.1:8443".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .write_tlv(ppp::v2::Type::SSL, &ssl)
    .unwrap()
    .build()
    .unwrap()
}

/// PROXY protocol v2 on both ends: a terminating proxy sends the device's address, SNI and
/// verified identity; the gateway accepts the header from its trusted network and holds the
/// HELLO to the identity the header states.
#[tokio::test]
async fn proxy_protocol_from_a_terminating_proxy_states_the_device() {
    let pki = Pki::new();
    let mut s = settings(None); // --insecure-plaintext
    s.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    let gw = start(s).await;
    let accepted = "wasmbed_gateway_proxy_headers_total{result=\"accepted\"}";
    let before = gateway_metric(accepted);
    let mut c = terminating(&pki, &gw);
    c.proxy_protocol = vec!["default".into()];
    let proxy = start_proxy(c).await;
    let mut d = tls_device(proxy, pki.device("device-0400", Some(&pki.ca)))
        .await
        .unwrap();
    d.open("device-0400", "echo").await;
    assert_eq!(d.data(b"with a header").await.body, b"with a header");
    assert!(gateway_metric(accepted) > before, "the header was read");
    // The header's identity binds the HELLO: naming another device is refused.
    let mut raw = tcp_device(gw.addr).await;
    raw.send_raw(&proxy_header("device-0401")).await.unwrap();
    let f = raw.hello("device-0402", "echo").await;
    assert_eq!(
        error_code(&f),
        wasmbed_protocol::ErrorCode::IdentityMismatch as u16
    );
}

/// The header is read only from the trusted networks, and only well formed; a gateway that
/// does not accept the protocol treats it as garbage.
#[tokio::test]
async fn proxy_headers_from_elsewhere_or_broken_are_refused() {
    let mut s = settings(None);
    s.proxy_protocol_from = vec!["10.0.0.0/8".parse().unwrap()];
    let elsewhere = start(s).await;
    let mut d = tcp_device(elsewhere.addr).await;
    d.send_raw(&proxy_header("device-0500")).await.unwrap();
    assert!(
        d.recv().await.is_none(),
        "closed: 127.0.0.1 is not trusted for headers"
    );
    let series = "wasmbed_gateway_proxy_headers_total{result=\"not_allowed\"}";
    assert!(gateway_metric(series) >= 1.0);

    let mut s = settings(None);
    s.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    let trusting = start(s).await;
    let mut bad = proxy_header("device-0501");
    bad[12] = 0x2f; // version 2, command 15: no such command
    let mut d = tcp_device(trusting.addr).await;
    d.send_raw(&bad).await.unwrap();
    assert!(d.recv().await.is_none(), "closed: malformed");
    let mut d = tcp_device(trusting.addr).await;
    let header = proxy_header("device-0502");
    d.send_raw(&header[..20]).await.unwrap();
    drop(d); // truncated
    let mut long = proxy_header("device-0504");
    long[14..16].copy_from_slice(&u16::MAX.to_be_bytes()); // 64 KiB announced
    let mut d = tcp_device(trusting.addr).await;
    d.send_raw(&long).await.unwrap();
    assert!(d.recv().await.is_none(), "closed: too long");
    for result in ["malformed", "truncated", "too_long"] {
        let series = format!("wasmbed_gateway_proxy_headers_total{{result=\"{result}\"}}");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while gateway_metric(&series) < 1.0 {
            assert!(std::time::Instant::now() < deadline, "{series}");
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    // Without --accept-proxy-protocol, the header is just bytes that are not a frame.
    let plain = start(settings(None)).await;
    let mut d = tcp_device(plain.addr).await;
    d.send_raw(&proxy_header("device-0503")).await.unwrap();
    let f = d.recv().await.expect("an ERROR");
    assert_eq!(
        error_code(&f),
        wasmbed_protocol::ErrorCode::FrameTooLarge as u16
    );
}

/// Passthrough with PROXY v2: the header goes before the device's ClientHello, and the
/// gateway's TLS then runs as usual.
#[tokio::test]
async fn proxy_protocol_in_passthrough_goes_before_the_devices_tls() {
    let pki = Pki::new();
    let mut s = settings(Some(&pki));
    s.proxy_protocol_from = vec!["127.0.0.0/8".parse().unwrap()];
    let gw = start(s).await;
    let accepted = "wasmbed_gateway_proxy_headers_total{result=\"accepted\"}";
    let before = gateway_metric(accepted);
    let mut c = proxy_config(gw.addr, gw.admin);
    c.proxy_protocol = vec!["default".into()];
    let proxy = start_proxy(c).await;
    let mut d = tls_device(proxy, pki.device("device-0600", Some(&pki.ca)))
        .await
        .unwrap();
    assert_eq!(d.open("device-0600", "echo").await, "gw-test");
    assert_eq!(d.data(b"via header").await.body, b"via header");
    assert!(gateway_metric(accepted) > before);
}

/// Terminate mode passes CHECKPOINTs on to the device by default (its ticket survives the
/// proxy), and keeps them with `forward_checkpoints = false`.
#[tokio::test]
async fn checkpoints_reach_the_device_unless_turned_off() {
    for forward in [None, Some(false)] {
        let pki = Pki::new();
        let keys = pki.path("keys.toml");
        std::fs::write(
            &keys,
            wasmbed_gateway::ticket::KeyRing::generate("k1").unwrap(),
        )
        .unwrap();
        let mut s = settings(None);
        s.session_keys = Some(keys);
        let gw = start(s).await;
        let mut config = terminating(&pki, &gw);
        if let Some(f) = forward {
            config.migration.forward_checkpoints = f;
        }
        let proxy = start_proxy(config).await;
        let mut d = tls_device(proxy, pki.device("device-0003", Some(&pki.ca)))
            .await
            .unwrap();
        d.open("device-0003", "counter").await;
        for seq in 1..=2u64 {
            d.send(wasmbed_protocol::Frame::new(
                wasmbed_protocol::Kind::Data,
                seq,
                b"\x01".to_vec(),
            ))
            .await
            .unwrap();
        }
        let mut kinds = Vec::new();
        while kinds
            .iter()
            .filter(|k| **k == wasmbed_protocol::Kind::Reply)
            .count()
            < 2
        {
            kinds.push(d.recv().await.expect("a frame").kind);
        }
        let checkpoints = kinds
            .iter()
            .filter(|k| **k == wasmbed_protocol::Kind::Checkpoint)
            .count();
        match forward {
            None => assert!(
                checkpoints >= 1,
                "by default the device gets them: {kinds:?}"
            ),
            Some(_) => assert_eq!(checkpoints, 0, "turned off: {kinds:?}"),
        }
    }
}

/// A stopping proxy hands its terminated sessions back (issue: the proxy tier survives its
/// stops): `/readyz` 503 at once, then GOAWAY to each device (paced), the answers it is owed,
/// and its latest ticket (CHECKPOINTs reach devices): the device leaves with every DATA
/// answered and a ticket to resume elsewhere, and the proxy stops as soon as its devices have
/// left, not at the end of its grace.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_proxy_hands_sessions_back_with_goaway_answers_and_ticket() {
    let pki = Pki::new();
    let keys = pki.path("keys.toml");
    std::fs::write(
        &keys,
        wasmbed_gateway::ticket::KeyRing::generate("k1").unwrap(),
    )
    .unwrap();
    let mut s = settings(None);
    s.session_keys = Some(keys);
    let gw = start(s).await;
    let mut config = terminating(&pki, &gw);
    config.grace = std::time::Duration::from_secs(60);
    let proxy = Proxy::bind(config).await.unwrap();
    let addr = proxy.listen_addrs()[0];
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(proxy.run(shutdown.clone()));
    let mut d = tls_device(addr, pki.device("device-0004", Some(&pki.ca)))
        .await
        .unwrap();
    d.open("device-0004", "counter").await;
    for seq in 1..=5u64 {
        d.send(wasmbed_protocol::Frame::new(
            wasmbed_protocol::Kind::Data,
            seq,
            b"\x01".to_vec(),
        ))
        .await
        .unwrap();
    }
    shutdown.cancel();
    let (mut replies, mut goaway) = (Vec::new(), false);
    while replies.len() < 5 || !goaway || d.ticket.as_ref().is_none_or(|(seq, _)| *seq < 5) {
        let f = d
            .recv()
            .await
            .expect("the proxy closed before handing the session back");
        match f.kind {
            wasmbed_protocol::Kind::Reply => replies.push(f.seq),
            wasmbed_protocol::Kind::Checkpoint => d.keep_ticket(&f),
            wasmbed_protocol::Kind::Goaway => goaway = true,
            other => panic!("{other:?} {:?}", error_of(&f)),
        }
    }
    assert_eq!(
        replies,
        [1, 2, 3, 4, 5],
        "every DATA answered once, in order"
    );
    // The device leaves; the proxy, with nothing left, stops long before its 60 s grace.
    drop(d);
    let stopped = tokio::time::timeout(std::time::Duration::from_secs(20), running).await;
    assert!(matches!(stopped, Ok(Ok(Ok(())))), "{stopped:?}");
}
