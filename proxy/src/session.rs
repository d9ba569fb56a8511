//! One device connection: classify (peek the ClientHello, or terminate TLS) -> pick a gateway
//! -> connect (retrying the next best on failure) -> forward until an end.

use std::sync::Arc;

use metrics::counter;
use tracing::Instrument;
use wasmbed_config::ListenerConfig;

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

/// A terminated session's task. The handshake's state is large and short-lived: boxed, and
/// freed once the session is anchored. The anchored session, small and long-lived, is this
/// task's own state (boxing it apart would cost a second allocation and its rounding).
pub async fn serve_terminate(ctx: Arc<Context>, listener: Arc<Listener>, accepted: Accepted) {
    let Accepted {
        stream,
        peer,
        permit,
    } = accepted;
    let span = opened(&ctx, &listener, peer);
    let raw = listener.config.raw;
    let result = async {
        // `None`: the gateway refused the session and the device was told.
        if let Some(anchored) = Box::pin(terminate(&ctx, stream, peer, raw)).await? {
            anchored.serve().await;
        }
        Ok(())
    }
    .instrument(span.clone())
    .await;
    closed(&ctx, result, &span);
    drop(permit);
}

/// A session begins: counted, and its span.
fn opened(ctx: &Context, listener: &Listener, peer: std::net::SocketAddr) -> tracing::Span {
    listener.accepted.increment(1);
    crate::events::COUNTS
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.meters.open.increment(1.0);
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
    ctx.meters.open.decrement(1.0);
}

/// A passthrough session handed over by the process this one took over from (`--takeover`):
/// its device and gateway sockets, counted on its gateway, forwarded from where it stopped.
pub async fn adopt(
    ctx: Arc<Context>,
    (device, gateway): (tokio::net::TcpStream, tokio::net::TcpStream),
    lease: crate::balancer::Lease,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
) {
    ctx.meters.open.increment(1.0);
    let peer = device
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let span =
        tracing::info_span!("session", %peer, adopted = true, gateway = %lease.gateway().name);
    crate::passthrough::forward_until_handed(&ctx, device, gateway, lease)
        .instrument(span)
        .await;
    ctx.meters.open.decrement(1.0);
    drop(permit);
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;
    use wasmbed_config::ProxyConfig;

    use super::*;
    use crate::balancer::GatewaySet;

    /// An idle passthrough session's memory is mostly its task, that is this future: keep it
    /// small (about 0.9 KiB in release, 1.2 KiB in debug builds). Large states (connect, TLS,
    /// a `--takeover` session's movable forwarding) are boxed so they are freed once done, or
    /// carried only where used (the box's pointer: 8 bytes).
    #[tokio::test]
    async fn a_passthrough_session_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let limit = Arc::new(tokio::sync::Semaphore::new(1));
        let accepted = Accepted {
            stream,
            peer: addr,
            permit: limit.clone().acquire_owned().await.unwrap(),
        };
        let config = ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
        let gateways = Arc::new(GatewaySet::new(&config.gateways, std::time::Duration::ZERO));
        let listener_config = Arc::new(Listener::new(config.listeners[0].clone()));
        let device_tls = Arc::new(crate::tls::DeviceTls::load(&config).unwrap());
        let ctx = Arc::new(Context::new(
            config,
            gateways,
            (device_tls, None),
            CancellationToken::new(),
        ));
        let session = serve_passthrough(ctx.clone(), listener_config.clone(), accepted);
        let size = std::mem::size_of_val(&session);
        assert!(size <= 1208, "the session future grew to {size} bytes");
        drop(session);
        // A terminated session's task holds the anchored session itself, the handshake boxed
        // apart (3.7 KB per session for the whole task in release, heaptrack:
        // docs/bench/terminate-heap-per-session.txt).
        let stream = TcpStream::connect(addr).await.unwrap();
        let accepted = Accepted {
            stream,
            peer: addr,
            permit: limit.acquire_owned().await.unwrap(),
        };
        let session = serve_terminate(ctx, listener_config, accepted);
        let size = std::mem::size_of_val(&session);
        assert!(
            size <= 3072,
            "the terminated session future grew to {size} bytes"
        );
    }
}
