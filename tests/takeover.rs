//! `wasmbed proxy --takeover PATH`: a new proxy process takes the running one's listening
//! sockets and its passthrough sessions (device and gateway sockets) over a Unix socket;
//! the old one exits. Devices notice nothing: no connect refused, no session reset, every
//! byte in flight delivered both ways.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use support::*;
use wasmbed_protocol::{Frame, Kind};

/// `wasmbed proxy` on `listen` and `admin` with `--takeover path`.
fn proxy(listen: &str, admin: &str, path: &std::path::Path, gateways: &str) -> (Child, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(["proxy", "--listen", listen, "--admin", admin])
        .arg("--takeover")
        .arg(path)
        .args(["--health", "http", "--health-path", "/readyz"])
        .args(["--gateway", gateways]);
    spawn_ready(&mut cmd)
}

/// What each test upgrades: a PKI with `devices` device certificates, two TLS gateways, and
/// a proxy with `--takeover` at a socket in the temporary directory (`old`). A test binds
/// `_dir` and `gateways` too (left in `..` they would go at once: the files and processes).
struct Stack {
    _dir: tempfile::TempDir,
    pki: std::path::PathBuf,
    gateways: Vec<(Killed, SocketAddr, SocketAddr)>,
    spec: String,
    path: std::path::PathBuf,
    old: Child,
    listen: SocketAddr,
    admin: SocketAddr,
}

fn stack(devices: &str) -> Stack {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    certs_init(&pki, &["--devices", devices, "--gateways", "2"]);
    let (gateways, spec) = tls_gateways(&pki, &[]);
    let path = dir.path().join("proxy.sock");
    let (old, line) = proxy("127.0.0.1:0", "127.0.0.1:0", &path, &spec);
    let (listen, admin) = (addr_in(&line, "listen="), addr_in(&line, "admin="));
    Stack {
        _dir: dir,
        pki,
        gateways,
        spec,
        path,
        old,
        listen,
        admin,
    }
}

/// Waits until the old proxy has handed everything over and exited.
async fn exited(old: &mut Child) {
    wasmbed_testkit::until(
        std::time::Duration::from_secs(30),
        "the old proxy handed everything over and exited",
        || matches!(old.try_wait(), Ok(Some(_))),
    )
    .await;
}

