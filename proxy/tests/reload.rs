//! Config reload (`POST /api/reload`, SIGHUP): the difference is applied through the live
//! snapshot — gateways added, removed (drained), replaced, re-weighted, routes, health
//! settings, timeouts, the terminate-mode certificate — and a bad file changes nothing.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use support::frames::*;
use support::*;
use wasmbed_certs::pki::KeyKind;
use wasmbed_config::ProxyConfig;
use wasmbed_protocol::Kind;

/// The settings every file here shares (fast health checks, ports chosen by the OS).
/// Top-level keys go first in TOML; the tables (`LISTENER`, gateways...) after.
const COMMON: &str = "admin = \"127.0.0.1:0\"\ngrace = \"200ms\"\n";
const LISTENER: &str = "[[listener]]\naddr = \"127.0.0.1:0\"\n";

fn gateway_toml(name: &str, addr: impl std::fmt::Display, weight: u32, pool: &str) -> String {
    format!(
        "[[gateway]]\nname = \"{name}\"\naddr = \"{addr}\"\nweight = {weight}\npool = \"{pool}\"\n"
    )
}

/// Writes `text` as the config file and reads it back as the proxy would.
fn write(path: &Path, text: &str) -> ProxyConfig {
    std::fs::write(path, text).unwrap();
    ProxyConfig::from_toml(text).unwrap()
}

/// Starts a proxy on the file at `path`, reloading from it.
async fn on_file(path: &Path, text: &str) -> RunningProxy {
    let proxy = start(write(path, text)).await;
    let path: PathBuf = path.to_path_buf();
    proxy.live.set_source(Box::new(move || {
        let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
        ProxyConfig::from_toml(&text).map_err(|e| e.to_string())
    }));
    proxy
}

