//! Fleet benchmark of the proxy: N concurrent device sessions over G gateways.
//!
//! It starts G gateway stand-ins (this program with `backend`: echo + `/healthz`) and the
//! release `wasmbed proxy` as separate processes, opens N passthrough sessions at once (each
//! sends a real ClientHello and waits for its echo), then prints:
//! - the per-gateway session counts (balancer and gateways' own counts) and max - min;
//! - the proxy's resident memory per idle session;
//! - failover: a gateway hung with SIGSTOP (found by http health checks) and one killed with
//!   SIGKILL (its sockets reset): time from the event to the proxy closing the last session.
//!
//! Run: cargo build --release && cargo run --release --example fleet_bench -- --devices 9000

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use wasmbed_testkit::{Admin, Ready, rss_kib};

struct Args {
    devices: usize,
    gateways: usize,
    interval: String,
    fall: String,
}

const USAGE: &str = "fleet_bench [--devices N] [--gateways G] [--health-interval D] [--fall N]\n\
    (build first: cargo build --release --bins --examples)";

fn args() -> Args {
    let mut a = Args {
        devices: 9000,
        gateways: 5,
        interval: "250ms".into(),
        fall: "2".into(),
    };
    use wasmbed_testkit::example_args::{fail, pairs, parse};
    for (option, value) in pairs(USAGE) {
        match option.as_str() {
            "--devices" => a.devices = parse(USAGE, "--devices N", &value),
            "--gateways" => a.gateways = parse(USAGE, "--gateways N", &value),
            "--health-interval" => a.interval = value,
            "--fall" => a.fall = value,
            other => fail(USAGE, &format!("unknown option {other}")),
        }
    }
    a
}

fn main() {
    rlimit::increase_nofile_limit(u64::MAX).ok();
    let mut argv = std::env::args().skip(1);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if argv.next().as_deref() == Some("backend") {
        runtime.block_on(backend());
    } else {
        runtime.block_on(drive(args()));
    }
}

// ---------------------------------------------------------------- gateway stand-in

async fn backend() {
    let data = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let health = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    println!(
        "ready {} {}",
        data.local_addr().unwrap(),
        health.local_addr().unwrap()
    );
    std::io::stdout().flush().ok();
    let live = Arc::new(AtomicUsize::new(0));
    let l2 = live.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = health.accept().await {
            let n = l2.load(Ordering::Relaxed);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
                let body = format!("{{\"sessions\":{n}}}");
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            });
        }
    });
    while let Ok((mut s, _)) = data.accept().await {
        let live = live.clone();
        live.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            while let Ok(n @ 1..) = s.read(&mut buf).await {
                if s.write_all(&buf[..n]).await.is_err() {
                    break;
                }
            }
            live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

// ---------------------------------------------------------------- driver

fn spawn_ready(cmd: &mut Command) -> (Child, Ready) {
    wasmbed_testkit::spawn_ready(cmd.stderr(Stdio::inherit())).unwrap_or_else(|e| panic!("{e}"))
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill {sig}");
}

fn http_get(addr: SocketAddr, path: &str) -> String {
    Admin::new(addr)
        .get(path)
        .unwrap_or_else(|e| panic!("{e}"))
        .body
}

fn gateway_counts(admin: SocketAddr) -> Vec<(String, u64, bool)> {
    let v: serde_json::Value =
        serde_json::from_str(&http_get(admin, "/api/gateways")).expect("gateway JSON");
    v.as_array()
        .unwrap()
        .iter()
        .map(|g| {
            (
                g["name"].as_str().unwrap().to_string(),
                g["sessions"].as_u64().unwrap(),
                g["healthy"].as_bool().unwrap(),
            )
        })
        .collect()
}

fn client_hello() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let name = "device.bench.example".try_into().unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut out = Vec::new();
    conn.write_tls(&mut out).unwrap();
    out
}

enum Event {
    Up,
    Failed(String),
    Closed(Instant),
}

async fn device(
    proxy: SocketAddr,
    hello: Arc<Vec<u8>>,
    gate: Arc<Semaphore>,
    tx: mpsc::UnboundedSender<Event>,
) {
    let permit = gate.acquire().await;
    let connect = async {
        let mut s = TcpStream::connect(proxy).await?;
        s.write_all(&hello).await?;
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await?;
        std::io::Result::Ok(s)
    };
    let mut s = match connect.await {
        Ok(s) => s,
        Err(e) => {
            let _ = tx.send(Event::Failed(e.to_string()));
            return;
        }
    };
    drop(permit);
    let _ = tx.send(Event::Up);
    let mut b = [0u8; 64];
    while let Ok(1..) = s.read(&mut b).await {}
    let _ = tx.send(Event::Closed(Instant::now()));
}

