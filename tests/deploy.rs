//! The Kubernetes deploy as written: the Secrets `certs init --k8s-secrets` writes, mounted
//! where deploy/k8s mounts them; two gateways started with the Deployment's own arguments;
//! a proxy on the ConfigMap's proxy.toml, finding the gateways through DNS (a test server
//! standing in for the headless Service); a device's session; then the gateway's preStop
//! command (`wasmbed drain`), which moves the session to the other gateway with its app state;
//! and two proxies on the ConfigMap's config sharing one address, one of them killed under a
//! fleet: every device resumes through the other, its app state intact.
//! Only addresses change: listeners go to loopback, the DNS name to the test server's zone.

mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::process::Command;

use support::{BIN, ProxyProcess, addr_in, spawn_ready};
use wasmbed_protocol::Kind;
use wasmbed_testkit::dns::DnsServer;

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The Secrets of `secrets.yaml`: name -> key -> value.
fn secrets(text: &str) -> HashMap<String, HashMap<String, String>> {
    let mut all = HashMap::new();
    // Documents are separated by a line `---` (PEM lines end in dashes too).
    let text = format!("\n{text}");
    for doc in text.split("\n---\n").filter(|d| !d.trim().is_empty()) {
        let name = doc
            .lines()
            .find_map(|l| l.strip_prefix("  name: "))
            .expect("a Secret has a name")
            .to_string();
        let mut entries: HashMap<String, String> = HashMap::new();
        let mut current: Option<String> = None;
        let mut in_data = false;
        for line in doc.lines() {
            if line == "stringData:" {
                in_data = true;
            } else if !in_data {
                continue;
            } else if let Some(value) = line.strip_prefix("    ") {
                let key = current.clone().expect("a value under a key");
                let e = entries.entry(key).or_default();
                e.push_str(value);
                e.push('\n');
            } else if let Some(key) = line.strip_prefix("  ").and_then(|l| l.strip_suffix(": |")) {
                current = Some(key.to_string());
            }
        }
        all.insert(name, entries);
    }
    all
}

/// Writes Secret `name`'s keys as files in `dir` (a secret volume).
fn mount(all: &HashMap<String, HashMap<String, String>>, name: &str, dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    for (key, value) in &all[name] {
        std::fs::write(dir.join(key), value).unwrap();
    }
}

/// A proxy's `/api/gateways` list.
fn gateways_of(admin: SocketAddr) -> Vec<serde_json::Value> {
    let answer = wasmbed_testkit::Admin::new(admin)
        .get("/api/gateways")
        .unwrap();
    serde_json::from_str(&answer.body).unwrap()
}

/// A series of a proxy's `/metrics`.
fn metric(admin: SocketAddr, series: &str) -> f64 {
    let answer = wasmbed_testkit::Admin::new(admin).get("/metrics").unwrap();
    wasmbed_testkit::Metrics::parse(&answer.body).series(series)
}

/// How many gateways a proxy has up.
fn healthy(admin: SocketAddr) -> usize {
    gateways_of(admin)
        .iter()
        .filter(|g| g["healthy"] == true)
        .count()
}

/// The `- ` items of the list under `key:` in a manifest (the first such list).
fn list_under(manifest: &str, key: &str) -> Vec<String> {
    let mut lines = manifest.lines().skip_while(|l| l.trim() != key).skip(1);
    let first = lines.next().expect("a list");
    let indent = first.len() - first.trim_start().len();
    std::iter::once(first)
        .chain(lines)
        .take_while(|l| {
            l.len() - l.trim_start().len() == indent && l.trim_start().starts_with("- ")
        })
        .map(|l| l.trim_start()[2..].to_string())
        .collect()
}

/// The gateway pods of deploy/k8s (two, from the Deployment's arguments, on 127.0.0.2 and
/// 127.0.0.3 sharing ports), the Secrets mounted, a DNS server standing in for the headless
/// Service, and the ConfigMap's proxy.toml made local (written to `proxy.toml`).
struct Cluster {
    dir: tempfile::TempDir,
    gateways: [std::process::Child; 2],
    a_admin: SocketAddr,
    b_admin: SocketAddr,
    gateway_yaml: String,
    gw_root: std::path::PathBuf,
    config: std::path::PathBuf,
    _dns: DnsServer,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for gw in self.gateways.iter_mut() {
            let _ = gw.kill();
            let _ = gw.wait();
        }
    }
}

/// `/etc/wasmbed/...` of a manifest under `root`, the image's apps from the repository.
fn local(arg: &str, root: &Path) -> String {
    arg.replace("/etc/wasmbed/", &format!("{}/", root.display()))
        .replace("/usr/share/wasmbed/apps", &format!("{REPO}/apps"))
}

