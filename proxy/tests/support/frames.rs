//! Terminate-mode kit: a dev PKI, TLS devices, and a gateway stand-in that speaks the session
//! protocol (a counter app whose state travels in plain, unsealed tickets), with faults on
//! command: a crash, GOAWAY, garbage, an oversized frame, refused tickets.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;
use tokio_rustls::TlsConnector;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::{GatewayConfig, TerminateTls};
use wasmbed_protocol::codec::FrameCodec;
use wasmbed_protocol::{Checkpoint, ErrorCode, Frame, Goaway, Hello, Kind, Resumed, Welcome};

pub struct Pki {
    _dir: tempfile::TempDir,
    pub ca: DevCa,
    pub ca_path: PathBuf,
    pub tls: TerminateTls,
}

pub fn pki(kind: KeyKind) -> Pki {
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
        client_crls: Vec::new(),
        resumption: true,
        ticket_keys: None,
    };
    Pki {
        _dir: dir,
        ca,
        ca_path,
        tls,
    }
}

/// A device's TLS config: trusting `trust`, with a certificate for `device` from
/// `identity_from` (none when `None`).
pub fn device_tls(
    trust: &DevCa,
    identity_from: Option<&DevCa>,
    device: &str,
    tls12: bool,
) -> Arc<rustls::ClientConfig> {
    let identity = identity_from.map(|ca| {
        let d = ca.issue_client(device, KeyKind::EcdsaP256).unwrap();
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

/// HELLO as `device` for the `echo` app, no ticket: a device's first frame, sent raw.
pub fn hello_of(device: &str) -> Vec<u8> {
    let hello = Hello {
        device: device.into(),
        app: "echo".into(),
        resume: None,
    };
    Frame::control(Kind::Hello, 0, &hello).encode()
}

/// A device's TLS config presenting `issued` (a certificate made by the test).
pub fn device_tls_with(
    trust: &DevCa,
    issued: &wasmbed_certs::pki::Issued,
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(trust.cert_der()).unwrap();
    Arc::new(
        rustls::ClientConfig::builder_with_provider(wasmbed_certs::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(issued.chain(), issued.key().unwrap())
            .unwrap(),
    )
}

pub type TlsDevice = tokio_rustls::client::TlsStream<TcpStream>;

pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsDevice> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    TlsConnector::from(config).connect(name, tcp).await
}

/// A fault a [`FrameGateway`] acts out on every live session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// GOAWAY, then the close (the tickets are current: one follows every REPLY).
    Goaway,
    /// A frame whose length is under the minimum.
    Garbage,
    /// A frame header announcing more than the maximum.
    Oversized,
    /// A REPLY to a DATA the device never sent.
    ReplyAhead,
}

/// A gateway stand-in: HELLO → WELCOME; DATA n → REPLY n whose body is the session's count
/// of DATA so far (the app state), then CHECKPOINT n every `checkpoint_every` REPLYs with the
/// ticket `device:count:n`. HELLO `resume` with such a ticket restores the count (WELCOME
/// `resumed`), unless tickets are refused. DATA at or under the resumed sequence: ERROR
/// `duplicate`.
pub struct FrameGateway {
    pub addr: SocketAddr,
    pub name: String,
    live: Arc<AtomicUsize>,
    accepted: Arc<AtomicUsize>,
    hellos: Arc<AtomicUsize>,
    resumed: Arc<AtomicUsize>,
    /// DATA frames run (the app was called), in all sessions.
    pub calls: Arc<AtomicU64>,
    checkpoint_every: Arc<AtomicU64>,
    refuse_tickets: Arc<AtomicBool>,
    drop_hellos: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    /// While true, a HELLO's WELCOME waits.
    hold_welcomes: Arc<tokio::sync::watch::Sender<bool>>,
    deaf: CancellationToken,
    faults: broadcast::Sender<Fault>,
    kill: CancellationToken,
}

impl FrameGateway {
    pub async fn spawn(name: &str) -> FrameGateway {
        Self::spawn_with(name, None).await
    }

    /// The same behind TLS (`acceptor`).
    pub async fn spawn_with(
        name: &str,
        acceptor: Option<tokio_rustls::TlsAcceptor>,
    ) -> FrameGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let g = FrameGateway {
            addr: listener.local_addr().unwrap(),
            name: name.to_string(),
            live: Arc::default(),
            accepted: Arc::default(),
            hellos: Arc::default(),
            resumed: Arc::default(),
            calls: Arc::default(),
            checkpoint_every: Arc::new(AtomicU64::new(1)),
            refuse_tickets: Arc::default(),
            drop_hellos: Arc::default(),
            stalled: Arc::default(),
            hold_welcomes: Arc::new(tokio::sync::watch::Sender::new(false)),
            deaf: CancellationToken::new(),
            faults: broadcast::channel(16).0,
            kill: CancellationToken::new(),
        };
        let shared = Shared {
            name: g.name.clone(),
            live: g.live.clone(),
            hellos: g.hellos.clone(),
            resumed: g.resumed.clone(),
            calls: g.calls.clone(),
            checkpoint_every: g.checkpoint_every.clone(),
            refuse_tickets: g.refuse_tickets.clone(),
            drop_hellos: g.drop_hellos.clone(),
            stalled: g.stalled.clone(),
            hold_welcomes: g.hold_welcomes.subscribe(),
            kill: g.kill.clone(),
        };
        let (faults, accepted, deaf) = (g.faults.clone(), g.accepted.clone(), g.deaf.clone());
        tokio::spawn(async move {
            let shared = Arc::new(shared);
            loop {
                let (s, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                    _ = shared.kill.cancelled() => return,
                    _ = deaf.cancelled() => return,
                };
                accepted.fetch_add(1, Ordering::SeqCst);
                let (shared, faults) = (shared.clone(), faults.subscribe());
                match acceptor.clone() {
                    None => {
                        tokio::spawn(session(s, shared, faults));
                    }
                    Some(a) => {
                        tokio::spawn(async move {
                            if let Ok(tls) = a.accept(s).await {
                                session(tls, shared, faults).await;
                            }
                        });
                    }
                }
            }
        });
        g
    }

    pub fn gateway(&self) -> GatewayConfig {
        GatewayConfig {
            name: self.name.clone(),
            addr: self.addr.to_string(),
            health_addr: None,
            weight: 1,
            pool: "default".into(),
        }
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// HELLOs received (health probes connect too: they send none).
    pub fn hellos(&self) -> usize {
        self.hellos.load(Ordering::SeqCst)
    }

    /// Sessions that resumed from a ticket here.
    pub fn resumed(&self) -> usize {
        self.resumed.load(Ordering::SeqCst)
    }

    /// A crash: the listener closes and every connection is reset, with no GOAWAY.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    pub fn fault(&self, fault: Fault) {
        let _ = self.faults.send(fault);
    }

    pub fn checkpoint_every(&self, n: u64) {
        self.checkpoint_every.store(n, Ordering::SeqCst);
    }

    /// The listener closes (health checks fail) while live sessions go on.
    pub fn close_listener(&self) {
        self.deaf.cancel();
    }

    /// Live sessions stop answering (a hung process), their connections open.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }

    /// While `hold` is true, a HELLO's WELCOME waits (a slow gateway's session start).
    pub fn hold_welcomes(&self, hold: bool) {
        self.hold_welcomes.send_replace(hold);
    }

    /// Every HELLO is met by a reset: a gateway that dies as a session arrives.
    pub fn drop_hellos(&self, drop: bool) {
        self.drop_hellos.store(drop, Ordering::SeqCst);
    }

    pub fn refuse_tickets(&self, refuse: bool) {
        self.refuse_tickets.store(refuse, Ordering::SeqCst);
    }
}

struct Shared {
    name: String,
    live: Arc<AtomicUsize>,
    hellos: Arc<AtomicUsize>,
    resumed: Arc<AtomicUsize>,
    calls: Arc<AtomicU64>,
    checkpoint_every: Arc<AtomicU64>,
    refuse_tickets: Arc<AtomicBool>,
    drop_hellos: Arc<AtomicBool>,
    stalled: Arc<AtomicBool>,
    hold_welcomes: tokio::sync::watch::Receiver<bool>,
    kill: CancellationToken,
}

/// A ticket of this stand-in: `device:count:seq`.
fn parse_ticket(t: &[u8]) -> Option<(String, u64, u64)> {
    let text = std::str::from_utf8(t).ok()?;
    let mut parts = text.rsplitn(3, ':');
    let seq = parts.next()?.parse().ok()?;
    let count = parts.next()?.parse().ok()?;
    Some((parts.next()?.to_string(), count, seq))
}

/// A stream whose TCP socket can be set to reset on close.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    fn tcp(&self) -> &TcpStream;
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
}

