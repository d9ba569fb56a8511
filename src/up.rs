//! `wasmbed up`: the whole stack on this machine (dev PKI, gateways, proxy, a device fleet),
//! and the failover and drain scenarios as one command each.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmbed_client::Ready;
use wasmbed_config::{LoadtestSettings, Mode};
use wasmbed_loadtest::{Fleet, Report};

mod cpu;
mod scenarios;
mod soak;
mod storm;
use scenarios::{Run, ScaleUp, scale_up, scenario_run};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Kill one gateway (SIGKILL, a real crash) under load; measure re-homing (passthrough)
    /// or the sessions' moves (terminate).
    Failover,
    /// Stop one gateway (SIGSTOP: a hung process, found by the health checks) under load.
    Hang,
    /// Drain one gateway under load: GOAWAY to its sessions (passthrough), or a drain that
    /// moves them (terminate, `drain?move=true` on the proxy).
    Drain,
    /// The gateway drains itself (its own GOAWAY to every session, as on SIGTERM).
    Goaway,
    /// Start with one gateway less and add it under load: where new devices go (passthrough),
    /// or how all sessions rebalance onto it (terminate, `--rebalance on`).
    ScaleUp,
    /// Kill one proxy replica (SIGKILL) under load (`--proxies` 2 or more, sharing the one
    /// address): its devices reconnect through the others and resume from their tickets.
    ProxyKill,
    /// As proxy-kill, while the replica holds sessions waiting for a gateway: every gateway
    /// is stopped (SIGSTOP) until proxy-0 holds sessions it is moving and no gateway takes,
    /// then proxy-0 is killed and the gateways go on (SIGCONT). Terminate mode: its devices
    /// resume from their last tickets through the others and resend what was not answered.
    ProxyKillHeld,
    /// Stop one proxy replica (SIGTERM, as a rolling update does) and start a new one on the
    /// same address: terminate mode hands every session back (GOAWAY after its answers and
    /// latest ticket), passthrough sessions get `--grace`.
    ProxyRestart,
    /// Upgrade the proxy in place under load (`--takeover`): a new process takes the running
    /// one's listening sockets and passthrough sessions; terminated sessions are handed back.
    ProxyUpgrade,
    /// Every device drops its connection at the same instant (a network blip) and reconnects
    /// at once: time until all are back, handshakes finished, wasted and refused, gateways
    /// wrongly marked down, the proxy's CPU.
    Storm,
    /// The fleet at its rate for `--duration` (default 1 h) with churn (1% of the devices
    /// leave for 3 s every 10 s), the last gateway killed and replaced at a new address every
    /// period (a sixth of the run, 15 s to 5 min), a gateway found in DNS moved to a new
    /// address every period (a DNS server of `up`'s own), a drain with moves and a reload in turn;
    /// every process's RSS and descriptors sampled: fails on a loss, a state reset, or growth
    /// past the bound after the warm-up. Terminate mode (`--upstream link` is the headline).
    Soak,
}

