//! Test kit for the gateway: a dev PKI, a gateway started in-process on 127.0.0.1:0, and
//! devices (the shared test kit's, over TLS or TCP).
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use wasmbed_certs::pki::{DevCa, KeyKind};
use wasmbed_config::{GatewayFlags, GatewaySettings};
use wasmbed_gateway::{Gateway, Shared};
#[allow(unused_imports)] // each test binary uses some
pub use wasmbed_testkit::{Device, error_code, error_of, http};

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

    /// A CA of the proxies' own (`proxy-ca.pem`, for `--trusted-proxy-ca`) and a proxy
    /// client certificate from it named `proxy` (`edge.pem`, `edge.key`).
    pub fn proxy_ca(&self, proxy: &str) -> DevCa {
        let proxy_ca = DevCa::generate("proxies").unwrap();
        std::fs::write(self.path("proxy-ca.pem"), proxy_ca.cert_pem()).unwrap();
        let client = proxy_ca.issue_client(proxy, KeyKind::EcdsaP256).unwrap();
        std::fs::write(self.path("edge.pem"), &client.cert_pem).unwrap();
        std::fs::write(self.path("edge.key"), &client.key_pem).unwrap();
        proxy_ca
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
