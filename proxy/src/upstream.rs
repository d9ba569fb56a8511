//! upstream: the way to a gateway: a lease's gateway dialed (TCP within `connect_timeout`, or
//! a stream on its link), the next best tried on failure, failures counted against the
//! gateway; then, in terminate mode, a link opened on it (PROXY header, TLS, HELLO, the
//! gateway's first frame).

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use metrics::counter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use wasmbed_protocol::codec::FrameCodec;
use wasmbed_protocol::{DEFAULT_MAX_FRAME, Frame};

use crate::balancer::{Gateway, Lease};
use crate::context::Context;
use crate::failures::{
    OwnFailure, connect_failed, failed, is_fd_exhaustion, is_own_failure, is_tls_failure,
};
use crate::metric_names::UPSTREAM_HANDSHAKES;
use crate::refusal::{Refusal, Refused, refused};
use crate::tls::Upstream;

/// Whether `gateway`'s pool gets a PROXY protocol v2 header (`--proxy-protocol`).
pub(crate) fn wants_proxy_header(ctx: &Context, gateway: &Gateway) -> bool {
    ctx.config.proxy_protocol.contains(&gateway.pool)
}

/// Connects to the best gateway of the first of `pools` that has one taking sessions; on a
/// failed connect, counts a passive failure and tries the next best, up to `connect_retries`
/// more.
pub(crate) async fn connect(
    ctx: &Context,
    pools: &[String],
) -> Result<(Lease, TcpStream), Refused> {
    connect_with(ctx, pools, dial_gateway).await
}

/// Takes a lease on the best gateway of `pools` and reaches it with `dial`; on failure, the
/// next best (up to `connect_retries` more). Refused `upstream_tls` if a gateway's TLS failed
/// (a configuration to mend: the log names the gateway), else `gateway_unreachable`.
pub(crate) async fn connect_with<'c, T, F>(
    ctx: &'c Context,
    pools: &[String],
    dial: impl Fn(&'c Context, Arc<Gateway>) -> F,
) -> Result<(Lease, T), Refused>
where
    F: Future<Output = io::Result<T>>,
{
    connect_avoiding(ctx, pools, &[], dial).await
}

/// As [`connect_with`], never on a gateway of `avoid` (one that answered the session with
/// GOAWAY: it drains).
pub(crate) async fn connect_avoiding<'c, T, F>(
    ctx: &'c Context,
    pools: &[String],
    avoid: &[Arc<Gateway>],
    dial: impl Fn(&'c Context, Arc<Gateway>) -> F,
) -> Result<(Lease, T), Refused>
where
    F: Future<Output = io::Result<T>>,
{
    let mut tried = avoid.to_vec();
    let (mut failed, mut tls) = (0, None);
    for _ in 0..=ctx.config.connect_retries {
        let Some(lease) = ctx.gateways.acquire_first(pools, &tried) else {
            break;
        };
        match dial(ctx, lease.gateway().clone()).await {
            Ok(stream) => return Ok((lease, stream)),
            Err(e) if is_fd_exhaustion(&e) => return Err(refused(Refusal::FdLimit, e)),
            Err(e) if is_own_failure(&e) => return Err(refused(Refusal::Internal, e)),
            Err(e) => {
                if is_tls_failure(&e) {
                    tls = Some(e);
                }
                failed += 1;
                tried.push(lease.gateway().clone());
            }
        }
    }
    Err(match (failed, tls) {
        (0, _) => refused(
            Refusal::NoGateway,
            format!("no gateway of pools {pools:?} is up"),
        ),
        (n, Some(e)) => refused(
            Refusal::UpstreamTls,
            format!("{n} gateways refused, TLS among them: {e}"),
        ),
        (n, None) => refused(Refusal::GatewayUnreachable, format!("{n} gateways refused")),
    })
}

/// Terminate mode's way to a gateway: a connection made ready for a session's first frame,
/// whichever way the proxy reaches its gateways: a stream on the gateway's link (`--upstream
/// link`), or a TCP connection ([`reach_tcp`]). The PROXY header is written (always on a
/// link), within `connect_timeout` as the stream is. A failure to make the link or the TCP
/// connection counts against the gateway ([`failed`]: a link attempt once, whatever the
/// sessions that waited on it), a TLS failure as such; a stream not opened in time (a full
/// gateway) does not; and [`connect_with`] tries the next gateway.
pub(crate) async fn reach(
    ctx: &Context,
    gateway: Arc<Gateway>,
    origin: &crate::proxy_protocol::Origin,
) -> io::Result<Box<dyn Upstream>> {
    let Some(links) = &ctx.links else {
        return reach_tcp(ctx, gateway, origin).await;
    };
    let started = Instant::now();
    // The link's attempt counted its own failure (`Links::open`).
    let mut up = links.open(&ctx.config, &gateway).await?;
    ctx.meters.connect.record(started.elapsed());
    let header = origin.header()?;
    ctx.deadlines
        .timeout(ctx.config.connect_timeout, up.write_all(&header))
        .await
        .map_err(|_| {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the PROXY header not taken in time",
            )
        })??;
    Ok(up)
}

