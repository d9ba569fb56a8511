//! Passthrough forwarding by splice(2) (`--splice on`): every byte arrives, in order, both
//! ways; half-closes pass; an idle session holds no pipe.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn splicing(backends: &[Backend]) -> RunningProxy {
    splicing_with(backends, wasmbed_config::proxy::SpliceMode::On).await
}

async fn splicing_with(
    backends: &[Backend],
    mode: wasmbed_config::proxy::SpliceMode,
) -> RunningProxy {
    let mut c = config(named(backends));
    c.listeners[0].allow_plain = true;
    c.splice = mode;
    // No probes: the stand-in gateway runs on the test's one thread, which the bulk below
    // keeps busy past a 90 ms probe timeout (the probes run on the proxy's control thread
    // and time out for real); what is tested here is the forwarding.
    c.health.check = wasmbed_config::HealthCheck::None;
    // One thread: the sessions run on the test's thread, whose pipe pool the tests count
    // (each thread has its own; with more, sessions would run on the session workers').
    c.threads = Some(1);
    start(c).await
}

#[tokio::test]
async fn bulk_both_ways_arrives_whole_and_half_closes_pass() {
    let b = Backend::spawn().await;
    let proxy = splicing(std::slice::from_ref(&b)).await;
    let s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut r, mut w) = s.into_split();
    // 8 MiB of a pattern no chunking can hide (a byte's value depends on its offset).
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i ^ (i >> 11)) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        // Half-close: the backend sees end of stream, echoes the rest, then closes.
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::with_capacity(expected.len());
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("the echo and the close come back")
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back.len(), expected.len());
    assert!(back == expected, "every byte, in order");
    proxy
        .until_metric(
            "wasmbed_proxy_bytes_total{direction=\"upstream\"}",
            expected.len() as f64,
        )
        .await;
}

/// Pipes open in this process.
fn pipes() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with("pipe:"))
        .count()
}

#[tokio::test]
async fn idle_sessions_hold_no_pipe() {
    let b = Backend::spawn().await;
    let proxy = splicing(std::slice::from_ref(&b)).await;
    let before = pipes();
    let mut sessions = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(b"hello").await.unwrap();
        let mut echo = [0u8; 5];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(&echo, b"hello");
        sessions.push(s);
    }
    // Each pipe has two ends; the per-thread pools keep at most 64 empty pipes per thread.
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let held = pipes().saturating_sub(before);
    assert!(
        held <= 2 * 64 * threads,
        "{held} pipe ends open for 200 idle sessions: they hold pipes"
    );
    assert_eq!(b.live(), 200);
}

/// `auto`: small messages are copied (no pipe is ever made); a bulk transfer switches its
/// direction to splicing, and still arrives whole.
#[tokio::test]
async fn auto_splices_bulk_and_copies_small_messages() {
    let b = Backend::spawn().await;
    let proxy = splicing_with(
        std::slice::from_ref(&b),
        wasmbed_config::proxy::SpliceMode::Auto,
    )
    .await;
    // Counted on this thread, where the proxy's sessions run: the process's open pipes also
    // count other tests' pools, which close when their threads end.
    let before = wasmbed_proxy::splice_pipes_taken_here();
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    for i in 0..50u8 {
        s.write_all(&[i; 64]).await.unwrap();
        let mut echo = [0u8; 64];
        s.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, [i; 64]);
    }
    assert_eq!(
        wasmbed_proxy::splice_pipes_taken_here(),
        before,
        "small messages are copied: no pipe"
    );
    let (mut r, mut w) = s.into_split();
    let data: Vec<u8> = (0..8u32 << 20).map(|i| (i ^ (i >> 13)) as u8).collect();
    let expected = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), r.read_to_end(&mut back))
        .await
        .expect("the echo and the close come back")
        .unwrap();
    writer.await.unwrap();
    assert!(back == expected, "every byte, in order, across the switch");
    assert!(
        wasmbed_proxy::splice_pipes_taken_here() > before,
        "the bulk transfer was spliced"
    );
}
