//! `wasmbed`: one binary, one subcommand per role. It only parses flags into `wasmbed-config`
//! types, sets up logging and the runtime, and calls the libraries.
//!
//! `unsafe` is refused here but where a module says why it needs it: the allocator
//! (`alloc`), the system calls (`syscalls`), and `up`'s child set-up between fork and exec.
#![deny(unsafe_code)]

/// `println!` that never panics: stdout may be a closed pipe (`wasmbed up | head`), and a
/// report line that cannot be written must not stop what prints it (children to stop, a
/// temporary directory to remove).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(&e);
        }
    }};
}

/// `eprintln!` that never panics (see [`say!`]): stderr may be closed too.
macro_rules! esay {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// `print!` that never panics (see [`say!`]).
macro_rules! say_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(e) = write!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(&e);
        }
    }};
}

/// Woken once stdout is found closed (a write failed with EPIPE): `up` then stops as on
/// Ctrl-C, as a command in a pipeline whose reader left (`wasmbed up | head -2`) should.
static STDOUT_CLOSED: tokio::sync::Notify = tokio::sync::Notify::const_new();

fn stdout_failed(e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        STDOUT_CLOSED.notify_one();
    }
}

/// Resolves once stdout was found closed.
async fn stdout_closed() {
    STDOUT_CLOSED.notified().await;
}

#[cfg(not(feature = "mimalloc"))]
mod alloc;
mod certs_cmd;
mod drain_cmd;
mod stop;
#[cfg(wrapped_syscalls)]
mod syscalls;
mod up;

/// mimalloc with `--features mimalloc`; by default glibc's malloc (below). Measured side by
/// side (docs/performance.md, "The allocator"): no CPU difference the peer bench can detect,
/// the same per idle session, but glibc's holds 15-24 MiB less per proxy and showed no RSS
/// step in a 40-minute soak where mimalloc's did.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
/// glibc's malloc, with small over-aligned blocks from its per-thread cache (`alloc`).
#[cfg(not(feature = "mimalloc"))]
#[global_allocator]
static ALLOC: alloc::Allocator = alloc::Allocator;

use std::io::Write;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use wasmbed_config::{
    GatewayFlags, GatewaySettings, LoadtestFlags, LoadtestSettings, ProxyConfig, ProxyFlags,
};

/// Wasmbed edge: the data plane between a fleet of embedded devices and a pool of gateways.
#[derive(Debug, Parser)]
#[command(name = "wasmbed", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the front proxy: every device dials one address and is handed to the gateway with
    /// the fewest live sessions. Options come from --config FILE and/or flags (flags win).
    ///
    /// Example: wasmbed proxy --listen 127.0.0.1:8443 --gateway gw-1=127.0.0.1:9001
    /// --gateway gw-2=127.0.0.1:9002 --health tcp --health-interval 250ms --fall 2
    Proxy(Box<ProxyFlags>),
    /// Run a gateway: device sessions over TLS (or plain TCP behind a terminating proxy),
    /// each running its application as a WebAssembly instance (see gateway/ABI.md).
    ///
    /// Example: wasmbed gateway --insecure-plaintext --apps apps --listen 127.0.0.1:9001
    /// --admin 127.0.0.1:9101 --name gw-1
    Gateway(Box<GatewayFlags>),
    /// Dev certificates: a CA, server certificates and device client certificates.
    Certs(certs_cmd::CertsArgs),
    /// Simulate a fleet of devices against a proxy or gateway, then report: connected and
    /// failed devices, spread per gateway, latency percentiles, lost messages, re-homing.
    ///
    /// Example: wasmbed loadtest --ca-dir pki --devices 1000 --rate 2 --duration 30s
    Loadtest(LoadtestFlags),
    /// The whole stack on this machine: a dev PKI, gateway processes, a proxy on
    /// 127.0.0.1:8443 and a device fleet, with a live view until Ctrl-C (or SIGTERM, SIGHUP: every
    /// child stops with it, and the temporary directory is removed). With --scenario,
    /// run one scenario (failover, hang, drain, goaway or scale-up: see --scenario), print its
    /// figures and exit (1 if a check fails).
    Up(up::UpArgs),
    /// Drain a gateway before it stops (a Kubernetes preStop hook): it takes no new session
    /// and sends GOAWAY to its sessions (a terminating proxy moves them, app state along);
    /// then wait until none is left, or --wait is over.
    ///
    /// Example: wasmbed drain --admin 127.0.0.1:9101 --token-file /etc/wasmbed/admin/token
    Drain(drain_cmd::DrainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Proxy(flags) => proxy(*flags),
        Command::Gateway(flags) => gateway(*flags),
        Command::Loadtest(flags) => loadtest(flags),
        Command::Up(args) => up::run(args),
        Command::Drain(args) => drain_cmd::run(&args),
        Command::Certs(args) => match certs_cmd::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("certs", e),
        },
    }
}