impl Scenario {
    /// Scenarios that stop a proxy replica rather than a gateway.
    fn is_proxy_event(self) -> bool {
        matches!(
            self,
            Scenario::ProxyKill
                | Scenario::ProxyKillHeld
                | Scenario::ProxyRestart
                | Scenario::ProxyUpgrade
        )
    }
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Gateway processes to start. Default 3, or 5 for a scenario.
    #[arg(long)]
    gateways: Option<usize>,
    /// Proxy processes on the one --listen address (SO_REUSEPORT: the kernel spreads the
    /// devices over them), as replicas behind one Service address. Default 1, or 2 for the
    /// proxy-kill and proxy-restart scenarios. The first serves --admin; the others pick a
    /// free admin port (printed at start).
    #[arg(long)]
    proxies: Option<usize>,
    /// Simulated devices. Default 20, or 100 for a scenario.
    #[arg(long)]
    devices: Option<usize>,
    /// passthrough (TLS ends at the gateways) or terminate (TLS ends at the proxy).
    #[arg(long, value_enum, default_value = "passthrough")]
    mode: Mode,
    /// Address the devices dial.
    #[arg(long, default_value = "127.0.0.1:8443")]
    listen: String,
    /// The proxy's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:9900")]
    admin: String,
    /// Directory for the dev PKI and apps: a new or empty one, or one `up` wrote before (a PKI
    /// `certs init` wrote is refused, not replaced). Default: a new temporary directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Run a scenario, print its figures and exit (non-zero if a check fails).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// DATA messages per second per device.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Devices that start dialing per second (default: all at once). Thousands of devices
    /// dialing in the same instant on a small host make every process busy with handshakes
    /// for seconds (health checks time out, new sessions avoid the gateways they flag).
    #[arg(long, value_name = "PER_SECOND")]
    ramp: Option<f64>,
    /// Terminate mode: plain TCP from the proxy to the gateways (`--insecure-plaintext`), to
    /// measure what TLS on that link costs. Default: TLS with the proxy's client certificate.
    #[arg(long)]
    plain_link: bool,
    /// Terminate mode: how the proxy reaches the gateways: `tcp`, a TLS connection per
    /// session; `link`, a QUIC connection per gateway (per session worker) with a stream
    /// per session (gateways started with --link).
    #[arg(long, value_enum, default_value = "tcp", value_name = "tcp|link")]
    upstream: wasmbed_config::proxy::UpstreamMode,
    /// Terminate mode: how the devices reach the proxy: `tcp` (TLS over TCP) or `quic` (the
    /// proxy's --quic-listen, on UDP at --listen's port).
    #[arg(long, value_enum, default_value = "tcp", value_name = "tcp|quic")]
    transport: wasmbed_config::loadtest::Transport,
    /// With `--transport quic`: devices per UDP socket of the fleet (each socket its own QUIC
    /// endpoint and receive loop; a real device has one of its own).
    #[arg(long, value_name = "N", default_value_t = wasmbed_config::loadtest::DEVICES_PER_SOCKET,
          value_parser = clap::value_parser!(u32).range(1..))]
    devices_per_socket: u32,
    /// The simulated devices speak TLS 1.2 and nothing newer, as devices on mbedTLS 2.28 do.
    /// `--transport tcp` only (QUIC is TLS 1.3).
    #[arg(long)]
    tls12: bool,
    /// How long the soak scenario runs (e.g. `90s`, `1h`). Default 1 h.
    #[arg(long, value_name = "DURATION", value_parser = soak_duration)]
    duration: Option<Duration>,
    /// The soak's period: how often a gateway is replaced (and moved in DNS), with a drain or
    /// a reload in between. Default a sixth of `--duration`, 15 s to 5 min. Another period
    /// moves the events in time (to tell an effect of an event from one of time).
    #[arg(long, value_name = "DURATION", value_parser = soak_period)]
    period: Option<Duration>,
    /// Write the scenario's results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Gateways issue no TLS session tickets (every re-homing device then pays a full TLS
    /// handshake): to measure what the tickets save.
    #[arg(long)]
    no_tls_tickets: bool,
    /// An extra argument for every proxy process (repeatable), e.g.
    /// `--proxy-arg=--no-liveness-watch` to measure what the liveness watch saves.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    proxy_arg: Vec<String>,
    /// An extra argument for every gateway process (repeatable), those started later by a
    /// scenario included, e.g. `--gateway-arg=--threads=1`: each gateway otherwise runs a
    /// runtime thread per core, as it would alone on its host, and on a small host the
    /// gateways' threads then outnumber the cores they share with the proxy and the fleet.
    /// A flag and its value given apart take one `--gateway-arg` each. Not a flag `up` sets
    /// itself (`--max-sessions`, `--idle-timeout`, the TLS files...): the gateway refuses it
    /// twice and does not start.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    gateway_arg: Vec<String>,
    /// Open the live dashboard (the proxy's admin address) in a browser, where one exists
    /// (xdg-open, or a chromium/firefox on the PATH).
    #[arg(long)]
    open: bool,
}

