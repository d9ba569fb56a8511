//! The gateway's admin API: app upload and replacement, health, drain.

mod support;

use support::*;
use wasmbed_protocol::{ErrorCode, Frame, Goaway, Kind};

const ECHO: &[u8] = include_bytes!("../../apps/echo.wat");
const COUNTER: &[u8] = include_bytes!("../../apps/counter.wat");

/// Held by the tests that count admin refusals: the metrics are the process's (counted from a
/// reading at the start), and two such tests at once would count each other's.
static REFUSALS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test]
async fn apps_are_uploaded_replaced_and_deleted() {
    let gw = start(settings(None)).await;
    let (status, body) = http(gw.admin, "PUT", "/api/apps/mine", ECHO).await;
    assert_eq!(status, 201, "{body}");
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "mine").await;
    assert_eq!(d.data(b"v1").await.body, b"v1");

    // Replaced: new sessions get the new module; the live one keeps its instance.
    assert_eq!(
        http(gw.admin, "PUT", "/api/apps/mine", COUNTER).await.0,
        200
    );
    let mut e = tcp_device(gw.addr).await;
    e.open("device-2", "mine").await;
    assert_eq!(
        e.data(b"\x05").await.body.len(),
        16,
        "the counter answers 16 bytes"
    );
    assert_eq!(d.data(b"still v1").await.body, b"still v1");

    let (_, list) = http(gw.admin, "GET", "/api/apps", b"").await;
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert!(list.as_array().unwrap().iter().any(|a| a["name"] == "mine"));

    assert_eq!(http(gw.admin, "DELETE", "/api/apps/mine", b"").await.0, 204);
    assert_eq!(http(gw.admin, "DELETE", "/api/apps/mine", b"").await.0, 404);
    let mut f = tcp_device(gw.addr).await;
    assert_eq!(
        error_code(&f.hello("device-3", "mine").await),
        ErrorCode::UnknownApp as u16
    );
}

#[tokio::test]
async fn bad_uploads_are_refused_naming_the_problem() {
    let gw = start(settings(None)).await;
    let cases: [(&str, &[u8], &str); 3] = [
        ("junk", b"not wasm at all", "not valid WebAssembly"),
        (
            "noabi",
            b"(module (memory (export \"memory\") 1))",
            "missing export alloc",
        ),
        ("bad..name", ECHO, "invalid app name"),
    ];
    for (name, bytes, want) in cases {
        let (status, body) = http(gw.admin, "PUT", &format!("/api/apps/{name}"), bytes).await;
        assert_eq!(status, 400, "{name}: {body}");
        assert!(body.contains(want), "{name}: {body}");
    }
    let (_, metrics) = http(gw.admin, "GET", "/metrics", b"").await;
    assert!(
        metrics.contains("wasmbed_gateway_app_uploads_total{result=\"refused\"} 3"),
        "{metrics}"
    );
    // The existing apps are untouched.
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "echo").await;
}

#[tokio::test]
async fn healthz_reports_sessions_and_drain_sends_goaway() {
    let gw = start(settings(None)).await;
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "echo").await;
    let (status, body) = http(gw.admin, "GET", "/healthz", b"").await;
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((status, health["sessions"].as_u64()), (200, Some(1)));
    assert_eq!(http(gw.admin, "GET", "/readyz", b"").await.0, 200);

    assert_eq!(http(gw.admin, "POST", "/api/drain", b"").await.0, 202);
    let f = d.recv().await.expect("GOAWAY");
    assert_eq!(f.kind, Kind::Goaway);
    assert_eq!(
        f.decode_body::<Goaway>("GOAWAY").unwrap().reason,
        "draining"
    );
    assert!(d.recv().await.is_none(), "closed after GOAWAY");
    assert_eq!(http(gw.admin, "GET", "/readyz", b"").await.0, 503);
    // No new sessions: the listener is closed.
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
    gw.shutdown.cancel();
    assert!(gw.task.await.unwrap().is_ok());
}

