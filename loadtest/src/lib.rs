//! A device fleet simulator: N devices, each with its own client certificate, open TLS to a
//! target, send HELLO, wait for WELCOME, send DATA at a rate, check every REPLY by sequence,
//! and reconnect with backoff when the connection drops, resending what was not answered.
//! [`Report`] is what happened.

#![forbid(unsafe_code)]

pub mod report;

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::LoadtestSettings;
use wasmbed_protocol::codec::{CodecError, FrameCodec};
use wasmbed_protocol::{ErrorBody, ErrorCode, Frame, Hello, Kind, Welcome};

pub use report::Report;

/// How long devices wait for the last replies after they stop sending.
pub const GRACE: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const FIRST_BACKOFF: Duration = Duration::from_millis(20);
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// DATA a device remembers for a resume while it holds no ticket yet.
const MAX_UNSEALED: usize = 1024;
/// The largest frame a device accepts.
const MAX_FRAME: usize = 1 << 20;
/// The app whose REPLYs the fleet checks for state: `counter` answers with its message count.
pub const COUNTER_APP: &str = "counter";

/// Why a fleet cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Certs(#[from] wasmbed_certs::CertError),
    #[error(
        "{devices} devices need about {needed} open files, but this process may open {limit}; \
         lower --devices or raise the limit (ulimit -n)"
    )]
    Descriptors {
        devices: usize,
        needed: u64,
        limit: u64,
    },
    #[error("QUIC: {0}")]
    Quic(String),
    /// `--devices-from` holds fewer device certificates than asked for.
    #[error("{0}")]
    Devices(String),
}

/// Live counters, readable while the fleet runs (progress, `wasmbed up`'s view).
#[derive(Default)]
pub struct Live {
    pub welcomed: AtomicUsize,
    pub connected_now: AtomicUsize,
    pub disconnects: AtomicUsize,
    pub rehomed: AtomicUsize,
    /// Devices that hold a ticket (got at least one CHECKPOINT).
    pub ticketed: AtomicUsize,
    /// Times the fleet's UDP socket was replaced (`--rebind-after`, QUIC).
    pub rebinds: AtomicU64,
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    /// Sessions that ended after the far end's GOAWAY (the device left as told).
    pub left_on_goaway: AtomicUsize,
    /// Sessions that ended with no GOAWAY: a reset, a close, an error (the device was cut).
    pub cut: AtomicUsize,
    /// When each re-homing device was back (WELCOME again after a drop), in order: the
    /// reconnect wave's shape.
    pub rehomed_at: Mutex<Vec<Instant>>,
    /// The gateway each device is on now (`None`: not connected).
    pub gateway: Mutex<Vec<Option<String>>>,
}

impl Live {
    /// The most devices that came back within any `window` after `since` (the reconnect
    /// wave's crest), and the time from `since` to the last one back.
    pub fn wave(&self, since: Instant, window: Duration) -> (usize, Option<Duration>) {
        let at = self.rehomed_at.lock().unwrap_or_else(|e| e.into_inner());
        let times: Vec<Instant> = at.iter().copied().filter(|t| *t >= since).collect();
        let mut crest = 0;
        let mut first = 0;
        for (last, t) in times.iter().enumerate() {
            while *t - times[first] > window {
                first += 1;
            }
            crest = crest.max(last + 1 - first);
        }
        (crest, times.last().map(|t| *t - since))
    }

    /// Devices per gateway now.
    pub fn spread(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for g in self
            .gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flatten()
        {
            *m.entry(g.clone()).or_default() += 1;
        }
        m
    }

    fn set_gateway(&self, device: usize, gateway: Option<String>) {
        if let Some(slot) = self
            .gateway
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(device)
        {
            *slot = gateway;
        }
    }
}

/// Latency histograms (microseconds), shared by the devices.
pub struct Histograms {
    pub handshake: Histogram<u64>,
    pub welcome: Histogram<u64>,
    pub reply: Histogram<u64>,
    pub rehome: Histogram<u64>,
}