fn names(proxy: &RunningProxy) -> Vec<String> {
    let mut v: Vec<String> = proxy
        .gateways
        .snapshot()
        .iter()
        .map(|g| g.name.clone())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_reload_applies_every_kind_of_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let b: Vec<Backend> = futures_util::future::join_all((0..4).map(|_| Backend::spawn())).await;
    let before = format!(
        "{COMMON}connect_timeout = \"500ms\"\nmax_connections = 100\n{LISTENER}[health]\ninterval = \"100ms\"\ncheck = \"tcp\"\n{}{}",
        gateway_toml("gw-0", b[0].addr, 1, "default"),
        gateway_toml("gw-1", b[1].addr, 1, "default"),
    );
    let proxy = on_file(&file, &before).await;
    // Sessions are counted at the proxy: a backend's own count includes the TCP health
    // probes' connections (`check = "tcp"` connects to the data port), which made this test
    // read 2 where one session had landed whenever a probe was in flight.
    let sessions = |name: &str| proxy.gateway(name).sessions();
    // A session on gw-1, which the new file removes: in passthrough it stays until it ends.
    let mut on_gw1 = None;
    for _ in 0..2 {
        let s = device(proxy.addr).await;
        if sessions("gw-1") == 1 && on_gw1.is_none() {
            on_gw1 = Some(s);
        }
    }
    let mut on_gw1 = on_gw1.expect("one of two devices lands on gw-1");
    // gw-0 re-weighted, gw-1 removed, gw-2 added, gw-3 in a new pool behind a new route;
    // health, timeouts and a restart-only setting changed.
    let after = format!(
        "{COMMON}connect_timeout = \"1500ms\"\nhandshake_timeout = \"3s\"\nmax_connections = 200\n\
         {LISTENER}[health]\ninterval = \"250ms\"\ncheck = \"tcp\"\nfall = 5\n\
         [[route]]\nsni = \"b.example\"\npool = \"b\"\n{}{}{}",
        gateway_toml("gw-0", b[0].addr, 3, "default"),
        gateway_toml("gw-2", b[2].addr, 1, "default"),
        gateway_toml("gw-3", b[3].addr, 1, "b"),
    );
    write(&file, &after);
    let (status, body) = proxy.admin("POST", "/api/reload").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["added"], serde_json::json!(["gw-2", "gw-3"]));
    assert_eq!(report["removed"], serde_json::json!(["gw-1"]));
    assert_eq!(report["reweighted"], serde_json::json!(["gw-0"]));
    assert_eq!(report["health_restarted"], true);
    assert_eq!(
        report["restart_needed"],
        serde_json::json!(["max_connections"])
    );
    assert_eq!(names(&proxy), ["gw-0", "gw-2", "gw-3"]);
    assert_eq!(proxy.gateway("gw-0").weight(), 3);
    let ctx = proxy.live.context();
    assert_eq!(ctx.config.connect_timeout, Duration::from_millis(1500));
    assert_eq!(ctx.config.handshake_timeout, Duration::from_secs(3));
    assert_eq!(ctx.config.health.interval, Duration::from_millis(250));
    assert_eq!(ctx.config.health.fall, 5);
    assert_eq!(
        ctx.config.max_connections, 100,
        "restart-only: the running value stays"
    );
    // Added gateways take sessions once their first probe proves them up; until then the
    // route falls back to the default pool (the flake this test had under load).
    until(Duration::from_secs(5), "gw-2 and gw-3 proven up", || {
        proxy.gateway("gw-2").is_healthy() && proxy.gateway("gw-3").is_healthy()
    })
    .await;
    // The removed gateway's session is still served.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    on_gw1.write_all(b"still here").await.unwrap();
    let mut back = [0u8; 10];
    on_gw1.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"still here");
    // The new route: SNI b.example goes to pool b (gw-3).
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let hello = client_hello("b.example");
    s.write_all(&hello).await.unwrap();
    let mut echo = vec![0u8; hello.len()];
    s.read_exact(&mut echo).await.unwrap();
    assert_eq!(sessions("gw-3"), 1, "routed by the reloaded route");
    // New sessions follow the new weights: gw-0 (3) takes three of the next four.
    let mut held = Vec::new();
    for _ in 0..4 {
        held.push(device(proxy.addr).await);
    }
    assert_eq!((sessions("gw-0"), sessions("gw-2")), (3, 1));
    proxy
        .until_metric("wasmbed_proxy_config_reloads_total{result=\"ok\"}", 1.0)
        .await;
}

#[tokio::test]
async fn a_bad_file_keeps_the_running_config() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let b = Backend::spawn().await;
    let good = format!(
        "{COMMON}{LISTENER}{}",
        gateway_toml("gw-0", b.addr, 1, "default")
    );
    let proxy = on_file(&file, &good).await;
    // Half-written (SIGHUP arrived mid-write), a bad value, a file that removes every
    // gateway: each refused with one line, nothing changed.
    let half = &good[..good.len() - 12];
    let cases = [
        (half.to_string(), "expected"),
        (
            good.replace("grace = \"200ms\"", "grace = \"soon\""),
            "grace",
        ),
        (format!("{COMMON}{LISTENER}"), "--allow-empty"),
    ];
    for (i, (text, says)) in cases.iter().enumerate() {
        std::fs::write(&file, text).unwrap();
        let (status, body) = proxy.admin("POST", "/api/reload").await;
        assert_eq!(status, 400, "case {i}: {body}");
        assert!(body.contains(says), "case {i}: {body}");
        assert_eq!(body.trim_end().lines().count(), 1, "one line: {body}");
        assert_eq!(names(&proxy), ["gw-0"], "case {i}: the running set stays");
    }
    proxy
        .until_metric("wasmbed_proxy_config_reloads_total{result=\"error\"}", 3.0)
        .await;
    device(proxy.addr).await;
    // With allow_empty the same removal is taken.
    std::fs::write(&file, format!("allow_empty = true\n{COMMON}{LISTENER}")).unwrap();
    let (status, body) = proxy.admin("POST", "/api/reload").await;
    assert_eq!(status, 200, "{body}");
    assert!(names(&proxy).is_empty());
    let (status, _) = proxy.admin("GET", "/readyz").await;
    assert_eq!(status, 503, "no gateway: not ready");
}