/// `--duration`: a human duration of at least 10 s.
fn soak_duration(text: &str) -> Result<Duration, String> {
    let d = wasmbed_config::parse_duration("duration", text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(10) {
        return Err("at least 10s: the soak samples, churns and replaces gateways in it".into());
    }
    Ok(d)
}

/// `--period`: a human duration of at least 5 s.
fn soak_period(text: &str) -> Result<Duration, String> {
    let d = wasmbed_config::parse_duration("period", text).map_err(|e| e.to_string())?;
    if d < Duration::from_secs(5) {
        return Err(
            "at least 5s: each event (a replacement, a move in DNS, a drain or a reload, each checked) takes seconds"
                .into(),
        );
    }
    Ok(d)
}

/// Child processes, killed when dropped.
struct Stack {
    gateways: Vec<(String, Child, SocketAddr)>,
    proxies: Vec<ProxyProc>,
    /// The proxies' arguments but --listen and --admin: a replica started later (the
    /// proxy-restart scenario) runs the same.
    proxy_args: Vec<String>,
    /// The address the proxies share (TCP), as the first one bound it.
    proxy_listen: Option<SocketAddr>,
    /// The gateway the proxy finds in DNS (the soak's), when there is one.
    discovered: Option<Discovered>,
    /// How its gateways run: one started later (added, or a replacement) runs the same.
    gateway_run: GatewayRun,
}

/// A gateway the proxy discovers in DNS (`--gateway-dns`), as a headless Service's pod: on a
/// loopback address of its own, every replacement on the next address with the same ports.
/// Its process is killed when this is dropped (an early exit of `up` included).
struct Discovered {
    child: scenarios::Killed,
    ip: std::net::Ipv4Addr,
    /// The session and admin (health) ports every address of the name shares.
    port: u16,
    health_port: u16,
    /// The certificate the discovered gateways present (`gateway-N.pem`).
    certificate: usize,
}

impl Discovered {
    /// Its device address now.
    fn listen(&self) -> String {
        format!("{}:{}", self.ip, self.port)
    }
}

/// The DNS name the discovered gateways are published under (in the dev DNS server's zone).
const DISCOVERED_NAME: &str = "gateways";
/// [`DISCOVERED_NAME`] in full, as the proxy asks for it.
fn discovered_name() -> String {
    format!(
        "{DISCOVERED_NAME}.{}",
        wasmbed_devdns::ZONE.trim_end_matches('.')
    )
}

/// Its first address; each replacement takes the next.
const DISCOVERED_FIRST_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(127, 0, 0, 2);

/// One proxy replica.
struct ProxyProc {
    child: std::sync::Mutex<Child>,
    admin: SocketAddr,
}

impl ProxyProc {
    fn pid(&self) -> u32 {
        self.child.lock().unwrap_or_else(|e| e.into_inner()).id()
    }

    /// Whether it has exited (and so was reaped).
    fn exited(&self) -> bool {
        let mut c = self.child.lock().unwrap_or_else(|e| e.into_inner());
        matches!(c.try_wait(), Ok(Some(_)))
    }
}

impl Drop for ProxyProc {
    fn drop(&mut self) {
        let c = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = c.kill();
        let _ = c.wait();
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, c, _) in self.gateways.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.proxies.clear();
    }
}

/// Starts a proxy replica on `listen` with `args` (the rest); returns it and its ready line.
fn spawn_proxy(args: &[String], listen: &str, admin: &str) -> Result<(ProxyProc, Ready), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&exe);
    cmd.args(["proxy", "--listen", listen, "--admin", admin])
        .args(args);
    let (child, line) = spawn_ready(&mut cmd)?;
    let admin = field(&line, "admin=")?;
    Ok((
        ProxyProc {
            child: std::sync::Mutex::new(child),
            admin,
        },
        line,
    ))
}

/// Starts a child of `up` and waits for its ready line. The child sits in its own process
/// group (Ctrl-C in the terminal reaches `up` alone, which ends the fleet first, then stops
/// the children), and dies with `up` however `up` ends: on Linux the kernel sends it SIGKILL
/// when `up` dies (`PR_SET_PDEATHSIG`), even by SIGKILL.
#[allow(
    unsafe_code,
    reason = "pre_exec: the child's death signal, set between fork and exec"
)]
fn spawn_ready(cmd: &mut Command) -> Result<(Child, Ready), String> {
    use std::os::unix::process::CommandExt;
    cmd.process_group(0).stderr(Stdio::inherit()).env(
        "WASMBED_LOG",
        std::env::var("WASMBED_LOG").unwrap_or_else(|_| "warn".into()),
    );
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: runs in the child between fork and exec, and calls only async-signal-safe
        // functions (prctl, getppid), touching no memory of the parent's.
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // `up` may have died between fork and prctl: then nothing would signal us.
                if libc::getppid() as u32 != parent {
                    return Err(std::io::Error::other("wasmbed up ended while starting"));
                }
                Ok(())
            });
        }
    }
    wasmbed_client::spawn_ready(cmd).map_err(|e| e.to_string())
}

fn field(line: &Ready, key: &str) -> Result<SocketAddr, String> {
    line.addr(key)
        .ok_or_else(|| format!("no {key} address in {:?}", line.0))
}

/// Resolves on the first SIGINT (Ctrl-C), SIGTERM or SIGHUP after [`StopSignals::new`]: `up`
/// then stops the fleet and its children and removes its temporary directory.
struct StopSignals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Must run inside the runtime. From here on these signals no longer end the process.
    fn new() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(StopSignals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            hup: signal(SignalKind::hangup())?,
        })
    }

    /// A closed stdout (`up | head`) stops `up` too.
    async fn recv(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.hup.recv() => "SIGHUP",
            _ = crate::stdout_closed() => "a closed stdout",
        }
    }
}

/// How `up` runs every gateway it starts, at the start or later in a scenario (an added
/// gateway, a replacement): the same flags for all.
#[derive(Clone)]
struct GatewayRun {
    /// The proxy's mode, `--plain-link`, and whether the proxy reaches it over the link.
    link_mode: (Mode, bool, bool),
    /// `--no-tls-tickets`.
    tls_tickets_off: bool,
    /// Its `--max-sessions` ([`gateway_capacity`]).
    max_sessions: usize,
    /// `--gateway-arg`s, after the flags `up` sets (which they cannot repeat).
    extra: Vec<String>,
}

