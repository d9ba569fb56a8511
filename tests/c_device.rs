//! The C device (`examples/c-device`: mbedTLS and the wasmbed-device C library) through a
//! passthrough proxy, with the gateway it is on killed mid-run: it resumes elsewhere with its
//! ticket, nothing lost, the app's state intact.

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

#[test]
fn the_c_device_survives_a_gateway_kill_by_resuming_with_its_ticket() {
    let bin = build_c_device();
    let pki = tempfile::tempdir().unwrap();
    let pki = pki.path();
    certs_init(pki, &["--devices", "1", "--gateways", "2"]);
    let d = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let (gateways, spec) = tls_gateways(pki, &[]);
    // By name, to kill the one the device is on.
    let mut gateways: BTreeMap<String, Killed> = gateways
        .into_iter()
        .enumerate()
        .map(|(i, (g, _, _))| (format!("gw-{i}"), g))
        .collect();
    let proxy = ProxyProcess::start(
        &[],
        &[
            "--health",
            "http",
            "--health-path",
            "/readyz",
            "--health-interval",
            "200ms",
            "--gateway",
            &spec,
        ],
    );
    let mut device = Command::new(&bin)
        .arg("127.0.0.1")
        .arg(proxy.listen.port().to_string())
        .args([d("ca.pem"), d("devices/device-0000.pem")])
        .args([d("devices/device-0000.key"), "device-0000".into()])
        .args(["counter", "40", "20", "tls1.2"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("the C device starts");
    let lines = BufReader::new(device.stdout.take().unwrap()).lines();
    let mut on = String::new();
    let mut welcomes = Vec::new();
    let mut killed = None;
    let mut done = None;
    for line in lines {
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
    assert!(f["reconnects"].parse::<u64>().unwrap() >= 1, "{done}");
    let after = welcomes.last().unwrap();
    assert_ne!(after.0, killed, "it moved: {welcomes:?}");
    assert_eq!(
        after.1, "restored",
        "it resumed from its ticket: {welcomes:?}"
    );
    assert!(status.success(), "{done}");
}
