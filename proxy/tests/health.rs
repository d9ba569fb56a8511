//! Active health checks, drain, and the admin endpoint.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::future::join_all;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_gateway_is_marked_down_after_fall_probes_and_its_sessions_cut() {
    let backends = join_all((0..2).map(|_| Backend::spawn())).await;
    let gws = vec![backends[0].gateway("hung"), backends[1].gateway("fine")];
    let proxy = start(config(gws)).await; // interval 100ms, fall 2, rise 2
    let mut devices = join_all((0..4).map(|_| device(proxy.addr))).await;
    assert_eq!(proxy.counts(), vec![2, 2]);
    // Stall right after a fresh success, so the failure streak starts at zero.
    let answered = backends[0].probes.load(Ordering::SeqCst);
    until(Duration::from_secs(2), "a fresh good probe", || {
        backends[0].probes.load(Ordering::SeqCst) > answered
    })
    .await;
    backends[0].stall(true); // TCP still accepts, /healthz never answers
    let hung = proxy.gateway("hung");
    until(
        Duration::from_secs(3),
        "the hung gateway marked down",
        || !hung.is_healthy(),
    )
    .await;
    let held = backends[0].held.load(Ordering::SeqCst);
    assert!(
        held >= 2,
        "down only after `fall` (2) unanswered probes, saw {held}"
    );
    // Its two devices were closed by the proxy (the gateway's own sockets are still open);
    // the two on the healthy gateway still get their echo.
    let echoed = join_all(devices.iter_mut().map(|d| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = d.write_all(b"!").await;
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), d.read(&mut b)).await;
        matches!(read.expect("bounded"), Ok(1))
    }))
    .await;
    assert_eq!(echoed.iter().filter(|&&e| e).count(), 2, "{echoed:?}");
    assert_eq!(hung.sessions(), 0, "every session through it was cancelled");
    let cancelled =
        "wasmbed_proxy_sessions_cancelled_total{gateway=\"hung\",cause=\"gateway_down\"}";
    assert_eq!(proxy.metric(cancelled).await, 2.0);
    assert_eq!(
        proxy
            .gauge("wasmbed_proxy_gateway_up{gateway=\"hung\"}")
            .await,
        0.0
    );
    // New devices all go to the healthy one.
    let more = join_all((0..3).map(|_| device(proxy.addr))).await;
    assert_eq!(proxy.counts(), vec![0, 5]);

    // It answers again: up after `rise` (2) good probes, and takes sessions again.
    let answered_from = backends[0].probes.load(Ordering::SeqCst);
    backends[0].stall(false);
    until(Duration::from_secs(3), "the gateway back up", || {
        hung.is_healthy()
    })
    .await;
    let answered = backends[0].probes.load(Ordering::SeqCst) - answered_from;
    assert!(
        answered >= 2,
        "up again only after `rise` (2) answered probes, saw {answered}"
    );
    // Counted by the probes' thread just after it marks the gateway up: waited for.
    let transitions = "wasmbed_proxy_gateway_transitions_total{gateway=\"hung\",to=\"up\"}";
    proxy.until_metric(transitions, 1.0).await;
    let last = device(proxy.addr).await;
    assert_eq!(proxy.counts(), vec![1, 5]);
    drop((devices, more, last));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_new_sessions_but_keeps_live_ones() {
    let backends = join_all((0..2).map(|_| Backend::spawn())).await;
    let proxy = start(config(vec![
        backends[0].gateway("a"),
        backends[1].gateway("b"),
    ]))
    .await;
    let mut first = join_all((0..4).map(|_| device(proxy.addr))).await;
    let (status, body) = proxy.admin("POST", "/api/gateways/a/drain").await;
    assert_eq!(status, 200, "{body}");
    let view: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(view["draining"], true);
    let later = join_all((0..4).map(|_| device(proxy.addr))).await;
    assert_eq!(
        proxy.counts(),
        vec![2, 6],
        "drained gateway took nothing new"
    );
    // Its live sessions still work.
    for d in first.iter_mut() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        d.write_all(b"ping").await.unwrap();
        let mut b = [0u8; 4];
        d.read_exact(&mut b).await.unwrap();
        assert_eq!(&b, b"ping");
    }
    assert_eq!(proxy.admin("POST", "/api/gateways/a/undrain").await.0, 200);
    let after = join_all((0..4).map(|_| device(proxy.addr))).await;
    assert_eq!(proxy.counts(), vec![6, 6], "undrained: it catches up");
    assert_eq!(proxy.admin("POST", "/api/gateways/nope/drain").await.0, 404);
    drop((first, later, after));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_gateways_readiness_and_metrics() {
    let backend = Backend::spawn().await;
    let proxy = start(config(vec![backend.gateway("gw")])).await;
    let d = device(proxy.addr).await;
    assert_eq!(proxy.admin("GET", "/healthz").await.0, 200);
    assert_eq!(proxy.admin("GET", "/readyz").await.0, 200);
    // The gateway's own count arrives with the next http probe.
    let gw = proxy.gateway("gw");
    until(
        Duration::from_secs(2),
        "a probe reporting 1 session",
        || gw.reported_sessions() == Some(1),
    )
    .await;
    let (status, body) = proxy.admin("GET", "/api/gateways").await;
    assert_eq!(status, 200);
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["name"], "gw");
    assert_eq!(list[0]["sessions"], 1);
    assert_eq!(list[0]["healthy"], true);
    assert_eq!(list[0]["reported_sessions"], 1);
    assert_eq!(
        proxy
            .gauge("wasmbed_proxy_gateway_sessions{gateway=\"gw\"}")
            .await,
        1.0
    );
    let (_, text) = proxy.admin("GET", "/metrics").await;
    for family in [
        "wasmbed_proxy_connections_accepted_total",
        "wasmbed_proxy_handshake_duration_seconds_bucket",
        "wasmbed_proxy_connect_duration_seconds_bucket",
        "# HELP wasmbed_proxy_gateway_up",
    ] {
        assert!(text.contains(family), "{family} missing from /metrics");
    }
    backend.stall(true);
    until(Duration::from_secs(2), "gateway down", || !gw.is_healthy()).await;
    assert_eq!(proxy.admin("GET", "/readyz").await.0, 503);
    drop(d);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_added_under_load_takes_the_new_sessions() {
    let backends = join_all((0..3).map(|_| Backend::spawn())).await;
    let proxy = start(config(vec![
        backends[0].gateway("a"),
        backends[1].gateway("b"),
    ]))
    .await;
    let old = join_all((0..20).map(|_| device(proxy.addr))).await;
    let body = format!(
        r#"{{"name":"c","address":"{}","health_address":"{}"}}"#,
        backends[2].addr, backends[2].health_addr
    );
    let (status, text) = proxy.admin_post("/api/gateways", &body).await;
    assert_eq!(status, 201, "{text}");
    assert_eq!(
        proxy.admin_post("/api/gateways", &body).await.0,
        409,
        "names are unique"
    );
    // Validated as the config file's gateways are: a bad address, a name the file would
    // refuse, a weight out of range; each answered 400 naming the field.
    for (body, field) in [
        (r#"{"name":"d","address":"nowhere"}"#, "gateway.addr"),
        (r#"{"name":"a b","address":"127.0.0.1:1"}"#, "gateway.name"),
        (
            r#"{"name":"d","address":"127.0.0.1:1","weight":0}"#,
            "gateway.weight",
        ),
    ] {
        let (bad, text) = proxy.admin_post("/api/gateways", body).await;
        assert_eq!(bad, 400, "{body}: {text}");
        assert!(text.contains(field), "{body}: {text}");
    }
    let new = join_all((0..10).map(|_| device(proxy.addr))).await;
    assert_eq!(
        backends[2].live(),
        10,
        "every new session went to the new gateway"
    );
    assert_eq!(proxy.counts(), vec![10, 10, 10]);
    // It is probed like the others.
    let c = proxy.gateway("c");
    until(
        Duration::from_secs(2),
        "a probe of the added gateway",
        || c.reported_sessions() == Some(10),
    )
    .await;
    drop((old, new));
}

/// Errors seen by sessions bring the next probe forward (HAProxy's `observe layer4` +
/// `on-error fastinter`): a gateway whose sessions are reset is probed a quarter interval
/// after its last probe, not a whole interval.
#[tokio::test]
async fn a_reset_on_the_gateway_side_brings_the_next_probe_forward() {
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("gw")]);
    c.health.interval = Duration::from_secs(20);
    c.health.timeout = Duration::from_millis(500);
    c.health.fall = 1;
    let proxy = start(c).await;
    let gw = proxy.gateway("gw");
    until(Duration::from_secs(2), "the first probe", || {
        backend.probes.load(Ordering::SeqCst) >= 1
    })
    .await;
    let _device = device(proxy.addr).await;
    backend.kill(); // resets its connections, closes its listeners
    // Without the hint the next probe comes 18-20 s after the first; with it, 5 s after:
    // `until` fails the test if the gateway is not down within 12 s.
    until(Duration::from_secs(12), "the gateway marked down", || {
        !gw.is_healthy()
    })
    .await;
}

