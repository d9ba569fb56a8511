//! The multiplexed link (`wasmbed gateway --link`, `wasmbed proxy --upstream link`): device
//! sessions as streams of one QUIC connection per gateway (per session worker of the proxy),
//! opened only by a proxy.

mod support;

use std::sync::Arc;

use support::*;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::{GatewayConfig, Mode, ProxyConfig, TerminateTls, UpstreamTls};
use wasmbed_proxy::Proxy;

/// The PKI plus a CA of the proxies' own and one proxy certificate from it.
struct LinkPki {
    pki: Pki,
    proxy_ca: DevCa,
}

impl LinkPki {
    fn new() -> LinkPki {
        let pki = Pki::new();
        let proxy_ca = pki.proxy_ca("edge-proxy");
        LinkPki { pki, proxy_ca }
    }

    /// A gateway serving links, trusting the proxies' CA.
    fn gateway(&self) -> wasmbed_config::GatewaySettings {
        let mut s = settings(Some(&self.pki));
        s.link = true;
        if let Some(tls) = s.tls.as_mut() {
            tls.trusted_proxy_ca = Some(self.pki.path("proxy-ca.pem"));
        }
        s
    }

    /// A terminating proxy in front of `gateways`, reaching them by links.
    fn proxy(&self, gateways: &[&RunningGateway]) -> ProxyConfig {
        let mut c = ProxyConfig::from_toml(
            "admin = \"off\"\nmode = \"terminate\"\nupstream = \"link\"\n\
             [tls]\ncert = \"a\"\nkey = \"b\"\n\
             [upstream_tls]\nca = \"c\"\ncert = \"d\"\nkey = \"e\"\n\
             [[listener]]\naddr = \"127.0.0.1:0\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
        )
        .unwrap();
        c.gateways = gateways
            .iter()
            .enumerate()
            .map(|(i, g)| GatewayConfig {
                name: format!("gw-{i}"),
                addr: g.addr.to_string(),
                health_addr: Some(g.admin.to_string()),
                weight: 1,
                pool: "default".into(),
            })
            .collect();
        let p = &self.pki;
        c.tls = Some(TerminateTls {
            cert: p.path("gw.pem"),
            key: p.path("gw.key"),
            client_ca: Some(p.path("ca.pem")),
            client_crls: Vec::new(),
            resumption: true,
            ticket_keys: None,
        });
        c.upstream_tls = Some(UpstreamTls {
            ca: p.path("ca.pem"),
            server_name: Some("localhost".into()),
            client: Some((p.path("edge.pem"), p.path("edge.key"))),
        });
        c
    }
}

/// A client config presenting an `edge-proxy` certificate from `issuer`, trusting the PKI.
fn proxy_client(lp: &LinkPki, issuer: &DevCa) -> rustls::ClientConfig {
    let cert = issuer
        .issue_client("edge-proxy", KeyKind::EcdsaP256)
        .unwrap();
    presenting(lp, &cert)
}

/// A client config presenting `cert`, trusting the PKI.
fn presenting(lp: &LinkPki, cert: &wasmbed_certs::pki::Issued) -> rustls::ClientConfig {
    let tls = wasmbed_certs::client_config(
        &[lp.pki.ca.cert_der()],
        Some((cert.chain(), cert.key().unwrap())),
    )
    .unwrap();
    (*tls).clone()
}

/// A QUIC client of the link with `tls` (a certificate of the test's choice).
async fn link_client(
    gateway: std::net::SocketAddr,
    tls: rustls::ClientConfig,
) -> Result<quinn::Connection, quinn::ConnectionError> {
    quic_client(gateway, tls, wasmbed_gateway::link::ALPN).await
}

/// A QUIC connection to `to` with `tls`, offering `alpn`.
async fn quic_client(
    to: std::net::SocketAddr,
    mut tls: rustls::ClientConfig,
    alpn: &[u8],
) -> Result<quinn::Connection, quinn::ConnectionError> {
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).unwrap();
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    endpoint.connect(to, "localhost").unwrap().await
}

/// `config` bound and running: its live state, and the address devices dial.
async fn run(config: ProxyConfig) -> (Arc<wasmbed_proxy::live::Live>, std::net::SocketAddr) {
    let proxy = Proxy::bind(config).await.unwrap();
    let (live, addr) = (proxy.live(), proxy.listen_addrs()[0]);
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    (live, addr)
}

/// `n` devices through `addr`, each with a `counter` session, named `prefix` and its number
/// (`width` digits).
async fn counting(
    lp: &LinkPki,
    addr: std::net::SocketAddr,
    prefix: &str,
    n: usize,
    width: usize,
) -> Vec<TlsDevice> {
    let mut devices = Vec::new();
    for i in 0..n {
        let id = format!("{prefix}{i:0width$}");
        let mut d = tls_device(addr, lp.pki.device(&id, Some(&lp.pki.ca)))
            .await
            .unwrap();
        d.open(&id, "counter").await;
        devices.push(d);
    }
    devices
}