impl Default for Histograms {
    fn default() -> Self {
        let h = || Histogram::new(3).expect("3 significant figures is valid");
        Histograms {
            handshake: h(),
            welcome: h(),
            reply: h(),
            rehome: h(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros().min(u128::from(u64::MAX)) as u64
}

/// What one device did.
#[derive(Debug, Default)]
pub struct DeviceOutcome {
    pub welcomed: bool,
    pub failure: Option<String>,
    pub sent: u64,
    pub answered: u64,
    pub errors: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub reconnects: u64,
    /// With the `counter` app: REPLYs whose count went down (the app's state restarted).
    pub state_resets: u64,
    /// It got at least one CHECKPOINT.
    pub tickets: bool,
    /// Reconnections that resumed the session from a ticket.
    pub resumed: u64,
    /// Tickets refused, by reason.
    pub resume_refused: BTreeMap<String, u64>,
    /// DATA answered ERROR `duplicate` (already covered by a resumed session).
    pub duplicates_refused: u64,
    /// Every other ERROR received, by cause (`ERROR frame_too_large (...)`).
    pub error_causes: BTreeMap<String, u64>,
}

/// What a device expects of the `counter` app: every REPLY's message count is at least the
/// number of DATA answered by a REPLY so far, this one included (each of them was processed
/// by the app at least once; a resend may make it more). Less means the app lost its state.
#[derive(Default)]
struct CounterCheck {
    replies: u64,
}

impl CounterCheck {
    /// Checks the REPLY to a DATA not answered before (body: count u64 LE, sum u64 LE);
    /// true when the app's state restarted.
    fn reset(&mut self, body: &[u8]) -> bool {
        self.replies += 1;
        let Some(count) = body.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) else {
            return false;
        };
        u64::from_le_bytes(count) < self.replies
    }
}

struct Ctx {
    settings: LoadtestSettings,
    configs: Vec<Arc<rustls::ClientConfig>>,
    quic: Option<Quic>,
    live: Arc<Live>,
    hist: Mutex<Histograms>,
    start: Instant,
}

/// A prepared fleet: certificates issued, ready to run.
pub struct Fleet {
    ctx: Arc<Ctx>,
}

/// Whether this process may open a connection per device (raising its soft open-files limit
/// to the hard one first). Call it before starting anything a fleet would need.
pub fn check_descriptors(devices: usize) -> Result<(), FleetError> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(u64::MAX);
    let needed = devices as u64 + 64;
    if needed > limit {
        return Err(FleetError::Descriptors {
            devices,
            needed,
            limit,
        });
    }
    Ok(())
}

impl Fleet {
    /// Issues every device its certificate from the CA in `settings.ca_dir`, or loads it from
    /// `settings.devices_from`.
    pub fn prepare(settings: LoadtestSettings) -> Result<Fleet, FleetError> {
        // A TCP device holds a descriptor; QUIC devices share one UDP socket.
        if settings.transport == wasmbed_config::loadtest::Transport::Tcp {
            check_descriptors(settings.devices)?;
        }
        let read = |name: &str| {
            let path = settings.ca_dir.join(name);
            std::fs::read_to_string(&path).map_err(|e| wasmbed_certs::CertError::File {
                path,
                problem: e.to_string(),
            })
        };
        let configs = match &settings.devices_from {
            // The PKI's own device certificates, as they are.
            Some(dir) => {
                // The PKI's directory works too: its `devices/`.
                let dir = if dir.join("devices").is_dir() && !dir.join("device-0000.pem").exists() {
                    dir.join("devices")
                } else {
                    dir.clone()
                };
                let held = (0..)
                    .take_while(|i| dir.join(format!("{}.pem", device_id(*i))).exists())
                    .count();
                let wanted = settings.first_device + settings.devices;
                if held < wanted {
                    return Err(FleetError::Devices(format!(
                        "--devices-from {}: holds {held} device certificates (device-0000.pem on), \
                         --devices asks for {wanted}: lower --devices, or write more (certs init \
                         --devices {wanted})",
                        dir.display()
                    )));
                }
                let roots = wasmbed_certs::load_certs(&settings.ca_dir.join("ca.pem"))?;
                (0..settings.devices)
                    .map(|i| {
                        let id = device_id(settings.first_device + i);
                        let chain = wasmbed_certs::load_certs(&dir.join(format!("{id}.pem")))?;
                        let key = wasmbed_certs::load_key(&dir.join(format!("{id}.key")))?;
                        wasmbed_certs::device_client_config(&roots, (chain, key))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            None => {
                let (ca_pem, ca_key) = (read("ca.pem")?, read("ca.key")?);
                let ca = DevCa::load(&ca_pem, &ca_key)?;
                let roots = [ca.cert_der()];
                (0..settings.devices)
                    .map(|i| {
                        let id = device_id(settings.first_device + i);
                        let d = ca.issue_client(&id, KeyKind::EcdsaP256)?;
                        wasmbed_certs::device_client_config(&roots, (d.chain(), d.key()?))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let live = Arc::new(Live {
            gateway: Mutex::new(vec![None; settings.devices]),
            ..Live::default()
        });
        let quic = match settings.transport {
            wasmbed_config::loadtest::Transport::Quic => Some(Quic::new(&configs)?),
            wasmbed_config::loadtest::Transport::Tcp => None,
        };
        Ok(Fleet {
            ctx: Arc::new(Ctx {
                settings,
                configs,
                quic,
                live,
                hist: Mutex::new(Histograms::default()),
                start: Instant::now(),
            }),
        })
    }

    pub fn live(&self) -> Arc<Live> {
        self.ctx.live.clone()
    }

    /// Runs every device until the duration is over or `finish` is cancelled; then devices
    /// stop sending and wait (up to [`GRACE`]) for their last replies.
    pub async fn run(self, finish: CancellationToken) -> Report {
        let stop = finish;
        let started = Instant::now();
        let mut ctx = self.ctx;
        if let Some(c) = Arc::get_mut(&mut ctx) {
            c.start = started;
        }
        let n = ctx.settings.devices;
        if let Some(after) = ctx.settings.rebind_after {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(after) => rebind(&ctx),
                    _ = stop.cancelled() => {}
                }
            });
        }
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let delay = match ctx.settings.ramp {
                Some(per_second) => Duration::from_secs_f64(i as f64 / per_second),
                None => Duration::ZERO,
            };
            let (ctx, stop) = (ctx.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => device(i, &ctx, &stop).await,
                    _ = stop.cancelled() => DeviceOutcome {
                        failure: Some("not started before the end".into()),
                        ..DeviceOutcome::default()
                    },
                }
            }));
        }
        let mut outcomes = Vec::with_capacity(n);
        for t in tasks {
            outcomes.push(t.await.unwrap_or_else(|e| DeviceOutcome {
                failure: Some(format!("device task failed: {e}")),
                ..DeviceOutcome::default()
            }));
        }
        let hist = std::mem::take(&mut *ctx.hist.lock().unwrap_or_else(|e| e.into_inner()));
        let mut report = Report::build(
            &ctx.settings,
            &outcomes,
            &ctx.live.spread(),
            &hist,
            started.elapsed(),
        );
        report.rebinds = ctx.live.rebinds.load(Ordering::Relaxed);
        report
    }
}

/// Moves the QUIC fleet to a new UDP socket: every device's source address changes under its
/// live connection, as a NAT rebinding does.
fn rebind(ctx: &Ctx) {
    let Some(Ok(endpoint)) = ctx.quic.as_ref().and_then(|q| q.endpoint.get()) else {
        return;
    };
    let Ok(old) = endpoint.local_addr() else {
        return;
    };
    let new = wasmbed_certs::udp::socket((old.ip(), 0).into()).and_then(|s| endpoint.rebind(s));
    match new {
        Ok(()) => {
            ctx.live.rebinds.fetch_add(1, Ordering::Relaxed);
            let now = endpoint
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_default();
            eprintln!("loadtest: the fleet's UDP socket moved from {old} to {now}");
        }
        Err(e) => eprintln!("loadtest: rebinding the fleet's UDP socket failed: {e}"),
    }
}

pub fn device_id(i: usize) -> String {
    format!("device-{i:04}")
}

/// A device's decrypted connection: TLS over TCP, or a QUIC stream.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

type Stream = Box<dyn Io>;

/// The device protocol's ALPN (required over QUIC).
const ALPN: &[u8] = b"wasmbed/1";

/// `--transport quic`: one client endpoint (one UDP socket) for the whole fleet, and each
/// device's QUIC client settings (its own certificate).
struct Quic {
    /// Made on first use, inside the runtime (quinn needs one).
    endpoint: std::sync::OnceLock<Result<quinn::Endpoint, String>>,
    configs: Vec<quinn::ClientConfig>,
}

impl Quic {
    fn new(configs: &[Arc<rustls::ClientConfig>]) -> Result<Quic, FleetError> {
        let mut transport = quinn::TransportConfig::default();
        // A device's window, not quinn's bulk default: a frame is at most 64 KiB.
        transport
            .stream_receive_window(quinn::VarInt::from_u32(128 << 10))
            .receive_window(quinn::VarInt::from_u32(128 << 10))
            .send_window(128 << 10)
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(0))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
            .keep_alive_interval(Some(Duration::from_secs(10)));
        let transport = Arc::new(transport);
        let configs = configs
            .iter()
            .map(|c| {
                let mut tls = (**c).clone();
                tls.alpn_protocols = vec![ALPN.to_vec()];
                let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
                    .map_err(|e| FleetError::Quic(e.to_string()))?;
                let mut config = quinn::ClientConfig::new(Arc::new(crypto));
                config.transport_config(transport.clone());
                Ok(config)
            })
            .collect::<Result<Vec<_>, FleetError>>()?;
        Ok(Quic {
            endpoint: std::sync::OnceLock::new(),
            configs,
        })
    }

