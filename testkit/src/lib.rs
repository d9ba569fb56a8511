//! What the test suites and the benches share (dev-only, not published): starting processes
//! and waiting for their ready line, admin calls over the maintained client of
//! `wasmbed-client`, polling with a deadline, resident memory, a Prometheus text matcher, and a
//! device speaking the session protocol through the protocol's codec.
#![allow(clippy::missing_panics_doc)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;
/// The DNS server tests change records of (see `wasmbed-devdns`).
pub use wasmbed_devdns as dns;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Framed;
use wasmbed_protocol::codec::FrameCodec;
use wasmbed_protocol::{ErrorBody, Frame, Hello, Kind, Welcome};

pub use wasmbed_client::{Admin, Answer, Ready, SpawnError, spawn_ready};

/// An admin request from async code (the client is blocking: it runs on the blocking pool).
/// Panics when the endpoint does not answer: a test kit call, not a probe.
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let (method, path, body) = (method.to_string(), path.to_string(), body.to_vec());
    let answer =
        tokio::task::spawn_blocking(move || Admin::new(addr).request(&method, &path, &body))
            .await
            .expect("admin request task")
            .unwrap_or_else(|e| panic!("{e}"));
    (answer.status, answer.body)
}

/// [`http`] with `Authorization: Bearer token`.
pub async fn http_auth(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    token: &str,
) -> (u16, String) {
    let (method, path, body, token) = (
        method.to_string(),
        path.to_string(),
        body.to_vec(),
        token.to_string(),
    );
    let answer = tokio::task::spawn_blocking(move || {
        Admin::new(addr)
            .with_token(&token)
            .request(&method, &path, &body)
    })
    .await
    .expect("admin request task")
    .unwrap_or_else(|e| panic!("{e}"));
    (answer.status, answer.body)
}

/// An admin request over HTTPS with `config` (its roots, and a client certificate if it has
/// one) and, optionally, a bearer token. HTTP/1.1 with `Connection: close`, written by hand:
/// the production client speaks plain HTTP. Returns (status, body); panics on a broken reply.
pub async fn https(
    addr: SocketAddr,
    config: std::sync::Arc<rustls::ClientConfig>,
    (method, path, body): (&str, &str, &[u8]),
    token: Option<&str>,
) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("TLS with the admin endpoint");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await.expect("request");
    tls.write_all(body).await.expect("request body");
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    let text = String::from_utf8_lossy(&reply).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// A bodiless request as a browser sends one for a web page: `Host: host` and `headers`
/// (e.g. `Origin`, `Sec-Fetch-Site`). Plain HTTP/1.1, `Connection: close`. Returns the status.
pub async fn http_from_a_page(
    addr: SocketAddr,
    (method, path): (&str, &str),
    host: &str,
    headers: &[(&str, &str)],
) -> u16 {
    use tokio::io::AsyncReadExt;
    let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let extra: String = headers
        .iter()
        .map(|(n, v)| format!("{n}: {v}\r\n"))
        .collect();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: 0\r\nConnection: close\r\n\r\n"
    );
    tcp.write_all(head.as_bytes()).await.expect("request");
    let mut reply = Vec::new();
    let _ = tcp.read_to_end(&mut reply).await;
    let text = String::from_utf8_lossy(&reply);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP reply: {text:?}"))
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `within`.
pub async fn until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Resident memory of process `pid`, in KiB (Linux `/proc`); 0 when it cannot be read.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of process `pid`, in clock ticks (1/100 s), from `/proc`; 0 when
/// it cannot be read.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces, inside parentheses).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    tick(11) + tick(12)
}

