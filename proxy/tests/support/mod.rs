//! Test kit for the proxy: backends that echo and count their live connections (with an http
//! health endpoint that can be stalled), a proxy started in-process, and device clients.
#![allow(dead_code)]

pub mod frames;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use wasmbed_config::{GatewayConfig, ProxyConfig};
use wasmbed_proxy::{GatewaySet, Proxy};
#[allow(unused_imports)] // each test binary uses some
pub use wasmbed_testkit::{Metrics, http, until};

/// A gateway stand-in: echoes bytes, counts live connections, answers `/healthz`.
pub struct Backend {
    pub addr: SocketAddr,
    pub health_addr: SocketAddr,
    live: Arc<AtomicUsize>,
    /// Connections accepted, ever.
    accepted: Arc<AtomicUsize>,
    /// Health requests answered.
    pub probes: Arc<AtomicUsize>,
    /// Health requests held unanswered while stalled.
    pub held: Arc<AtomicUsize>,
    /// Of those, the ones held now (their prober still waiting on them).
    pub holding: Arc<AtomicUsize>,
    stalled: watch::Sender<bool>,
    kill: CancellationToken,
}

impl Backend {
    pub async fn spawn() -> Backend {
        Self::spawn_at("127.0.0.1:0".parse().unwrap())
            .await
            .unwrap()
    }

    /// Listens on `addr` (another loopback address, a chosen port: gateways found by DNS
    /// A records share one port); `None` when that address is taken.
    pub async fn spawn_at(addr: SocketAddr) -> Option<Backend> {
        let listener = TcpListener::bind(addr).await.ok()?;
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(AtomicUsize::new(0));
        let probes = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let holding = Arc::new(AtomicUsize::new(0));
        let (stalled, stall_rx) = watch::channel(false);
        let kill = CancellationToken::new();
        let b = Backend {
            addr: listener.local_addr().unwrap(),
            health_addr: health.local_addr().unwrap(),
            live: live.clone(),
            accepted: accepted.clone(),
            probes: probes.clone(),
            held: held.clone(),
            holding: holding.clone(),
            stalled,
            kill: kill.clone(),
        };
        tokio::spawn(echo_loop(listener, [live.clone(), accepted], kill.clone()));
        tokio::spawn(health_loop(
            health,
            live,
            [probes, held, holding],
            stall_rx,
            kill,
        ));
        Some(b)
    }

    pub fn live(&self) -> usize {
        self.live.load(Ordering::SeqCst)
    }

    /// Connections it ever accepted.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Health requests stop being answered (a hung process: TCP still accepts).
    pub fn stall(&self, stalled: bool) {
        self.stalled.send_replace(stalled);
    }

    /// A crash: the listeners close and every connection is reset.
    pub fn kill(&self) {
        self.kill.cancel();
    }

    pub fn gateway(&self, name: &str) -> GatewayConfig {
        GatewayConfig {
            name: name.into(),
            addr: self.addr.to_string(),
            health_addr: Some(self.health_addr.to_string()),
            weight: 1,
            pool: "default".into(),
        }
    }
}

