//! `TlsStream`'s tests. Those of a connection after its handshake run on both of the proxy's
//! sides, both TLS versions and both ways of protecting the records (`CASES`; key updates and
//! tickets on TLS 1.3's). The handshake's own paths (a device's first flight, its refused
//! certificate, a key update sent with its Finished) and the records' internals (their AEAD
//! contexts, the limit for one key) are tested on a device's connection, the side that has
//! them or the one they are written once for.

use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use rustls::client::UnbufferedClientConnection;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use wasmbed_certs::pki::{DevCa, KeyKind};

use super::TlsStream;

/// A device: rustls' client.
type Client = tokio_rustls::client::TlsStream<TcpStream>;
/// A gateway: rustls' server.
type Gateway = tokio_rustls::server::TlsStream<TcpStream>;
/// The proxy's end of its connection to a gateway.
type Upstream = TlsStream<UnbufferedClientConnection>;

/// Copies `from` to `to` one byte per write, so that every record arrives in pieces.
async fn dribble(mut from: impl AsyncRead + Unpin, mut to: impl AsyncWrite + Unpin) {
    let mut byte = [0u8; 1];
    while let Ok(1) = from.read(&mut byte).await {
        if to.write_all(&byte).await.is_err() || to.flush().await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// The proxy's config (device certificates from its CA required) and a device's, whose
/// certificate comes from that CA when `trusted`, from another one otherwise.
fn configs(trusted: bool) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    configs_with(trusted, None)
}

/// As [`configs`], the device offering only `suite` when one is given (the proxy prefers
/// AES-128-GCM, so the others are negotiated only with a device that offers nothing else).
fn configs_with(
    trusted: bool,
    suite: Option<rustls::SupportedCipherSuite>,
) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ca = DevCa::generate("test CA").unwrap();
    let other = DevCa::generate("another CA").unwrap();
    let server = ca
        .issue_server(&["device.test"], KeyKind::EcdsaP256)
        .unwrap();
    let device = if trusted { &ca } else { &other }
        .issue_client("device-1", KeyKind::EcdsaP256)
        .unwrap();
    let server = wasmbed_certs::server_config(
        server.chain(),
        server.key().unwrap(),
        Some(&[ca.cert_der()]),
        &[],
    )
    .unwrap();
    let client = match suite {
        None => wasmbed_certs::client_config(
            &[ca.cert_der()],
            Some((device.chain(), device.key().unwrap())),
        )
        .unwrap(),
        Some(suite) => {
            let provider = rustls::crypto::CryptoProvider {
                cipher_suites: vec![suite],
                ..rustls::crypto::aws_lc_rs::default_provider()
            };
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.cert_der()).unwrap();
            let version = match suite {
                rustls::SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
                rustls::SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
            };
            let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots)
                .with_client_auth_cert(device.chain(), device.key().unwrap())
                .unwrap();
            Arc::new(config)
        }
    };
    (super::noting_server_names(server), client)
}

/// Every test of a connection after its handshake runs on both ways of protecting its
/// records: rustls' connection (`false`: every connection's before `shed_handshake`) and the
/// records alone (`true`).
const SHED: [bool; 2] = [false, true];

/// Which peer the proxy's end of a test connection faces: a device (the proxy rustls'
/// server, `TlsStream::accept`) or a gateway (the proxy its client, `TlsStream::connect`,
/// as with `[upstream_tls]`).
#[derive(Clone, Copy, Debug)]
enum Role {
    Device,
    Gateway,
}

/// The TLS version a test connection speaks: both have their records sealed by the
/// proxy once shed (`records::Format`).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Version {
    Tls13,
    /// With ECDHE-ECDSA and AES-128-GCM, whose nonce is partly sent in each record.
    Tls12,
}

impl Version {
    fn configs(self) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        match self {
            Version::Tls13 => configs(true),
            Version::Tls12 => configs_with(true, Some(TLS12)),
        }
    }
}

const TLS12: rustls::SupportedCipherSuite =
    rustls::crypto::aws_lc_rs::cipher_suite::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256;

/// Every test of a connection after its handshake runs on both of the proxy's sides, both
/// TLS versions (key updates on TLS 1.3's only: [`TLS13_CASES`]) and both ways of
/// protecting its records.
const CASES: [(Role, Version, bool); 8] = [
    (Role::Device, Version::Tls13, false),
    (Role::Device, Version::Tls13, true),
    (Role::Gateway, Version::Tls13, false),
    (Role::Gateway, Version::Tls13, true),
    (Role::Device, Version::Tls12, false),
    (Role::Device, Version::Tls12, true),
    (Role::Gateway, Version::Tls12, false),
    (Role::Gateway, Version::Tls12, true),
];

/// [`CASES`] of TLS 1.3, for what only it has (key updates, tickets after the handshake).
const TLS13_CASES: [(Role, Version, bool); 4] = [CASES[0], CASES[1], CASES[2], CASES[3]];

/// The proxy's peer in a test, through tokio-rustls.
trait Peer: AsyncRead + AsyncWrite + Unpin + Send {
    fn tcp(&mut self) -> &mut TcpStream;
    /// Sends a `KeyUpdate` asking for the proxy's.
    fn refresh_keys(&mut self);
    fn suite(&self) -> Option<rustls::SupportedCipherSuite>;
}

impl Peer for Client {
    fn tcp(&mut self) -> &mut TcpStream {
        self.get_mut().0
    }
    fn refresh_keys(&mut self) {
        self.get_mut().1.refresh_traffic_keys().unwrap();
    }
    fn suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.get_ref().1.negotiated_cipher_suite()
    }
}

impl Peer for Gateway {
    fn tcp(&mut self) -> &mut TcpStream {
        self.get_mut().0
    }
    fn refresh_keys(&mut self) {
        self.get_mut().1.refresh_traffic_keys().unwrap();
    }
    fn suite(&self) -> Option<rustls::SupportedCipherSuite> {
        self.get_ref().1.negotiated_cipher_suite()
    }
}

/// Both of the proxy's sides.
const ROLES: [Role; 2] = [Role::Device, Role::Gateway];

/// The proxy's end of a test connection, either side.
enum Ours {
    Server(TlsStream),
    Client(Upstream),
}

/// `$body` with `$t` the stream inside `$ours`, whichever side.
macro_rules! either {
    ($ours:expr, $t:ident => $body:expr) => {
        match $ours {
            Ours::Server($t) => $body,
            Ours::Client($t) => $body,
        }
    };
}

impl Ours {
    fn io(&self) -> &TcpStream {
        either!(self, t => &t.io)
    }

    /// Whether the handshake was a full or a resumed one (before the shed).
    fn kind(&self) -> Option<rustls::HandshakeKind> {
        either!(self, t => t.handshake_kind())
    }

    /// Sheds the handshake (`TlsStream::shed_handshake`); whether the records are the proxy's
    /// own now.
    fn shed(&mut self) -> bool {
        either!(self, t => {
            t.shed_handshake().unwrap();
            matches!(t.conn, super::Conn::Records(_))
        })
    }

    /// The TLS version the connection speaks.
    fn version(&self) -> rustls::ProtocolVersion {
        either!(self, t => match &t.conn {
            super::Conn::Rustls(conn) => conn.protocol_version(),
            super::Conn::Records(records) => Some(records.version()),
            super::Conn::Gone => None,
        })
        .expect("a handshake done")
    }

    /// Seals at most `n` records under one key (the records' own, once shed).
    fn limit_records_per_key(&mut self, n: u64) {
        either!(self, t => match &mut t.conn {
            super::Conn::Records(records) => records.limit_records_per_key(n),
            _ => panic!("not shed"),
        })
    }

    /// Records sealed under the present key (the records' own, once shed).
    fn sealed_under_this_key(&self) -> u64 {
        either!(self, t => match &t.conn {
            super::Conn::Records(records) => records.sealed_under_this_key(),
            _ => panic!("not shed"),
        })
    }

    /// Whether the records keep rustls' kernel connection (`None`: not shed).
    fn keeps_kernel(&self) -> Option<bool> {
        either!(self, t => match &t.conn {
            super::Conn::Records(records) => Some(records.keeps_kernel()),
            _ => None,
        })
    }

    /// The capacity of the stream's own buffers: received, decrypted, to send.
    fn buffers(&self) -> (usize, usize, usize) {
        either!(self, t => (t.incoming.capacity(), t.plaintext.capacity(), t.outgoing.capacity()))
    }
}

impl AsyncRead for Ours {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        either!(self.get_mut(), t => Pin::new(t).poll_read(cx, buf))
    }
}

impl AsyncWrite for Ours {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        either!(self.get_mut(), t => Pin::new(t).poll_write(cx, data))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either!(self.get_mut(), t => Pin::new(t).poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        either!(self.get_mut(), t => Pin::new(t).poll_shutdown(cx))
    }
}

/// A peer of `role` and the proxy's end of its connection; `dribbled`: through a relay
/// that passes one byte at a time; `shed`: the handshake shed, the records the proxy's own.
async fn pair(role: Role, version: Version, dribbled: bool, shed: bool) -> (Box<dyn Peer>, Ours) {
    pair_from(role, version.configs(), dribbled, shed).await
}

