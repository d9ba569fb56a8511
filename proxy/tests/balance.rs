//! Spread, weights, failover and retries, with real sockets on 127.0.0.1.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::time::Duration;

use futures_util::future::join_all;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_connects_spreads_evenly() {
    let backends = join_all((0..5).map(|_| Backend::spawn())).await;
    let proxy = start(config(named(&backends))).await;
    let devices = join_all((0..503).map(|_| device(proxy.addr))).await;
    let counts = proxy.counts();
    let live: Vec<usize> = backends.iter().map(Backend::live).collect();
    assert_eq!(counts.iter().sum::<u64>(), 503);
    assert!(
        counts.iter().max().unwrap() - counts.iter().min().unwrap() <= 1,
        "{counts:?}"
    );
    assert_eq!(
        live.iter().map(|&n| n as u64).collect::<Vec<_>>(),
        counts,
        "backends agree"
    );
    drop(devices);
}

#[tokio::test]
async fn weights_are_respected() {
    let (a, b) = (Backend::spawn().await, Backend::spawn().await);
    let mut ga = a.gateway("light");
    ga.weight = 1;
    let mut gb = b.gateway("heavy");
    gb.weight = 3;
    let proxy = start(config(vec![ga, gb])).await;
    let devices = join_all((0..200).map(|_| device(proxy.addr))).await;
    assert_eq!(proxy.counts(), vec![50, 150]);
    assert_eq!((a.live(), b.live()), (50, 150));
    drop(devices);
}

#[tokio::test]
async fn a_killed_gateways_sessions_end_and_reconnects_land_elsewhere() {
    let backends = join_all((0..3).map(|_| Backend::spawn())).await;
    let proxy = start(config(named(&backends))).await;
    let mut devices = join_all((0..30).map(|_| device(proxy.addr))).await;
    assert_eq!(proxy.counts(), vec![10, 10, 10]);
    backends[0].kill();
    // The ten devices on gw-0 are closed; the others still get their echo.
    let outcomes = join_all(devices.iter_mut().map(|d| async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = d.write_all(b"?").await;
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(5), d.read(&mut b)).await;
        matches!(read.expect("bounded"), Ok(0) | Err(_))
    }))
    .await;
    let cut = outcomes.iter().filter(|&&c| c).count();
    assert_eq!(cut, 10, "exactly gw-0's sessions were closed");
    // They reconnect through the same address and land on the live gateways.
    let again = join_all((0..10).map(|_| device(proxy.addr))).await;
    assert_eq!(backends[0].live(), 0);
    assert_eq!((backends[1].live(), backends[2].live()), (15, 15));
    assert!(
        !proxy.gateway("gw-0").is_healthy(),
        "failed connects marked it down"
    );
    drop((devices, again));
}

#[tokio::test]
async fn a_refused_connect_retries_the_next_gateway() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead); // nothing listens there now: connects are refused
    let live = Backend::spawn().await;
    let mut down = live.gateway("dead");
    down.addr = dead_addr.to_string();
    down.health_addr = None;
    let mut c = config(vec![down, live.gateway("live")]);
    c.health.check = wasmbed_config::HealthCheck::None; // only passive signals
    let proxy = start(c).await;
    let devices = join_all((0..6).map(|_| device(proxy.addr))).await;
    assert_eq!(live.live(), 6, "every device got through");
    assert!(
        proxy
            .metric("wasmbed_proxy_gateway_connect_failures_total{gateway=\"dead\"}")
            .await
            >= 1.0
    );
    assert_eq!(
        proxy
            .metric("wasmbed_proxy_connections_rejected_total{reason=\"gateway_unreachable\"}")
            .await,
        0.0
    );
    drop(devices);
}

#[tokio::test]
async fn no_gateway_left_turns_the_device_away_and_counts_it() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap().to_string();
    drop(dead);
    let mut c = config(vec![]);
    c.gateways = vec![wasmbed_config::GatewayConfig {
        name: "only".into(),
        addr,
        health_addr: None,
        weight: 1,
        pool: "default".into(),
    }];
    c.health.check = wasmbed_config::HealthCheck::None;
    let proxy = start(c).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut s, &client_hello("x.example"))
        .await
        .unwrap();
    assert_eq!(closed(&mut s, Duration::from_secs(2)).await, 0);
    // Counted when the session's task ends, a moment after the device sees the close.
    let reason = "wasmbed_proxy_connections_rejected_total{reason=\"gateway_unreachable\"}";
    proxy.until_metric(reason, 1.0).await;
}

/// Routes send a device to a pool by its SNI, its offered ALPN protocol, or both; the
/// first matching route wins; the rest go to `default`. Sessions are counted by ALPN.
#[tokio::test]
async fn routes_match_sni_and_alpn() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let backends = futures_util::future::join_all((0..3).map(|_| Backend::spawn())).await;
    let mut gws = vec![
        backends[0].gateway("eu"),
        backends[1].gateway("mqtt"),
        backends[2].gateway("main"),
    ];
    gws[0].pool = "eu".into();
    gws[1].pool = "mqtt".into();
    let mut c = config(gws);
    c.routes = wasmbed_config::ProxyConfig::from_toml(
        "[[gateway]]\naddr = \"127.0.0.1:1\"\npool = \"eu\"\n[[gateway]]\naddr = \"127.0.0.1:2\"\npool = \"mqtt\"\n\
         [[route]]\nsni = \"*.eu.example\"\npool = \"eu\"\n[[route]]\nalpn = \"mqtt\"\npool = \"mqtt\"",
    )
    .unwrap()
    .routes;
    let proxy = start(c).await;
    let mut held = Vec::new();
    for (sni, alpn, backend) in [
        ("d1.eu.example", &["wasmbed/1"][..], 0),
        ("d2.eu.example", &["mqtt"][..], 0), // the first route wins
        ("d3.us.example", &["mqtt", "h2"][..], 1),
        ("d4.us.example", &["h2"][..], 2),
        ("d5.us.example", &[][..], 2),
    ] {
        let hello = client_hello_alpn(sni, alpn);
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(&hello).await.unwrap();
        let mut back = vec![0u8; hello.len()];
        s.read_exact(&mut back).await.unwrap();
        held.push(s);
        until(Duration::from_secs(2), sni, || {
            backends[backend].accepted() >= 1
        })
        .await;
    }
    assert_eq!(
        backends.iter().map(Backend::accepted).collect::<Vec<_>>(),
        vec![2, 1, 2]
    );
    for (alpn, n) in [
        ("wasmbed/1", 1.0),
        ("mqtt", 2.0),
        ("other", 1.0),
        ("none", 1.0),
    ] {
        let series = format!("wasmbed_proxy_sessions_by_alpn_total{{alpn=\"{alpn}\"}}");
        assert_eq!(proxy.metric(&series).await, n, "{series}");
    }
}

/// `wasmbed_proxy_bytes_total` counts while sessions last, not when they end.
#[tokio::test]
async fn bytes_are_counted_while_the_session_is_live() {
    let backend = Backend::spawn().await;
    let proxy = start(config(vec![backend.gateway("a")])).await;
    let mut d = device(proxy.addr).await; // the ClientHello went up and came back
    let hello = client_hello("device.example").len() as f64;
    let up = "wasmbed_proxy_bytes_total{direction=\"upstream\"}";
    let down = "wasmbed_proxy_bytes_total{direction=\"downstream\"}";
    proxy.until_metric(up, hello).await;
    proxy.until_metric(down, hello).await;
    use tokio::io::AsyncWriteExt;
    d.write_all(b"more").await.unwrap();
    proxy.until_metric(up, hello + 4.0).await;
    drop(d);
}