    /// A device's connection and its session stream.
    async fn connect(&self, i: usize, ctx: &Ctx) -> Result<Stream, String> {
        let s = &ctx.settings;
        let bind = match s.target {
            std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let endpoint = self
            .endpoint
            .get_or_init(|| wasmbed_certs::udp::endpoint(bind, None).map_err(|e| e.to_string()))
            .as_ref()
            .map_err(|e| format!("QUIC endpoint: {e}"))?;
        let connecting = endpoint
            .connect_with(self.configs[i].clone(), s.target, &s.sni)
            .map_err(|e| format!("QUIC connect: {e}"))?;
        let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
            .await
            .map_err(|_| "QUIC handshake timeout".to_string())?
            .map_err(|e| format!("QUIC handshake: {e}"))?;
        let (send, recv) = conn
            .open_bi()
            .await
            .map_err(|e| format!("QUIC stream: {e}"))?;
        // The streams hold the connection: it lives as long as they do.
        Ok(Box::new(tokio::io::join(recv, send)))
    }
}

/// An ERROR as a report counts it: by its code (`ERROR frame_too_large`), never by the
/// peer's free text (a bounded number of keys whatever the peer sends).
fn cause_of(f: &Frame) -> String {
    match f.decode_body::<ErrorBody>("ERROR") {
        Ok(e) => format!("ERROR {}", e.code_name()),
        Err(_) => "ERROR (no readable body)".into(),
    }
}

fn error_is(f: &Frame, code: ErrorCode) -> bool {
    f.decode_body::<ErrorBody>("ERROR")
        .is_ok_and(|e| e.code == code as u16)
}

/// A device's session: frames over its TLS stream, by the protocol's codec.
struct Conn {
    framed: Framed<Stream, FrameCodec>,
}

impl Conn {
    /// The next frame; `None` on close, error, or a frame that breaks the protocol.
    async fn next(&mut self) -> Option<Frame> {
        self.framed.next().await?.ok()
    }

