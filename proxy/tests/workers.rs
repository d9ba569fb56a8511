//! Session workers (`--threads`): sessions spread over the workers as they open, and a session
//! moved to another worker at accept forwards as one served where it was accepted.
#![allow(
    clippy::disallowed_methods,
    reason = "tests make their timers on runtimes with a time driver (proxy/clippy.toml)"
)]

mod support;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MOVED: &str = "wasmbed_proxy_worker_moves_total";
const ON_WORKER: &str = "wasmbed_proxy_worker_sessions";

/// A message there and back through `s`.
async fn echoes(s: &mut TcpStream, byte: u8) {
    s.write_all(&[byte; 16]).await.expect("write");
    let mut echo = [0u8; 16];
    s.read_exact(&mut echo).await.expect("the echo");
    assert_eq!(echo, [byte; 16]);
}

/// With two threads, four sessions opened one after the other and kept open: the accepting
/// worker keeps the first (a tie stays where accepted), the second moves to the other worker
/// (which has fewer), the third stays (a tie), the fourth moves. All four forward both ways,
/// before and after the others opened; the metrics page counts two sessions on each worker,
/// and none once they are closed.
#[tokio::test]
async fn sessions_spread_over_the_workers_and_forward_after_a_move() {
    let backend = Backend::spawn().await;
    let mut c = config(named(std::slice::from_ref(&backend)));
    c.listeners[0].allow_plain = true;
    c.threads = Some(2);
    let proxy = start(c).await;
    let mut open = Vec::new();
    for i in 0..4u8 {
        let mut s = TcpStream::connect(proxy.addr).await.expect("connect");
        // Its session is up (and counted on its worker) before the next connection comes.
        echoes(&mut s, i).await;
        open.push(s);
    }
    assert_eq!(proxy.metric(MOVED).await, 2.0, "two of four moved");
    for worker in ["0", "1"] {
        let series = format!("{ON_WORKER}{{worker=\"{worker}\"}}");
        assert_eq!(proxy.gauge(&series).await, 2.0, "{series}");
    }
    for (i, s) in (0u8..).zip(open.iter_mut()) {
        echoes(s, 100 + i).await;
    }
    drop(open);
    // A session's end is counted once its task is released: nothing signals it (bounded).
    proxy.until_metric(ON_WORKER, 0.0).await;
}
