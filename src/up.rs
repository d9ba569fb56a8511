//! `wasmbed up`: the whole stack on this machine (dev PKI, gateways, proxy, a device fleet),
//! and the failover and drain scenarios as one command each.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use wasmbed_config::{LoadtestSettings, Mode};
use wasmbed_loadtest::{Fleet, Report};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Kill one gateway (SIGKILL, a real crash) under load; measure re-homing.
    Failover,
    /// Drain one gateway (GOAWAY to its sessions) under load; measure re-homing.
    Drain,
    /// Start with one gateway less, add it under load, and show where new devices go.
    ScaleUp,
}

#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Gateway processes to start. Default 3, or 5 for a scenario.
    #[arg(long)]
    gateways: Option<usize>,
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
    /// Directory for the dev PKI and apps. Default: a new temporary directory.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Run a scenario, print its figures and exit (non-zero if a check fails).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// DATA messages per second per device.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Write the scenario's results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
}

/// Child processes, killed when dropped.
struct Stack {
    gateways: Vec<(String, Child, SocketAddr)>,
    proxy: Option<Child>,
}

impl Drop for Stack {
    fn drop(&mut self) {
        for (_, c, _) in self.gateways.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(p) = self.proxy.as_mut() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }
}

fn spawn_ready(cmd: &mut Command) -> Result<(Child, String), String> {
    use std::os::unix::process::CommandExt;
    // Its own process group: Ctrl-C reaches `up` alone, which ends the fleet first, then stops
    // the processes it started.
    let mut child = cmd
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .env(
            "WASMBED_LOG",
            std::env::var("WASMBED_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .spawn()
        .map_err(|e| format!("cannot start {cmd:?}: {e}"))?;
    let mut line = String::new();
    let stdout = child.stdout.take().ok_or("no stdout")?;
    BufReader::new(stdout)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    if !line.starts_with("ready ") {
        let _ = child.kill();
        return Err(format!("{cmd:?} did not start (see its error above)"));
    }
    Ok((child, line))
}

fn field(line: &str, key: &str) -> Option<SocketAddr> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
}

fn http(addr: SocketAddr, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string())
}

/// Starts gateway `gw-i` (certificates `gateway-i.*` of `dir`); returns its name, process,
/// session address and admin address.
fn spawn_gateway(
    mode: Mode,
    dir: &Path,
    i: usize,
) -> Result<(String, Child, SocketAddr, SocketAddr), String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let d = |f: &str| dir.join(f).display().to_string();
    let name = format!("gw-{i}");
    let mut cmd = Command::new(&exe);
    cmd.args(["gateway", "--name", &name, "--listen", "127.0.0.1:0"])
        .args([
            "--admin",
            "127.0.0.1:0",
            "--apps",
            &d("apps"),
            "--idle-timeout",
            "10m",
        ]);
    match mode {
        Mode::Passthrough => cmd
            .args(["--tls-cert", &d(&format!("gateway-{i}.pem"))])
            .args(["--tls-key", &d(&format!("gateway-{i}.key"))])
            .args(["--client-ca", &d("ca.pem")]),
        Mode::Terminate => cmd.arg("--insecure-plaintext"),
    };
    let (child, line) = spawn_ready(&mut cmd)?;
    let listen = field(&line, "listen=").ok_or("no listen")?;
    let admin = field(&line, "admin=").ok_or("no admin")?;
    Ok((name, child, listen, admin))
}

