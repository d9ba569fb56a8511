//! Gateway benchmark: instantiation time per session, and echo REPLY throughput and latency
//! at N concurrent sessions on one gateway process, with its resident memory per session.
//!
//! Run: cargo build --release --bins --examples &&
//!      ./target/release/examples/gateway_bench --sessions 1000,10000 --seconds 5

use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::net::TcpStream;
use wasmbed_protocol::Kind;
use wasmbed_testkit::{Device, rss_kib, spawn_ready};

const APPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");

fn main() {
    rlimit::increase_nofile_limit(u64::MAX).ok();
    let mut sessions = vec![1000usize, 10_000];
    let mut seconds = 5u64;
    let mut rate = 10_000f64;
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let v = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--sessions" => {
                sessions = v
                    .split(',')
                    .map(|n| n.parse().expect("--sessions N[,N]"))
                    .collect()
            }
            "--seconds" => seconds = v.parse().expect("--seconds S"),
            "--rate" => rate = v.parse().expect("--rate MSGS_PER_S"),
            o => panic!("unknown option {o}"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        instantiation().await;
        for n in sessions {
            load(n, Duration::from_secs(seconds), None).await;
            load(n, Duration::from_secs(seconds), Some(rate)).await;
        }
    });
}

fn pct(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

async fn instantiation() {
    use wasmbed_gateway::host::{Host, Limits};
    let host = Host::new(Limits {
        call_timeout: Duration::from_millis(50),
        max_memory: 4 << 20,
        max_instances: 1000,
        max_frame: 64 << 10,
        max_state: 16 << 10,
    })
    .unwrap();
    let app = host
        .compile("echo", &std::fs::read(format!("{APPS}/echo.wat")).unwrap())
        .unwrap();
    let mut h = Histogram::<u64>::new(3).unwrap();
    for i in 0..25_000 {
        let t = Instant::now();
        let inst = host.instantiate(&app, "d").await.unwrap();
        let ns = t.elapsed().as_nanos() as u64;
        drop(inst);
        if i >= 5_000 {
            h.record(ns).unwrap();
        }
    }
    println!(
        "## instantiation (Store + limiter + epoch deadline + pooled instance + exports), echo.wat, 20,000 after 5,000 warm-up"
    );
    println!(
        "- p50 {:.2} us, p90 {:.2} us, p99 {:.2} us, max {:.2} us",
        pct(&h, 0.5),
        pct(&h, 0.9),
        pct(&h, 0.99),
        h.max() as f64 / 1000.0
    );
}

fn gateway(max: usize) -> (Child, SocketAddr) {
    let exe = std::env::current_exe().unwrap();
    let bin = exe
        .parent()
        .and_then(|p| p.parent())
        .unwrap()
        .join("wasmbed");
    let (child, line) = spawn_ready(
        Command::new(bin)
            .args([
                "gateway",
                "--insecure-plaintext",
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "off",
            ])
            .args([
                "--apps",
                APPS,
                "--max-sessions",
                &(max + 100).to_string(),
                "--idle-timeout",
                "10m",
            ])
            .env("WASMBED_LOG", "warn"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (child, line.addr("listen=").expect("listen address"))
}

/// `rate`: None = closed loop (each session sends its next DATA when the REPLY arrives);
/// Some(r) = open loop, r messages per second over all sessions, each at a fixed interval.
async fn load(n: usize, duration: Duration, rate: Option<f64>) {
    let (mut child, addr) = gateway(n);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss0 = rss_kib(child.id());
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let opened = Instant::now();
    let mut conns = Vec::with_capacity(n);
    let mut tasks = Vec::new();
    for i in 0..n {
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire().await.unwrap();
            let s = TcpStream::connect(addr).await.unwrap();
            s.set_nodelay(true).unwrap();
            let mut device = Device::new(s);
            device.open(&format!("device-{i:05}"), "echo").await;
            device
        }));
    }
    for t in tasks {
        conns.push(t.await.unwrap());
    }
    let open_time = opened.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss1 = rss_kib(child.id());
    let payload = vec![7u8; 64];
    let deadline = Instant::now() + duration;
    let started = Instant::now();
    let workers: Vec<_> = conns
        .into_iter()
        .map(|mut s| {
            let payload = payload.clone();
            tokio::spawn(async move {
                let mut h = Histogram::<u64>::new(3).unwrap();
                let interval = rate.map(|r| Duration::from_secs_f64(n as f64 / r));
                let mut next = Instant::now()
                    + interval.map_or(Duration::ZERO, |i| i.mul_f64(fastrand::f64()));
                while Instant::now() < deadline {
                    if let Some(i) = interval {
                        tokio::time::sleep_until(next.into()).await;
                        next += i;
                        if Instant::now() >= deadline {
                            break;
                        }
                    }
                    let t = Instant::now();
                    let f = s.data(&payload).await;
                    assert_eq!(f.kind, Kind::Reply);
                    h.record(t.elapsed().as_nanos() as u64).unwrap();
                }
                (h, s)
            })
        })
        .collect();
    let mut total = Histogram::<u64>::new(3).unwrap();
    let mut keep = Vec::new();
    for w in workers {
        let (h, s) = w.await.unwrap();
        total.add(&h).unwrap();
        keep.push(s);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss2 = rss_kib(child.id());
    let mode = rate.map_or(
        "closed loop: next DATA when the REPLY arrives".to_string(),
        |r| format!("open loop: {r:.0} DATA/s in all"),
    );
    println!(
        "## echo on one gateway, {n} concurrent sessions (plain TCP, 64-byte DATA, {mode}, {:.0} s)",
        duration.as_secs_f64()
    );
    println!(
        "- sessions opened (HELLO -> WELCOME, 256 in flight) in {:.2} s",
        open_time.as_secs_f64()
    );
    println!(
        "- REPLY throughput: {:.0} replies/s ({} in {elapsed:.1} s)",
        total.len() as f64 / elapsed,
        total.len()
    );
    println!(
        "- REPLY latency: p50 {:.0} us, p90 {:.0} us, p99 {:.0} us, p99.9 {:.0} us, max {:.0} us",
        pct(&total, 0.5),
        pct(&total, 0.9),
        pct(&total, 0.99),
        pct(&total, 0.999),
        total.max() as f64 / 1000.0
    );
    println!(
        "- gateway RSS: {rss0} KiB idle, {rss1} KiB with {n} sessions ({:.1} KiB per session), {rss2} KiB after the load",
        (rss1.saturating_sub(rss0)) as f64 / n as f64
    );
    drop(keep);
    let _ = child.kill();
    let _ = child.wait();
}
