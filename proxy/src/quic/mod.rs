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

#![expect(
    clippy::disallowed_methods,
    reason = "with a QUIC listener only, whose data plane keeps its time driver (`data_plane_timers`)"
)]

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use metrics::counter;
use quinn::{Connection, Endpoint, Incoming, RecvStream, SendStream, VarInt};
use rustls::pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;
use tracing::Instrument;
use wasmbed_config::ProxyConfig;
use wasmbed_config::proxy::QuicRetry;

use crate::events::Counted;
use crate::metric_names::QUIC_STREAMS_REFUSED;
use crate::refusal::{Refusal, refused};

pub mod intake;

/// The device protocol's ALPN, as on TCP.
pub const ALPN: &[u8] = crate::tls::QUIC_ALPN;

/// The application codes of the proxy's QUIC device listener: CONNECTION_CLOSE codes and
/// stream reset/stop codes in one numbering, so that each number has one meaning
/// (`docs/proxy.md`, "QUIC close codes"). A refusal is never code 0: a device tells "the
/// session ended" from "you were refused" by the code alone, and reads the ERROR frame
/// (sent on the session stream and acknowledged before the close) for the reason.
pub mod code {
    /// The session ended in order: the device left, or the gateway ended it (an ERROR frame
    /// said why, e.g. `too_many_traps`).
    pub const DONE: u32 = 0;
    /// The proxy is stopping: what was left at the end of its grace period is cut; reconnect
    /// through the same address.
    pub const SHUTDOWN: u32 = 1;
    /// Stream reset and stop code for a stream past the session's first: one session per
    /// connection.
    pub const EXTRA_STREAM: u32 = 2;
    /// The proxy refused the session, or ended it for cause (revoked, a protocol violation,
    /// no gateway), or the gateway refused it at its HELLO: the ERROR frame on the session
    /// stream says why; the close's reason text is `refused`.
    pub const REFUSED: u32 = 3;
    /// No session stream was opened within the handshake timeout.
    pub const NO_STREAM: u32 = 4;
    /// A newer connection of the same device (its certificate) took the session: this
    /// connection is closed (the device, if it is still there, has two: the newer one
    /// serves).
    pub const SUPERSEDED: u32 = 5;
}
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
    fn cut(&self, why: crate::anchor::Cut) {
        let (code, reason): (u32, &[u8]) = match why {
            crate::anchor::Cut::Shutdown => (code::SHUTDOWN, b"proxy stopping"),
            crate::anchor::Cut::Superseded => (code::SUPERSEDED, b"superseded"),
        };
        self.conn.close(VarInt::from_u32(code), reason);
    }

    /// The bytes on the session stream, the stream finished, then (bounded) the device's
    /// acknowledgement of all of it before the connection is closed: closing at once would
    /// discard what is still queued, the ERROR of a refusal first.
    fn goodbye<'a>(
        &'a mut self,
        last: &'a [u8],
        how: crate::anchor::Close,
        within: Duration,
    ) -> crate::anchor::Goodbye<'a> {
        Box::pin(async move {
            let bye = async {
                self.send.write_all(last).await.ok()?;
                self.send.finish().ok()?;
                self.send.stopped().await.ok()
            };
            let _ = tokio::time::timeout(within, bye).await;
            let (code, reason): (u32, &[u8]) = match how {
                crate::anchor::Close::Done => (code::DONE, b"session ended"),
                crate::anchor::Close::Refused => (code::REFUSED, b"refused"),
            };
            self.conn.close(VarInt::from_u32(code), reason);
        })
    }
}

/// The QUIC endpoint of `--quic-listen`, bound now (so a bad address fails the start). Each
/// handshake takes the device trust in use then ([`crate::tls::DeviceTls::quic`]), so a
/// reload reaches QUIC as it reaches TCP; the endpoint's own config only answers what comes
/// before a handshake (retries, version negotiation).
pub(crate) fn bind(
    config: &ProxyConfig,
    device_tls: &crate::tls::DeviceTls,
) -> Result<Option<Endpoint>, crate::error::ProxyError> {
    let Some(addr) = config.quic.listen else {
        return Ok(None);
    };
    let server = device_tls.quic().ok_or_else(|| {
        crate::error::ProxyError::Reload("--quic-listen needs terminate mode's TLS".into())
    })?;
    let bind_error = |source| crate::error::ProxyError::Bind {
        what: "QUIC devices, --quic-listen",
        addr,
        source,
    };
    let socket = wasmbed_certs::udp::socket(addr).map_err(bind_error)?;
    if let Ok(granted) = wasmbed_certs::udp::granted_receive_buffer(&socket) {
        warn_if_small(granted);
    }
    // Read through the intake (newcomers queued apart), whose held Initials wait at most a
    // handshake's deadline (the one in use at start: a reload does not change it).
    intake::endpoint(
        socket,
        Arc::unwrap_or_clone(server),
        config.handshake_timeout,
    )
    .map(Some)
    .map_err(bind_error)
}