async fn drive(a: Args) {
    let exe = std::env::current_exe().expect("own path");
    let wasmbed = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("wasmbed"))
        .expect("target dir");
    let mut backends = Vec::new();
    let mut gw_flags = Vec::new();
    for i in 0..a.gateways {
        let (child, line) = spawn_ready(Command::new(&exe).arg("backend"));
        let mut words = line.0.split_whitespace().skip(1);
        let (data, health) = (
            words.next().unwrap().to_string(),
            words.next().unwrap().to_string(),
        );
        gw_flags.push(format!("gw-{i}={data};health={health}"));
        backends.push(child);
    }
    let (mut proxy, line) = spawn_ready(
        Command::new(&wasmbed)
            .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args([
                "--health",
                "http",
                "--health-interval",
                &a.interval,
                "--fall",
                &a.fall,
            ])
            .args(["--max-connections", "9500"])
            .arg("--gateway")
            .arg(gw_flags.join(","))
            .env("WASMBED_LOG", "warn"),
    );
    let field = |k: &str| -> SocketAddr { line.addr(k).expect("ready line") };
    let (listen, admin) = (field("listen="), field("admin="));
    let hello = Arc::new(client_hello());
    println!(
        "## fleet_bench: {} devices over {} gateways",
        a.devices, a.gateways
    );
    println!(
        "- ClientHello {} bytes (post-quantum key share), health http every {} fall {}",
        hello.len(),
        a.interval,
        a.fall
    );

    // Warm up the proxy's allocator and runtime with a few sessions, then take the baseline.
    {
        let gate = Arc::new(Semaphore::new(64));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let warm: Vec<_> = (0..50)
            .map(|_| tokio::spawn(device(listen, hello.clone(), gate.clone(), tx.clone())))
            .collect();
        for _ in 0..50 {
            rx.recv().await;
        }
        warm.iter().for_each(|t| t.abort());
        while gateway_counts(admin).iter().map(|g| g.1).sum::<u64>() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let rss_before = rss_kib(proxy.id());

    let gate = Arc::new(Semaphore::new(512));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let started = Instant::now();
    for _ in 0..a.devices {
        tokio::spawn(device(listen, hello.clone(), gate.clone(), tx.clone()));
    }
    let (mut up, mut failed) = (0, Vec::new());
    while up + failed.len() < a.devices {
        match rx.recv().await.expect("events") {
            Event::Up => up += 1,
            Event::Failed(e) => failed.push(e),
            Event::Closed(_) => failed.push("closed early".into()),
        }
    }
    let burst = started.elapsed();
    let counts = gateway_counts(admin);
    let own: Vec<u64> = counts.iter().map(|c| c.1).collect();
    let (max, min) = (own.iter().max().unwrap(), own.iter().min().unwrap());
    println!(
        "- sessions up: {up}/{} in {:.2}s ({} failed{})",
        a.devices,
        burst.as_secs_f64(),
        failed.len(),
        failed
            .first()
            .map(|e| format!(", e.g. {e}"))
            .unwrap_or_default()
    );
    println!("- per-gateway sessions: {own:?}  max - min = {}", max - min);
    tokio::time::sleep(Duration::from_millis(600)).await; // one health round: gateways report
    let reported: Vec<String> = gateway_counts(admin).iter().map(|g| g.0.clone()).collect();
    let v: serde_json::Value = serde_json::from_str(&http_get(admin, "/api/gateways")).unwrap();
    let theirs: Vec<u64> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["reported_sessions"].as_u64().unwrap_or(0))
        .collect();
    println!(
        "- gateways' own counts (from /healthz): {theirs:?} ({})",
        reported.join(",")
    );
    let rss_after = rss_kib(proxy.id());
    let per = (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / up as f64;
    println!(
        "- proxy RSS: {rss_before} KiB before, {rss_after} KiB with {up} idle sessions: {per:.0} bytes per session"
    );

    // Two different things, reported apart:
    // (b) detection: a gateway whose host vanishes sends nothing (SIGSTOP stands in for a
    //     host cut off without a FIN): only the proxy's health checks can find it, and the
    //     proxy then closes its sessions;
    // (a) pass-through: a gateway process that dies on a live host has its kernel send
    //     FIN/RST on every socket; the proxy merely passes those on, before it has detected
    //     anything (its own detection follows from failed connects and the probe that the
    //     resets bring forward).
    for (gw, how, sig) in [
        (
            0usize,
            "hung (SIGSTOP: no FIN, as a vanished host): closed by the proxy on detection",
            "-STOP",
        ),
        (
            1,
            "killed (SIGKILL: its kernel sends FIN/RST): closes passed through from the dead process",
            "-KILL",
        ),
    ] {
        let n = gateway_counts(admin)[gw].1 as usize;
        signal(&backends[gw], sig);
        let t0 = Instant::now();
        let mut closes = Vec::new();
        let mut marked_down = None;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        let mut poll = tokio::time::interval(Duration::from_millis(10));
        while closes.len() < n || marked_down.is_none() {
            tokio::select! {
                e = tokio::time::timeout_at(deadline, rx.recv()) => match e {
                    Ok(Some(Event::Closed(at))) => closes.push(at.saturating_duration_since(t0)),
                    Ok(Some(_)) => {}
                    _ => break,
                },
                _ = poll.tick(), if marked_down.is_none() => {
                    if !gateway_counts(admin)[gw].2 {
                        marked_down = Some(t0.elapsed());
                    }
                }
            }
        }
        let last = closes.iter().max().copied().unwrap_or_default();
        let first = closes.iter().min().copied().unwrap_or_default();
        println!(
            "- gw-{gw} {how}: {}/{n} sessions closed; first after {:.0} ms, last after {:.0} ms; proxy marked it down after {}",
            closes.len(),
            first.as_secs_f64() * 1e3,
            last.as_secs_f64() * 1e3,
            marked_down.map_or("(not within 15 s)".to_string(), |d| format!(
                "{:.0} ms",
                d.as_secs_f64() * 1e3
            ))
        );
    }
    let after = gateway_counts(admin);
    println!(
        "- after: {:?}",
        after
            .iter()
            .map(|g| (g.0.as_str(), g.1, g.2))
            .collect::<Vec<_>>()
    );
    signal(&backends[0], "-CONT");
    for b in backends.iter_mut() {
        let _ = b.kill();
        let _ = b.wait();
    }
    let _ = proxy.kill();
    let _ = proxy.wait();
}