fn fail(what: &str, e: impl std::fmt::Display) -> ExitCode {
    esay!("wasmbed {what}: {e}");
    ExitCode::from(2)
}

fn proxy(flags: ProxyFlags) -> ExitCode {
    let config = match ProxyConfig::load(&flags) {
        Ok(c) => c,
        Err(e) => return fail("proxy", e),
    };
    let log = stop::logging::init(config.log_format);
    if let Some(warning) = wasmbed_config::hard_stop_warning(config.grace, config.hard_stop_after) {
        tracing::warn!("{warning}");
    }
    check_descriptors(
        config.max_connections,
        1 + u64::from(config.upstream == wasmbed_config::proxy::UpstreamMode::Tcp),
    );
    // Passthrough: the sessions' runtime without a time driver (every wait it has is armed
    // on the proxy's timer thread; `data_plane_timers`).
    let timers = wasmbed_proxy::data_plane_timers(&config);
    let runtime = match build_runtime(config.threads, timers) {
        Ok(r) => r,
        Err(e) => return fail("proxy", format!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(async move {
        let proxy = match wasmbed_proxy::Proxy::bind(config).await {
            Ok(p) => p,
            Err(e) => return fail("proxy", e),
        };
        let shutdown = CancellationToken::new();
        // Watched before the ready line: a SIGTERM right after it stops the proxy in order.
        let gateways = proxy.gateways();
        let running: stop::Running = std::sync::Arc::new(move || {
            let set = gateways.snapshot();
            let per: Vec<String> = set
                .iter()
                .filter(|g| g.sessions() > 0)
                .map(|g| format!("{}={}", g.name, g.sessions()))
                .collect();
            let total: u64 = set.iter().map(|g| g.sessions()).sum();
            format!("{total} device sessions [{}]", per.join(" "))
        });
        let hard = {
            let live = proxy.live();
            move || live.context().config.hard_stop_after
        };
        tokio::spawn(stop::on_signal(shutdown.clone(), hard, running));
        // SIGHUP (and POST /api/reload) re-read the config file with the same flags and apply
        // the difference; terminate mode's certificate, CA and CRLs are re-read with it.
        let live = proxy.live();
        live.set_source(Box::new(move || {
            ProxyConfig::load(&flags).map_err(|e| e.to_string())
        }));
        if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    let live = live.clone();
                    // The outcome is logged and counted by `reload`.
                    let _ = tokio::task::spawn_blocking(move || live.reload()).await;
                }
            });
        }
        announce(&proxy.listen_addrs(), proxy.admin_addr(), proxy.quic_addr());
        match proxy.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("proxy", e),
        }
    });
    drop(runtime);
    stop::logging::finish(log);
    code
}

fn gateway(flags: GatewayFlags) -> ExitCode {
    let settings = match GatewaySettings::load(&flags) {
        Ok(s) => s,
        Err(e) => return fail("gateway", e),
    };
    let log = stop::logging::init(settings.log_format);
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    check_map_count(settings.max_sessions);
    let runtime = match runtime(settings.threads) {
        Ok(r) => r,
        Err(e) => return fail("gateway", format!("cannot start the runtime: {e}")),
    };
    let code = runtime.block_on(async move {
        let gateway = match wasmbed_gateway::Gateway::bind(settings).await {
            Ok(g) => g,
            Err(e) => return fail("gateway", e),
        };
        let shutdown = CancellationToken::new();
        // Watched before the ready line: a SIGTERM right after it drains in order.
        let shared = gateway.shared();
        let running: stop::Running = std::sync::Arc::new(move || {
            let n = shared.sessions.load(std::sync::atomic::Ordering::Relaxed);
            format!("{n} device sessions")
        });
        let hard = gateway.shared().settings.hard_stop_after;
        tokio::spawn(stop::on_signal(shutdown.clone(), move || hard, running));
        // SIGHUP re-reads the session key ring and the TLS files (certificate, CAs, CRLs); live
        // sessions stay, except those of devices revoked by now.
        let shared = gateway.shared();
        if let Ok(mut hup) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    if let Err(e) = shared.reload_keys() {
                        tracing::warn!(error = %e, "session keys not reloaded; the ring in use stays");
                    }
                    if let Err(e) = shared.reload_tls() {
                        tracing::warn!(error = %e, "TLS not reloaded; what is in use stays");
                    }
                }
            });
        }
        announce(&[gateway.listen_addr()], gateway.admin_addr(), None);
        match gateway.run(shutdown).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => fail("gateway", e),
        }
    });
    drop(runtime);
    stop::logging::finish(log);
    code
}

