//! What 100 dashboard subscribers cost the forwarding path: small request/response load
//! through the release `wasmbed proxy` (passthrough, plain TCP to an echo gateway), with no
//! `/api/events` subscriber and with 100 of them, in interleaved runs. Prints, per run and as
//! medians: round trips per second, p99 latency, the proxy's CPU time per round trip, and
//! what the subscribers received (to show they were live).
//!
//! Run: cargo build --release && cargo run --release --example sse_bench -- [--runs 3] [--seconds 5]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use wasmbed_testkit::Ready;

const CONNECTIONS: usize = 32;
const SUBSCRIBERS: usize = 100;

const USAGE: &str = "sse_bench [--runs N] [--seconds N]  (after cargo build --release)";

fn main() {
    let mut runs = 3;
    let mut seconds = 5;
    use wasmbed_testkit::example_args::{fail, pairs, parse};
    for (option, value) in pairs(USAGE) {
        match option.as_str() {
            "--runs" => runs = parse(USAGE, "--runs N", &value),
            "--seconds" => seconds = parse(USAGE, "--seconds N", &value),
            other => fail(USAGE, &format!("unknown option {other}")),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(drive(runs, Duration::from_secs(seconds)));
}

async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if s.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

struct Run {
    per_second: f64,
    p99_us: u64,
    cpu_us: f64,
    sse_bytes: u64,
}

/// Subscribers: raw `GET /api/events`, reading until `stop`.
async fn subscribe(admin: SocketAddr, n: usize, stop: Arc<AtomicBool>, bytes: Arc<AtomicU64>) {
    for _ in 0..n {
        let (stop, bytes) = (stop.clone(), bytes.clone());
        let mut s = TcpStream::connect(admin).await.expect("admin");
        s.write_all(
            b"GET /api/events HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n",
        )
        .await
        .expect("request");
        tokio::spawn(async move {
            let mut buf = vec![0u8; 16 * 1024];
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return,
                    Ok(Ok(n)) => {
                        bytes.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(_) => {}
                }
            }
        });
    }
}

async fn load(
    proxy: SocketAddr,
    pid: u32,
    admin: SocketAddr,
    subscribers: usize,
    time: Duration,
) -> Run {
    let stop = Arc::new(AtomicBool::new(false));
    let sse_bytes = Arc::new(AtomicU64::new(0));
    if subscribers > 0 {
        subscribe(admin, subscribers, stop.clone(), sse_bytes.clone()).await;
        // Let every subscriber get its first snapshot before measuring.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    let mut conns = Vec::new();
    for _ in 0..CONNECTIONS {
        let s = TcpStream::connect(proxy).await.expect("proxy");
        s.set_nodelay(true).ok();
        conns.push(s);
    }
    let sse_before = sse_bytes.load(Ordering::Relaxed);
    let cpu_before = wasmbed_testkit::cpu_ticks(pid);
    let started = Instant::now();
    let until = started + time;
    let mut tasks = Vec::new();
    for mut s in conns {
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("histogram");
            let msg = [7u8; 64];
            let mut back = [0u8; 64];
            let mut n = 0u64;
            while Instant::now() < until {
                let t = Instant::now();
                if s.write_all(&msg).await.is_err() || s.read_exact(&mut back).await.is_err() {
                    break;
                }
                let _ = h.record(t.elapsed().as_micros() as u64);
                n += 1;
            }
            (n, h)
        }));
    }
    let mut total = 0;
    let mut hist = Histogram::<u64>::new(3).expect("histogram");
    for t in tasks {
        let (n, h) = t.await.expect("task");
        total += n;
        hist.add(h).expect("same bounds");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = (wasmbed_testkit::cpu_ticks(pid) - cpu_before) as f64 * 10_000.0; // ticks of 10 ms, in µs
    let sse = sse_bytes.load(Ordering::Relaxed) - sse_before;
    stop.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    Run {
        per_second: total as f64 / elapsed,
        p99_us: hist.value_at_quantile(0.99),
        cpu_us: cpu / total.max(1) as f64,
        sse_bytes: sse,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn drive(runs: usize, time: Duration) {
    let backend = echo_backend().await;
    let bin = concat!(env!("CARGO_MANIFEST_DIR"), "/target/release/wasmbed");
    let mut cmd = Command::new(bin);
    cmd.args([
        "proxy",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--allow-plain",
    ])
    .args(["--health", "tcp", "--gateway", &format!("gw={backend}")])
    .env("WASMBED_LOG", "warn")
    .stderr(Stdio::null());
    let (mut child, ready): (Child, Ready) = wasmbed_testkit::spawn_ready(&mut cmd).expect("proxy");
    let listen = ready.addr("listen=").expect("listen");
    let admin = ready.addr("admin=").expect("admin");
    println!("CPU: {}", cpu_model());
    println!(
        "{CONNECTIONS} connections, 64-byte echo round trips, {}s per run, {runs} interleaved pairs",
        time.as_secs()
    );
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for r in 0..runs {
        // Alternate which goes first, so drift on a shared machine hits both.
        let order = if r % 2 == 0 {
            [0, SUBSCRIBERS]
        } else {
            [SUBSCRIBERS, 0]
        };
        for subs in order {
            let run = load(listen, child.id(), admin, subs, time).await;
            println!(
                "run {r} subscribers {subs:>3}: {:>8.0} round trips/s  p99 {:>5} us  proxy CPU {:.2} us/round trip  SSE {} KiB received",
                run.per_second,
                run.p99_us,
                run.cpu_us,
                run.sse_bytes / 1024
            );
            if subs == 0 { &mut without } else { &mut with }.push(run);
        }
    }
    let m = |v: &[Run], f: fn(&Run) -> f64| median(v.iter().map(f).collect());
    let (r0, r1) = (m(&without, |r| r.per_second), m(&with, |r| r.per_second));
    let (p0, p1) = (
        m(&without, |r| r.p99_us as f64),
        m(&with, |r| r.p99_us as f64),
    );
    let (c0, c1) = (m(&without, |r| r.cpu_us), m(&with, |r| r.cpu_us));
    println!(
        "median, no subscriber : {r0:.0} round trips/s, p99 {p0:.0} us, {c0:.2} us CPU/round trip"
    );
    println!(
        "median, {SUBSCRIBERS} subscribers: {r1:.0} round trips/s, p99 {p1:.0} us, {c1:.2} us CPU/round trip"
    );
    println!(
        "ratio with/without: throughput {:.3}, p99 {:.3}, CPU per round trip {:.3}",
        r1 / r0,
        p1 / p0,
        c1 / c0
    );
    let _ = child.kill();
    let _ = child.wait();
}