/// As [`pair`], with these settings: the server's, and the client's.
async fn pair_from(
    role: Role,
    (config, client): (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>),
    dribbled: bool,
    shed: bool,
) -> (Box<dyn Peer>, Ours) {
    match role {
        Role::Device => {
            let (peer, ours) = pair_with(config, client, dribbled, shed).await;
            (Box::new(peer), Ours::Server(ours))
        }
        Role::Gateway => {
            let (peer, ours) = gateway_pair_with(config, client, dribbled, shed).await;
            (Box::new(peer), Ours::Client(ours))
        }
    }
}

/// A device (rustls' client, with a certificate) and the proxy's end of its connection.
async fn device_pair(dribbled: bool, shed: bool) -> (Client, TlsStream) {
    let (config, client) = configs(true);
    pair_with(config, client, dribbled, shed).await
}

/// Where to connect to reach `addr`: itself, or a relay that passes one byte at a time.
async fn relayed(addr: std::net::SocketAddr, dribbled: bool) -> std::net::SocketAddr {
    if !dribbled {
        return addr;
    }
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    tokio::spawn(async move {
        let (from_client, _) = relay.accept().await.unwrap();
        let to_server = TcpStream::connect(addr).await.unwrap();
        let (cr, cw) = from_client.into_split();
        let (sr, sw) = to_server.into_split();
        tokio::join!(dribble(cr, sw), dribble(sr, cw));
    });
    relay_addr
}

/// A gateway (rustls' server, with `config`) and the proxy's end of its connection, the
/// proxy the client with `client`'s settings (its secrets handed over, as
/// `tls::connector` sets them).
async fn gateway_pair_with(
    config: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    dribbled: bool,
    shed: bool,
) -> (Gateway, Upstream) {
    let mut client = Arc::unwrap_or_clone(client);
    client.enable_secret_extraction = true;
    let client = Arc::new(client);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = relayed(listener.local_addr().unwrap(), dribbled).await;
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::join!(
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.unwrap()
        },
        async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
            let mut tls = TlsStream::connect(client, name, tcp).await.unwrap();
            assert_eq!(tls.peer_certificates().map(<[_]>::len), Some(1));
            if shed {
                tls.shed_handshake().unwrap();
                assert!(matches!(tls.conn, super::Conn::Records(_)), "not shed");
            }
            tls
        },
    )
}

async fn pair_with(
    config: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    dribbled: bool,
    shed: bool,
) -> (Client, TlsStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = relayed(listener.local_addr().unwrap(), dribbled).await;
    let connector = tokio_rustls::TlsConnector::from(client);
    tokio::join!(
        async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
            connector.connect(name, tcp).await.unwrap()
        },
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            let (mut tls, name) = TlsStream::accept(Arc::clone(&config), tcp).await.unwrap();
            assert_eq!(name.as_deref(), Some("device.test"));
            assert_eq!(tls.peer_certificates().map(<[_]>::len), Some(1));
            if shed {
                tls.shed_handshake().unwrap();
                assert!(matches!(tls.conn, super::Conn::Records(_)), "not shed");
            }
            tls
        },
    )
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

async fn bytes_cross_both_ways(role: Role, version: Version, dribbled: bool, shed: bool) {
    let (mut client, mut server) = pair(role, version, dribbled, shed).await;
    let size = if dribbled { 20_000 } else { 200_000 };
    let up = pattern(size, 1);
    let down = pattern(size, 2);
    let ((), got_up) = tokio::join!(async { client.write_all(&up).await.unwrap() }, async {
        let mut got = vec![0u8; size];
        server.read_exact(&mut got).await.unwrap();
        got
    });
    assert!(got_up == up, "the peer's bytes arrived changed ({role:?})");
    let ((), got_down) = tokio::join!(
        async {
            server.write_all(&down).await.unwrap();
            server.flush().await.unwrap();
        },
        async {
            let mut got = vec![0u8; size];
            client.read_exact(&mut got).await.unwrap();
            got
        }
    );
    assert!(
        got_down == down,
        "the proxy's bytes arrived changed ({role:?})"
    );
    // An idle session keeps no buffer of its own, and on TLS 1.2 nothing of rustls'.
    assert_eq!(server.buffers(), (0, 0, 0), "{role:?}, shed: {shed}");
    let kernel = shed.then_some(matches!(version, Version::Tls13));
    assert_eq!(server.keeps_kernel(), kernel, "{role:?}, {version:?}");
}

#[tokio::test]
async fn bytes_cross_both_ways_and_an_idle_stream_keeps_no_buffer() {
    for (role, version, shed) in CASES {
        bytes_cross_both_ways(role, version, false, shed).await;
    }
}

#[tokio::test]
async fn records_that_arrive_a_byte_at_a_time_are_read_whole() {
    for (role, version, shed) in CASES {
        bytes_cross_both_ways(role, version, true, shed).await;
    }
}

/// A read that took all the socket had leaves the socket waiting for its next readiness
/// event, so the next read makes no system call that finds nothing (with `try_read` it
/// stayed marked readable: one such call after every message).
#[tokio::test]
async fn a_read_that_drains_the_socket_waits_for_the_next_readiness() {
    for (role, version, shed) in CASES {
        let (mut client, mut server) = pair(role, version, false, shed).await;
        client.write_all(b"hello").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 5];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        let ready = std::future::poll_fn(|cx| {
            std::task::Poll::Ready(server.io().poll_read_ready(cx).is_ready())
        })
        .await;
        assert!(
            !ready,
            "the socket is still marked readable after a draining read"
        );
        // Not ready for a reason of its own (a spent budget, a closed socket): the next bytes
        // make it readable, and they are read.
        client.write_all(b"again").await.unwrap();
        client.flush().await.unwrap();
        server.io().readable().await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
    }
}

#[tokio::test]
async fn a_key_update_is_answered_and_bytes_flow_on() {
    for (role, version, shed) in TLS13_CASES {
        let (mut client, mut server) = pair(role, version, false, shed).await;
        client.write_all(b"before").await.unwrap();
        let mut got = [0u8; 6];
        server.read_exact(&mut got).await.unwrap();
        client.refresh_keys();
        client.write_all(b"after!").await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"after!");
        server.write_all(b"answer").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"answer");
    }
}

#[tokio::test]
async fn after_a_key_update_the_proxys_close_still_sends_close_notify() {
    for (role, version, shed) in TLS13_CASES {
        let (mut client, mut server) = pair(role, version, false, shed).await;
        // Data, then a key update: the proxy owes the device its own key update.
        client.write_all(b"x").await.unwrap();
        client.refresh_keys();
        client.flush().await.unwrap();
        let mut got = [0u8; 1];
        server.read_exact(&mut got).await.unwrap();
        // The close sends the answer, then the alert.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
    }
}

/// What `device` gets from the proxy's end, accepting with `config` on a listener of its
/// own; and how the proxy's accept ended.
async fn against_the_proxy<T>(
    config: Arc<rustls::ServerConfig>,
    device: impl AsyncFnOnce(TcpStream) -> T,
) -> (T, std::io::Result<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::join!(
        async { device(TcpStream::connect(addr).await.unwrap()).await },
        async {
            let (tcp, _) = listener.accept().await.unwrap();
            TlsStream::accept(config, tcp).await.map(|_| ())
        },
    )
}

#[tokio::test]
async fn a_refused_certificate_gets_its_alert() {
    let (config, client) = configs(false);
    let (device, proxy) = against_the_proxy(config, async |tcp| {
        let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(client)
            .connect(name, tcp)
            .await?;
        // TLS 1.3: the client's handshake ends before the server judges its
        // certificate; the verdict arrives as an alert on the first read.
        tls.read(&mut [0u8; 1]).await
    })
    .await;
    let refused = proxy.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData, "{refused}");
    let told = device.unwrap_err().to_string();
    assert!(
        told.contains("alert"),
        "the device was not told why: {told}"
    );
}

/// Bytes that are not TLS (a deframing error, met before any handshake state): refused,
/// and the client gets one fatal `decode_error` alert, then the end of the stream. (The
/// alert used to be had by processing the bad bytes again, which failed again: a second
/// fatal alert, which rustls asserts against, a panic in debug builds.)
#[tokio::test]
async fn bytes_that_are_not_tls_get_one_alert() {
    let (config, _) = configs(true);
    let (told, refused) = against_the_proxy(config, async |mut tcp| {
        tcp.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut told = Vec::new();
        let _ = tcp.read_to_end(&mut told).await;
        told
    })
    .await;
    let refused = refused.unwrap_err();
    assert_eq!(refused.kind(), std::io::ErrorKind::InvalidData, "{refused}");
    // A plaintext alert record: type 21, TLS 1.2 framing, 2 bytes: fatal (2),
    // decode_error (50).
    assert_eq!(told, [21, 3, 3, 0, 2, 2, 50]);
}

