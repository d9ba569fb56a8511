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

#[tokio::test]
async fn a_killed_gateways_link_sessions_move_with_their_state() {
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path();
    certs_init(pki, &["--devices", "4", "--gateways", "2"]);
    let d = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let mut gateways: Vec<(Killed, SocketAddr, SocketAddr)> = Vec::new();
    for i in 0..2 {
        let mut cmd = Command::new(BIN);
        cmd.args(["gateway", "--name", &format!("gw-{i}")])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--apps", apps, "--session-keys", &d("session-keys.toml")])
            .args(["--tls-cert", &d(&format!("gateway-{i}.pem"))])
            .args(["--tls-key", &d(&format!("gateway-{i}.key"))])
            .args([
                "--client-ca",
                &d("ca.pem"),
                "--proxy-identity",
                "wasmbed-proxy",
            ])
            .arg("--link");
        let (child, line) = spawn_ready(&mut cmd);
        gateways.push((
            Killed(child),
            addr_in(&line, "listen="),
            addr_in(&line, "admin="),
        ));
    }
    let spec: Vec<String> = gateways
        .iter()
        .enumerate()
        .map(|(i, (_, listen, admin))| format!("gw-{i}={listen};health={admin}"))
        .collect();
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
            "200ms",
            "--gateway",
            &spec.join(","),
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let proxy = ProxyProcess::start(&[], &args);
    let mut devices = Vec::new();
    for i in 0..4 {
        let id = format!("device-000{i}");
        let mut dev = tls_device(proxy.listen, device_of(pki, &id)).await;
        dev.open(&id, "counter").await;
        devices.push(dev);
    }
    for n in 1..=3 {
        for dev in devices.iter_mut() {
            assert_eq!(count(&dev.data(b"\x01").await), n);
        }
    }
    assert_eq!(
        proxy.metric("wasmbed_proxy_links_total{result=\"up\"}"),
        2.0
    );
    // SIGKILL the first gateway: its link goes silent, its port closed.
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
    assert_eq!(
        proxy.metric("wasmbed_proxy_links_total{result=\"lost\"}"),
        1.0
    );
}
