//! passthrough: a device's TLS passed through untouched: the ClientHello peeked (SNI, ALPN)
//! within `handshake_timeout`, the pools it routes to, a gateway connected, the bytes read so
//! far sent first, then bytes both ways until either side ends or the proxy cuts.

use std::future::Future;
use std::task::Poll;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use wasmbed_config::ListenerConfig;

use crate::balancer::{Counts, Lease};
use crate::clienthello::{self, ClientHello, HelloError};
use crate::context::Context;
use crate::forward;
use crate::listener::reset_on_close;
use crate::refusal::{Refusal, Refused, refused};
use crate::route::{Matched, pools_for};
use crate::upstream::{connect, wants_proxy_header};

pub(crate) async fn passthrough(
    ctx: &Context,
    listener: &ListenerConfig,
    mut device: TcpStream,
) -> Result<(), Refused> {
    let started = tokio::time::Instant::now();
    let (prefix, hello) = {
        let mut reading = std::pin::pin!(read_hello(&mut device, ctx.config.max_client_hello));
        // Most devices have sent their hello by the time their session first runs: try once
        // without arming a timer (arming one can cost the runtime a wake-up), then with it.
        match std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await {
            Poll::Ready(read) => read?,
            // From the session's start (`timeout` would read the clock again).
            Poll::Pending => {
                tokio::time::timeout_at(started + ctx.config.handshake_timeout, reading)
                    .await
                    .map_err(|_| {
                        refused(Refusal::HandshakeTimeout, "no complete ClientHello in time")
                    })??
            }
        }
    };
    let (sni, alpn) = match hello {
        Some(ClientHello { sni, alpn, .. }) => (sni, alpn),
        None if listener.allow_plain => (None, Vec::new()),
        None => return Err(refused(Refusal::NotTls, "plain TCP on a TLS listener")),
    };
    ctx.meters.handshake.record(started.elapsed().as_secs_f64());
    let span = tracing::Span::current();
    // A span that records nothing (the log level is above `info`) is not written to.
    if !span.is_disabled() {
        if let Some(name) = &sni {
            span.record("sni", name.as_str());
        }
        if let Some(first) = alpn.first() {
            span.record("alpn", String::from_utf8_lossy(first).as_ref());
        }
    }
    ctx.alpn.count(&alpn);
    // Boxed: the connect state is only needed for a moment, so idle sessions do not carry it.
    let matched = Matched {
        sni: sni.as_deref(),
        alpn: &alpn,
        cert: None,
    };
    let pools = pools_for(ctx, matched);
    drop(alpn);
    // Boxed: the connect state is only needed for a moment.
    let opening = open_passthrough(ctx, pools, (&device, sni, listener.addr), &prefix);
    let (lease, mut gateway) = Box::pin(opening).await?;
    ctx.meters.bytes_up.increment(prefix.len() as u64);
    drop(prefix);
    if ctx.handover.is_some() {
        // `--takeover`: a session that may move to a new process (boxed: its state is
        // larger, and a proxy without --takeover should not carry it in every session).
        Counts::bump(&lease.gateway().counts.sessions_started);
        tracing::Span::current().record("gateway", lease.gateway().name.as_str());
        Box::pin(forward_until_handed(ctx, device, gateway, lease)).await;
        return Ok(());
    }
    let forwarding = forwarding(ctx, &mut device, &mut gateway);
    if forward::supervise(ctx, &lease, forwarding).await.is_some() {
        reset_on_close(&device);
    }
    Ok(())
}

/// A passthrough session's forwarding, with this context's meters and settings.
fn forwarding<'a>(
    ctx: &'a Context,
    device: &'a mut TcpStream,
    gateway: &'a mut TcpStream,
) -> forward::Tcp<'a> {
    let (up, down) = (ctx.meters.bytes_up, ctx.meters.bytes_down);
    forward::tcp(
        device,
        gateway,
        up,
        down,
        ctx.config.splice,
        ctx.config.half_close,
    )
}

