//! Spread, weights, failover and retries, with real sockets on 127.0.0.1.

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
    let reason = "wasmbed_proxy_connections_rejected_total{reason=\"gateway_unreachable\"}";
    assert_eq!(proxy.metric(reason).await, 1.0);
}