    async fn send(&mut self, frame: &Frame) -> Result<(), CodecError> {
        self.framed.send(frame).await
    }
}

/// Connects, handshakes and opens a session; returns the connection and the gateway's name.
async fn open(i: usize, ctx: &Ctx, ticket: Option<&[u8]>) -> Result<(Conn, Welcome), String> {
    let s = &ctx.settings;
    let t0 = Instant::now();
    let stream: Stream = match &ctx.quic {
        Some(quic) => quic.connect(i, ctx).await?,
        None => {
            let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(s.target))
                .await
                .map_err(|_| "connect timeout".to_string())?
                .map_err(|e| format!("connect: {}", e.kind()))?;
            let _ = tcp.set_nodelay(true);
            let name = ServerName::try_from(s.sni.clone()).map_err(|_| "bad --sni".to_string())?;
            let connector = tokio_rustls::TlsConnector::from(ctx.configs[i].clone());
            let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
                .await
                .map_err(|_| "TLS handshake timeout".to_string())?
                .map_err(|e| format!("TLS handshake: {e}"))?;
            Box::new(tls)
        }
    };
    let handshake = t0.elapsed();
    let mut conn = Conn {
        framed: Framed::new(stream, FrameCodec::new(MAX_FRAME)),
    };
    let t1 = Instant::now();
    let hello = Hello {
        device: device_id(s.first_device + i),
        app: s.app.clone(),
        resume: ticket.map(|t| serde_bytes::ByteBuf::from(t.to_vec())),
    };
    conn.send(&Frame::control(Kind::Hello, 0, &hello))
        .await
        .map_err(|e| format!("send HELLO: {e}"))?;
    let answer = tokio::time::timeout(CONNECT_TIMEOUT, conn.next())
        .await
        .map_err(|_| "no WELCOME in time".to_string())?
        .ok_or_else(|| "closed before WELCOME".to_string())?;
    match answer.kind {
        Kind::Welcome => {
            let w: Welcome = answer.decode_body("WELCOME").map_err(|e| e.to_string())?;
            let mut h = ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
            let _ = h.handshake.record(micros(handshake));
            let _ = h.welcome.record(micros(t1.elapsed()));
            Ok((conn, w))
        }
        Kind::Error => {
            let e: ErrorBody = answer.decode_body("ERROR").map_err(|e| e.to_string())?;
            Err(format!("ERROR {e}"))
        }
        other => Err(format!("unexpected {other:?} instead of WELCOME")),
    }
}

