//! `wasmbed up` takes its children with it however it ends: SIGTERM and SIGHUP stop the
//! fleet, the gateways, the proxy and remove the temporary directory (like Ctrl-C); on
//! SIGKILL the kernel ends the children (PR_SET_PDEATHSIG).

mod support;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::BIN;

/// A running `up` with 2 gateways and 2 devices on free ports, once its banner is out.
struct Up {
    child: Child,
    /// Every port its children bound (devices, admin, gateways' sessions and admin).
    ports: Vec<SocketAddr>,
    children: Vec<u32>,
    dir: PathBuf,
}

fn start_up() -> Up {
    start_up_with(false)
}

/// `closed`: stdout is closed right after the banner (as `up | head -1` does).
fn start_up_with(closed: bool) -> Up {
    let mut child = Command::new(BIN)
        .args(["up", "--gateways", "2", "--devices", "2"])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("WASMBED_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut banner = String::new();
    out.read_line(&mut banner).unwrap();
    assert!(banner.starts_with("wasmbed up:"), "{banner:?}");
    let dir = PathBuf::from(banner.rsplit_once("PKI in ").unwrap().1.trim());
    let children = children_of(child.id());
    assert_eq!(children.len(), 3, "two gateways and a proxy");
    let ports = children
        .iter()
        .flat_map(|pid| listening(*pid))
        .collect::<Vec<_>>();
    assert!(ports.len() >= 6, "each child listens twice: {ports:?}");
    // Closed only now: `up` stops at its next line.
    if closed {
        drop(out);
    } else {
        // Keep reading stdout so `up` never blocks on a full pipe.
        std::thread::spawn(move || for _ in out.lines() {});
    }
    Up {
        child,
        ports,
        children,
        dir,
    }
}

fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let text = std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
        out.extend(
            text.split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok()),
        );
    }
    out
}

/// The TCP ports process `pid` listens on (its sockets' inodes looked up in /proc/net/tcp).
fn listening(pid: u32) -> Vec<SocketAddr> {
    let inodes: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.flatten()
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().into_owned();
                    l.strip_prefix("socket:[")?
                        .strip_suffix(']')
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // st 0A: LISTEN
            (f.get(3) == Some(&"0A") && inodes.iter().any(|i| Some(&i.as_str()) == f.get(9)))
                .then(|| {
                    let port = u16::from_str_radix(f[1].rsplit_once(':')?.1, 16).ok()?;
                    Some(SocketAddr::from(([127, 0, 0, 1], port)))
                })
                .flatten()
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie has exited: only its entry waits for its parent.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
}

/// Polls (bounded) until no child is alive and every port can be bound again.
fn all_gone(up: &Up) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let live: Vec<u32> = up.children.iter().copied().filter(|p| alive(*p)).collect();
        let busy: Vec<SocketAddr> = up
            .ports
            .iter()
            .copied()
            .filter(|a| TcpListener::bind(a).is_err())
            .collect();
        if live.is_empty() && busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still alive: {live:?}, ports still bound: {busy:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigterm_and_sighup_stop_every_child_and_remove_the_directory() {
    for sig in [libc::SIGTERM, libc::SIGHUP] {
        let mut up = start_up();
        assert!(up.dir.exists());
        signal(up.child.id(), sig);
        let status = up.child.wait().unwrap();
        assert!(status.success(), "signal {sig}: {status:?}");
        all_gone(&up);
        assert!(!up.dir.exists(), "temporary directory removed");
    }
}

#[test]
fn sigkill_takes_the_children_along() {
    let mut up = start_up();
    signal(up.child.id(), libc::SIGKILL);
    let _ = up.child.wait();
    all_gone(&up);
    // Nothing could remove the directory of a killed process; the test does.
    let _ = std::fs::remove_dir_all(&up.dir);
}

/// Impossible requests are refused in one line before anything starts.
#[test]
fn impossible_flags_are_one_line_errors_before_anything_starts() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pki");
    let d = dir.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (&["--rate", "0"], "rate"),
        (&["--rate", "inf"], "rate"),
        (&["--json", "out.json"], "--scenario"),
        (&["--devices", "0"], "--devices"),
        // Terminate-only, refused in passthrough like --upstream link and --transport quic.
        (&["--plain-link"], "--plain-link"),
    ];
    for (args, names) in cases {
        let out = Command::new(BIN)
            .args([
                "up",
                "--dir",
                d,
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains(names) && err.lines().count() == 1,
            "{args:?}: {err}"
        );
        assert!(!dir.exists(), "{args:?}: nothing was written");
    }
    // More devices than this process may open connections for: refused before the stack
    // starts (the limit is lowered for the child only).
    let out = Command::new("prlimit")
        .args([
            "--nofile=300:300",
            BIN,
            "up",
            "--devices",
            "1000",
            "--dir",
            d,
        ])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("1000 devices") && err.contains("ulimit"),
        "{err}"
    );
    assert!(!dir.exists(), "nothing was started or written");
}

/// `up | head -1`: stdout closes after the banner; at its next line (the spread, every
/// second) `up` stops as on Ctrl-C: every child stopped, its directory removed (before, that
/// line panicked and left both behind; then, `up` ran on unseen).
#[test]
fn a_closed_stdout_stops_up_and_it_cleans_up() {
    let mut up = start_up_with(true);
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = up.child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = up.child.kill();
            panic!("up runs on with nobody reading its output");
        }
        // Polling a child's exit: nothing else to wait on.
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.code().is_some(),
        "ended by itself, not by a signal: {status:?}"
    );
    all_gone(&up);
    assert!(!up.dir.exists(), "temporary directory removed");
}

/// `up --dir` over a PKI `certs init` wrote is refused before anything is written or started.
#[test]
fn up_refuses_a_pki_it_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    support::certs_init(tmp.path(), &["--devices", "2"]);
    let ca = std::fs::read(tmp.path().join("ca.pem")).unwrap();
    let out = Command::new(BIN)
        .args(["up", "--dir", tmp.path().to_str().unwrap()])
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("did not write") && err.lines().count() == 1,
        "{err}"
    );
    assert_eq!(
        std::fs::read(tmp.path().join("ca.pem")).unwrap(),
        ca,
        "the PKI is untouched"
    );
}
