//! `wasmbed up --scenario failover` and `wasmbed loadtest` end to end, through the binary.

mod support;

use std::process::Command;

use support::BIN;

/// Runs `wasmbed up --scenario failover ARGS` on free ports in a temporary directory; it must
/// pass its own checks. Returns its JSON results.
fn failover(args: &[&str]) -> serde_json::Value {
    scenario("failover", args)
}

/// Runs `wasmbed up --scenario NAME ARGS` the same way.
fn scenario(name: &str, args: &[&str]) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("scenario.json");
    let out = Command::new(BIN)
        .args(["up", "--scenario", name])
        .args(args)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--dir")
        .arg(dir.path().join("stack"))
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).expect("well-formed JSON")
}

#[test]
fn the_failover_scenario_rehomes_every_device_and_loses_nothing() {
    let doc = failover(&["--gateways", "3", "--devices", "60", "--rate", "5"]);
    assert_eq!(doc["affected"], 20);
    assert_eq!(doc["rehomed"], 20, "every affected device re-homed");
    let spread = |key: &str| -> Vec<u64> {
        doc[key]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_u64().unwrap())
            .collect()
    };
    assert_eq!(spread("spread_before"), vec![20, 20, 20]);
    assert_eq!(
        spread("spread_after"),
        vec![30, 30],
        "the killed gateway holds none"
    );
    assert_eq!(doc["report"]["messages"]["lost"], 0);
    assert!(doc["report"]["messages"]["answered"].as_u64().unwrap() > 0);
    // Sessions moved with their state: every affected device resumed, no counter restarted.
    assert!(doc["report"]["resumed"].as_u64().unwrap() >= 20, "{doc}");
    assert_eq!(doc["report"]["state_resets"], 0, "{doc}");
    assert_eq!(doc["state_resets"], 0);
    assert_eq!(doc["failed_checks"].as_array().unwrap().len(), 0);
}

/// Terminate mode, real TLS on both hops (devices to the proxy, the proxy's client
/// certificate to the gateways), 300 devices sending DATA to `counter`: the proxy moves the
/// sessions of a gateway that is killed (SIGKILL), hung (SIGSTOP, found by health checks),
/// that says GOAWAY, or that is drained by moving. No device sees a disconnect, every DATA is
/// answered exactly once, no counter restarts.
fn moves_without_the_devices_noticing(name: &str) {
    moves_without_the_devices_noticing_over(name, &[]);
}

/// The same, with `extra` arguments to `wasmbed up` (the link, QUIC devices).
fn moves_without_the_devices_noticing_over(name: &str, extra: &[&str]) {
    let mut args = vec![
        "--mode",
        "terminate",
        "--gateways",
        "3",
        "--devices",
        "300",
        "--rate",
        "2",
    ];
    args.extend_from_slice(extra);
    let doc = scenario(name, &args);
    assert_eq!(doc["affected"], 100, "{doc}");
    assert_eq!(
        doc["moves"]["resumed"], 100.0,
        "each moved with its ticket: {doc}"
    );
    assert_eq!(doc["disconnects"], 0, "{doc}");
    let messages = &doc["report"]["messages"];
    assert_eq!(messages["lost"], 0, "{doc}");
    assert_eq!(messages["duplicated"], 0, "{doc}");
    assert_eq!(messages["sent"], messages["answered"], "{doc}");
    assert_eq!(doc["state_resets"], 0, "{doc}");
    assert_eq!(doc["report"]["reconnects"], 0, "{doc}");
    assert_eq!(doc["failed_checks"].as_array().unwrap().len(), 0, "{doc}");
    // What devices waited, before the event (steady) and from it on, from the fleet's own
    // log: both windows hold replies, and no wait exceeds the run's longest.
    let run_max = doc["report"]["reply_us"]["max"].as_f64().unwrap() / 1e3;
    for key in ["reply_wait_before_event", "reply_wait_after_event"] {
        let w = &doc[key];
        assert!(w["count"].as_u64().unwrap() > 100, "{key}: {doc}");
        let (p99, max) = (w["p99_ms"].as_f64().unwrap(), w["max_ms"].as_f64().unwrap());
        assert!(p99 <= max && max <= run_max + 0.001, "{key}: {doc}");
    }
}

