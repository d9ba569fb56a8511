//! A device session through the front proxy, in both modes: passthrough (TLS ends at the
//! gateway) and terminate (TLS ends at the proxy, plaintext link to the gateway).

mod support;

use support::*;
use wasmbed_config::{GatewayConfig, Mode, ProxyConfig, TerminateTls};
use wasmbed_proxy::Proxy;

fn proxy_config(gateway: std::net::SocketAddr, health: std::net::SocketAddr) -> ProxyConfig {
    let mut c = ProxyConfig::from_toml(
        "admin = \"off\"\n[[listener]]\naddr = \"127.0.0.1:0\"\n[[gateway]]\naddr = \"127.0.0.1:1\"",
    )
    .unwrap();
    c.gateways = vec![GatewayConfig {
        name: "gw-test".into(),
        addr: gateway.to_string(),
        health_addr: Some(health.to_string()),
        weight: 1,
        pool: "default".into(),
    }];
    c
}

async fn start_proxy(config: ProxyConfig) -> std::net::SocketAddr {
    let p = Proxy::bind(config).await.unwrap();
    let addr = p.listen_addrs()[0];
    tokio::spawn(p.run(tokio_util::sync::CancellationToken::new()));
    addr
}

#[tokio::test]
async fn passthrough_tls_ends_at_the_gateway() {
    let pki = Pki::new();
    let gw = start(settings(Some(&pki))).await;
    let proxy = start_proxy(proxy_config(gw.addr, gw.admin)).await;
    let mut d = tls_device(proxy, pki.device("device-0001", Some(&pki.ca)))
        .await
        .unwrap();
    assert_eq!(d.open("device-0001", "counter").await, "gw-test");
    let r = d.data(b"\x02\x03").await;
    assert_eq!(u64::from_le_bytes(r.body[8..16].try_into().unwrap()), 5);
}

#[tokio::test]
async fn terminate_tls_ends_at_the_proxy_with_a_plaintext_link() {
    let pki = Pki::new();
    let gw = start(settings(None)).await; // --insecure-plaintext
    let mut c = proxy_config(gw.addr, gw.admin);
    c.mode = Mode::Terminate;
    c.tls = Some(TerminateTls {
        cert: pki.path("gw.pem"),
        key: pki.path("gw.key"),
        client_ca: Some(pki.path("ca.pem")),
    });
    let proxy = start_proxy(c).await;
    let mut d = tls_device(proxy, pki.device("device-0002", Some(&pki.ca)))
        .await
        .unwrap();
    d.open("device-0002", "echo").await;
    assert_eq!(
        d.data(b"through the proxy").await.body,
        b"through the proxy"
    );
}