/// A change a web page makes the operator's browser send (another origin, or a rebound name
/// on a loopback endpoint open to changes) is refused, as on the gateway's endpoint (one
/// check: `wasmbed_admin::from_a_web_page`); a tool's is taken.
#[tokio::test]
async fn a_change_a_web_page_sends_is_refused() {
    use wasmbed_testkit::http_from_a_page;
    let backend = Backend::spawn().await;
    let proxy = start(config(vec![backend.gateway("gw")])).await;
    let drain = ("POST", "/api/gateways/gw/drain");
    let host = format!("127.0.0.1:{}", proxy.admin.port());
    let cross = [("Sec-Fetch-Site", "cross-site")];
    assert_eq!(
        http_from_a_page(proxy.admin, drain, &host, &cross).await,
        403
    );
    let rebound = format!("evil.example:{}", proxy.admin.port());
    assert_eq!(
        http_from_a_page(proxy.admin, drain, &rebound, &[]).await,
        403
    );
    assert!(!proxy.gateway("gw").is_draining());
    assert_eq!(http_from_a_page(proxy.admin, drain, &host, &[]).await, 200);
    assert!(proxy.gateway("gw").is_draining());
}

/// A locked admin API on the proxy: drain and POST /api/gateways need the token; reads stay
/// open; an oversized body is 413.
#[tokio::test]
async fn proxy_mutations_need_the_admin_token() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = "another-long-admin-token";
    std::fs::write(&token_file, token).unwrap();
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("a")]);
    c.admin_auth = wasmbed_config::admin::AdminAuth::load(Some(&token_file), c.admin).unwrap();
    let proxy = start(c).await;
    assert_eq!(proxy.admin("GET", "/api/gateways").await.0, 200);
    assert_eq!(proxy.admin("POST", "/api/gateways/a/drain").await.0, 401);
    assert!(
        !proxy.gateway("a").is_draining(),
        "a refused request changes nothing"
    );
    assert_eq!(proxy.admin("POST", "/api/shutdown").await.0, 401);
    assert_eq!(proxy.admin("GET", "/readyz").await.0, 200, "still serving");
    let (status, _) = wasmbed_testkit::http_auth(
        proxy.admin,
        "POST",
        "/api/gateways/a/drain",
        b"",
        "x-wrong-token-xxxxxx",
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) =
        wasmbed_testkit::http_auth(proxy.admin, "POST", "/api/gateways/a/drain", b"", token).await;
    assert_eq!(status, 200);
    assert!(proxy.gateway("a").is_draining());
    let big = format!("{{\"name\":\"{}\"}}", "x".repeat(70_000));
    let (status, _) =
        wasmbed_testkit::http_auth(proxy.admin, "POST", "/api/gateways", big.as_bytes(), token)
            .await;
    assert_eq!(status, 413);
    for (status, n) in [("401", 2.0), ("403", 1.0), ("413", 1.0)] {
        let series = format!("wasmbed_proxy_admin_refused_total{{status=\"{status}\"}}");
        assert_eq!(proxy.metric(&series).await, n, "{series}");
    }
}

