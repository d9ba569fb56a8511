//! Terminate mode: TLS ends at the proxy, device certificates are checked, plaintext (or TLS)
//! goes on to the gateway.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::frames::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::{Mode, UpstreamTls};
use wasmbed_protocol::{ErrorBody, ErrorCode, Frame, Hello, Kind};

const DEVICE: &str = "device-0007";

fn device_config(
    trust: &DevCa,
    identity_from: Option<&DevCa>,
    tls12: bool,
) -> Arc<rustls::ClientConfig> {
    device_tls(trust, identity_from, DEVICE, tls12)
}

async fn terminating_proxy(pki: &Pki, backend: &FrameGateway) -> RunningProxy {
    let mut c = config(vec![backend.gateway()]);
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    start(c).await
}

/// The device's first frame: HELLO as `device`, then a DATA frame.
fn hello_then_data(device: &str) -> Vec<u8> {
    let hello = Hello {
        device: device.into(),
        app: "echo".into(),
        resume: None,
    };
    let mut bytes = Frame::control(Kind::Hello, 0, &hello).encode();
    Frame::new(Kind::Data, 1, b"frame over TLS".to_vec()).encode_into(&mut bytes);
    bytes
}

async fn tls_device(
    proxy: &RunningProxy,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsDevice> {
    tls_connect(proxy.addr, config).await
}

/// Sends HELLO (as the certificate's device) and DATA in one write; returns the REPLY's body
/// (the stand-in gateway's count: `1`).
async fn echo_through(
    proxy: &RunningProxy,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<Vec<u8>> {
    let mut tls = tls_device(proxy, config).await?;
    tls.write_all(&hello_then_data(DEVICE)).await?;
    let mut device = wasmbed_testkit::Device::new(tls);
    let welcome = device
        .recv()
        .await
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    assert_eq!(welcome.kind, Kind::Welcome);
    let reply = device
        .recv()
        .await
        .ok_or(std::io::ErrorKind::UnexpectedEof)?;
    assert_eq!((reply.kind, reply.seq), (Kind::Reply, 1));
    Ok(reply.body)
}

/// Sends `bytes` as the first thing after the handshake; returns the ERROR the proxy answers.
async fn refused_with(proxy: &RunningProxy, pki: &Pki, bytes: &[u8]) -> ErrorBody {
    let mut tls = tls_device(proxy, device_config(&pki.ca, Some(&pki.ca), false))
        .await
        .unwrap();
    tls.write_all(bytes).await.unwrap();
    let mut back = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut back))
        .await
        .expect("the proxy closes");
    let (frame, _) = wasmbed_protocol::decode(&back, 1 << 16)
        .unwrap()
        .expect("an ERROR frame");
    assert_eq!(frame.kind, Kind::Error);
    frame.decode_body("ERROR").unwrap()
}

#[tokio::test]
async fn a_hello_naming_another_device_never_reaches_a_gateway() {
    let pki = pki(KeyKind::EcdsaP256);
    let backend = FrameGateway::spawn("gw").await;
    let proxy = terminating_proxy(&pki, &backend).await;
    // device-0007's certificate, HELLO naming device-0000.
    let e = refused_with(&proxy, &pki, &hello_then_data("device-0000")).await;
    assert_eq!(e.code, ErrorCode::IdentityMismatch as u16, "{e}");
    // A first frame that is not HELLO, and bytes that are not a frame.
    let data = Frame::new(Kind::Data, 1, b"x".to_vec()).encode();
    let e = refused_with(&proxy, &pki, &data).await;
    assert_eq!(e.code, ErrorCode::NoSession as u16, "{e}");
    let e = refused_with(&proxy, &pki, b"\xff\xff\xff\xff garbage").await;
    assert_eq!(e.code, ErrorCode::FrameTooLarge as u16, "{e}");
    let bad_hello = Frame::new(Kind::Hello, 0, b"not cbor".to_vec()).encode();
    let e = refused_with(&proxy, &pki, &bad_hello).await;
    assert_eq!(e.code, ErrorCode::BadHello as u16, "{e}");
    for reason in ["identity_mismatch", "no_session", "bad_frame", "bad_hello"] {
        let series = format!("wasmbed_proxy_connections_rejected_total{{reason=\"{reason}\"}}");
        until_metric(&proxy, &series, 1.0).await;
    }
    assert_eq!(backend.hellos(), 0, "no gateway ever saw them");
    // The rightful owner of the certificate gets through.
    let back = echo_through(&proxy, device_config(&pki.ca, Some(&pki.ca), false)).await;
    assert_eq!(back.unwrap(), b"1");
}