/// Two proxy replicas on one address (`--proxies 2`, SO_REUSEPORT), 60 `counter` devices:
/// one replica is killed (SIGKILL) or stopped (SIGTERM, a new one started in its place);
/// `proxy-kill-held` kills it while it holds sessions waiting for a gateway (every gateway
/// stopped, then let go on).
/// Its devices come back through the other replica and resume from their tickets: nothing
/// lost or answered twice, no app state restarted. A SIGTERM in terminate mode hands every
/// session back with GOAWAY: none of its devices is cut.
#[test]
fn a_proxy_replica_killed_or_stopped_loses_nothing() {
    let table: [(&str, &[&str]); 5] = [
        ("proxy-kill", &["--mode", "terminate"]),
        (
            "proxy-kill-held",
            &["--mode", "terminate", "--upstream", "link"],
        ),
        ("proxy-kill", &["--mode", "terminate", "--upstream", "link"]),
        ("proxy-kill", &["--mode", "passthrough"]),
        (
            "proxy-restart",
            &["--mode", "terminate", "--upstream", "link"],
        ),
    ];
    for (name, extra) in table {
        let mut args = vec!["--gateways", "3", "--devices", "60", "--rate", "5"];
        args.extend_from_slice(extra);
        let doc = scenario(name, &args);
        let affected = doc["affected"].as_u64().unwrap();
        assert!(
            affected > 0,
            "{name} {extra:?}: the victim held sessions: {doc}"
        );
        assert_eq!(doc["rehomed"], affected, "{name} {extra:?}: {doc}");
        let messages = &doc["report"]["messages"];
        assert_eq!(messages["lost"], 0, "{name} {extra:?}: {doc}");
        assert_eq!(messages["duplicated"], 0, "{name} {extra:?}: {doc}");
        assert_eq!(doc["state_resets"], 0, "{name} {extra:?}: {doc}");
        if name == "proxy-kill-held" {
            assert!(
                doc["held_when_killed"].as_u64().unwrap_or(0) > 0,
                "the killed replica held sessions waiting for a gateway: {doc}"
            );
        }
        if name == "proxy-restart" {
            assert_eq!(doc["cut"], 0, "handed back, not cut: {doc}");
            assert_eq!(doc["left_on_goaway"], affected, "{doc}");
        } else {
            assert_eq!(doc["cut"], affected, "a SIGKILL cuts: {doc}");
        }
        assert_eq!(doc["failed_checks"].as_array().unwrap().len(), 0, "{doc}");
    }
}

/// `--scenario proxy-upgrade`: the proxy is upgraded in place (`--takeover`) under 60
/// passthrough devices: every session moves to the new process, no device sees a
/// disconnect, nothing is lost.
#[test]
fn a_proxy_upgraded_in_place_keeps_every_passthrough_session() {
    let doc = scenario(
        "proxy-upgrade",
        &["--gateways", "3", "--devices", "60", "--rate", "5"],
    );
    assert_eq!(doc["affected"], 60, "{doc}");
    assert_eq!(doc["disconnects"], 0, "{doc}");
    assert_eq!(doc["cut"], 0, "{doc}");
    assert_eq!(doc["report"]["messages"]["lost"], 0, "{doc}");
    assert_eq!(doc["report"]["reconnects"], 0, "{doc}");
    assert_eq!(doc["failed_checks"].as_array().unwrap().len(), 0, "{doc}");
}

#[test]
fn terminate_mode_moves_the_sessions_of_a_killed_gateway() {
    moves_without_the_devices_noticing("failover");
}

/// QUIC devices (64 to a UDP socket), one QUIC link per gateway: a killed
/// gateway's sessions move the same way, no device notices.
#[test]
fn quic_devices_over_links_keep_their_sessions_when_a_gateway_dies() {
    moves_without_the_devices_noticing_over(
        "failover",
        &["--upstream", "link", "--transport", "quic"],
    );
}

#[test]
fn terminate_mode_moves_the_sessions_of_a_hung_gateway() {
    moves_without_the_devices_noticing("hang");
}

#[test]
fn terminate_mode_moves_the_sessions_of_a_gateway_that_says_goaway() {
    moves_without_the_devices_noticing("goaway");
}

#[test]
fn terminate_mode_drains_a_gateway_by_moving_its_sessions() {
    moves_without_the_devices_noticing("drain");
}

#[test]
fn terminate_mode_rebalances_live_sessions_onto_a_new_gateway() {
    let doc = scenario(
        "scale-up",
        &[
            "--mode",
            "terminate",
            "--gateways",
            "4",
            "--devices",
            "300",
            "--rate",
            "2",
        ],
    );
    let after: Vec<u64> = doc["spread_after"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_u64().unwrap())
        .collect();
    assert_eq!(after.len(), 4, "{doc}");
    assert!(
        after.iter().max().unwrap() - after.iter().min().unwrap() <= 1,
        "{doc}"
    );
    assert_eq!(
        after.iter().sum::<u64>(),
        300,
        "every session, old ones moved: {doc}"
    );
    assert!(doc["rebalanced_ms"].as_f64().is_some(), "{doc}");
    assert_eq!(doc["lost"], 0, "{doc}");
    assert_eq!(doc["failed_checks"].as_array().unwrap().len(), 0, "{doc}");
}

