//! A device fleet simulator: N devices, each with its own client certificate, open TLS to a
//! target, send HELLO, wait for WELCOME, send DATA at a rate, check every REPLY by sequence,
//! and reconnect with backoff when the connection drops, resending what was not answered.
//! [`Report`] is what happened.

#![forbid(unsafe_code)]

mod driver;
pub mod report;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio_util::sync::CancellationToken;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::LoadtestSettings;

pub use report::Report;

/// How long devices wait for the last replies after they stop sending.
pub const GRACE: Duration = Duration::from_secs(3);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The app whose REPLYs the fleet checks for state: `counter` answers with its message count.
pub const COUNTER_APP: &str = "counter";

/// Why a fleet cannot start.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error(transparent)]
    Certs(#[from] wasmbed_certs::CertError),
    #[error(
        "{count} {what} need about {needed} open files, but this process may open {limit}; \
         lower --devices or raise the limit (ulimit -n)"
    )]
    Descriptors {
        /// TCP devices, or QUIC sockets.
        count: usize,
        what: &'static str,
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
    /// The fleet's UDP sockets replaced (`--rebind-after`, QUIC).
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
    /// Cancelled: every connected device drops its connection at once (a network blip, a
    /// zone lost) and reconnects by its session's rules (`wasmbed up --scenario storm`).
    pub storm: CancellationToken,
    /// Connections the devices opened (TLS or QUIC handshakes done), and attempts that
    /// failed (refused, reset, timed out).
    pub dials: AtomicU64,
    pub dial_failures: AtomicU64,
    /// The failed attempts by what the device was told (the error's text without its digits,
    /// bounded), so a storm's failures can be told apart: refused, timed out, reset.
    pub dial_failure_causes: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Churn (`wasmbed up --scenario soak`): each bump of `churn` makes every device on a
    /// session leave with a `churn_percent` % chance, stay away `churn_away_ms`, then come
    /// back and resume from its ticket. `churned` counts the devices that left.
    pub churn: AtomicU64,
    pub churn_percent: AtomicU64,
    pub churn_away_ms: AtomicU64,
    pub churned: AtomicU64,
    /// Devices whose app state restarted (a counter REPLY that went back), as it happens.
    pub state_resets: AtomicU64,
    /// While on ([`Live::log_replies`]): each reply's arrival and its wait, so that a scenario
    /// can tell what devices waited around an event from what they waited all run long (the
    /// run's histogram also holds the connect storm's waits).
    reply_log: Mutex<Option<Vec<(Instant, Duration)>>>,
    reply_logging: std::sync::atomic::AtomicBool,
}

/// The waits of the replies that arrived in one window: how many, median, 99th percentile
/// and longest, in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Waits {
    pub count: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl Waits {
    fn of(mut waits: Vec<Duration>) -> Waits {
        waits.sort();
        let at = |q: f64| {
            let i = ((waits.len() as f64 * q).ceil() as usize).clamp(1, waits.len()) - 1;
            waits[i].as_secs_f64() * 1e3
        };
        if waits.is_empty() {
            return Waits::default();
        }
        Waits {
            count: waits.len(),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            max_ms: at(1.0),
        }
    }
}

impl Live {
    /// Counts one failed attempt under its cause.
    pub fn dial_failed(&self, reason: &str) {
        self.dial_failures.fetch_add(1, Ordering::Relaxed);
        let cause = failure_cause(reason);
        let mut causes = self
            .dial_failure_causes
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        *causes.entry(cause).or_default() += 1;
    }

    /// Starts keeping every reply's arrival and wait ([`Live::reply_waits_around`]).
    pub fn log_replies(&self) {
        *self.reply_log.lock().unwrap_or_else(|e| e.into_inner()) = Some(Vec::new());
        self.reply_logging.store(true, Ordering::Relaxed);
    }

    /// A reply arrived after `wait` (kept while logging is on).
    pub fn note_reply(&self, wait: Duration) {
        if self.reply_logging.load(Ordering::Relaxed)
            && let Some(log) = self
                .reply_log
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_mut()
        {
            log.push((Instant::now(), wait));
        }
    }