#[tokio::test]
async fn a_device_with_a_valid_certificate_reaches_the_gateway_in_plaintext() {
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
        let pki = pki(kind);
        let backend = FrameGateway::spawn("gw").await;
        let proxy = terminating_proxy(&pki, &backend).await;
        for tls12 in [false, true] {
            let back = echo_through(&proxy, device_config(&pki.ca, Some(&pki.ca), tls12)).await;
            assert_eq!(back.unwrap(), b"1", "{kind:?} tls12={tls12}");
        }
        assert_eq!(
            proxy
                .metric("wasmbed_proxy_authenticated_devices_total")
                .await,
            2.0
        );
    }
}

#[tokio::test]
async fn missing_or_foreign_client_certificates_are_rejected_and_counted() {
    let pki = pki(KeyKind::EcdsaP256);
    let backend = FrameGateway::spawn("gw").await;
    let proxy = terminating_proxy(&pki, &backend).await;
    let foreign = DevCa::generate("another CA").unwrap();
    for identity in [None, Some(&foreign)] {
        let r = echo_through(&proxy, device_config(&pki.ca, identity, false)).await;
        assert!(r.is_err(), "refused");
    }
    let series = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    until_metric(&proxy, series, 2.0).await;
    assert_eq!(backend.hellos(), 0, "the gateway never saw them");
}

#[tokio::test]
async fn a_failed_handshake_is_rejected_and_counted() {
    let pki = pki(KeyKind::EcdsaP256);
    let backend = FrameGateway::spawn("gw").await;
    let proxy = terminating_proxy(&pki, &backend).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    // Closed by the proxy (after a TLS alert, whose bytes `closed` skips over).
    closed(&mut s, Duration::from_secs(2)).await;
    until_metric(
        &proxy,
        "wasmbed_proxy_connections_rejected_total{reason=\"tls_handshake\"}",
        1.0,
    )
    .await;
    assert_eq!(backend.hellos(), 0);
}

async fn until_metric(proxy: &RunningProxy, series: &str, want: f64) {
    proxy.until_metric(series, want).await;
}

#[tokio::test]
async fn the_link_to_the_gateway_can_be_tls_too() {
    let pki = pki(KeyKind::EcdsaP256);
    // A TLS gateway with a certificate from the same CA.
    let gw_cert = pki
        .ca
        .issue_server(&["gateway.internal"], KeyKind::EcdsaP256)
        .unwrap();
    let server =
        wasmbed_certs::server_config(gw_cert.chain(), gw_cert.key().unwrap(), None, &[]).unwrap();
    let backend = FrameGateway::spawn_with("tls-gw", Some(TlsAcceptor::from(server))).await;
    let gw = backend.gateway();
    let mut c = config(vec![gw]);
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    c.upstream_tls = Some(UpstreamTls {
        ca: pki.ca_path.clone(),
        server_name: Some("gateway.internal".into()),
        client: None,
    });
    let proxy = start(c).await;
    let back = echo_through(&proxy, device_config(&pki.ca, Some(&pki.ca), false)).await;
    assert_eq!(back.unwrap(), b"1");
    // The gateway's tickets arrive after the handshake, when the proxy's records are its own
    // (`tls::records`): they are kept, and the next session's TLS to the gateway resumes.
    let back = echo_through(&proxy, device_config(&pki.ca, Some(&pki.ca), false)).await;
    assert_eq!(back.unwrap(), b"1");
    let handshakes = "wasmbed_proxy_upstream_handshakes_total";
    until_metric(&proxy, &format!("{handshakes}{{kind=\"full\"}}"), 1.0).await;
    until_metric(&proxy, &format!("{handshakes}{{kind=\"resumed\"}}"), 1.0).await;
}

/// Expired and not-yet-valid device certificates are refused at the handshake, like one from
/// a foreign CA (`missing_or_foreign_client_certificates_are_rejected_and_counted`).
#[tokio::test]
async fn expired_and_not_yet_valid_certificates_are_refused() {
    use std::time::{Duration as D, SystemTime};
    let pki = pki(KeyKind::EcdsaP256);
    let backend = FrameGateway::spawn("gw").await;
    let proxy = terminating_proxy(&pki, &backend).await;
    let now = SystemTime::now();
    let day = D::from_secs(24 * 3600);
    let expired = pki
        .ca
        .issue_client_between(DEVICE, now - 10 * day, now - day)
        .unwrap();
    let future = pki
        .ca
        .issue_client_between(DEVICE, now + day, now + 10 * day)
        .unwrap();
    for issued in [&expired, &future] {
        let r = echo_through(&proxy, device_tls_with(&pki.ca, issued)).await;
        assert!(r.is_err(), "refused");
    }
    let series = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    until_metric(&proxy, series, 2.0).await;
    assert_eq!(backend.hellos(), 0);
}

