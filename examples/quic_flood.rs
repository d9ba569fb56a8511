//! What a flood of QUIC Initials costs the proxy, with `--quic-retry always` (each answered
//! by a stateless Retry), `never` (each starts a TLS handshake) and `auto` (Retry once 256
//! handshakes are in progress): one real client Initial
//! (N quinn clients' first flights, captured), each sent once from its own UDP socket, as an attacker
//! spoofing N source addresses would (no socket answers what comes back). Prints, per run and
//! as medians: the proxy's CPU time per Initial (all its threads, from
//! /proc/PID/task/*/schedstat, nanoseconds) and its RSS growth per Initial.
//!
//! Run: cargo build --release && cargo run --release --example quic_flood -- [--runs 3] [--initials 4000]

use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use wasmbed_testkit::Ready;

const BIN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/wasmbed");

const USAGE: &str = "quic_flood [--runs N] [--initials N]  (after cargo build --release)";

fn main() {
    let (mut runs, mut initials) = (3usize, 4000usize);
    use wasmbed_testkit::example_args::{fail, pairs, parse};
    for (option, value) in pairs(USAGE) {
        match option.as_str() {
            "--runs" => runs = parse(USAGE, "--runs N", &value),
            "--initials" => initials = parse(USAGE, "--initials N", &value),
            other => fail(USAGE, &format!("unknown option {other}")),
        }
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = dir.path();
    let status = Command::new(BIN)
        .args([
            "certs",
            "init",
            "--devices",
            "1",
            "--gateways",
            "0",
            "--dir",
        ])
        .arg(pki)
        .stdout(Stdio::null())
        .status()
        .expect("run wasmbed certs init (cargo build --release first)");
    assert!(status.success(), "certs init failed");
    let flights = capture_flights(pki, initials);
    assert!(
        flights.len() * 10 >= initials * 9,
        "caught {} of {initials} flights",
        flights.len()
    );
    println!(
        "CPU: {}",
        std::fs::read_to_string("/proc/cpuinfo")
            .unwrap_or_default()
            .lines()
            .find(|l| l.starts_with("model name"))
            .unwrap_or("unknown")
    );
    println!(
        "{} client first flights (the first: {} datagrams, {} bytes), each sent once from its own socket",
        flights.len(),
        flights[0].len(),
        flights[0].iter().map(Vec::len).sum::<usize>()
    );
    let mut results: Vec<(&str, Vec<(f64, f64)>)> =
        vec![("always", vec![]), ("auto", vec![]), ("never", vec![])];
    for run in 1..=runs {
        for (mode, samples) in results.iter_mut() {
            let (ns, rss, back, back_bytes) = flood(pki, mode, &flights);
            println!(
                "run {run} --quic-retry {mode:6}: {ns:8.1} µs of proxy CPU per flight, {rss:7.0} bytes of RSS growth, answered with {back:.1} datagrams ({back_bytes:.0} bytes)",
                ns = ns / 1000.0
            );
            samples.push((ns, rss));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut medians = Vec::new();
    for (mode, samples) in &results {
        let cpu = median(samples.iter().map(|s| s.0).collect());
        let rss = median(samples.iter().map(|s| s.1).collect());
        println!(
            "median --quic-retry {mode:6}: {:8.1} µs of proxy CPU per flight, {rss:7.0} B of RSS",
            cpu / 1000.0
        );
        medians.push(cpu);
    }
    println!(
        "ratio never / always (CPU per flight): {:.1}x; auto / always: {:.1}x",
        medians[2] / medians[0],
        medians[1] / medians[0]
    );
}

/// `n` quinn clients' first flights (each its Initial datagrams carrying a ClientHello: two
/// with a post-quantum key share, each client its own connection ID), caught by a socket
/// posing as the server. Distinct IDs matter: quinn finds a connection by its ID, so one
/// flight sent from many addresses would be one connection.
fn capture_flights(pki: &std::path::Path, n: usize) -> Vec<Vec<Vec<u8>>> {
    let catcher = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let _ = socket2::SockRef::from(&catcher).set_recv_buffer_size(8 << 20);
    let target = catcher.local_addr().expect("addr");
    let ca = wasmbed_certs::load_certs(&pki.join("ca.pem")).expect("ca.pem");
    let mut tls = (*wasmbed_certs::client_config(&ca, None).expect("client config")).clone();
    tls.alpn_protocols = vec![b"wasmbed/1".to_vec()];
    let crypto = Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls)).expect("TLS 1.3"),
    );
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (_endpoint, _connecting) = rt.block_on(async {
        let endpoint =
            quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("endpoint");
        let mut connecting = Vec::new();
        for _ in 0..n {
            let config = quinn::ClientConfig::new(crypto.clone());
            connecting.push(
                endpoint
                    .connect_with(config, target, "localhost")
                    .expect("connect"),
            );
            if connecting.len() % 128 == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        // Let the drivers send; no resend comes before the client's first probe timeout.
        tokio::time::sleep(Duration::from_millis(300)).await;
        (endpoint, connecting)
    });
    let mut flights: std::collections::HashMap<Vec<u8>, Vec<Vec<u8>>> = Default::default();
    let mut order = Vec::new();
    catcher
        .set_read_timeout(Some(Duration::from_millis(200)))
        .expect("timeout");
    let mut buf = vec![0u8; 2048];
    while let Ok((len, _)) = catcher.recv_from(&mut buf) {
        // Long header: flags, version (4), DCID length, DCID.
        let Some(&dcid_len) = buf.get(5) else {
            continue;
        };
        let Some(dcid) = buf.get(6..6 + usize::from(dcid_len)) else {
            continue;
        };
        let entry = flights.entry(dcid.to_vec()).or_insert_with(|| {
            order.push(dcid.to_vec());
            Vec::new()
        });
        entry.push(buf[..len].to_vec());
    }
    order
        .into_iter()
        .filter_map(|id| flights.remove(&id))
        .collect()
}

/// CPU time of every thread of `pid`, in nanoseconds.
fn cpu_ns(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum()
}

/// Starts a proxy with `--quic-retry mode`, floods it; returns per flight: CPU ns, RSS bytes,
/// datagrams and bytes sent back.
fn flood(pki: &std::path::Path, mode: &str, flights: &[Vec<Vec<u8>>]) -> (f64, f64, f64, f64) {
    let n = flights.len();
    let d = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let mut cmd = Command::new(BIN);
    cmd.args([
        "proxy",
        "--mode",
        "terminate",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "off",
    ])
    .args(["--tls-cert", &d("proxy.pem"), "--tls-key", &d("proxy.key")])
    .args([
        "--client-ca",
        &d("ca.pem"),
        "--gateway",
        "127.0.0.1:9",
        "--health",
        "none",
    ])
    .args(["--quic-listen", "127.0.0.1:0", "--quic-retry", mode])
    .env("WASMBED_LOG", "error")
    .stderr(Stdio::null());
    let (mut child, ready): (Child, Ready) =
        wasmbed_testkit::spawn_ready(&mut cmd).expect("the proxy's ready line");
    let quic: SocketAddr = ready.addr("quic=").expect("quic= in the ready line");
    let pid = child.id();
    std::thread::sleep(Duration::from_millis(300));
    let (cpu0, rss0) = (cpu_ns(pid), wasmbed_testkit::rss_kib(pid));
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    for (i, (s, flight)) in sockets.iter().zip(flights).enumerate() {
        for datagram in flight {
            let _ = s.send_to(datagram, quic);
        }
        if i % 256 == 255 {
            // Paced a little: the kernel's socket buffer would drop a burst, not the proxy.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // Until the proxy is done with them (its CPU time stops growing).
    let mut last = cpu_ns(pid);
    loop {
        std::thread::sleep(Duration::from_secs(1));
        let now = cpu_ns(pid);
        if now - last < 5_000_000 {
            break;
        }
        last = now;
    }
    let (cpu1, rss1) = (cpu_ns(pid), wasmbed_testkit::rss_kib(pid));
    let _ = child.kill();
    let _ = child.wait();
    // What came back to the "spoofed" sources (the amplification an attacker gets).
    let (mut datagrams, mut bytes) = (0usize, 0usize);
    let mut buf = vec![0u8; 2048];
    for s in &sockets {
        let _ = s.set_nonblocking(true);
        while let Ok(len) = s.recv(&mut buf) {
            datagrams += 1;
            bytes += len;
        }
    }
    (
        (cpu1 - cpu0) as f64 / n as f64,
        (rss1.saturating_sub(rss0) * 1024) as f64 / n as f64,
        datagrams as f64 / n as f64,
        bytes as f64 / n as f64,
    )
}