/// The proxy's links counted with `result` (in this test process's recorder).
fn links_counted(result: &str) -> f64 {
    let text = wasmbed_gateway::metrics::handle().render();
    wasmbed_testkit::Metrics::parse(&text)
        .series(&format!("wasmbed_proxy_links_total{{result=\"{result}\"}}"))
}

/// Every session to a gateway rides one link; the gateway serves them as it serves TCP
/// sessions (the app's state, the identity the proxy stated).
#[tokio::test]
async fn sessions_to_a_gateway_share_one_link() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let mut config = lp.proxy(&[&gw]);
    // One thread: one link per gateway (`each_session_worker_has_links_of_its_own` runs two).
    config.threads = Some(1);
    let proxy = Proxy::bind(config).await.unwrap();
    let links = proxy
        .live()
        .context()
        .links
        .clone()
        .expect("--upstream link");
    let addr = proxy.listen_addrs()[0];
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    assert_eq!(links.lanes(), 1, "one thread: one lane");
    assert_eq!(links.live(), 0, "a link is made on first use");
    let mut devices = Vec::new();
    for i in 0..3 {
        let id = format!("device-00{i}");
        let mut d = tls_device(addr, lp.pki.device(&id, Some(&lp.pki.ca)))
            .await
            .unwrap();
        assert_eq!(d.open(&id, "counter").await, "gw-test");
        devices.push(d);
    }
    for round in 1..=2u64 {
        for d in devices.iter_mut() {
            let r = d.data(b"\x01").await;
            assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), round);
        }
    }
    assert_eq!(links.live(), 1, "three sessions, one link");
    assert_eq!(
        gw.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire),
        3
    );
    // The proxy still refuses a HELLO naming another device: on a link the gateway believes it.
    let mut other = tls_device(addr, lp.pki.device("device-009", Some(&lp.pki.ca)))
        .await
        .unwrap();
    let f = other.hello("device-000", "counter").await;
    assert_eq!(
        error_code(&f),
        wasmbed_protocol::ErrorCode::IdentityMismatch as u16
    );
}

/// With session workers, each has links of its own: a session's stream is opened on its
/// worker's link (its UDP socket and endpoint on that worker), never on another thread's. A
/// QUIC device's session, on the main runtime, rides the main runtime's link.
#[tokio::test]
async fn each_session_worker_has_links_of_its_own() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(2);
    config.quic.listen = Some("127.0.0.1:0".parse().unwrap());
    let proxy = Proxy::bind(config).await.unwrap();
    let links = proxy.live().context().links.clone().expect("a link proxy");
    let (addr, quic) = (proxy.listen_addrs()[0], proxy.quic_addr().unwrap());
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    assert_eq!(
        links.lanes(),
        3,
        "the main runtime's (QUIC devices) and a worker's each"
    );
    assert_eq!(links.live_by_lane(), [0, 0, 0]);
    // The first session stays on the worker that accepted it (the first), the second goes to
    // the other (fewer sessions): each worker's session opens a link of its own.
    let mut devices = Vec::new();
    for i in 0..2 {
        let id = format!("device-05{i}");
        let mut d = tls_device(addr, lp.pki.device(&id, Some(&lp.pki.ca)))
            .await
            .unwrap();
        assert_eq!(d.open(&id, "counter").await, "gw-test");
        devices.push(d);
    }
    assert_eq!(
        links.live_by_lane(),
        [0, 1, 1],
        "none on the main runtime's lane, one on each worker's"
    );
    for d in devices.iter_mut() {
        let r = d.data(b"\x01").await;
        assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), 1);
    }
    // A QUIC device: its session runs on the main runtime, and so does its link.
    let tls = (*lp.pki.device("device-052", Some(&lp.pki.ca))).clone();
    let conn = quic_client(quic, tls, wasmbed_proxy::quic::ALPN)
        .await
        .unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut d = Device::new(tokio::io::join(recv, send));
    assert_eq!(d.open("device-052", "counter").await, "gw-test");
    assert_eq!(links.live_by_lane(), [1, 1, 1]);
    // Without QUIC devices no session runs on the main runtime: no lane is made there.
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(2);
    let proxy = Proxy::bind(config).await.unwrap();
    let links = proxy.live().context().links.clone().expect("a link proxy");
    assert_eq!(
        links.lanes(),
        2,
        "a lane on each worker, none on the main runtime"
    );
}

