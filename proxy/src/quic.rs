//! QUIC devices (`--quic-listen`, terminate mode): a device's session is the first
//! bidirectional stream of its QUIC connection (quinn; TLS 1.3, ALPN `wasmbed/1`, the same
//! certificate, device CA and CRLs as TCP devices). From the HELLO on it is a terminate-mode
//! session like any other: the same routes, balancer, anchor, checkpoints and moves.
//!
//! QUIC gives a device what TCP cannot: its address may change (NAT rebinding, a handover)
//! without a new handshake, since quinn follows a connection by its IDs, not its address.
//! Streams beyond the first are refused (reset) and counted: one session per connection.
//! 0-RTT is off: a device's first bytes are a HELLO and DATA, which must not be replayable
//! (an attacker could replay a captured 0-RTT flight and have DATA run twice).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use metrics::counter;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use wasmbed_config::ProxyConfig;
use wasmbed_config::proxy::QuicRetry;

use crate::metrics::{QUIC_CONNECTIONS, QUIC_STREAMS_REFUSED, REJECTED};
use crate::refusal::Refusal;

/// The device protocol's ALPN, as on TCP.
pub const ALPN: &[u8] = b"wasmbed/1";
/// Close code when a session ends (its stream closed).
const DONE: u32 = 0;
/// Close code when the proxy cuts the session (shutdown).
const CUT: u32 = 1;
/// Stream reset code for a stream beyond the session's.
pub const ONE_SESSION: u32 = 2;
/// Handshakes in progress past which `--quic-retry auto` asks for address validation first.
const RETRY_ABOVE: usize = 256;

/// A device's session stream, with its connection (closed when the session is cut).
struct QuicDevice {
    conn: Connection,
    recv: RecvStream,
    send: SendStream,
}

impl AsyncRead for QuicDevice {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.recv).poll_read(cx, buf)
    }
}

impl AsyncWrite for QuicDevice {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        AsyncWrite::poll_write(Pin::new(&mut self.send), cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_flush(Pin::new(&mut self.send), cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        AsyncWrite::poll_shutdown(Pin::new(&mut self.send), cx)
    }
}

impl crate::anchor::DeviceStream for QuicDevice {
    fn cut(&self) {
        self.conn.close(VarInt::from_u32(CUT), b"proxy stopping");
    }
}

/// The QUIC endpoint of `--quic-listen`, bound now (so a bad address fails the start).
pub(crate) fn bind(
    config: &ProxyConfig,
    device_tls: &crate::DeviceTls,
) -> Result<Option<Endpoint>, crate::ProxyError> {
    let Some(addr) = config.quic.listen else {
        return Ok(None);
    };
    let server = server_config(config, device_tls)?;
    wasmbed_certs::udp::endpoint(addr, Some(server))
        .map(Some)
        .map_err(|source| crate::ProxyError::Bind {
            what: "QUIC devices, --quic-listen",
            addr,
            source,
        })
}

fn server_config(
    config: &ProxyConfig,
    device_tls: &crate::DeviceTls,
) -> Result<quinn::ServerConfig, crate::ProxyError> {
    let acceptor = device_tls.acceptor.load_full().ok_or_else(|| {
        crate::ProxyError::Reload("--quic-listen needs terminate mode's TLS".into())
    })?;
    let mut tls = (**acceptor.config()).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    tls.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| crate::ProxyError::Reload(format!("QUIC TLS: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    // Sized for many small sessions, not quinn's bulk defaults (a 10 MiB window per
    // connection): a device's frames are at most 64 KiB.
    // Two streams at a time: the session's, and one more that is reset at once and counted
    // (a device that ignores the limit breaks the protocol and loses its connection).
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(128 << 10))
        .receive_window(VarInt::from_u32(128 << 10))
        .send_window(128 << 10)
        .max_idle_timeout(quinn::IdleTimeout::try_from(config.quic.idle_timeout).ok())
        // One datagram per send: a connection's send buffer then stays one datagram large
        // (with segmentation offload it grows to ten and is kept). Devices send little.
        .enable_segmentation_offload(false)
        // No unreliable datagrams: nothing uses them, so no buffer is reserved for them.
        .datagram_receive_buffer_size(None)
        // No path MTU discovery: a device's frames are small, so QUIC's 1,200-byte minimum
        // datagram costs them nothing, and each connection's send buffer stays that size
        // (a probe grows it to 2,400 bytes and it is kept: measured with heaptrack), and no
        // probe datagrams are sent.
        .mtu_discovery_config(None);
    server.transport_config(Arc::new(transport));
    server.migration(true);
    Ok(server)
}

/// Accepts QUIC devices until `shutdown`, each session counted against `limit` (shared
/// with the TCP listeners: `--max-connections`).
pub(crate) async fn accept_loop(
    live: Arc<crate::live::Live>,
    endpoint: Endpoint,
    (limit, sessions): (Arc<Semaphore>, TaskTracker),
    shutdown: CancellationToken,
) {
    let handshaking = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shutdown.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let ctx = live.context();
        let busy = handshaking.load(Ordering::Relaxed) >= RETRY_ABOVE;
        let retry = match ctx.config.quic.retry {
            QuicRetry::Always => true,
            QuicRetry::Auto => busy,
            QuicRetry::Never => false,
        };
        if retry && !incoming.remote_address_validated() {
            counter!(QUIC_CONNECTIONS, "result" => "retry").increment(1);
            let _ = incoming.retry();
            continue;
        }
        // A stampede (a fleet reconnecting at once): refused now, a device tries again later;
        // queued, it would time out while its handshake waited, and the work be wasted.
        if handshaking.load(Ordering::Relaxed) >= ctx.config.quic.max_handshakes {
            counter!(QUIC_CONNECTIONS, "result" => "refused_busy").increment(1);
            incoming.refuse();
            continue;
        }
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            counter!(QUIC_CONNECTIONS, "result" => "refused_full").increment(1);
            incoming.refuse();
            continue;
        };
        let span = tracing::info_span!("session", peer = %incoming.remote_address(), transport = "quic", device = tracing::field::Empty, sni = tracing::field::Empty, gateway = tracing::field::Empty);
        // Counted from here to the handshake's end (in `accept`), so that the next Initial's
        // retry decision sees it.
        handshaking.fetch_add(1, Ordering::Relaxed);
        let port = endpoint.local_addr().map_or(0, |a| a.port());
        // Boxed apart: the handshake's state (the `Incoming`, the timeouts, the anchoring) is
        // the largest part of the session's future, and a task keeps its future's largest
        // size for its whole life; boxed, it is freed once the session is anchored (3.8 KB
        // per idle session, measured with heaptrack).
        let accepting = Box::pin(accept(ctx.clone(), incoming, (handshaking.clone(), port)));
        sessions.spawn(
            async move {
                if let Some(anchored) = accepting.await {
                    crate::dashboard::COUNTS
                        .accepted
                        .fetch_add(1, Ordering::Relaxed);
                    let _open = Open::new(&ctx.meters.open_quic);
                    Box::pin(anchored.serve()).await;
                }
                drop(permit);
            }
            .instrument(span),
        );
    }
    // No new connections; live sessions go on for the grace period ([`close`] ends them).
    endpoint.set_server_config(None);
}

