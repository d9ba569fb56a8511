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

const USAGE: &str = "gateway_bench [--sessions N[,N]] [--seconds S] [--rate MSGS_PER_S]\n\
    [--checkpoints RUNS [--apps A,B] [--modes off,every,4]]";

fn main() {
    rlimit::increase_nofile_limit(u64::MAX).ok();
    let mut sessions = vec![1000usize, 10_000];
    let mut seconds = 5u64;
    let mut rate = 10_000f64;
    let mut checkpoints: Option<usize> = None;
    let mut apps = vec!["echo".to_string(), "counter".to_string()];
    let mut modes = vec!["off".to_string(), "every".to_string(), "4".to_string()];
    use wasmbed_testkit::example_args::{fail, pairs, parse};
    for (option, v) in pairs(USAGE) {
        match option.as_str() {
            "--sessions" => {
                sessions = v
                    .split(',')
                    .map(|n| parse(USAGE, "--sessions N[,N]", n))
                    .collect()
            }
            "--seconds" => seconds = parse(USAGE, "--seconds S", &v),
            "--rate" => rate = parse(USAGE, "--rate MSGS_PER_S", &v),
            "--checkpoints" => checkpoints = Some(parse(USAGE, "--checkpoints RUNS", &v)),
            // With --checkpoints: which apps and settings (the first is the baseline).
            "--apps" => apps = v.split(',').map(String::from).collect(),
            "--modes" => modes = v.split(',').map(String::from).collect(),
            o => fail(USAGE, &format!("unknown option {o}")),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    if let Some(runs) = checkpoints {
        rt.block_on(checkpoint_cost(
            sessions[0],
            Duration::from_secs(seconds),
            runs,
            &apps,
            &modes,
        ));
        tickets();
        rt.block_on(state_calls());
        return;
    }
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

fn gateway(max: usize, extra: &[String]) -> (Child, SocketAddr) {
    // WASMBED_BIN: another build's binary (a before/after comparison).
    let bin = std::env::var_os("WASMBED_BIN").map_or_else(
        || {
            let exe = std::env::current_exe().unwrap();
            exe.parent()
                .and_then(|p| p.parent())
                .unwrap()
                .join("wasmbed")
        },
        std::path::PathBuf::from,
    );
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
            .args(extra)
            .env("WASMBED_LOG", "warn"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (child, line.addr("listen=").expect("listen address"))
}

/// `rate`: None = closed loop (each session sends its next DATA when the REPLY arrives);
/// Some(r) = open loop, r messages per second over all sessions, each at a fixed interval.
async fn load(n: usize, duration: Duration, rate: Option<f64>) {
    let _ = load_app(n, duration, rate, "echo", &[], true).await;
}

/// Runs the load with `app` on a gateway started with `extra` flags; returns replies/s.
async fn load_app(
    n: usize,
    duration: Duration,
    rate: Option<f64>,
    app: &'static str,
    extra: &[String],
    print: bool,
) -> Load {
    let (mut child, addr) = gateway(n, extra);
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
            device.open(&format!("device-{i:05}"), app).await;
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
    let cpu0 = wasmbed_testkit::cpu_ticks(child.id());
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
    let cpu = wasmbed_testkit::cpu_ticks(child.id()).saturating_sub(cpu0);
    let rss2 = rss_kib(child.id());
    if print {
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
    }
    drop(keep);
    let _ = child.kill();
    let _ = child.wait();
    Load {
        per_second: total.len() as f64 / elapsed,
        // Clock ticks are 10 ms: over a few seconds and ~10^5 replies, well resolved.
        cpu_us_per_reply: cpu as f64 * 10_000.0 / total.len().max(1) as f64,
    }
}

/// What one load run measured.
struct Load {
    per_second: f64,
    /// The gateway process's CPU time (user + system) per REPLY.
    cpu_us_per_reply: f64,
}

/// The cost of checkpoints: closed-loop replies/s with `--checkpoint every` vs `off`, for
/// echo (no state: a ticket without state) and counter (17 bytes of state), `runs`
/// interleaved runs each; medians and the ratio.
async fn checkpoint_cost(
    n: usize,
    duration: Duration,
    runs: usize,
    apps: &[String],
    modes: &[String],
) {
    let dir = std::env::temp_dir().join(format!("gateway-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        wasmbed_gateway::ticket::KeyRing::generate("k1").unwrap(),
    )
    .unwrap();
    let with = |mode: &str| -> Vec<String> {
        vec![
            "--session-keys".into(),
            keys.display().to_string(),
            "--checkpoint".into(),
            mode.into(),
        ]
    };
    println!(
        "## checkpoint cost: {n} sessions, closed loop, {:.0} s per run, {runs} interleaved runs (median replies/s)",
        duration.as_secs_f64()
    );
    println!("| app | setting | replies/s | ratio to off | gateway CPU us/reply | ratio to off |");
    println!("|---|---|---:|---:|---:|---:|");
    for app in apps {
        let app: &'static str = match app.as_str() {
            "echo" => "echo",
            "counter" => "counter",
            other => panic!("--apps: echo or counter, not {other}"),
        };
        let mut rates = vec![Vec::new(); modes.len()];
        let mut cpus = vec![Vec::new(); modes.len()];
        for _ in 0..runs {
            for (i, mode) in modes.iter().enumerate() {
                let l = load_app(n, duration, None, app, &with(mode), false).await;
                rates[i].push(l.per_second);
                cpus[i].push(l.cpu_us_per_reply);
            }
        }
        let rate: Vec<f64> = rates.iter_mut().map(|v| median(v)).collect();
        let cpu: Vec<f64> = cpus.iter_mut().map(|v| median(v)).collect();
        for (i, mode) in modes.iter().enumerate() {
            println!(
                "| {app} | {mode} | {:.0} | {:.2} | {:.2} | {:.2} |",
                rate[i],
                rate[i] / rate[0],
                cpu[i],
                cpu[i] / cpu[0]
            );
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Sealing and opening a ticket, with 64 B and 16 KiB of app state.
fn tickets() {
    use wasmbed_gateway::ticket::{KeyRing, SessionTickets, TicketBody, unix};
    let dir = std::env::temp_dir().join(format!("gateway-bench-t-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys.toml");
    std::fs::write(&keys, KeyRing::generate("k1").unwrap()).unwrap();
    let ring = KeyRing::load(&keys).unwrap();
    println!("## ticket seal + open (AES-256-GCM, CBOR), 20,000 each");
    println!("| state | ticket bytes | seal p50 / p99 us | open p50 / p99 us |");
    println!("|---:|---:|---:|---:|");
    for size in [64usize, 16 << 10] {
        let now = std::time::SystemTime::now();
        let body = TicketBody {
            device: "device-00001".into(),
            app: "counter".into(),
            module: serde_bytes::ByteBuf::from(vec![0u8; 32]),
            session: "0123456789abcdef0123456789abcdef".into(),
            seq: 12345,
            pushes: 0,
            issued: unix(now),
            expires: unix(now) + 86400,
            state: Some(serde_bytes::ByteBuf::from(vec![7u8; size])),
        };
        let (mut seal, mut open) = (
            Histogram::<u64>::new(3).unwrap(),
            Histogram::<u64>::new(3).unwrap(),
        );
        let mut len = 0;
        for _ in 0..20_000 {
            let t = Instant::now();
            let ticket = ring.seal(&body).unwrap();
            seal.record(t.elapsed().as_nanos() as u64).unwrap();
            len = ticket.len();
            let t = Instant::now();
            let back = ring.open(&ticket, now).unwrap();
            open.record(t.elapsed().as_nanos() as u64).unwrap();
            assert_eq!(back.seq, 12345);
        }
        println!(
            "| {size} B | {len} | {:.1} / {:.1} | {:.1} / {:.1} |",
            pct(&seal, 0.5),
            pct(&seal, 0.99),
            pct(&open, 0.5),
            pct(&open, 0.99)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `snapshot` and `restore` calls (fresh instance + restore, as a resume does) for 64 B and
/// 16 KiB of state, with `apps/blob.wat`, in process.
async fn state_calls() {
    use wasmbed_gateway::host::{Host, Limits};
    let host = Host::new(Limits {
        call_timeout: Duration::from_millis(50),
        max_memory: 4 << 20,
        max_instances: 64,
        max_frame: 64 << 10,
        max_state: 16 << 10,
    })
    .unwrap();
    let app = host
        .compile("blob", &std::fs::read(format!("{APPS}/blob.wat")).unwrap())
        .unwrap();
    println!(
        "## snapshot and restore (apps/blob.wat, in process), 10,000 each after 1,000 warm-up"
    );
    println!("| state | snapshot p50 / p99 us | instantiate + restore p50 / p99 us |");
    println!("|---:|---:|---:|");
    for size in [64usize, 16 << 10] {
        let state = vec![7u8; size];
        let (mut snap, mut rest) = (
            Histogram::<u64>::new(3).unwrap(),
            Histogram::<u64>::new(3).unwrap(),
        );
        let mut inst = host.instantiate(&app, "d").await.unwrap();
        inst.restore(&state).await.unwrap();
        for i in 0..11_000 {
            let t = Instant::now();
            let got = inst.snapshot().await.unwrap().unwrap();
            let s_ns = t.elapsed().as_nanos() as u64;
            assert_eq!(got.len(), size);
            let t = Instant::now();
            let mut fresh = host.instantiate(&app, "d").await.unwrap();
            fresh.restore(&got).await.unwrap();
            let r_ns = t.elapsed().as_nanos() as u64;
            if i >= 1_000 {
                snap.record(s_ns).unwrap();
                rest.record(r_ns).unwrap();
            }
            inst = fresh;
        }
        println!(
            "| {size} B | {:.1} / {:.1} | {:.1} / {:.1} |",
            pct(&snap, 0.5),
            pct(&snap, 0.99),
            pct(&rest, 0.5),
            pct(&rest, 0.99)
        );
    }
}