#[test]
fn a_gateway_added_under_load_takes_the_new_devices() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("scale.json");
    let out = Command::new(BIN)
        .args([
            "up",
            "--scenario",
            "scale-up",
            "--gateways",
            "3",
            "--devices",
            "40",
        ])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains("live dashboard at http://127.0.0.1:"),
        "up prints the dashboard's address: {stdout}"
    );
    let doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(doc["added"], "gw-2");
    assert_eq!(
        doc["spread_before"],
        serde_json::json!({"gw-0": 20, "gw-1": 20})
    );
    assert_eq!(
        doc["new_sessions"],
        serde_json::json!({"gw-2": 20}),
        "all new devices on the new gateway"
    );
    assert_eq!(doc["lost"], 0);
}

#[test]
fn a_loadtest_against_nothing_ends_with_a_clear_report() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let init = Command::new(BIN)
        .args(["certs", "init", "--dir", d, "--devices", "0"])
        .output()
        .unwrap();
    assert!(init.status.success());
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target = free.local_addr().unwrap().to_string();
    drop(free); // connects are refused there
    let json = dir.path().join("r.json");
    let out = Command::new(BIN)
        .args([
            "loadtest",
            "--ca-dir",
            d,
            "--target",
            &target,
            "--devices",
            "5",
            "--duration",
            "1s",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "failed devices: exit 1");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["connected"], 0);
    let failed = report["failed"].as_object().unwrap();
    assert!(failed.keys().any(|k| k.contains("refused")), "{failed:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("0 connected of 5"), "{stdout}");
}

