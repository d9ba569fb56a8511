//! Parity: every check, refusal and count of a terminating proxy holds the same on every
//! transport and every upstream. One table of refusals, run for {TLS over TCP, QUIC} ×
//! {a TCP/TLS connection per session, the multiplexed link}: the documented ERROR (or TLS
//! alert) reaches the device before the close, QUIC says "refused" in its close code, the
//! refusal has the same `reason` label, and nothing reaches a gateway. Then revocation by a
//! reload (the live session and the next handshake, on both transports), a reload with an
//! unreadable CRL (the running trust stays for both), and extra QUIC streams.

mod support;

use std::sync::Arc;
use std::time::Duration;

use support::*;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::proxy::UpstreamMode;
use wasmbed_config::{GatewayConfig, ProxyConfig, TerminateTls, UpstreamTls};
use wasmbed_protocol::{ErrorCode, Frame, Hello, Kind};
use wasmbed_proxy::Proxy;

type QuicStream = tokio::io::Join<quinn::RecvStream, quinn::SendStream>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Quic,
}

/// A device connection on either transport (a few per test: their size does not matter).
#[allow(clippy::large_enum_variant)]
enum Conn {
    Tcp(TlsDevice),
    /// The connection, its session stream, and its endpoint (kept: its UDP socket).
    Quic(
        quinn::Connection,
        Device<QuicStream>,
        #[allow(dead_code)] quinn::Endpoint,
    ),
}

impl Conn {
    /// Connects and (QUIC) opens the session stream. `Err`: the handshake was refused.
    async fn open(
        transport: Transport,
        proxy: &Running,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Conn, String> {
        match transport {
            Transport::Tcp => tls_device(proxy.tcp, tls)
                .await
                .map(Conn::Tcp)
                .map_err(|e| e.to_string()),
            Transport::Quic => {
                let mut tls = (*tls).clone();
                tls.alpn_protocols = vec![wasmbed_proxy::quic::ALPN.to_vec()];
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
                    .map_err(|e| e.to_string())?;
                let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                let client = quinn::ClientConfig::new(Arc::new(crypto));
                let conn = endpoint
                    .connect_with(client, proxy.quic, "localhost")
                    .map_err(|e| e.to_string())?
                    .await
                    .map_err(|e| e.to_string())?;
                let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                Ok(Conn::Quic(
                    conn,
                    Device::new(tokio::io::join(recv, send)),
                    endpoint,
                ))
            }
        }
    }

    async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = match self {
            Conn::Tcp(d) => d.send_raw(bytes).await,
            Conn::Quic(_, d, _) => d.send_raw(bytes).await,
        };
    }

    async fn recv(&mut self) -> Option<Frame> {
        match self {
            Conn::Tcp(d) => d.recv().await,
            Conn::Quic(_, d, _) => d.recv().await,
        }
    }

    async fn data(&mut self, body: &[u8]) -> Frame {
        match self {
            Conn::Tcp(d) => d.data(body).await,
            Conn::Quic(_, d, _) => d.data(body).await,
        }
    }

    /// QUIC: the application code the proxy closed the connection with.
    async fn close_code(&self) -> Option<u64> {
        let Conn::Quic(conn, _, _) = self else {
            return None;
        };
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("QUIC closed within 10s");
        match closed {
            quinn::ConnectionError::ApplicationClosed(c) => Some(u64::from(c.error_code)),
            other => panic!("not an application close: {other}"),
        }
    }
}

/// The PKI: devices' CA (`ca.pem`), a CA of the proxies' own, a CRL file, a foreign CA.
struct Env {
    pki: Pki,
    foreign: DevCa,
    /// Serials the CRL revokes.
    revoked: std::sync::Mutex<Vec<Vec<u8>>>,
    crl_number: std::sync::atomic::AtomicU64,
}

impl Env {
    fn new() -> Env {
        let pki = Pki::new();
        pki.proxy_ca("edge-proxy");
        let env = Env {
            pki,
            foreign: DevCa::generate("someone else's CA").unwrap(),
            revoked: Default::default(),
            crl_number: 1.into(),
        };
        env.write_crl();
        env
    }