async fn echo_loop(
    listener: TcpListener,
    [live, accepted]: [Arc<AtomicUsize>; 2],
    kill: CancellationToken,
) {
    loop {
        let (mut s, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = kill.cancelled() => return,
        };
        let (live, kill) = (live.clone(), kill.clone());
        accepted.fetch_add(1, Ordering::SeqCst);
        live.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                tokio::select! {
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => break,
                        Ok(n) => if s.write_all(&buf[..n]).await.is_err() { break },
                    },
                    _ = kill.cancelled() => {
                        let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                        break;
                    }
                }
            }
            live.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn health_loop(
    listener: TcpListener,
    live: Arc<AtomicUsize>,
    [probes, held, holding]: [Arc<AtomicUsize>; 3],
    stalled: watch::Receiver<bool>,
    kill: CancellationToken,
) {
    loop {
        let (mut s, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = kill.cancelled() => return,
        };
        let (live, probes, held, holding, mut stalled, kill) = (
            live.clone(),
            probes.clone(),
            held.clone(),
            holding.clone(),
            stalled.clone(),
            kill.clone(),
        );
        tokio::spawn(async move {
            let mut req = Vec::new();
            let mut buf = [0u8; 1024];
            while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => req.extend_from_slice(&buf[..n]),
                }
            }
            // While stalled, hold the request unanswered.
            if *stalled.borrow_and_update() {
                held.fetch_add(1, Ordering::SeqCst);
                holding.fetch_add(1, Ordering::SeqCst);
                let released = tokio::select! {
                    _ = stalled.wait_for(|s| !*s) => true,
                    _ = kill.cancelled() => false,
                    // The prober gave up on it (its timeout, or its end).
                    _ = s.read(&mut buf) => false,
                };
                holding.fetch_sub(1, Ordering::SeqCst);
                if !released {
                    return;
                }
            }
            let body = format!(
                "{{\"status\":\"ok\",\"sessions\":{}}}",
                live.load(Ordering::SeqCst)
            );
            let resp = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if s.write_all(resp.as_bytes()).await.is_ok() {
                probes.fetch_add(1, Ordering::SeqCst);
            }
        });
    }
}

/// Gateway entries for `backends`, named gw-0, gw-1, ...
pub fn named(backends: &[Backend]) -> Vec<GatewayConfig> {
    backends
        .iter()
        .enumerate()
        .map(|(i, b)| b.gateway(&format!("gw-{i}")))
        .collect()
}

/// A proxy running in-process on 127.0.0.1:0.
///
/// Metrics are process-wide, and `cargo test` runs the tests of one file in one process: so a
/// running proxy holds a lock that keeps the others of its process waiting, and reads metrics
/// as differences from the moment it started.
pub struct RunningProxy {
    _serial: tokio::sync::MutexGuard<'static, ()>,
    baseline: String,
    pub addr: SocketAddr,
    /// Every device listener's address, in the config's order (`addr` is the first).
    pub addrs: Vec<SocketAddr>,
    /// `--quic-listen`'s address, when configured.
    pub quic: Option<SocketAddr>,
    pub admin: SocketAddr,
    pub gateways: Arc<GatewaySet>,
    /// Terminate mode's device TLS, to reload (as SIGHUP does).
    pub device_tls: Arc<wasmbed_proxy::DeviceTls>,
    /// The running config, its reload.
    pub live: Arc<wasmbed_proxy::live::Live>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), wasmbed_proxy::ProxyError>>,
}

/// A config with fast health checks, listening on 127.0.0.1:0.
pub fn config(gateways: Vec<GatewayConfig>) -> ProxyConfig {
    let mut c = ProxyConfig::from_toml(
        r#"
        admin = "127.0.0.1:0"
        handshake_timeout = "2s"
        connect_timeout = "500ms"
        grace = "200ms"
        # These devices read frame by frame and check what comes next: CHECKPOINTs (passed on
        # by default) would come between. Their forwarding has its own test (gateway's
        # through_proxy.rs).
        forward_checkpoints = false
        [[listener]]
        addr = "127.0.0.1:0"
        [health]
        interval = "100ms"
        timeout = "90ms"
        rise = 2
        fall = 2
        [[gateway]]
        addr = "127.0.0.1:1"
        "#,
    )
    .unwrap();
    c.gateways = gateways;
    c.threads = Some(test_threads());
    c
}

/// The proxies' threads in these tests: two session workers on every host by default (a
/// deployed proxy's default is one per core, none on one core: the tests then run the same on
/// every machine); `WASMBED_TEST_THREADS=1` runs them all on one thread, as a proxy with one
/// CPU to run on (`.ci/run` runs this crate's tests both ways).
pub fn test_threads() -> usize {
    match std::env::var("WASMBED_TEST_THREADS") {
        Ok(n) => n
            .parse()
            .unwrap_or_else(|_| panic!("WASMBED_TEST_THREADS={n}: not a number of threads")),
        Err(_) => 2,
    }
}

/// One running proxy per test process at a time (metrics are process-wide: see
/// [`RunningProxy`]); [`start`] takes it, a test running a proxy its own way takes it too.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    SERIAL.lock().await
}

