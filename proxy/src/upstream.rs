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
use wasmbed_config::HealthCheck;
use wasmbed_protocol::codec::FrameCodec;
use wasmbed_protocol::{DEFAULT_MAX_FRAME, Frame};

use crate::balancer::{Counts, Gateway, Lease};
use crate::context::Context;
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
/// next best (up to `connect_retries` more).
pub(crate) async fn connect_with<'c, T, F>(
    ctx: &'c Context,
    pools: &[String],
    dial: impl Fn(&'c Context, Arc<Gateway>) -> F,
) -> Result<(Lease, T), Refused>
where
    F: Future<Output = io::Result<T>>,
{
    let mut tried = Vec::new();
    for _ in 0..=ctx.config.connect_retries {
        let Some(lease) = ctx.gateways.acquire_first(pools, &tried) else {
            break;
        };
        match dial(ctx, lease.gateway().clone()).await {
            Ok(stream) => return Ok((lease, stream)),
            Err(e) if is_fd_exhaustion(&e) => return Err(refused(Refusal::FdLimit, e)),
            Err(_) => tried.push(lease.gateway().clone()),
        }
    }
    Err(if tried.is_empty() {
        refused(
            Refusal::NoGateway,
            format!("no gateway of pools {pools:?} is up"),
        )
    } else {
        refused(
            Refusal::GatewayUnreachable,
            format!("{} gateways refused", tried.len()),
        )
    })
}

/// Terminate mode's way to a gateway, before HELLO: a TCP connection (TLS comes next), or a
/// stream on the gateway's link (`--upstream link`).
pub(crate) enum Dialed {
    Tcp(TcpStream),
    Link(Box<dyn Upstream>),
}

/// Reaches `gateway` the configured way (see [`Dialed`]); failures count as in
/// [`dial_gateway`].
pub(crate) async fn dial_upstream(ctx: &Context, gateway: Arc<Gateway>) -> io::Result<Dialed> {
    let Some(links) = &ctx.links else {
        return dial_gateway(ctx, gateway).await.map(Dialed::Tcp);
    };
    let started = Instant::now();
    match links.open(&ctx.config, &gateway).await {
        Ok(up) => {
            ctx.meters.connect.record(started.elapsed());
            Ok(Dialed::Link(up))
        }
        Err(error) => {
            connect_failed(ctx, &gateway, &error);
            Err(error)
        }
    }
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
    let error = match ctx.deadlines.timeout_at(deadline, dial(&gateway)).await {
        Ok(Ok(stream)) => {
            ctx.meters.connect.record(started.elapsed());
            return Ok(stream);
        }
        Ok(Err(e)) if is_fd_exhaustion(&e) => return Err(e),
        Ok(Err(e)) => e,
        Err(_) => io::Error::new(io::ErrorKind::TimedOut, "connect timed out"),
    };
    connect_failed(ctx, &gateway, &error);
    Err(error)
}

/// A failed connect (or link stream) is counted against the gateway, wakes its prober, and
/// counts as a failed health observation.
fn connect_failed(ctx: &Context, gateway: &Arc<Gateway>, error: &io::Error) {
    Counts::bump(&gateway.counts.connect_failures);
    gateway.suspect();
    tracing::debug!(gateway = %gateway.name, %error, "connect to gateway failed");
    let health = &ctx.config.health;
    if health.check != HealthCheck::None && !gateway.refusal_is_its_drain(error) {
        let change = gateway.observe(false, health.rise, health.fall);
        crate::health::report(gateway, change, &error.to_string());
    }
}

async fn dial(gateway: &Gateway) -> io::Result<TcpStream> {
    let stream = match gateway.socket_addr {
        Some(sa) => TcpStream::connect(sa).await?,
        None => TcpStream::connect(gateway.addr.as_str()).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Why opening a link failed.
#[derive(Debug, thiserror::Error)]
pub(crate) enum OpenError {
    /// TLS with the gateway failed (counted by the caller).
    #[error("TLS with the gateway: {0}")]
    Tls(io::Error),
    #[error("{0}")]
    Io(io::Error),
    #[error("the gateway sent a bad frame: {0}")]
    Frame(String),
    #[error("the gateway closed before answering HELLO")]
    Closed,
    /// The proxy's own failure, not the gateway's (the TLS records not handed over).
    #[error("{0}")]
    Internal(io::Error),
}

/// A connection to `gateway` made ready for bytes: the PROXY header first where its pool
/// wants one, then TLS when `[upstream_tls]` is configured.
pub(crate) async fn over_tcp(
    ctx: &Context,
    gateway: &Gateway,
    mut stream: tokio::net::TcpStream,
    origin: &crate::proxy_protocol::Origin,
) -> Result<Box<dyn Upstream>, OpenError> {
    if crate::upstream::wants_proxy_header(ctx, gateway) {
        let header = origin.header().map_err(OpenError::Io)?;
        stream.write_all(&header).await.map_err(OpenError::Io)?;
    }
    let Some(client) = &ctx.connector else {
        return Ok(Box::new(stream));
    };
    let name = crate::tls::upstream_name(&ctx.config, &gateway.addr);
    let mut up = crate::tls::TlsStream::connect(Arc::clone(client), name, stream)
        .await
        .map_err(OpenError::Tls)?;
    let kind = match up.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    counter!(UPSTREAM_HANDSHAKES, "kind" => kind).increment(1);
    // Nothing more is read of the handshake: the connection keeps only its traffic secrets
    // from here on (`tls::records`), as a device's does.
    up.shed_handshake().map_err(OpenError::Internal)?;
    Ok(Box::new(up))
}

/// Opens a link on `dialed`: TLS when configured (a PROXY header first for pools that want
/// one; always on a link stream), HELLO, and the gateway's first frame.
pub(crate) async fn open(
    ctx: &Context,
    gateway: &Gateway,
    dialed: crate::upstream::Dialed,
    (hello, origin): (&[u8], &crate::proxy_protocol::Origin),
) -> Result<(Box<dyn Upstream>, Frame, BytesMut), OpenError> {
    let mut up: Box<dyn Upstream> = match dialed {
        crate::upstream::Dialed::Link(mut up) => {
            let header = origin.header().map_err(OpenError::Io)?;
            up.write_all(&header).await.map_err(OpenError::Io)?;
            up
        }
        crate::upstream::Dialed::Tcp(stream) => over_tcp(ctx, gateway, stream, origin).await?,
    };
    let tls_or_io = |e: io::Error| {
        if crate::tls::is_tls_error(&e) {
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