/// The terminate-mode certificate is rotated by a reload: live sessions go on, new
/// handshakes see the new certificate.
#[tokio::test]
async fn certificate_rotation_keeps_live_sessions() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw").await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let tls_section = |cert: &Path, key: &Path| {
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
            cert.display(),
            key.display(),
            pki.ca_path.display()
        )
    };
    let text = |tls: String| {
        format!(
            "mode = \"terminate\"\n{COMMON}{LISTENER}{}{tls}",
            gateway_toml("gw", gw.addr, 1, "default")
        )
    };
    let proxy = on_file(&file, &text(tls_section(&pki.tls.cert, &pki.tls.key))).await;
    let connect = || {
        tls_connect(
            proxy.addr,
            device_tls(&pki.ca, Some(&pki.ca), "device-0001", false),
        )
    };
    let serial_seen = |tls: &TlsDevice| {
        let cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        wasmbed_certs::serial_of(&cert).unwrap()
    };
    let old = connect().await.unwrap();
    let old_serial = serial_seen(&old);
    let mut live = wasmbed_testkit::Device::new(old);
    live.open("device-0001", "counter").await;
    assert_eq!(live.data(b"1").await.kind, Kind::Reply);
    // A new certificate in new files.
    let rotated = pki
        .ca
        .issue_server(&["localhost", "127.0.0.1"], KeyKind::EcdsaP256)
        .unwrap();
    let (cert, key) = (dir.path().join("new.pem"), dir.path().join("new.key"));
    std::fs::write(&cert, &rotated.cert_pem).unwrap();
    std::fs::write(&key, &rotated.key_pem).unwrap();
    write(&file, &text(tls_section(&cert, &key)));
    // A key that does not exist is refused first: the old certificate stays in use.
    std::fs::write(
        &file,
        text(tls_section(&cert, &dir.path().join("missing.key"))),
    )
    .unwrap();
    let (status, body) = proxy.admin("POST", "/api/reload").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("tls.key"), "{body}");
    assert_eq!(serial_seen(&connect().await.unwrap()), old_serial);
    write(&file, &text(tls_section(&cert, &key)));
    let (status, body) = proxy.admin("POST", "/api/reload").await;
    assert_eq!(status, 200, "{body}");
    let new_serial = serial_seen(&connect().await.unwrap());
    assert_ne!(
        new_serial, old_serial,
        "new handshakes get the rotated certificate"
    );
    assert_eq!(
        live.data(b"2").await.kind,
        Kind::Reply,
        "the session opened before the rotation goes on"
    );
}