/// A device that keeps `depth` DATA in flight to `echo` and checks every answer is its own
/// bytes, in order, on the one connection it opened, until `stop`. Returns the answers.
async fn echoing(
    addr: SocketAddr,
    pki: std::path::PathBuf,
    id: String,
    stop: Arc<AtomicBool>,
    opened: Arc<AtomicU64>,
) -> u64 {
    let mut dev = tls_device(addr, device_of(&pki, &id)).await;
    dev.open(&id, "echo").await;
    opened.fetch_add(1, Ordering::SeqCst);
    let depth = 4u64;
    let body = |seq: u64| -> Vec<u8> {
        (0..8192u64)
            .map(|i| (i.wrapping_mul(31) ^ seq) as u8)
            .collect()
    };
    let (mut sent, mut answered) = (0u64, 0u64);
    loop {
        while sent - answered < depth && !stop.load(Ordering::SeqCst) {
            sent += 1;
            dev.send(Frame::new(Kind::Data, sent, body(sent)))
                .await
                .expect("the connection stays open");
        }
        if sent == answered {
            return answered;
        }
        let f = dev.recv().await.expect("the connection stays open");
        if f.kind == Kind::Checkpoint {
            continue;
        }
        answered += 1;
        assert_eq!((f.kind, f.seq), (Kind::Reply, answered), "in order");
        assert!(f.body == body(answered), "bytes intact");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_in_place_keeps_every_connection_and_byte() {
    let Stack {
        _dir,
        gateways: _gateways,
        pki,
        spec,
        path,
        mut old,
        listen,
        admin,
        ..
    } = stack("8");
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let devices: Vec<_> = (0..8)
        .map(|i| {
            tokio::spawn(echoing(
                listen,
                pki.clone(),
                format!("device-000{i}"),
                stop.clone(),
                opened.clone(),
            ))
        })
        .collect();
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "every device open",
        || opened.load(Ordering::SeqCst) == 8,
    )
    .await;
    // New connections all through the upgrade: none may be refused.
    let connecting = Arc::new(AtomicBool::new(true));
    let refused = Arc::new(AtomicU64::new(0));
    let attempts = Arc::new(AtomicU64::new(0));
    let prober = {
        let (connecting, refused, attempts) =
            (connecting.clone(), refused.clone(), attempts.clone());
        std::thread::spawn(move || {
            while connecting.load(Ordering::SeqCst) && attempts.load(Ordering::SeqCst) < 200_000 {
                if std::net::TcpStream::connect(listen).is_err() {
                    refused.fetch_add(1, Ordering::SeqCst);
                }
                attempts.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    let (mut new, line) = proxy(&listen.to_string(), &admin.to_string(), &path, &spec);
    assert_eq!(
        addr_in(&line, "listen="),
        listen,
        "the same address, taken over"
    );
    exited(&mut old).await;
    assert!(
        old.wait().unwrap().success(),
        "the old proxy stopped in order"
    );
    // Keep talking through the new process, then stop.
    let before = attempts.load(Ordering::SeqCst);
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "connects after the upgrade",
        || attempts.load(Ordering::SeqCst) > before + 100,
    )
    .await;
    // The new process holds the sessions, counted on their gateways.
    let answer = wasmbed_testkit::Admin::new(admin)
        .get("/api/gateways")
        .unwrap();
    let list: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
    let held: u64 = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["sessions"].as_u64())
        .sum();
    assert_eq!(held, 8, "{list}");
    connecting.store(false, Ordering::SeqCst);
    prober.join().unwrap();
    stop.store(true, Ordering::SeqCst);
    for d in devices {
        assert!(d.await.unwrap() > 0);
    }
    assert_eq!(refused.load(Ordering::SeqCst), 0, "no connect refused");
    assert!(attempts.load(Ordering::SeqCst) > 0);
    // And it serves the socket for the next upgrade.
    assert!(path.exists());
    let _ = new.kill();
    let _ = new.wait();
}

/// What an operator changed through the admin API on the running proxy — a gateway
/// removed, one added, one drained — is still so after an upgrade in place: the old process
/// hands its run-time changes over with its admin endpoint, as a reload keeps them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_in_place_keeps_the_run_time_changes() {
    use wasmbed_testkit::http;
    let Stack {
        _dir,
        pki,
        gateways,
        spec,
        path,
        mut old,
        listen,
        admin,
        ..
    } = stack("1");
    // gw-x: another name for gw-0's process, added at run time.
    let (_, gw0, gw0_admin) = &gateways[0];
    let body = format!(r#"{{"name":"gw-x","address":"{gw0}","health_address":"{gw0_admin}"}}"#);
    assert_eq!(
        http(admin, "POST", "/api/gateways", body.as_bytes())
            .await
            .0,
        201
    );
    assert_eq!(
        http(admin, "DELETE", "/api/gateways/gw-1", b"").await.0,
        200
    );
    assert_eq!(
        http(admin, "POST", "/api/gateways/gw-0/drain", b"").await.0,
        200
    );
    // A device session, on gw-x (the one gateway taking sessions): it moves with the upgrade,
    // so the added gateway must be up in the new process before the session comes.
    let stop = Arc::new(AtomicBool::new(false));
    let opened = Arc::new(AtomicU64::new(0));
    let device = tokio::spawn(echoing(
        listen,
        pki.clone(),
        "device-0000".into(),
        stop.clone(),
        opened.clone(),
    ));
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "the device open",
        || opened.load(Ordering::SeqCst) == 1,
    )
    .await;
    let (mut new, _) = proxy(&listen.to_string(), &admin.to_string(), &path, &spec);
    exited(&mut old).await;
    // Only the new process serves the admin address now.
    let (status, body) = http(admin, "GET", "/api/gateways", b"").await;
    assert_eq!(status, 200, "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let draining = |name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .map(|g| g["draining"].as_bool() == Some(true))
    };
    assert_eq!(
        draining("gw-1"),
        None,
        "removed at run time stays removed: {list}"
    );
    assert_eq!(
        draining("gw-x"),
        Some(false),
        "added at run time stays: {list}"
    );
    assert_eq!(
        draining("gw-0"),
        Some(true),
        "drained at run time stays drained: {list}"
    );
    let on_x = list
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "gw-x")
        .and_then(|g| g["sessions"].as_u64());
    assert_eq!(
        on_x,
        Some(1),
        "the device's session, handed over on gw-x: {list}"
    );
    stop.store(true, Ordering::SeqCst);
    assert!(device.await.unwrap() > 0, "the device kept its connection");
    let _ = new.kill();
    let _ = new.wait();
}

/// A takeover socket that someone connects to without the token gets nothing: the running
/// proxy goes on serving, and a real takeover still works afterwards.
#[tokio::test]
async fn a_takeover_without_the_token_is_refused() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Stack {
        _dir,
        gateways: _gateways,
        pki,
        path,
        mut old,
        listen,
        ..
    } = stack("1");
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let body = br#"{"takeover":1,"token":"not-the-token"}"#;
    s.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(body).await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert!(got.is_empty(), "nothing handed: {got:?}");
    assert!(matches!(old.try_wait(), Ok(None)), "still running");
    let mut dev = tls_device(listen, device_of(&pki, "device-0000")).await;
    dev.open("device-0000", "echo").await;
    assert_eq!(dev.data(b"still here").await.body, b"still here");
    let _ = old.kill();
    let _ = old.wait();
}