/// Only a proxy holds a link: a device's certificate gets the link closed with
/// `NOT_A_PROXY`, and a client without a certificate does not finish the handshake.
#[tokio::test]
async fn a_link_is_refused_to_anything_but_a_proxy() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let device = (*lp.pki.device("device-0100", Some(&lp.pki.ca))).clone();
    let conn = link_client(gw.addr, device)
        .await
        .expect("the device's certificate passes TLS");
    let closed = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed()).await;
    match closed.expect("the gateway closes a device's link at once") {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(wasmbed_gateway::link::NOT_A_PROXY)
            );
        }
        other => panic!("closed otherwise: {other}"),
    }
    // With TLS 1.3 a client learns of a refused certificate (or none) only after its side of
    // the handshake: the connection then closes with the TLS alert, never an application's.
    let refused_by_tls = |conn: Result<quinn::Connection, quinn::ConnectionError>| async move {
        match conn {
            Err(_) => true,
            Ok(c) => matches!(
                c.closed().await,
                quinn::ConnectionError::ConnectionClosed(_)
            ),
        }
    };
    let anonymous = (*lp.pki.device("nobody", None)).clone();
    assert!(
        refused_by_tls(link_client(gw.addr, anonymous).await).await,
        "no client certificate, no link"
    );
    // A proxy certificate from a CA the gateway does not trust: no link either.
    let stranger = DevCa::generate("strangers").unwrap();
    assert!(
        refused_by_tls(link_client(gw.addr, proxy_client(&lp, &stranger)).await).await,
        "an untrusted proxy certificate gets no link"
    );
}

/// A stream must open with a PROXY header: one that starts with anything else (a HELLO
/// straight away), or ends inside the header, is stopped and gets no session.
#[tokio::test]
async fn a_stream_without_its_header_is_stopped() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let conn = link_client(gw.addr, proxy_client(&lp, &lp.proxy_ca))
        .await
        .unwrap();
    let hello = wasmbed_protocol::Hello {
        device: "device-0200".into(),
        app: "echo".into(),
        resume: None,
    };
    let frame = wasmbed_protocol::Frame::control(wasmbed_protocol::Kind::Hello, 0, &hello);
    // A HELLO where the header belongs: the stream is stopped with BAD_HEADER.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(&frame.encode()).await.unwrap();
    let code = send.stopped().await.unwrap();
    assert_eq!(
        code,
        Some(quinn::VarInt::from_u32(wasmbed_gateway::link::BAD_HEADER))
    );
    let answer = recv.read_to_end(1 << 16).await.unwrap_or_default();
    assert!(
        answer.is_empty(),
        "no frame for a stream without its header"
    );
    // The start of a header, then the end of the stream: no session either.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(b"\r\n\r\n\0\r\n").await.unwrap();
    send.finish().unwrap();
    let answer = recv.read_to_end(1 << 16).await.unwrap_or_default();
    assert!(answer.is_empty(), "no frame for a truncated header");
    assert_eq!(
        gw.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
}

/// `--link` without the proxies' certificates is refused at start: nothing could open one.
#[test]
fn link_needs_the_proxies_certificates() {
    let pki = Pki::new();
    let flags = wasmbed_config::GatewayFlags {
        tls_cert: Some(pki.path("gw.pem")),
        tls_key: Some(pki.path("gw.key")),
        client_ca: Some(pki.path("ca.pem")),
        link: true,
        ..Default::default()
    };
    let e = wasmbed_config::GatewaySettings::load(&flags)
        .unwrap_err()
        .to_string();
    assert!(e.contains("link") && e.contains("trusted-proxy-ca"), "{e}");
    let plain = wasmbed_config::GatewayFlags {
        insecure_plaintext: true,
        link: true,
        ..Default::default()
    };
    assert!(wasmbed_config::GatewaySettings::load(&plain).is_err());
    let _ = Mode::Terminate;
}

/// A gateway whose certificate the proxy does not trust gets no link: the proxy counts the
/// failed link, the device gets no session, and the gateway sees none.
#[tokio::test]
async fn a_gateway_with_a_certificate_the_proxy_does_not_trust_gets_no_link() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let stranger = DevCa::generate("not the gateways' CA").unwrap();
    std::fs::write(lp.pki.path("stranger.pem"), stranger.cert_pem()).unwrap();
    let mut config = lp.proxy(&[&gw]);
    if let Some(up) = config.upstream_tls.as_mut() {
        up.ca = lp.pki.path("stranger.pem");
    }
    let (live, addr) = run(config).await;
    let links = live.context().links.clone().expect("a link proxy");
    let mut d = tls_device(addr, lp.pki.device("device-0300", Some(&lp.pki.ca)))
        .await
        .unwrap();
    assert_eq!(
        d.refused_with("device-0300", "echo").await,
        Some(wasmbed_protocol::ErrorCode::Unavailable as u16),
        "no gateway, no session: ERROR unavailable, then the close"
    );
    assert_eq!(links.live(), 0);
    assert_eq!(links.held(), 0, "a link never made leaves nothing behind");
    assert_eq!(
        gw.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
}

