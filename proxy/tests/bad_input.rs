//! Bad input gets a clear answer and costs nothing else: closed, counted by reason, no lease.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const REJECTED: &str = "wasmbed_proxy_connections_rejected_total";

async fn proxy_with(
    tweak: impl FnOnce(&mut wasmbed_config::ProxyConfig),
) -> (Backend, RunningProxy) {
    let backend = Backend::spawn().await;
    let mut c = config(vec![backend.gateway("gw")]);
    c.handshake_timeout = Duration::from_millis(300);
    tweak(&mut c);
    (backend, start(c).await)
}

/// Waits (bounded) until `want` refusals for `reason` are counted. A refusal is counted when
/// its session's task ends, just after the device's socket is dropped: the device can see the
/// close a moment before the count (CI once read 1 of 2 here).
async fn rejected(proxy: &RunningProxy, reason: &str, want: f64) {
    proxy
        .until_metric(&format!("{REJECTED}{{reason=\"{reason}\"}}"), want)
        .await
}

#[tokio::test]
async fn a_silent_client_is_closed_after_the_handshake_timeout_holding_no_lease() {
    let (backend, proxy) = proxy_with(|_| {}).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&[22, 3, 1]).await.unwrap(); // the start of a record, then nothing
    // Sends nothing: held by the kernel for `defer_accept` (1 s), then accepted, then closed.
    let mut quiet = TcpStream::connect(proxy.addr).await.unwrap();
    tokio::task::yield_now().await;
    assert_eq!(proxy.counts(), vec![0], "no lease while classifying");
    assert_eq!(closed(&mut s, Duration::from_secs(3)).await, 0);
    assert_eq!(closed(&mut quiet, Duration::from_secs(3)).await, 0);
    rejected(&proxy, "handshake_timeout", 2.0).await;
    assert_eq!(backend.live(), 0, "the gateway never saw them");
}

/// A connection that has sent nothing is not the proxy's yet (`[[listener]] defer_accept`,
/// Linux's `TCP_DEFER_ACCEPT`): no descriptor, task or slot, on every kind of listener; it is
/// accepted once it sends. The last row turns deferral off, the guarantee broken on purpose:
/// the same steps then see the silent connection accepted at once.
#[cfg(any(target_os = "linux", target_os = "android"))]
#[tokio::test]
async fn a_connection_is_accepted_once_it_has_sent_something() {
    use wasmbed_config::Mode;
    let pki = support::frames::pki(wasmbed_certs::pki::KeyKind::EcdsaP256);
    // 5 s is 7 s on Linux's SYN-ACK schedule: far beyond what the steps below take.
    let deferred = Duration::from_secs(5);
    for (mode, raw, defer) in [
        (Mode::Passthrough, false, deferred),
        (Mode::Terminate, false, deferred),
        (Mode::Terminate, true, deferred),
        (Mode::Passthrough, false, Duration::ZERO),
    ] {
        let row = format!("{mode:?}, raw {raw}, defer_accept {defer:?}");
        let (_backend, proxy) = proxy_with(|c| {
            c.mode = mode;
            if mode == Mode::Terminate {
                c.tls = Some(pki.tls.clone());
            }
            c.listeners[0].raw = raw;
            c.listeners[0].defer_accept = defer;
            c.handshake_timeout = Duration::from_secs(3);
        })
        .await;
        let accepted = format!(
            "wasmbed_proxy_connections_accepted_total{{listener=\"{}\"}}",
            proxy.addr
        );
        let mut quiet = TcpStream::connect(proxy.addr).await.unwrap();
        // A connection that sends at once: once the proxy has closed it (it is not TLS), the
        // proxy has accepted every connection queued before it.
        let mut probe = TcpStream::connect(proxy.addr).await.unwrap();
        probe.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        closed(&mut probe, Duration::from_secs(2)).await; // (after a TLS alert, terminating)
        // A session counts its connection accepted at its first poll, and with two workers
        // `quiet`'s may come after the probe's close: waited for (the count only grows, so a
        // deferred `quiet` counted before this read still fails here, as a single read did).
        let want = if defer.is_zero() { 2.0 } else { 1.0 };
        proxy.until_metric(&accepted, want).await;
        quiet.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        closed(&mut quiet, Duration::from_secs(2)).await;
        assert_eq!(proxy.metric(&accepted).await, 2.0, "{row}");
        // Both closed and counted closed (a refusal in terminate mode used to panic inside
        // rustls in debug builds, leaving its connection counted open).
        proxy
            .until_metric("wasmbed_proxy_connections_open{transport=\"tcp\"}", 0.0)
            .await;
        proxy.shutdown.cancel();
        let _ = proxy.task.await;
    }
}