/// PROTOCOL.md: after GOAWAY the gateway answers what it has already received, then closes.
/// Two workers: the session's app calls do not yield, so on one thread the drain request would
/// wait for the whole burst.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_answers_every_data_already_received_before_closing() {
    let mut s = settings(None);
    // Each message is made to take milliseconds: on a loaded machine, far from the deadline.
    s.call_timeout = std::time::Duration::from_secs(5);
    let gw = start(s).await;
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "slow").await;
    // 40 DATA in one write; each takes the app several milliseconds.
    let mut burst = Vec::new();
    for seq in 1..=40u64 {
        Frame::new(Kind::Data, seq, seq.to_be_bytes().to_vec()).encode_into(&mut burst);
    }
    d.send_raw(&burst).await.unwrap();
    // The first REPLY shows the gateway has read the burst; then drain while the rest queue.
    let first = d.recv().await.expect("a REPLY");
    assert_eq!((first.kind, first.seq), (Kind::Reply, 1));
    assert_eq!(http(gw.admin, "POST", "/api/drain", b"").await.0, 202);
    let mut replies = vec![first.seq];
    let mut goaway_after = None;
    while let Some(f) = d.recv().await {
        match f.kind {
            Kind::Reply => {
                assert_eq!(f.body, f.seq.to_be_bytes());
                replies.push(f.seq);
            }
            Kind::Goaway => goaway_after = Some(replies.len()),
            other => panic!("unexpected {other:?}"),
        }
    }
    let goaway_after = goaway_after.expect("GOAWAY before the close");
    assert!(
        goaway_after < 40,
        "the drain came while DATA was still queued (else this test shows nothing): GOAWAY after {goaway_after}"
    );
    assert_eq!(
        replies,
        (1..=40).collect::<Vec<u64>>(),
        "every DATA answered, in order"
    );
}

#[tokio::test]
async fn past_max_sessions_a_device_gets_unavailable() {
    let mut s = settings(None);
    s.max_sessions = 2;
    let gw = start(s).await;
    let mut a = tcp_device(gw.addr).await;
    a.open("device-1", "echo").await;
    let mut b = tcp_device(gw.addr).await;
    b.open("device-2", "echo").await;
    let mut c = tcp_device(gw.addr).await;
    let f = c.recv().await.expect("ERROR before HELLO");
    assert_eq!(error_code(&f), ErrorCode::Unavailable as u16);
    assert!(c.recv().await.is_none(), "closed");
    // A place frees up when a session ends.
    drop(a);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while gw.shared.sessions.load(std::sync::atomic::Ordering::SeqCst) > 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the closed session ends"
        );
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let mut d = tcp_device(gw.addr).await;
    d.open("device-3", "echo").await;
    let metrics = http(gw.admin, "GET", "/metrics", b"").await.1;
    assert!(
        metrics.contains("wasmbed_gateway_errors_sent_total{code=\"unavailable\"} 1"),
        "{metrics}"
    );
    b.data(b"still here").await;
}

#[tokio::test]
async fn every_loaded_app_has_a_call_counter_and_a_deleted_one_none() {
    let gw = start(settings(None)).await;
    let calls = |text: &str, app: &str| {
        wasmbed_testkit::Metrics::parse(text)
            .sum("wasmbed_gateway_app_calls_total", &[("app", app)])
    };
    let has_series = |text: &str, app: &str| {
        text.contains(&format!("wasmbed_gateway_app_calls_total{{app=\"{app}\"}}"))
    };
    let text = http(gw.admin, "GET", "/metrics", b"").await.1;
    for app in ["echo", "counter", "push"] {
        assert!(has_series(&text, app), "{app} loaded by --apps: {text}");
    }
    let mut d = tcp_device(gw.addr).await;
    d.open("device-1", "echo").await;
    d.data(b"one").await;
    d.data(b"two").await;
    let text = http(gw.admin, "GET", "/metrics", b"").await.1;
    assert_eq!(calls(&text, "echo"), 2.0);
    // Replacing keeps the count; deleting removes the series.
    assert_eq!(http(gw.admin, "PUT", "/api/apps/echo", ECHO).await.0, 200);
    let text = http(gw.admin, "GET", "/metrics", b"").await.1;
    assert_eq!(calls(&text, "echo"), 2.0);
    assert_eq!(http(gw.admin, "DELETE", "/api/apps/echo", b"").await.0, 204);
    let text = http(gw.admin, "GET", "/metrics", b"").await.1;
    assert!(!has_series(&text, "echo"), "{text}");
    assert!(has_series(&text, "counter"));
}

