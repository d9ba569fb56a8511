//! Graceful shutdown: stop accepting, let sessions finish for the grace period, then close.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn shutdown_stops_accepting_then_closes_sessions_after_the_grace_period() {
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("gw")]);
    c.grace = Duration::from_millis(400);
    let proxy = start(c).await;
    let mut live = device(proxy.addr).await;
    assert_eq!(proxy.admin("GET", "/readyz").await.0, 200);
    proxy.shutdown.cancel();
    // Not ready from the moment the stop begins (the admin endpoint answers through the
    // grace): a load balancer stops sending.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while proxy.admin("GET", "/readyz").await.0 != 503 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "/readyz still 200 while stopping"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New devices are no longer accepted: the listener is closed.
    until(Duration::from_secs(2), "listener closed", || {
        std::net::TcpStream::connect(proxy.addr).is_err()
    })
    .await;
    // The live session still works inside the grace period...
    live.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    live.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"still here");
    // ...and is closed when it ends; then run() returns Ok.
    assert_eq!(closed(&mut live, Duration::from_secs(3)).await, 0);
    let result = tokio::time::timeout(Duration::from_secs(3), proxy.task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

/// `POST /api/shutdown` is the stop SIGTERM begins (for an orchestrator without signals).
#[tokio::test]
async fn post_api_shutdown_stops_the_proxy_as_sigterm_does() {
    let backend = Backend::spawn().await;
    let proxy = start(config(vec![backend.gateway("gw")])).await;
    let (status, body) = proxy.admin("POST", "/api/shutdown").await;
    assert_eq!(status, 202, "{body}");
    let result = tokio::time::timeout(Duration::from_secs(5), proxy.task).await;
    assert!(matches!(result, Ok(Ok(Ok(())))), "{result:?}");
}

/// The hard stop at the grace's end cuts a session on a gateway removed from the set too (a
/// passthrough session stays on its removed gateway until it ends): it would hold the stop.
#[tokio::test]
async fn the_hard_stop_cuts_the_sessions_of_a_removed_gateway() {
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("gw")]);
    c.grace = Duration::from_millis(300);
    let proxy = start(c).await;
    let mut live = device(proxy.addr).await;
    let (status, body) = proxy.admin("DELETE", "/api/gateways/gw").await;
    assert_eq!(status, 200, "{body}");
    // Still forwarding on its removed gateway.
    live.write_all(b"still here").await.unwrap();
    let mut b = [0u8; 10];
    live.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"still here");
    proxy.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), proxy.task).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "a removed gateway's session held the stop: {result:?}"
    );
    assert_eq!(closed(&mut live, Duration::from_secs(3)).await, 0);
}

/// An open dashboard (`GET /api/events`, a stream that never ends by itself) does not hold
/// the stop: its stream ends with the admin endpoint.
#[tokio::test]
async fn an_open_dashboard_does_not_hold_the_stop() {
    let backend = Backend::spawn().await;
    let proxy = start(config(vec![backend.gateway("gw")])).await;
    let mut watching = tokio::net::TcpStream::connect(proxy.admin).await.unwrap();
    watching
        .write_all(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // The stream's first snapshot: it is open and served.
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains("event: snapshot") {
        let n = watching.read(&mut buf).await.unwrap();
        assert!(
            n > 0,
            "the event stream closed: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    proxy.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(10), proxy.task).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "an open dashboard held the stop: {result:?}"
    );
    drop(watching);
}

#[tokio::test]
async fn shutdown_returns_at_once_when_no_session_is_open() {
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("gw")]);
    c.grace = Duration::from_secs(60);
    let proxy = start(c).await;
    drop(device(proxy.addr).await);
    until(Duration::from_secs(2), "session over", || {
        proxy.counts() == vec![0]
    })
    .await;
    proxy.shutdown.cancel();
    let result = tokio::time::timeout(Duration::from_secs(5), proxy.task).await;
    assert!(
        matches!(result, Ok(Ok(Ok(())))),
        "did not wait out the 60s grace: {result:?}"
    );
}

/// A passthrough proxy's sessions run on a runtime with no time driver
/// (`wasmbed_proxy::data_plane_timers`; the binary builds it so): everything the data plane
/// waits on — the first probe round, a ClientHello's and a connect's bounds, the accept
/// loop, the takeover socket, the grace at a stop — is armed on another thread. A timer made
/// on the data plane would be a panic there (tokio's "timers are disabled"), caught by the
/// runtime and lost with its task: the hook counts the panics on that thread.
#[tokio::test]
async fn a_passthrough_proxy_runs_without_a_time_driver() {
    static PANICS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    const THREAD: &str = "data-plane-without-timers";
    let _serial = serial().await;
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if std::thread::current().name() == Some(THREAD) {
            PANICS.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        previous(info);
    }));
    let backend = Backend::spawn().await;
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(vec![backend.gateway("gw")]);
    c.grace = Duration::from_millis(300);
    c.takeover = Some(dir.path().join("takeover.sock"));
    assert!(!wasmbed_proxy::data_plane_timers(&c));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let (bound, addr) = tokio::sync::oneshot::channel();
    let stop = shutdown.clone();
    let data_plane = std::thread::Builder::new()
        .name(THREAD.into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_io()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let proxy = wasmbed_proxy::Proxy::bind(c).await?;
                let _ = bound.send(proxy.listen_addrs()[0]);
                proxy.run(stop).await
            })
        })
        .unwrap();
    let addr = addr.await.expect("the proxy bound");
    // A session through it (its ClientHello's and connect's bounds armed), still open at
    // the stop: the grace runs out and the proxy closes it.
    let mut live = device(addr).await;
    live.write_all(b"through").await.unwrap();
    let mut b = [0u8; 7];
    live.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"through");
    shutdown.cancel();
    assert_eq!(closed(&mut live, Duration::from_secs(5)).await, 0);
    let ended = tokio::task::spawn_blocking(move || data_plane.join())
        .await
        .unwrap();
    assert!(matches!(ended, Ok(Ok(()))), "{ended:?}");
    assert_eq!(
        PANICS.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a panic on the data plane (a timer made there?)"
    );
}
