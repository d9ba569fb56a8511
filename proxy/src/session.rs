//! One device connection: classify (peek the ClientHello, or terminate TLS) -> pick a gateway
//! -> connect (retrying the next best on failure) -> forward until an end.

use std::future::Future;
use std::sync::Arc;

use futures_util::FutureExt;
use metrics::counter;
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use wasmbed_config::ListenerConfig;

use crate::anchor::Anchored;
use crate::context::Context;
use crate::listener::Accepted;
use crate::metric_names::ACCEPTED;
use crate::passthrough::passthrough;
use crate::terminate::terminate;

/// A listener as sessions see it: its config and its own accepted-connections counter.
pub struct Listener {
    pub config: ListenerConfig,
    pub accepted: metrics::Counter,
}

impl Listener {
    pub fn new(config: ListenerConfig) -> Listener {
        let accepted = counter!(ACCEPTED, "listener" => config.addr.to_string());
        Listener { config, accepted }
    }
}

/// A passthrough session's task: the ClientHello peeked, a gateway, bytes both ways. (The
/// two modes are two tasks, each carrying only its own mode's state.)
pub async fn serve_passthrough(ctx: Arc<Context>, listener: Arc<Listener>, accepted: Accepted) {
    let Accepted {
        stream,
        peer,
        permit,
    } = accepted;
    let span = opened(&ctx, &listener, peer);
    let result = passthrough(&ctx, &listener.config, stream)
        .instrument(span.clone())
        .await;
    closed(&ctx, result, &span);
    drop(permit);
}

/// A terminated session's first task: the device's TLS handshake, its HELLO, the first
/// gateway's WELCOME. The handshake's state is large and short-lived: boxed, and freed once
/// the session is anchored. The anchored session, small and long-lived, then gets a task of
/// its own ([`serve_anchored`], tracked by `sessions` as this one is) and this one ends: a
/// task keeps its future's largest state for its whole life, and this one's arguments and
/// locals are dead weight once the session is anchored.
pub async fn serve_terminate(
    ctx: Arc<Context>,
    listener: Arc<Listener>,
    accepted: Accepted,
    sessions: TaskTracker,
) {
    let Accepted {
        stream,
        peer,
        permit,
    } = accepted;
    let span = opened(&ctx, &listener, peer);
    let raw = listener.config.raw;
    let result = Box::pin(terminate(&ctx, stream, peer, raw))
        .instrument(span.clone())
        .await;
    match result {
        Ok(Some(anchored)) => {
            let task = serve_anchored(anchored, permit);
            // A span that records nothing (the log level is above `info`) is not carried:
            // its 40 bytes would take the task past an allocator size class (1,792 B).
            if span.is_disabled() {
                sessions.spawn(task);
            } else {
                sessions.spawn(task.instrument(span));
            }
        }
        // `None`: the gateway refused the session and the device was told (or a raw
        // listener's bytes were forwarded to their end).
        other => closed(&ctx, other.map(drop), &span),
    }
}

