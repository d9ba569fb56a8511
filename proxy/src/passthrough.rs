//! passthrough: a device's TLS passed through untouched: the ClientHello peeked (SNI, ALPN)
//! within `handshake_timeout`, the pools it routes to, a gateway connected, the bytes read so
//! far sent first, then bytes both ways until either side ends or the proxy cuts.

use std::future::Future;
use std::pin::Pin;
use std::task::{Poll, ready};

use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use wasmbed_config::ListenerConfig;

use crate::balancer::Lease;
use crate::clienthello::{self, Alpn, ClientHello, HelloError};
use crate::context::Context;
use crate::forward;
use crate::listener::reset_on_close;
use crate::refusal::{Refusal, Refused, refused};
use crate::route::{Matched, pools_for};
use crate::upstream::{connect, wants_proxy_header};

pub(crate) async fn passthrough(
    ctx: &Context,
    listener: &ListenerConfig,
    device: TcpStream,
) -> Result<(), Refused> {
    // The way in (the hello, the route, the gateway's connect) boxed: its state is needed for
    // a moment, and a task keeps its future's largest state for its whole life. What stays
    // is the forwarding's: the task is small enough for glibc to serve its cell from a small
    // bin (docs/performance.md, "A passthrough session's task under 1 KiB").
    let (mut device, mut gateway, lease) = Box::pin(open(ctx, listener, device)).await?;
    if ctx.handover.is_some() {
        // `--takeover`: a session that may move to a new process (boxed: its state is
        // larger, and a proxy without --takeover should not carry it in every session).
        lease.gateway().session_started();
        Box::pin(forward_until_handed(ctx, device, gateway, lease)).await;
        return Ok(());
    }
    let forwarding = forwarding(ctx, &mut device, &mut gateway);
    if forward::supervise(ctx, &lease, forwarding).await.is_some() {
        reset_on_close(&device);
    }
    Ok(())
}