/// A gateway removed takes its link with it, once its sessions have moved: the link is
/// closed and the proxy keeps nothing of it (a closed link kept would keep quinn's state of
/// every stream it carried: ~180 KB of the proxy per gateway address ever linked, found in
/// the soak). The sessions go on on the other gateway, app state and all.
#[tokio::test]
async fn a_removed_gateways_link_is_closed_and_forgotten() {
    let lp = LinkPki::new();
    // One key ring: a session sealed by one gateway resumes on the other.
    let keys = lp.pki.path("keys.toml");
    std::fs::write(
        &keys,
        wasmbed_gateway::ticket::KeyRing::generate("k1").unwrap(),
    )
    .unwrap();
    let gateway = || {
        let mut s = lp.gateway();
        s.session_keys = Some(keys.clone());
        s
    };
    let (a, b) = (start(gateway()).await, start(gateway()).await);
    let mut config = lp.proxy(&[&a, &b]);
    // One thread: one link per gateway, counted below.
    config.threads = Some(1);
    // The link's watch looks every `link_timeout` whether its gateway is gone.
    config.link_timeout = std::time::Duration::from_secs(1);
    let (live, addr) = run(config).await;
    let links = live.context().links.clone().expect("a link proxy");
    let mut devices = counting(&lp, addr, "device-04", 4, 1).await;
    let count = |r: wasmbed_protocol::Frame| u64::from_le_bytes(r.body[..8].try_into().unwrap());
    for d in devices.iter_mut() {
        assert_eq!(count(d.data(b"\x01").await), 1);
    }
    assert_eq!(
        (links.live(), links.held()),
        (2, 2),
        "two gateways, two links"
    );
    assert!(live.remove_gateway("gw-0").is_some());
    // Every session answers on, its count carried over: the removed gateway's moved.
    for d in devices.iter_mut() {
        assert_eq!(count(d.data(b"\x01").await), 2);
    }
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "the removed gateway's link forgotten",
        || links.held() == 1,
    )
    .await;
    assert_eq!(links.live(), 1, "the other gateway's link stays");
    assert_eq!(
        a.shared.sessions.load(std::sync::atomic::Ordering::Acquire),
        0,
        "the removed gateway's sessions ended with its link"
    );
    for d in devices.iter_mut() {
        assert_eq!(count(d.data(b"\x01").await), 3);
    }
}

/// A link is held to the check a proxy's TCP connection gets (`DeviceTls::speaker`, whose
/// check of a resumed handshake `resume.rs` tests over TCP), at its handshake and at each
/// session it opens. A proxy's certificate revoked by a reload (SIGHUP's path): its session
/// already open goes on, its new sessions on the link are refused (the stream reset), and
/// its next link is refused.
#[tokio::test]
async fn a_revoked_proxys_new_sessions_are_refused_and_its_next_link() {
    let lp = LinkPki::new();
    let crl = lp.pki.path("proxy-crl.pem");
    let hour = std::time::Duration::from_secs(3600);
    std::fs::write(&crl, lp.proxy_ca.crl(&[], 1, hour).unwrap()).unwrap();
    let mut settings = lp.gateway();
    if let Some(tls) = settings.tls.as_mut() {
        tls.client_crls = vec![crl.clone()];
    }
    let gw = start(settings).await;
    let cert = lp
        .proxy_ca
        .issue_client("edge-proxy", KeyKind::EcdsaP256)
        .unwrap();
    let tls = presenting(&lp, &cert);
    let conn = link_client(gw.addr, tls.clone()).await.unwrap();
    let mut live = session_on(&conn, "device-0950").await;
    assert_eq!(live.data(b"one").await.kind, wasmbed_protocol::Kind::Reply);
    // The proxy's certificate revoked, the TLS re-read.
    let serial = wasmbed_certs::serial_of(&cert.chain()[0]).unwrap();
    std::fs::write(&crl, lp.proxy_ca.crl(&[serial], 2, hour).unwrap()).unwrap();
    gw.shared.reload_tls().unwrap();
    // A new session: its stream refused, the link kept.
    a_new_session_is_refused(&conn, &gw).await;
    // The session already open goes on, as a proxy's TCP sessions do.
    assert_eq!(live.data(b"two").await.kind, wasmbed_protocol::Kind::Reply);
    assert!(conn.close_reason().is_none(), "the link kept");
    // A new link: refused, by TLS (a full handshake checks the CRLs) or by the application
    // (a resumed one skipped that check, so the link's runs it).
    let again = link_client(gw.addr, tls).await;
    if let Ok(conn) = again {
        let closed = tokio::time::timeout(std::time::Duration::from_secs(5), conn.closed())
            .await
            .expect("the new link is closed");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
                c.error_code,
                quinn::VarInt::from_u32(wasmbed_gateway::link::NOT_A_PROXY)
            ),
            quinn::ConnectionError::ConnectionClosed(_) => {}
            other => panic!("closed otherwise: {other}"),
        }
    }
}

