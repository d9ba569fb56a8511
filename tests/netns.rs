//! More than one host: the proxy, three gateways, the devices and the DNS server each in a
//! network namespace of their own (made by this test, joined by veth pairs to a bridge),
//! with their own addresses in 10.77.0.0/24. The proxy finds the gateways through DNS; one
//! gateway's process is killed mid-run; the spread before and the re-homing after are
//! checked. Needs root (network namespaces): elsewhere the test says so and passes nothing.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{BIN, Killed, spawn_ready};

/// Runs `ip ARGS`; panics with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The namespaces of one run; deleted (with their veths) when dropped.
struct Net {
    prefix: String,
    names: Vec<String>,
}

impl Net {
    fn ns(&self, host: &str) -> String {
        format!("{}-{host}", self.prefix)
    }

    /// A hub namespace with a bridge (10.77.0.1), and one namespace per host, each with a veth
    /// to the bridge and the address given.
    fn build(hosts: &[(&str, Ipv4Addr)]) -> Net {
        let prefix = format!("wb{}", std::process::id());
        let mut net = Net {
            prefix,
            names: Vec::new(),
        };
        let hub = net.ns("hub");
        ip(&["netns", "add", &hub]);
        net.names.push(hub.clone());
        ip(&["-n", &hub, "link", "set", "lo", "up"]);
        ip(&["-n", &hub, "link", "add", "br0", "type", "bridge"]);
        ip(&["-n", &hub, "addr", "add", "10.77.0.1/24", "dev", "br0"]);
        ip(&["-n", &hub, "link", "set", "br0", "up"]);
        for (i, (host, addr)) in hosts.iter().enumerate() {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns]);
            net.names.push(ns.clone());
            let (inner, outer) = (format!("v{i}"), format!("h{i}"));
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n", &ns, "link", "add", &inner, "type", "veth", "peer", "name", &outer, "netns",
                &hub,
            ]);
            ip(&["-n", &hub, "link", "set", &outer, "master", "br0", "up"]);
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                &inner,
            ]);
            ip(&["-n", &ns, "link", "set", &inner, "up"]);
        }
        net
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.names.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// Runs `f` on a thread that has joined namespace `ns` (sockets it opens live there).
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("the namespace's file");
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on a descriptor we hold open; it changes this thread's network
        // namespace only (a thread of our own, ended when `f` returns).
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("the namespace thread")
}

/// Whether this runner can make network namespaces (root, iproute2, netns support).
fn can_make_namespaces() -> Result<(), String> {
    // SAFETY: geteuid(2) reads the process's effective uid; no memory is touched.
    if unsafe { libc::geteuid() } != 0 {
        return Err("the test runner is not root".into());
    }
    let probe = format!("wb{}-probe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(out) if out.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            Ok(())
        }
        Ok(out) => Err(format!(
            "`ip netns add` failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("no `ip` (iproute2): {e}")),
    }
}

fn exec_in(ns: &str) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns, BIN]);
    c
}