impl GatewayRun {
    fn new(args: &UpArgs, max_sessions: usize) -> GatewayRun {
        GatewayRun {
            link_mode: link_mode(args),
            tls_tickets_off: args.no_tls_tickets,
            max_sessions,
            extra: args.gateway_arg.clone(),
        }
    }

    /// The same run with room for `max_sessions` (a gateway added to more of them).
    fn with_room(&self, max_sessions: usize) -> GatewayRun {
        GatewayRun {
            max_sessions,
            ..self.clone()
        }
    }
}

/// Starts gateway `gw-i` (certificates `gateway-i.*` of `dir`); returns its name, process,
/// session address and admin address.
fn spawn_gateway(
    run: &GatewayRun,
    dir: &Path,
    i: usize,
) -> Result<(String, Child, SocketAddr, SocketAddr), String> {
    let at = GatewayAt {
        name: format!("gw-{i}"),
        certificate: i,
        listen: "127.0.0.1:0".into(),
        admin: "127.0.0.1:0".into(),
    };
    spawn_gateway_at(run, dir, at)
}

/// Where a gateway runs: its name, its certificate (`gateway-N.pem`), its addresses.
struct GatewayAt {
    name: String,
    certificate: usize,
    listen: String,
    admin: String,
}

fn spawn_gateway_at(
    run: &GatewayRun,
    dir: &Path,
    at: GatewayAt,
) -> Result<(String, Child, SocketAddr, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let name = at.name.clone();
    let mut cmd = gateway_command(&exe, run, dir, at);
    let (child, line) = spawn_ready(&mut cmd)?;
    let listen = field(&line, "listen=")?;
    let admin = field(&line, "admin=")?;
    Ok((name, child, listen, admin))
}

/// The command line of a gateway `run` as `at` says.
fn gateway_command(
    exe: &Path,
    run: &GatewayRun,
    dir: &Path,
    GatewayAt {
        name,
        certificate: i,
        listen,
        admin,
    }: GatewayAt,
) -> Command {
    let (mode, plain_link, link) = run.link_mode;
    let d = |f: &str| dir.join(f).display().to_string();
    let mut cmd = Command::new(exe);
    cmd.args(["gateway", "--name", &name, "--listen", &listen])
        .args([
            "--admin",
            &admin,
            "--apps",
            &d("apps"),
            "--idle-timeout",
            "10m",
        ])
        // One key ring for the fleet: a session sealed by one gateway resumes on any other.
        .args(["--session-keys", &d("session-keys.toml")])
        .args(["--max-sessions", &run.max_sessions.to_string()]);
    if run.tls_tickets_off {
        cmd.arg("--no-tls-tickets");
    }
    if mode == Mode::Terminate && plain_link {
        cmd.arg("--insecure-plaintext");
    } else {
        cmd.args(["--tls-cert", &d(&format!("gateway-{i}.pem"))])
            .args(["--tls-key", &d(&format!("gateway-{i}.key"))])
            .args(["--client-ca", &d("ca.pem")]);
    }
    if mode == Mode::Terminate && !plain_link {
        // TLS on the link too: the proxy's client certificate (identity wasmbed-proxy) may
        // state the devices it verified; any other client must be the device it names.
        cmd.args(["--proxy-identity", crate::certs_cmd::PROXY_IDENTITY]);
        if link {
            cmd.arg("--link");
        }
    }
    cmd.args(&run.extra);
    cmd
}

/// What a gateway needs to know of the proxy's link: mode, plaintext link, QUIC link.
fn link_mode(args: &UpArgs) -> (Mode, bool, bool) {
    let link = args.upstream == wasmbed_config::proxy::UpstreamMode::Link;
    (args.mode, args.plain_link, link)
}

/// A gateway's `--max-sessions`: room for the fleet spread over all gateways but one (the
/// failover scenario's), and never below the gateway's own default.
fn gateway_capacity(devices: usize, gateways: usize) -> usize {
    (devices.div_ceil(gateways.saturating_sub(1).max(1)) + 64).max(10_000)
}

/// In a `--dir` whose PKI `up` wrote (and so may write again).
const UP_MARKER: &str = ".wasmbed-up";

