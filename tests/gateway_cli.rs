//! `wasmbed gateway` and `wasmbed certs init` as real processes.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use support::{BIN, addr_in, device_of, spawn_ready};
use wasmbed_protocol::Kind;
use wasmbed_testkit::Device;

#[test]
fn certs_init_writes_a_pki_the_gateway_starts_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    support::certs_init(dir.path(), &["--devices", "3", "--gateways", "2"]);
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("index.json")).unwrap())
            .unwrap();
    assert_eq!(index["devices"].as_array().unwrap().len(), 3);
    assert_eq!(index["devices"][2]["id"], "device-0002");
    assert!(
        dir.path().join("proxy-client.pem").exists(),
        "the proxy's client certificate"
    );
    // A second init refuses to overwrite the CA.
    let again = Command::new(BIN)
        .args(["certs", "init", "--dir", d])
        .output()
        .unwrap();
    assert_eq!(again.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    // The gateway starts on these files.
    let (mut gw, line) = spawn_ready(
        Command::new(BIN)
            .args(["gateway", "--listen", "127.0.0.1:0", "--admin", "off"])
            .args([
                "--tls-cert",
                &format!("{d}/gateway-0.pem"),
                "--tls-key",
                &format!("{d}/gateway-0.key"),
            ])
            .args(["--client-ca", &format!("{d}/ca.pem")]),
    );
    assert!(line.starts_with("ready listen=127.0.0.1:"), "{line}");
    let _ = gw.kill();
    let _ = gw.wait();
}