/// Run-time changes survive reloads: a gateway removed, one added and one drained through
/// the admin API stay so across `POST /api/reload` (and SIGHUP's path) while the file leaves
/// them alone; the answer says what it kept; once the file changes the removed gateway's
/// entry, the file wins and the answer says so.
#[tokio::test]
async fn a_reload_keeps_run_time_changes_until_the_file_changes_them() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let b: Vec<Backend> = futures_util::future::join_all((0..4).map(|_| Backend::spawn())).await;
    let text = |weight_b: u32| {
        format!(
            "{COMMON}{LISTENER}[health]\ncheck = \"none\"\n{}{}{}",
            gateway_toml("a", b[0].addr, 1, "default"),
            gateway_toml("b", b[1].addr, weight_b, "default"),
            gateway_toml("c", b[2].addr, 1, "default"),
        )
    };
    let proxy = on_file(&file, &text(1)).await;
    assert_eq!(proxy.admin("DELETE", "/api/gateways/b").await.0, 200);
    assert_eq!(proxy.admin_post("/api/gateways/c/drain", "").await.0, 200);
    let added = format!("{{\"name\":\"d\",\"address\":\"{}\"}}", b[3].addr);
    assert_eq!(proxy.admin_post("/api/gateways", &added).await.0, 201);

    let (status, body) = proxy.admin_post("/api/reload", "").await;
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(names(&proxy), ["a", "c", "d"], "{body}");
    assert!(
        proxy.gateway("c").is_draining(),
        "the drain was undone: {body}"
    );
    let kept = report["kept"].to_string();
    for said in [
        "b: removed at run time",
        "c: drained at run time",
        "d: added at run time",
    ] {
        assert!(kept.contains(said), "{said:?} not in {body}");
    }
    assert_eq!(report["overridden"], serde_json::json!([]), "{body}");
    // The removed gateway takes no session after the reload: every device lands elsewhere.
    for _ in 0..4 {
        let _s = device(proxy.addr).await;
    }
    assert_eq!(
        b[1].accepted(),
        0,
        "a removed gateway came back and took sessions"
    );

    // The file changes b's entry: the file wins.
    write(&file, &text(3));
    let (status, body) = proxy.admin_post("/api/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&proxy), ["a", "b", "c", "d"], "{body}");
    assert!(
        body.contains("b: removed at run time; the file changed it"),
        "{body}"
    );
}

/// The admin endpoint's client CA is never the devices' CA nor one that issues it: refused
/// at the start, and at a reload that would rotate the devices' CA to one the admin CA
/// issued (an organisation's root as the admin CA over the devices' new intermediate, whose
/// every device certificate would then chain to it): the reload is refused whole and the
/// devices' trust in use stays.
#[tokio::test]
async fn a_reload_cannot_put_the_devices_under_the_admin_ca() {
    let pki = pki(KeyKind::EcdsaP256);
    let gw = FrameGateway::spawn("gw").await;
    let dir = tempfile::tempdir().unwrap();
    let put = |name: &str, body: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        p
    };
    let root = wasmbed_certs::pki::DevCa::generate("organisation root").unwrap();
    let admin_ca = put("admin-ca.pem", &root.cert_pem());
    let admin = pki
        .ca
        .issue_server(&["localhost", "127.0.0.1"], KeyKind::EcdsaP256)
        .unwrap();
    let (admin_cert, admin_key) = (
        put("admin.pem", &admin.cert_pem),
        put("admin.key", &admin.key_pem),
    );
    let text = |client_ca: &Path| {
        format!(
            "mode = \"terminate\"\n{COMMON}admin_tls_cert = \"{}\"\nadmin_tls_key = \"{}\"\n\
             admin_client_ca = \"{}\"\n{LISTENER}{}[tls]\ncert = \"{}\"\nkey = \"{}\"\n\
             client_ca = \"{}\"\n",
            admin_cert.display(),
            admin_key.display(),
            admin_ca.display(),
            gateway_toml("gw", gw.addr, 1, "default"),
            pki.tls.cert.display(),
            pki.tls.key.display(),
            client_ca.display()
        )
    };
    let file = dir.path().join("proxy.toml");
    let proxy = on_file(&file, &text(&pki.ca_path)).await;
    let welcomed = |device: &'static str, trust: Arc<rustls::ClientConfig>| {
        let addr = proxy.addr;
        async move {
            let mut d = wasmbed_testkit::Device::new(tls_connect(addr, trust).await.ok()?);
            d.send_raw(&hello_of(device)).await.ok()?;
            d.recv().await.map(|f| f.kind)
        }
    };
    let device = device_tls(&pki.ca, Some(&pki.ca), "device-0001", false);
    assert_eq!(
        welcomed("device-0001", device.clone()).await,
        Some(Kind::Welcome)
    );
    // The devices' CA rotated to an intermediate of the admin CA's root.
    let intermediate = root.issue_intermediate("devices, 2027").unwrap();
    let rotated = put("devices-2027.pem", &intermediate.cert_pem());
    write(&file, &text(&rotated));
    let e = proxy.live.reload().expect_err("refused");
    assert!(e.to_string().contains("act as admin"), "{e}");
    // The admin CA held apart is the one read at the start: its file gone since, a reload
    // of the devices' trust as it was goes through.
    std::fs::remove_file(&admin_ca).unwrap();
    write(&file, &text(&pki.ca_path));
    proxy
        .live
        .reload()
        .expect("reloaded without the admin CA's file");
    write(&file, &text(&rotated));
    let e = proxy.live.reload().expect_err("refused still");
    assert!(e.to_string().contains("act as admin"), "{e}");
    // The devices' trust in use stays: the old CA's devices get through, the new one's not.
    assert_eq!(welcomed("device-0001", device).await, Some(Kind::Welcome));
    let newcomer = device_tls(&pki.ca, Some(&intermediate), "device-0002", false);
    assert_ne!(welcomed("device-0002", newcomer).await, Some(Kind::Welcome));
}