/// A new session on `conn` (the first refused on `gw`): its stream reset as a proxy's that
/// is no longer trusted, counted.
async fn a_new_session_is_refused(conn: &quinn::Connection, gw: &RunningGateway) {
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    let _ = send.write_all(&plain_proxy_header()).await;
    let code = send.stopped().await.unwrap_or(None);
    assert_eq!(
        code,
        Some(quinn::VarInt::from_u32(wasmbed_gateway::link::NOT_A_PROXY))
    );
    let (_, metrics) = http(gw.admin, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("wasmbed_gateway_link_streams_refused_total 1"),
        "{metrics}"
    );
}

/// A session on `conn` as a proxy opens one: its PROXY header (no identity stated: the
/// HELLO's device is believed), then HELLO for `echo`, answered WELCOME.
async fn session_on(
    conn: &quinn::Connection,
    device: &str,
) -> Device<tokio::io::Join<quinn::RecvStream, quinn::SendStream>> {
    let (mut send, recv) = conn.open_bi().await.unwrap();
    send.write_all(&plain_proxy_header()).await.unwrap();
    let mut d = Device::new(tokio::io::join(recv, send));
    d.open(device, "echo").await;
    d
}

/// A PROXY v2 header from a device's address, stating no identity.
fn plain_proxy_header() -> Vec<u8> {
    ppp::v2::Builder::with_addresses(
        ppp::v2::Version::Two | ppp::v2::Command::Proxy,
        ppp::v2::Protocol::Stream,
        (
            "192.0.2.50:40000".parse::<std::net::SocketAddr>().unwrap(),
            "127.0.0.1:8443".parse::<std::net::SocketAddr>().unwrap(),
        ),
    )
    .build()
    .unwrap()
}

/// A gateway replaced at the same address by a reload (its health address written another
/// way) is a new object whose sessions move onto the same link: the link is watched for the
/// object that opens streams on it now, so it stays up once the old object is gone, and the
/// sessions move once, not twice.
#[tokio::test]
async fn a_gateway_replaced_at_its_address_keeps_its_link() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(1);
    let (live, addr) = run(config.clone()).await;
    let links = live.context().links.clone().expect("--upstream link");
    let mut devices = counting(&lp, addr, "device-07", 2, 1).await;
    for d in devices.iter_mut() {
        let r = d.data(b"\x01").await;
        assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), 1);
    }
    let up = || links_counted("up");
    assert_eq!(up(), 1.0);
    // The same gateway, its health address written by name: replaced.
    config.gateways[0].health_addr = Some(format!("localhost:{}", gw.admin.port()));
    let report = live.apply(config.clone()).unwrap();
    assert_eq!(report.replaced, ["gw-0"], "{report:?}");
    // Its sessions move onto the new object, over the same link.
    let on_the_new = || {
        let set = live.context().gateways.snapshot();
        set.iter().find(|g| g.name == "gw-0").map(|g| g.sessions())
    };
    wasmbed_testkit::until(std::time::Duration::from_secs(10), "moved", || {
        on_the_new() == Some(2)
    })
    .await;
    let mut counts = Vec::new();
    for d in devices.iter_mut() {
        let r = d.data(b"\x01").await;
        counts.push(u64::from_le_bytes(r.body[..8].try_into().unwrap()));
    }
    // Past a few of the link's watch periods (its timeout, 1 s): not moved again (the count
    // goes on, where a move would start it afresh: this gateway keeps no session keys).
    tokio::time::sleep(config.link_timeout * 3).await;
    for (d, before) in devices.iter_mut().zip(counts) {
        let r = d.data(b"\x01").await;
        assert_eq!(
            u64::from_le_bytes(r.body[..8].try_into().unwrap()),
            before + 1
        );
    }
    assert_eq!(links.live(), 1);
    assert_eq!(up(), 1.0, "the link was closed and made again");
}