/// Prometheus text, parsed: samples by name and labels.
pub struct Metrics {
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

impl Metrics {
    pub fn parse(text: &str) -> Metrics {
        let lines = text.lines().map(|l| Ok(l.to_string()));
        let scrape = prometheus_parse::Scrape::parse(lines).expect("valid Prometheus text");
        let mut samples = Vec::new();
        for s in scrape.samples {
            let labels: BTreeMap<String, String> = s
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => samples.push((s.metric, labels, v)),
                prometheus_parse::Value::Histogram(_) | prometheus_parse::Value::Summary(_) => {}
            }
        }
        Metrics { samples }
    }

    /// The sum of the samples named `name` whose labels include every pair of `labels`
    /// (0 when none does).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.samples
            .iter()
            .filter(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).is_some_and(|x| x == v))
            })
            .map(|(_, _, v)| v)
            .sum()
    }

    /// The value of a series written as in the exposition: `name` or `name{k="v",...}`; the
    /// labels given must all match, others may be present (their series are summed).
    pub fn series(&self, series: &str) -> f64 {
        let (name, labels) = parse_selector(series);
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.sum(name, &pairs)
    }
}

fn parse_selector(series: &str) -> (&str, Vec<(String, String)>) {
    let Some((name, rest)) = series.split_once('{') else {
        return (series.trim(), Vec::new());
    };
    let inner = rest.trim_end().trim_end_matches('}');
    let labels = inner
        .split(',')
        .filter(|p| !p.trim().is_empty())
        .filter_map(|p| p.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().trim_matches('"').to_string()))
        .collect();
    (name, labels)
}

/// A device speaking the session protocol over any stream, through the protocol's codec.
pub struct Device<S> {
    pub framed: Framed<S, FrameCodec>,
    /// The sequence of the last DATA sent.
    pub seq: u64,
    /// The latest CHECKPOINT: (the DATA it covers, the sealed ticket).
    pub ticket: Option<(u64, Vec<u8>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Device<S> {
    pub fn new(stream: S) -> Self {
        Device {
            framed: Framed::new(stream, FrameCodec::new(1 << 20)),
            seq: 0,
            ticket: None,
        }
    }

    pub async fn send(&mut self, frame: Frame) -> std::io::Result<()> {
        self.framed.send(frame).await.map_err(std::io::Error::other)
    }

    /// Bytes as they are, past the codec (for malformed input).
    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stream = self.framed.get_mut();
        stream.write_all(bytes).await?;
        stream.flush().await
    }

    /// The next frame, or `None` when the peer closed (or sent what is not a frame).
    /// Bounded by 10 s.
    pub async fn recv(&mut self) -> Option<Frame> {
        tokio::time::timeout(Duration::from_secs(10), self.framed.next())
            .await
            .expect("a frame or a close within 10s")?
            .ok()
    }

    pub async fn hello(&mut self, device: &str, app: &str) -> Frame {
        self.hello_resume(device, app, None).await
    }

    /// HELLO with a ticket to resume from (`None`: a fresh session).
    pub async fn hello_resume(&mut self, device: &str, app: &str, ticket: Option<&[u8]>) -> Frame {
        let h = Hello {
            device: device.into(),
            app: app.into(),
            resume: ticket.map(|t| serde_bytes::ByteBuf::from(t.to_vec())),
        };
        self.send(Frame::control(Kind::Hello, 0, &h)).await.unwrap();
        self.recv().await.expect("an answer to HELLO")
    }

    /// HELLO that must get no session: true when the peer closes (or sends what is not a
    /// frame) instead of answering it — a connection refused at its TLS handshake shows so.
    pub async fn no_session(&mut self, device: &str, app: &str) -> bool {
        let h = Hello {
            device: device.into(),
            app: app.into(),
            resume: None,
        };
        let _ = self.send(Frame::control(Kind::Hello, 0, &h)).await;
        self.recv().await.is_none()
    }

    /// HELLO answered by an ERROR and then the close (a terminating proxy's refusal): the
    /// ERROR's code; `None` when something else came (a WELCOME, no ERROR, no close).
    pub async fn refused_with(&mut self, device: &str, app: &str) -> Option<u16> {
        let f = self.hello(device, app).await;
        if f.kind != Kind::Error {
            return None;
        }
        let code = error_code(&f);
        self.recv().await.is_none().then_some(code)
    }

    /// HELLO that must be welcomed; returns the gateway name.
    pub async fn open(&mut self, device: &str, app: &str) -> String {
        let f = self.hello(device, app).await;
        assert_eq!(f.kind, Kind::Welcome, "{:?}", error_of(&f));
        f.decode_body::<Welcome>("WELCOME").unwrap().gateway
    }

    /// DATA n; returns the answer (REPLY or ERROR with n), skipping PUSH frames and keeping
    /// the latest CHECKPOINT's ticket.
    pub async fn data(&mut self, body: &[u8]) -> Frame {
        self.seq += 1;
        self.send(Frame::new(Kind::Data, self.seq, body.to_vec()))
            .await
            .unwrap();
        loop {
            let f = self.recv().await.expect("an answer to DATA");
            match f.kind {
                Kind::Push => {}
                Kind::Checkpoint => self.keep_ticket(&f),
                _ => {
                    assert_eq!(f.seq, self.seq, "answers carry the DATA's sequence");
                    return f;
                }
            }
        }
    }

    /// Keeps the ticket of a CHECKPOINT frame.
    pub fn keep_ticket(&mut self, f: &Frame) {
        let c: wasmbed_protocol::Checkpoint =
            f.decode_body("CHECKPOINT").expect("a CHECKPOINT body");
        self.ticket = Some((f.seq, c.ticket.into_vec()));
    }

    /// Reads until the peer closes, keeping CHECKPOINTs; returns the other frames.
    pub async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(f) = self.recv().await {
            if f.kind == Kind::Checkpoint {
                self.keep_ticket(&f);
            } else {
                frames.push(f);
            }
        }
        frames
    }
}