#[tokio::test]
async fn a_client_dribbling_its_hello_is_closed_at_the_deadline() {
    let (backend, proxy) = proxy_with(|_| {}).await;
    let hello = client_hello("slow.example");
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let started = tokio::time::Instant::now();
    let mut sent = 0;
    for byte in &hello {
        if s.write_all(std::slice::from_ref(byte)).await.is_err() {
            break;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(5)).await; // the client's own pace
        if started.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    assert!(
        sent < hello.len(),
        "closed before the whole hello was dribbled"
    );
    assert_eq!(closed(&mut s, Duration::from_secs(1)).await, 0);
    rejected(&proxy, "handshake_timeout", 1.0).await;
    assert_eq!(backend.live(), 0);
}

#[tokio::test]
async fn garbage_is_closed_and_counted_as_not_tls() {
    let (backend, proxy) = proxy_with(|_| {}).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(closed(&mut s, Duration::from_secs(2)).await, 0);
    rejected(&proxy, "not_tls", 1.0).await;
    assert_eq!(backend.live(), 0);
}

#[tokio::test]
async fn plain_tcp_is_forwarded_where_the_listener_allows_it() {
    let (backend, proxy) = proxy_with(|c| c.listeners[0].allow_plain = true).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"hello, plain").await.unwrap();
    let mut back = [0u8; 12];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, b"hello, plain");
    assert_eq!(backend.live(), 1);
}

#[tokio::test]
async fn an_oversized_hello_is_refused() {
    let (backend, proxy) = proxy_with(|c| c.max_client_hello = 600).await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let _ = s.write_all(&client_hello("big.example")).await;
    assert_eq!(closed(&mut s, Duration::from_secs(2)).await, 0);
    rejected(&proxy, "hello_too_large", 1.0).await;
    assert_eq!(backend.live(), 0);
}

#[tokio::test]
async fn a_malformed_sni_or_hello_is_refused_by_reason() {
    let (backend, proxy) = proxy_with(|_| {}).await;
    let mut hello = client_hello("abcdefgh.example");
    let at = hello
        .windows(16)
        .position(|w| w == b"abcdefgh.example")
        .unwrap();
    hello[at + 3] = b' ';
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&hello).await.unwrap();
    assert_eq!(closed(&mut s, Duration::from_secs(2)).await, 0);
    rejected(&proxy, "bad_sni", 1.0).await;

    // A handshake record that holds a ServerHello, not a ClientHello.
    let mut other = client_hello("x.example");
    other[5] = 2;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&other).await.unwrap();
    assert_eq!(closed(&mut s, Duration::from_secs(2)).await, 0);
    rejected(&proxy, "hello_malformed", 1.0).await;
    assert_eq!(backend.live(), 0);
}

#[tokio::test]
async fn a_truncated_hello_then_close_is_counted() {
    let (backend, proxy) = proxy_with(|_| {}).await;
    let hello = client_hello("t.example");
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    s.shutdown().await.unwrap();
    assert_eq!(closed(&mut s, Duration::from_secs(2)).await, 0);
    rejected(&proxy, "client_closed", 1.0).await;
    assert_eq!(backend.live(), 0);
}