/// Says so when the host gave the QUIC socket less receive buffer than asked: every device
/// reconnecting at once sends its Initials in the same instant, what the buffer cannot hold
/// is dropped, and each loss costs its device a probe timeout that doubles on every retry.
fn warn_if_small(granted: usize) {
    let asked = wasmbed_certs::udp::BUFFER;
    if granted < asked {
        tracing::warn!(
            granted,
            asked,
            "the QUIC socket's receive buffer is smaller than asked (net.core.rmem_max caps it): \
             a reconnect storm may lose Initials; raise net.core.rmem_max to at least {} \
             (Linux grants twice the capped request)",
            asked / 2
        );
    }
}

/// Accepts QUIC devices until `stop` fires, each session counted against `limit` (shared
/// with the TCP listeners: `--max-connections`). The stop is one wait for the loop's life,
/// as in the TCP listeners' loop (`crate::listener::accept_loop`).
pub(crate) async fn accept_loop(
    current: impl Fn() -> Arc<crate::context::Context> + Send + Sync + 'static,
    endpoint: Endpoint,
    (limit, sessions): (Arc<Semaphore>, TaskTracker),
    stop: wasmbed_certs::Trigger,
) {
    let mut stopped = stop.fired();
    // QUIC devices admitted past this loop that have no place yet (in line for a slot, or
    // about to take their place): counted here, before their tasks first run, so a burst of
    // Initials sees its own size. (TCP devices in line hold their places already.)
    let unplaced = Arc::new(AtomicUsize::new(0));
    loop {
        let incoming = tokio::select! {
            biased;
            _ = &mut stopped => break,
            i = endpoint.accept() => i,
        };
        let Some(incoming) = incoming else { break };
        let ctx = current();
        // Handshakes in progress and devices in line count, TLS over TCP too (one cap);
        // under a low cap, retry starts at half of it.
        let busy = ctx.device_tls.handshakes() + ctx.device_tls.waiting()
            >= RETRY_ABOVE.min(ctx.config.max_handshakes / 2).max(1);
        let retry = match ctx.config.quic.retry {
            QuicRetry::Always => true,
            QuicRetry::Auto => busy,
            QuicRetry::Never => false,
        };
        if retry && !incoming.remote_address_validated() {
            ctx.meters.quic.retry.increment(1);
            let _ = incoming.retry();
            continue;
        }
        // The device trust in use now: a reload reaches this handshake as it reaches TCP's.
        let Some(trust) = ctx.device_tls.quic() else {
            incoming.refuse();
            continue;
        };
        // A device past the handshake cap waits in line without a connection's place
        // (`--max-connections`): unlike a TCP connection in line, an Initial held unanswered
        // holds no socket, and devices in line holding places filled the cap in a storm —
        // open sessions, handshakes and the line together — so newcomers were refused `full`
        // at once, again and again, each refusal spending the device's TLS ticket. The QUIC
        // devices without a place are bounded by the free places instead, and the place is
        // taken when the handshake starts.
        if unplaced.load(Ordering::Relaxed) >= limit.available_permits().max(1) {
            refuse_full(
                &ctx,
                incoming,
                "QUIC devices without a place fill the free places",
            );
            continue;
        }
        // In the loop's count of devices without a place while it lives.
        let unplaced = Counted::new(&unplaced);
        // Taken in, as a TCP device is at its accept (the dashboard's count: a device refused
        // from here on, for its handshake slot, its place or its certificate, counts as
        // refused too, on either transport).
        crate::events::COUNTS
            .accepted
            .fetch_add(1, Ordering::Relaxed);
        let span = tracing::info_span!("session", peer = %incoming.remote_address(), transport = "quic", device = tracing::field::Empty, sni = tracing::field::Empty, gateway = tracing::field::Empty);
        let port = endpoint.local_addr().map_or(0, |a| a.port());
        // Boxed apart: the handshake's state (the `Incoming`, the timeouts, the anchoring) is
        // the largest part of the session's future, and a task keeps its future's largest
        // size for its whole life; boxed, it is freed once the session is anchored (3.8 KB
        // per idle session, measured with heaptrack).
        let accepting = Box::pin(admitted(
            ctx.clone(),
            (incoming, trust),
            port,
            (limit.clone(), unplaced),
        ));
        sessions.spawn(
            async move {
                if let Some((anchored, place)) = accepting.await {
                    let _open = Open::new(ctx.meters.open_quic);
                    Box::pin(anchored.serve()).await;
                    drop(place);
                }
            }
            .instrument(span),
        );
    }
    // No new connections; live sessions go on for the grace period ([`close`] ends them).
    endpoint.set_server_config(None);
}