/// Writes the PKI for `certificates` gateways, starts `gateways` of them and the proxy; with
/// `dns` (a DNS server whose name [`DISCOVERED_NAME`] has [`DISCOVERED_FIRST_IP`]), one more
/// gateway on that address, which the proxy finds in DNS.
fn start(
    args: &UpArgs,
    dir: &Path,
    (gateways, certificates): (usize, usize),
    devices: usize,
    proxies: usize,
    dns: Option<SocketAddr>,
) -> Result<(Stack, SocketAddr, SocketAddr), String> {
    crate::certs_cmd::write_dev_pki(dir, certificates).map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join(UP_MARKER),
        "written by `wasmbed up`, which may replace this PKI\n",
    )
    .map_err(|e| e.to_string())?;
    let apps = dir.join("apps");
    std::fs::create_dir_all(&apps).map_err(|e| e.to_string())?;
    for (name, text) in [
        ("echo", include_str!("../apps/echo.wat")),
        ("counter", include_str!("../apps/counter.wat")),
    ] {
        std::fs::write(apps.join(format!("{name}.wat")), text).map_err(|e| e.to_string())?;
    }
    let run = GatewayRun::new(
        args,
        gateway_capacity(devices, gateways + usize::from(dns.is_some())),
    );
    let mut stack = Stack {
        gateways: Vec::new(),
        proxies: Vec::new(),
        proxy_args: Vec::new(),
        proxy_listen: None,
        discovered: None,
        gateway_run: run.clone(),
    };
    let mut gw_flags = Vec::new();
    for i in 0..gateways {
        let (name, child, listen, admin) = spawn_gateway(&run, dir, i)?;
        gw_flags.push(format!("{name}={listen};health={admin}"));
        stack.gateways.push((name, child, admin));
    }
    let mut discovery = Vec::new();
    if let Some(server) = dns {
        let at = GatewayAt {
            name: format!("gw-dns-{}", DISCOVERED_FIRST_IP.octets()[3]),
            certificate: gateways,
            listen: format!("{DISCOVERED_FIRST_IP}:0"),
            admin: format!("{DISCOVERED_FIRST_IP}:0"),
        };
        let (_, child, listen, admin) = spawn_gateway_at(&run, dir, at)?;
        discovery = vec![
            "--gateway-dns".to_string(),
            format!(
                "{}:{};health-port={}",
                discovered_name(),
                listen.port(),
                admin.port()
            ),
            "--dns-server".to_string(),
            server.to_string(),
            // Discovered gateways are dialed by address; their certificate names localhost.
            "--upstream-server-name".to_string(),
            "localhost".to_string(),
        ];
        stack.discovered = Some(Discovered {
            child: scenarios::Killed(child),
            ip: DISCOVERED_FIRST_IP,
            port: listen.port(),
            health_port: admin.port(),
            certificate: gateways,
        });
    }
    let d = |f: &str| dir.join(f).display().to_string();
    let mut pa: Vec<String> = vec![
        "--health".into(),
        "http".into(),
        "--health-path".into(),
        "/readyz".into(),
        "--health-interval".into(),
        "250ms".into(),
        // Most of the interval: a gateway busy on a loaded machine is slow, not down.
        "--health-timeout".into(),
        "200ms".into(),
        "--fall".into(),
        "2".into(),
        // Room for every device, not the default 9,500 (which a low open-files limit could
        // not hold, and the proxy would warn about). QUIC devices hold no descriptor, and
        // get room for each one's zombie too: after a blip a device's old connection lives
        // on at the proxy until its close arrives (lost in the burst, or never sent) or the
        // device's new session supersedes it, and meanwhile holds a place.
        "--max-connections".into(),
        match args.transport {
            wasmbed_config::loadtest::Transport::Quic => 2 * devices + 64,
            wasmbed_config::loadtest::Transport::Tcp => devices + 64,
        }
        .to_string(),
        "--gateway".into(),
        gw_flags.join(","),
    ];
    if proxies > 1 {
        pa.push("--reuse-port".into());
    }
    if args.mode == Mode::Terminate {
        pa.extend(["--mode", "terminate"].map(String::from));
        pa.extend(["--tls-cert".into(), d("proxy.pem")]);
        pa.extend(["--tls-key".into(), d("proxy.key")]);
        pa.extend(["--client-ca".into(), d("ca.pem")]);
        // One ring for every replica (--proxies): a device re-homed off a lost replica
        // resumes its TLS session on another.
        pa.extend(["--tls-ticket-keys".into(), d("proxy-tickets.toml")]);
        if !args.plain_link {
            pa.extend(["--upstream-ca".into(), d("ca.pem")]);
            pa.extend(["--upstream-cert".into(), d("proxy-client.pem")]);
            pa.extend(["--upstream-key".into(), d("proxy-client.key")]);
        }
        if args.upstream == wasmbed_config::proxy::UpstreamMode::Link {
            pa.extend(["--upstream", "link"].map(String::from));
        }
        if args.transport == wasmbed_config::loadtest::Transport::Quic {
            // The same address as the TCP listener's: UDP and TCP ports are separate.
            pa.extend(["--quic-listen".into(), args.listen.clone()]);
        }
        if args.scenario == Some(Scenario::ScaleUp) {
            pa.extend(["--rebalance", "on"].map(String::from));
        }
    }
    if args.scenario == Some(Scenario::ProxyUpgrade) {
        pa.extend(["--takeover".into(), d("proxy.sock")]);
    }
    pa.extend(discovery);
    pa.extend(args.proxy_arg.iter().cloned());
    let (first, line) = spawn_proxy(&pa, &args.listen, &args.admin)?;
    let admin = first.admin;
    stack.proxies.push(first);
    let tcp_listen = field(&line, "listen=")?;
    stack.proxy_listen = Some(tcp_listen);
    for _ in 1..proxies {
        // The same address as the first one's (which may have picked the port).
        let (p, _) = spawn_proxy(&pa, &tcp_listen.to_string(), "127.0.0.1:0")?;
        say!(
            "wasmbed up: proxy replica on {tcp_listen}, admin http://{}",
            p.admin
        );
        stack.proxies.push(p);
    }
    stack.proxy_args = pa;
    // QUIC devices dial the proxy's UDP address.
    let listen = match args.transport {
        wasmbed_config::loadtest::Transport::Quic => field(&line, "quic=")?,
        wasmbed_config::loadtest::Transport::Tcp => tcp_listen,
    };
    Ok((stack, listen, admin))
}

