//! Terminate mode: TLS ends at the proxy, device certificates are checked, plaintext (or TLS)
//! goes on to the gateway.

mod support;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::{Mode, TerminateTls, UpstreamTls};
use wasmbed_protocol::{ErrorBody, ErrorCode, Frame, Hello, Kind};

const DEVICE: &str = "device-0007";

struct Pki {
    _dir: tempfile::TempDir,
    ca: DevCa,
    ca_path: PathBuf,
    tls: TerminateTls,
}

fn pki(kind: KeyKind) -> Pki {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::generate("test CA").unwrap();
    let server = ca.issue_server(&["localhost", "127.0.0.1"], kind).unwrap();
    let write = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let ca_path = write("ca.pem", &ca.cert_pem());
    let tls = TerminateTls {
        cert: write("proxy.pem", &server.cert_pem),
        key: write("proxy.key", &server.key_pem),
        client_ca: Some(ca_path.clone()),
    };
    Pki {
        _dir: dir,
        ca,
        ca_path,
        tls,
    }
}

fn device_config(
    trust: &DevCa,
    identity_from: Option<&DevCa>,
    tls12: bool,
) -> Arc<rustls::ClientConfig> {
    let identity = identity_from.map(|ca| {
        let d = ca.issue_client(DEVICE, KeyKind::EcdsaP256).unwrap();
        (d.chain(), d.key().unwrap())
    });
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.cert_der()).unwrap();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    let b = rustls::ClientConfig::builder_with_provider(wasmbed_certs::provider())
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots);
    Arc::new(match identity {
        Some((chain, key)) => b.with_client_auth_cert(chain, key).unwrap(),
        None => b.with_no_client_auth(),
    })
}

async fn terminating_proxy(pki: &Pki, backend: &Backend) -> RunningProxy {
    let mut c = config(vec![backend.gateway("gw")]);
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
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(proxy.addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// Sends HELLO (as the certificate's device) and DATA; returns what the echo gateway sent back.
async fn echo_through(
    proxy: &RunningProxy,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<Vec<u8>> {
    let mut tls = tls_device(proxy, config).await?;
    let sent = hello_then_data(DEVICE);
    tls.write_all(&sent).await?;
    let mut back = vec![0u8; sent.len()];
    tls.read_exact(&mut back).await?;
    assert_eq!(back, sent, "the gateway got the device's bytes untouched");
    Ok(back[back.len() - 14..].to_vec())
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
    let backend = Backend::spawn().await;
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
    assert_eq!(backend.accepted(), 0, "no gateway ever saw them");
    // The rightful owner of the certificate gets through.
    let back = echo_through(&proxy, device_config(&pki.ca, Some(&pki.ca), false)).await;
    assert_eq!(back.unwrap(), b"frame over TLS");
}

#[tokio::test]
async fn a_device_with_a_valid_certificate_reaches_the_gateway_in_plaintext() {
    for kind in [KeyKind::EcdsaP256, KeyKind::Rsa2048] {
        let pki = pki(kind);
        let backend = Backend::spawn().await;
        let proxy = terminating_proxy(&pki, &backend).await;
        for tls12 in [false, true] {
            let back = echo_through(&proxy, device_config(&pki.ca, Some(&pki.ca), tls12)).await;
            assert_eq!(back.unwrap(), b"frame over TLS", "{kind:?} tls12={tls12}");
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
    let backend = Backend::spawn().await;
    let proxy = terminating_proxy(&pki, &backend).await;
    let foreign = DevCa::generate("another CA").unwrap();
    for identity in [None, Some(&foreign)] {
        let r = echo_through(&proxy, device_config(&pki.ca, identity, false)).await;
        assert!(r.is_err(), "refused");
    }
    let series = "wasmbed_proxy_connections_rejected_total{reason=\"client_cert\"}";
    until_metric(&proxy, series, 2.0).await;
    assert_eq!(backend.live(), 0, "the gateway never saw them");
}

#[tokio::test]
async fn a_failed_handshake_is_rejected_and_counted() {
    let pki = pki(KeyKind::EcdsaP256);
    let backend = Backend::spawn().await;
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
    assert_eq!(backend.live(), 0);
}

async fn until_metric(proxy: &RunningProxy, series: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        let v = proxy.metric(series).await;
        if v == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{series} is {v}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_link_to_the_gateway_can_be_tls_too() {
    let pki = pki(KeyKind::EcdsaP256);
    // A TLS echo gateway with a certificate from the same CA.
    let gw_cert = pki
        .ca
        .issue_server(&["gateway.internal"], KeyKind::EcdsaP256)
        .unwrap();
    let server =
        wasmbed_certs::server_config(gw_cert.chain(), gw_cert.key().unwrap(), None, &[]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let acceptor = TlsAcceptor::from(server);
        while let Ok((s, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    if tls.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let backend = Backend::spawn().await; // only for its gateway entry shape
    let mut gw = backend.gateway("tls-gw");
    gw.addr = addr.to_string();
    gw.health_addr = None;
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
    assert_eq!(back.unwrap(), b"frame over TLS");
}