/// Forwards a passthrough session until it ends, the proxy cuts it, or (`--takeover`) a new
/// process takes it: then the forwarding stops, what was read is written out, and the two
/// sockets go to the new process. A session that cannot be quiesced (half-closed, splicing)
/// or whose hand-over fails stays here and goes on.
pub(crate) async fn forward_until_handed(
    ctx: &Context,
    mut device: TcpStream,
    mut gateway: TcpStream,
    lease: Lease,
) {
    let mut hand_over = ctx.handover.as_ref().map(|h| h.quiesce.clone());
    loop {
        let mut forwarding = std::pin::pin!(forwarding(ctx, &mut device, &mut gateway));
        match forward::watch(ctx, &lease, forwarding.as_mut(), hand_over.as_ref()).await {
            forward::Watched::Ended(None) => return,
            forward::Watched::Ended(Some(_)) => {
                reset_on_close(&device);
                return;
            }
            forward::Watched::HandOver => {
                let quiesced = forwarding.as_mut().quiesce().await;
                // One try: after a failed one it stays here.
                hand_over = None;
                if let Err(why) = quiesced {
                    if let forward::NotMovable::Failed(f) = &why
                        && f.gateway_failed()
                    {
                        lease.gateway().suspect();
                    }
                    tracing::debug!(?why, "not handed over: stays in this process");
                    continue;
                }
                let Some(handover) = &ctx.handover else {
                    continue;
                };
                match handover.give(device, gateway, &lease.gateway().name).await {
                    Ok(()) => return,
                    Err((d, g)) => (device, gateway) = (d, g),
                }
            }
        }
    }
}

/// Connects to a gateway of `pools` and sends what goes first: a PROXY header (where the
/// gateway's pool wants one) and the device's bytes read so far.
async fn open_passthrough(
    ctx: &Context,
    pools: crate::context::Pools,
    (device, sni, listening): (&TcpStream, Option<String>, std::net::SocketAddr),
    prefix: &[u8],
) -> Result<(Lease, TcpStream), Refused> {
    let (lease, mut gateway) = connect(ctx, &pools).await?;
    if wants_proxy_header(ctx, lease.gateway()) {
        let origin = crate::proxy_protocol::Origin {
            src: device
                .peer_addr()
                .map_err(|e| refused(Refusal::ClientError, e))?,
            dst: device.local_addr().unwrap_or(listening),
            sni,
            identity: None,
        };
        let header = origin.header().map_err(|e| refused(Refusal::Internal, e))?;
        gateway
            .write_all(&header)
            .await
            .map_err(|e| refused(Refusal::GatewayError, e))?;
    }
    // The hello is at most `max_client_hello` bytes: a fresh socket's buffer takes it at once.
    gateway
        .write_all(prefix)
        .await
        .map_err(|e| refused(Refusal::GatewayError, e))?;
    Ok((lease, gateway))
}

/// Reads (bounded) until the bytes are a whole ClientHello, or clearly not TLS. Returns the
/// bytes read, to be sent to the gateway first, untouched.
async fn read_hello(
    device: &mut TcpStream,
    max: usize,
) -> Result<(Vec<u8>, Option<ClientHello>), Refused> {
    let mut buf = vec![0u8; 2048.min(max)];
    let mut len = 0;
    loop {
        if len == buf.len() {
            buf.resize((len * 2).min(max), 0);
        }
        // `read` (unlike `try_read`) lets tokio see a partial read as "drained", so the
        // forwarding that follows waits instead of trying a read that would block.
        match device.read(&mut buf[len..]).await {
            Ok(0) => {
                return Err(refused(
                    Refusal::ClientClosed,
                    "closed before its ClientHello",
                ));
            }
            Ok(n) => len += n,
            Err(e) => return Err(refused(Refusal::ClientError, e)),
        }
        match clienthello::parse(&buf[..len], max) {
            Err(HelloError::Incomplete) => {}
            Err(HelloError::NotTls) => {
                buf.truncate(len);
                return Ok((buf, None));
            }
            Err(e) => return Err(refused(Refusal::of_hello(&e), e)),
            Ok(hello) => {
                buf.truncate(len);
                return Ok((buf, Some(hello)));
            }
        }
    }
}