#[test]
fn a_bad_gateway_flag_or_missing_file_is_one_line() {
    for (args, want) in [
        (
            &["gateway", "--insecure-plaintext", "--max-memory", "lots"][..],
            "`max_memory`",
        ),
        (&["gateway"][..], "`tls`"),
        (
            &[
                "gateway",
                "--insecure-plaintext",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--apps",
                "/nonexistent/apps",
            ][..],
            "/nonexistent/apps",
        ),
    ] {
        let out = Command::new(BIN).args(args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn sigterm_sends_goaway_and_exits_within_the_grace_period() {
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let (mut gw, line) = spawn_ready(
        Command::new(BIN)
            .args(["gateway", "--insecure-plaintext", "--listen", "127.0.0.1:0"])
            .args(["--admin", "off", "--apps", apps, "--grace", "5s"]),
    );
    let addr = addr_in(&line, "listen=");
    let mut d = Device::new(tokio::net::TcpStream::connect(addr).await.unwrap());
    d.open("d1", "echo").await;
    let started = Instant::now();
    // SAFETY: kill(2) on the child we spawned; no memory is touched.
    assert_eq!(unsafe { libc::kill(gw.id() as i32, libc::SIGTERM) }, 0);
    assert_eq!(d.recv().await.map(|f| f.kind), Some(Kind::Goaway));
    assert!(d.recv().await.is_none(), "closed after GOAWAY");
    let status = gw.wait().unwrap();
    assert_eq!(status.code(), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "exited within the grace period"
    );
}

/// Logs to a file (or a pipe) carry no terminal colour codes.
#[test]
fn logs_off_a_terminal_are_plain_text() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("gateway.log");
    let (mut gw, _) = wasmbed_testkit::spawn_ready(
        Command::new(BIN)
            .args(["gateway", "--insecure-plaintext", "--listen", "127.0.0.1:0"])
            .args(["--admin", "off"])
            .env("WASMBED_LOG", "info")
            .stderr(std::fs::File::create(&log).unwrap()),
    )
    .unwrap();
    // The ready line comes before the first log line: wait (bounded) for that line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let text = loop {
        let text = std::fs::read_to_string(&log).unwrap();
        if text.contains("gateway listening") {
            break text;
        }
        assert!(Instant::now() < deadline, "no log line: {text:?}");
        std::thread::sleep(Duration::from_millis(10));
    };
    // SAFETY: kill(2) on the child we spawned; no memory is touched.
    assert_eq!(unsafe { libc::kill(gw.id() as i32, libc::SIGTERM) }, 0);
    gw.wait().unwrap();
    assert!(
        !text.contains('\x1b'),
        "colour codes in a log file: {text:?}"
    );
}

/// The terminate-mode identity check, through the binaries: a PKI from `certs init`, a
/// plaintext gateway behind a terminating proxy, and two device certificates. device-0001's
/// certificate may open a session as device-0001 only.
#[tokio::test]
async fn through_the_binaries_a_device_cannot_claim_another_devices_identity() {
    let dir = tempfile::tempdir().unwrap();
    support::certs_init(dir.path(), &["--devices", "2", "--gateways", "1"]);
    let (mut gw, proxy) = terminate_stack(dir.path(), &[]);
    let device = |id: &str| device_of(dir.path(), id);
    let listen = proxy.listen;
    let connect = |config| async move {
        let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .unwrap();
        Device::new(tls)
    };
    // device-0001's certificate, HELLO naming device-0000: refused by the proxy.
    let mut thief = connect(device("device-0001")).await;
    let answer = thief.hello("device-0000", "echo").await;
    assert_eq!(
        wasmbed_testkit::error_code(&answer),
        wasmbed_protocol::ErrorCode::IdentityMismatch as u16
    );
    assert!(thief.recv().await.is_none(), "closed");
    // Each certificate opens its own device's session.
    for id in ["device-0000", "device-0001"] {
        let mut owner = connect(device(id)).await;
        assert_eq!(owner.open(id, "echo").await, "gateway");
        assert_eq!(owner.data(b"mine").await.body, b"mine");
    }
    // A refusal after the handshake is counted once the device has its goodbye: waited for.
    let refused = "wasmbed_proxy_connections_rejected_total{reason=\"identity_mismatch\"}";
    wasmbed_testkit::until(Duration::from_secs(5), "the refusal counted", || {
        proxy.metric(refused) == 1.0
    })
    .await;
    let _ = gw.kill();
    let _ = gw.wait();
}

/// Revocation through the binaries: `certs revoke` writes the CRL, a terminating proxy reads
/// it with `--client-crl`, and SIGHUP makes a new revocation take effect: the connected
/// device's session gets ERROR revoked, the other device stays.
#[tokio::test]
async fn certs_revoke_and_a_sighup_close_a_revoked_devices_session() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).to_str().unwrap().to_string();
    let run = |args: &[&str]| {
        let out = Command::new(BIN).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    run(&[
        "certs",
        "init",
        "--dir",
        &d(""),
        "--devices",
        "3",
        "--gateways",
        "1",
    ]);
    let first = run(&["certs", "revoke", "--dir", &d(""), "device-0002"]);
    assert!(first.contains("revoked device-0002"), "{first}");
    // An unknown device is an error naming the file, and changes nothing.
    let bad = Command::new(BIN)
        .args(["certs", "revoke", "--dir", &d(""), "device-9999"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("device-9999.pem"));
    let crl = d("crl.pem");
    let (mut gw, proxy) = terminate_stack(dir.path(), &["--client-crl", &crl]);
    let device = |id: &str| device_of(dir.path(), id);
    let listen = proxy.listen;
    let connect = |config| async move {
        let tcp = tokio::net::TcpStream::connect(listen).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
    };
    let mut live = Vec::new();
    for id in ["device-0000", "device-0001"] {
        let mut dev = Device::new(connect(device(id)).await.unwrap());
        assert_eq!(dev.open(id, "echo").await, "gateway");
        live.push(dev);
    }
    // device-0002 was revoked before the proxy started: no session.
    if let Ok(tls) = connect(device("device-0002")).await {
        assert!(
            Device::new(tls).no_session("device-0002", "echo").await,
            "refused"
        );
    }
    run(&["certs", "revoke", "--dir", &d(""), "device-0000"]);
    proxy.signal(libc::SIGHUP);
    let f = live[0].recv().await.expect("ERROR revoked");
    assert_eq!(
        wasmbed_testkit::error_code(&f),
        wasmbed_protocol::ErrorCode::Revoked as u16
    );
    assert_eq!(live[1].data(b"still mine").await.body, b"still mine");
    assert_eq!(proxy.metric("wasmbed_proxy_sessions_revoked_total"), 1.0);
    let list: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d("revoked.json")).unwrap()).unwrap();
    // `certs init` wrote CRL 1 (empty); each `certs revoke` the next.
    assert_eq!(list["crl_number"], 3);
    assert_eq!(list["revoked"].as_array().unwrap().len(), 2);
    let _ = gw.kill();
    let _ = gw.wait();
}

