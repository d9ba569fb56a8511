//! Clients of running wasmbed processes, shared by `wasmbed up`, the benches and the tests:
//!
//! - [`Admin`]: the proxy's and the gateway's admin HTTP API, over `ureq` (blocking; plain
//!   HTTP, since the admin endpoints serve plain HTTP);
//! - [`spawn_ready`]: start a `wasmbed` process and wait for the `ready ...` line it prints
//!   once its sockets are bound, with the addresses it bound ([`Ready::addr`]).

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long an admin request may take, connect to last byte.
pub const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Why an admin request got no answer.
#[derive(Debug, thiserror::Error)]
#[error("{method} http://{addr}{path}: {source}")]
pub struct AdminError {
    pub method: String,
    pub addr: SocketAddr,
    pub path: String,
    #[source]
    pub source: ureq::Error,
}

/// One admin endpoint.
#[derive(Clone)]
pub struct Admin {
    addr: SocketAddr,
    agent: ureq::Agent,
    /// Sent as `Authorization: Bearer ...` (`--admin-token-file` on the other side).
    token: Option<String>,
}

/// An admin answer: status and body (any status: 4xx and 5xx are answers too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl Admin {
    pub fn new(addr: SocketAddr) -> Admin {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(ADMIN_TIMEOUT))
            .build()
            .into();
        Admin {
            addr,
            agent,
            token: None,
        }
    }

    /// Sends `token` as a bearer token with every request.
    pub fn with_token(mut self, token: &str) -> Admin {
        self.token = Some(token.to_string());
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `method path` with `body` (JSON when it starts with `{` or `[`, else bytes).
    pub fn request(&self, method: &str, path: &str, body: &[u8]) -> Result<Answer, AdminError> {
        let error = |source| AdminError {
            method: method.into(),
            addr: self.addr,
            path: path.into(),
            source,
        };
        let json = matches!(body.first(), Some(b'{' | b'['));
        let mut request = ureq::http::Request::builder();
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let request = request
            .method(method)
            .uri(format!("http://{}{path}", self.addr))
            .header(
                "content-type",
                if json {
                    "application/json"
                } else {
                    "application/octet-stream"
                },
            )
            .body(body.to_vec())
            .map_err(|e| error(e.into()))?;
        let mut response = self.agent.run(request).map_err(error)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .map_err(error)?;
        Ok(Answer { status, body })
    }

    pub fn get(&self, path: &str) -> Result<Answer, AdminError> {
        self.request("GET", path, b"")
    }

    pub fn post(&self, path: &str, body: &[u8]) -> Result<Answer, AdminError> {
        self.request("POST", path, body)
    }
}

/// A started process's `ready ...` line.
#[derive(Debug, Clone)]
pub struct Ready(pub String);

impl Ready {
    /// The address after `key` (`listen=`, `admin=`) in the line.
    pub fn addr(&self, key: &str) -> Option<SocketAddr> {
        self.0
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .and_then(|v| v.parse().ok())
    }
}

/// Why a process did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot start {command}: {source}")]
    Start {
        command: String,
        source: std::io::Error,
    },
    #[error("{command} did not start: it printed {line:?} instead of its ready line")]
    NotReady { command: String, line: String },
    #[error("{command} did not start: no ready line within {within:?} (stopped)")]
    Timeout { command: String, within: Duration },
}

/// How long [`spawn_ready`] waits for the ready line: a gateway compiles its apps first.
pub const READY_WITHIN: Duration = Duration::from_secs(120);

/// The longest ready line read (a ready line is a few addresses).
const READY_LINE_MAX: u64 = 4096;

/// Starts `cmd` with stdout piped and waits for its first line, which must begin with
/// `ready `, within [`READY_WITHIN`]. The caller decides where stderr goes and anything else
/// about `cmd`.
pub fn spawn_ready(cmd: &mut Command) -> Result<(Child, Ready), SpawnError> {
    spawn_ready_within(cmd, READY_WITHIN)
}

/// [`spawn_ready`] waiting at most `within`: a process that prints nothing (stuck before
/// its sockets are bound) is stopped, not waited for forever.
pub fn spawn_ready_within(
    cmd: &mut Command,
    within: Duration,
) -> Result<(Child, Ready), SpawnError> {
    use std::io::Read;
    let command = format!("{:?}", cmd.get_program());
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|source| SpawnError::Start {
            command: command.clone(),
            source,
        })?;
    let (tx, rx) = std::sync::mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        // On a thread of its own, so that the wait has a deadline; it ends at the line, or
        // at the pipe's end once the process is stopped.
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout.take(READY_LINE_MAX)).read_line(&mut line);
            let _ = tx.send(line);
        });
    }
    let stop = |child: &mut Child| {
        let _ = child.kill();
        let _ = child.wait();
    };
    let line = match rx.recv_timeout(within) {
        Ok(line) => line,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            stop(&mut child);
            return Err(SpawnError::Timeout { command, within });
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => String::new(),
    };
    if !line.starts_with("ready ") {
        stop(&mut child);
        return Err(SpawnError::NotReady { command, line });
    }
    Ok((child, Ready(line)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process that never prints its ready line is stopped at the deadline, not waited for
    /// forever (`wasmbed up` would hang on a child stuck before binding).
    #[test]
    fn a_process_that_never_gets_ready_is_stopped_at_the_deadline() {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let err = spawn_ready_within(&mut cmd, Duration::from_millis(200)).unwrap_err();
        assert!(matches!(err, SpawnError::Timeout { .. }), "{err}");
        let mut cmd = Command::new("echo");
        cmd.arg("ready listen=127.0.0.1:9");
        let (mut child, ready) = spawn_ready_within(&mut cmd, Duration::from_secs(30)).unwrap();
        assert_eq!(ready.addr("listen="), Some(([127, 0, 0, 1], 9).into()));
        let _ = child.wait();
    }
}