/// `--client-crl`: a revoked device is refused at the handshake; a reload (SIGHUP) that
/// revokes a connected device closes its session with ERROR revoked and leaves the others.
#[tokio::test]
async fn a_crl_reload_revokes_a_connected_device() {
    let mut pki = pki(KeyKind::EcdsaP256);
    let backend = FrameGateway::spawn("gw").await;
    let crl_path = pki.tls.cert.with_file_name("crl.pem");
    std::fs::write(
        &crl_path,
        pki.ca.crl(&[], 1, Duration::from_secs(3600)).unwrap(),
    )
    .unwrap();
    pki.tls.client_crls = vec![crl_path.clone()];
    let proxy = terminating_proxy(&pki, &backend).await;
    let connect = |name: &str| {
        let issued = pki.ca.issue_client(name, KeyKind::EcdsaP256).unwrap();
        let config = device_tls_with(&pki.ca, &issued);
        let serial = wasmbed_certs::serial_of(&issued.chain()[0]).unwrap();
        (config, serial)
    };
    let (stolen_tls, stolen_serial) = connect("device-0100");
    let (honest_tls, _) = connect("device-0101");
    let mut stolen =
        wasmbed_testkit::Device::new(tls_connect(proxy.addr, stolen_tls.clone()).await.unwrap());
    stolen.open("device-0100", "counter").await;
    let mut honest =
        wasmbed_testkit::Device::new(tls_connect(proxy.addr, honest_tls).await.unwrap());
    honest.open("device-0101", "counter").await;
    assert_eq!(stolen.data(b"x").await.kind, Kind::Reply);
    // Revoke device-0100 and reload.
    let crl = pki
        .ca
        .crl(&[stolen_serial], 2, Duration::from_secs(3600))
        .unwrap();
    std::fs::write(&crl_path, crl).unwrap();
    proxy.device_tls.reload().unwrap();
    let f = stolen.recv().await.expect("ERROR revoked");
    assert_eq!(wasmbed_testkit::error_code(&f), ErrorCode::Revoked as u16);
    assert!(stolen.recv().await.is_none(), "then the close");
    assert_eq!(honest.data(b"y").await.kind, Kind::Reply, "the others stay");
    until_metric(&proxy, "wasmbed_proxy_sessions_revoked_total", 1.0).await;
    // A new connection with the revoked certificate fails its handshake (with TLS 1.3 the
    // client learns it at its first read), counted as a certificate refusal.
    if let Ok(tls) = tls_connect(proxy.addr, stolen_tls).await {
        let mut again = wasmbed_testkit::Device::new(tls);
        assert!(
            again.no_session("device-0100", "counter").await,
            "no WELCOME"
        );
    }
    let series = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    until_metric(&proxy, series, 1.0).await;
}

/// Affinity: a route picks a pool by the device certificate's URI SAN (or OU), with an ordered
/// fallback when that pool has no gateway up; devices that match no route go to `default`.
#[tokio::test]
async fn routes_by_certificate_attributes_with_fallback() {
    let pki = pki(KeyKind::EcdsaP256);
    let (eu, us, def) = (
        FrameGateway::spawn("gw-eu").await,
        FrameGateway::spawn("gw-us").await,
        FrameGateway::spawn("gw-default").await,
    );
    let mut gateways = vec![eu.gateway(), us.gateway(), def.gateway()];
    gateways[0].pool = "eu".into();
    gateways[1].pool = "us".into();
    let mut c = config(gateways);
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    c.routes = vec![
        wasmbed_config::RouteConfig {
            sni: None,
            alpn: None,
            cert_uri: Some("wasmbed://region/eu-*".into()),
            cert_ou: None,
            pool: "eu".into(),
            fallback: vec!["us".into()],
        },
        wasmbed_config::RouteConfig {
            sni: None,
            alpn: None,
            cert_uri: None,
            cert_ou: Some("fleet-us".into()),
            pool: "us".into(),
            fallback: Vec::new(),
        },
    ];
    let proxy = start(c).await;
    let open = |issued: wasmbed_certs::pki::Issued, name: &'static str| {
        let config = device_tls_with(&pki.ca, &issued);
        let addr = proxy.addr;
        async move {
            let mut d = wasmbed_testkit::Device::new(tls_connect(addr, config).await.unwrap());
            d.open(name, "counter").await
        }
    };
    let eu_cert = |name| {
        pki.ca
            .issue_client_with(name, &[], &["wasmbed://region/eu-west"])
            .unwrap()
    };
    assert_eq!(open(eu_cert("device-0300"), "device-0300").await, "gw-eu");
    let ou = pki
        .ca
        .issue_client_with("device-0301", &["fleet-us"], &[])
        .unwrap();
    assert_eq!(open(ou, "device-0301").await, "gw-us");
    let plain = pki
        .ca
        .issue_client("device-0302", KeyKind::EcdsaP256)
        .unwrap();
    assert_eq!(open(plain, "device-0302").await, "gw-default");
    // The preferred pool down: its devices go to the fallback.
    eu.kill();
    until(Duration::from_secs(3), "gw-eu marked down", || {
        !proxy.gateway("gw-eu").is_healthy()
    })
    .await;
    assert_eq!(open(eu_cert("device-0303"), "device-0303").await, "gw-us");
}