/// A probe that times out while the gateway's sessions read frames from it says the host is
/// busy, not that the gateway is down: no verdict. Once the sessions fall silent, the same
/// timeouts mark it down (a hung gateway is still found).
#[tokio::test]
async fn a_probe_timeout_while_sessions_hear_from_the_gateway_is_no_verdict() {
    use support::frames::*;
    let pki = pki(wasmbed_certs::pki::KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("busy").await;
    // Its health endpoint: a stand-in, stalled once the session runs (every probe then
    // times out).
    let health = Backend::spawn().await;
    let mut g = gw.gateway();
    g.health_addr = Some(health.health_addr.to_string());
    let mut c = config(vec![g]);
    c.mode = wasmbed_config::Mode::Terminate;
    c.tls = Some(pki.tls.clone());
    let proxy = start(c).await;
    let tls = tls_connect(
        proxy.addr,
        device_tls(&pki.ca, Some(&pki.ca), "device-0001", false),
    )
    .await
    .unwrap();
    let mut device = wasmbed_testkit::Device::new(tls);
    device.open("device-0001", "counter").await;
    let busy = proxy.gateway("busy");
    let failures = "wasmbed_proxy_health_probe_failures_total{gateway=\"busy\"}";
    let before = proxy.metric(failures).await;
    health.stall(true);
    // Closed loop: each DATA waits for its REPLY, until four probes (two `fall`s) timed out.
    while proxy.metric(failures).await < before + 4.0 {
        let f = device.data(b"tick").await;
        assert_eq!(f.kind, wasmbed_protocol::Kind::Reply);
        assert!(
            busy.is_healthy(),
            "marked down while its sessions hear from it"
        );
    }
    // Silence: the timeouts count again.
    until(
        Duration::from_secs(5),
        "the silent gateway marked down",
        || !busy.is_healthy(),
    )
    .await;
}

/// A gateway takes no session before its first passed probe, however it was added: a proxy
/// whose only gateway is dead is not ready from its first moment, and a dead gateway added
/// through the admin API is answered `awaiting_probe` and gets no connects; a live one added
/// the same way is probed before the answer and takes sessions at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_takes_nothing_before_its_first_passed_probe() {
    let dead = || wasmbed_config::GatewayConfig {
        name: "dead".into(),
        addr: "127.0.0.1:1".into(),
        health_addr: None,
        weight: 1,
        pool: "default".into(),
    };
    let mut c = config(vec![dead()]);
    c.health.check = wasmbed_config::HealthCheck::Tcp;
    let proxy = start(c).await;
    let (status, body) = proxy.admin("GET", "/readyz").await;
    assert_eq!(status, 503, "ready with nothing reachable: {body}");
    let g = proxy.gateway("dead");
    assert!(
        !g.is_healthy() && g.is_unproven(),
        "never probed yet counted as healthy"
    );
    let (_, list) = proxy.admin("GET", "/api/gateways").await;
    assert!(list.contains(r#""awaiting_probe":true"#), "{list}");
    drop(proxy);

    // Added at run time: a live one, then a dead one.
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("live")]);
    c.health.check = wasmbed_config::HealthCheck::Tcp;
    let proxy = start(c).await;
    assert_eq!(proxy.admin("GET", "/readyz").await.0, 200);
    let body = r#"{"name":"added-dead","address":"127.0.0.1:1"}"#;
    let (status, text) = proxy.admin_post("/api/gateways", body).await;
    assert_eq!(status, 201, "{text}");
    assert!(text.contains(r#""healthy":false"#), "{text}");
    assert!(text.contains(r#""awaiting_probe":true"#), "{text}");
    let failures = "wasmbed_proxy_gateway_connect_failures_total{gateway=\"added-dead\"}";
    let _devices = join_all((0..4).map(|_| device(proxy.addr))).await;
    assert_eq!(proxy.gateway("added-dead").sessions(), 0);
    assert_eq!(proxy.metric(failures).await, 0.0, "connects went to it");
    let other = Backend::spawn().await;
    let body = format!(r#"{{"name":"added-live","address":"{}"}}"#, other.addr);
    let (status, text) = proxy.admin_post("/api/gateways", &body).await;
    assert_eq!(status, 201, "{text}");
    assert!(
        text.contains(r#""healthy":true"#),
        "probed before the answer: {text}"
    );
    let _more = device(proxy.addr).await;
    assert_eq!(
        proxy.gateway("added-live").sessions(),
        1,
        "the least loaded"
    );
}

/// A data plane so busy that its one worker runs nothing else for 1.5 s (15 probe intervals,
/// each probe with a 90 ms timeout): the health probes and the admin endpoint run on the
/// control thread, so the probes go on being answered, the gateway is never marked down, and
/// an operator's request is answered during the stall.
#[tokio::test(flavor = "current_thread")]
async fn probes_and_the_admin_endpoint_keep_running_while_the_data_plane_is_stalled() {
    // The gateway stand-in on a runtime of its own: the stall below must not stop it.
    let side = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let backend = side.block_on_in_thread(Backend::spawn());
    let mut c = config(vec![backend.gateway("busy")]);
    // Only the probes reach the stand-in (its every answer would end a liveness watch).
    c.health.watch = false;
    let proxy = start(c).await;
    let gw = proxy.gateway("busy");
    // Up, with the probe loop running (the first probe is `bind`'s), and the admin endpoint.
    let probes = backend.probes.clone();
    until(Duration::from_secs(3), "the gateway up, probed", || {
        gw.is_healthy() && probes.load(Ordering::SeqCst) >= 3
    })
    .await;
    assert_eq!(proxy.admin("GET", "/healthz").await.0, 200);
    let admin = proxy.admin;
    // An operator asks for /metrics while the data plane is stalled; and the probes are
    // counted over the stall.
    let during = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let before = probes.load(Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(300));
        let mut s = std::net::TcpStream::connect(admin).unwrap();
        s.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        s.write_all(b"GET /healthz HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = String::new();
        let answered = s.read_to_string(&mut answer).map(|_| answer);
        std::thread::sleep(Duration::from_millis(300));
        (answered, probes.load(Ordering::SeqCst) - before)
    });
    // The stall: the proxy's only worker thread blocked (no task of its runtime runs).
    std::thread::sleep(Duration::from_millis(1500));
    let (answered, probed) = during.join().unwrap();
    assert!(
        answered
            .as_ref()
            .is_ok_and(|a| a.starts_with("HTTP/1.0 200")),
        "the admin endpoint did not answer while the data plane was stalled: {answered:?} (probes {probed})"
    );
    assert!(
        probed >= 4,
        "{probed} probes answered during the stall (interval 100 ms)"
    );
    assert!(gw.is_healthy());
    let down = "wasmbed_proxy_gateway_transitions_total{gateway=\"busy\",to=\"down\"}";
    assert_eq!(
        proxy.metric(down).await,
        0.0,
        "a busy proxy called its gateway down"
    );
    drop(proxy);
    side.shutdown_background();
}

/// `block_on` from inside another runtime's task: on a thread of its own.
trait BlockOnInThread {
    fn block_on_in_thread<F: std::future::Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send;
}

impl BlockOnInThread for tokio::runtime::Runtime {
    fn block_on_in_thread<F: std::future::Future + Send>(&self, f: F) -> F::Output
    where
        F::Output: Send,
    {
        std::thread::scope(|s| s.spawn(|| self.block_on(f)).join().unwrap())
    }
}