    /// What devices waited for the replies that arrived in the `window` before `event`, and
    /// for those that arrived after it until now (the event's cost as devices see it, beside
    /// the steady state of the moment). Logging stops.
    pub fn reply_waits_around(&self, event: Instant, window: Duration) -> (Waits, Waits) {
        self.reply_logging.store(false, Ordering::Relaxed);
        let log = self
            .reply_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .unwrap_or_default();
        let from = event.checked_sub(window).unwrap_or(event);
        let (after, before): (Vec<_>, Vec<_>) = log
            .iter()
            .filter(|(at, _)| *at >= from)
            .partition(|(at, _)| *at >= event);
        let waits =
            |v: Vec<&(Instant, Duration)>| Waits::of(v.into_iter().map(|(_, w)| *w).collect());
        (waits(before), waits(after))
    }

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
    /// DATA already covered by a resumed session: answered ERROR `duplicate`, or its answer
    /// lost with the connection.
    pub duplicates_refused: u64,
    /// Every other ERROR received after WELCOME, by cause (`ERROR frame_too_large`); protocol
    /// violations and DATA a full window refused, by name.
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

/// The UDP sockets `devices` QUIC devices share, `per_socket` to a socket.
fn sockets(devices: usize, per_socket: usize) -> usize {
    devices.div_ceil(per_socket.max(1)).max(1)
}

/// The descriptors `devices` devices hold, and what they are: one per TCP device, one per
/// QUIC socket (`per_socket` devices each).
pub fn descriptors(
    transport: wasmbed_config::loadtest::Transport,
    devices: usize,
    per_socket: usize,
) -> (usize, &'static str) {
    match transport {
        wasmbed_config::loadtest::Transport::Tcp => (devices, "devices"),
        wasmbed_config::loadtest::Transport::Quic => (
            sockets(devices, per_socket),
            "QUIC sockets (one per --devices-per-socket devices)",
        ),
    }
}

/// Whether this process may open a connection per device (raising its soft open-files limit
/// to the hard one first). Call it before starting anything a fleet would need.
pub fn check_descriptors((count, what): (usize, &'static str)) -> Result<(), FleetError> {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(u64::MAX);
    let needed = count as u64 + 64;
    if needed > limit {
        return Err(FleetError::Descriptors {
            count,
            what,
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
        // A TCP device holds a descriptor; QUIC devices share a UDP socket per
        // `devices_per_socket`.
        check_descriptors(descriptors(
            settings.transport,
            settings.devices,
            settings.devices_per_socket,
        ))?;
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
                        wasmbed_certs::device_client_config_tls(
                            &roots,
                            (chain, key),
                            settings.tls12,
                        )
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
                        wasmbed_certs::device_client_config_tls(
                            &roots,
                            (d.chain(), d.key()?),
                            settings.tls12,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let live = Arc::new(Live {
            gateway: Mutex::new(vec![None; settings.devices]),
            ..Live::default()
        });
        let quic = match settings.transport {
            wasmbed_config::loadtest::Transport::Quic => {
                Some(Quic::new(&configs, settings.devices_per_socket)?)
            }
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
                    _ = tokio::time::sleep(delay) => driver::device(i, &ctx, &stop).await,
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

/// Moves the QUIC fleet to new UDP sockets: every device's source address changes under its
/// live connection, as a NAT rebinding does.
fn rebind(ctx: &Ctx) {
    let Some(quic) = ctx.quic.as_ref() else {
        return;
    };
    let (mut moved, mut failed) = (0u64, 0u64);
    let made: Vec<quinn::Endpoint> = quic
        .endpoints
        .iter()
        .filter_map(|e| e.lock().unwrap_or_else(|e| e.into_inner()).clone())
        .collect();
    for endpoint in &made {
        let new = endpoint
            .local_addr()
            .and_then(|old| wasmbed_certs::udp::socket((old.ip(), 0).into()))
            .and_then(|s| endpoint.rebind(s));
        match new {
            Ok(()) => moved += 1,
            Err(e) => {
                failed += 1;
                eprintln!("loadtest: rebinding one of the fleet's UDP sockets failed: {e}");
            }
        }
    }
    ctx.live.rebinds.fetch_add(moved, Ordering::Relaxed);
    eprintln!(
        "loadtest: the fleet's UDP sockets moved to new ports: {moved} moved, {failed} failed"
    );
}

/// A failure's cause: its text without the details that differ between devices (addresses,
/// numbers), bounded.
fn failure_cause(reason: &str) -> String {
    reason
        .chars()
        .filter(|c| !c.is_ascii_digit())
        .take(80)
        .collect::<String>()
        .trim()
        .to_string()
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

/// `--transport quic`: the fleet's client endpoints (one UDP socket each, shared by
/// `devices_per_socket` devices), and each device's QUIC client settings (its own certificate).
struct Quic {
    /// Made on first use, inside the runtime (quinn needs one); a failure is not kept (the
    /// next device on the socket tries again).
    endpoints: Vec<Mutex<Option<quinn::Endpoint>>>,
    configs: Vec<quinn::ClientConfig>,
}

impl Quic {
    fn new(
        configs: &[Arc<rustls::ClientConfig>],
        devices_per_socket: usize,
    ) -> Result<Quic, FleetError> {
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
            endpoints: (0..sockets(configs.len(), devices_per_socket))
                .map(|_| Mutex::new(None))
                .collect(),
            configs,
        })
    }

    /// Device `i`'s endpoint: devices are dealt round the sockets, so that a ramp fills them
    /// evenly.
    fn endpoint(&self, i: usize, target: std::net::SocketAddr) -> Result<quinn::Endpoint, String> {
        let bind = match target {
            std::net::SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            std::net::SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let mut slot = self.endpoints[i % self.endpoints.len()]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(endpoint) = slot.as_ref() {
            return Ok(endpoint.clone());
        }
        let endpoint =
            wasmbed_certs::udp::endpoint(bind, None).map_err(|e| format!("QUIC endpoint: {e}"))?;
        *slot = Some(endpoint.clone());
        Ok(endpoint)
    }

    /// A device's connection and its session stream.
    async fn connect(&self, i: usize, ctx: &Ctx) -> Result<Stream, String> {
        let s = &ctx.settings;
        let endpoint = self.endpoint(i, s.target)?;
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
