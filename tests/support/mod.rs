//! Test kit for end-to-end tests of the `wasmbed` binary: spawn it, wait for its ready line,
//! talk to it on 127.0.0.1.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_wasmbed");

/// Spawns `cmd` (stdout piped, stderr discarded) and waits for its `ready ...` line.
pub fn spawn_ready(cmd: &mut Command) -> (Child, String) {
    let mut child = cmd
        .env("WASMBED_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wasmbed");
    let stdout = child.stdout.take().expect("piped stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    (child, line)
}

/// The address after `key` (e.g. `listen=`) in a ready line.
pub fn addr_in(line: &str, key: &str) -> SocketAddr {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A running `wasmbed proxy` process, killed when dropped.
pub struct ProxyProcess {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
}

impl ProxyProcess {
    /// Starts `[prefix...] wasmbed proxy ARGS` and waits for its `ready` line.
    pub fn start(prefix: &[&str], args: &[&str]) -> ProxyProcess {
        let mut cmd = match prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.arg("proxy")
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(args);
        let (child, line) = spawn_ready(&mut cmd);
        let (listen, admin) = (addr_in(&line, "listen="), addr_in(&line, "admin="));
        ProxyProcess {
            child,
            listen,
            admin,
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) with a pid we spawned and own; no memory is touched.
        let rc = unsafe { libc::kill(self.child.id() as i32, signal) };
        assert_eq!(rc, 0, "kill failed");
    }

    pub fn child_alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// GET on the admin endpoint: (status, body).
    pub fn get(&self, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(self.admin).expect("admin reachable");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut resp = String::new();
        s.read_to_string(&mut resp).unwrap();
        let status = resp
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (
            status,
            resp.split_once("\r\n\r\n")
                .map(|(_, b)| b.to_string())
                .unwrap_or_default(),
        )
    }

    pub fn metric(&self, series: &str) -> f64 {
        self.get("/metrics")
            .1
            .lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain echo server on a thread per connection.
pub fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = s.read(&mut buf) {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Sends `msg` through a plain connection and reads its echo.
pub fn echo(addr: SocketAddr, msg: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    s.read_exact(&mut back)?;
    Ok(back)
}