/// `certs init` writes an empty CRL: a proxy can check revocation from the first day
/// (`--client-crl DIR/crl.pem` before any `certs revoke`), and devices get their sessions.
#[tokio::test]
async fn certs_init_writes_an_empty_crl_a_proxy_starts_with() {
    let dir = tempfile::tempdir().unwrap();
    support::certs_init(dir.path(), &["--devices", "1", "--gateways", "1"]);
    let crl = dir.path().join("crl.pem");
    let crls = wasmbed_certs::load_crls(&crl).expect("certs init wrote a CRL");
    assert_eq!(wasmbed_certs::revoked_keys(&crls).len(), 0);
    let (mut gw, proxy) = terminate_stack(dir.path(), &["--client-crl", crl.to_str().unwrap()]);
    let tcp = tokio::net::TcpStream::connect(proxy.listen).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(device_of(dir.path(), "device-0000"))
        .connect(name, tcp)
        .await
        .unwrap();
    let mut dev = Device::new(tls);
    assert_eq!(dev.open("device-0000", "echo").await, "gateway");
    let _ = gw.kill();
    let _ = gw.wait();
}

/// A plaintext gateway (the repository's apps) behind a terminating proxy with the PKI in
/// `dir` (as `certs init` wrote it) and `extra` proxy flags. Returns the gateway process and
/// the proxy.
fn terminate_stack(
    dir: &std::path::Path,
    extra: &[&str],
) -> (std::process::Child, support::ProxyProcess) {
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let (gw, line) = spawn_ready(
        Command::new(BIN)
            .args(["gateway", "--insecure-plaintext", "--listen", "127.0.0.1:0"])
            .args(["--admin", "off", "--apps", apps]),
    );
    let gw_addr = addr_in(&line, "listen=").to_string();
    let mut args = support::terminate_args(dir);
    args.extend(["--gateway", &gw_addr, "--health", "tcp"].map(String::from));
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    (gw, support::ProxyProcess::start(&[], &args))
}

