//! Stopping never hangs (docs/proxy.md, "Stopping"): a proxy or gateway whose stdout and stderr
//! are closed pipes stops on SIGINT and SIGTERM — at start-up, idle, under load, during a
//! reload and during moves; a second signal ends it at once; and `--hard-stop-after` ends it
//! whatever still runs, naming what was.
//!
//! Each process here is spawned with both output pipes closed by the test right after its
//! ready line (`WASMBED_LOG=debug`, so it writes plenty after that).

mod support;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use support::{BIN, addr_in};
use wasmbed_testkit::Device;

/// Bound on a stop that should be prompt: far above what it takes, far below a hang.
const PROMPT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone, Copy)]
enum Role {
    Proxy,
    Gateway,
}

fn apps() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/apps")
}

fn command(role: Role, extra: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    match role {
        Role::Proxy => cmd
            .args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            // A gateway nothing listens on: the health checker logs every probe.
            .args(["--gateway", "dead=127.0.0.1:1", "--health", "tcp"])
            .args(["--health-interval", "50ms"]),
        Role::Gateway => cmd
            .args(["gateway", "--insecure-plaintext", "--listen", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0", "--apps", apps()]),
    };
    cmd.args(extra).env("WASMBED_LOG", "debug");
    cmd
}

/// Spawns `cmd` with stdout and stderr piped and closes stderr; reads the ready line, then
/// closes stdout: every later write of the process fails with EPIPE.
fn spawn_with_closed_pipes(cmd: &mut Command) -> (support::Killed, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stderr closed first: nothing the process logs before its ready line may block it.
    drop(child.stderr.take());
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready "), "{line:?}");
    (support::Killed(child), line)
}

fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped; no memory is touched.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Waits for the child to exit, at most `within`; `None` if it is still running.
fn exited_within(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = std::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        // Polling a child's exit: there is no readiness signal to wait on instead.
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigint_and_sigterm_stop_a_process_whose_output_pipes_are_closed() {
    for role in [Role::Proxy, Role::Gateway] {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let (mut child, line) = spawn_with_closed_pipes(&mut command(role, &[]));
            // Something to log after the pipes closed, before the signal.
            let admin = addr_in(&line, "admin=");
            let _ = support::Admin::new(admin).get("/metrics");
            signal(&child.0, sig);
            let status = exited_within(&mut child.0, PROMPT)
                .unwrap_or_else(|| panic!("{role:?} ignored signal {sig} with closed pipes"));
            assert!(status.success(), "{role:?} signal {sig}: {status}");
        }
    }
}

#[test]
fn a_signal_at_a_random_moment_of_start_up_stops_the_process() {
    // Deterministic "random" moments (no clock, no seed to lose): spread over start-up.
    let moments_ms = [0u64, 3, 17, 41, 90, 160];
    for role in [Role::Proxy, Role::Gateway] {
        for ms in moments_ms {
            let mut child = support::Killed(
                command(role, &[])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            );
            // The point is an arbitrary moment: there is nothing to wait for.
            std::thread::sleep(Duration::from_millis(ms));
            signal(&child.0, libc::SIGTERM);
            let status = exited_within(&mut child.0, PROMPT);
            assert!(
                status.is_some(),
                "{role:?} signalled {ms} ms into start-up kept running"
            );
        }
    }
}

/// Two gateways, a terminating proxy in front, devices sending DATA; every process with its
/// output pipes closed. Then: a reload, a drain that moves sessions, and SIGTERM while both
/// are under way. The proxy and then the gateways stop within [`PROMPT`].
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_load_during_a_reload_and_moves_the_proxy_and_the_gateways_stop() {
    let dir = tempfile::tempdir().unwrap();
    support::certs_init(dir.path(), &["--devices", "8"]);
    let keys = dir.path().join("session-keys.toml");
    let keys = keys.to_str().unwrap();
    let mut gateways = Vec::new();
    let mut gateway_args = Vec::new();
    for name in ["gw-1", "gw-2"] {
        let (gw, line) = spawn_with_closed_pipes(&mut command(
            Role::Gateway,
            &[
                "--name",
                name,
                "--session-keys",
                keys,
                "--checkpoint",
                "every",
            ],
        ));
        gateway_args.extend([
            "--gateway".to_string(),
            format!("{name}={}", addr_in(&line, "listen=")),
        ]);
        gateways.push(gw);
    }
    let mut args = support::terminate_args(dir.path());
    args.extend(gateway_args);
    args.extend(["--health", "tcp", "--health-interval", "100ms"].map(String::from));
    let mut cmd = Command::new(BIN);
    cmd.args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .args(&args)
        .env("WASMBED_LOG", "debug");
    let (mut proxy, line) = spawn_with_closed_pipes(&mut cmd);
    let (listen, admin) = (addr_in(&line, "listen="), addr_in(&line, "admin="));

    // Eight devices in a loop of DATA until the proxy goes.
    let mut load = tokio::task::JoinSet::new();
    for i in 0..8 {
        let config = support::device_of(dir.path(), &format!("device-{i:04}"));
        let mut d = support::tls_device(listen, config).await;
        d.open(&format!("device-{i:04}"), "counter").await;
        load.spawn(async move {
            let mut d: Device<_> = d;
            for seq in 1.. {
                let data =
                    wasmbed_protocol::Frame::new(wasmbed_protocol::Kind::Data, seq, b"x".to_vec());
                if d.send(data).await.is_err() || d.recv().await.is_none() {
                    break;
                }
            }
        });
    }
    let admin_client = support::Admin::new(admin);
    let reload = admin_client.post("/api/reload", b"").unwrap();
    assert_eq!(reload.status, 200, "{}", reload.body);
    let drain = admin_client
        .post("/api/gateways/gw-1/drain?move=true", b"")
        .unwrap();
    assert_eq!(drain.status, 200, "{}", drain.body);
    signal(&proxy.0, libc::SIGHUP);
    signal(&proxy.0, libc::SIGTERM);
    let status = exited_within(&mut proxy.0, PROMPT).expect("the proxy kept running");
    assert!(status.success(), "proxy: {status}");
    load.shutdown().await;
    for gw in &mut gateways {
        signal(&gw.0, libc::SIGTERM);
        let status = exited_within(&mut gw.0, PROMPT).expect("a gateway kept running");
        assert!(status.success(), "gateway: {status}");
    }
}

/// A process with its output pipes intact (to read its last line) and one session held open.
/// What [`holding_a_session`] returns: the process, its stderr, the runtime and the session.
type Holding = (
    support::Killed,
    BufReader<std::process::ChildStderr>,
    tokio::runtime::Runtime,
    Box<dyn std::any::Any>,
    SocketAddr,
);

fn holding_a_session(role: Role, extra: &[&str]) -> Holding {
    let echo = support::echo_server();
    let mut cmd = match role {
        Role::Proxy => {
            let mut c = Command::new(BIN);
            c.args(["proxy", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
                .args(["--gateway", &format!("echo={echo}"), "--health", "none"])
                .arg("--allow-plain");
            c
        }
        Role::Gateway => command(Role::Gateway, &[]),
    };
    cmd.args(extra).env("WASMBED_LOG", "info");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.starts_with("ready "), "{line:?}");
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let listen = addr_in(&line, "listen=");
    let admin = addr_in(&line, "admin=");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    // A session that never ends by itself: the device neither reads GOAWAY nor closes.
    let held: Box<dyn std::any::Any> = match role {
        Role::Proxy => {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(listen).unwrap();
            s.write_all(b"held").unwrap();
            let mut back = [0u8; 4];
            s.read_exact(&mut back).unwrap();
            assert_eq!(&back, b"held");
            Box::new(s)
        }
        // The gateway would answer what it has and close after GOAWAY: this device never
        // reads, and writes until its writes stall, so the gateway is stuck writing REPLYs
        // and cannot finish the session.
        Role::Gateway => Box::new(runtime.block_on(async {
            let mut d = Device::new(tokio::net::TcpStream::connect(listen).await.unwrap());
            d.open("held", "echo").await;
            for seq in 1.. {
                let data = wasmbed_protocol::Frame::new(
                    wasmbed_protocol::Kind::Data,
                    seq,
                    vec![7u8; 32 << 10],
                );
                let sent = tokio::time::timeout(Duration::from_millis(500), d.send(data)).await;
                if sent.is_err() {
                    break;
                }
            }
            d
        })),
    };
    (support::Killed(child), stderr, runtime, held, admin)
}

/// Reads stderr lines until one contains `what`; returns them all.
fn read_until(stderr: &mut BufReader<std::process::ChildStderr>, what: &str) -> String {
    let mut all = String::new();
    loop {
        let mut line = String::new();
        if stderr.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("stderr ended before {what:?}: {all}");
        }
        all.push_str(&line);
        if line.contains(what) {
            return all;
        }
    }
}

#[test]
fn past_hard_stop_after_the_process_ends_and_names_what_still_ran() {
    for role in [Role::Proxy, Role::Gateway] {
        // The grace alone would keep it 60 s; the hard stop comes after 1 s.
        let extra: &[&str] = match role {
            Role::Proxy => &["--hard-stop-after", "1s"],
            Role::Gateway => &["--grace", "60s", "--hard-stop-after", "1s"],
        };
        let mut config_dir = None;
        let extra: Vec<String> = match role {
            // The proxy's grace is a config-file key.
            Role::Proxy => {
                let dir = tempfile::tempdir().unwrap();
                let file = dir.path().join("proxy.toml");
                std::fs::write(&file, "grace = \"60s\"\n").unwrap();
                let v = [&["--config", file.to_str().unwrap()][..], extra].concat();
                config_dir = Some(dir);
                v.iter().map(|s| s.to_string()).collect()
            }
            Role::Gateway => extra.iter().map(|s| s.to_string()).collect(),
        };
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let (mut child, mut stderr, _rt, _held, _) = holding_a_session(role, &extra);
        signal(&child.0, libc::SIGTERM);
        let said = read_until(&mut stderr, "hard stop");
        let status =
            exited_within(&mut child.0, PROMPT).expect("still running after the hard stop");
        assert_eq!(status.code(), Some(1), "{role:?}: {said}");
        assert!(
            said.contains("still running: 1 device sessions"),
            "{role:?}: {said}"
        );
        drop(config_dir);
    }
}

/// A gateway drained by its operator (a Kubernetes preStop hook) and then told to stop gives
/// what still runs its grace, as a stop without a drain does: it does not exit at once,
/// cutting a session still answering.
#[test]
fn a_drained_gateway_told_to_stop_gives_its_sessions_the_grace() {
    let extra = ["--grace", "60s", "--hard-stop-after", "1s"];
    let (mut child, mut stderr, rt, _held, admin) = holding_a_session(Role::Gateway, &extra);
    let (status, body) = rt.block_on(wasmbed_testkit::http(admin, "POST", "/api/drain", b""));
    assert_eq!(status, 202, "{body}");
    read_until(&mut stderr, "drain requested");
    signal(&child.0, libc::SIGTERM);
    let said = read_until(&mut stderr, "hard stop");
    let status = exited_within(&mut child.0, PROMPT).expect("still running after the hard stop");
    assert_eq!(status.code(), Some(1), "{said}");
    assert!(said.contains("still running: 1 device sessions"), "{said}");
}

/// `hard_stop_after` (and its default, `grace` + 10 s) is the one in use when the stop
/// begins: a reload that changed it counts, so a reloaded `grace` is not cut short by the
/// hard stop of the start.
#[test]
fn the_hard_stop_in_use_when_the_stop_begins_counts() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("proxy.toml");
    std::fs::write(&file, "grace = \"60s\"\nhard_stop_after = \"30s\"\n").unwrap();
    let (mut child, mut stderr, _rt, _held, _) =
        holding_a_session(Role::Proxy, &["--config", file.to_str().unwrap()]);
    std::fs::write(&file, "grace = \"60s\"\nhard_stop_after = \"1200ms\"\n").unwrap();
    signal(&child.0, libc::SIGHUP);
    read_until(&mut stderr, "config reloaded");
    signal(&child.0, libc::SIGTERM);
    let said = read_until(&mut stderr, "hard stop");
    assert!(said.contains("hard stop: 1.2s after SIGTERM"), "{said}");
    let status = exited_within(&mut child.0, PROMPT).expect("still running after the hard stop");
    assert_eq!(status.code(), Some(1), "{said}");
}

#[test]
fn a_second_signal_ends_the_process_at_once() {
    for role in [Role::Proxy, Role::Gateway] {
        let extra: &[&str] = match role {
            Role::Proxy => &[],
            Role::Gateway => &["--grace", "60s"],
        };
        let (mut child, mut stderr, _rt, _held, _) = holding_a_session(role, extra);
        signal(&child.0, libc::SIGTERM);
        // The first one is being handled (its own log line is out, not only the proxy's
        // "shutting down: no longer accepting", which may come first): now the second.
        read_until(&mut stderr, "a second signal stops at once");
        signal(&child.0, libc::SIGINT);
        let said = read_until(&mut stderr, "second signal (");
        let status = exited_within(&mut child.0, PROMPT).expect("a second signal did not end it");
        assert_eq!(status.code(), Some(1), "{role:?}: {said}");
        assert!(
            said.contains("still running: 1 device sessions"),
            "{role:?}: {said}"
        );
    }
}