async fn cluster(devices: usize) -> Cluster {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let secrets_dir = root.join("secrets");
    support::certs_init(
        &root.join("pki"),
        &[
            "--devices",
            &devices.to_string(),
            "--gateways",
            "0",
            "--k8s-secrets",
            secrets_dir.to_str().unwrap(),
        ],
    );
    let all = secrets(&std::fs::read_to_string(root.join("secrets/secrets.yaml")).unwrap());
    // The volumes of deploy/k8s/base, under a directory per pod instead of /etc/wasmbed.
    let (gw_root, proxy_root) = (root.join("gateway"), root.join("proxy"));
    for (secret, dir) in [
        ("wasmbed-gateway-tls", gw_root.join("tls")),
        ("wasmbed-ca", gw_root.join("ca")),
        ("wasmbed-session-keys", gw_root.join("keys")),
        ("wasmbed-admin-token", gw_root.join("admin")),
        ("wasmbed-proxy-tls", proxy_root.join("tls")),
        ("wasmbed-proxy-client", proxy_root.join("client")),
        ("wasmbed-ca", proxy_root.join("ca")),
        ("wasmbed-admin-token", proxy_root.join("admin")),
        ("wasmbed-proxy-tickets", proxy_root.join("tickets")),
    ] {
        mount(&all, secret, &dir);
    }
    let gateway_yaml =
        std::fs::read_to_string(format!("{REPO}/deploy/k8s/base/gateway.yaml")).unwrap();
    // Two gateway pods: the Deployment's arguments, on two loopback addresses sharing the
    // session and admin ports (as pods of a headless Service do).
    let args: Vec<String> = list_under(&gateway_yaml, "args:")
        .iter()
        .map(|a| local(a, &gw_root))
        .collect();
    assert_eq!(args[0], "gateway");
    let spawn_gateway = |listen: String, admin: String| {
        let mut cmd = Command::new(BIN);
        for a in &args {
            let a = match a.split_once('=') {
                Some(("--listen", _)) => format!("--listen={listen}"),
                Some(("--admin", _)) => format!("--admin={admin}"),
                _ => a.clone(),
            };
            cmd.arg(a);
        }
        spawn_ready(&mut cmd)
    };
    let (gw_a, line) = spawn_gateway("127.0.0.2:0".into(), "127.0.0.2:0".into());
    let (a_sessions, a_admin) = (addr_in(&line, "listen="), addr_in(&line, "admin="));
    let (gw_b, line) = spawn_gateway(
        format!("127.0.0.3:{}", a_sessions.port()),
        format!("127.0.0.3:{}", a_admin.port()),
    );
    let b_admin = addr_in(&line, "admin=");
    // The headless Service's DNS name.
    let dns = DnsServer::start().await.unwrap();
    let ips = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
    dns.set_a("wasmbed-gateway", &ips, 1).await;
    // The ConfigMap's proxy.toml, with the discovery name and ports of this test.
    let toml = std::fs::read_to_string(format!("{REPO}/deploy/k8s/base/proxy.toml"))
        .unwrap()
        .replace(
            "dns = \"wasmbed-gateway:9001\"\nhealth_port = 9101",
            &format!(
                "dns = \"wasmbed-gateway.wasmbed.test:{}\"\nhealth_port = {}",
                a_sessions.port(),
                a_admin.port()
            ),
        );
    assert!(
        toml.contains("wasmbed-gateway.wasmbed.test"),
        "the discovery section as expected"
    );
    let toml = local(&toml, &proxy_root).replacen(
        "admin = \"0.0.0.0:9900\"",
        &format!("admin = \"0.0.0.0:9900\"\ndns_server = [\"{}\"]", dns.addr),
        1,
    );
    let config = root.join("proxy.toml");
    std::fs::write(&config, toml).unwrap();
    Cluster {
        gateways: [gw_a, gw_b],
        a_admin,
        b_admin,
        gateway_yaml,
        gw_root,
        config,
        _dns: dns,
        dir,
    }
}

#[tokio::test]
async fn the_k8s_manifests_run_as_written() {
    let c = cluster(1).await;
    let (a_admin, b_admin, gateway_yaml, gw_root, config) =
        (c.a_admin, c.b_admin, &c.gateway_yaml, &c.gw_root, &c.config);
    let root = c.dir.path();
    let proxy = ProxyProcess::start(&[], &["--config", config.to_str().unwrap()]);
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "both gateways found and up",
        || healthy(proxy.admin) == 2,
    )
    .await;
    // A device through the LoadBalancer's address.
    let tls = support::device_of(&root.join("pki"), "device-0000");
    let mut device = support::tls_device(proxy.listen, tls).await;
    device.open("device-0000", "counter").await;
    // The counter app answers its count (the first 8 bytes, little-endian).
    let count = |f: &wasmbed_protocol::Frame| {
        assert_eq!(f.kind, Kind::Reply, "{f:?}");
        u64::from_le_bytes(f.body[..8].try_into().unwrap())
    };
    for n in 1..=3 {
        assert_eq!(count(&device.data(b"tick").await), n);
    }
    // The preStop hook of the gateway that holds the session.
    let sessions = |admin: SocketAddr| -> u64 {
        let answer = wasmbed_testkit::Admin::new(admin).get("/healthz").unwrap();
        let status: serde_json::Value = serde_json::from_str(&answer.body).unwrap();
        status["sessions"].as_u64().unwrap()
    };
    let holder = if sessions(a_admin) == 1 {
        a_admin
    } else {
        b_admin
    };
    let pre_stop: Vec<String> = list_under(gateway_yaml, "command:")
        .iter()
        .map(|a| local(a, gw_root))
        .map(|a| match a.split_once('=') {
            Some(("--admin", _)) => format!("--admin={holder}"),
            _ => a,
        })
        .collect();
    assert_eq!(pre_stop[0], "/usr/local/bin/wasmbed");
    let drained = Command::new(BIN).args(&pre_stop[1..]).output().unwrap();
    let said = String::from_utf8_lossy(&drained.stdout);
    assert!(
        drained.status.success() && said.contains("drained"),
        "{said}"
    );
    assert_eq!(sessions(holder), 0);
    // The device noticed nothing: its count goes on, on the other gateway.
    assert_eq!(count(&device.data(b"tick").await), 4);
    let other = if holder == a_admin { b_admin } else { a_admin };
    assert_eq!(sessions(other), 1);
}