/// Counts an open connection in a gauge while it lives (also when its task is cancelled).
struct Open<'a>(&'a metrics::Gauge);

impl<'a> Open<'a> {
    fn new(gauge: &'a metrics::Gauge) -> Open<'a> {
        gauge.increment(1.0);
        Open(gauge)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.decrement(1.0);
    }
}

/// After the grace period: closes every QUIC connection left and waits (bounded) until the
/// devices know.
pub(crate) async fn close(endpoint: &Endpoint) {
    endpoint.close(VarInt::from_u32(CUT), b"proxy stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// One QUIC device up to its anchored session (`None`: refused, counted, or ended).
/// `handshaking` counts this one until its handshake ends; `port` is the listener's.
async fn accept(
    ctx: Arc<crate::session::Context>,
    incoming: Incoming,
    (handshaking, port): (Arc<AtomicUsize>, u16),
) -> Option<Box<crate::anchor::Anchored>> {
    let ctx = &ctx;
    let peer = incoming.remote_address();
    let local = incoming
        .local_ip()
        .map(|ip| std::net::SocketAddr::new(ip, port));
    let started = std::time::Instant::now();
    let reject = |reason: Refusal| {
        counter!(REJECTED, "reason" => reason.as_label()).increment(1);
    };
    let handshake = tokio::time::timeout(ctx.config.handshake_timeout, incoming).await;
    handshaking.fetch_sub(1, Ordering::Relaxed);
    let conn = match handshake {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "QUIC handshake failed");
            counter!(QUIC_CONNECTIONS, "result" => "handshake_failed").increment(1);
            reject(Refusal::TlsHandshake);
            return None;
        }
        Err(_) => {
            reject(Refusal::HandshakeTimeout);
            return None;
        }
    };
    ctx.meters
        .handshake_quic
        .record(started.elapsed().as_secs_f64());
    counter!(QUIC_CONNECTIONS, "result" => "accepted").increment(1);
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    let sni = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name);
    let stream = tokio::time::timeout(ctx.config.handshake_timeout, conn.accept_bi()).await;
    let (send, recv) = match stream {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(VarInt::from_u32(DONE), b"no session stream");
            reject(Refusal::ClientClosed);
            return None;
        }
    };
    // One session per connection: later streams are refused while it lives.
    let extra = conn.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = extra.accept_bi().await {
            counter!(QUIC_STREAMS_REFUSED).increment(1);
            let _ = send.reset(VarInt::from_u32(ONE_SESSION));
            let _ = recv.stop(VarInt::from_u32(ONE_SESSION));
        }
    });
    let device = Box::new(QuicDevice {
        conn: conn.clone(),
        recv,
        send,
    });
    let verified = crate::session::Verified::new(sni, &chain, (peer, local));
    match crate::session::anchor_device(ctx, device, verified).await {
        Ok(anchored) => anchored,
        Err(r) => {
            counter!(REJECTED, "reason" => r.reason.as_label()).increment(1);
            tracing::debug!(reason = r.reason.as_label(), "QUIC session refused");
            conn.close(VarInt::from_u32(DONE), b"refused");
            None
        }
    }
}