/// Live sessions per gateway name, as the proxy's admin endpoint says.
fn spread(ns: &str, admin: SocketAddr) -> Vec<(String, bool, u64)> {
    in_netns(ns, move || {
        let answer = wasmbed_testkit::Admin::new(admin)
            .get("/api/gateways")
            .expect("the proxy's admin endpoint");
        let list: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        let mut v: Vec<(String, bool, u64)> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|g| {
                (
                    g["address"].as_str().unwrap().to_string(),
                    g["healthy"].as_bool().unwrap(),
                    g["sessions"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    })
}

#[test]
fn separate_hosts_dns_discovery_and_a_killed_gateway() {
    if let Err(why) = can_make_namespaces() {
        eprintln!("SKIPPED separate_hosts_dns_discovery_and_a_killed_gateway: {why}");
        return;
    }
    let gw_ips: Vec<Ipv4Addr> = (0..3).map(|i| Ipv4Addr::new(10, 77, 0, 10 + i)).collect();
    let proxy_ip = Ipv4Addr::new(10, 77, 0, 2);
    let mut hosts = vec![
        ("proxy", proxy_ip),
        ("devices", Ipv4Addr::new(10, 77, 0, 50)),
    ];
    let gw_names = ["gw0", "gw1", "gw2"];
    for (name, addr) in gw_names.iter().zip(&gw_ips) {
        hosts.push((name, *addr));
    }
    let net = Net::build(&hosts);
    let dir = tempfile::tempdir().unwrap();
    let pki = dir.path().join("pki");
    let pki_s = pki.to_str().unwrap().to_string();
    support::certs_init(&pki, &["--devices", "0", "--gateways", "3"]);
    // The DNS server on the hub (10.77.0.1), on a thread of its own in that namespace.
    let (tx, rx) = std::sync::mpsc::channel();
    let hub = net.ns("hub");
    let records = gw_ips.clone();
    std::thread::spawn(move || {
        in_netns(&hub, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let dns = wasmbed_testkit::dns::DnsServer::start_on("10.77.0.1:0".parse().unwrap())
                    .await
                    .unwrap();
                dns.set_a("gateways", &records, 1).await;
                tx.send(dns.addr).unwrap();
                std::future::pending::<()>().await;
            });
        })
    });
    let dns_addr = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the DNS server");
    // Three gateways, one per host, each its own certificate.
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let mut gateways: Vec<Killed> = Vec::new();
    for (i, ip) in gw_ips.iter().enumerate() {
        let d = |f: String| pki.join(f).to_str().unwrap().to_string();
        let (child, _) = spawn_ready(
            exec_in(&net.ns(gw_names[i]))
                .args(["gateway", "--name", &format!("gw-{i}")])
                .args([
                    "--listen",
                    &format!("{ip}:9001"),
                    "--admin",
                    &format!("{ip}:9101"),
                ])
                .args(["--apps", apps])
                .args(["--tls-cert", &d(format!("gateway-{i}.pem"))])
                .args(["--tls-key", &d(format!("gateway-{i}.key"))])
                .args(["--client-ca", &d("ca.pem".into())]),
        );
        gateways.push(Killed(child));
    }
    // The proxy on its host, gateways from DNS, http health on their admin port.
    let (proxy, _) = spawn_ready(
        exec_in(&net.ns("proxy"))
            .args(["proxy", "--listen", &format!("{proxy_ip}:8443")])
            .args(["--admin", &format!("{proxy_ip}:9900")])
            .args([
                "--gateway-dns",
                "gateways.wasmbed.test:9001;health-port=9101",
            ])
            .args(["--dns-server", &dns_addr.to_string()])
            .args([
                "--health",
                "http",
                "--health-interval",
                "200ms",
                "--fall",
                "2",
            ]),
    );
    let _proxy = Killed(proxy);
    let admin: SocketAddr = SocketAddr::new(proxy_ip.into(), 9900);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while spread(&net.ns("proxy"), admin)
        .iter()
        .filter(|g| g.1)
        .count()
        < 3
    {
        assert!(
            std::time::Instant::now() < deadline,
            "three gateways discovered and up"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // 30 devices from their own host, for 8 s.
    let report = dir.path().join("report.json");
    let fleet = exec_in(&net.ns("devices"))
        .args([
            "loadtest",
            "--ca-dir",
            &pki_s,
            "--target",
            &format!("{proxy_ip}:8443"),
        ])
        .args([
            "--devices",
            "30",
            "--rate",
            "4",
            "--duration",
            "8s",
            "--app",
            "counter",
        ])
        .args(["--json", report.to_str().unwrap()])
        .env("WASMBED_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut fleet = Killed(fleet);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let before = loop {
        let s = spread(&net.ns("proxy"), admin);
        if s.iter().map(|g| g.2).sum::<u64>() == 30 {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "30 sessions: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(before.iter().all(|g| g.2 == 10), "exact spread: {before:?}");
    // The proxy counts a session when it picks the gateway; wait until each gateway has
    // welcomed its ten (their HELLOs done), so that the kill cuts established sessions.
    for (i, ip) in gw_ips.iter().enumerate() {
        let admin = SocketAddr::new((*ip).into(), 9101);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let n = in_netns(&net.ns(gw_names[i]), move || {
                let answer = wasmbed_testkit::Admin::new(admin).get("/healthz").ok()?;
                let v: serde_json::Value = serde_json::from_str(&answer.body).ok()?;
                v["sessions"].as_u64()
            });
            if n == Some(10) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "gw-{i}: {n:?} sessions"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    // gw1's host loses its gateway process.
    drop(gateways.remove(1));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let after = loop {
        let s = spread(&net.ns("proxy"), admin);
        let on_live: u64 = s.iter().filter(|g| g.1).map(|g| g.2).sum();
        if on_live == 30 && s.iter().any(|g| !g.1) {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "re-homed: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let live: Vec<u64> = after.iter().filter(|g| g.1).map(|g| g.2).collect();
    assert_eq!(
        live,
        [15, 15],
        "the killed gateway's 10 split evenly: {after:?}"
    );
    assert!(fleet.0.wait().unwrap().success());
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r["connected"], 30, "{r}");
    assert_eq!(r["messages"]["lost"], 0, "{r}");
    assert_eq!(r["rehome_us"]["count"], 10, "{r}");
    eprintln!(
        "netns: spread before {before:?}, after {after:?}; re-home p50 {} us, p99 {} us",
        r["rehome_us"]["p50"], r["rehome_us"]["p99"]
    );
}