/// A device's real first flight with a few bytes changed, hundreds of times (a fixed
/// sequence): every handshake ends, refused, and nothing panics. rustls' debug
/// assertions are on in tests, so this also checks that the stream never makes rustls
/// send a second fatal alert (it did, for bytes that failed to deframe: this test panics
/// without the fix).
#[tokio::test]
async fn mutated_first_flights_end_without_a_panic() {
    let (config, client) = configs(true);
    let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
    let mut device = rustls::ClientConnection::new(client, name).unwrap();
    let mut flight = Vec::new();
    device.write_tls(&mut flight).unwrap();
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut refused = 0;
    for _ in 0..300 {
        let mut bytes = flight.clone();
        for _ in 0..1 + next() % 8 {
            let at = (next() % bytes.len() as u64) as usize;
            bytes[at] = next() as u8;
        }
        let ended = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            against_the_proxy(config.clone(), async |mut tcp| {
                let _ = tcp.write_all(&bytes).await;
                let _ = tcp.shutdown().await;
                let _ = tcp.read_to_end(&mut Vec::new()).await;
            }),
        )
        .await;
        let ((), accepted) = ended.expect("a handshake that never ends");
        refused += usize::from(accepted.is_err());
    }
    // The device never sends its second flight: no handshake can finish.
    assert_eq!(refused, 300);
}

/// A record that is not TLS after the handshake: the read fails (with rustls' alert), and
/// the stream's later write fails and its close ends it, neither processing those bytes
/// again (they would fail again, and rustls' second fatal alert is a panic in debug
/// builds).
#[tokio::test]
async fn after_a_bad_record_nothing_processes_it_again() {
    for (role, version, shed) in CASES {
        let (mut client, mut server) = pair(role, version, false, shed).await;
        client
            .tcp()
            .write_all(b"GET / HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        let read = server.read(&mut [0u8; 64]).await.unwrap_err();
        assert_eq!(read.kind(), std::io::ErrorKind::InvalidData, "{read}");
        let write = server.write_all(b"late").await.unwrap_err();
        assert_eq!(write.kind(), std::io::ErrorKind::InvalidData, "{write}");
        let _ = server.shutdown().await;
        drop(server);
        // The device's side ends (what came before the end: tickets, the encrypted alert).
        let _ = client.tcp().read_to_end(&mut Vec::new()).await;
    }
}

#[tokio::test]
async fn close_notify_ends_the_stream_and_a_bare_fin_is_an_error() {
    for (role, version, shed) in CASES {
        let (mut client, mut server) = pair(role, version, false, shed).await;
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"last");
        // The proxy's close: the device reads its end of stream.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());

        let (mut client, mut server) = pair(role, version, false, shed).await;
        client.tcp().shutdown().await.unwrap();
        let e = server.read_to_end(&mut Vec::new()).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);
    }
}

/// A peer (a device or a gateway) that seals and opens its records itself (its secrets
/// taken from rustls after the handshake), to send what no TLS library would.
struct RawPeer {
    tcp: TcpStream,
    /// TLS 1.2 (`Some`: whether the nonce is partly explicit, as AES-GCM's) or 1.3.
    tls12: Option<bool>,
    /// Whether the raw peer is the server (a gateway facing the proxy's client).
    server: bool,
    tx: (
        aws_lc_rs::aead::LessSafeKey,
        rustls::crypto::cipher::Iv,
        u64,
    ),
    rx: (
        aws_lc_rs::aead::LessSafeKey,
        rustls::crypto::cipher::Iv,
        u64,
    ),
}

fn raw_key(
    (seq, secrets): (u64, rustls::ConnectionTrafficSecrets),
) -> (
    aws_lc_rs::aead::LessSafeKey,
    rustls::crypto::cipher::Iv,
    u64,
) {
    use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, CHACHA20_POLY1305, LessSafeKey, UnboundKey};
    let (algorithm, key, iv) = match secrets {
        rustls::ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&AES_128_GCM, key, iv),
        rustls::ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&AES_256_GCM, key, iv),
        rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (&CHACHA20_POLY1305, key, iv)
        }
        _ => unreachable!("a suite the records seal"),
    };
    let key = LessSafeKey::new(UnboundKey::new(algorithm, key.as_ref()).unwrap());
    (key, iv, seq)
}

fn nonce(iv: &rustls::crypto::cipher::Iv, seq: u64) -> aws_lc_rs::aead::Nonce {
    aws_lc_rs::aead::Nonce::assume_unique_for_key(rustls::crypto::cipher::Nonce::new(iv, seq).0)
}

impl RawPeer {
    /// A record of inner type `typ` carrying `content`, then `padding` zeros (TLS 1.3); or
    /// of type `typ` carrying `content` (TLS 1.2, no padding).
    fn seal(&mut self, typ: u8, content: &[u8], padding: usize) -> Vec<u8> {
        if let Some(explicit) = self.tls12 {
            assert_eq!(padding, 0, "TLS 1.2 records have no padding");
            return self.seal12(typ, content, explicit);
        }
        let mut inner = content.to_vec();
        inner.push(typ);
        inner.resize(inner.len() + padding, 0);
        let header = rustls::crypto::cipher::make_tls13_aad(inner.len() + 16);
        let (key, iv, seq) = &mut self.tx;
        let tag = key
            .seal_in_place_separate_tag(
                nonce(iv, *seq),
                aws_lc_rs::aead::Aad::from(header),
                &mut inner,
            )
            .unwrap();
        *seq += 1;
        let mut record = header.to_vec();
        record.extend_from_slice(&inner);
        record.extend_from_slice(tag.as_ref());
        record
    }

    fn seal12(&mut self, typ: u8, content: &[u8], explicit: bool) -> Vec<u8> {
        let nonce = rustls::crypto::cipher::Nonce::new(&self.tx.1, self.tx.2).0;
        self.seal12_with(typ, content, explicit, nonce)
    }

    /// A TLS 1.2 AES-GCM record whose explicit nonce is its sequence number, as mbedTLS
    /// sends it (rustls sends the IV's explicit part mixed with it); ChaCha20-Poly1305 has no
    /// explicit nonce: as [`RawPeer::seal`].
    fn seal12_counter_nonce(&mut self, typ: u8, content: &[u8]) -> Vec<u8> {
        let Some(true) = self.tls12 else {
            return self.seal(typ, content, 0);
        };
        let mut nonce = [0u8; 12];
        nonce[..4].copy_from_slice(&self.tx.1.as_ref()[..4]);
        nonce[4..].copy_from_slice(&self.tx.2.to_be_bytes());
        self.seal12_with(typ, content, true, nonce)
    }

    /// A request to renegotiate, as this peer would send it: a gateway's HelloRequest, or a
    /// device's ClientHello (a real one, as rustls' client writes it).
    fn renegotiation_request(&self) -> Vec<u8> {
        if self.server {
            return vec![0, 0, 0, 0];
        }
        let (_, client) = Version::Tls12.configs();
        let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
        let mut conn = rustls::ClientConnection::new(client, name).unwrap();
        let mut record = Vec::new();
        conn.write_tls(&mut record).unwrap();
        // The handshake message, without its record's header.
        record.split_off(5)
    }

    fn seal12_with(&mut self, typ: u8, content: &[u8], explicit: bool, nonce: [u8; 12]) -> Vec<u8> {
        let (key, _, seq) = &mut self.tx;
        let aad = rustls::crypto::cipher::make_tls12_aad(
            *seq,
            rustls::ContentType::from(typ),
            rustls::ProtocolVersion::TLSv1_2,
            content.len(),
        );
        let mut body = content.to_vec();
        let tag = key
            .seal_in_place_separate_tag(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                &mut body,
            )
            .unwrap();
        *seq += 1;
        let explicit = if explicit { &nonce[4..] } else { &[][..] };
        let len = (explicit.len() + body.len() + 16) as u16;
        let mut record = vec![typ, 3, 3];
        record.extend_from_slice(&len.to_be_bytes());
        record.extend_from_slice(explicit);
        record.extend_from_slice(&body);
        record.extend_from_slice(tag.as_ref());
        record
    }

    /// `content` in records of `typ` of `size` bytes each (the last one shorter).
    fn seal_split(&mut self, typ: u8, content: &[u8], size: usize) -> Vec<u8> {
        content
            .chunks(size)
            .flat_map(|part| self.seal(typ, part, 0))
            .collect()
    }

    /// `n` empty application-data records.
    fn empty_records(&mut self, n: usize) -> Vec<u8> {
        (0..n).flat_map(|_| self.seal(23, b"", 0)).collect()
    }

    async fn send(&mut self, typ: u8, content: &[u8], padding: usize) {
        let record = self.seal(typ, content, padding);
        self.tcp.write_all(&record).await.unwrap();
    }