/// Writes the PKI for `certificates` gateways, starts `gateways` of them and the proxy.
fn start(
    args: &UpArgs,
    dir: &Path,
    gateways: usize,
    certificates: usize,
) -> Result<(Stack, SocketAddr, SocketAddr), String> {
    crate::certs_cmd::write_dev_pki(dir, certificates).map_err(|e| e.to_string())?;
    let apps = dir.join("apps");
    std::fs::create_dir_all(&apps).map_err(|e| e.to_string())?;
    for (name, text) in [
        ("echo", include_str!("../apps/echo.wat")),
        ("counter", include_str!("../apps/counter.wat")),
    ] {
        std::fs::write(apps.join(format!("{name}.wat")), text).map_err(|e| e.to_string())?;
    }
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let d = |f: &str| dir.join(f).display().to_string();
    let mut stack = Stack {
        gateways: Vec::new(),
        proxy: None,
    };
    let mut gw_flags = Vec::new();
    for i in 0..gateways {
        let (name, child, listen, admin) = spawn_gateway(args.mode, dir, i)?;
        gw_flags.push(format!("{name}={listen};health={admin}"));
        stack.gateways.push((name, child, admin));
    }
    let mut cmd = Command::new(&exe);
    cmd.args(["proxy", "--listen", &args.listen, "--admin", &args.admin])
        .args([
            "--health",
            "http",
            "--health-path",
            "/readyz",
            "--health-interval",
            "250ms",
            "--fall",
            "2",
        ])
        .arg("--gateway")
        .arg(gw_flags.join(","));
    if args.mode == Mode::Terminate {
        cmd.args([
            "--mode",
            "terminate",
            "--tls-cert",
            &d("proxy.pem"),
            "--tls-key",
            &d("proxy.key"),
        ])
        .args(["--client-ca", &d("ca.pem")]);
    }
    let (proxy, line) = spawn_ready(&mut cmd)?;
    stack.proxy = Some(proxy);
    let listen = field(&line, "listen=").ok_or("no proxy listen address")?;
    let admin = field(&line, "admin=").ok_or("no proxy admin address")?;
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
    if gateways < 2 && scenario.is_some() {
        eprintln!("wasmbed up: `gateways`: a scenario needs at least 2");
        return ExitCode::from(2);
    }
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("wasmbed-up-{}", std::process::id())));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("wasmbed up: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let initial = if scenario == Some(Scenario::ScaleUp) {
        gateways - 1
    } else {
        gateways
    };
    let (stack, listen, admin) = match start(&args, &dir, initial, gateways) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "wasmbed up: {initial} gateways, proxy on {listen} ({:?}), admin http://{admin}, PKI in {}",
        args.mode,
        dir.display()
    );
    let settings = LoadtestSettings {
        target: listen,
        devices,
        ramp: None,
        duration: Duration::from_secs(365 * 24 * 3600),
        rate: args.rate,
        payload: 32,
        app: "counter".into(),
        sni: "localhost".into(),
        ca_dir: dir.clone(),
        json: None,
        first_device: 0,
    };
    let settings_copy = settings.clone();
    let fleet = match Fleet::prepare(settings) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let json = args.json.clone();
    let stack_ref = &stack;
    let scale = ScaleUp {
        mode: args.mode,
        dir: dir.clone(),
        proxy_admin: admin,
        second: LoadtestSettings {
            devices: devices.div_ceil(initial.max(1)),
            first_device: devices,
            ..settings_copy
        },
    };
    let code = runtime.block_on(async move {
        let live = fleet.live();
        let finish = CancellationToken::new();
        let running = tokio::spawn(fleet.run(finish.clone()));
        match scenario {
            None => {
                demo(&live, devices, &finish).await;
                let report = running.await.unwrap_or_default();
                print!("{}", report.table());
                ExitCode::SUCCESS
            }
            Some(Scenario::ScaleUp) => {
                scale_up(
                    scale,
                    stack_ref,
                    &live,
                    devices,
                    finish,
                    running,
                    json.as_deref(),
                )
                .await
            }
            Some(s) => {
                scenario_run(
                    s,
                    stack_ref,
                    &live,
                    devices,
                    finish,
                    running,
                    json.as_deref(),
                )
                .await
            }
        }
    });
    drop(stack);
    if args.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    code
}

