//! Test kit for end-to-end tests of the `wasmbed` binary: spawn it, wait for its ready line,
//! talk to it on 127.0.0.1.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub use wasmbed_testkit::{Admin, Metrics, Ready};

pub const BIN: &str = env!("CARGO_BIN_EXE_wasmbed");

/// Spawns `cmd` (stderr discarded) and waits for its `ready ...` line.
pub fn spawn_ready(cmd: &mut Command) -> (Child, String) {
    let (child, ready) =
        wasmbed_testkit::spawn_ready(cmd.env("WASMBED_LOG", "warn").stderr(Stdio::null()))
            .unwrap_or_else(|e| panic!("{e}"));
    (child, ready.0)
}

/// The address after `key` (e.g. `listen=`) in a ready line.
pub fn addr_in(line: &str, key: &str) -> SocketAddr {
    Ready(line.to_string())
        .addr(key)
        .unwrap_or_else(|| panic!("no {key} in {line:?}"))
}

/// A running `wasmbed proxy` process, killed when dropped.
pub struct ProxyProcess {
    pub child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    /// `quic=` of the ready line (`--quic-listen`).
    pub quic: Option<SocketAddr>,
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
        let quic = Ready(line.clone()).addr("quic=");
        ProxyProcess {
            child,
            listen,
            admin,
            quic,
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
        let answer = Admin::new(self.admin)
            .get(path)
            .unwrap_or_else(|e| panic!("{e}"));
        (answer.status, answer.body)
    }

    pub fn metric(&self, series: &str) -> f64 {
        Metrics::parse(&self.get("/metrics").1).series(series)
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

/// A child process killed (and reaped) when dropped: a failed assertion leaves nothing
/// running.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `wasmbed proxy` flags for terminate mode with the PKI in `dir` (as `certs init` wrote it):
/// the proxy's certificate and key, devices' certificates required from its CA.
pub fn terminate_args(dir: &std::path::Path) -> Vec<String> {
    let d = |f: &str| dir.join(f).to_string_lossy().into_owned();
    [
        "--mode".to_string(),
        "terminate".into(),
        "--tls-cert".into(),
        d("proxy.pem"),
        "--tls-key".into(),
        d("proxy.key"),
        "--client-ca".into(),
        d("ca.pem"),
    ]
    .into()
}

/// A TLS client config presenting `id`'s certificate from the PKI in `dir`.
pub fn device_of(dir: &std::path::Path, id: &str) -> std::sync::Arc<rustls::ClientConfig> {
    let ca = wasmbed_certs::load_certs(&dir.join("ca.pem")).unwrap();
    let chain = wasmbed_certs::load_certs(&dir.join(format!("devices/{id}.pem"))).unwrap();
    let key = wasmbed_certs::load_key(&dir.join(format!("devices/{id}.key"))).unwrap();
    wasmbed_certs::client_config(&ca, Some((chain, key))).unwrap()
}

/// Two TLS gateways `gw-0` and `gw-1` from the PKI in `pki` (its certificates, its session
/// key ring, the example apps), with `extra` flags: each with its listen and admin addresses,
/// and the proxy's `--gateway` list for them (health on the admin port).
pub fn tls_gateways(
    pki: &std::path::Path,
    extra: &[&str],
) -> (Vec<(Killed, SocketAddr, SocketAddr)>, String) {
    let d = |f: &str| pki.join(f).to_string_lossy().into_owned();
    let apps = concat!(env!("CARGO_MANIFEST_DIR"), "/apps");
    let mut gateways = Vec::new();
    for i in 0..2 {
        let mut cmd = Command::new(BIN);
        cmd.args(["gateway", "--name", &format!("gw-{i}")])
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .args(["--apps", apps, "--session-keys", &d("session-keys.toml")])
            .args(["--tls-cert", &d(&format!("gateway-{i}.pem"))])
            .args(["--tls-key", &d(&format!("gateway-{i}.key"))])
            .args(["--client-ca", &d("ca.pem")])
            .args(extra);
        let (child, line) = spawn_ready(&mut cmd);
        gateways.push((
            Killed(child),
            addr_in(&line, "listen="),
            addr_in(&line, "admin="),
        ));
    }
    let spec: Vec<String> = gateways
        .iter()
        .enumerate()
        .map(|(i, (_, listen, admin))| format!("gw-{i}={listen};health={admin}"))
        .collect();
    (gateways, spec.join(","))
}

/// `wasmbed certs init --dir DIR ARGS...`; panics with its stderr when it fails.
pub fn certs_init(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new(BIN)
        .args(["certs", "init", "--dir"])
        .arg(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A device connected over TLS (`config`) to `addr`, checking the name `localhost`.
pub async fn tls_device(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
) -> wasmbed_testkit::Device<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    wasmbed_testkit::Device::new(stream)
}
