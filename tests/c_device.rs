//! The C device (`examples/c-device`: mbedTLS and the wasmbed-device C library, TLS 1.2 as
//! mbedTLS 2.28 speaks it) with the gateway it is on killed mid-run: through a passthrough
//! proxy it resumes elsewhere with its ticket; through a terminating proxy, whose records with
//! it are the proxy's own (`tls/records.rs`), its session is moved without it noticing;
//! either way nothing lost, the app's state intact.

mod support;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use support::*;

/// `make` in examples/c-device: the library (cargo) and the program; the program's path.
fn build_c_device() -> std::path::PathBuf {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("make")
        .arg("-C")
        .arg(format!("{root}/examples/c-device"))
        .output()
        .expect("make runs (build-essential)");
    assert!(
        out.status.success(),
        "make -C examples/c-device failed (needs libmbedtls-dev):\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    format!("{root}/target/c-device/c-device").into()
}

/// `key=value` pairs of a line.
fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .collect()
}

/// How the proxy in front of the C device ends its TLS.
#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Passthrough,
    /// The device's TLS ends at the proxy; the proxy's own TLS, with its client certificate,
    /// goes to each gateway (`--upstream tcp`).
    Terminate,
}

#[test]
fn the_c_device_survives_a_gateway_kill_by_resuming_with_its_ticket() {
    survives_a_gateway_kill(Mode::Passthrough);
}

#[test]
fn the_c_device_survives_a_gateway_kill_through_a_terminating_proxy() {
    survives_a_gateway_kill(Mode::Terminate);
}

fn survives_a_gateway_kill(mode: Mode) {
    let bin = build_c_device();
    let pki = tempfile::tempdir().unwrap();
    let pki = pki.path();
    certs_init(pki, &["--devices", "1", "--gateways", "2"]);
    let d = |f: &str| pki.join(f).to_string_lossy().into_owned();
    // As `wasmbed up --mode terminate` runs it: the proxy's own TLS, with its client
    // certificate, to every gateway.
    let mut terminate = terminate_args(pki);
    for (flag, file) in [
        ("--upstream-ca", "ca.pem"),
        ("--upstream-cert", "proxy-client.pem"),
        ("--upstream-key", "proxy-client.key"),
    ] {
        terminate.extend([flag.to_string(), d(file)]);
    }
    let (gateway_args, mode_args): (&[&str], Vec<&str>) = match mode {
        Mode::Passthrough => (&[], vec![]),
        Mode::Terminate => (
            &["--proxy-identity", "wasmbed-proxy"],
            terminate.iter().map(String::as_str).collect(),
        ),
    };
    let (gateways, spec) = tls_gateways(pki, gateway_args);
    // By name, to kill the one the device is on.
    let mut gateways: BTreeMap<String, Killed> = gateways
        .into_iter()
        .enumerate()
        .map(|(i, (g, _, _))| (format!("gw-{i}"), g))
        .collect();
    let mut args = vec![
        "--health",
        "http",
        "--health-path",
        "/readyz",
        "--health-interval",
        "200ms",
        "--gateway",
        &spec,
    ];
    args.extend(mode_args);
    let proxy = ProxyProcess::start(&[], &args);
    let mut device = Command::new(&bin)
        .arg("127.0.0.1")
        .arg(proxy.listen.port().to_string())
        .args([d("ca.pem"), d("devices/device-0000.pem")])
        .args([d("devices/device-0000.key"), "device-0000".into()])
        .args(["counter", "40", "20", "tls1.2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the C device starts");
    // The device's lines, read on a thread of their own so that the run is bounded: a device
    // whose session cannot go on keeps dialing, and would hold the test for ever.
    let out = device.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut on = String::new();
    let mut welcomes = Vec::new();
    let mut killed = None;
    let mut done = None;
    while let Ok(line) =
        lines.recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
    {
        let line = line.unwrap();
        let f = fields(&line);
        if line.starts_with("welcome ") {
            on = f["gateway"].to_string();
            welcomes.push((on.clone(), f["resume"].to_string()));
        }
        // Ten answers in, the gateway the device is on dies.
        if line.starts_with("reply seq=10 ") {
            let mut g = gateways.remove(&on).expect("the device's gateway");
            g.0.kill().unwrap();
            g.0.wait().unwrap();
            killed = Some(on.clone());
        }
        if line.starts_with("done ") {
            done = Some(line);
            break;
        }
    }
    if done.is_none() {
        // Past the bound: the device is stopped, and the run fails below.
        let _ = device.kill();
    }
    let status = device.wait().unwrap();
    let done = done.expect("the device ran to its end");
    let f = fields(&done);
    let killed = killed.expect("a gateway was killed");
    assert_eq!(f["sent"], "40", "{done}");
    assert_eq!(f["lost"], "0", "{done}");
    assert_eq!(f["resets"], "0", "the app's state never restarted: {done}");
    assert_eq!(f["tls"], "TLSv1.2", "{done}");
    let answered: u64 = f["replies"].parse::<u64>().unwrap() + f["covered"].parse::<u64>().unwrap();
    assert_eq!(answered, 40, "{done}");
    match mode {
        Mode::Passthrough => {
            assert!(f["reconnects"].parse::<u64>().unwrap() >= 1, "{done}");
            let after = welcomes.last().unwrap();
            assert_ne!(after.0, killed, "it moved: {welcomes:?}");
            assert_eq!(
                after.1, "restored",
                "it resumed from its ticket: {welcomes:?}"
            );
        }
        Mode::Terminate => {
            // The proxy moved the session; the device never reconnected.
            assert_eq!(f["reconnects"], "0", "{done}");
            assert_eq!(welcomes.len(), 1, "{welcomes:?}");
            let moved = "wasmbed_proxy_session_moves_total{cause=\"failover\",result=\"resumed\"}";
            assert_eq!(proxy.metric(moved), 1.0, "{done}");
        }
    }
    assert!(status.success(), "{done}");
}
