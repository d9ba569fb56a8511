//! `wasmbed proxy --config FILE` reloads the file on SIGHUP, with the same flags laid over it;
//! a broken file keeps the running config.

mod support;

use std::time::{Duration, Instant};

use support::{ProxyProcess, echo_server};

fn gateways(proxy: &ProxyProcess) -> Vec<String> {
    let (_, body) = proxy.get("/api/gateways");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut names: Vec<String> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sighup_reloads_the_config_file() {
    let (a, b) = (echo_server(), echo_server());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    let gateway = |name: &str, addr| format!("[[gateway]]\nname = \"{name}\"\naddr = \"{addr}\"\n");
    std::fs::write(&file, gateway("gw-a", a)).unwrap();
    let proxy = ProxyProcess::start(
        &[],
        &[
            "--config",
            file.to_str().unwrap(),
            "--allow-plain",
            "--health",
            "tcp",
        ],
    );
    assert_eq!(gateways(&proxy), ["gw-a"]);
    std::fs::write(&file, gateway("gw-a", a) + &gateway("gw-b", b)).unwrap();
    proxy.signal(libc::SIGHUP);
    until("gw-b added by the reload", || {
        gateways(&proxy) == ["gw-a", "gw-b"]
    });
    // Counted once the reload has returned, a moment after its gateways are in the set (a
    // scrape in between reads 0: seen once in CI).
    until("the reload counted", || {
        proxy.metric("wasmbed_proxy_config_reloads_total{result=\"ok\"}") == 1.0
    });
    // Half-written: refused, counted, the running set stays.
    std::fs::write(&file, "[[gateway]]\nname = \"gw-c").unwrap();
    proxy.signal(libc::SIGHUP);
    until("the refusal counted", || {
        proxy.metric("wasmbed_proxy_config_reloads_total{result=\"error\"}") == 1.0
    });
    assert_eq!(gateways(&proxy), ["gw-a", "gw-b"]);
}