/// A locked admin API: with a token file, uploads, deletes and drain need the token; reads
/// stay open; an upload over --max-app-size is 413; each refusal is counted.
#[tokio::test]
async fn mutations_need_the_admin_token_and_uploads_are_capped() {
    let _counting = REFUSALS.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    let token = "a-long-enough-admin-token";
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let mut s = settings(None);
    s.admin_auth = wasmbed_config::admin::AdminAuth::load(Some(&token_file), s.admin).unwrap();
    s.max_app_size = 4096;
    let gw = start(s).await;
    assert_eq!(http(gw.admin, "GET", "/api/apps", b"").await.0, 200);
    let (status, before) = http(gw.admin, "GET", "/metrics", b"").await;
    assert_eq!(status, 200);
    let before = wasmbed_testkit::Metrics::parse(&before);
    assert_eq!(http(gw.admin, "PUT", "/api/apps/e2", ECHO).await.0, 401);
    assert_eq!(
        wasmbed_testkit::http_auth(gw.admin, "PUT", "/api/apps/e2", ECHO, "wrong-token-0000000")
            .await
            .0,
        403
    );
    assert_eq!(http(gw.admin, "POST", "/api/drain", b"").await.0, 401);
    assert_eq!(
        wasmbed_testkit::http_auth(gw.admin, "PUT", "/api/apps/e2", ECHO, token)
            .await
            .0,
        201
    );
    let big = vec![b' '; 5000];
    assert_eq!(
        wasmbed_testkit::http_auth(gw.admin, "PUT", "/api/apps/big", &big, token)
            .await
            .0,
        413
    );
    let m = wasmbed_testkit::Metrics::parse(&http(gw.admin, "GET", "/metrics", b"").await.1);
    for (status, n) in [("401", 2.0), ("403", 1.0), ("413", 1.0)] {
        assert_eq!(
            m.sum("wasmbed_gateway_admin_refused_total", &[("status", status)])
                - before.sum("wasmbed_gateway_admin_refused_total", &[("status", status)]),
            n,
            "{status}"
        );
    }
    // No token and an admin endpoint off loopback: mutation refused to everyone.
    let mut s = settings(None);
    s.admin = Some("0.0.0.0:0".parse().unwrap());
    s.admin_auth = wasmbed_config::admin::AdminAuth::load(None, s.admin).unwrap();
    let gw = start(s).await;
    let admin = std::net::SocketAddr::from(([127, 0, 0, 1], gw.admin.port()));
    assert_eq!(http(admin, "GET", "/api/apps", b"").await.0, 200);
    assert_eq!(http(admin, "POST", "/api/drain", b"").await.0, 403);
}

/// A change a web page makes the operator's browser send (another origin, or a rebound name
/// on a loopback endpoint open to changes) is refused, as on the proxy's endpoint (one check:
/// `wasmbed_admin::from_a_web_page`); a tool's is taken.
#[tokio::test]
async fn a_change_a_web_page_sends_is_refused() {
    use wasmbed_testkit::http_from_a_page;
    let gw = start(settings(None)).await;
    let drain = ("POST", "/api/drain");
    let host = format!("127.0.0.1:{}", gw.admin.port());
    let evil = [("Origin", "http://evil.example")];
    assert_eq!(http_from_a_page(gw.admin, drain, &host, &evil).await, 403);
    let rebound = format!("evil.example:{}", gw.admin.port());
    assert_eq!(http_from_a_page(gw.admin, drain, &rebound, &[]).await, 403);
    let (_, health) = http(gw.admin, "GET", "/healthz", b"").await;
    assert!(health.contains("\"ok\""), "not drained: {health}");
    assert_eq!(http_from_a_page(gw.admin, drain, &host, &[]).await, 202);
}

/// The gateway's admin endpoint over HTTPS with an admin CA: an app upload needs the token
/// or an admin client certificate; reads need neither.
#[tokio::test]
async fn admin_changes_over_https_take_a_token_or_an_admin_certificate() {
    let _counting = REFUSALS.lock().await;
    use wasmbed_certs::pki::{DevCa, KeyKind};
    let pki = Pki::new();
    let admin_ca = DevCa::generate("admin CA").unwrap();
    std::fs::write(pki.path("admin-ca.pem"), admin_ca.cert_pem()).unwrap();
    std::fs::write(pki.path("token"), "a-gateway-admin-token-0000").unwrap();
    let mut s = settings(None);
    s.admin_auth =
        wasmbed_config::admin::AdminAuth::load(Some(&pki.path("token")), s.admin).unwrap();
    s.admin_auth.tls = Some(wasmbed_config::admin::AdminTls {
        cert: pki.path("gw.pem"),
        key: pki.path("gw.key"),
        client_ca: Some(pki.path("admin-ca.pem")),
    });
    let gw = start(s).await;
    let operator = admin_ca
        .issue_client("operator", KeyKind::EcdsaP256)
        .unwrap();
    let roots = [pki.ca.cert_der()];
    let with_cert =
        wasmbed_certs::client_config(&roots, Some((operator.chain(), operator.key().unwrap())))
            .unwrap();
    let without = wasmbed_certs::client_config(&roots, None).unwrap();
    let https = wasmbed_testkit::https;
    let get = https(gw.admin, without.clone(), ("GET", "/api/apps", b""), None);
    assert_eq!(get.await.0, 200);
    let put = https(gw.admin, without, ("PUT", "/api/apps/e3", ECHO), None);
    assert_eq!(put.await.0, 401);
    let put = https(gw.admin, with_cert, ("PUT", "/api/apps/e3", ECHO), None);
    assert_eq!(
        put.await.0,
        201,
        "the admin certificate stands in for the token"
    );
}