/// A new process that takes the listening sockets and dies before it is ready changes
/// nothing: the running proxy keeps its sessions and its listeners, serves the takeover
/// socket again (a fresh token), and a real takeover then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_that_dies_before_it_is_ready_changes_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Stack {
        _dir,
        gateways: _gateways,
        pki,
        spec,
        path,
        mut old,
        listen,
        admin,
        ..
    } = stack("2");
    let mut dev = tls_device(listen, device_of(&pki, "device-0000")).await;
    dev.open("device-0000", "echo").await;
    // The would-be successor: the right token, takes the sockets' frame, leaves.
    let token = std::fs::read_to_string(format!("{}.token", path.display())).unwrap();
    let mut s = tokio::net::UnixStream::connect(&path).await.unwrap();
    let body = format!(r#"{{"takeover":1,"token":"{}"}}"#, token.trim());
    s.write_all(&(body.len() as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let mut len = [0u8; 4];
    s.read_exact(&mut len).await.unwrap();
    let mut frame = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut frame).await.unwrap();
    let frame: serde_json::Value = serde_json::from_slice(&frame).unwrap();
    assert_eq!(frame["listeners"][0], listen.to_string(), "{frame}");
    drop(s);
    // The old one serves the socket again, with a new token.
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "the takeover socket served again",
        || {
            std::fs::read_to_string(format!("{}.token", path.display())).is_ok_and(|t| t != token)
                && std::os::unix::net::UnixStream::connect(&path).is_ok()
        },
    )
    .await;
    assert!(matches!(old.try_wait(), Ok(None)), "still running");
    assert_eq!(dev.data(b"session kept").await.body, b"session kept");
    let mut fresh = tls_device(listen, device_of(&pki, "device-0001")).await;
    fresh.open("device-0001", "echo").await;
    // A real takeover now.
    let (mut new, _) = proxy(&listen.to_string(), &admin.to_string(), &path, &spec);
    wasmbed_testkit::until(
        std::time::Duration::from_secs(30),
        "the old proxy handed over and exited",
        || matches!(old.try_wait(), Ok(Some(_))),
    )
    .await;
    assert_eq!(dev.data(b"moved").await.body, b"moved");
    assert_eq!(fresh.data(b"moved too").await.body, b"moved too");
    let _ = new.kill();
    let _ = new.wait();
}
