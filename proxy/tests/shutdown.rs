//! Graceful shutdown: stop accepting, let sessions finish for the grace period, then close.

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