pub fn error_of(f: &Frame) -> Option<ErrorBody> {
    (f.kind == Kind::Error).then(|| f.decode_body("ERROR").unwrap())
}

pub fn error_code(f: &Frame) -> u16 {
    error_of(f)
        .map(|e| e.code)
        .unwrap_or_else(|| panic!("expected ERROR, got {:?}", f.kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_match_labels_not_prefixes() {
        let text = "# TYPE x_total counter\nx_total{reason=\"a\"} 2\nx_total{reason=\"ab\"} 5\nx_total_more 9\n";
        let m = Metrics::parse(text);
        assert_eq!(m.series("x_total{reason=\"a\"}"), 2.0);
        assert_eq!(m.series("x_total"), 7.0);
        assert_eq!(m.series("x_total{reason=\"b\"}"), 0.0);
        assert_eq!(m.sum("x_total_more", &[]), 9.0);
    }
}

/// Command-line handling for the benchmark examples: `--help` prints `usage` and exits 0; an
/// unknown option or a bad value prints one line and the usage and exits 2 (no panic).
pub mod example_args {
    /// The arguments as (option, value) pairs, after handling `-h`/`--help`.
    pub fn pairs(usage: &str) -> Vec<(String, String)> {
        let argv: Vec<String> = std::env::args().skip(1).collect();
        if argv.iter().any(|a| a == "-h" || a == "--help") {
            println!("{usage}");
            std::process::exit(0);
        }
        argv.chunks(2)
            .map(|p| (p[0].clone(), p.get(1).cloned().unwrap_or_default()))
            .collect()
    }

    /// `value` parsed as `what` wants (`--runs N`), or exit 2 saying so.
    pub fn parse<T: std::str::FromStr>(usage: &str, what: &str, value: &str) -> T {
        value
            .parse()
            .unwrap_or_else(|_| fail(usage, &format!("{what}: not a valid value: {value:?}")))
    }

    /// One line, the usage, exit 2.
    pub fn fail(usage: &str, problem: &str) -> ! {
        eprintln!("{problem}\n\n{usage}");
        std::process::exit(2)
    }
}