fn loadtest(flags: LoadtestFlags) -> ExitCode {
    let settings = match LoadtestSettings::load(&flags) {
        Ok(s) => s,
        Err(e) => return fail("loadtest", e),
    };
    let json = settings.json.clone();
    let devices = settings.devices;
    let fleet = match wasmbed_loadtest::Fleet::prepare(settings) {
        Ok(f) => f,
        Err(e) => return fail("loadtest", e),
    };
    let runtime = match runtime(None) {
        Ok(r) => r,
        Err(e) => return fail("loadtest", format!("cannot start the runtime: {e}")),
    };
    let report = runtime.block_on(async move {
        let finish = CancellationToken::new();
        let live = fleet.live();
        let f2 = finish.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                f2.cancel();
            }
        });
        if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
            let live = live.clone();
            tokio::spawn(async move {
                use std::sync::atomic::Ordering::Relaxed;
                let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let _ = write!(
                        std::io::stderr(),
                        "\rconnected {}/{devices}  sent {}  answered {}  disconnects {}   ",
                        live.connected_now.load(Relaxed),
                        live.sent.load(Relaxed),
                        live.answered.load(Relaxed),
                        live.disconnects.load(Relaxed)
                    );
                }
            });
        }
        // One line when every device is connected and holds a ticket: the moment a script
        // (or a test) may disturb the fleet and expect every session to resume.
        let ready = live.clone();
        tokio::spawn(async move {
            use std::sync::atomic::Ordering::Relaxed;
            let started = std::time::Instant::now();
            while ready.ticketed.load(Relaxed) < devices
                || ready.connected_now.load(Relaxed) < devices
            {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            esay!(
                "loadtest: all {devices} devices connected and holding a ticket after {:.1} s",
                started.elapsed().as_secs_f64()
            );
        });
        fleet.run(finish).await
    });
    say_raw!("{}", report.table());
    if let Some(path) = json
        && let Err(e) = std::fs::write(&path, report.to_json())
    {
        return fail("loadtest", format!("{}: {e}", path.display()));
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Raises the soft open-files limit to the hard one (as HAProxy and NGINX do) and warns when
/// `--max-connections` could still run out of descriptors: a TCP device's session holds
/// `per_session` (its own, and its upstream connection unless sessions share links); a QUIC
/// device's session holds its upstream connection only, none over links.
fn check_descriptors(max_connections: usize, per_session: u64) {
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let needed = max_connections as u64 * per_session + 64;
    if limit > 0 && needed > limit {
        tracing::warn!(
            max_connections,
            open_files_limit = limit,
            "--max-connections needs about {needed} descriptors if every session is a TCP \
             device's ({per_session} each); past the limit, accepts back off and connects to \
             gateways fail (lower --max-connections to {})",
            limit.saturating_sub(64) / per_session
        );
    }
}

/// Memory mappings a gateway takes per `--max-sessions` slot when it starts (the pooled stack
/// and its guard page), and per live instance on top (its memory's accessible pages split
/// from the reserve); measured with `/proc/PID/maps`.
const MAPS_PER_SLOT: u64 = 2;
const MAPS_PER_INSTANCE: u64 = 3;

/// Warns when `--max-sessions` needs more memory mappings than the kernel allows a process
/// (`vm.max_map_count`, 65,530 by default): past it, instantiation fails and devices get
/// ERROR `unavailable` long before the configured maximum.
fn check_map_count(max_sessions: u32) {
    let Some(limit) = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
    else {
        return;
    };
    let slots = u64::from(max_sessions);
    let needed = slots * (MAPS_PER_SLOT + MAPS_PER_INSTANCE) + 256;
    if needed > limit {
        let fits = limit.saturating_sub(256 + slots * MAPS_PER_SLOT) / MAPS_PER_INSTANCE;
        tracing::warn!(
            max_sessions,
            vm_max_map_count = limit,
            "--max-sessions needs about {needed} memory mappings and the kernel allows {limit}: \
             past about {} sessions instantiation fails (ERROR unavailable). Raise it (sysctl -w \
             vm.max_map_count={}) or lower --max-sessions",
            fits,
            needed.next_power_of_two()
        );
    }
}

/// One line on stdout once every socket is bound: what scripts and tests wait for.
/// `quic=ADDR` is added when there is a QUIC listener.
fn announce(
    listen: &[std::net::SocketAddr],
    admin: Option<std::net::SocketAddr>,
    quic: Option<std::net::SocketAddr>,
) {
    let listen: Vec<String> = listen.iter().map(ToString::to_string).collect();
    let admin = admin.map_or("off".to_string(), |a| a.to_string());
    let quic = quic.map(|q| format!(" quic={q}")).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready listen={} admin={admin}{quic}", listen.join(","));
    let _ = out.flush();
}

fn runtime(threads: Option<usize>) -> std::io::Result<tokio::runtime::Runtime> {
    build_runtime(threads, true)
}

/// The main runtime: `threads` workers (one: a current-thread runtime; default: one per
/// core), with the I/O driver and, when `timers`, the time driver.
fn build_runtime(threads: Option<usize>, timers: bool) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = threads.unwrap_or_else(|| {
        std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get)
    });
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    builder.enable_io();
    if timers {
        builder.enable_time();
    }
    builder.build()
}