/// Refuses a QUIC device for want of a connection's place, counted on both series.
fn refuse_full(ctx: &crate::context::Context, incoming: Incoming, detail: &'static str) {
    ctx.meters.quic.refused_full.increment(1);
    refused(Refusal::ConnectionsFull, detail).count();
    incoming.refuse();
}

/// How long a QUIC device that got a handshake slot waits for its connection's place.
const PLACE_GRACE: Duration = Duration::from_millis(100);

/// Counts an open connection in a gauge while it lives (also when its task is cancelled).
struct Open(&'static crate::metrics::AtomicSeries);

impl Open {
    fn new(gauge: &'static crate::metrics::AtomicSeries) -> Open {
        gauge.increment(1);
        Open(gauge)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.decrement(1);
    }
}

/// After the grace period: closes every QUIC connection left and waits (bounded) until the
/// devices know.
pub(crate) async fn close(endpoint: &Endpoint) {
    endpoint.close(VarInt::from_u32(code::SHUTDOWN), b"proxy stopping");
    let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
}

/// A slot of the handshake cap TLS over TCP shares (`max_handshakes`), waited for in line
/// up to `handshake_wait` (its Initial held unanswered meanwhile, the device's handshake not
/// started; counted in line, then in progress until the handshake's end in `accept`, and
/// both count for the next Initial's retry decision); then a connection's place of `limit`
/// (`--max-connections`, held until the session ends) and [`accept`]. Refused
/// (CONNECTION_REFUSED) if no slot came in time or no place is free.
async fn admitted(
    ctx: Arc<crate::context::Context>,
    (incoming, trust): (Incoming, Arc<quinn::ServerConfig>),
    port: u16,
    (limit, unplaced): (Arc<Semaphore>, Counted),
) -> Option<(
    Box<crate::anchor::Anchored>,
    tokio::sync::OwnedSemaphorePermit,
)> {
    // As over TCP, the handshake's deadline counts from the device's arrival: its time in
    // line is part of it (the device's own patience does not restart when it is admitted).
    let started = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout;
    let Some(handshake) = ctx
        .device_tls
        .admit_by(&ctx.config, &ctx.deadlines, deadline)
        .await
    else {
        ctx.meters.quic.refused_busy.increment(1);
        refused(Refusal::HandshakesBusy, "max_handshakes in progress").count();
        incoming.refuse();
        return None;
    };
    // The connection's place, now that its handshake starts: the line is no longer than the
    // free places, so one is there unless a TCP connection took it meanwhile, or the
    // connection that held the slot still holds its place for a moment (a short grace). Not
    // waited for longer: this device holds a slot, and a TCP device in line holds a place
    // while it waits for a slot.
    let place = match limit.clone().try_acquire_owned() {
        Ok(place) => Some(place),
        Err(_) => ctx
            .deadlines
            .timeout(PLACE_GRACE, limit.acquire_owned())
            .await
            .ok()
            .and_then(Result::ok),
    };
    drop(unplaced);
    let Some(place) = place else {
        refuse_full(&ctx, incoming, "max_connections open");
        return None;
    };
    let anchored = accept(
        ctx,
        (incoming, trust),
        (handshake, port),
        (started, deadline),
    )
    .await?;
    Some((anchored, place))
}

/// One QUIC device up to its anchored session (`None`: refused, counted, or ended).
/// `handshake` counts this one until its handshake ends (by `deadline`); `port` is the
/// listener's; `started`, the device's arrival (its handshake's duration counts from there,
/// as over TCP).
async fn accept(
    ctx: Arc<crate::context::Context>,
    (incoming, trust): (Incoming, Arc<quinn::ServerConfig>),
    (handshake, port): (crate::tls::Handshake, u16),
    (started, deadline): (std::time::Instant, tokio::time::Instant),
) -> Option<Box<crate::anchor::Anchored>> {
    let ctx = &ctx;
    let peer = incoming.remote_address();
    let local = incoming
        .local_ip()
        .map(|ip| std::net::SocketAddr::new(ip, port));
    let connected = match incoming.accept_with(trust) {
        Ok(connecting) => ctx.deadlines.timeout_at(deadline, connecting).await,
        Err(e) => Ok(Err(e)),
    };
    drop(handshake);
    let conn = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            ctx.meters.quic.handshake_failed.increment(1);
            refused(handshake_refusal(&e), e).count();
            return None;
        }
        Err(_) => {
            refused(
                Refusal::HandshakeTimeout,
                "QUIC handshake not finished in time",
            )
            .count();
            return None;
        }
    };
    ctx.meters.handshake_quic.record(started.elapsed());
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    let sni = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.server_name);
    // quinn does not tell a resumed handshake from a full one: the chain is checked again.
    let mut verified =
        match crate::terminate::Verified::check(ctx, sni, (&chain, true), (peer, local, started)) {
            Ok(v) => v,
            Err(r) => {
                conn.close(VarInt::from_u32(code::REFUSED), b"certificate refused");
                r.count();
                return None;
            }
        };
    // Accepted once its certificate passes (a refused device counts as refused only).
    ctx.meters.quic.accepted.increment(1);
    // The session's stream and its HELLO within one `handshake_timeout`, as a TCP device's
    // HELLO is.
    let hello_by = tokio::time::Instant::now() + ctx.config.handshake_timeout;
    verified.hello_by = Some(hello_by);
    let stream = ctx.deadlines.timeout_at(hello_by, conn.accept_bi()).await;
    let (send, recv) = match stream {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            refused(Refusal::ClientClosed, e).count();
            return None;
        }
        Err(_) => {
            conn.close(VarInt::from_u32(code::NO_STREAM), b"no session stream");
            refused(Refusal::HandshakeTimeout, "no session stream in time").count();
            return None;
        }
    };
    // One session per connection: later streams are refused while it lives.
    let extra = conn.clone();
    tokio::spawn(async move {
        while let Ok((mut send, mut recv)) = extra.accept_bi().await {
            counter!(QUIC_STREAMS_REFUSED).increment(1);
            let _ = send.reset(VarInt::from_u32(code::EXTRA_STREAM));
            let _ = recv.stop(VarInt::from_u32(code::EXTRA_STREAM));
        }
    });
    let device = Box::new(QuicDevice { conn, recv, send });
    crate::terminate::anchor_device(ctx, device, verified).await
}

/// The refusal a failed QUIC handshake counts as: the same label as the same failure over
/// TCP (a certificate problem is `client_cert` on both).
fn handshake_refusal(e: &quinn::ConnectionError) -> Refusal {
    match e {
        quinn::ConnectionError::TransportError(t) => {
            let code = u64::from(t.code);
            // QUIC carries a TLS alert as 0x100 + the alert's number (RFC 9001, 4.8).
            match u8::try_from(code.wrapping_sub(0x100)) {
                Ok(alert) if (0x100..0x200).contains(&code) => Refusal::of_tls_alert(alert),
                _ => Refusal::TlsHandshake,
            }
        }
        // The device ended the handshake with an alert of its own (say, it does not trust
        // the proxy's certificate): as over TCP (rustls' `AlertReceived`), `tls_handshake`.
        quinn::ConnectionError::ConnectionClosed(c)
            if (0x100..0x200).contains(&u64::from(c.error_code)) =>
        {
            Refusal::TlsHandshake
        }
        quinn::ConnectionError::TimedOut => Refusal::HandshakeTimeout,
        _ => Refusal::ClientError,
    }
}