/// `slow_start` is applied by a reload: a gateway added after the reload that set it ramps
/// in (at a tenth of its weight at first), where before the reload it would have taken its
/// full share at once.
#[tokio::test]
async fn a_reload_applies_slow_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let b: Vec<Backend> = futures_util::future::join_all((0..2).map(|_| Backend::spawn())).await;
    let text = |slow_start: &str| {
        format!(
            "{COMMON}slow_start = \"{slow_start}\"\n{LISTENER}[health]\ncheck = \"none\"\n{}",
            gateway_toml("a", b[0].addr, 1, "default"),
        )
    };
    let proxy = on_file(&file, &text("0s")).await;
    write(&file, &text("1h"));
    let (status, body) = proxy.admin_post("/api/reload", "").await;
    assert_eq!(status, 200, "{body}");
    let added = format!("{{\"name\":\"late\",\"address\":\"{}\"}}", b[1].addr);
    assert_eq!(proxy.admin_post("/api/gateways", &added).await.0, 201);
    let leases: Vec<_> = (0..110)
        .map(|_| proxy.gateways.acquire("default", &[]).expect("a gateway"))
        .collect();
    let late = leases.iter().filter(|l| l.gateway().name == "late").count();
    // At a tenth of its weight it takes about a tenth of the other's count (without slow
    // start, half of them).
    assert!(
        (5..=15).contains(&late),
        "the late gateway took {late} of 110"
    );
}

/// A gateway added at run time is kept across reloads, so a reload holds it to the new
/// health check as it holds the file's: turning `http` checks on while it has no health
/// address is refused (naming it), instead of its being probed on its data port and marked
/// down.
#[tokio::test]
async fn a_reload_to_http_checks_is_refused_for_a_run_time_gateway_without_a_health_address() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let b: Vec<Backend> = futures_util::future::join_all((0..2).map(|_| Backend::spawn())).await;
    let text = |check: &str| {
        format!(
            "{COMMON}{LISTENER}[health]\ncheck = \"{check}\"\n{}health_addr = \"{}\"\n",
            gateway_toml("a", b[0].addr, 1, "default"),
            b[0].addr
        )
    };
    let proxy = on_file(&file, &text("none")).await;
    let added = format!("{{\"name\":\"d\",\"address\":\"{}\"}}", b[1].addr);
    assert_eq!(proxy.admin_post("/api/gateways", &added).await.0, 201);
    write(&file, &text("http"));
    let (status, body) = proxy.admin_post("/api/reload", "").await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("\"d\""), "{body}");
    assert!(proxy.gateway("d").is_healthy(), "d still takes sessions");
    // A reload that keeps it valid is taken.
    write(&file, &text("auto"));
    let (status, body) = proxy.admin_post("/api/reload", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(names(&proxy), ["a", "d"]);
}