/// The admin endpoint over HTTPS with an admin CA: reads need nothing, changes need the
/// bearer token or a client certificate from the admin CA.
#[tokio::test]
async fn admin_changes_over_https_take_a_token_or_an_admin_certificate() {
    let pki = pki(KeyKind::EcdsaP256);
    let backend = FrameGateway::spawn("gw").await;
    let dir = pki.tls.cert.parent().unwrap().to_path_buf();
    let admin_ca = DevCa::generate("admin CA").unwrap();
    std::fs::write(dir.join("admin-ca.pem"), admin_ca.cert_pem()).unwrap();
    let token = "an-admin-token-of-some-length";
    std::fs::write(dir.join("token"), token).unwrap();
    let mut c = config(vec![backend.gateway()]);
    c.admin_auth =
        wasmbed_config::admin::AdminAuth::load(Some(&dir.join("token")), c.admin).unwrap();
    c.admin_auth.tls = Some(wasmbed_config::admin::AdminTls {
        cert: pki.tls.cert.clone(),
        key: pki.tls.key.clone(),
        client_ca: Some(dir.join("admin-ca.pem")),
    });
    let proxy = start(c).await;
    let operator = admin_ca
        .issue_client("operator", KeyKind::EcdsaP256)
        .unwrap();
    let with_cert = device_tls_with(&pki.ca, &operator);
    let without = device_tls(&pki.ca, None, "x", false);
    let call = |config: std::sync::Arc<rustls::ClientConfig>, method, path, token| {
        wasmbed_testkit::https(proxy.admin, config, (method, path, b""), token)
    };
    assert_eq!(
        call(without.clone(), "GET", "/api/gateways", None).await.0,
        200
    );
    assert_eq!(
        call(without.clone(), "POST", "/api/gateways/gw/drain", None)
            .await
            .0,
        401
    );
    assert!(!proxy.gateway("gw").is_draining());
    let wrong = call(
        without.clone(),
        "POST",
        "/api/gateways/gw/drain",
        Some("wrong-token-000000"),
    );
    assert_eq!(wrong.await.0, 403);
    assert_eq!(
        call(with_cert, "POST", "/api/gateways/gw/drain", None)
            .await
            .0,
        200,
        "the admin certificate stands in for the token"
    );
    assert!(proxy.gateway("gw").is_draining());
    assert_eq!(
        call(without, "POST", "/api/gateways/gw/undrain", Some(token))
            .await
            .0,
        200
    );
    assert!(!proxy.gateway("gw").is_draining());
}

/// A terminating proxy whose listener forwards the decrypted bytes to `service`.
async fn raw_proxy(pki: &Pki, service: &Backend, resumption: bool) -> RunningProxy {
    let mut c = config(vec![service.gateway("service")]);
    c.mode = Mode::Terminate;
    let mut tls = pki.tls.clone();
    tls.resumption = resumption;
    c.tls = Some(tls);
    c.listeners[0].raw = true;
    start(c).await
}