fn mode_of(path: &std::path::Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// `certs init` writes every key and the key ring 0600 in 0700 directories, an admin CA of its
/// own with an admin certificate; `--force` removes the certificates of the PKI it replaces.
#[test]
fn certs_init_keeps_keys_private_and_force_leaves_nothing_of_the_old_ca() {
    let dir = tempfile::tempdir().unwrap();
    // A directory `certs init` creates is made 0700 (one that exists keeps its mode).
    let pki = dir.path().join("pki");
    let p = pki.as_path();
    support::certs_init(p, &["--devices", "3", "--gateways", "2"]);
    for secret in [
        "ca.key",
        "proxy.key",
        "proxy-client.key",
        "gateway-1.key",
        "devices/device-0002.key",
        "session-keys.toml",
        "admin/ca.key",
        "admin/admin.key",
    ] {
        assert_eq!(mode_of(&p.join(secret)), 0o600, "{secret}");
    }
    for d in [".", "devices", "admin"] {
        assert_eq!(mode_of(&p.join(d)), 0o700, "{d}/");
    }
    assert_eq!(mode_of(&p.join("ca.pem")), 0o644);
    assert!(p.join("admin/admin.pem").exists() && p.join("admin/ca.pem").exists());
    assert_ne!(
        std::fs::read(p.join("admin/ca.pem")).unwrap(),
        std::fs::read(p.join("ca.pem")).unwrap(),
        "the admin CA is not the devices'"
    );
    // A smaller PKI over it: nothing of the old CA is left behind.
    let old_key = std::fs::read(p.join("ca.key")).unwrap();
    support::certs_init(p, &["--force", "--devices", "1", "--gateways", "1"]);
    assert_ne!(std::fs::read(p.join("ca.key")).unwrap(), old_key);
    let mut devices: Vec<String> = std::fs::read_dir(p.join("devices"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    devices.sort();
    assert_eq!(devices, ["device-0000.key", "device-0000.pem"]);
    assert!(!p.join("gateway-1.pem").exists() && !p.join("gateway-1.key").exists());
    assert!(p.join("gateway-0.pem").exists());
}

/// Runs `cmd`, which must refuse to start: its exit code and stderr. One that starts instead
/// (prints its ready line) fails the test rather than running on.
fn refused(cmd: &mut Command) -> (Option<i32>, String) {
    use std::io::Read;
    let mut child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = String::new();
    let _ = std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.take().unwrap()),
        &mut out,
    );
    // The first line, or nothing once the process exits: a ready line means it started.
    if out.starts_with("ready ") {
        let _ = child.kill();
        let _ = child.wait();
        panic!("started instead of refusing: {out}");
    }
    let mut err = String::new();
    let _ = child.stderr.take().unwrap().read_to_string(&mut err);
    (child.wait().unwrap().code(), err)
}

/// The devices' CA as the admin CA is refused by the gateway and the terminating proxy (one
/// line, exit 2); with the admin CA of `certs init`, the admin certificate may drain and a
/// device certificate cannot even finish the handshake.
#[tokio::test]
async fn the_admin_ca_is_never_the_devices_ca() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path();
    support::certs_init(p, &["--devices", "1", "--gateways", "1"]);
    let d = |f: &str| p.join(f).to_string_lossy().into_owned();
    std::fs::write(p.join("token"), "s3cret-s3cret-s3cret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(p.join("token"), std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let gateway = |admin_ca: &str| {
        let mut c = Command::new(BIN);
        c.args([
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
        ])
        .args([
            "--tls-cert",
            &d("gateway-0.pem"),
            "--tls-key",
            &d("gateway-0.key"),
        ])
        .args([
            "--client-ca",
            &d("ca.pem"),
            "--admin-token-file",
            &d("token"),
        ])
        .args(["--admin-tls-cert", &d("gateway-0.pem")])
        .args(["--admin-tls-key", &d("gateway-0.key")])
        .args(["--admin-client-ca", admin_ca]);
        c
    };
    let (code, err) = refused(&mut gateway(&d("ca.pem")));
    assert_eq!(code, Some(2));
    assert!(
        err.contains("devices' CA") && err.lines().count() == 1,
        "{err}"
    );
    let (code, err) = refused(
        Command::new(BIN)
            .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(support::terminate_args(p))
            .args(["--gateway", "127.0.0.1:1"])
            .args([
                "--admin-tls-cert",
                &d("proxy.pem"),
                "--admin-tls-key",
                &d("proxy.key"),
            ])
            .args(["--admin-client-ca", &d("ca.pem")]),
    );
    assert_eq!(code, Some(2));
    assert!(err.contains("devices' CA"), "{err}");

    let (gw, line) = spawn_ready(&mut gateway(&d("admin/ca.pem")));
    let _gw = support::Killed(gw);
    let admin = addr_in(&line, "admin=");
    let ca = wasmbed_certs::load_certs(&p.join("ca.pem")).unwrap();
    let as_admin = wasmbed_certs::client_config(
        &ca,
        Some((
            wasmbed_certs::load_certs(&p.join("admin/admin.pem")).unwrap(),
            wasmbed_certs::load_key(&p.join("admin/admin.key")).unwrap(),
        )),
    )
    .unwrap();
    // A device's certificate: the handshake fails (or the change is refused).
    let tcp = tokio::net::TcpStream::connect(admin).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let as_device = tokio_rustls::TlsConnector::from(device_of(p, "device-0000"));
    if let Ok(mut tls) = as_device.connect(name, tcp).await {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let head = "POST /api/drain HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let _ = tls.write_all(head.as_bytes()).await;
        let mut reply = Vec::new();
        let _ = tls.read_to_end(&mut reply).await;
        let text = String::from_utf8_lossy(&reply);
        assert!(
            !text.starts_with("HTTP/1.1 2"),
            "a device drained the gateway: {text}"
        );
    }
    let (status, body) =
        wasmbed_testkit::https(admin, as_admin, ("POST", "/api/drain", b""), None).await;
    assert_eq!(status, 202, "{body}");
}