/// A gateway at its `--max-sessions` gives its links no more streams until one ends: a
/// session waiting for one is bounded by `connect_timeout`, counted as a failed connect, and
/// (no other gateway here) refused with ERROR `unavailable`, as over TCP a full gateway's
/// ERROR refuses it, instead of waiting unbounded with its lease held.
#[tokio::test]
async fn a_full_gateways_link_bounds_the_wait_for_a_stream() {
    let lp = LinkPki::new();
    let mut settings = lp.gateway();
    settings.max_sessions = 1;
    let gw = start(settings).await;
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(1);
    config.connect_timeout = std::time::Duration::from_millis(300);
    let (live, addr) = run(config).await;
    let mut first = tls_device(addr, lp.pki.device("device-0400", Some(&lp.pki.ca)))
        .await
        .unwrap();
    first.open("device-0400", "counter").await;
    let mut second = tls_device(addr, lp.pki.device("device-0401", Some(&lp.pki.ca)))
        .await
        .unwrap();
    let refused = tokio::time::timeout(
        std::time::Duration::from_secs(10),
        second.refused_with("device-0401", "counter"),
    )
    .await
    .expect("answered, not held waiting for a stream");
    assert_eq!(
        refused,
        Some(wasmbed_protocol::ErrorCode::Unavailable as u16)
    );
    // A full gateway is not a failed one: nothing counted against its health.
    let gateways = live.context().gateways.snapshot();
    let counted = gateways[0]
        .counts
        .connect_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counted, 0, "a full gateway counted as failing");
    let r = first.data(b"\x01").await;
    assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), 1);
}

/// Sessions that arrive while a link is being made wait for that one attempt and share its
/// outcome, a failure too: a gateway that never answers (its UDP silent) costs them one
/// connect timeout in all, not one more for each session in line, each with its lease held.
#[tokio::test]
async fn sessions_waiting_on_a_link_share_its_failure() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(1);
    config.connect_timeout = std::time::Duration::from_millis(400);
    config.connect_retries = 0;
    config.health.check = wasmbed_config::HealthCheck::None;
    config.gateways[0].addr = silent.local_addr().unwrap().to_string();
    config.gateways[0].health_addr = None;
    let (live, addr) = run(config).await;
    // Ten devices through their handshakes first, then their HELLOs at once.
    let mut devices = Vec::new();
    for i in 0..10 {
        let id = format!("device-05{i:02}");
        let d = tls_device(addr, lp.pki.device(&id, Some(&lp.pki.ca)))
            .await
            .unwrap();
        devices.push((id, d));
    }
    let answers = futures_util::future::join_all(
        devices
            .iter_mut()
            .map(|(id, d)| d.refused_with(id, "counter")),
    )
    .await;
    for a in answers {
        assert_eq!(a, Some(wasmbed_protocol::ErrorCode::Unavailable as u16));
    }
    let failed = links_counted("failed");
    assert!(
        failed < 3.0,
        "{failed} attempts for ten sessions that waited on one"
    );
    // Counted against the gateway once for the attempt, not once for each session (ten
    // observations would have passed `fall` for one failure).
    let gateways = live.context().gateways.snapshot();
    let counted = gateways[0]
        .counts
        .connect_failures
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(counted as f64, failed, "one count per attempt");
    drop(silent);
}

/// A reload that changes `[upstream_tls]` reaches the link as it reaches TCP sessions: new
/// sessions get a link made with the new trust (here a CA that does not trust the gateway:
/// refused), sessions already open keep theirs; a reload that changes nothing there
/// replaces no link.
#[tokio::test]
async fn a_reload_of_the_upstream_trust_reaches_new_sessions_on_the_link() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(1);
    let (live, addr) = run(config.clone()).await;
    let links = live.context().links.clone().expect("--upstream link");
    let up = || links_counted("up");
    let device = |id: &'static str| tls_device(addr, lp.pki.device(id, Some(&lp.pki.ca)));
    let mut first = device("device-0600").await.unwrap();
    first.open("device-0600", "counter").await;
    // Nothing changed: the same link.
    live.apply(config.clone()).unwrap();
    let mut second = device("device-0601").await.unwrap();
    second.open("device-0601", "counter").await;
    assert_eq!((links.live(), up()), (1, 1.0));
    // The gateways' CA replaced by one that does not trust this gateway.
    let stranger = DevCa::generate("not the gateways' CA").unwrap();
    std::fs::write(lp.pki.path("stranger.pem"), stranger.cert_pem()).unwrap();
    if let Some(up) = config.upstream_tls.as_mut() {
        up.ca = lp.pki.path("stranger.pem");
    }
    live.apply(config).unwrap();
    let mut third = device("device-0602").await.unwrap();
    assert_eq!(
        third.refused_with("device-0602", "counter").await,
        Some(wasmbed_protocol::ErrorCode::Unavailable as u16),
        "a new session is held to the new trust"
    );
    for d in [&mut first, &mut second] {
        let r = d.data(b"\x01").await;
        assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), 1);
    }
    // Their sessions ended, the stale link is closed (bounded: ten watch periods).
    drop((first, second));
    let replaced = || links_counted("replaced");
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "the stale link closed",
        || replaced() == 1.0,
    )
    .await;
    assert_eq!(links.live(), 0);
}