    /// The proxy's next record, opened: its (inner) type and content; `None` at the end.
    async fn recv(&mut self) -> Option<(u8, Vec<u8>)> {
        let mut header = [0u8; 5];
        self.tcp.read_exact(&mut header).await.ok()?;
        let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
        let mut body = vec![0u8; len];
        self.tcp.read_exact(&mut body).await.ok()?;
        let (key, iv, seq) = &mut self.rx;
        let (nonce, aad, skip) = match self.tls12 {
            None => (
                rustls::crypto::cipher::Nonce::new(iv, *seq).0,
                header.to_vec(),
                0,
            ),
            Some(explicit) => {
                let mut nonce = rustls::crypto::cipher::Nonce::new(iv, *seq).0;
                let skip = if explicit { 8 } else { 0 };
                if explicit {
                    nonce[..4].copy_from_slice(&iv.as_ref()[..4]);
                    nonce[4..].copy_from_slice(&body[..8]);
                }
                let aad = rustls::crypto::cipher::make_tls12_aad(
                    *seq,
                    rustls::ContentType::from(header[0]),
                    rustls::ProtocolVersion::TLSv1_2,
                    len - skip - 16,
                );
                (nonce, aad.to_vec(), skip)
            }
        };
        let plain = key
            .open_in_place(
                aws_lc_rs::aead::Nonce::assume_unique_for_key(nonce),
                aws_lc_rs::aead::Aad::from(aad),
                &mut body[skip..],
            )
            .expect("the proxy's record opens");
        *seq += 1;
        if self.tls12.is_some() {
            return Some((header[0], plain.to_vec()));
        }
        let end = plain.iter().rposition(|&b| b != 0).unwrap();
        Some((plain[end], plain[..end].to_vec()))
    }

    /// The fatal alert the proxy sent before its end, if any (records before it skipped,
    /// warnings among them).
    async fn alert(&mut self) -> Option<Vec<u8>> {
        while let Some((typ, content)) = self.recv().await {
            if typ == 21 && content.first() != Some(&1) {
                return Some(content);
            }
        }
        None
    }
}

/// A raw peer of `role` and the proxy's end speaking `version`, the handshake shed or not
/// (no tickets: nothing is in flight when the peer takes its secrets).
async fn raw_pair(role: Role, version: Version, shed: bool) -> (RawPeer, Ours) {
    raw_pair_from(role, version.configs(), shed).await
}

async fn raw_pair_from(
    role: Role,
    (config, client): (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>),
    shed: bool,
) -> (RawPeer, Ours) {
    let mut config = Arc::unwrap_or_clone(config);
    config.send_tls13_tickets = 0;
    let mut client = Arc::unwrap_or_clone(client);
    client.enable_secret_extraction = true;
    let (config, client) = (Arc::new(config), Arc::new(client));
    let (tcp, secrets, ours) = match role {
        Role::Device => {
            let (peer, ours) = pair_with(config, client, false, shed).await;
            let (tcp, conn) = peer.into_inner();
            (tcp, conn.dangerous_extract_secrets(), Ours::Server(ours))
        }
        Role::Gateway => {
            let mut config = Arc::unwrap_or_clone(config);
            config.enable_secret_extraction = true;
            let (peer, ours) = gateway_pair_with(Arc::new(config), client, false, shed).await;
            let (tcp, conn) = peer.into_inner();
            (tcp, conn.dangerous_extract_secrets(), Ours::Client(ours))
        }
    };
    let secrets = secrets.unwrap();
    let tls12 = match (ours.version(), &secrets.tx.1) {
        (rustls::ProtocolVersion::TLSv1_3, _) => None,
        (_, rustls::ConnectionTrafficSecrets::Chacha20Poly1305 { .. }) => Some(false),
        _ => Some(true),
    };
    let peer = RawPeer {
        tcp,
        tls12,
        server: matches!(role, Role::Gateway),
        tx: raw_key(secrets.tx),
        rx: raw_key(secrets.rx),
    };
    (peer, ours)
}

/// How the proxy's end takes a row's records.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Takes {
    /// Reads on: the "ping" after them is read.
    Read,
    /// Reads on, and declines them with a warning (TLS 1.2's `no_renegotiation`, 100) sent
    /// before the next data.
    Declined,
    /// Refuses them, sending this alert (`None`: no alert).
    Refused(Option<u8>),
}

/// A row's outcome, `[as a device's server, as a gateway's client]`, each `[the records,
/// rustls' connection]`.
type Outcomes = [[Takes; 2]; 2];

/// The same outcome on both sides: read on by both engines (`records` `None`), or refused
/// by both, the records sending `records` and rustls' connection `rustls`.
const fn common(records: Option<u8>, rustls: Option<u8>) -> Outcomes {
    let engines = match records {
        None => [Takes::Read, Takes::Read],
        Some(_) => [Takes::Refused(records), Takes::Refused(rustls)],
    };
    [engines, engines]
}

/// A `NewSessionTicket` (a short ticket of made-up bytes: rustls stores it as it comes).
const TICKET: [u8; 22] = [
    4, 0, 0, 18, // type, length
    0, 0, 0, 60, // lifetime
    0, 0, 0, 1, // age add
    1, 7, // nonce
    0, 4, 1, 2, 3, 4, // ticket
    0, 0, // extensions
];

/// A `NewSessionTicket` whose payload is `len` bytes (at least 13), most of them its ticket.
fn ticket_of(len: usize) -> Vec<u8> {
    let ticket = u16::try_from(len - 13).expect("a ticket's length fits its field");
    let mut message = vec![4];
    message.extend_from_slice(&u32::try_from(len).unwrap().to_be_bytes()[1..]);
    message.extend_from_slice(&[0, 0, 0, 60, 0, 0, 0, 1, 0]); // lifetime, age add, no nonce
    message.extend_from_slice(&ticket.to_be_bytes());
    message.resize(message.len() + usize::from(ticket), 7);
    message.extend_from_slice(&[0, 0]); // extensions
    assert_eq!(message.len(), 4 + len);
    message
}

/// A row of records a library would not send: how one way of protecting the records,
/// on one side, takes them (see [`Outcomes`]).
type Row = (&'static str, fn(&mut RawPeer) -> Vec<u8>, Outcomes);

/// Sends `row`'s records from the raw peer and checks that the proxy's end takes them as
/// the row says: reads the "ping" after them (and its "pong" arrives), or refuses them
/// with the row's alert.
async fn take_row(
    (what, records, outcomes): &Row,
    role: Role,
    shed: bool,
    (mut device, mut server): (RawPeer, Ours),
) {
    let bytes = records(&mut device);
    let mut got = [0u8; 4];
    // Written while read: a row may be more than the sockets' buffers hold.
    let (wrote, read) = tokio::join!(
        device.tcp.write_all(&bytes),
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            server.read_exact(&mut got),
        )
    );
    let read = read.unwrap_or_else(|_| panic!("{what}: neither read nor refused"));
    let expected = outcomes[role as usize][usize::from(!shed)];
    match expected {
        Takes::Read | Takes::Declined => {
            wrote.unwrap_or_else(|e| panic!("{what}: {e}"));
            read.unwrap_or_else(|e| panic!("{what}, {role:?}, shed: {shed}: refused: {e}"));
            assert_eq!(&got, b"ping", "{what}");
            server.write_all(b"pong").await.unwrap();
            if expected == Takes::Declined {
                assert_eq!(
                    device.recv().await,
                    Some((21, vec![1, 100])),
                    "{what}, {role:?}, shed: {shed}"
                );
            }
            assert_eq!(device.recv().await, Some((23, b"pong".to_vec())), "{what}");
        }
        Takes::Refused(alert) => {
            let e = read.expect_err(what);
            assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{what}: {e}");
            drop(server);
            let told = device.alert().await;
            assert_eq!(
                told,
                alert.map(|d| vec![2, d]),
                "{what}, {role:?}, shed: {shed}"
            );
        }
    }
}

/// A record of data, "ping", under `version` in its header.
fn ping_under(d: &mut RawPeer, version: [u8; 2]) -> Vec<u8> {
    let mut r = d.seal(23, b"ping", 0);
    r[1..3].copy_from_slice(&version);
    r
}

/// Records whose header is judged before they are whole, as rustls' deframer judges it (its
/// type at the first byte, its version at the third): the rows both tables end with, each
/// refused with only the bytes it names sent. The engines differ in the alert for a type no
/// record has: RFC 8446 §5 and RFC 5246 §6 ask for `unexpected_message`, which the records
/// send; rustls sends `decode_error`.
const HEADER_ROWS: [Row; 3] = [
    (
        "a first byte of no record type, alone",
        |_| vec![0xde],
        common(Some(10), Some(50)),
    ),
    (
        "the first three bytes of a header of another version, alone",
        |_| vec![23, 4, 3],
        common(Some(50), Some(50)),
    ),
    (
        "data under a version other than TLS's (0x0203)",
        |d| ping_under(d, [2, 3]),
        common(Some(50), Some(50)),
    ),
];