    fn write_crl(&self) {
        let n = self
            .crl_number
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let serials = self.revoked.lock().unwrap().clone();
        let crl = self
            .pki
            .ca
            .crl(&serials, n, Duration::from_secs(3600))
            .unwrap();
        std::fs::write(self.pki.path("crl.pem"), crl).unwrap();
    }

    /// A device's client config with a certificate of the devices' CA; with `revoke`, its
    /// serial is put in the CRL file (read at the next start or reload).
    fn device(&self, name: &str, revoke: bool) -> Arc<rustls::ClientConfig> {
        let issued = self.pki.ca.issue_client(name, KeyKind::EcdsaP256).unwrap();
        if revoke {
            let serial = wasmbed_certs::serial_of(&issued.chain()[0]).unwrap();
            self.revoked.lock().unwrap().push(serial);
            self.write_crl();
        }
        wasmbed_certs::client_config(
            &[self.pki.ca.cert_der()],
            Some((issued.chain(), issued.key().unwrap())),
        )
        .unwrap()
    }

    fn gateway(&self) -> wasmbed_config::GatewaySettings {
        let mut s = settings(Some(&self.pki));
        s.link = true;
        if let Some(tls) = s.tls.as_mut() {
            tls.trusted_proxy_ca = Some(self.pki.path("proxy-ca.pem"));
        }
        s
    }