/// A gateway that drains answers a new session on its link with GOAWAY (its link still takes
/// streams, where over TCP its closed listener refuses the connect): the proxy notes the
/// drain and tries the next gateway, so a new device gets its session there, not a GOAWAY,
/// even before any probe has seen the drain.
#[tokio::test]
async fn a_new_session_on_a_draining_gateways_link_goes_to_another() {
    let lp = LinkPki::new();
    let named = |name: &str| {
        let mut s = lp.gateway();
        s.name = name.into();
        s
    };
    let (a, b) = (start(named("gw-a")).await, start(named("gw-b")).await);
    let mut config = lp.proxy(&[&a, &b]);
    config.threads = Some(1);
    // No probe in this test's time: only the GOAWAY can tell the proxy.
    config.health.interval = std::time::Duration::from_secs(600);
    let (_, addr) = run(config).await;
    // A session on each: both links up before the drain.
    let first = counting(&lp, addr, "device-07", 2, 2).await;
    // Their sessions ended, the links stay: the proxy has no session there to read a GOAWAY.
    drop(first);
    for g in [&a, &b] {
        let sessions = || g.shared.sessions.load(std::sync::atomic::Ordering::Acquire);
        wasmbed_testkit::until(std::time::Duration::from_secs(5), "ended", || {
            sessions() == 0
        })
        .await;
    }
    a.shared.draining.cancel();
    for i in 0..4 {
        let id = format!("device-08{i:02}");
        let mut d = tls_device(addr, lp.pki.device(&id, Some(&lp.pki.ca)))
            .await
            .unwrap();
        assert_eq!(d.open(&id, "counter").await, "gw-b", "{id}");
    }
}

/// A gateway that drains answers every new session GOAWAY, whatever arrived first: on a link,
/// which still takes streams while it drains, a HELLO already there must not win the race
/// (the proxy then tries another gateway).
#[tokio::test]
async fn a_draining_gateway_answers_every_new_stream_goaway() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let conn = link_client(gw.addr, proxy_client(&lp, &lp.proxy_ca))
        .await
        .unwrap();
    gw.shared.draining.cancel();
    let header = plain_proxy_header();
    for i in 0..10 {
        let hello = wasmbed_protocol::Hello {
            device: format!("device-09{i:02}"),
            app: "echo".into(),
            resume: None,
        };
        let frame = wasmbed_protocol::Frame::control(wasmbed_protocol::Kind::Hello, 0, &hello);
        let (mut send, recv) = conn.open_bi().await.unwrap();
        // The header and HELLO in one write: both there before the session starts.
        send.write_all(&[header.clone(), frame.encode()].concat())
            .await
            .unwrap();
        let mut d = Device::new(tokio::io::join(recv, send));
        let f = d.recv().await.expect("an answer");
        assert_eq!(f.kind, wasmbed_protocol::Kind::Goaway, "stream {i}");
    }
}

/// When the only gateway answers GOAWAY (it drains, and no probe has said so yet), the
/// device gets that GOAWAY, as before the proxy tried others: not an ERROR for the lack of
/// another gateway.
#[tokio::test]
async fn a_draining_only_gateways_goaway_reaches_the_device() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(1);
    config.health.interval = std::time::Duration::from_secs(600);
    let (_, addr) = run(config).await;
    // The link up, its session ended: nothing for the proxy to read a GOAWAY on.
    drop(counting(&lp, addr, "device-085", 1, 1).await);
    let sessions = || {
        gw.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire)
    };
    wasmbed_testkit::until(std::time::Duration::from_secs(5), "ended", || {
        sessions() == 0
    })
    .await;
    gw.shared.draining.cancel();
    let mut d = tls_device(addr, lp.pki.device("device-0860", Some(&lp.pki.ca)))
        .await
        .unwrap();
    let f = d.hello("device-0860", "counter").await;
    assert_eq!(f.kind, wasmbed_protocol::Kind::Goaway, "{f:?}");
}

/// Sleeps until the system clock is past `not_after` as webpki reads it (whole seconds, and
/// expired only once the time is later than `notAfter`). No event says that a certificate
/// ran out: the clock is the event.
async fn past(not_after: std::time::SystemTime) {
    let secs = not_after
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let expired = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs + 1);
    while let Ok(left) = expired.duration_since(std::time::SystemTime::now()) {
        tokio::time::sleep(left + std::time::Duration::from_millis(50)).await;
    }
}