/// A TCP connection to `gateway` ([`dial_gateway`]), the PROXY header first where its pool
/// wants one, then TLS where `[upstream_tls]` is configured, within `handshake_timeout`. A
/// gateway whose TLS fails (a certificate the proxy does not trust, or one refusing the
/// proxy's) counts against its health as a failed connect does: else the balancer would
/// favour it, since it never keeps a session.
pub(crate) async fn reach_tcp(
    ctx: &Context,
    gateway: Arc<Gateway>,
    origin: &crate::proxy_protocol::Origin,
) -> io::Result<Box<dyn Upstream>> {
    let stream = dial_gateway(ctx, gateway.clone()).await?;
    let ready = ctx
        .deadlines
        .timeout(
            ctx.config.handshake_timeout,
            over_tcp(ctx, &gateway, stream, origin),
        )
        .await
        .unwrap_or_else(|_| {
            Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no TLS with the gateway in time",
            ))
        });
    ready.inspect_err(|e| failed(&ctx.config, &gateway, e))
}

/// Connects to `gateway` within `connect_timeout`. A failure (other than the proxy's own
/// descriptor limit) is counted against the gateway, wakes its prober, and counts as a failed
/// health observation.
pub(crate) async fn dial_gateway(ctx: &Context, gateway: Arc<Gateway>) -> io::Result<TcpStream> {
    let started = tokio::time::Instant::now();
    // The deadline from `started`: `timeout` would read the clock again. (Durations from the
    // config are at most `wasmbed_config::MAX_DURATION`: the sum does not overflow, as in
    // `terminate`.)
    let deadline = started + ctx.config.connect_timeout;
    let error = match ctx
        .deadlines
        .timeout_at(deadline, dial(&ctx.deadlines, &gateway))
        .await
    {
        Ok(Ok(stream)) => {
            ctx.meters.connect.record(started.elapsed());
            return Ok(stream);
        }
        Ok(Err(e)) if is_fd_exhaustion(&e) => return Err(e),
        Ok(Err(e)) => e,
        Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
    };
    connect_failed(&ctx.config, &gateway, &error);
    Err(error)
}

async fn dial(deadlines: &crate::deadlines::Deadlines, gateway: &Gateway) -> io::Result<TcpStream> {
    let stream = match gateway.socket_addr {
        Some(sa) => TcpStream::connect(sa).await?,
        // A name: its addresses raced as the link's are ([`crate::dial`]). Boxed: inline,
        // the resolution and the race would grow every session's way in past glibc's
        // per-thread cache (`passthrough::tests`), where only names pay for them.
        None => Box::pin(crate::dial::tcp(&gateway.addr, |d| deadlines.sleep(d))).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Why a session could not be opened on a gateway made ready ([`open`]).
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// TLS with the gateway failed (counted against it by [`open`]).
    #[error("TLS with the gateway: {0}")]
    Tls(io::Error),
    #[error("{0}")]
    Io(io::Error),
    #[error("the gateway sent a bad frame: {0}")]
    Frame(String),
    #[error("the gateway closed before answering HELLO")]
    Closed,
}

/// A connection to `gateway` made ready for bytes: the PROXY header first where its pool
/// wants one, then TLS when `[upstream_tls]` is configured. (A failure of the proxy's own,
/// the records not handed over, is [`OwnFailure`], no failure of the gateway's.)
async fn over_tcp(
    ctx: &Context,
    gateway: &Gateway,
    mut stream: tokio::net::TcpStream,
    origin: &crate::proxy_protocol::Origin,
) -> io::Result<Box<dyn Upstream>> {
    if crate::upstream::wants_proxy_header(ctx, gateway) {
        let header = origin.header()?;
        stream.write_all(&header).await?;
    }
    let Some(client) = &ctx.connector else {
        return Ok(Box::new(stream));
    };
    let name = crate::tls::upstream_name(&ctx.config, &gateway.addr);
    let mut up = crate::tls::TlsStream::connect(Arc::clone(client), name, stream).await?;
    let kind = match up.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    counter!(UPSTREAM_HANDSHAKES, "kind" => kind).increment(1);
    // Nothing more is read of the handshake: the connection keeps only its traffic secrets
    // from here on (`tls::records`), as a device's does.
    up.shed_handshake()
        .map_err(|e| io::Error::other(OwnFailure(e)))?;
    Ok(Box::new(up))
}

/// Opens a session on `up` (made ready by [`reach`]): HELLO, and the gateway's first frame.
/// A TLS failure here (with TLS 1.3 a gateway refuses the proxy's certificate only after the
/// proxy's side of the handshake is done) counts against the gateway as in [`reach`].
pub(crate) async fn open(
    ctx: &Context,
    gateway: &Arc<Gateway>,
    mut up: Box<dyn Upstream>,
    hello: &[u8],
) -> Result<(Box<dyn Upstream>, Frame, BytesMut), OpenError> {
    let tls_or_io = |e: io::Error| {
        if is_tls_failure(&e) {
            failed(&ctx.config, gateway, &e);
            OpenError::Tls(e)
        } else {
            OpenError::Io(e)
        }
    };
    up.write_all(hello).await.map_err(tls_or_io)?;
    up.flush().await.map_err(tls_or_io)?;
    let mut codec = FrameCodec::new(DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(1024);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => {
                gateway.heard_from();
                return Ok((up, frame, buf));
            }
            Ok(None) => {}
            Err(e) => return Err(OpenError::Frame(e.to_string())),
        }
        match up.read_buf(&mut buf).await {
            Ok(0) => return Err(OpenError::Closed),
            Ok(_) => {}
            Err(e) => return Err(tls_or_io(e)),
        }
    }
}