    fn proxy(&self, gw: &RunningGateway, upstream: UpstreamMode) -> ProxyConfig {
        let mut c = ProxyConfig::from_toml(
            "admin = \"off\"\nmode = \"terminate\"\nquic_listen = \"127.0.0.1:0\"\n\
             [tls]\ncert = \"a\"\nkey = \"b\"\n\
             [upstream_tls]\nca = \"c\"\ncert = \"d\"\nkey = \"e\"\n\
             [[listener]]\naddr = \"127.0.0.1:0\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
        )
        .unwrap();
        c.upstream = upstream;
        c.gateways = vec![GatewayConfig {
            name: "gw-0".into(),
            addr: gw.addr.to_string(),
            health_addr: Some(gw.admin.to_string()),
            weight: 1,
            pool: "default".into(),
        }];
        let p = &self.pki;
        c.tls = Some(TerminateTls {
            cert: p.path("gw.pem"),
            key: p.path("gw.key"),
            client_ca: Some(p.path("ca.pem")),
            client_crls: vec![p.path("crl.pem")],
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

struct Running {
    upstream: UpstreamMode,
    tcp: std::net::SocketAddr,
    quic: std::net::SocketAddr,
    live: Arc<wasmbed_proxy::live::Live>,
}

async fn run_proxy(config: ProxyConfig) -> Running {
    let upstream = config.upstream;
    let proxy = Proxy::bind(config).await.unwrap();
    let running = Running {
        upstream,
        tcp: proxy.listen_addrs()[0],
        quic: proxy.quic_addr().expect("a QUIC listener"),
        live: proxy.live(),
    };
    tokio::spawn(proxy.run(tokio_util::sync::CancellationToken::new()));
    running
}

/// One proxy per upstream in front of `gw`: per-session TCP, and the link.
async fn both_upstreams(env: &Env, gw: &RunningGateway) -> [Running; 2] {
    [
        run_proxy(env.proxy(gw, UpstreamMode::Tcp)).await,
        run_proxy(env.proxy(gw, UpstreamMode::Link)).await,
    ]
}

fn metric(series: &str) -> f64 {
    // One process, one recorder (the gateway's, installed first): the proxies count there.
    let text = wasmbed_gateway::metrics::handle().render();
    wasmbed_testkit::Metrics::parse(&text).series(series)
}

async fn until_metric(series: &str, want: f64) {
    let s = series.to_string();
    wasmbed_testkit::until(Duration::from_secs(10), series, move || metric(&s) >= want).await;
}

/// One test at a time: the counters are the process's (`cargo test` runs tests as threads).
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn rejected(label: &str) -> String {
    format!("wasmbed_proxy_connections_rejected_total{{reason=\"{label}\"}}")
}

/// Which certificate a row's device shows.
#[derive(Debug, Clone, Copy)]
enum Cert {
    Own,
    None,
    Foreign,
    RevokedAtStart,
}

/// What a row's device sends first.
#[derive(Debug, Clone, Copy)]
enum First {
    HelloAsOther,
    DataBeforeHello,
    BadHello,
    Oversized,
    Hello,
}

/// What the device gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// This ERROR, then the close (QUIC: close code 3, `refused`).
    Error(ErrorCode),
    /// The TLS handshake fails (a certificate alert).
    Handshake,
}

struct Row {
    name: &'static str,
    cert: Cert,
    first: First,
    want: Want,
    label: &'static str,
}

const ROWS: &[Row] = &[
    Row {
        name: "identity mismatch",
        cert: Cert::Own,
        first: First::HelloAsOther,
        want: Want::Error(ErrorCode::IdentityMismatch),
        label: "identity_mismatch",
    },
    Row {
        name: "DATA before HELLO",
        cert: Cert::Own,
        first: First::DataBeforeHello,
        want: Want::Error(ErrorCode::NoSession),
        label: "no_session",
    },
    Row {
        name: "bad HELLO",
        cert: Cert::Own,
        first: First::BadHello,
        want: Want::Error(ErrorCode::BadHello),
        label: "bad_hello",
    },
    Row {
        name: "oversized frame",
        cert: Cert::Own,
        first: First::Oversized,
        want: Want::Error(ErrorCode::FrameTooLarge),
        label: "bad_frame",
    },
    Row {
        name: "no client certificate",
        cert: Cert::None,
        first: First::Hello,
        want: Want::Handshake,
        label: "client_cert",
    },
    Row {
        name: "foreign CA",
        cert: Cert::Foreign,
        first: First::Hello,
        want: Want::Handshake,
        label: "client_cert",
    },
    Row {
        name: "revoked at start",
        cert: Cert::RevokedAtStart,
        first: First::Hello,
        want: Want::Handshake,
        label: "client_cert",
    },
];

fn hello(device: &str) -> Vec<u8> {
    let h = Hello {
        device: device.into(),
        app: "echo".into(),
        resume: None,
    };
    Frame::control(Kind::Hello, 0, &h).encode()
}

/// Plays one row: the device connects, sends its first bytes, and must see what the row says;
/// the refusal is counted under the row's label.
async fn play(
    proxy: &Running,
    transport: Transport,
    row: &Row,
    (tls, name): (Arc<rustls::ClientConfig>, &str),
) {
    let case = format!(
        "{} over {transport:?}, upstream {:?}",
        row.name, proxy.upstream
    );
    let before = metric(&rejected(row.label));
    let first = match row.first {
        First::HelloAsOther => hello("somebody-else"),
        First::DataBeforeHello => Frame::new(Kind::Data, 1, b"x".to_vec()).encode(),
        First::BadHello => Frame::new(Kind::Hello, 0, vec![0xff, 0x00, 0x13]).encode(),
        First::Oversized => {
            let mut b = (10u32 << 20).to_be_bytes().to_vec();
            b.extend_from_slice(&[Kind::Data as u8, 0, 0, 0, 0, 0, 0, 0, 1]);
            b
        }
        First::Hello => hello(name),
    };
    match (Conn::open(transport, proxy, tls).await, row.want) {
        (Err(_), Want::Handshake) => {}
        (Ok(mut conn), Want::Handshake) => {
            // TLS 1.3 over TCP: the client learns of the refusal at its first read.
            conn.send_raw(&first).await;
            assert!(conn.recv().await.is_none(), "{case}: not refused");
        }
        (Err(e), Want::Error(_)) => panic!("{case}: handshake failed: {e}"),
        (Ok(mut conn), Want::Error(code)) => {
            conn.send_raw(&first).await;
            let f = conn
                .recv()
                .await
                .unwrap_or_else(|| panic!("{case}: no ERROR"));
            assert_eq!(f.kind, Kind::Error, "{case}: {f:?}");
            assert_eq!(error_code(&f), code as u16, "{case}: {:?}", error_of(&f));
            assert!(conn.recv().await.is_none(), "{case}: then the close");
            if transport == Transport::Quic {
                let refused = u64::from(wasmbed_proxy::quic::code::REFUSED);
                assert_eq!(conn.close_code().await, Some(refused), "{case}: close code");
            }
        }
    }
    until_metric(&rejected(row.label), before + 1.0).await;
    assert_eq!(
        metric(&rejected(row.label)),
        before + 1.0,
        "{case}: counted twice"
    );
}

#[tokio::test]
async fn every_refusal_is_the_same_on_every_transport_and_upstream() {
    let _one = SERIAL.lock().await;
    let env = Env::new();
    let revoked_at_start = env.device("revoked-at-start", true);
    let gw = start(env.gateway()).await;
    let proxies = both_upstreams(&env, &gw).await;
    // Sessions handed to the gateway, by either proxy (each proxy's per-gateway series are
    // its own, rendered from its gateway set).
    let started = || -> f64 {
        let series = "wasmbed_proxy_sessions_started_total{gateway=\"gw-0\"}";
        proxies
            .iter()
            .map(|p| {
                let text = wasmbed_proxy::metrics::render(&p.live.context().gateways);
                wasmbed_testkit::Metrics::parse(&text).series(series)
            })
            .sum()
    };
    let links = "wasmbed_proxy_links_total{result=\"up\"}";
    let (started_before, links_before) = (started(), metric(links));
    let mut n = 0;
    for proxy in &proxies {
        for transport in [Transport::Tcp, Transport::Quic] {
            for row in ROWS {
                n += 1;
                let name = format!("device-{n:04}");
                let tls = match row.cert {
                    Cert::Own => env.device(&name, false),
                    Cert::None => env.pki.device(&name, None),
                    Cert::Foreign => env.pki.device(&name, Some(&env.foreign)),
                    Cert::RevokedAtStart => revoked_at_start.clone(),
                };
                play(proxy, transport, row, (tls, &name)).await;
            }
        }
    }
    // Nothing reached the gateway: no session was handed to it, no link was made.
    assert_eq!(
        started(),
        started_before,
        "a refused device reached a gateway"
    );
    assert_eq!(
        gw.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
    assert_eq!(
        metric(links),
        links_before,
        "a link was made for a refused device"
    );
}

/// One session per device and app, on both transports and both upstreams: a device that
/// connects again while its earlier connection is still open (a zombie whose close was lost)
/// gets the session; the earlier connection is closed (TCP: reset; QUIC: close code 5
/// `superseded`) and its session on the gateway ends with it.
#[tokio::test]
async fn a_newer_connection_ends_the_earlier_session_on_every_transport_and_upstream() {
    let _one = SERIAL.lock().await;
    let env = Env::new();
    let gw = start(env.gateway()).await;
    let proxies = both_upstreams(&env, &gw).await;
    let shared = gw.shared.clone();
    let live = move |want: usize| {
        let shared = shared.clone();
        async move {
            wasmbed_testkit::until(Duration::from_secs(10), "gateway sessions", || {
                shared.sessions.load(std::sync::atomic::Ordering::Acquire) == want
            })
            .await
        }
    };
    let pairs = [
        (Transport::Tcp, Transport::Tcp),
        (Transport::Quic, Transport::Quic),
        (Transport::Tcp, Transport::Quic),
        (Transport::Quic, Transport::Tcp),
    ];
    let mut n = 0;
    for proxy in &proxies {
        for (first, second) in pairs {
            n += 1;
            let name = format!("device-seat-{n}");
            let tls = env.device(&name, false);
            let mut old = Conn::open(first, proxy, tls.clone()).await.unwrap();
            old.send_raw(&hello(&name)).await;
            assert_eq!(old.recv().await.map(|f| f.kind), Some(Kind::Welcome));
            live(1).await;
            let mut new = Conn::open(second, proxy, tls).await.unwrap();
            new.send_raw(&hello(&name)).await;
            assert_eq!(new.recv().await.map(|f| f.kind), Some(Kind::Welcome));
            let what = format!("{:?} {first:?} then {second:?}", proxy.upstream);
            match first {
                Transport::Quic => assert_eq!(
                    old.close_code().await,
                    Some(u64::from(wasmbed_proxy::quic::code::SUPERSEDED)),
                    "{what}"
                ),
                Transport::Tcp => assert!(old.recv().await.is_none(), "{what}: still open"),
            }
            assert_eq!(new.data(b"x").await.kind, Kind::Reply, "{what}");
            // The earlier session's gateway session ended: one per device.
            live(1).await;
            drop((old, new));
            live(0).await;
        }
    }
}

/// A reload that revokes a device: its live session gets ERROR `revoked` and the close, its
/// next handshake is refused (`client_cert`), on both transports and both upstreams; a reload
/// with an unreadable CRL changes nothing for either transport.
#[tokio::test]
async fn a_reload_revokes_on_every_transport_and_a_bad_one_changes_nothing() {
    let _one = SERIAL.lock().await;
    let env = Env::new();
    let gw = start(env.gateway()).await;
    let proxies = both_upstreams(&env, &gw).await;
    let mut n = 0;
    for proxy in &proxies {
        for transport in [Transport::Tcp, Transport::Quic] {
            n += 1;
            let case = format!("over {transport:?}, upstream {:?}", proxy.upstream);
            let name = format!("device-{n:04}");
            let mut honest_n = format!("honest-{n:04}");
            let tls = env.device(&name, false);
            let mut live = Conn::open(transport, proxy, tls.clone()).await.unwrap();
            live.send_raw(&hello(&name)).await;
            assert_eq!(
                live.recv().await.map(|f| f.kind),
                Some(Kind::Welcome),
                "{case}"
            );
            assert_eq!(live.data(b"one").await.kind, Kind::Reply, "{case}");
            let mut honest = Conn::open(transport, proxy, env.device(&honest_n, false))
                .await
                .unwrap();
            honest.send_raw(&hello(&honest_n)).await;
            assert_eq!(honest.recv().await.map(|f| f.kind), Some(Kind::Welcome));

            // Revoked, and the CRL re-read (SIGHUP's path): the live session is told.
            let serial = serial_of_config(&tls);
            env.revoked.lock().unwrap().push(serial);
            env.write_crl();
            let before = metric(&rejected("client_cert"));
            proxy.live.reload().unwrap();
            let f = live.recv().await.expect("ERROR revoked");
            assert_eq!(error_code(&f), ErrorCode::Revoked as u16, "{case}");
            assert!(live.recv().await.is_none(), "{case}: then the close");
            if transport == Transport::Quic {
                let refused = u64::from(wasmbed_proxy::quic::code::REFUSED);
                assert_eq!(live.close_code().await, Some(refused), "{case}");
            }
            assert_eq!(
                honest.data(b"still").await.kind,
                Kind::Reply,
                "{case}: the others stay"
            );
            // The next handshake with the revoked certificate is refused, on this transport.
            match Conn::open(transport, proxy, tls.clone()).await {
                Err(_) => {}
                Ok(mut again) => {
                    again.send_raw(&hello(&name)).await;
                    assert!(
                        again.recv().await.is_none(),
                        "{case}: revoked device welcomed"
                    );
                }
            }
            until_metric(&rejected("client_cert"), before + 1.0).await;

            // An unreadable CRL: the reload is refused and the trust in use stays whole.
            std::fs::write(env.pki.path("crl.pem"), "not a CRL").unwrap();
            assert!(proxy.live.reload().is_err(), "{case}: a bad CRL was taken");
            env.write_crl();
            for t in [Transport::Tcp, Transport::Quic] {
                match Conn::open(t, proxy, tls.clone()).await {
                    Err(_) => {}
                    Ok(mut again) => {
                        again.send_raw(&hello(&name)).await;
                        assert!(again.recv().await.is_none(), "{case}: {t:?} forgot the CRL");
                    }
                }
                honest_n.push('x');
                let mut fresh = Conn::open(t, proxy, env.device(&honest_n, false))
                    .await
                    .unwrap();
                fresh.send_raw(&hello(&honest_n)).await;
                let f = fresh.recv().await.map(|f| f.kind);
                assert_eq!(f, Some(Kind::Welcome), "{case}: {t:?} lost its trust");
            }
        }
    }
}

/// The serial of the certificate a client config presents.
fn serial_of_config(tls: &Arc<rustls::ClientConfig>) -> Vec<u8> {
    let certified = tls
        .client_auth_cert_resolver
        .resolve(&[], &[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .expect("a client certificate");
    wasmbed_certs::serial_of(&certified.cert[0]).unwrap()
}

/// A QUIC device may have one session per connection: a second stream is reset with
/// `EXTRA_STREAM` and counted, and the session goes on (both upstreams).
#[tokio::test]
async fn an_extra_quic_stream_is_reset_and_the_session_goes_on() {
    let _one = SERIAL.lock().await;
    let env = Env::new();
    let gw = start(env.gateway()).await;
    for upstream in [UpstreamMode::Tcp, UpstreamMode::Link] {
        let proxy = run_proxy(env.proxy(&gw, upstream)).await;
        let name = format!("device-{upstream:?}");
        let before = metric("wasmbed_proxy_quic_streams_refused_total");
        let mut conn = Conn::open(Transport::Quic, &proxy, env.device(&name, false))
            .await
            .unwrap();
        conn.send_raw(&hello(&name)).await;
        assert_eq!(conn.recv().await.map(|f| f.kind), Some(Kind::Welcome));
        let Conn::Quic(c, _, _) = &conn else {
            unreachable!()
        };
        let (mut send, mut recv) = c.open_bi().await.unwrap();
        send.write_all(&hello(&name)).await.unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(Duration::from_secs(10), recv.read(&mut buf))
            .await
            .expect("an answer within 10s");
        let extra = u64::from(wasmbed_proxy::quic::code::EXTRA_STREAM);
        match read {
            Err(quinn::ReadError::Reset(code)) => assert_eq!(u64::from(code), extra),
            other => panic!("{upstream:?}: the extra stream was not reset: {other:?}"),
        }
        until_metric("wasmbed_proxy_quic_streams_refused_total", before + 1.0).await;
        assert_eq!(conn.data(b"on").await.kind, Kind::Reply, "{upstream:?}");
    }
}

/// Reloads in the middle of a handshake storm and of moves: 40 devices (half over QUIC, half
/// over TCP) dial at once while the config is reloaded again and again; then a gateway is
/// drained by moving its sessions, still under reloads. Every device gets its session, every
/// DATA its answer, and no device's connection ends.
#[tokio::test]
async fn reloads_during_a_handshake_storm_and_moves_lose_nothing() {
    let _one = SERIAL.lock().await;
    let env = Env::new();
    let gws = [start(env.gateway()).await, start(env.gateway()).await];
    let mut config = env.proxy(&gws[0], UpstreamMode::Link);
    let mut second = config.gateways[0].clone();
    second.name = "gw-1".into();
    second.addr = gws[1].addr.to_string();
    second.health_addr = Some(gws[1].admin.to_string());
    config.gateways.push(second);
    let proxy = Arc::new(run_proxy(config).await);
    let reloading = tokio_util::sync::CancellationToken::new();
    let reloads = {
        let (proxy, stop) = (proxy.clone(), reloading.clone());
        tokio::spawn(async move {
            let mut n = 0u32;
            while !stop.is_cancelled() {
                proxy.live.reload().expect("a reload of the same files");
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            n
        })
    };
    let mut dialing = tokio::task::JoinSet::new();
    for i in 0..40 {
        let transport = if i % 2 == 0 {
            Transport::Quic
        } else {
            Transport::Tcp
        };
        let name = format!("storm-{i:04}");
        let tls = env.device(&name, false);
        let proxy = proxy.clone();
        dialing.spawn(async move {
            let mut conn = Conn::open(transport, &proxy, tls).await.unwrap();
            conn.send_raw(&hello(&name)).await;
            let f = conn.recv().await.map(|f| f.kind);
            assert_eq!(f, Some(Kind::Welcome), "{name} over {transport:?}");
            conn
        });
    }
    let mut conns = Vec::new();
    while let Some(conn) = dialing.join_next().await {
        conns.push(conn.unwrap());
    }
    for conn in conns.iter_mut() {
        assert_eq!(conn.data(b"before").await.kind, Kind::Reply);
    }
    // Drain gw-0 by moving its sessions, while the reloads go on.
    let ctx = proxy.live.context();
    let gw0 = ctx.gateways.find("gw-0").unwrap();
    let on_gw0 = gw0.sessions();
    assert!(on_gw0 > 0, "the storm went to both gateways");
    gw0.set_draining(true);
    gw0.order_moves(usize::MAX);
    wasmbed_testkit::until(Duration::from_secs(20), "gw-0's sessions moved", || {
        gw0.sessions() == 0
    })
    .await;
    reloading.cancel();
    assert!(
        reloads.await.unwrap() > 1,
        "reloads ran during the storm and the moves"
    );
    for conn in conns.iter_mut() {
        assert_eq!(conn.data(b"after").await.kind, Kind::Reply);
        if let Conn::Quic(c, _, _) = conn {
            assert!(
                c.close_reason().is_none(),
                "a QUIC device's connection ended"
            );
        }
    }
    assert_eq!(
        ctx.gateways.find("gw-1").unwrap().sessions(),
        40,
        "every session on the gateway left"
    );
}

/// A gateway whose TLS fails (its certificate from a CA the proxy does not trust: a rotation
/// gone wrong on one of them) is tried, counted against it (`upstream_tls_failures`, a failed
/// health observation) and passed over, on both upstreams: every device gets a session on
/// the others, none is refused. (Keeping no session, it would otherwise be the least loaded
/// gateway, the one the balancer picks, and every session sent there refused.)
#[tokio::test]
async fn a_gateway_whose_tls_fails_is_passed_over_on_every_upstream() {
    let _one = SERIAL.lock().await;
    let env = Env::new();
    let good = start(env.gateway()).await;
    let stranger = env
        .foreign
        .issue_server(&["localhost", "127.0.0.1"], KeyKind::EcdsaP256)
        .unwrap();
    std::fs::write(env.pki.path("bad.pem"), &stranger.cert_pem).unwrap();
    std::fs::write(env.pki.path("bad.key"), &stranger.key_pem).unwrap();
    let mut settings = env.gateway();
    if let Some(tls) = settings.tls.as_mut() {
        tls.cert = env.pki.path("bad.pem");
        tls.key = env.pki.path("bad.key");
    }
    let bad = start(settings).await;
    let refused_before = metric(&rejected("upstream_tls"));
    let mut n = 0;
    for upstream in [UpstreamMode::Tcp, UpstreamMode::Link] {
        let mut c = env.proxy(&good, upstream);
        c.gateways.push(GatewayConfig {
            name: "bad".into(),
            addr: bad.addr.to_string(),
            health_addr: Some(bad.admin.to_string()),
            weight: 1,
            pool: "default".into(),
        });
        let proxy = run_proxy(c).await;
        // The gateway's own counts (rendered at a scrape of the proxy's, not in the recorder).
        let failures = || {
            let gateways = proxy.live.context().gateways.snapshot();
            let bad = gateways.iter().find(|g| g.name == "bad").expect("listed");
            bad.counts
                .upstream_tls_failures
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut sessions = Vec::new();
        for _ in 0..6 {
            n += 1;
            let name = format!("device-{n:04}");
            let mut d = Conn::open(Transport::Tcp, &proxy, env.device(&name, false))
                .await
                .unwrap();
            d.send_raw(&hello(&name)).await;
            let f = d.recv().await.map(|f| f.kind);
            assert_eq!(f, Some(Kind::Welcome), "{upstream:?}: {name}");
            sessions.push(d);
        }
        assert!(
            failures() > 0,
            "{upstream:?}: the bad gateway was tried and its TLS failure counted"
        );
    }
    assert_eq!(
        metric(&rejected("upstream_tls")),
        refused_before,
        "no device refused"
    );
    assert_eq!(
        bad.shared
            .sessions
            .load(std::sync::atomic::Ordering::Acquire),
        0
    );
}