/// A link lives longer than its proxy's certificate: past the chain's `notAfter` its new
/// sessions are refused (the stream reset, counted), as the proxy's next TCP handshake would
/// be; its session already open goes on, as a TCP session does.
#[tokio::test]
async fn a_link_takes_no_new_session_past_its_proxys_certificate() {
    let lp = LinkPki::new();
    let gw = start(lp.gateway()).await;
    let now = std::time::SystemTime::now();
    let not_after = now + std::time::Duration::from_secs(6);
    let hour_ago = now - std::time::Duration::from_secs(3600);
    let cert = lp
        .proxy_ca
        .issue_client_between("edge-proxy", hour_ago, not_after)
        .unwrap();
    let tls = presenting(&lp, &cert);
    let conn = link_client(gw.addr, tls).await.unwrap();
    let mut live = session_on(&conn, "device-0960").await;
    assert_eq!(live.data(b"one").await.kind, wasmbed_protocol::Kind::Reply);
    past(not_after).await;
    // A new session: its stream refused, the link kept.
    a_new_session_is_refused(&conn, &gw).await;
    assert_eq!(live.data(b"two").await.kind, wasmbed_protocol::Kind::Reply);
    assert!(conn.close_reason().is_none(), "the link kept");
}

/// A link lives longer than its gateway's certificate: past its `notAfter` the proxy takes no
/// new session on it (a full handshake would refuse that certificate) and makes a new link.
/// That link would resume on a ticket of the fleet's ring (the gateways' `--session-keys`),
/// and a resumption shows no certificate: its session's is the old one, run out. So it is
/// made again with a full handshake, which checks what the gateway presents now: here a
/// renewed certificate its SIGHUP read; the next session shares it. The old link's session
/// goes on, and the link is closed once it ends.
#[tokio::test]
async fn a_link_takes_no_new_session_past_its_gateways_certificate() {
    let lp = LinkPki::new();
    // Devices meet the proxy under a certificate of its own; the gateway's is replaced below.
    let p = &lp.pki;
    std::fs::copy(p.path("gw.pem"), p.path("front.pem")).unwrap();
    std::fs::copy(p.path("gw.key"), p.path("front.key")).unwrap();
    let keys = p.path("keys.toml");
    let ring = wasmbed_gateway::ticket::KeyRing::generate("k1").unwrap();
    std::fs::write(&keys, ring).unwrap();
    let mut settings = lp.gateway();
    settings.session_keys = Some(keys);
    let gw = start(settings).await;
    let mut config = lp.proxy(&[&gw]);
    config.threads = Some(1);
    if let Some(tls) = config.tls.as_mut() {
        (tls.cert, tls.key) = (p.path("front.pem"), p.path("front.key"));
    }
    let (live, addr) = run(config).await;
    let links = live.context().links.clone().expect("--upstream link");
    // The gateway's certificate, from now on one that runs out in a few seconds (the link is
    // made only by the first session).
    let names = ["localhost", "127.0.0.1"];
    let install = |cert: &wasmbed_certs::pki::Issued| {
        std::fs::write(p.path("gw.pem"), &cert.cert_pem).unwrap();
        std::fs::write(p.path("gw.key"), &cert.key_pem).unwrap();
        gw.shared.reload_tls().unwrap();
    };
    let now = std::time::SystemTime::now();
    let not_after = now + std::time::Duration::from_secs(5);
    let hour_ago = now - std::time::Duration::from_secs(3600);
    install(
        &p.ca
            .issue_server_between(&names, hour_ago, not_after)
            .unwrap(),
    );
    let device = |id: &'static str| tls_device(addr, p.device(id, Some(&p.ca)));
    let mut first = device("device-0970").await.unwrap();
    first.open("device-0970", "counter").await;
    assert_eq!((links.live(), links_counted("up")), (1, 1.0));
    // Renewed (read at the gateway's SIGHUP), then the old one runs out.
    install(&p.ca.issue_server(&names, KeyKind::EcdsaP256).unwrap());
    past(not_after).await;
    let mut second = device("device-0971").await.unwrap();
    second.open("device-0971", "counter").await;
    let mut third = device("device-0972").await.unwrap();
    third.open("device-0972", "counter").await;
    // One new link for both, in the old one's place in the lane (one per gateway): the
    // resumed attempt, closed at once, is not one.
    assert_eq!(
        (links.live(), links_counted("up")),
        (1, 2.0),
        "the new sessions on one new link"
    );
    let r = first.data(b"\x01").await;
    assert_eq!(u64::from_le_bytes(r.body[..8].try_into().unwrap()), 1);
    // Its session ended, the old link is closed (bounded: ten watch periods).
    drop(first);
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "the old link closed",
        || links_counted("replaced") == 1.0,
    )
    .await;
    assert_eq!(links.live(), 1);
}