/// Two proxy pods of deploy/k8s on one address (the ConfigMap's proxy.toml as written:
/// `reuse_port`, the link, checkpoints to devices; only addresses made local), a fleet of
/// 40 devices sending to `counter` through it, and one proxy killed (SIGKILL, a node lost):
/// its devices resume through the other with their tickets: nothing lost, no app state
/// restarted.
#[tokio::test]
async fn two_proxies_from_the_manifests_lose_nothing_when_one_is_killed() {
    let c = cluster(40).await;
    let toml = std::fs::read_to_string(&c.config).unwrap();
    assert!(toml.contains("reuse_port = true") && toml.contains("upstream = \"link\""));
    let toml = toml.replacen("admin = \"0.0.0.0:9900\"", "admin = \"127.0.0.1:0\"", 1);
    let at = |listen: &str| {
        let path = c
            .dir
            .path()
            .join(format!("proxy-{}.toml", listen.replace(':', "_")));
        let text = toml.replacen(
            "addr = \"0.0.0.0:8443\"",
            &format!("addr = \"{listen}\""),
            1,
        );
        assert_ne!(text, toml, "the listener as expected");
        std::fs::write(&path, text).unwrap();
        let mut cmd = Command::new(BIN);
        cmd.arg("proxy").arg("--config").arg(&path);
        let (child, line) = spawn_ready(&mut cmd);
        (support::Killed(child), line)
    };
    let (mut a, line) = at("127.0.0.1:0");
    let listen = addr_in(&line, "listen=");
    let a_admin = addr_in(&line, "admin=");
    let (_b, line) = at(&listen.to_string());
    let b_admin = addr_in(&line, "admin=");
    assert_eq!(
        addr_in(&line, "listen="),
        listen,
        "one address, two proxies"
    );
    wasmbed_testkit::until(
        std::time::Duration::from_secs(10),
        "both proxies found both gateways",
        || healthy(a_admin) == 2 && healthy(b_admin) == 2,
    )
    .await;
    let json = c.dir.path().join("fleet.json");
    let mut fleet = Command::new(BIN)
        .args(["loadtest", "--target", &listen.to_string()])
        .arg("--ca-dir")
        .arg(c.dir.path().join("pki"))
        .arg("--devices-from")
        .arg(c.dir.path().join("pki"))
        .args(["--devices", "40", "--rate", "5", "--duration", "8s"])
        .args(["--app", "counter", "--json"])
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // (The fleet ends by itself: --duration bounds it.) Its line saying every device holds
    // a ticket is the moment to kill a proxy; by then both proxies hold sessions.
    let mut err = std::io::BufReader::new(fleet.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("holding a ticket") {
        line.clear();
        let n = std::io::BufRead::read_line(&mut err, &mut line).unwrap();
        assert!(n > 0, "the fleet ended before every device held a ticket");
    }
    let sessions = |admin: SocketAddr| -> u64 {
        gateways_of(admin)
            .iter()
            .filter_map(|g| g["sessions"].as_u64())
            .sum()
    };
    assert_eq!(sessions(a_admin) + sessions(b_admin), 40);
    let held = sessions(a_admin);
    assert!(held > 0, "the kernel spread the devices over both proxies");
    a.0.kill().unwrap();
    a.0.wait().unwrap();
    let out = fleet.wait_with_output().unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{table}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(report["connected"], 40, "{report}");
    assert!(
        report["reconnects"].as_u64().unwrap() >= held,
        "the killed proxy's {held} devices reconnected: {report}"
    );
    assert_eq!(
        report["state_resets"], 0,
        "no app state restarted: {report}"
    );
    assert_eq!(report["messages"]["lost"], 0, "{report}");
    assert_eq!(report["messages"]["duplicated"], 0, "{report}");
    // And resumed TLS on the other replica from the tickets the killed one sealed (the
    // replicas share `ticket_keys`): no certificate exchange, and no ticket refused.
    let tickets = |result: &str| {
        metric(
            b_admin,
            &format!("wasmbed_proxy_tls_tickets_total{{result=\"{result}\"}}"),
        )
    };
    assert!(
        tickets("opened") >= held as f64,
        "the {held} devices of the killed proxy resumed TLS on the other: {} opened",
        tickets("opened")
    );
    assert_eq!(tickets("refused"), 0.0);
}