/// An anchored terminated session's own task: served until it ends, then counted closed.
/// Its future is most of an idle session's memory (`tests::session_tasks_stay_small`):
/// a combinator, not an async fn, adds only what the end needs (an async fn would also keep
/// its arguments).
fn serve_anchored(
    anchored: Box<Anchored>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> {
    let open = Open {
        ctx: anchored.ctx.clone(),
        _permit: permit,
    };
    anchored.serve().map(move |()| drop(open))
}

/// An anchored session counted open, and its connection slot held, until dropped: at its
/// end, or when its task is dropped unfinished.
struct Open {
    ctx: Arc<Context>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Open {
    fn drop(&mut self) {
        closed(&self.ctx, Ok(()), &tracing::Span::none());
    }
}

/// A session begins: counted, and its span.
fn opened(ctx: &Context, listener: &Listener, peer: std::net::SocketAddr) -> tracing::Span {
    listener.accepted.increment(1);
    crate::events::COUNTS
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.meters.open.increment(1);
    tracing::info_span!(
        "session",
        %peer,
        sni = tracing::field::Empty,
        alpn = tracing::field::Empty,
        device = tracing::field::Empty,
        gateway = tracing::field::Empty,
    )
}

/// A session ends: its refusal counted, if it was refused.
fn closed(ctx: &Context, result: Result<(), crate::refusal::Refused>, span: &tracing::Span) {
    if let Err(r) = result {
        span.in_scope(|| r.count());
    }
    ctx.meters.open.decrement(1);
}

/// A passthrough session handed over by the process this one took over from (`--takeover`):
/// its device and gateway sockets, counted on its gateway, forwarded from where it stopped.
pub async fn adopt(
    ctx: Arc<Context>,
    (device, gateway): (tokio::net::TcpStream, tokio::net::TcpStream),
    lease: crate::balancer::Lease,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    ctx.meters.open.increment(1);
    let peer = device
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span =
        tracing::info_span!("session", %peer, adopted = true, gateway = %lease.gateway().name);
    crate::passthrough::forward_until_handed(&ctx, device, gateway, lease)
        .instrument(span)
        .await;
    ctx.meters.open.decrement(1);
    drop(permit);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::TcpStream;

    use super::*;

    /// An idle passthrough session's memory is mostly its task, that is this future: keep it
    /// small (608 bytes). Large states (connect, TLS,
    /// a `--takeover` session's movable forwarding) are boxed so they are freed once done, or
    /// carried only where used (the box's pointer: 8 bytes).
    #[tokio::test]
    async fn session_tasks_stay_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let limit = Arc::new(tokio::sync::Semaphore::new(1));
        let accepted = Accepted {
            stream,
            peer: addr,
            permit: limit.clone().acquire_owned().await.unwrap(),
        };
        let ctx = Arc::new(Context::for_tests());
        let listener_config = Arc::new(Listener::new(ctx.config.listeners[0].clone()));
        let session = serve_passthrough(ctx.clone(), listener_config.clone(), accepted);
        let size = std::mem::size_of_val(&session);
        // Its way in (hello, route, connect) is boxed apart; what stays is the forwarding's.
        // At most 656 bytes of future keep its cell at 768 (the layout below). The binary's
        // allocator (src/alloc.rs) then takes the cell's 128-aligned block from glibc's
        // per-thread cache, padded (768 + 128 <= 1,032); a larger cell leaves that cache
        // for glibc's bins, and past 1,024 bytes its large bins, each request there first
        // consolidating the fast bins (measured: docs/performance.md, "A passthrough
        // session's task under 1 KiB" and "Over-aligned blocks from glibc's per-thread cache").
        assert!(size <= 656, "the session future grew to {size} bytes");
        drop(session);
        // A terminated session's first task (the handshake, boxed apart) ends once the
        // session is anchored; the anchored session's own task is what an idle session keeps.
        // tokio's task cell is 128-aligned: a 32-byte header, 16 bytes of scheduler and id,
        // the stage (the future, 8 bytes of the tracker's token, 40 of the session's span at
        // `info`, 8 of discriminant) and a 48-byte trailer, rounded up to 128 (read with
        // `-Zprint-type-sizes`). glibc's malloc (the default) gives a 128-aligned block its
        // size in 16-byte steps and returns the alignment's slack: at most 872 bytes of future
        // keep the cell at 1,024 bytes with the span (1,152 up to 1,000 bytes: the size before
        // the session's waits became `wasmbed_certs::Fired`, 32 bytes each where a
        // `CancellationToken`'s wait is 72). mimalloc (`--features mimalloc`) serves it from
        // the size class of n + 127: the 1,280-byte class either way (the task was in the
        // 3,072 class before issue 26's cuts, 1,792 after the first). Figures:
        // docs/performance.md.
        let stream = TcpStream::connect(addr).await.unwrap();
        let accepted = Accepted {
            stream,
            peer: addr,
            permit: limit.acquire_owned().await.unwrap(),
        };
        let session = serve_terminate(ctx, listener_config, accepted, TaskTracker::new());
        let size = std::mem::size_of_val(&session);
        assert!(
            size <= 512,
            "the handshake task's future grew to {size} bytes"
        );
        fn future_size<A, B, F>(_: fn(A, B) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = future_size(serve_anchored);
        assert!(
            size <= 872,
            "the anchored session's future grew to {size} bytes"
        );
    }
}