/// A `raw` listener with TLS to its service: a service that takes the connection and never
/// answers the proxy's TLS does not hold the client past `handshake_timeout`: counted
/// against the gateway as a failed connect (its TLS is part of reaching it), and the client
/// refused as `gateway_unreachable` when no other gateway takes it.
#[tokio::test]
async fn a_raw_listener_bounds_the_tls_with_its_service() {
    let pki = pki(KeyKind::EcdsaP256);
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = silent.accept().await {
            held.push(conn);
        }
    });
    let mut c = config(vec![wasmbed_config::GatewayConfig {
        name: "silent".into(),
        addr: addr.to_string(),
        health_addr: None,
        weight: 1,
        pool: "default".into(),
    }]);
    c.mode = Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    c.listeners[0].raw = true;
    c.handshake_timeout = Duration::from_millis(300);
    c.upstream_tls = Some(UpstreamTls {
        ca: pki.ca_path.clone(),
        server_name: Some("gateway.internal".into()),
        client: None,
    });
    let proxy = start(c).await;
    let mut tls = tls_device(&proxy, device_config(&pki.ca, Some(&pki.ca), false))
        .await
        .unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(10), tls.read(&mut [0u8; 1]))
        .await
        .expect("the client is held by a silent service");
    assert!(matches!(ended, Ok(0) | Err(_)), "{ended:?}");
    until_metric(
        &proxy,
        "wasmbed_proxy_connections_rejected_total{reason=\"gateway_unreachable\"}",
        1.0,
    )
    .await;
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_gateway_connect_failures_total{gateway=\"silent\"}")
            .await,
        1.0
    );
}

/// A certificate its CA signed that names no device (URI SANs only, as a SPIFFE identity)
/// is taken on a `raw` listener, which reads no HELLO to hold it to: only the anchored
/// sessions refuse it (quic.rs, on every transport).
#[tokio::test]
async fn a_raw_listener_takes_a_certificate_that_names_no_device() {
    let pki = pki(KeyKind::EcdsaP256);
    let echo = Backend::spawn().await;
    let proxy = raw_proxy(&pki, &echo, true).await;
    let unnamed = pki
        .ca
        .issue_client_unnamed(&["spiffe://fleet/service/a"])
        .unwrap();
    let mut tls = tls_device(&proxy, device_tls_with(&pki.ca, &unnamed))
        .await
        .unwrap();
    tls.write_all(b"ping").await.unwrap();
    let mut got = [0u8; 4];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"ping");
}

/// A `raw` listener: TLS ends at the proxy with the same client certificate checks, and the
/// decrypted bytes reach a plain TCP service as they are (no HELLO), counted as they go.
#[tokio::test]
async fn a_raw_listener_forwards_the_decrypted_bytes_as_they_are() {
    let pki = pki(KeyKind::EcdsaP256);
    let echo = Backend::spawn().await;
    let proxy = raw_proxy(&pki, &echo, true).await;
    let request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut tls = tls_device(&proxy, device_config(&pki.ca, Some(&pki.ca), false))
        .await
        .unwrap();
    tls.write_all(request).await.unwrap();
    let mut got = vec![0u8; request.len()];
    tls.read_exact(&mut got).await.unwrap();
    assert_eq!(got, request, "the service saw the plaintext and echoed it");
    // Counted while the connection is still open.
    let up = "wasmbed_proxy_bytes_total{direction=\"upstream\"}";
    assert_eq!(proxy.metric(up).await, request.len() as f64);
    assert_eq!(echo.accepted(), 1);
    // No client certificate: refused as a device would be, the service never reached.
    let refused = async {
        let mut t = tls_device(&proxy, device_config(&pki.ca, None, false)).await?;
        t.write_all(request).await?;
        let mut b = [0u8; 1];
        match t.read(&mut b).await? {
            0 => Err(std::io::Error::other("closed")),
            _ => Ok(()),
        }
    };
    assert!(refused.await.is_err());
    until_metric(
        &proxy,
        "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}",
        1.0,
    )
    .await;
    assert_eq!(echo.accepted(), 1);
}

/// Devices resume TLS sessions by default; `--no-tls-resumption` makes every handshake a full
/// one (no session cache, no tickets).
#[tokio::test]
async fn tls_resumption_can_be_turned_off() {
    let pki = pki(KeyKind::EcdsaP256);
    let echo = Backend::spawn().await;
    for resumption in [true, false] {
        let proxy = raw_proxy(&pki, &echo, resumption).await;
        // One client config, two connections: the second may resume the first's session.
        let config = device_config(&pki.ca, Some(&pki.ca), false);
        let mut kinds = Vec::new();
        for _ in 0..2 {
            let mut t = tls_device(&proxy, config.clone()).await.unwrap();
            // A round trip: the server's session tickets arrive with the answer.
            t.write_all(b"ping").await.unwrap();
            let mut b = [0u8; 4];
            t.read_exact(&mut b).await.unwrap();
            kinds.push(t.get_ref().1.handshake_kind());
        }
        let second = if resumption {
            rustls::HandshakeKind::Resumed
        } else {
            rustls::HandshakeKind::Full
        };
        assert_eq!(
            kinds,
            vec![Some(rustls::HandshakeKind::Full), Some(second)],
            "resumption {resumption}"
        );
    }
}