async fn demo(live: &wasmbed_loadtest::Live, devices: usize, finish: &CancellationToken) {
    println!("{devices} devices dialing; live spread every second; Ctrl-C stops everything");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                println!("connected {:>5}/{devices}  spread {}  sent {} answered {}",
                    live.connected_now.load(std::sync::atomic::Ordering::Relaxed),
                    spread_line(&live.spread()),
                    live.sent.load(std::sync::atomic::Ordering::Relaxed),
                    live.answered.load(std::sync::atomic::Ordering::Relaxed));
            }
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    println!("stopping: waiting for the last replies");
    finish.cancel();
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

/// Waits (at most 60 s) until every device is connected; prints and returns the spread.
async fn settle(live: &wasmbed_loadtest::Live, devices: usize) -> (bool, BTreeMap<String, usize>) {
    use std::sync::atomic::Ordering::Relaxed;
    let all_up = until(Duration::from_secs(60), || {
        live.connected_now.load(Relaxed) == devices
    })
    .await;
    let before = live.spread();
    println!(
        "spread before: {}  (max-min {})",
        spread_line(&before),
        max_minus_min(&before)
    );
    (all_up, before)
}

/// Prints the checks, writes `doc` (with the failed checks) to `json`, and gives the exit code.
fn conclude(checks: &[(bool, &str)], mut doc: serde_json::Value, json: Option<&Path>) -> ExitCode {
    let failed: Vec<&str> = checks.iter().filter(|c| !c.0).map(|c| c.1).collect();
    doc["failed_checks"] = serde_json::json!(failed);
    if let Some(path) = json
        && let Err(e) = std::fs::write(path, serde_json::to_string_pretty(&doc).unwrap_or_default())
    {
        eprintln!("wasmbed up: cannot write {}: {e}", path.display());
    }
    if failed.is_empty() {
        println!("all checks passed");
        ExitCode::SUCCESS
    } else {
        failed.iter().for_each(|f| println!("FAILED: {f}"));
        ExitCode::FAILURE
    }
}

async fn scenario_run(
    scenario: Scenario,
    stack: &Stack,
    live: &wasmbed_loadtest::Live,
    devices: usize,
    finish: CancellationToken,
    running: tokio::task::JoinHandle<Report>,
    json: Option<&Path>,
) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
    let (all_up, before) = settle(live, devices).await;
    let (victim, child, victim_admin) = &stack.gateways[0];
    let affected = before.get(victim).copied().unwrap_or(0);
    let rehomed_before = live.rehomed.load(Relaxed);
    let event = Instant::now();
    match scenario {
        Scenario::Failover => {
            println!("killing {victim} (SIGKILL) with {affected} devices on it");
            let _ = Command::new("kill")
                .args(["-KILL", &child.id().to_string()])
                .status();
        }
        Scenario::Drain | Scenario::ScaleUp => {
            println!("draining {victim} with {affected} devices on it");
            let _ = http(*victim_admin, "POST", "/api/drain");
        }
    }
    let rehomed = until(Duration::from_secs(30), || {
        live.rehomed.load(Relaxed) - rehomed_before >= affected
            && live.connected_now.load(Relaxed) == devices
    })
    .await;
    let rehome_all = event.elapsed();
    // Keep sending for a moment on the new gateways, then end and wait for the last replies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = live.spread();
    finish.cancel();
    let report = running.await.unwrap_or_default();
    let lost = report.messages.lost;
    println!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    println!(
        "re-homed {}/{affected} devices, all within {:.0} ms; re-home p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        live.rehomed.load(Relaxed) - rehomed_before,
        rehome_all.as_secs_f64() * 1e3,
        report.rehome_us.p50 as f64 / 1e3,
        report.rehome_us.p99 as f64 / 1e3,
        report.rehome_us.max as f64 / 1e3
    );
    println!(
        "messages: sent {} answered {} lost {} duplicated {}",
        report.messages.sent, report.messages.answered, lost, report.messages.duplicated
    );
    print!("{}", report.table());
    let checks = [
        (all_up, "every device connected before the event"),
        (rehomed, "every affected device re-homed"),
        (max_minus_min(&before) <= 1, "spread before: max - min <= 1"),
        (
            max_minus_min(&after) <= 1 && !after.contains_key(victim),
            "spread after: max - min <= 1",
        ),
        (lost == 0, "no message lost"),
    ];
    let doc = serde_json::json!({
        "scenario": format!("{scenario:?}").to_lowercase(),
        "devices": devices,
        "gateways": stack.gateways.len(),
        "victim": victim,
        "affected": affected,
        "rehomed": live.rehomed.load(Relaxed) - rehomed_before,
        "rehome_all_ms": rehome_all.as_secs_f64() * 1e3,
        "spread_before": before,
        "spread_after": after,
        "report": report,
    });
    conclude(&checks, doc, json)
}