/// A reload that turns the health checks off takes every gateway on trust, as a start
/// without checks does: one down (or not proven yet) when it came would stay down for good,
/// with no prober left to bring it up.
#[tokio::test]
async fn a_reload_that_turns_the_checks_off_takes_a_down_gateway_on_trust() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let up = Backend::spawn().await;
    // A port nothing listens on (its listener closed): gw-down fails every probe.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let gateways = format!(
        "{}{}",
        gateway_toml("gw-up", up.addr, 1, "default"),
        gateway_toml("gw-down", dead_addr, 1, "default"),
    );
    let probed =
        format!("{COMMON}{LISTENER}[health]\ninterval = \"50ms\"\ncheck = \"tcp\"\n{gateways}");
    let proxy = on_file(&file, &probed).await;
    until(Duration::from_secs(5), "gw-down found down", || {
        !proxy.gateway("gw-down").is_healthy()
    })
    .await;
    write(
        &file,
        &format!("{COMMON}{LISTENER}[health]\ncheck = \"none\"\n{gateways}"),
    );
    let (status, body) = proxy.admin("POST", "/api/reload").await;
    assert_eq!(status, 200, "{body}");
    let g = proxy.gateway("gw-down");
    assert!(g.is_healthy() && !g.is_unproven(), "taken on trust");
    assert_eq!(proxy.admin("GET", "/readyz").await.0, 200);
}

/// A gateway added through the API while a reload restarts the probes gets one prober, of
/// the check in use: the add (checked, added, probed) and the reload exclude each other. In
/// two steps, a reload during the add's first probe restarted the probes with the new
/// gateway among them, and the add then started a second prober.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_added_during_a_reload_gets_one_prober() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let b0 = Backend::spawn().await;
    let text = |interval: &str| {
        format!(
            "{COMMON}{LISTENER}[health]\ncheck = \"http\"\ninterval = \"{interval}\"\n\
             timeout = \"500ms\"\nwatch = false\n{}health_addr = \"{}\"\n",
            gateway_toml("gw-0", b0.addr, 1, "default"),
            b0.health_addr,
        )
    };
    let proxy = Arc::new(on_file(&file, &text("600ms")).await);
    // The new gateway's health endpoint holds every probe unanswered: the add's first probe
    // waits its 500 ms, a window for the reload.
    let b1 = Backend::spawn().await;
    b1.stall(true);
    let body = format!(
        r#"{{"name":"c","address":"{}","health_address":"{}"}}"#,
        b1.addr, b1.health_addr
    );
    let adding = {
        let proxy = proxy.clone();
        tokio::spawn(async move { proxy.admin_post("/api/gateways", &body).await })
    };
    until(Duration::from_secs(5), "the add's first probe held", || {
        b1.held.load(std::sync::atomic::Ordering::SeqCst) >= 1
    })
    .await;
    // The reload halfway through that probe: a second prober, started as it ends, would
    // overlap the reload's by about as long at every probe (a reload just after the probe
    // began would overlap it by only a few milliseconds, which sampling could miss).
    tokio::time::sleep(Duration::from_millis(250)).await;
    write(&file, &text("700ms"));
    let (status, report) = proxy.admin("POST", "/api/reload").await;
    assert_eq!(status, 200, "{report}");
    assert!(report.contains("\"health_restarted\":true"), "{report}");
    let (status, added) = adding.await.unwrap();
    assert_eq!(status, 201, "{added}");
    // The add's own probe gave up at its timeout: its connection's close reaches the backend
    // a moment later.
    until(Duration::from_secs(5), "the add's probe let go", || {
        b1.holding.load(std::sync::atomic::Ordering::SeqCst) <= 1
    })
    .await;
    // From now on one prober probes it: one probe held at a time. (A second, started as the
    // add's first probe ended, would hold its first while the reload's prober, started
    // later than that probe, still holds its own.)
    let (mut most, until_at) = (0, tokio::time::Instant::now() + Duration::from_millis(1600));
    while tokio::time::Instant::now() < until_at {
        most = most.max(b1.holding.load(std::sync::atomic::Ordering::SeqCst));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(most, 1, "probers of the added gateway");
}