fn spread_line(spread: &BTreeMap<String, usize>) -> String {
    spread
        .iter()
        .map(|(g, n)| format!("{g}={n}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn max_minus_min(spread: &BTreeMap<String, usize>) -> usize {
    spread.values().max().unwrap_or(&0) - spread.values().min().unwrap_or(&0)
}

pub fn run(args: UpArgs) -> ExitCode {
    let scenario = args.scenario;
    let gateways = args
        .gateways
        .unwrap_or(if scenario.is_some() { 5 } else { 3 });
    let devices = args
        .devices
        .unwrap_or(if scenario.is_some() { 100 } else { 20 });
    let proxy_event = scenario.is_some_and(Scenario::is_proxy_event);
    let upgrade = scenario == Some(Scenario::ProxyUpgrade);
    let proxies = args
        .proxies
        .unwrap_or(if proxy_event && !upgrade { 2 } else { 1 });
    if upgrade && proxies != 1 {
        esay!("wasmbed up: --scenario proxy-upgrade upgrades the one proxy: leave --proxies out");
        return ExitCode::from(2);
    }
    if proxies == 0 {
        esay!("wasmbed up: `--proxies` must be at least 1");
        return ExitCode::from(2);
    }
    if proxy_event && !upgrade && proxies < 2 {
        esay!(
            "wasmbed up: --scenario {}: needs --proxies 2 or more (the devices of the stopped replica go to the others)",
            scenario
                .and_then(|s| clap::ValueEnum::to_possible_value(&s))
                .map(|v| v.get_name().to_string())
                .unwrap_or_default()
        );
        return ExitCode::from(2);
    }
    if proxies > 1 && scenario.is_some() && !proxy_event {
        esay!(
            "wasmbed up: --proxies above 1 goes with the proxy-kill and proxy-restart scenarios (the gateway scenarios read one proxy's view of the moves)"
        );
        return ExitCode::from(2);
    }
    if proxies > 1 && args.transport == wasmbed_config::loadtest::Transport::Quic {
        esay!(
            "wasmbed up: --proxies above 1 needs --transport tcp (the replicas share a TCP port; QUIC replicas would need connection-id routing)"
        );
        return ExitCode::from(2);
    }
    if gateways < 2 && scenario.is_some() {
        esay!("wasmbed up: `gateways`: a scenario needs at least 2");
        return ExitCode::from(2);
    }
    if gateways == 0 || devices == 0 {
        esay!("wasmbed up: `--gateways` and `--devices` must be at least 1");
        return ExitCode::from(2);
    }
    if let Some(r) = args.ramp
        && !(r > 0.0 && r.is_finite())
    {
        esay!("wasmbed up: --ramp must be a positive number of devices per second");
        return ExitCode::from(2);
    }
    if let Err(e) = wasmbed_config::loadtest::check_rate(args.rate) {
        esay!("wasmbed up: {e}");
        return ExitCode::from(2);
    }
    if args.upstream == wasmbed_config::proxy::UpstreamMode::Link
        && (args.mode != Mode::Terminate || args.plain_link)
    {
        esay!(
            "wasmbed up: --upstream link needs --mode terminate and TLS on the link (not --plain-link)"
        );
        return ExitCode::from(2);
    }
    if args.plain_link && args.mode != Mode::Terminate {
        esay!(
            "wasmbed up: --plain-link needs --mode terminate (in passthrough the device's TLS goes to the gateway as it is)"
        );
        return ExitCode::from(2);
    }
    if args.transport == wasmbed_config::loadtest::Transport::Quic && args.mode != Mode::Terminate {
        esay!("wasmbed up: --transport quic needs --mode terminate (QUIC ends at the proxy)");
        return ExitCode::from(2);
    }
    if let Err(e) = wasmbed_config::loadtest::check_tls12(args.tls12, args.transport) {
        esay!("wasmbed up: {e}");
        return ExitCode::from(2);
    }
    // Checked before anything starts: the fleet (and the second one of scale-up) runs in
    // this process, one connection per device.
    let second_fleet = match scenario {
        Some(Scenario::ScaleUp) => devices.div_ceil(gateways.saturating_sub(1).max(1)),
        _ => 0,
    };
    let all_devices = devices + second_fleet;
    // A TCP device holds a descriptor; QUIC devices share a socket per --devices-per-socket.
    let fleet = wasmbed_loadtest::descriptors(
        args.transport,
        all_devices,
        args.devices_per_socket as usize,
    );
    if let Err(e) = wasmbed_loadtest::check_descriptors(fleet) {
        esay!("wasmbed up: {e}");
        return ExitCode::from(2);
    }
    if scenario == Some(Scenario::Soak) && args.mode != Mode::Terminate {
        esay!(
            "wasmbed up: --scenario soak needs --mode terminate (its drains move sessions; in passthrough a drained gateway's devices would have to leave)"
        );
        return ExitCode::from(2);
    }
    if scenario == Some(Scenario::ProxyKillHeld) && args.mode != Mode::Terminate {
        esay!(
            "wasmbed up: --scenario proxy-kill-held needs --mode terminate (only a terminating proxy holds a session while it finds a gateway)"
        );
        return ExitCode::from(2);
    }
    if (args.duration.is_some() || args.period.is_some()) && scenario != Some(Scenario::Soak) {
        esay!("wasmbed up: `--duration` and `--period` are the soak's: give `--scenario soak` too");
        return ExitCode::from(2);
    }
    if let Some(period) = args.period
        && period / 2 >= args.duration.unwrap_or(Duration::from_secs(3600))
    {
        esay!(
            "wasmbed up: `--period` of twice the soak's `--duration` or more: no event would happen (the first comes at half a period)"
        );
        return ExitCode::from(2);
    }
    if args.json.is_some() && scenario.is_none() {
        esay!("wasmbed up: `--json` writes a scenario's results: give `--scenario` too");
        return ExitCode::from(2);
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("wasmbed-up-{}", std::process::id())));
    // A PKI `up` did not write is someone's: replacing it would orphan its device
    // certificates and CRL (`certs init` asks for --force for the same).
    if args.dir.is_some() && dir.join("ca.pem").exists() && !dir.join(UP_MARKER).exists() {
        esay!(
            "wasmbed up: {} holds a PKI `wasmbed up` did not write (ca.pem): give --dir a new \
             or empty directory (up writes its own PKI there), or leave --dir out",
            dir.display()
        );
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            esay!("wasmbed up: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Taken over before anything starts: from now on SIGINT, SIGTERM and SIGHUP stop `up`
    // in order (fleet, children, temporary directory) instead of killing it.
    let mut signals = match runtime.block_on(async { StopSignals::new() }) {
        Ok(s) => s,
        Err(e) => {
            esay!("wasmbed up: cannot watch signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let initial = if scenario == Some(Scenario::ScaleUp) {
        gateways - 1
    } else {
        gateways
    };
    // The soak's discovered gateway: a DNS server of our own publishes its address, as a
    // cluster's DNS does a headless Service's pods.
    let dns = if scenario == Some(Scenario::Soak) {
        let server = runtime.block_on(async {
            let server = wasmbed_devdns::DnsServer::start().await?;
            server
                .set_a(DISCOVERED_NAME, &[DISCOVERED_FIRST_IP], 1)
                .await;
            Ok::<_, std::io::Error>(server)
        });
        match server {
            Ok(s) => Some(s),
            Err(e) => {
                esay!("wasmbed up: cannot start the soak's DNS server: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    let certificates = gateways + usize::from(dns.is_some());
    let started = start(
        &args,
        &dir,
        (initial, certificates),
        all_devices,
        proxies,
        dns.as_ref().map(|d| d.addr),
    );
    let remove_dir = || {
        if args.dir.is_none() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    };
    let (mut stack, listen, admin) = match started {
        Ok(x) => x,
        Err(e) => {
            esay!("wasmbed up: {e}");
            remove_dir();
            return ExitCode::FAILURE;
        }
    };
    let transport = match args.transport {
        wasmbed_config::loadtest::Transport::Quic => "QUIC over UDP",
        wasmbed_config::loadtest::Transport::Tcp => "TLS over TCP",
    };
    say!(
        "wasmbed up: {initial} gateways, {} on {listen} ({transport}, {} mode), admin http://{admin}, PKI in {}",
        if proxies == 1 {
            "proxy".to_string()
        } else {
            format!("{proxies} proxies")
        },
        format!("{:?}", args.mode).to_lowercase(),
        dir.display()
    );
    say!("wasmbed up: live dashboard at http://{admin}/");
    if args.open {
        open_browser(&format!("http://{admin}/"));
    }
    let settings = LoadtestSettings {
        target: listen,
        devices,
        ramp: args.ramp,
        duration: Duration::from_secs(365 * 24 * 3600),
        rate: args.rate,
        payload: 32,
        app: "counter".into(),
        sni: "localhost".into(),
        ca_dir: dir.clone(),
        devices_from: None,
        json: None,
        first_device: 0,
        transport: args.transport,
        rebind_after: None,
        devices_per_socket: args.devices_per_socket as usize,
        tls12: args.tls12,
    };
    let settings_copy = settings.clone();
    let fleet = match Fleet::prepare(settings) {
        Ok(f) => f,
        Err(e) => {
            esay!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json.clone();
    let discovered = stack.discovered.take();
    let stack_ref = &stack;
    let scale = ScaleUp {
        gateway: stack.gateway_run.clone(),
        dir: dir.clone(),
        proxy_admin: admin,
        second: LoadtestSettings {
            devices: devices.div_ceil(initial.max(1)),
            first_device: devices,
            ..settings_copy
        },
    };
    let soak = soak::Soak {
        duration: args.duration.unwrap_or(Duration::from_secs(3600)),
        period: args.period,
        dir: dir.clone(),
        gateway: stack
            .gateway_run
            .with_room(gateway_capacity(all_devices, certificates)),
        dns: dns
            .zip(discovered)
            .map(|(server, gw)| soak::DnsGateway { server, gw }),
    };
    let code = runtime.block_on(async move {
        let live = fleet.live();
        let finish = CancellationToken::new();
        let running = tokio::spawn(fleet.run(finish.clone()));
        let scenario = match scenario {
            None => {
                let signal = demo(&live, devices, &mut signals).await;
                say!("{signal}: stopping, waiting for the last replies");
                finish.cancel();
                let report = running.await.unwrap_or_default();
                say_raw!("{}", report.table());
                return ExitCode::SUCCESS;
            }
            Some(s) => s,
        };
        let stop = finish.clone();
        let run = Run {
            stack: stack_ref,
            mode: args.mode,
            proxy_admin: admin,
            live: &live,
            devices,
            finish,
            running,
            json: json.as_deref(),
            // A minute, plus the ramp's own length for fleets that arrive at a set pace.
            settle: Duration::from_secs(60)
                + args.ramp.map_or(Duration::ZERO, |r| {
                    Duration::from_secs_f64(devices as f64 / r)
                }),
        };
        let scenario = async move {
            match scenario {
                Scenario::ScaleUp => scale_up(scale, run).await,
                Scenario::Storm => storm::storm_run(run).await,
                Scenario::Soak => soak::soak_run(soak, run).await,
                s if s.is_proxy_event() => scenarios::proxy_run(s, run).await,
                s => scenario_run(s, run).await,
            }
        };
        tokio::select! {
            code = scenario => code,
            signal = signals.recv() => {
                say!("{signal}: scenario stopped");
                stop.cancel();
                ExitCode::from(130)
            }
        }
    });
    drop(stack);
    remove_dir();
    code
}

/// The live view, until a stop signal; returns its name.
async fn demo(
    live: &wasmbed_loadtest::Live,
    devices: usize,
    signals: &mut StopSignals,
) -> &'static str {
    say!("{devices} devices dialing; live spread every second; Ctrl-C stops everything");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                say!("connected {:>5}/{devices}  spread {}  sent {} answered {}",
                    live.connected_now.load(std::sync::atomic::Ordering::Relaxed),
                    spread_line(&live.spread()),
                    live.sent.load(std::sync::atomic::Ordering::Relaxed),
                    live.answered.load(std::sync::atomic::Ordering::Relaxed));
            }
            signal = signals.recv() => return signal,
        }
    }
}

async fn until(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Opens `url` in a browser, where one exists; says so when none does.
fn open_browser(url: &str) {
    let candidates = ["xdg-open", "chromium", "chromium-browser", "firefox"];
    for program in candidates {
        let mut cmd = std::process::Command::new(program);
        cmd.arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        // xdg-open hands the URL over and exits: its status says whether a browser took
        // it (it fails when none is configured). A browser started directly keeps running.
        let opened = if program == "xdg-open" {
            cmd.status().is_ok_and(|s| s.success())
        } else {
            cmd.spawn().is_ok()
        };
        if opened {
            say!("wasmbed up: opened {url} with {program}");
            return;
        }
    }
    say!(
        "wasmbed up: --open: no browser found ({}); open {url} yourself",
        candidates.join(", ")
    );
}

#[cfg(test)]
mod tests;