/// What the scale-up scenario needs besides the stack.
struct ScaleUp {
    mode: Mode,
    dir: PathBuf,
    proxy_admin: SocketAddr,
    /// The second fleet, started once the new gateway is in.
    second: LoadtestSettings,
}

/// A child process killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn scale_up(
    scale: ScaleUp,
    stack: &Stack,
    live: &wasmbed_loadtest::Live,
    devices: usize,
    finish: CancellationToken,
    running: tokio::task::JoinHandle<Report>,
    json: Option<&Path>,
) -> ExitCode {
    use std::sync::atomic::Ordering::Relaxed;
    let (all_up, before) = settle(live, devices).await;
    let index = stack.gateways.len();
    let (name, child, listen, gw_admin) = match spawn_gateway(scale.mode, &scale.dir, index) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let _new_gateway = Killed(child);
    let body = format!(r#"{{"name":"{name}","address":"{listen}","health_address":"{gw_admin}"}}"#);
    let added = http_body(scale.proxy_admin, "/api/gateways", &body).is_some_and(|s| s == 201);
    println!(
        "added {name} under load: {}",
        if added {
            "accepted by the proxy"
        } else {
            "REFUSED"
        }
    );
    let second = match Fleet::prepare(scale.second) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("wasmbed up: {e}");
            return ExitCode::FAILURE;
        }
    };
    let new_devices = second.live().gateway.lock().map(|g| g.len()).unwrap_or(0);
    let live2 = second.live();
    let running2 = tokio::spawn(second.run(finish.clone()));
    println!("{new_devices} new devices dialing");
    let second_up = until(Duration::from_secs(60), || {
        live2.connected_now.load(Relaxed) == new_devices
    })
    .await;
    let new_spread = live2.spread();
    let mut after = live.spread();
    for (g, n) in &new_spread {
        *after.entry(g.clone()).or_default() += n;
    }
    println!("new sessions: {}", spread_line(&new_spread));
    println!(
        "spread after:  {}  (max-min {})",
        spread_line(&after),
        max_minus_min(&after)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    finish.cancel();
    let (r1, r2) = (
        running.await.unwrap_or_default(),
        running2.await.unwrap_or_default(),
    );
    let lost = r1.messages.lost + r2.messages.lost;
    for (reason, n) in &r2.failed {
        println!("new devices that never connected: {n} ({reason})");
    }
    println!(
        "messages: sent {} answered {} lost {lost}",
        r1.messages.sent + r2.messages.sent,
        r1.messages.answered + r2.messages.answered
    );
    let checks = [
        (all_up && second_up, "every device connected"),
        (added, "the proxy took the new gateway"),
        (max_minus_min(&before) <= 1, "spread before: max - min <= 1"),
        (
            max_minus_min(&after) <= 1 && after.contains_key(&name),
            "spread after: max - min <= 1, new gateway in use",
        ),
        (lost == 0, "no message lost"),
    ];
    let doc = serde_json::json!({
        "scenario": "scale-up",
        "added": name,
        "spread_before": before,
        "new_sessions": new_spread,
        "spread_after": after,
        "lost": lost,
    });
    conclude(&checks, doc, json)
}

/// POST a JSON body; returns the status code.
fn http_body(addr: SocketAddr, path: &str, body: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(3))).ok()?;
    write!(
        s,
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.split(' ').nth(1)?.parse().ok()
}