/// What the proxy's end does with records a library would not send, one per row, on both
/// of its sides (a device's server, a gateway's client) and both ways of protecting the
/// records. The alert each sends is asserted (RFC 8446 §6). The engines differ where rustls
/// sends none or `decode_error`, or `bad_record_mac` for a record over 2^14 + 256 bytes
/// (RFC 8446 §5.2 asks for `record_overflow`, which the records send), and, as a gateway's
/// client, in a row rustls reads on: a 33rd ticket without data (the records bound them as
/// key updates).
#[tokio::test]
async fn records_no_library_sends_are_refused_on_both_engines() {
    let rows: [Row; 39] = [
        (
            "data, padded",
            |d| d.seal(23, b"ping", 100),
            common(None, None),
        ),
        (
            "a user_canceled warning, then data",
            |d| {
                let mut r = d.seal(21, &[1, 90], 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(None, None),
        ),
        (
            "32 empty records, then data",
            |d| {
                let mut r = d.empty_records(32);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(None, None),
        ),
        (
            "33 empty records",
            |d| d.empty_records(33),
            common(Some(10), None),
        ),
        (
            "an unknown inner type",
            |d| d.seal(99, b"ping", 0),
            common(Some(10), Some(50)),
        ),
        (
            "padding only",
            |d| d.seal(0, b"", 10),
            common(Some(10), None),
        ),
        (
            "2^14 + 1 bytes in one record",
            |d| d.seal(23, &[7; (1 << 14) + 1], 0),
            common(Some(22), Some(22)),
        ),
        (
            "a record over 2^14 + 256 bytes",
            |_| {
                let mut r = vec![23, 3, 3, 0x41, 0x01];
                r.resize(5 + 0x4101, 0);
                r
            },
            common(Some(22), Some(20)),
        ),
        (
            // Ignored, as RFC 8446 §5.1 says (both read it with TLS 1.2's in the AAD).
            "a legacy version other than TLS 1.2's",
            |d| {
                let mut r = d.seal(23, b"ping", 0);
                r[2] = 1;
                r
            },
            common(None, None),
        ),
        (
            "more than 2^14 + 1 bytes with the padding",
            |d| d.seal(23, b"ping", 1 << 14),
            common(Some(22), Some(22)),
        ),
        (
            "a changed byte",
            |d| {
                let mut r = d.seal(23, b"ping", 0);
                r[7] ^= 1;
                r
            },
            common(Some(20), Some(20)),
        ),
        (
            "a plaintext change_cipher_spec",
            |_| vec![20, 3, 3, 0, 1, 1],
            common(Some(10), Some(10)),
        ),
        (
            "a handshake message no peer sends after the handshake (a ClientHello)",
            |d| d.seal(22, &[1, 0, 0, 0], 0),
            common(Some(10), Some(50)),
        ),
        (
            // More that would be taken if the KeyUpdate were not the last: another's first byte.
            "a KeyUpdate with more after it",
            |d| d.seal(22, &[24, 0, 0, 1, 0, 24], 0),
            common(Some(10), Some(10)),
        ),
        (
            "a KeyUpdate asking for 2",
            |d| d.seal(22, &[24, 0, 0, 1, 2], 0),
            common(Some(47), Some(47)),
        ),
        (
            "a warning other than user_canceled",
            |d| d.seal(21, &[1, 42], 0),
            common(Some(50), Some(50)),
        ),
        // Tickets: a gateway's are the proxy's to keep (as its client); a device sends none.
        (
            "a ticket, then data",
            |d| {
                let mut r = d.seal(22, &TICKET, 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            "two tickets in one record, then data",
            |d| {
                let mut r = d.seal(22, &[TICKET, TICKET].concat(), 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            // The ticket taken, the KeyUpdate after it read (a valid one would change the
            // keys, which the raw peer cannot follow).
            "a ticket, then a KeyUpdate asking for 2, in one record",
            |d| d.seal(22, &[&TICKET[..], &[24, 0, 0, 1, 2]].concat(), 0),
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Refused(Some(47)), Takes::Refused(Some(47))],
            ],
        ),
        (
            "a KeyUpdate, then a ticket, in one record",
            |d| d.seal(22, &[&[24, 0, 0, 1, 0], &TICKET[..]].concat(), 0),
            common(Some(10), Some(10)),
        ),
        // Handshake messages split over records (RFC 8446 §5.1): joined, as rustls joins them.
        (
            "a ticket split over two records, then data",
            |d| {
                let mut r = d.seal_split(22, &TICKET, 10);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            "a ticket in records of a byte, then a ticket and a half, then the rest, then data",
            |d| {
                let mut r = d.seal_split(22, &TICKET, 1);
                r.extend(d.seal(22, &[&TICKET[..], &TICKET[..7]].concat(), 0));
                r.extend(d.seal(22, &TICKET[7..], 0));
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            "a ticket of rustls' bound (2^16 - 1 bytes) over records, then data",
            |d| {
                let mut r = d.seal_split(22, &ticket_of(0xffff), 1 << 14);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            // Refused at its first part's header, by both (rustls with no alert).
            "the first part of a ticket a byte over rustls' bound",
            |d| d.seal(22, &ticket_of(0x10000)[..100], 0),
            [
                [Takes::Refused(Some(10)), Takes::Refused(None)],
                [Takes::Refused(Some(50)), Takes::Refused(None)],
            ],
        ),
        (
            // Joined, then refused for its request (not for the split).
            "a KeyUpdate asking for 2, split over two records",
            |d| d.seal_split(22, &[24, 0, 0, 1, 2], 3),
            common(Some(47), Some(47)),
        ),
        (
            "a KeyUpdate split over two records, with more after it",
            |d| {
                let mut r = d.seal(22, &[24, 0], 0);
                r.extend(d.seal(22, &[0, 1, 0, 24], 0));
                r
            },
            common(Some(10), Some(10)),
        ),
        (
            "a KeyUpdate of two bytes",
            |d| d.seal(22, &[24, 0, 0, 2, 0, 0], 0),
            common(Some(50), Some(50)),
        ),
        (
            "a KeyUpdate of none",
            |d| d.seal(22, &[24, 0, 0, 0], 0),
            common(Some(50), Some(50)),
        ),
        (
            // Judged at its header, alone: nothing of it kept (rustls: its bound on a
            // message, with no alert).
            "the header of a KeyUpdate of 2^24 - 1 bytes",
            |d| d.seal(22, &[24, 0xff, 0xff, 0xff], 0),
            common(Some(50), None),
        ),
        (
            // 28 tickets (the bound is 32): two at a time over three records, the first split
            // at every third place of the two, the second 5 bytes on (the header's parts,
            // the payload's, the boundary between them).
            "two tickets over three records, split at 14 places, then data",
            |d| {
                let two = [TICKET, TICKET].concat();
                let mut r = Vec::new();
                for at in (1..two.len() - 1).step_by(3) {
                    let then = (at + 5).min(two.len() - 1);
                    r.extend(d.seal(22, &two[..at], 0));
                    r.extend(d.seal(22, &two[at..then], 0));
                    r.extend(d.seal(22, &two[then..], 0));
                }
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            // A device's refused at its type.
            "part of a ticket, then data",
            |d| {
                let mut r = d.seal(22, &TICKET[..10], 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(Some(10), None),
        ),
        (
            // The peer's own fatal alert between: nothing sent back, as after any.
            "part of a KeyUpdate, then a fatal alert",
            |d| {
                let mut r = d.seal(22, &[24, 0, 0], 0);
                r.extend(d.seal(21, &[2, 40], 0));
                r
            },
            [[Takes::Refused(None); 2]; 2],
        ),
        (
            "part of a KeyUpdate, then an empty record",
            |d| {
                let mut r = d.seal(22, &[24, 0, 0], 0);
                r.extend(d.empty_records(1));
                r
            },
            common(Some(10), None),
        ),
        (
            "32 tickets, then data",
            |d| {
                let mut r: Vec<u8> = (0..32).flat_map(|_| d.seal(22, &TICKET, 0)).collect();
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Read; 2],
            ],
        ),
        (
            // rustls' client takes any number.
            "33 tickets, then data",
            |d| {
                let mut r: Vec<u8> = (0..33).flat_map(|_| d.seal(22, &TICKET, 0)).collect();
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Refused(Some(10)), Takes::Read],
            ],
        ),
        (
            // RFC 8446 §5.1: no zero-length handshake fragment (rustls counts it as an
            // empty record and reads on).
            "an empty handshake record, then data",
            |d| {
                let mut r = d.seal(22, b"", 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [[Takes::Refused(Some(10)), Takes::Read]; 2],
        ),
        (
            // Only data resets the bound (rustls' client takes any number).
            "32 tickets, an empty record, a ticket, then data",
            |d| {
                let mut r: Vec<u8> = (0..32).flat_map(|_| d.seal(22, &TICKET, 0)).collect();
                r.extend(d.empty_records(1));
                r.extend(d.seal(22, &TICKET, 0));
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(10))],
                [Takes::Refused(Some(10)), Takes::Read],
            ],
        ),
        (
            "a malformed ticket",
            |d| d.seal(22, &[4, 0, 0, 0], 0),
            [
                [Takes::Refused(Some(10)), Takes::Refused(Some(50))],
                [Takes::Refused(Some(50)), Takes::Refused(Some(50))],
            ],
        ),
        (
            // Ignored (RFC 8446 §5.1): a version rustls names, not 0x03XX, is not refused.
            "data under a version rustls names (0xfefd, DTLS 1.2)",
            |d| ping_under(d, [0xfe, 0xfd]),
            common(None, None),
        ),
    ];
    let rows = rows.iter().chain(&HEADER_ROWS);
    for (row, (role, version, shed)) in rows.flat_map(|r| TLS13_CASES.map(|c| (r, c))) {
        take_row(row, role, shed, raw_pair(role, version, shed).await).await;
    }
    // The peer's own fatal alert: the proxy's end fails and sends nothing back.
    for (role, version, shed) in CASES {
        let (mut device, mut server) = raw_pair(role, version, shed).await;
        device.send(21, &[2, 40], 0).await;
        let e = server.read(&mut [0u8; 4]).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
        drop(server);
        assert_eq!(device.alert().await, None);
    }
}

/// What the proxy's end does with TLS 1.2 records a library would not send, as the
/// TLS 1.3 table does: on both of its sides, both ways of protecting the records, and
/// both record formats (AES-GCM's partly explicit nonce, ChaCha20-Poly1305's implicit one).
/// The engines differ where rustls sends `decode_error` (an encrypted change_cipher_spec, a
/// record of an unknown type, a record over 2^14 + 2048 bytes: RFC 5246 §6 asks for
/// `unexpected_message` and `record_overflow`, which the records send; an empty ClientHello,
/// which rustls fails to parse and the records decline without parsing) or nothing (a fifth
/// warning, a second request to renegotiate).
#[tokio::test]
async fn tls12_records_no_library_sends_are_refused_on_both_engines() {
    use rustls::crypto::aws_lc_rs::cipher_suite as suites;
    let rows: [Row; 26] = [
        ("data", |d| d.seal(23, b"ping", 0), common(None, None)),
        (
            // TLS 1.2's warnings are ignored.
            "a warning (no_renegotiation), then data",
            |d| {
                let mut r = d.seal(21, &[1, 100], 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(None, None),
        ),
        (
            "four warnings, then data",
            |d| {
                let mut r: Vec<u8> = (0..4).flat_map(|_| d.seal(21, &[1, 100], 0)).collect();
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(None, None),
        ),
        (
            "five warnings, then data",
            |d| {
                let mut r: Vec<u8> = (0..5).flat_map(|_| d.seal(21, &[1, 100], 0)).collect();
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(Some(50), None),
        ),
        (
            "32 empty records, then data",
            |d| {
                let mut r = d.empty_records(32);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(None, None),
        ),
        (
            "33 empty records",
            |d| d.empty_records(33),
            common(Some(10), None),
        ),
        (
            "a request to renegotiate, then data",
            |d| {
                let request = d.renegotiation_request();
                let mut r = d.seal(22, &request, 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [[Takes::Declined; 2]; 2],
        ),
        (
            "a request to renegotiate split over two records, then data",
            |d| {
                let request = d.renegotiation_request();
                let mut r = d.seal_split(22, &request, 3);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [[Takes::Declined; 2]; 2],
        ),
        (
            "part of a request to renegotiate, then data",
            |d| {
                let request = d.renegotiation_request();
                let mut r = d.seal(22, &request[..3], 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(Some(10), None),
        ),
        (
            // Refused (by the records at its first byte, by rustls once whole, with no alert;
            // the rest is sent for rustls, which would wait for it: the judging before
            // anything is kept is the joiner's, tested there).
            "a request to renegotiate, then a second one split over records",
            |d| {
                let request = d.renegotiation_request();
                let mut r = d.seal(22, &request, 0);
                r.extend(d.seal(22, &request[..3], 0));
                r.extend(d.seal(22, &request[3..], 0));
                r
            },
            common(Some(10), None),
        ),
        (
            // Judged at its header, alone (rustls: its bound on a message, with no alert).
            "the header of a request to renegotiate of 2^16 bytes",
            |d| {
                let request = d.renegotiation_request();
                d.seal(22, &[request[0], 1, 0, 0], 0)
            },
            common(Some(50), None),
        ),
        (
            "two requests to renegotiate, then data",
            |d| {
                let request = d.renegotiation_request();
                let mut r = d.seal(22, &request, 0);
                r.extend(d.seal(22, &request, 0));
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            common(Some(10), None),
        ),
        (
            // A ClientHello of nothing: declined by the records, which do not parse what
            // they decline; a decode error to rustls. From a gateway, not a request at all.
            "an empty ClientHello, then data",
            |d| {
                let mut r = d.seal(22, &[1, 0, 0, 0], 0);
                r.extend(d.seal(23, b"ping", 0));
                r
            },
            [
                [Takes::Declined, Takes::Refused(Some(50))],
                [Takes::Refused(Some(10)), Takes::Refused(Some(50))],
            ],
        ),
        (
            "an explicit nonce that is the sequence number (as mbedTLS sends it)",
            |d| d.seal12_counter_nonce(23, b"ping"),
            common(None, None),
        ),
        (
            "an encrypted change_cipher_spec",
            |d| d.seal(20, &[1], 0),
            common(Some(10), Some(50)),
        ),
        (
            "a record of an unknown type",
            |d| d.seal(99, b"ping", 0),
            common(Some(10), Some(50)),
        ),
        (
            "2^14 + 1 bytes in one record",
            |d| d.seal(23, &[7; (1 << 14) + 1], 0),
            common(Some(22), Some(22)),
        ),
        (
            "a record over 2^14 + 2048 bytes",
            |_| {
                let mut r = vec![23, 3, 3, 0x48, 0x01];
                r.resize(5 + 0x4801, 0);
                r
            },
            common(Some(22), Some(50)),
        ),
        (
            "a changed byte",
            |d| {
                let mut r = d.seal(23, b"ping", 0);
                r[7] ^= 1;
                r
            },
            common(Some(20), Some(20)),
        ),
        (
            // The version is in the additional data.
            "another version in the header",
            |d| {
                let mut r = d.seal(23, b"ping", 0);
                r[2] = 1;
                r
            },
            common(Some(20), Some(20)),
        ),
        (
            "a record too short for its tag",
            |_| vec![23, 3, 3, 0, 10, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
            common(Some(20), Some(20)),
        ),
        (
            "a record too short for its tag and explicit nonce",
            |_| {
                let mut r = vec![23, 3, 3, 0, 20];
                r.resize(25, 7);
                r
            },
            common(Some(20), Some(20)),
        ),
        (
            "an alert of three bytes",
            |d| d.seal(21, &[1, 0, 0], 0),
            common(Some(50), Some(50)),
        ),
        (
            "an alert at an unknown level",
            |d| d.seal(21, &[3, 0], 0),
            common(Some(47), Some(47)),
        ),
        (
            // The tag covers TLS 1.2's version: a version rustls names opens nothing.
            "data under a version rustls names (0xfefd, DTLS 1.2)",
            |d| ping_under(d, [0xfe, 0xfd]),
            common(Some(20), Some(20)),
        ),
        (
            // rustls' deframer refuses from 2^14 + 2048 on (RFC 5246 §6.2.3 allows it, but
            // no record of at most 2^14 bytes of plaintext is that long).
            "a header of 2^14 + 2048 bytes, alone",
            |_| vec![23, 3, 3, 0x48, 0x00],
            common(Some(22), Some(50)),
        ),
    ];
    for suite in [
        suites::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        suites::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
    ] {
        for (row, (role, shed)) in rows.iter().chain(&HEADER_ROWS).flat_map(|r| {
            ROLES
                .into_iter()
                .flat_map(move |role| SHED.map(|s| (r, (role, s))))
        }) {
            let peers = raw_pair_from(role, configs_with(true, Some(suite)), shed).await;
            assert_eq!(peers.1.version(), rustls::ProtocolVersion::TLSv1_2);
            take_row(row, role, shed, peers).await;
        }
    }
}

/// Once shed, an idle session holds no AEAD context (built at the next record, dropped
/// when a read finds nothing), and the stream is small.
#[tokio::test]
async fn a_shed_idle_session_holds_no_aead_context() {
    let (mut client, mut server) = device_pair(false, true).await;
    client.write_all(b"ping").await.unwrap();
    client.flush().await.unwrap();
    let mut got = [0u8; 4];
    server.read_exact(&mut got).await.unwrap();
    server.write_all(b"pong").await.unwrap();
    let held = |server: &TlsStream| match &server.conn {
        super::Conn::Records(records) => records.holds_contexts(),
        _ => panic!("not shed"),
    };
    assert!(held(&server), "the contexts were built for the exchange");
    client.read_exact(&mut got).await.unwrap();
    let pending = std::future::poll_fn(|cx| {
        std::task::Poll::Ready(
            std::pin::Pin::new(&mut server)
                .poll_read(cx, &mut tokio::io::ReadBuf::new(&mut got))
                .is_pending(),
        )
    })
    .await;
    assert!(pending);
    assert!(!held(&server), "an idle session kept an AEAD context");
    // And the next exchange builds them again.
    client.write_all(b"more").await.unwrap();
    client.flush().await.unwrap();
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"more");
    let size = std::mem::size_of::<TlsStream>();
    assert!(size <= 160, "{size}");
    // rustls' kernel connection (560 bytes) is boxed apart, kept for TLS 1.3 only.
    let size = std::mem::size_of::<super::records::Records<rustls::server::ServerConnectionData>>();
    assert!(size <= 256, "{size}");
}

/// What the proxy's end holds of a handshake message begun in a record and not ended: the
/// bytes and the room kept for them (`None`: no message begun).
fn partial(server: &Ours) -> Option<(usize, usize)> {
    either!(server, t => match &t.conn {
        super::Conn::Records(records) => records.partial(),
        _ => panic!("not shed"),
    })
}

/// Reads until the proxy's end has begun a message (a read waits after each: the message is
/// not whole), at each readiness of its socket.
async fn take_part(server: &mut Ours) {
    let taken = async {
        while partial(server).is_none() {
            server.io().readable().await.unwrap();
            let pending = std::future::poll_fn(|cx| {
                let mut got = [0u8; 4];
                let mut buf = tokio::io::ReadBuf::new(&mut got);
                let read = Pin::new(&mut *server).poll_read(cx, &mut buf);
                std::task::Poll::Ready(read.is_pending())
            })
            .await;
            assert!(pending, "nothing to read yet");
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), taken)
        .await
        .expect("the part taken");
}

/// A handshake message split over records is held as it comes, within what it needs (a
/// header's first bytes; a gateway's ticket in room reserved for its length; of a request
/// to renegotiate, declined unread, nothing), and nothing is held once it is whole.
#[tokio::test]
async fn a_split_message_keeps_what_it_needs_and_nothing_after() {
    // Who sends, in which version, the message, where it is split, what is held of it after
    // its first part, and whether the rest and data then follow (a device's valid KeyUpdate
    // would change keys the raw peer cannot follow).
    type Case<'a> = (Role, Version, Option<&'a [u8]>, usize, (usize, usize), bool);
    let hello_request = [0, 0, 0, 0];
    let cases: [Case<'_>; 5] = [
        (
            Role::Gateway,
            Version::Tls13,
            Some(&TICKET[..]),
            10,
            (6, 18),
            true,
        ),
        (
            Role::Gateway,
            Version::Tls13,
            Some(&TICKET[..]),
            2,
            (2, 0),
            true,
        ),
        (
            Role::Device,
            Version::Tls13,
            Some(&[24, 0, 0, 1, 0][..]),
            3,
            (3, 0),
            false,
        ),
        (Role::Device, Version::Tls12, None, 10, (0, 0), true),
        (
            Role::Gateway,
            Version::Tls12,
            Some(&hello_request[..]),
            2,
            (2, 0),
            true,
        ),
    ];
    for (role, version, message, at, kept, whole) in cases {
        let (mut peer, mut server) = raw_pair(role, version, true).await;
        let message = message.map_or_else(|| peer.renegotiation_request(), <[u8]>::to_vec);
        peer.send(22, &message[..at], 0).await;
        take_part(&mut server).await;
        assert_eq!(
            partial(&server),
            Some(kept),
            "{role:?}, {version:?}, split at {at}"
        );
        if !whole {
            continue;
        }
        let mut rest = peer.seal(22, &message[at..], 0);
        rest.extend(peer.seal(23, b"ping", 0));
        peer.tcp.write_all(&rest).await.unwrap();
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(
            partial(&server),
            None,
            "{role:?}, {version:?}: held once whole"
        );
    }
}

/// The proxy updates its own keys before the suite's limit for one key, telling the
/// device with a KeyUpdate: every record after it opens with the next keys.
#[tokio::test]
async fn the_proxys_keys_are_updated_at_the_limit_for_one_key() {
    for limit in [6, 7] {
        let (mut client, mut server) = device_pair(false, true).await;
        let super::Conn::Records(records) = &mut server.conn else {
            panic!("not shed");
        };
        records.limit_records_per_key(limit);
        let down = pattern(100_000, 3);
        for part in down.chunks(1_000) {
            server.write_all(part).await.unwrap();
            server.flush().await.unwrap();
        }
        let mut got = vec![0u8; down.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == down, "the proxy's bytes arrived changed");
        // A burst past the limit within one write (64 KiB: four records, one update).
        let big = pattern(1 << 16, 4);
        server.write_all(&big).await.unwrap();
        server.flush().await.unwrap();
        let mut got = vec![0u8; big.len()];
        client.read_exact(&mut got).await.unwrap();
        assert!(got == big, "the proxy's bytes arrived changed");
        let super::Conn::Records(records) = &server.conn else {
            panic!("not shed");
        };
        assert!(
            records.sealed_under_this_key() < limit,
            "no key update at the limit"
        );
    }
}

/// Whether a write failed at TLS 1.2's limit for one key, the connection closed with the
/// proxy's `close_notify`.
fn closed_at_key_limit(e: &std::io::Error) -> bool {
    matches!(
        e.get_ref().and_then(|e| e.downcast_ref()),
        Some(super::KeyLimitReached::Closed)
    )
}

/// TLS 1.2 has no key update: at the suite's limit of records under one key the proxy's
/// side ends with its `close_notify`, as rustls ends it, on both of the proxy's sides. Data
/// goes up to the last sequence number under the limit, which the `close_notify` takes; a
/// write that would pass it is refused whole (a 64 KiB write, four records, with two left:
/// none of it sealed). The peer reads every byte of every write that succeeded, then a clean
/// end (no truncation error).
#[tokio::test]
async fn tls12_ends_with_close_notify_at_the_limit_for_one_key() {
    let limit = 10;
    for role in ROLES {
        // The last write: one record, refused with none left; or four, with two left.
        for (last, left) in [(1_000, 0), (1 << 16, 2)] {
            let case = format!("{role:?}, a last write of {last} bytes");
            let (mut peer, mut ours) = pair(role, Version::Tls12, false, true).await;
            ours.limit_records_per_key(limit);
            // Data may take sequence numbers up to `limit - 2`.
            let mut sent = Vec::new();
            while ours.sealed_under_this_key() + left < limit - 1 {
                let part = pattern(1_000, sent.len() as u8);
                ours.write_all(&part).await.unwrap();
                sent.extend_from_slice(&part);
            }
            assert!(
                !sent.is_empty(),
                "{case}: nothing was sent before the limit"
            );
            let before = ours.sealed_under_this_key();
            let e = ours
                .write_all(&pattern(last, 9))
                .await
                .expect_err("a write past the limit succeeded");
            assert!(closed_at_key_limit(&e), "{case}: {e}");
            assert_eq!(
                ours.sealed_under_this_key(),
                before + 1,
                "{case}: the refused write was sealed in part, or no close_notify was"
            );
            if left == 0 {
                assert_eq!(before, limit - 1, "{case}: data stopped short of the limit");
            }
            // A write after it fails the same way, and nothing more is sealed.
            let again = ours
                .write_all(b"more")
                .await
                .expect_err("a write after the limit");
            assert!(closed_at_key_limit(&again), "{case}: {again}");
            assert_eq!(ours.sealed_under_this_key(), before + 1, "{case}");
            // The connection dropped: without a `close_notify` the peer would read a truncation.
            drop(ours);
            let mut got = Vec::new();
            let read = peer.read_to_end(&mut got).await;
            assert!(
                read.is_ok(),
                "{case}: the peer saw no close_notify: {read:?}"
            );
            assert!(
                got == sent,
                "{case}: the peer read other bytes than were sent"
            );
        }
    }
}

/// TLS 1.2 at the limit for one key: a request to renegotiate that arrives with only the
/// `close_notify`'s record left gets no `no_renegotiation` warning (it would take that
/// record); the next write ends the connection with the `close_notify`, as the last record
/// under the limit. On both of the proxy's sides.
#[tokio::test]
async fn tls12_at_the_limit_a_renegotiation_is_not_declined() {
    let limit = 8;
    for role in ROLES {
        let (mut peer, mut ours) = raw_pair(role, Version::Tls12, true).await;
        ours.limit_records_per_key(limit);
        while ours.sealed_under_this_key() < limit - 1 {
            ours.write_all(b"data").await.unwrap();
            assert_eq!(peer.recv().await, Some((23, b"data".to_vec())), "{role:?}");
        }
        let mut asked = peer.seal(22, &peer.renegotiation_request(), 0);
        asked.extend(peer.seal(23, b"ping", 0));
        peer.tcp.write_all(&asked).await.unwrap();
        let mut got = [0u8; 4];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        let e = ours
            .write_all(b"pong")
            .await
            .expect_err("a write past the limit");
        assert!(closed_at_key_limit(&e), "{role:?}: {e}");
        assert_eq!(ours.sealed_under_this_key(), limit, "{role:?}");
        // The next record the peer opens (with the next sequence number) is the close_notify.
        assert_eq!(peer.recv().await, Some((21, vec![1, 0])), "{role:?}");
    }
}

/// After an error, the alert the proxy's end sends at once is not sent again when the
/// stream is shut down (a second copy, under a spent sequence number, would not open): on
/// both sides, both versions, both ways of protecting the records.
#[tokio::test]
async fn an_alert_after_an_error_is_sent_once() {
    for (role, version, shed) in CASES {
        let case = format!("{role:?}, {version:?}, shed: {shed}");
        let (mut peer, mut ours) = raw_pair(role, version, shed).await;
        let mut changed = peer.seal(23, b"ping", 0);
        let last = changed.len() - 1;
        changed[last] ^= 1;
        peer.tcp.write_all(&changed).await.unwrap();
        let mut got = [0u8; 4];
        let e = ours
            .read_exact(&mut got)
            .await
            .expect_err("a changed record read");
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{case}: {e}");
        let _ = ours.shutdown().await;
        assert_eq!(
            peer.recv().await,
            Some((
                21,
                vec![2, u8::from(rustls::AlertDescription::BadRecordMac)]
            )),
            "{case}"
        );
        assert_eq!(peer.recv().await, None, "{case}: more after the alert");
    }
}

/// 32 key updates in a row are answered; the 33rd without data between is refused, as
/// rustls refuses it.
#[tokio::test]
async fn key_updates_without_data_are_bounded() {
    for (updates, refused) in [(32, false), (33, true)] {
        let (mut client, mut server) = device_pair(false, true).await;
        for _ in 0..updates {
            client.get_mut().1.refresh_traffic_keys().unwrap();
        }
        client.write_all(b"ping").await.unwrap();
        client.flush().await.unwrap();
        let mut got = [0u8; 4];
        let read = server.read_exact(&mut got).await;
        assert_eq!(read.is_err(), refused, "{updates}: {read:?}");
    }
}

/// A device whose key update (asking for the proxy's) goes out in one write with its
/// Finished and its first data: rustls sees the handshake's records only, so the update
/// is still unread at the shed and answered by the records; on rustls' connection, by
/// rustls. Either way the device opens what the proxy sends after.
#[tokio::test]
async fn a_key_update_sent_with_the_finished_is_answered() {
    use std::io::{Read, Write};
    for shed in SHED {
        let (config, client) = configs(true);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let device = tokio::task::spawn_blocking(move || {
            let mut tcp = std::net::TcpStream::connect(addr).unwrap();
            let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
            let mut conn = rustls::ClientConnection::new(client, name).unwrap();
            loop {
                while conn.wants_write() && conn.is_handshaking() {
                    conn.write_tls(&mut tcp).unwrap();
                }
                if !conn.is_handshaking() {
                    break;
                }
                conn.read_tls(&mut tcp).unwrap();
                conn.process_new_packets().unwrap();
            }
            // The last flight (the Finished) is queued: the key update and data join it.
            conn.refresh_traffic_keys().unwrap();
            conn.writer().write_all(b"ping").unwrap();
            let mut flight = Vec::new();
            while conn.wants_write() {
                conn.write_tls(&mut flight).unwrap();
            }
            tcp.write_all(&flight).unwrap();
            let mut got = Vec::new();
            while got.len() < 4 {
                if conn.read_tls(&mut tcp).unwrap() == 0 {
                    break;
                }
                conn.process_new_packets()
                    .expect("the proxy's records open");
                let mut buf = [0u8; 16];
                match conn.reader().read(&mut buf) {
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("{e}"),
                }
            }
            got
        });
        let (tcp, _) = listener.accept().await.unwrap();
        let (mut server, _) = TlsStream::accept(config, tcp).await.unwrap();
        if shed {
            server.shed_handshake().unwrap();
        }
        let mut got = [0u8; 4];
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        assert_eq!(device.await.unwrap(), b"pong", "shed: {shed}");
    }
}

/// A device's real record with a few bytes changed (a fixed sequence; its legacy version
/// left alone, which TLS 1.3 ignores), then its end of stream, on both engines: every one
/// refused, no byte of it read, nothing panics.
#[tokio::test]
async fn changed_records_are_refused_on_both_engines() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for round in 0..100 {
        let (role, version, shed) = CASES[round % CASES.len()];
        let (mut device, mut server) = raw_pair(role, version, shed).await;
        let padding = (next() % 4) as usize;
        let padding = if device.tls12.is_some() { 0 } else { padding };
        let mut record = device.seal(23, b"ping", padding);
        let original = record.clone();
        while record == original {
            for _ in 0..1 + next() % 4 {
                let at = match (next() % (record.len() as u64 - 2)) as usize {
                    0 => 0,
                    i => i + 2,
                };
                record[at] = next() as u8;
            }
        }
        device.tcp.write_all(&record).await.unwrap();
        device.tcp.shutdown().await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            server.read_to_end(&mut got),
        )
        .await
        .expect("neither read nor refused");
        assert!(read.is_err(), "round {round}: read {got:?}");
        assert!(got.is_empty(), "round {round}: read {got:?}");
    }
}

/// Every suite the proxy offers with an ECDSA certificate, TLS 1.3's and TLS 1.2's, is
/// sealed by the records on both of its sides: bytes both ways, and on TLS 1.3 a key
/// update, with a client that offers only that suite.
#[tokio::test]
async fn every_suite_is_shed_and_carries_bytes() {
    for (role, suite) in ROLES
        .into_iter()
        .flat_map(|role| super::records::ECDSA_SUITES.map(|suite| (role, suite)))
    {
        let tls13 = matches!(suite, rustls::SupportedCipherSuite::Tls13(_));
        let configs = configs_with(true, Some(suite));
        let (mut client, mut server) = pair_from(role, configs, false, true).await;
        assert_eq!(client.suite(), Some(suite), "the suite offered");
        let mut got = [0u8; 4];
        client.write_all(b"ping").await.unwrap();
        if tls13 {
            client.refresh_keys();
        }
        client.write_all(b"more").await.unwrap();
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping", "{suite:?}, {role:?}");
        server.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"more", "{suite:?}, {role:?}");
        server.write_all(b"pong").await.unwrap();
        server.flush().await.unwrap();
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"pong", "{suite:?}, {role:?}");
        // The proxy's close: the peer reads its end of stream.
        server.shutdown().await.unwrap();
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{suite:?}, {role:?}");
    }
}

/// A gateway that refuses the proxy's client certificate says so only after the proxy's
/// side of a TLS 1.3 handshake is done: its alert arrives after the handshake (on the
/// records once shed), and the first read fails with rustls' error, which
/// `upstream::open` counts as the gateway's TLS failure (`crate::tls::is_tls_error`).
#[tokio::test]
async fn a_gateway_refusing_the_proxys_certificate_fails_the_first_read_as_tls() {
    for shed in SHED {
        let (config, client) = configs(false);
        let mut client = Arc::unwrap_or_clone(client);
        client.enable_secret_extraction = true;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let (refused, read) = tokio::join!(
            async {
                let (tcp, _) = listener.accept().await.unwrap();
                acceptor.accept(tcp).await.is_err()
            },
            async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                let name = rustls::pki_types::ServerName::try_from("device.test").unwrap();
                let mut tls = TlsStream::connect(Arc::new(client), name, tcp)
                    .await
                    .unwrap();
                if shed {
                    tls.shed_handshake().unwrap();
                    assert!(matches!(tls.conn, super::Conn::Records(_)), "not shed");
                }
                tls.read(&mut [0u8; 1]).await
            },
        );
        assert!(refused, "the gateway took an untrusted certificate");
        let e = read.expect_err("read on after the gateway's refusal");
        assert!(crate::tls::is_tls_error(&e), "shed: {shed}: {e}");
    }
}

/// A connection resumed from what the one before it left (as a gateway's client, the
/// gateway's tickets, which arrive after a TLS 1.3 handshake: on the records once it is shed;
/// TLS 1.2's within the handshake; as a device's server, the device's), on both sides and
/// both versions; the resumed connection is shed and carries bytes as a full one does.
#[tokio::test]
async fn the_next_connection_resumes_and_is_shed() {
    for (role, version, shed) in CASES {
        let configs = version.configs();
        let (mut peer, mut ours) = pair_from(role, configs.clone(), false, shed).await;
        // Both ends read what came before the bytes: the tickets.
        peer.write_all(b"hi").await.unwrap();
        peer.flush().await.unwrap();
        ours.read_exact(&mut [0u8; 2]).await.unwrap();
        ours.write_all(b"hi").await.unwrap();
        ours.flush().await.unwrap();
        peer.read_exact(&mut [0u8; 2]).await.unwrap();
        let (mut peer, mut next) = pair_from(role, configs, false, false).await;
        let case = format!("{role:?}, {version:?}, shed: {shed}");
        assert_eq!(next.kind(), Some(rustls::HandshakeKind::Resumed), "{case}");
        assert!(next.shed(), "{case}: not shed");
        peer.write_all(b"on").await.unwrap();
        peer.flush().await.unwrap();
        let mut got = [0u8; 2];
        next.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"on", "{case}");
        next.write_all(b"ok").await.unwrap();
        next.flush().await.unwrap();
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ok", "{case}");
    }
}