pub async fn start(config: ProxyConfig) -> RunningProxy {
    let serial = serial().await;
    let proxy = Proxy::bind(config).await.unwrap();
    let addrs = proxy.listen_addrs();
    let addr = addrs[0];
    let quic = proxy.quic_addr();
    let admin = proxy.admin_addr().unwrap();
    let gateways = proxy.gateways();
    let device_tls = proxy.device_tls();
    let live = proxy.live();
    let shutdown = CancellationToken::new();
    // The gauges are the process's: the last test's sessions may still be closing (their
    // devices dropped a moment ago). Its baseline is taken once they have (bounded).
    let settle = tokio::time::Instant::now() + Duration::from_secs(5);
    let baseline = loop {
        let text = wasmbed_proxy::metrics::render(&gateways);
        let open = Metrics::parse(&text);
        let quiet = ["tcp", "quic"].iter().all(|t| {
            open.series(&format!(
                "wasmbed_proxy_connections_open{{transport=\"{t}\"}}"
            )) == 0.0
        }) && open.series("wasmbed_proxy_handshakes_in_progress") == 0.0
            && open.series("wasmbed_proxy_handshakes_waiting") == 0.0;
        if quiet || tokio::time::Instant::now() >= settle {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let task = tokio::spawn(proxy.run(shutdown.clone()));
    RunningProxy {
        _serial: serial,
        baseline,
        addr,
        addrs,
        quic,
        admin,
        gateways,
        device_tls,
        live,
        shutdown,
        task,
    }
}

impl RunningProxy {
    pub fn counts(&self) -> Vec<u64> {
        self.gateways
            .snapshot()
            .iter()
            .map(|g| g.sessions())
            .collect()
    }

    pub fn gateway(&self, name: &str) -> Arc<wasmbed_proxy::Gateway> {
        self.gateways.find(name).unwrap()
    }

    /// GET or POST on the admin endpoint; returns (status, body).
    pub async fn admin(&self, method: &str, path: &str) -> (u16, String) {
        http(self.admin, method, path, b"").await
    }

    /// POST a JSON body on the admin endpoint.
    pub async fn admin_post(&self, path: &str, body: &str) -> (u16, String) {
        http(self.admin, "POST", path, body.as_bytes()).await
    }

    /// How much one counter series (name with labels, exactly as rendered) grew since the
    /// start.
    pub async fn metric(&self, series: &str) -> f64 {
        let (_, text) = self.admin("GET", "/metrics").await;
        Metrics::parse(&text).series(series) - Metrics::parse(&self.baseline).series(series)
    }

    /// Waits (bounded: 5 s) until `series` grew by `want` since the start.
    pub async fn until_metric(&self, series: &str, want: f64) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            let v = self.metric(series).await;
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

    /// The value of a gauge series now.
    pub async fn gauge(&self, series: &str) -> f64 {
        Metrics::parse(&self.admin("GET", "/metrics").await.1).series(series)
    }
}

/// A real ClientHello for `sni`, as rustls sends it.
pub fn client_hello(sni: &str) -> Vec<u8> {
    client_hello_alpn(sni, &[])
}

/// A real ClientHello for `sni` offering the ALPN protocols `alpn`.
pub fn client_hello_alpn(sni: &str, alpn: &[&str]) -> Vec<u8> {
    let mut config = rustls::ClientConfig::builder_with_provider(wasmbed_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let mut conn =
        rustls::ClientConnection::new(Arc::new(config), sni.to_string().try_into().unwrap())
            .unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

/// A device whose session is established: it sent a ClientHello and the echo came back.
pub async fn device(proxy: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    static HELLO: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let hello = HELLO.get_or_init(|| client_hello("device.example"));
    s.write_all(hello).await.unwrap();
    let mut back = vec![0u8; hello.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(
        &back, hello,
        "the ClientHello reaches the gateway untouched"
    );
    s
}

/// Waits (bounded) until the proxy closes `s`; returns how many bytes arrived before.
pub async fn closed(s: &mut TcpStream, within: Duration) -> usize {
    let mut buf = [0u8; 1024];
    let mut total = 0;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => panic!("connection still open after {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return total,
            Ok(Ok(n)) => total += n,
        }
    }
}