/// One device: connect, send at the rate, reconnect (resending what was not answered).
/// `finish`: stop sending, wait (at most [`GRACE`]) for the replies, end.
async fn device(i: usize, ctx: &Ctx, finish: &CancellationToken) -> DeviceOutcome {
    let s = &ctx.settings;
    let live = &ctx.live;
    let send_until = ctx.start + s.duration;
    let give_up = async {
        tokio::select! {
            _ = tokio::time::sleep_until((send_until + GRACE).into()) => {}
            _ = async { finish.cancelled().await; tokio::time::sleep(GRACE).await } => {}
        }
    };
    let mut give_up = std::pin::pin!(give_up);
    let interval = Duration::from_secs_f64(1.0 / s.rate);
    let payload: Vec<u8> = (0..s.payload).map(|b| (b ^ i) as u8).collect();
    let mut out = DeviceOutcome::default();
    let mut pending: BTreeMap<u64, Instant> = BTreeMap::new();
    let mut answered: HashSet<u64> = HashSet::new();
    let mut next_seq = 1u64;
    let mut dropped_at: Option<Instant> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut counter = (s.app == COUNTER_APP).then(CounterCheck::default);
    // The latest CHECKPOINT: (the DATA it covers, the sealed ticket).
    let mut ticket: Option<(u64, Vec<u8>)> = None;
    // DATA sent since the latest CHECKPOINT: what a resume sends again.
    let mut unsealed: BTreeSet<u64> = BTreeSet::new();
    // DATA answered before and sent again after a resume: their second answer is expected.
    let mut replaying: HashSet<u64> = HashSet::new();
    'session: loop {
        let sending = Instant::now() < send_until && !finish.is_cancelled();
        if !sending && pending.is_empty() {
            break;
        }
        let opened = tokio::select! {
            r = open(i, ctx, ticket.as_ref().map(|(_, t)| t.as_slice())) => r,
            _ = &mut give_up => {
                // Still dialing when the run ended: say so (a QUIC device dialing a port
                // where nothing speaks QUIC hears nothing back, not a refusal).
                if out.failure.is_none() {
                    out.failure = Some(format!(
                        "connect: no answer from {} before the run ended ({})",
                        s.target,
                        match s.transport {
                            wasmbed_config::loadtest::Transport::Quic => "QUIC over UDP: is it a --quic-listen address?",
                            wasmbed_config::loadtest::Transport::Tcp => "TLS over TCP",
                        }
                    ));
                }
                break;
            }
        };
        let (mut conn, welcome) = match opened {
            Ok(x) => x,
            Err(reason) => {
                out.failure = Some(reason);
                let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
                tokio::select! {
                    _ = tokio::time::sleep(backoff + jitter) => {}
                    _ = &mut give_up => break,
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        out.failure = None;
        if !out.welcomed {
            out.welcomed = true;
            live.welcomed.fetch_add(1, Ordering::Relaxed);
        }
        live.connected_now.fetch_add(1, Ordering::Relaxed);
        live.set_gateway(i, Some(welcome.gateway.clone()));
        if let Some(at) = dropped_at.take() {
            let mut h = ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
            let _ = h.rehome.record(micros(at.elapsed()));
            live.rehomed.fetch_add(1, Ordering::Relaxed);
            live.rehomed_at
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(Instant::now());
        }
        // Resumed: DATA up to the ticket's sequence is in the app's state; every DATA after
        // it is sent again (answered or not: its effect may not be in the state). Not
        // resumed: every DATA not answered yet is sent again.
        let mut resend: BTreeSet<u64> = pending.keys().copied().collect();
        match (&welcome.resumed, &welcome.resume_refused) {
            (Some(r), _) => {
                out.resumed += 1;
                pending.retain(|&seq, _| seq > r.seq);
                resend = pending.keys().copied().collect();
                resend.extend(unsealed.range(r.seq + 1..));
                replaying.extend(resend.iter().filter(|s| !pending.contains_key(s)));
            }
            (None, Some(reason)) => {
                *out.resume_refused.entry(reason.clone()).or_default() += 1;
                ticket = None;
            }
            (None, None) => {}
        }
        unsealed.retain(|s| resend.contains(s));
        let mut ok = true;
        for &seq in &resend {
            if conn
                .send(&Frame::new(Kind::Data, seq, payload.clone()))
                .await
                .is_err()
            {
                ok = false;
                break;
            }
        }
        let mut ticker = tokio::time::interval_at(
            tokio::time::Instant::now() + interval.mul_f64(fastrand::f64()),
            interval,
        );
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // After GOAWAY: send nothing more, read the answers the gateway still owes, then go.
        let mut leaving = false;
        // A REPLY came on this connection: it made progress (else the next one backs off).
        let mut replied = false;
        while ok {
            let in_time = Instant::now() < send_until && !finish.is_cancelled();
            if !in_time && pending.is_empty() {
                break 'session;
            }
            if leaving && pending.is_empty() {
                break;
            }
            let sending = in_time && !leaving;
            tokio::select! {
                _ = ticker.tick(), if sending => {
                    let seq = next_seq;
                    next_seq += 1;
                    pending.insert(seq, Instant::now());
                    unsealed.insert(seq);
                    // Without tickets (gateways with no key ring) nothing prunes it: keep
                    // only the most recent DATA, enough for a first ticket to cover.
                    if ticket.is_none() && unsealed.len() > MAX_UNSEALED {
                        unsealed.pop_first();
                    }
                    out.sent += 1;
                    live.sent.fetch_add(1, Ordering::Relaxed);
                    ok = conn.send(&Frame::new(Kind::Data, seq, payload.clone())).await.is_ok();
                }
                frame = conn.next() => match frame {
                    Some(f) if f.kind == Kind::Reply || f.kind == Kind::Error => {
                        match pending.remove(&f.seq) {
                            Some(sent) => {
                                answered.insert(f.seq);
                                if f.kind == Kind::Reply {
                                    if counter.as_mut().is_some_and(|c| c.reset(&f.body)) {
                                        out.state_resets += 1;
                                    }
                                    out.answered += 1;
                                    replied = true;
                                    live.answered.fetch_add(1, Ordering::Relaxed);
                                    let mut h = ctx.hist.lock().unwrap_or_else(|e| e.into_inner());
                                    let _ = h.reply.record(micros(sent.elapsed()));
                                } else if error_is(&f, ErrorCode::Duplicate) {
                                    // Covered by the resumed session's state: answered before.
                                    out.duplicates_refused += 1;
                                    replied = true;
                                } else {
                                    out.errors += 1;
                                    *out.error_causes.entry(cause_of(&f)).or_default() += 1;
                                }
                            }
                            None if replaying.remove(&f.seq) => {}
                            None if answered.contains(&f.seq) => out.duplicated += 1,
                            None if f.seq == 0 => {
                                out.errors += 1;
                                *out.error_causes.entry(cause_of(&f)).or_default() += 1;
                            }
                            None => {}
                        }
                    }
                    Some(f) if f.kind == Kind::Goaway => leaving = true,
                    Some(f) if f.kind == Kind::Checkpoint => {
                        if let Ok(c) = f.decode_body::<wasmbed_protocol::Checkpoint>("CHECKPOINT") {
                            unsealed.retain(|&s| s > f.seq);
                            ticket = Some((f.seq, c.ticket.into_vec()));
                            if !out.tickets {
                                out.tickets = true;
                                live.ticketed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Some(_) => {}
                    None => ok = false,
                },
                _ = finish.cancelled(), if sending => {}
                _ = tokio::time::sleep_until(send_until.into()), if sending => {}
                _ = &mut give_up => break 'session,
            }
        }
        // Dropped: by the gateway (GOAWAY, crash) or the proxy. Re-home.
        live.connected_now.fetch_sub(1, Ordering::Relaxed);
        live.disconnects.fetch_add(1, Ordering::Relaxed);
        if leaving {
            live.left_on_goaway.fetch_add(1, Ordering::Relaxed);
        } else {
            live.cut.fetch_add(1, Ordering::Relaxed);
        }
        live.set_gateway(i, None);
        dropped_at = Some(Instant::now());
        out.reconnects += 1;
        // A session that ended without a single REPLY and without GOAWAY (an ERROR, a close
        // right after WELCOME) backs off as a failed connect does: the same failure again at
        // once would only hammer the gateways.
        if replied || leaving {
            backoff = FIRST_BACKOFF;
        } else {
            let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
            tokio::select! {
                _ = tokio::time::sleep(backoff + jitter) => {}
                _ = &mut give_up => break,
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
    if out.welcomed
        && dropped_at.is_none()
        && live.gateway.lock().map(|g| g[i].is_some()).unwrap_or(false)
    {
        // Still connected at the end: leave the gateway in the spread, count as disconnected.
        live.connected_now.fetch_sub(1, Ordering::Relaxed);
    }
    out.lost = pending.len() as u64;
    out
}

#[cfg(test)]
mod tests {
    use super::CounterCheck;

    fn reply(count: u64) -> Vec<u8> {
        let mut b = count.to_le_bytes().to_vec();
        b.extend_from_slice(&0u64.to_le_bytes());
        b
    }

    #[test]
    fn a_counter_that_restarts_is_seen_and_a_resend_is_not() {
        let mut c = CounterCheck::default();
        assert!(!c.reset(&reply(1)));
        assert!(!c.reset(&reply(2)));
        // A DATA processed twice (resent after a drop, state kept): the count runs ahead.
        assert!(!c.reset(&reply(4)));
        // Re-homed onto a fresh instance: the count starts again.
        assert!(c.reset(&reply(1)));
        assert!(!c.reset(&[1, 2]), "a body too short to read is not judged");
    }
}
