//! Test kit for the gateway: a dev PKI, a gateway started in-process on 127.0.0.1:0, and a
//! device client speaking the session protocol over TLS or TCP.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::{GatewayFlags, GatewaySettings};
use wasmbed_gateway::{Gateway, Shared};
use wasmbed_protocol::{ErrorBody, Frame, Hello, Kind, Welcome};

pub const APPS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../apps");

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: DevCa,
}

impl Pki {
    pub fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::generate("test CA").unwrap();
        let gw = ca
            .issue_server(&["localhost", "127.0.0.1"], KeyKind::EcdsaP256)
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
        std::fs::write(dir.path().join("gw.pem"), &gw.cert_pem).unwrap();
        std::fs::write(dir.path().join("gw.key"), &gw.key_pem).unwrap();
        Pki { dir, ca }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A client config for `device`, with a certificate from `issuer` (None: no certificate).
    pub fn device(&self, device: &str, issuer: Option<&DevCa>) -> Arc<rustls::ClientConfig> {
        let identity = issuer.map(|ca| {
            let d = ca.issue_client(device, KeyKind::EcdsaP256).unwrap();
            (d.chain(), d.key().unwrap())
        });
        wasmbed_certs::client_config(&[self.ca.cert_der()], identity).unwrap()
    }
}

pub fn settings(tls: Option<&Pki>) -> GatewaySettings {
    let flags = GatewayFlags {
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        name: Some("gw-test".into()),
        apps: Some(APPS.into()),
        insecure_plaintext: tls.is_none(),
        tls_cert: tls.map(|p| p.path("gw.pem")),
        tls_key: tls.map(|p| p.path("gw.key")),
        client_ca: tls.map(|p| p.path("ca.pem")),
        max_sessions: Some(256),
        ..Default::default()
    };
    GatewaySettings::load(&flags).unwrap()
}

pub struct RunningGateway {
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub shared: Arc<Shared>,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<Result<(), wasmbed_gateway::GatewayError>>,
}

pub async fn start(settings: GatewaySettings) -> RunningGateway {
    let g = Gateway::bind(settings).await.unwrap();
    let (addr, admin, shared) = (g.listen_addr(), g.admin_addr().unwrap(), g.shared());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(g.run(shutdown.clone()));
    RunningGateway {
        addr,
        admin,
        shared,
        shutdown,
        task,
    }
}

/// A device speaking the session protocol.
pub struct Device<S> {
    pub stream: S,
    buf: Vec<u8>,
    seq: u64,
}

pub type TcpDevice = Device<TcpStream>;
pub type TlsDevice = Device<tokio_rustls::client::TlsStream<TcpStream>>;

pub async fn tcp_device(addr: SocketAddr) -> TcpDevice {
    Device::new(TcpStream::connect(addr).await.unwrap())
}

pub async fn tls_device(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsDevice> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    Ok(Device::new(tls))
}

impl<S: AsyncRead + AsyncWrite + Unpin> Device<S> {
    pub fn new(stream: S) -> Self {
        Device {
            stream,
            buf: Vec::new(),
            seq: 0,
        }
    }

    pub async fn send(&mut self, frame: Frame) -> std::io::Result<()> {
        self.stream.write_all(&frame.encode()).await?;
        self.stream.flush().await
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// The next frame, or `None` when the gateway closed. Bounded by 10 s.
    pub async fn recv(&mut self) -> Option<Frame> {
        let fut = async {
            loop {
                if let Ok(Some((f, used))) = wasmbed_protocol::decode(&self.buf, 1 << 20) {
                    self.buf.drain(..used);
                    return Some(f);
                }
                let mut chunk = [0u8; 4096];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return None,
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), fut)
            .await
            .expect("a frame or a close within 10s")
    }

    pub async fn hello(&mut self, device: &str, app: &str) -> Frame {
        let h = Hello {
            device: device.into(),
            app: app.into(),
            resume: None,
        };
        self.send(Frame::control(Kind::Hello, 0, &h)).await.unwrap();
        self.recv().await.expect("an answer to HELLO")
    }

    /// HELLO that must be welcomed; returns the gateway name.
    pub async fn open(&mut self, device: &str, app: &str) -> String {
        let f = self.hello(device, app).await;
        assert_eq!(f.kind, Kind::Welcome, "{:?}", error_of(&f));
        f.decode_body::<Welcome>("WELCOME").unwrap().gateway
    }

    /// DATA n; returns the answer (REPLY or ERROR with n), skipping PUSH frames.
    pub async fn data(&mut self, body: &[u8]) -> Frame {
        self.seq += 1;
        self.send(Frame::new(Kind::Data, self.seq, body.to_vec()))
            .await
            .unwrap();
        loop {
            let f = self.recv().await.expect("an answer to DATA");
            if f.kind != Kind::Push {
                assert_eq!(f.seq, self.seq, "answers carry the DATA's sequence");
                return f;
            }
        }
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

/// A minimal HTTP/1.1 request to the admin endpoint: (status, body).
pub async fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp).into_owned();
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