/// A passthrough session's way in: the ClientHello peeked within `handshake_timeout`, the
/// pools it routes to, a gateway connected and sent the bytes read so far. Returns the
/// device, the gateway and the lease that counts the session on it.
async fn open(
    ctx: &Context,
    listener: &ListenerConfig,
    mut device: TcpStream,
) -> Result<(TcpStream, TcpStream, Lease), Refused> {
    let started = tokio::time::Instant::now();
    let (prefix, hello) = {
        let mut reading = std::pin::pin!(read_hello(&mut device, ctx.config.max_client_hello));
        // Most devices have sent their hello by the time their session first runs: try once
        // without arming a deadline (arming one takes the timer thread's lock), then with it.
        match std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await {
            Poll::Ready(read) => read?,
            // From the session's start (`timeout` would read the clock again).
            Poll::Pending => ctx
                .deadlines
                .timeout_at(started + ctx.config.handshake_timeout, reading)
                .await
                .map_err(|_| {
                    refused(Refusal::HandshakeTimeout, "no complete ClientHello in time")
                })??,
        }
    };
    let (sni, alpn) = match hello {
        Some(ClientHello { sni, alpn, .. }) => (sni, alpn),
        None if listener.allow_plain => (None, Alpn::default()),
        None => return Err(refused(Refusal::NotTls, "plain TCP on a TLS listener")),
    };
    ctx.meters.handshake.record(started.elapsed());
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
    let matched = Matched {
        sni: sni.as_deref(),
        alpn: &alpn,
        cert: None,
    };
    let pools = pools_for(ctx, matched);
    drop(alpn);
    // Boxed apart too: with the hello's state beside it, the way in would be past the sizes
    // glibc's per-thread cache keeps (1,032 bytes), and come from its large bins.
    let opening = open_passthrough(ctx, pools, (&device, sni, listener.addr), &prefix);
    let (lease, gateway) = Box::pin(opening).await?;
    ctx.meters.bytes_up.increment(prefix.len() as u64);
    Ok((device, gateway, lease))
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
///
/// Each read goes into the thread's copy buffer, and only what was read is copied out: a
/// hello up to 1 KiB (OpenSSL's, a client without a post-quantum key share) then takes a
/// block from glibc's per-thread cache, a larger one (a post-quantum share: 1.2-1.8 KB) a
/// block from its bins as the 2 KiB buffer per connection did, and neither is zeroed first
/// (measured: docs/performance.md, "What the gap to the floor is made of").
async fn read_hello(
    device: &mut (impl AsyncRead + Unpin),
    max: usize,
) -> Result<(Vec<u8>, Option<ClientHello>), Refused> {
    /// What one read gave.
    enum Step {
        Closed,
        More,
        Done(Vec<u8>, Result<ClientHello, HelloError>),
    }
    // The bytes of a hello that did not come whole in one read, kept between reads.
    let mut kept = Vec::new();
    loop {
        let step = std::future::poll_fn(|cx| {
            forward::with_buffer(|scratch| {
                // At most `max` bytes in all (with `max` read, `parse` refuses the hello).
                let room = max.saturating_sub(kept.len()).clamp(1, scratch.len());
                let mut filled = ReadBuf::new(&mut scratch[..room]);
                // `poll_read` (unlike `try_read`) lets tokio see a partial read as "drained",
                // so the forwarding that follows waits instead of trying a read that would
                // block.
                ready!(Pin::new(&mut *device).poll_read(cx, &mut filled))?;
                let read = filled.filled();
                if read.is_empty() {
                    return Poll::Ready(Ok(Step::Closed));
                }
                // A hello whole in its first read is parsed where it was read.
                let first = kept.is_empty();
                if !first {
                    kept.extend_from_slice(read);
                }
                let parsed = clienthello::parse(if first { read } else { &kept }, max);
                Poll::Ready(Ok(match parsed {
                    Err(HelloError::Incomplete) => {
                        if first {
                            kept.extend_from_slice(read);
                        }
                        Step::More
                    }
                    parsed if first => Step::Done(read.to_vec(), parsed),
                    parsed => Step::Done(std::mem::take(&mut kept), parsed),
                }))
            })
        })
        .await
        .map_err(|e: std::io::Error| refused(Refusal::ClientError, e))?;
        match step {
            Step::Closed => {
                return Err(refused(
                    Refusal::ClientClosed,
                    "closed before its ClientHello",
                ));
            }
            Step::More => {}
            Step::Done(bytes, Ok(hello)) => return Ok((bytes, Some(hello))),
            Step::Done(bytes, Err(HelloError::NotTls)) => return Ok((bytes, None)),
            Step::Done(_, Err(e)) => return Err(refused(Refusal::of_hello(&e), e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::{AsyncRead, ReadBuf};

    use super::read_hello;
    use crate::clienthello::tests::hello_bytes;
    use crate::refusal::Refusal;

    /// A device's socket as `read_hello` sees it: each read gives the next chunk (as much of
    /// it as fits), then end of stream. Records the room each read offered.
    struct Chunks {
        chunks: VecDeque<Vec<u8>>,
        offered: Vec<usize>,
    }

    impl Chunks {
        fn new(chunks: &[&[u8]]) -> Chunks {
            Chunks {
                chunks: chunks.iter().map(|c| c.to_vec()).collect(),
                offered: Vec::new(),
            }
        }
    }

    impl AsyncRead for Chunks {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            self.offered.push(buf.remaining());
            if let Some(mut chunk) = self.chunks.pop_front() {
                let n = chunk.len().min(buf.remaining());
                buf.put_slice(&chunk[..n]);
                if n < chunk.len() {
                    self.chunks.push_front(chunk.split_off(n));
                }
            }
            Poll::Ready(Ok(()))
        }
    }

    const MAX: usize = 16 * 1024;

    #[tokio::test]
    async fn a_hello_in_pieces_is_read_whole_and_returned_as_sent() {
        let hello = hello_bytes("pieces.example", &[b"wasmbed/1"]);
        let (a, rest) = hello.split_at(1);
        let (b, c) = rest.split_at(rest.len() / 2);
        for chunks in [vec![hello.as_slice()], vec![a, b, c]] {
            let mut device = Chunks::new(&chunks);
            let (bytes, parsed) = read_hello(&mut device, MAX).await.expect("a hello");
            assert_eq!(
                bytes,
                hello,
                "every byte read, in order, from {} reads",
                chunks.len()
            );
            let parsed = parsed.expect("TLS");
            assert_eq!(parsed.sni.as_deref(), Some("pieces.example"));
            assert_eq!(parsed.alpn.first(), Some(b"wasmbed/1".as_slice()));
            assert_eq!(device.offered.len(), chunks.len(), "no read past the hello");
        }
    }

    #[tokio::test]
    async fn bytes_after_the_hello_in_the_same_read_go_with_it() {
        let mut sent = hello_bytes("after.example", &[]);
        let hello_len = sent.len();
        sent.extend_from_slice(b"early bytes");
        let (first, second) = sent.split_at(hello_len - 10);
        // In one read, and with the hello's end and the bytes after it in a second.
        for chunks in [vec![sent.as_slice()], vec![first, second]] {
            let mut device = Chunks::new(&chunks);
            let (bytes, parsed) = read_hello(&mut device, MAX).await.expect("a hello");
            assert_eq!(bytes, sent, "the hello and what came with it, untouched");
            assert_eq!(parsed.expect("TLS").len, hello_len);
        }
    }

    #[tokio::test]
    async fn plain_bytes_are_returned_as_not_tls() {
        let mut device = Chunks::new(&[b"GET / HTTP/1.1\r\n"]);
        let (bytes, parsed) = read_hello(&mut device, MAX).await.expect("not TLS");
        assert_eq!(bytes, b"GET / HTTP/1.1\r\n");
        assert!(parsed.is_none());
    }

    #[tokio::test]
    async fn no_more_than_max_is_read_and_a_larger_hello_is_refused() {
        let hello = hello_bytes("large.example", &[]);
        let max = hello.len() / 2;
        let pieces: Vec<&[u8]> = hello.chunks(100).collect();
        let mut device = Chunks::new(&pieces);
        let refused = read_hello(&mut device, max).await.expect_err("too large");
        assert_eq!(refused.reason, Refusal::HelloTooLarge);
        let read: usize = hello.len() - device.chunks.iter().map(Vec::len).sum::<usize>();
        assert_eq!(read, max, "read up to the bound, not past it");
        assert!(device.offered.iter().all(|&room| room <= max));
    }

    #[tokio::test]
    async fn a_close_before_the_hello_is_whole_is_refused() {
        let hello = hello_bytes("closed.example", &[]);
        let mut device = Chunks::new(&[&hello[..hello.len() - 1]]);
        let refused = read_hello(&mut device, MAX).await.expect_err("closed");
        assert_eq!(refused.reason, Refusal::ClientClosed);
    }

    /// A passthrough session's way in is two boxes, each allocated and freed once per
    /// connection: each within the block sizes glibc's per-thread cache keeps (up to 1,032
    /// bytes), so that neither comes from its bins (`passthrough`; as one box, 1,248 bytes,
    /// it came from the large bins: `_int_malloc` +418 instructions per connection,
    /// docs/performance.md, "A passthrough session's task under 1 KiB").
    #[tokio::test]
    async fn the_way_in_fits_glibcs_per_thread_cache() {
        const CACHED: usize = 1032;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ctx = crate::context::Context::for_tests();
        let device = tokio::net::TcpStream::connect(addr).await.unwrap();
        let size = std::mem::size_of_val(&super::open(&ctx, &ctx.config.listeners[0], device));
        assert!(size <= CACHED, "the way in grew to {size} bytes");
        let device = tokio::net::TcpStream::connect(addr).await.unwrap();
        let matched = crate::route::Matched {
            sni: None,
            alpn: &crate::clienthello::NO_ALPN,
            cert: None,
        };
        let pools = crate::route::pools_for(&ctx, matched);
        let listening = ctx.config.listeners[0].addr;
        let opening = super::open_passthrough(&ctx, pools, (&device, None, listening), &[]);
        let size = std::mem::size_of_val(&opening);
        assert!(size <= CACHED, "the gateway's connect grew to {size} bytes");
    }
}