#[test]
fn a_loadtest_with_a_missing_ca_names_the_file() {
    let out = Command::new(BIN)
        .args(["loadtest", "--ca-dir", "/nonexistent/pki"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/pki/ca.pem"));
}

/// Every session failing the same way (DATA larger than the gateway's `--max-frame`): the
/// devices back off as on a failed connect instead of reconnecting at once, and the report
/// names the cause.
#[test]
fn a_loadtest_whose_sessions_all_fail_backs_off_and_names_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    support::certs_init(dir.path(), &["--devices", "0", "--gateways", "1"]);
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let (gw, line) = support::spawn_ready(
        Command::new(BIN)
            .args([
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--apps",
                apps,
            ])
            .args([
                "--tls-cert",
                &d("gateway-0.pem"),
                "--tls-key",
                &d("gateway-0.key"),
            ])
            .args(["--client-ca", &d("ca.pem"), "--max-frame", "1024"]),
    );
    let _gw = support::Killed(gw);
    let target = support::addr_in(&line, "listen=").to_string();
    let json = dir.path().join("r.json");
    let devices = 4;
    let out = Command::new(BIN)
        .args([
            "loadtest",
            "--ca-dir",
            &d(""),
            "--target",
            &target,
            "--app",
            "echo",
        ])
        .args([
            "--devices",
            &devices.to_string(),
            "--duration",
            "3s",
            "--payload",
            "2000",
        ])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let causes = report["messages"]["error_causes"].as_object().unwrap();
    assert!(
        causes
            .keys()
            .any(|k| k.starts_with("ERROR frame_too_large")),
        "{causes:?}"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("frame_too_large"), "{stdout}");
    // Backing off from 20 ms, doubling to 2 s: about 8 reconnects in 3 s per device. At once
    // (before) it was hundreds per second.
    let reconnects = report["reconnects"].as_u64().unwrap();
    assert!(
        reconnects <= 20 * devices,
        "{reconnects} reconnects: no backoff"
    );
}

/// `--devices-from` uses the PKI's own device certificates: a device revoked with `certs
/// revoke` is refused (its failure is in the report), the others connect.
#[test]
fn a_loadtest_with_the_pkis_own_devices_shows_a_revocation() {
    let dir = tempfile::tempdir().unwrap();
    let d = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    support::certs_init(dir.path(), &["--devices", "3", "--gateways", "1"]);
    let revoke = Command::new(BIN)
        .args(["certs", "revoke", "--dir", &d(""), "device-0001"])
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let (gw, line) = support::spawn_ready(
        Command::new(BIN)
            .args([
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
                "--apps",
                apps,
            ])
            .args([
                "--tls-cert",
                &d("gateway-0.pem"),
                "--tls-key",
                &d("gateway-0.key"),
            ])
            .args(["--client-ca", &d("ca.pem"), "--client-crl", &d("crl.pem")]),
    );
    let _gw = support::Killed(gw);
    let target = support::addr_in(&line, "listen=").to_string();
    let json = dir.path().join("r.json");
    let out = Command::new(BIN)
        .args([
            "loadtest",
            "--ca-dir",
            &d(""),
            "--devices-from",
            &d("devices"),
        ])
        .args(["--target", &target, "--devices", "3", "--duration", "1s"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["connected"], 2, "{report}");
    let failed = report["failed"].as_object().unwrap();
    assert_eq!(
        failed.values().map(|n| n.as_u64().unwrap()).sum::<u64>(),
        1,
        "{failed:?}"
    );
    // Without it, the CA issues fresh certificates: the revoked serial is not among them.
    let out = Command::new(BIN)
        .args(["loadtest", "--ca-dir", &d(""), "--target", &target])
        .args(["--devices", "3", "--duration", "1s"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// A reconnect storm through the terminating proxy with its handshake guard set low: every
/// device drops its connection at once and comes back with its session, nothing lost, no
/// gateway wrongly marked down. With the guard's line (`--handshake-wait`, its default) the
/// excess waits for slots and none is refused; with no line it is refused at once (counted)
/// and tries again.
#[test]
fn a_reconnect_storm_brings_every_device_back_past_the_handshake_guard() {
    for wait in ["1s", "0s"] {
        let wait_arg = format!("--proxy-arg={wait}");
        let doc = scenario(
            "storm",
            &[
                "--mode",
                "terminate",
                "--gateways",
                "2",
                "--devices",
                "60",
                "--proxy-arg=--max-handshakes",
                "--proxy-arg=4",
                "--proxy-arg=--handshake-wait",
                &wait_arg,
            ],
        );
        assert_eq!(doc["back"], 60, "{doc}");
        let refused = doc["refused"]["handshakes_busy"].as_f64().unwrap_or(0.0);
        if wait == "0s" {
            assert!(
                refused > 0.0,
                "60 handshakes at once past a cap of 4: {doc}"
            );
        } else {
            assert_eq!(refused, 0.0, "60 handshakes in line for a cap of 4: {doc}");
        }
        assert_eq!(doc["lost"], 0, "{doc}");
        assert_eq!(doc["state_resets"], 0, "{doc}");
        assert_eq!(doc["gateway_downs"], 0.0, "{doc}");
    }
}

/// A short soak through the terminating proxy over the link: churn, the last gateway killed
/// and replaced at a new address (out of and into the proxy's set at run time), a gateway
/// found in DNS moved to a new address (its record changed), a reload that keeps those
/// changes, a drain with moves; sampled all along. Nothing lost, no app state
/// restarted, every event done, and the long-lived processes' footprint within the bound.
#[test]
fn a_short_soak_loses_nothing_through_kills_drains_reloads_and_churn() {
    let doc = scenario(
        "soak",
        &[
            "--mode",
            "terminate",
            "--upstream",
            "link",
            "--gateways",
            "3",
            "--devices",
            "40",
            "--duration",
            "45s",
        ],
    );
    let events = doc["events"].as_array().unwrap();
    assert!(events.len() >= 4, "{doc}");
    let what = |s: &str| {
        events
            .iter()
            .filter(|e| e["what"].as_str().unwrap().starts_with(s))
            .count()
    };
    assert!(what("kill and replace gw-2") >= 2, "{events:?}");
    assert!(
        what("the discovered gateway moved in DNS") >= 2,
        "{events:?}"
    );
    assert!(what("reload") >= 1 && what("drain gw-0") >= 1, "{events:?}");
    assert!(events.iter().all(|e| e["ok"] == true), "{events:?}");
    assert!(doc["moves"].as_f64().unwrap() > 0.0, "{doc}");
    assert!(doc["churned"].as_u64().unwrap() > 0, "{doc}");
    assert_eq!(doc["lost"], 0, "{doc}");
    assert_eq!(doc["duplicated"], 0, "{doc}");
    assert_eq!(doc["state_resets"], 0, "{doc}");
    let samples = doc["samples"].as_array().unwrap();
    assert!(samples.len() >= 10, "{}", samples.len());
    for role in ["proxy", "fleet", "gw-0", "gw-1", "gw-2", "gw-dns"] {
        assert!(
            samples[1]["processes"][role]["rss_kib"].as_u64().unwrap() > 0,
            "{role}"
        );
        assert!(
            samples[1]["processes"][role]["fds"].as_u64().unwrap() > 0,
            "{role}"
        );
    }
    let growth = doc["growth"].as_array().unwrap();
    let roles: Vec<&str> = growth
        .iter()
        .map(|g| g["process"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        ["fleet", "gw-0", "gw-1", "proxy"],
        "gw-2 and gw-dns are replaced: not compared"
    );
}
