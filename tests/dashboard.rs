//! The dashboard in a real headless browser (Debian's chromium, driven over the Chrome
//! DevTools protocol): a terminating proxy, three gateways, nine devices; the bars show the
//! counts; a gateway is killed; within 2 s its bar is down and its sessions are on the others;
//! the timeline says so. The screenshot is kept as a test artefact (CARGO_TARGET_TMPDIR).
//!
//! Without chromium the test says so and passes nothing, unless WASMBED_REQUIRE_BROWSER=1
//! (set by .ci/run, which installs chromium), where a missing browser fails it.

mod support;

use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{BIN, Killed, ProxyProcess, addr_in, device_of, spawn_ready, terminate_args};

fn chromium() -> Option<&'static str> {
    ["/usr/bin/chromium", "/usr/bin/chromium-browser"]
        .into_iter()
        .find(|p| Path::new(p).exists())
}

/// One page of a headless chromium, over the DevTools protocol (flattened sessions).
struct Browser {
    _child: Killed,
    ws: tungstenite::WebSocket<TcpStream>,
    session: String,
    next: u64,
}

impl Browser {
    fn open(binary: &str, profile: &Path, url: &str) -> Browser {
        let child = Command::new(binary)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--hide-scrollbars",
                "--window-size=1280,720",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromium starts");
        let child = Killed(child);
        // Chromium writes its DevTools port and path to this file once it listens.
        let port_file = profile.join("DevToolsActivePort");
        let deadline = Instant::now() + Duration::from_secs(20);
        let text = loop {
            if let Ok(t) = std::fs::read_to_string(&port_file)
                && t.lines().count() >= 2
            {
                break t;
            }
            assert!(
                Instant::now() < deadline,
                "chromium's DevTools never came up"
            );
            std::thread::sleep(Duration::from_millis(50));
        };
        let mut lines = text.lines();
        let port: u16 = lines.next().unwrap().trim().parse().unwrap();
        let path = lines.next().unwrap().trim().to_string();
        let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let (ws, _) =
            tungstenite::client(format!("ws://127.0.0.1:{port}{path}"), stream).expect("CDP");
        let mut b = Browser {
            _child: child,
            ws,
            session: String::new(),
            next: 1,
        };
        let target = b.call(None, "Target.createTarget", json!({ "url": url }));
        let target_id = target["targetId"].as_str().unwrap().to_string();
        let attached = b.call(
            None,
            "Target.attachToTarget",
            json!({ "targetId": target_id, "flatten": true }),
        );
        b.session = attached["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next;
        self.next += 1;
        let mut msg = json!({ "id": id, "method": method, "params": params });
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        self.ws
            .send(tungstenite::Message::text(msg.to_string()))
            .unwrap();
        loop {
            let m = self.ws.read().expect("a CDP message");
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
            if v["id"] == json!(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page; its value (JSON).
    fn eval(&mut self, expr: &str) -> Value {
        let session = self.session.clone();
        let r = self.call(
            Some(&session),
            "Runtime.evaluate",
            json!({ "expression": expr, "returnByValue": true }),
        );
        r["result"]["value"].clone()
    }

    fn screenshot(&mut self, to: &Path) {
        let session = self.session.clone();
        let r = self.call(
            Some(&session),
            "Page.captureScreenshot",
            json!({ "format": "png" }),
        );
        use base64::Engine;
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().unwrap())
            .unwrap();
        std::fs::write(to, png).unwrap();
    }
}

/// The bars as the page shows them: (gateway, state, sessions).
fn bars(b: &mut Browser) -> Vec<(String, String, u64)> {
    let v = b.eval(
        "JSON.stringify([...document.querySelectorAll('#gateways .gateway')].map(r => [r.dataset.gateway, r.dataset.state, +r.dataset.sessions]))",
    );
    serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap()
}

fn wait_for(
    b: &mut Browser,
    within: Duration,
    what: &str,
    mut ok: impl FnMut(&[(String, String, u64)]) -> bool,
) -> Vec<(String, String, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let now = bars(b);
        if ok(&now) {
            return now;
        }
        assert!(Instant::now() < deadline, "{what}: the page shows {now:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_a_failover_as_it_happens() {
    let Some(binary) = chromium() else {
        assert!(
            std::env::var("WASMBED_REQUIRE_BROWSER").is_err(),
            "WASMBED_REQUIRE_BROWSER is set but chromium is not installed"
        );
        eprintln!("SKIPPED the_dashboard_shows_a_failover_as_it_happens: no chromium");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    support::certs_init(dir.path(), &["--devices", "9", "--gateways", "0"]);
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let mut gateways = Vec::new();
    let mut specs = Vec::new();
    for i in 0..3 {
        let (child, line) = spawn_ready(
            Command::new(BIN)
                .args([
                    "gateway",
                    "--insecure-plaintext",
                    "--name",
                    &format!("gw-{i}"),
                ])
                .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .args(["--apps", apps, "--max-sessions", "6"])
                .args(["--session-keys", &d("session-keys.toml")]),
        );
        specs.push(format!(
            "gw-{i}={};health={}",
            addr_in(&line, "listen="),
            addr_in(&line, "admin=")
        ));
        gateways.push(Some(Killed(child)));
    }
    let mut args = terminate_args(dir.path());
    args.extend(
        [
            "--health",
            "http",
            "--health-path",
            "/readyz",
            "--health-interval",
            "100ms",
            "--fall",
            "2",
        ]
        .map(String::from),
    );
    for s in &specs {
        args.extend(["--gateway".to_string(), s.clone()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = ProxyProcess::start(&[], &args);
    // Nine devices, three per gateway.
    let mut devices = Vec::new();
    for i in 0..9 {
        let id = format!("device-{i:04}");
        let mut dev = support::tls_device(proxy.listen, device_of(dir.path(), &id)).await;
        dev.open(&id, "counter").await;
        devices.push(dev);
    }
    let url = format!("http://{}/", proxy.admin);
    let profile = tempfile::tempdir().unwrap();
    let mut page = tokio::task::block_in_place(|| Browser::open(binary, profile.path(), &url));
    let before = tokio::task::block_in_place(|| {
        wait_for(&mut page, Duration::from_secs(10), "three bars of 3", |b| {
            b.len() == 3 && b.iter().all(|g| g.1 == "up" && g.2 == 3)
        })
    });
    // Kill gw-1.
    let killed_at = Instant::now();
    drop(gateways[1].take());
    let after = tokio::task::block_in_place(|| {
        wait_for(
            &mut page,
            Duration::from_secs(2),
            "gw-1 down, its sessions on the others",
            |b| {
                let down = b.iter().any(|g| g.0 == "gw-1" && g.1 == "down");
                let elsewhere: u64 = b.iter().filter(|g| g.0 != "gw-1").map(|g| g.2).sum();
                down && elsewhere == 9
            },
        )
    });
    let took = killed_at.elapsed();
    let events = tokio::task::block_in_place(|| {
        page.eval("JSON.stringify([...document.querySelectorAll('#events li')].map(l => [l.dataset.kind, l.dataset.gateway || '', l.textContent]))")
    });
    let events: Vec<(String, String, String)> =
        serde_json::from_str(events.as_str().unwrap()).unwrap();
    assert!(
        events.iter().any(|e| e.0 == "down" && e.1 == "gw-1"),
        "the timeline shows gw-1 going down: {events:?}"
    );
    assert!(
        events.iter().any(|e| e.0 == "moves"),
        "and the moves: {events:?}"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard.png");
    tokio::task::block_in_place(|| page.screenshot(&shot));
    eprintln!(
        "dashboard: before {before:?}, after {after:?} ({} ms after the kill); screenshot {}",
        took.as_millis(),
        shot.display()
    );
    // The devices noticed nothing: every count goes on.
    for d in &mut devices {
        let f = d.data(b"tick").await;
        assert_eq!(f.kind, wasmbed_protocol::Kind::Reply, "{f:?}");
    }
}

/// As `wasmbed up` runs it (every gateway with room for 10,000 sessions, a handful in use):
/// the bars scale to the busiest gateway, so the spread shows (the busiest full width, one
/// with half its sessions half as wide), not "7 / 10000" slivers; a draining gateway is
/// marked so; and a proxy where nothing has happened says so in its events panel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bars_show_the_spread_whatever_the_capacity() {
    let Some(binary) = chromium() else {
        assert!(
            std::env::var("WASMBED_REQUIRE_BROWSER").is_err(),
            "WASMBED_REQUIRE_BROWSER is set but chromium is not installed"
        );
        eprintln!("SKIPPED the_bars_show_the_spread_whatever_the_capacity: no chromium");
        return;
    };
    // Nothing has happened: the events panel says so.
    let quiet = ProxyProcess::start(&[], &["--gateway", "g=127.0.0.1:1", "--health", "none"]);
    let profile = tempfile::tempdir().unwrap();
    let url = format!("http://{}/", quiet.admin);
    let mut page = tokio::task::block_in_place(|| Browser::open(binary, profile.path(), &url));
    let empty = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = page.eval("document.querySelector('#events li.empty')?.textContent ?? ''");
            let text = v.as_str().unwrap_or("").to_string();
            if !text.is_empty() || Instant::now() > deadline {
                return text;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(empty.contains("Nothing has happened yet"), "{empty:?}");
    drop(page);
    drop(quiet);

    let dir = tempfile::tempdir().unwrap();
    support::certs_init(dir.path(), &["--devices", "3", "--gateways", "0"]);
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let mut gateways = Vec::new();
    let mut args = terminate_args(dir.path());
    args.extend(["--health", "http", "--health-interval", "100ms"].map(String::from));
    for i in 0..2 {
        let (child, line) = spawn_ready(
            Command::new(BIN)
                .args([
                    "gateway",
                    "--insecure-plaintext",
                    "--name",
                    &format!("gw-{i}"),
                ])
                .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .args(["--apps", apps, "--max-sessions", "10000"]),
        );
        args.extend([
            "--gateway".to_string(),
            format!(
                "gw-{i}={};health={}",
                addr_in(&line, "listen="),
                addr_in(&line, "admin=")
            ),
        ]);
        gateways.push(Killed(child));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = ProxyProcess::start(&[], &args);
    let mut devices = Vec::new();
    for i in 0..3 {
        let id = format!("device-{i:04}");
        let mut dev = support::tls_device(proxy.listen, device_of(dir.path(), &id)).await;
        dev.open(&id, "echo").await;
        devices.push(dev);
    }
    let url = format!("http://{}/", proxy.admin);
    let profile = tempfile::tempdir().unwrap();
    let mut page = tokio::task::block_in_place(|| Browser::open(binary, profile.path(), &url));
    let widths = |page: &mut Browser| -> Vec<(String, u64, u64, String)> {
        let v = page.eval(
            "JSON.stringify([...document.querySelectorAll('#gateways .gateway')].map(r => [r.dataset.gateway, +r.dataset.sessions, +r.dataset.width, r.querySelector('.count').textContent]))",
        );
        serde_json::from_str(v.as_str().unwrap_or("[]")).unwrap()
    };
    let shown = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let w = widths(&mut page);
            let counted: u64 = w.iter().map(|g| g.1).sum();
            if (counted == 3 && w.iter().all(|g| g.3.contains("10000")))
                || Instant::now() > deadline
            {
                return w;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    let mut by_sessions = shown.clone();
    by_sessions.sort_by_key(|g| g.1);
    assert_eq!(
        by_sessions.iter().map(|g| (g.1, g.2)).collect::<Vec<_>>(),
        vec![(1, 50), (2, 100)],
        "bars scaled to the busiest: {shown:?}"
    );
    assert!(shown.iter().all(|g| g.3.ends_with("of 10000")), "{shown:?}");
    // Drain one: its row is marked draining (striped), its bar still there.
    let drained = support::Admin::new(proxy.admin)
        .post("/api/gateways/gw-0/drain", b"")
        .unwrap();
    assert_eq!(drained.status, 200, "{}", drained.body);
    let state = tokio::task::block_in_place(|| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let v = page.eval("document.querySelector('#gateways .gateway[data-gateway=\"gw-0\"]')?.className ?? ''");
            let class = v.as_str().unwrap_or("").to_string();
            if class.contains("draining") || Instant::now() > deadline {
                return class;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    assert!(state.contains("draining"), "{state:?}");
}
