//! Two real handshakes in memory per input: the proxy's end and its peer, rustls' unbuffered
//! connections where secrets are handed over (the record layer's end, every peer), its
//! buffered one for the end that stays rustls'.

use std::sync::{Arc, OnceLock};

use rustls::SupportedCipherSuite;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, UnbufferedStatus};
use wasmbed_proxy::tls_records::Model;

use super::ends::Engine;
use super::peer::{Kernel, Peer};

/// The configs of both ends, made once.
pub(super) struct Configs {
    pub(super) server: Arc<rustls::ServerConfig>,
    pub(super) ca: rustls::pki_types::CertificateDer<'static>,
}

pub(super) fn configs() -> &'static Configs {
    static CONFIGS: OnceLock<Configs> = OnceLock::new();
    CONFIGS.get_or_init(|| {
        use wasmbed_certs::pki::{DevCa, KeyKind};
        let ca = DevCa::generate("fuzz CA").expect("a CA");
        let server = ca
            .issue_server(&["device.test"], KeyKind::EcdsaP256)
            .expect("a cert");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(server.chain(), server.key().expect("a key"))
            .expect("a server config");
        config.enable_secret_extraction = true;
        config.send_tls13_tickets = 0;
        Configs {
            server: Arc::new(config),
            ca: ca.cert_der(),
        }
    })
}

impl Configs {
    pub(super) fn client(&self, suite: SupportedCipherSuite) -> Arc<rustls::ClientConfig> {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            kx_groups: vec![rustls::crypto::aws_lc_rs::kx_group::X25519],
            ..rustls::crypto::aws_lc_rs::default_provider()
        };
        let version = match suite {
            SupportedCipherSuite::Tls12(_) => &rustls::version::TLS12,
            SupportedCipherSuite::Tls13(_) => &rustls::version::TLS13,
        };
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca.clone()).expect("the CA");
        let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_protocol_versions(&[version])
            .expect("the version")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.enable_secret_extraction = true;
        config.resumption = rustls::client::Resumption::disabled();
        Arc::new(config)
    }
}

/// The proxy's end (the record layer if `records`, else rustls' buffered connection) and
/// its peer, after a handshake of `suite`; the proxy the client if `gateway`.
pub(super) fn pair(suite: SupportedCipherSuite, gateway: bool, records: bool) -> (Engine, Peer) {
    let configs = configs();
    let tls12 = matches!(suite, SupportedCipherSuite::Tls12(_));
    let (client_config, server_config) = (configs.client(suite), configs.server.clone());
    let name = rustls::pki_types::ServerName::try_from("device.test").expect("a name");
    // rustls' buffered connection for the proxy's end that stays rustls'; every other end
    // unbuffered, to hand its secrets over.
    let mut client = if gateway && !records {
        Unbuffered::Buffered(
            rustls::ClientConnection::new(client_config, name)
                .expect("a client")
                .into(),
        )
    } else {
        Unbuffered::Client(UnbufferedClientConnection::new(client_config, name).expect("a client"))
    };
    let mut server = if !gateway && !records {
        Unbuffered::Buffered(
            rustls::ServerConnection::new(server_config)
                .expect("a server")
                .into(),
        )
    } else {
        Unbuffered::Server(UnbufferedServerConnection::new(server_config).expect("a server"))
    };
    handshake(&mut client, &mut server);
    let (ours, peer) = if gateway {
        (client, server)
    } else {
        (server, client)
    };
    let engine = match ours {
        Unbuffered::Buffered(conn) => Engine::Rustls(Box::new(conn)),
        Unbuffered::Client(conn) => Engine::Records(
            Model::client(conn.dangerous_into_kernel_connection().expect("secrets"))
                .expect("a suite sealed"),
        ),
        Unbuffered::Server(conn) => Engine::Records(
            Model::server(conn.dangerous_into_kernel_connection().expect("secrets"))
                .expect("a suite sealed"),
        ),
    };
    (engine, peer.into_peer(tls12))
}

/// One end of a handshake in memory.
pub(super) enum Unbuffered {
    Client(UnbufferedClientConnection),
    Server(UnbufferedServerConnection),
    Buffered(rustls::Connection),
}

/// Runs a handshake between `client` and `server` in memory.
pub(super) fn handshake(client: &mut Unbuffered, server: &mut Unbuffered) {
    let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
    for _ in 0..8 {
        let client_done = client.step(&mut to_client, &mut to_server);
        let server_done = server.step(&mut to_server, &mut to_client);
        if client_done && server_done && to_server.is_empty() && to_client.is_empty() {
            return;
        }
    }
    panic!("the handshake did not end");
}

impl Unbuffered {
    /// Takes `incoming`, writes what it has to send onto `outgoing`: whether its handshake
    /// is done.
    pub(super) fn step(&mut self, incoming: &mut Vec<u8>, outgoing: &mut Vec<u8>) -> bool {
        match self {
            Unbuffered::Buffered(conn) => {
                let mut bytes = &incoming[..];
                while !bytes.is_empty() {
                    conn.read_tls(&mut bytes).expect("read");
                    conn.process_new_packets().expect("the handshake");
                }
                incoming.clear();
                while conn.wants_write() {
                    conn.write_tls(outgoing).expect("write");
                }
                !conn.is_handshaking()
            }
            Unbuffered::Client(conn) => loop {
                let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming);
                let done = drive(state.expect("the handshake"), outgoing);
                let handshaking = conn.is_handshaking();
                incoming.drain(..discard);
                if let Some(done) = done {
                    break done && !handshaking;
                }
            },
            Unbuffered::Server(conn) => loop {
                let UnbufferedStatus { discard, state } = conn.process_tls_records(incoming);
                let done = drive(state.expect("the handshake"), outgoing);
                let handshaking = conn.is_handshaking();
                incoming.drain(..discard);
                if let Some(done) = done {
                    break done && !handshaking;
                }
            },
        }
    }

    pub(super) fn into_peer(self, tls12: bool) -> Peer {
        let handed = match self {
            Unbuffered::Client(c) => c
                .dangerous_into_kernel_connection()
                .map(|(s, k)| (s, Kernel::Client(k))),
            Unbuffered::Server(s) => s
                .dangerous_into_kernel_connection()
                .map(|(s, k)| (s, Kernel::Server(k))),
            Unbuffered::Buffered(_) => unreachable!("a peer is unbuffered"),
        };
        Peer::new(handed.expect("the peer's secrets"), tls12)
    }
}

/// One state of an unbuffered handshake: `Some(true)` once it may write data, `Some(false)`
/// when it waits for the other end, `None` to go on.
pub(super) fn drive<Data>(
    state: ConnectionState<'_, '_, Data>,
    outgoing: &mut Vec<u8>,
) -> Option<bool> {
    match state {
        ConnectionState::EncodeTlsData(mut encode) => {
            let mut buf = vec![0; 4096];
            let n = match encode.encode(&mut buf) {
                Ok(n) => n,
                Err(EncodeError::InsufficientSize(e)) => {
                    buf.resize(e.required_size, 0);
                    encode.encode(&mut buf).expect("room")
                }
                Err(e) => panic!("encoding: {e}"),
            };
            outgoing.extend_from_slice(&buf[..n]);
            None
        }
        ConnectionState::TransmitTlsData(transmit) => {
            transmit.done();
            None
        }
        ConnectionState::BlockedHandshake => Some(false),
        ConnectionState::WriteTraffic(_) => Some(true),
        _ => panic!("an unexpected state in the handshake"),
    }
}
