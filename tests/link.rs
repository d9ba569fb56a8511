//! `--upstream link` end to end with the real binary: a gateway killed (SIGKILL) under
//! devices whose sessions ride its link; they move with their state, no device notices.

mod support;

use std::net::SocketAddr;
use std::process::Command;

use support::*;
use wasmbed_protocol::{Frame, Kind};

fn count(f: &Frame) -> u64 {
    assert_eq!(f.kind, Kind::Reply, "{f:?}");
    u64::from_le_bytes(f.body[..8].try_into().unwrap())
}

/// Two gateways serving links (TLS, the fleet's key ring) and a terminating proxy reaching
/// them by links, with `extra` proxy arguments; the PKI in `pki`.
fn stack(
    pki: &std::path::Path,
    extra: &[&str],
) -> (Vec<(Killed, SocketAddr, SocketAddr)>, ProxyProcess) {
    stack_probing(pki, "200ms", extra)
}

/// The same, with health probes every `interval`.
fn stack_probing(
    pki: &std::path::Path,
    interval: &str,
    extra: &[&str],
) -> (Vec<(Killed, SocketAddr, SocketAddr)>, ProxyProcess) {
    certs_init(pki, &["--devices", "4", "--gateways", "2"]);
    let d = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let (gateways, spec) = tls_gateways(pki, &["--proxy-identity", "wasmbed-proxy", "--link"]);
    let mut args = terminate_args(pki);
    args.extend(
        [
            "--upstream",
            "link",
            "--upstream-ca",
            &d("ca.pem"),
            "--upstream-cert",
            &d("proxy-client.pem"),
            "--upstream-key",
            &d("proxy-client.key"),
            "--health",
            "http",
            "--health-path",
            "/readyz",
            "--health-interval",
            interval,
            "--gateway",
            &spec,
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (gateways, ProxyProcess::start(&[], &args))
}

/// The PKI's four devices through `proxy`, each with its `counter` session open and counted
/// once.
async fn four_counting(
    pki: &std::path::Path,
    proxy: &ProxyProcess,
) -> Vec<wasmbed_testkit::Device<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>> {
    let mut devices = Vec::new();
    for i in 0..4 {
        let id = format!("device-000{i}");
        let mut dev = tls_device(proxy.listen, device_of(pki, &id)).await;
        dev.open(&id, "counter").await;
        assert_eq!(count(&dev.data(b"\x01").await), 1);
        devices.push(dev);
    }
    devices
}

/// `series` on the `/metrics` page of the gateway whose admin endpoint is `admin`.
fn gateway_metric(admin: &SocketAddr, series: &str) -> f64 {
    let answer = Admin::new(*admin).get("/metrics").unwrap();
    Metrics::parse(&answer.body).series(series)
}

#[tokio::test]
async fn a_killed_gateways_link_sessions_move_with_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    let (mut gateways, proxy) = stack(pki, &[]);
    let mut devices = four_counting(pki, &proxy).await;
    for n in 2..=3 {
        for dev in devices.iter_mut() {
            assert_eq!(count(&dev.data(b"\x01").await), n);
        }
    }
    // A link to each gateway from each session worker that has sessions there (one per
    // gateway with one thread): the gateways count them.
    let open = |admin: &SocketAddr| gateway_metric(admin, "wasmbed_gateway_links_open");
    let (to_killed, to_other) = (open(&gateways[0].2), open(&gateways[1].2));
    assert!(
        to_killed >= 1.0 && to_other >= 1.0,
        "{to_killed}, {to_other}"
    );
    assert_eq!(
        proxy.metric("wasmbed_proxy_links_total{result=\"up\"}"),
        to_killed + to_other
    );
    // SIGKILL the first gateway: its links go silent, its port closed.
    let (mut killed, _, _) = gateways.remove(0);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    // Every device goes on counting on its session: those of gw-0 moved with their state.
    for dev in devices.iter_mut() {
        assert_eq!(count(&dev.data(b"\x01").await), 4);
    }
    let moved =
        proxy.metric("wasmbed_proxy_session_moves_total{cause=\"failover\",result=\"resumed\"}");
    assert!(
        moved >= 1.0,
        "sessions moved off the killed gateway: {moved}"
    );
    // A session may move (its gateway marked down) before its link's watch has counted the
    // link lost: nothing signals that count (bounded).
    let lost = || proxy.metric("wasmbed_proxy_links_total{result=\"lost\"}");
    let counted = "every link to the killed gateway counted";
    wasmbed_testkit::until(std::time::Duration::from_secs(10), counted, || {
        lost() >= to_killed
    })
    .await;
    assert_eq!(
        lost(),
        to_killed,
        "each link to the killed gateway lost, no other"
    );
}

/// A proxy that stops closes its links: each gateway counts them ended as closed, not timed
/// out. With session workers (`--threads 2`) each worker has links of its own, made by the
/// first of its sessions that needs one, their tasks on the worker; the stop closes every
/// link before it ends the workers.
#[tokio::test]
async fn a_stopped_proxy_closes_its_links_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    // A link the proxy did not close would end by timing out, after 30 s (the gateway's idle
    // bound, below the proxy's 60 s).
    let (gateways, mut proxy) = stack(
        pki,
        &[
            "--threads",
            "2",
            "--link-timeout",
            "60s",
            "--grace",
            "100ms",
        ],
    );
    // Summed over both gateways.
    let series = |series: &str| -> f64 {
        gateways
            .iter()
            .map(|(_, _, admin)| gateway_metric(admin, series))
            .sum()
    };
    let ends = "wasmbed_gateway_link_ends_total";
    let devices = four_counting(pki, &proxy).await;
    // Balanced over both gateways: a link to each from each worker with sessions there.
    let open = series("wasmbed_gateway_links_open");
    assert!(open >= 2.0, "{open} links");
    // Two sessions on each worker, as placed (ties stay, the other worker when it has
    // fewer): the links' own tasks there are not counted as sessions. A terminated session's
    // handshake task ends just after its session is up: nothing signals it (bounded).
    let on = |w: &str| proxy.metric(&format!("wasmbed_proxy_worker_sessions{{worker=\"{w}\"}}"));
    let settled_by = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while (on("0"), on("1")) != (2.0, 2.0) {
        assert!(
            std::time::Instant::now() < settled_by,
            "sessions by worker: {}, {}",
            on("0"),
            on("1")
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop(devices);
    proxy.signal(libc::SIGTERM);
    let stopped = std::time::Instant::now();
    let status = loop {
        if let Some(status) = proxy.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            stopped.elapsed() < std::time::Duration::from_secs(30),
            "the proxy did not stop"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(status.success(), "the proxy's exit: {status}");
    // Every link ends whatever the proxy did: bounded past the idle timeout.
    while series(ends) < open {
        assert!(
            stopped.elapsed() < std::time::Duration::from_secs(60),
            "links still open a minute after the proxy stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(
        series(&format!("{ends}{{cause=\"closed\"}}")),
        open,
        "each link closed by the proxy, none left to time out: {} timed out",
        series(&format!("{ends}{{cause=\"timeout\"}}"))
    );
    assert_eq!(series("wasmbed_gateway_links_open"), 0.0);
}

/// A killed gateway is found by its liveness watch (`/api/alive`, cut by its kernel), not
/// by its probes: with probes a minute apart, the sessions on its (silent) link still move
/// at once, and the proxy counts one detection.
#[tokio::test]
async fn a_killed_gateway_is_found_by_its_liveness_watch_not_its_probes() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    let (mut gateways, proxy) = stack_probing(pki, "60s", &[]);
    let mut devices = four_counting(pki, &proxy).await;
    let (mut killed, _, _) = gateways.remove(0);
    killed.0.kill().unwrap();
    killed.0.wait().unwrap();
    // The next DATA of every device is answered with its count going on: the sessions of
    // gw-0 moved. No probe ran meanwhile (the next is a minute away, or a quarter of it after
    // an error), so the watch found it.
    for dev in devices.iter_mut() {
        assert_eq!(count(&dev.data(b"\x01").await), 2);
    }
    // Recorded once the sessions are cut, which is what moved them: waited for (bounded).
    wasmbed_testkit::until(
        std::time::Duration::from_secs(5),
        "the gone detection counted",
        || proxy.metric("wasmbed_proxy_gateway_gone_detection_seconds_count") == 1.0,
    )
    .await;
    assert_eq!(
        proxy.metric("wasmbed_proxy_health_probe_failures_total{gateway=\"gw-0\"}"),
        0.0,
        "no probe failed: none ran"
    );
}

/// `wasmbed loadtest --transport quic --rebind-after`: the whole fleet moves to new UDP
/// sockets mid-run (every device's source port changes, as behind a NAT that rebinds); the
/// sessions go on: nothing lost, no reconnect, no app state restarted.
#[test]
fn a_quic_fleet_whose_addresses_change_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    let (_gateways, proxy) = stack(pki, &["--quic-listen", "127.0.0.1:0"]);
    let quic = proxy.quic.expect("the proxy's QUIC address");
    let json = pki.join("report.json");
    let out = Command::new(BIN)
        .args([
            "loadtest",
            "--transport",
            "quic",
            "--target",
            &quic.to_string(),
        ])
        .arg("--ca-dir")
        .arg(pki)
        .args(["--devices", "40", "--rate", "10", "--duration", "3s"])
        // Three sockets, each moved.
        .args(["--devices-per-socket", "16"])
        .args(["--app", "counter", "--rebind-after", "1500ms", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{said}\n{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["rebinds"], 3, "every socket moved: {report}");
    assert_eq!(report["connected"], 40, "{report}");
    assert_eq!(report["reconnects"], 0, "{report}");
    assert_eq!(report["state_resets"], 0, "{report}");
    let messages = &report["messages"];
    assert_eq!(messages["lost"], 0, "{report}");
    assert!(
        messages["answered"].as_u64().unwrap() >= 40 * 20,
        "{report}"
    );
}