async fn session<S: Socket>(s: S, shared: Arc<Shared>, mut faults: broadcast::Receiver<Fault>) {
    shared.live.fetch_add(1, Ordering::SeqCst);
    let mut framed = Framed::new(s, FrameCodec::new(1 << 16));
    let _ = serve(&mut framed, &shared, &mut faults).await;
    if shared.kill.is_cancelled() {
        let _ = socket2::SockRef::from(framed.get_ref().tcp()).set_linger(Some(Duration::ZERO));
    }
    drop(framed);
    shared.live.fetch_sub(1, Ordering::SeqCst);
}

async fn serve<S: Socket>(
    framed: &mut Framed<S, FrameCodec>,
    shared: &Shared,
    faults: &mut broadcast::Receiver<Fault>,
) -> Option<()> {
    let hello = framed.next().await?.ok()?;
    let hello: Hello = hello.decode_body("HELLO").ok()?;
    shared.hellos.fetch_add(1, Ordering::SeqCst);
    if shared.drop_hellos.load(Ordering::SeqCst) {
        let _ = socket2::SockRef::from(framed.get_ref().tcp()).set_linger(Some(Duration::ZERO));
        return None;
    }
    let ticket = hello.resume.as_ref().and_then(|t| parse_ticket(t));
    let (mut count, floor, resumed) = match ticket {
        _ if hello.resume.is_some() && shared.refuse_tickets.load(Ordering::SeqCst) => (0, 0, None),
        Some((device, count, seq)) if device == hello.device => {
            shared.resumed.fetch_add(1, Ordering::SeqCst);
            let r = Resumed {
                seq,
                state: "restored".into(),
            };
            (count, seq, Some(r))
        }
        _ => (0, 0, None),
    };
    let welcome = Welcome {
        session: format!("{}-{}", hello.device, shared.name),
        gateway: shared.name.clone(),
        resume_refused: (hello.resume.is_some() && resumed.is_none()).then(|| "bad_ticket".into()),
        resumed,
    };
    let mut held = shared.hold_welcomes.clone();
    let _ = held.wait_for(|hold| !*hold).await;
    framed
        .send(Frame::control(Kind::Welcome, 0, &welcome))
        .await
        .ok()?;
    let mut unsealed = 0;
    loop {
        let frame = tokio::select! {
            f = framed.next() => f?.ok()?,
            fault = faults.recv() => {
                match fault.ok()? {
                    Fault::Goaway => {
                        let g = Goaway { reason: "test".into() };
                        framed.send(Frame::control(Kind::Goaway, 0, &g)).await.ok()?;
                        return None;
                    }
                    Fault::Garbage => {
                        framed.get_mut().write_all(&[0, 0, 0, 2, 4, 4]).await.ok()?;
                    }
                    Fault::Oversized => {
                        framed.get_mut().write_all(&[0, 0x10, 0, 0, 4]).await.ok()?;
                    }
                    Fault::ReplyAhead => {
                        let reply = Frame::new(Kind::Reply, 1_000_000, b"?".to_vec());
                        framed.send(reply).await.ok()?;
                    }
                }
                // Stays up (as a confused gateway would) until the proxy drops the link.
                let _ = framed.next().await;
                return None;
            }
            _ = shared.kill.cancelled() => return None,
        };
        while shared.stalled.load(Ordering::SeqCst) {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                _ = shared.kill.cancelled() => return None,
            }
        }
        match frame.kind {
            Kind::Data if frame.seq <= floor => {
                let text = format!("DATA {} is covered", frame.seq);
                let e = ErrorCode::Duplicate.frame(frame.seq, text);
                framed.send(e).await.ok()?;
            }
            Kind::Data => {
                count += 1;
                shared.calls.fetch_add(1, Ordering::SeqCst);
                let reply = Frame::new(Kind::Reply, frame.seq, count.to_string().into_bytes());
                framed.feed(reply).await.ok()?;
                unsealed += 1;
                if unsealed >= shared.checkpoint_every.load(Ordering::SeqCst) {
                    unsealed = 0;
                    let ticket = format!("{}:{count}:{}", hello.device, frame.seq);
                    let c = Checkpoint {
                        ticket: serde_bytes::ByteBuf::from(ticket.into_bytes()),
                    };
                    framed
                        .feed(Frame::control(Kind::Checkpoint, frame.seq, &c))
                        .await
                        .ok()?;
                }
                SinkExt::<Frame>::flush(framed).await.ok()?;
            }
            Kind::Ping => {
                framed
                    .send(Frame::new(Kind::Pong, frame.seq, Vec::new()))
                    .await
                    .ok()?;
            }
            _ => return None,
        }
    }
}