/// Opens `GET /api/alive` on `admin` and reads until the status line of the answer and its
/// first body line have arrived; returns the stream and what was read.
async fn alive_watch(admin: std::net::SocketAddr) -> (tokio::net::TcpStream, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /api/alive HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    while !(seen.windows(4).any(|w| w == b"\r\n\r\n")
        && (seen.starts_with(b"HTTP/1.1 503") || seen.windows(6).any(|w| w == b"status")))
    {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    (s, String::from_utf8_lossy(&seen).into_owned())
}

/// `/api/alive` answers at once with the gateway's status and holds the body open while the
/// process lives; a gateway that stops in order ends it cleanly (the last chunk), so a
/// proxy tells a stop from a crash. Open watches are bounded: past the cap, 503.
#[tokio::test]
async fn the_alive_watch_lasts_until_an_orderly_stop_and_is_bounded() {
    use tokio::io::AsyncReadExt;
    let gw = start(settings(None)).await;
    let (mut watch, head) = alive_watch(gw.admin).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("\"status\":\"ok\""), "{head}");
    let mut held = Vec::new();
    for _ in 1..wasmbed_gateway::admin::MAX_ALIVE_WATCHES {
        let (s, head) = alive_watch(gw.admin).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        held.push(s);
    }
    let (_, over) = alive_watch(gw.admin).await;
    assert!(over.starts_with("HTTP/1.1 503"), "past the cap: {over}");
    gw.shutdown.cancel();
    let mut rest = Vec::new();
    watch.read_to_end(&mut rest).await.unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.ends_with("0\r\n\r\n"), "a complete body: {rest:?}");
    gw.task.await.unwrap().unwrap();
}

/// The admin CA is held apart from the devices' CA at a TLS reload (SIGHUP's path) as at the
/// start: a device CA rotated to an intermediate of the admin CA (an organisation's root over
/// the devices' new CA) is refused, and the devices' trust in use stays.
#[tokio::test]
async fn a_tls_reload_cannot_put_the_devices_under_the_admin_ca() {
    use wasmbed_certs::pki::DevCa;
    let pki = Pki::new();
    let root = DevCa::generate("organisation root").unwrap();
    std::fs::write(pki.path("admin-ca.pem"), root.cert_pem()).unwrap();
    let mut s = settings(Some(&pki));
    s.admin_auth.tls = Some(wasmbed_config::admin::AdminTls {
        cert: pki.path("gw.pem"),
        key: pki.path("gw.key"),
        client_ca: Some(pki.path("admin-ca.pem")),
    });
    let gw = start(s).await;
    let intermediate = root.issue_intermediate("devices, 2027").unwrap();
    std::fs::write(pki.path("ca.pem"), intermediate.cert_pem()).unwrap();
    let e = gw.shared.reload_tls().expect_err("refused");
    assert!(e.to_string().contains("act as admin"), "{e}");
    // The admin CA held apart is the one read at the start: its file gone since, a reload
    // of the devices' trust as it was goes through (a CRL update must).
    std::fs::write(pki.path("ca.pem"), pki.ca.cert_pem()).unwrap();
    std::fs::remove_file(pki.path("admin-ca.pem")).unwrap();
    gw.shared.reload_tls().expect("the devices' trust reloaded");
    // The trust in use stays: a device of the first CA still gets a session.
    let mut d = tls_device(gw.addr, pki.device("device-0001", Some(&pki.ca)))
        .await
        .unwrap();
    assert_eq!(d.open("device-0001", "echo").await, "gw-test");
}
