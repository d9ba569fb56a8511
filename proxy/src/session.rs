//! One device connection: classify (peek the ClientHello, or terminate TLS) -> pick a gateway
//! -> connect (retrying the next best on failure) -> forward until an end.

use std::io;
use std::sync::Arc;

use std::task::Poll;
use std::time::Instant;

use bytes::BytesMut;
use metrics::counter;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use wasmbed_config::{HealthCheck, ListenerConfig, Mode, ProxyConfig, RouteConfig};
use wasmbed_protocol::codec::{CodecError, FrameCodec};
use wasmbed_protocol::{ErrorCode, Frame, Hello, Kind};

use crate::balancer::{Gateway, GatewaySet, Lease};
use crate::clienthello::{self, ClientHello, HelloError};
use crate::listener::{Accepted, reset_on_close};
use crate::metrics::{ACCEPTED, CONNECT_FAILURES, Meters, ROUTED, SESSIONS_CANCELLED};
use crate::refusal::{Refusal, Refused, refused};
use crate::{anchor, forward};

/// Everything a session needs, shared by all of them: the config in force when the session
/// started (a reload makes a new `Context` for later sessions, sharing the live parts).
pub struct Context {
    pub config: ProxyConfig,
    pub gateways: Arc<GatewaySet>,
    pub device_tls: Arc<crate::DeviceTls>,
    pub connector: Option<tokio_rustls::TlsConnector>,
    /// `--upstream link`: the links to the gateways (shared by every context of a run).
    pub links: Option<Arc<crate::link::Links>>,
    /// Cancelled when the shutdown grace period is over (every gateway's session token is
    /// cancelled with it): tells a cut session that the cause was shutdown.
    pub hard_stop: CancellationToken,
    pub meters: Meters,
    /// Sessions routed by each of `config.routes`, then by the default pool.
    pub routed: Vec<metrics::Counter>,
    pub alpn: AlpnCounts,
    /// Spaces the moves of drains and rebalancing (`--move-rate`).
    pub pacer: Arc<anchor::Pacer>,
}

impl Context {
    pub fn new(
        config: ProxyConfig,
        gateways: Arc<GatewaySet>,
        (device_tls, connector): crate::TlsSetup,
        hard_stop: CancellationToken,
    ) -> Context {
        let routed = config
            .routes
            .iter()
            .map(|r| r.pool.clone())
            .chain([wasmbed_config::proxy::DEFAULT_POOL.to_string()])
            .map(|pool| counter!(ROUTED, "pool" => pool))
            .collect();
        let alpn = AlpnCounts::new(&config.routes);
        Context {
            pacer: Arc::new(anchor::Pacer::new(config.migration.move_rate)),
            alpn,
            config,
            gateways,
            device_tls,
            connector,
            links: None,
            hard_stop,
            meters: Meters::new(),
            routed,
        }
    }

    /// The context of a reloaded `config`: the same gateways, device TLS, stop token and
    /// pacer (set to the new rate), the new settings and upstream connector.
    pub fn next(
        &self,
        config: ProxyConfig,
        connector: Option<tokio_rustls::TlsConnector>,
    ) -> Context {
        let mut next = Context::new(
            config,
            self.gateways.clone(),
            (self.device_tls.clone(), connector),
            self.hard_stop.clone(),
        );
        self.pacer.set_rate(next.config.migration.move_rate);
        next.pacer = self.pacer.clone();
        next.links = self.links.clone();
        next
    }
}

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

/// Serves one accepted device connection to its end.
pub async fn serve(ctx: Arc<Context>, listener: Arc<Listener>, accepted: Accepted) {
    let Accepted {
        stream,
        peer,
        permit,
    } = accepted;
    listener.accepted.increment(1);
    crate::events::COUNTS
        .accepted
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ctx.meters.open.increment(1.0);
    let span = tracing::info_span!(
        "session",
        %peer,
        sni = tracing::field::Empty,
        alpn = tracing::field::Empty,
        device = tracing::field::Empty,
        gateway = tracing::field::Empty,
    );
    let result = match ctx.config.mode {
        Mode::Passthrough => {
            passthrough(&ctx, &listener.config, stream)
                .instrument(span.clone())
                .await
        }
        // Boxed: a TLS session's state is large, and a passthrough task should not carry it.
        // Boxed, each part on its own: the handshake's state is large and short-lived, the
        // anchored session's small and long-lived (one future would keep the larger for
        // the session's whole life), and a passthrough task carries neither.
        Mode::Terminate => {
            Box::pin(async {
                // `None`: the gateway refused the session and the device was told.
                let raw = listener.config.raw;
                if let Some(anchored) = Box::pin(terminate(&ctx, stream, peer, raw)).await? {
                    Box::pin(anchored.serve()).await;
                }
                Ok(())
            })
            .instrument(span.clone())
            .await
        }
    };
    if let Err(r) = result {
        span.in_scope(|| r.count());
    }
    ctx.meters.open.decrement(1.0);
    drop(permit);
}

async fn passthrough(
    ctx: &Context,
    listener: &ListenerConfig,
    mut device: TcpStream,
) -> Result<(), Refused> {
    let started = Instant::now();
    let (prefix, hello) = {
        let mut reading = std::pin::pin!(read_hello(&mut device, ctx.config.max_client_hello));
        // Most devices have sent their hello by the time their session first runs: try once
        // without arming a timer (arming one can cost the runtime a wake-up), then with it.
        match std::future::poll_fn(|cx| Poll::Ready(reading.as_mut().poll(cx))).await {
            Poll::Ready(read) => read?,
            Poll::Pending => tokio::time::timeout(ctx.config.handshake_timeout, reading)
                .await
                .map_err(|_| {
                    refused(Refusal::HandshakeTimeout, "no complete ClientHello in time")
                })??,
        }
    };
    let (sni, alpn) = match hello {
        Some(ClientHello { sni, alpn, .. }) => (sni, alpn),
        None if listener.allow_plain => (None, Vec::new()),
        None => return Err(refused(Refusal::NotTls, "plain TCP on a TLS listener")),
    };
    ctx.meters.handshake.record(started.elapsed().as_secs_f64());
    if let Some(name) = &sni {
        tracing::Span::current().record("sni", name.as_str());
    }
    ctx.alpn.count(&alpn);
    if let Some(first) = alpn.first() {
        tracing::Span::current().record("alpn", String::from_utf8_lossy(first).as_ref());
    }
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
    let (up, down) = (&ctx.meters.bytes_up, &ctx.meters.bytes_down);
    let forwarding = forward::tcp(
        &mut device,
        &mut gateway,
        up,
        down,
        ctx.config.splice,
        ctx.config.half_close,
    );
    if supervise(ctx, &lease, forwarding).await.is_some() {
        reset_on_close(&device);
    }
    Ok(())
}

/// Connects to a gateway of `pools` and sends what goes first: a PROXY header (where the
/// gateway's pool wants one) and the device's bytes read so far.
async fn open_passthrough(
    ctx: &Context,
    pools: Vec<String>,
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

/// Whether `gateway`'s pool gets a PROXY protocol v2 header (`--proxy-protocol`).
pub(crate) fn wants_proxy_header(ctx: &Context, gateway: &Gateway) -> bool {
    ctx.config.proxy_protocol.contains(&gateway.pool)
}

/// Terminate mode up to the session's anchoring: the device's TLS handshake and HELLO, the
/// first gateway's WELCOME. `None`: the gateway refused the session (the device was told),
/// or, on a `raw` listener, the decrypted bytes were forwarded to their end.
async fn terminate(
    ctx: &Arc<Context>,
    device: TcpStream,
    peer: std::net::SocketAddr,
    raw: bool,
) -> Result<Option<Box<anchor::Anchored>>, Refused> {
    let local = device.local_addr().ok();
    let Some(acceptor) = ctx.device_tls.tcp() else {
        return Err(refused(
            Refusal::Internal,
            "terminate mode without a TLS acceptor",
        ));
    };
    let started = Instant::now();
    let tls = tokio::time::timeout(ctx.config.handshake_timeout, acceptor.accept(device))
        .await
        .map_err(|_| {
            refused(
                Refusal::HandshakeTimeout,
                "TLS handshake not finished in time",
            )
        })?
        .map_err(|e| refused(tls_reason(&e), e))?;
    ctx.meters.handshake.record(started.elapsed().as_secs_f64());
    let (_, conn) = tls.get_ref();
    let verified = Verified::new(
        conn.server_name().map(str::to_string),
        conn.peer_certificates().unwrap_or(&[]),
        (peer, local),
    );
    if raw {
        forward_decrypted(ctx, tls, verified).await?;
        return Ok(None);
    }
    // Refusals from here on are answered and counted by `anchor_device`.
    Ok(anchor_device(ctx, Box::new(tls), verified).await)
}

/// A `raw` listener: after the handshake (the client certificate checked as for devices), the
/// decrypted bytes go to a gateway of the matching pool as they are: no HELLO check, no
/// anchoring, so no moves; the gateway learns the client's identity only from a PROXY v2
/// header (`--proxy-protocol`).
async fn forward_decrypted(
    ctx: &Arc<Context>,
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    Verified {
        sni,
        identity,
        attributes,
        peer,
        local,
        ..
    }: Verified,
) -> Result<(), Refused> {
    note_device(ctx, identity.as_deref(), sni.as_deref());
    let pools = device_pools(ctx, sni.as_deref(), attributes);
    let (lease, stream) = connect(ctx, &pools).await?;
    let origin = crate::proxy_protocol::Origin {
        src: peer,
        dst: local.unwrap_or(peer),
        sni,
        identity,
    };
    let mut up = anchor::over_tcp(ctx, lease.gateway(), stream, &origin)
        .await
        .map_err(|e| open_failed(lease.gateway(), e))?;
    let (bytes_up, bytes_down) = (&ctx.meters.bytes_up, &ctx.meters.bytes_down);
    let forwarding = forward::streams(&mut tls, &mut up, bytes_up, bytes_down);
    if supervise(ctx, &lease, forwarding).await.is_some() {
        // Cut by the proxy (gateway down, shutdown): the client reconnects at once.
        reset_on_close(tls.get_ref().0);
    }
    Ok(())
}

/// What the device's TLS handshake established (TLS over TCP or QUIC), read once from its
/// certificate.
pub(crate) struct Verified {
    sni: Option<String>,
    /// The certificate's device (`None` without `client_ca`).
    identity: Option<String>,
    attributes: Option<wasmbed_certs::CertAttributes>,
    /// For revocation at a CRL reload.
    serial: Option<Vec<u8>>,
    peer: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
}

impl Verified {
    /// From the SNI and the certificate chain (empty without `client_ca`) of the handshake.
    pub(crate) fn new(
        sni: Option<String>,
        chain: &[rustls::pki_types::CertificateDer<'_>],
        (peer, local): (std::net::SocketAddr, Option<std::net::SocketAddr>),
    ) -> Verified {
        let cert = chain.first();
        Verified {
            sni,
            identity: cert.and_then(wasmbed_certs::peer_identity),
            attributes: cert.map(wasmbed_certs::cert_attributes),
            serial: cert.and_then(wasmbed_certs::serial_of),
            peer,
            local,
        }
    }
}

/// Names the session's device and SNI on its span, and counts an authenticated device.
fn note_device(ctx: &Context, identity: Option<&str>, sni: Option<&str>) {
    let span = tracing::Span::current();
    if let Some(id) = identity {
        span.record("device", id);
        ctx.meters.devices.increment(1);
    }
    if let Some(name) = sni {
        span.record("sni", name);
    }
}

/// The pools for a client whose TLS ended here: rustls negotiated ALPN, so routes match on
/// the SNI and the certificate's attributes (dropped once matched).
fn device_pools(
    ctx: &Context,
    sni: Option<&str>,
    attributes: Option<wasmbed_certs::CertAttributes>,
) -> Vec<String> {
    let matched = Matched {
        sni,
        alpn: &[],
        cert: attributes.as_ref(),
    };
    pools_for(ctx, matched)
}

/// Terminate mode after the device's handshake, whatever its transport: HELLO checked against
/// the certificate, the route, the first gateway's WELCOME. A refusal goes one way for every
/// transport: its ERROR to the device, an orderly close ([`anchor::DeviceStream::goodbye`]),
/// then counted ([`Refused::count`]). `None`: refused, or the gateway refused the session
/// (its ERROR passed on).
pub(crate) async fn anchor_device(
    ctx: &Arc<Context>,
    mut device: Box<dyn anchor::DeviceStream>,
    verified: Verified,
) -> Option<Box<anchor::Anchored>> {
    let timeout = ctx.config.handshake_timeout;
    match open_session(ctx, &mut device, verified).await {
        Ok(Ok(first)) => Some(Box::new(anchor::Anchored {
            ctx: ctx.clone(),
            device: anchor::DeviceSide {
                tls: device,
                serial: first.serial,
                origin: first.origin,
            },
            pools: first.pools,
            hello: first.hello,
            link: first.link,
            first: (first.welcome, first.rest, first.pending),
        })),
        Ok(Err(gateway_error)) => {
            // The gateway refused the session (an ERROR): the device gets it, then the close.
            device
                .goodbye(&gateway_error, anchor::Close::Refused, timeout)
                .await;
            None
        }
        Err(r) => {
            device
                .goodbye(&r.error_frame(), anchor::Close::Refused, timeout)
                .await;
            r.count();
            None
        }
    }
}

/// A session the first gateway WELCOMEd, in parts.
struct Opened {
    pools: Vec<String>,
    hello: Hello,
    link: anchor::Link,
    welcome: Frame,
    rest: BytesMut,
    pending: BytesMut,
    serial: Option<Vec<u8>>,
    origin: crate::proxy_protocol::Origin,
}

/// [`anchor_device`]'s work up to the first WELCOME (`Ok(Err(bytes))`: the gateway's ERROR).
async fn open_session(
    ctx: &Arc<Context>,
    device: &mut Box<dyn anchor::DeviceStream>,
    Verified {
        sni,
        identity,
        attributes,
        serial,
        peer,
        local,
    }: Verified,
) -> Result<Result<Opened, Vec<u8>>, Refused> {
    note_device(ctx, identity.as_deref(), sni.as_deref());
    // The device's HELLO is checked against its certificate before any gateway sees it.
    let (hello, hello_bytes, pending) = tokio::time::timeout(
        ctx.config.handshake_timeout,
        first_frame(device, identity.as_deref()),
    )
    .await
    .map_err(|_| refused(Refusal::HandshakeTimeout, "no HELLO in time"))??;
    // Terminate mode sees no offered ALPN list (rustls negotiates it): routes match on SNI.
    ctx.alpn.count(&[]);
    let pools = device_pools(ctx, sni.as_deref(), attributes);
    let (lease, gateway) = connect_with(ctx, &pools, dial_upstream)
        .await
        .map_err(|r| r.answered(ErrorCode::Unavailable, 0))?;
    // HELLO goes first and the gateway's first frame comes back before the session is
    // anchored: a gateway that refuses the link itself (with TLS 1.3 a client certificate is
    // refused only after the client's side of the handshake is done) is seen here, named,
    // and counted, instead of being a session that just closes.
    let origin = crate::proxy_protocol::Origin {
        src: peer,
        dst: local.unwrap_or(peer),
        sni: sni.clone(),
        identity: identity.clone(),
    };
    let opened = tokio::time::timeout(
        ctx.config.handshake_timeout,
        anchor::open(ctx, lease.gateway(), gateway, (&hello_bytes, &origin)),
    )
    .await;
    let (up, first, rest) = match opened {
        Ok(Ok(opened)) => opened,
        Ok(Err(e)) => {
            return Err(open_failed(lease.gateway(), e).answered(ErrorCode::Unavailable, 0));
        }
        Err(_) => {
            let r = refused(Refusal::GatewayError, "no answer to HELLO in time");
            return Err(r.answered(ErrorCode::Unavailable, 0));
        }
    };
    ctx.meters.bytes_up.increment(hello_bytes.len() as u64);
    if first.kind != Kind::Welcome {
        lease.gateway().sessions_started.increment(1);
        return Ok(Err(first.encode()));
    }
    Ok(Ok(Opened {
        pools,
        hello,
        link: anchor::Link::new(lease, up),
        welcome: first,
        rest,
        pending,
        serial,
        origin,
    }))
}

/// The refusal for a link to `gateway` that could not be opened: one label per failure,
/// whichever path opened it (anchored sessions, raw listeners). A TLS failure is also
/// counted against the gateway and logged, since it is a configuration problem.
fn open_failed(gateway: &Gateway, e: anchor::OpenError) -> Refused {
    match e {
        anchor::OpenError::Tls(e) => {
            let name = &gateway.name;
            counter!(crate::metrics::UPSTREAM_TLS_FAILURES, "gateway" => name.clone()).increment(1);
            tracing::warn!(gateway = %name, error = %e, "TLS with the gateway failed");
            refused(Refusal::UpstreamTls, e)
        }
        e => refused(Refusal::GatewayError, e),
    }
}

/// Terminate mode: reads the device's first frame, which must be a HELLO naming the device
/// of the verified certificate (when there is one). Anything else is refused with the ERROR
/// the device gets. Returns the HELLO, its bytes (to send the gateway first), and whatever
/// followed.
async fn first_frame<S>(
    device: &mut S,
    identity: Option<&str>,
) -> Result<(Hello, Vec<u8>, BytesMut), Refused>
where
    S: AsyncRead + Unpin + ?Sized,
{
    let mut codec = FrameCodec::new(wasmbed_protocol::DEFAULT_MAX_FRAME);
    let mut buf = BytesMut::with_capacity(512);
    let frame = loop {
        match codec.decode(&mut buf) {
            Ok(Some(frame)) => break frame,
            Ok(None) => {}
            Err(CodecError::Protocol(e)) => {
                return Err(refused(Refusal::BadFrame, &e).answered(e.code(), 0));
            }
            Err(CodecError::Io(e)) => return Err(refused(Refusal::ClientError, e)),
        }
        match device.read_buf(&mut buf).await {
            Ok(0) => return Err(refused(Refusal::ClientClosed, "closed before HELLO")),
            Ok(_) => {}
            Err(e) => return Err(refused(Refusal::ClientError, e)),
        }
    };
    if frame.kind != Kind::Hello {
        let text = format!("the first frame must be HELLO, not {}", frame.kind.as_str());
        return Err(refused(Refusal::NoSession, text).answered(ErrorCode::NoSession, frame.seq));
    }
    let hello: Hello = match frame.decode_body("HELLO") {
        Ok(h) => h,
        Err(e) => return Err(refused(Refusal::BadHello, e).answered(ErrorCode::BadHello, 0)),
    };
    if let Some(id) = identity
        && id != hello.device
    {
        let text = format!("HELLO names {:?}, the certificate {id:?}", hello.device);
        tracing::warn!(claimed = %hello.device, certificate = %id, "HELLO names another device");
        let r = refused(Refusal::IdentityMismatch, text);
        return Err(r.answered(ErrorCode::IdentityMismatch, 0));
    }
    // Re-encoding gives back the exact bytes the device sent: a frame has one encoding.
    Ok((hello, frame.encode(), buf))
}

/// The connection to a gateway in terminate mode: plain TCP, or TLS (`[upstream_tls]`).
pub(crate) trait Upstream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Upstream for T {}

/// Whether an I/O error is rustls' (an alert, a certificate problem).
pub(crate) fn is_tls_error(e: &io::Error) -> bool {
    e.get_ref()
        .is_some_and(|i| i.downcast_ref::<rustls::Error>().is_some())
}

fn tls_reason(e: &io::Error) -> Refusal {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    rustls_error.map_or(Refusal::ClientError, Refusal::of_tls)
}

pub(crate) fn upstream_name(ctx: &Context, addr: &str) -> ServerName<'static> {
    let configured = ctx
        .config
        .upstream_tls
        .as_ref()
        .and_then(|u| u.server_name.clone());
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    ServerName::try_from(configured.unwrap_or(host))
        .unwrap_or_else(|_| ServerName::try_from("gateway").expect("static valid name"))
}

/// Runs a session's forwarding until it ends, its gateway goes down, or the grace period of a
/// shutdown is over. Returns the cause when the proxy cut the session: the caller then closes
/// the device's connection with a reset, so the device reconnects at once.
async fn supervise(
    ctx: &Context,
    lease: &Lease,
    forwarding: impl Future<Output = Result<(), forward::Failure>>,
) -> Option<&'static str> {
    let gateway = lease.gateway();
    gateway.sessions_started.increment(1);
    tracing::Span::current().record("gateway", gateway.name.as_str());
    // One token ends the session: the gateway's, which is cancelled when it goes down and,
    // at the end of a shutdown's grace period, for every gateway.
    let cut = match gateway.session_token() {
        None => true,
        Some(token) => tokio::select! {
            r = forwarding => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "session ended with an error");
                    if e.gateway_failed() {
                        gateway.suspect();
                    }
                }
                false
            }
            _ = token.cancelled() => true,
        },
    };
    let cause = match (cut, ctx.hard_stop.is_cancelled()) {
        (false, _) => None,
        (true, true) => Some("shutdown"),
        (true, false) => Some("gateway_down"),
    };
    if let Some(cause) = cause {
        counter!(SESSIONS_CANCELLED, "gateway" => gateway.name.clone(), "cause" => cause)
            .increment(1);
        if cause == "gateway_down" {
            crate::events::COUNTS
                .cut
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    cause
}

/// What a route may match about a device: its SNI, the ALPN protocols it offered, and (in
/// terminate mode) its certificate's attributes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Matched<'a> {
    pub sni: Option<&'a str>,
    pub alpn: &'a [Vec<u8>],
    pub cert: Option<&'a wasmbed_certs::CertAttributes>,
}

/// The pools a device goes to, in order: the first matching route's pool, its fallbacks, then
/// the default pool (a pool with no gateway taking sessions is skipped for the next).
fn pools_for(ctx: &Context, device: Matched<'_>) -> Vec<String> {
    let routes = &ctx.config.routes;
    let matched = routes.iter().position(|r| route_matches(r, device));
    let index = matched.unwrap_or(routes.len());
    if let Some(counter) = ctx.routed.get(index) {
        counter.increment(1);
    }
    let mut pools: Vec<String> = Vec::new();
    if let Some(r) = matched.map(|i| &routes[i]) {
        pools.push(r.pool.clone());
        pools.extend(r.fallback.iter().cloned());
    }
    pools.push(wasmbed_config::proxy::DEFAULT_POOL.to_string());
    let mut seen = std::collections::HashSet::new();
    pools.retain(|p| seen.insert(p.clone()));
    pools
}

/// Whether a device matches a route: its SNI equals the route's or lies under its
/// `*.suffix`, it offers the route's ALPN protocol, its certificate carries the route's URI
/// SAN (exact, or `prefix*`) and OU; each only when the route names it.
pub fn route_matches(route: &RouteConfig, device: Matched<'_>) -> bool {
    let sni_ok = match (route.sni.as_deref(), device.sni) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pattern), Some(sni)) => match pattern.strip_prefix("*.") {
            Some(suffix) => sni
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => pattern == sni,
        },
    };
    let alpn_ok = route
        .alpn
        .as_deref()
        .is_none_or(|want| device.alpn.iter().any(|p| p == want.as_bytes()));
    let uri_ok = route.cert_uri.as_deref().is_none_or(|want| {
        device.cert.is_some_and(|c| {
            c.uris.iter().any(|u| match want.strip_suffix('*') {
                Some(prefix) => u.starts_with(prefix),
                None => u == want,
            })
        })
    });
    let ou_ok = route
        .cert_ou
        .as_deref()
        .is_none_or(|want| device.cert.is_some_and(|c| c.ous.iter().any(|o| o == want)));
    sni_ok && alpn_ok && uri_ok && ou_ok
}

/// Sessions by the ALPN protocol the device offered: a closed label set (the protocols the
/// routes name, `wasmbed/1`, `none`, `other`), each counter registered once.
pub struct AlpnCounts {
    known: Vec<(Vec<u8>, metrics::Counter)>,
    none: metrics::Counter,
    other: metrics::Counter,
}

/// The ALPN protocol of the device session protocol.
pub const WASMBED_ALPN: &str = "wasmbed/1";

impl AlpnCounts {
    fn new(routes: &[RouteConfig]) -> AlpnCounts {
        let mut names: Vec<&str> = vec![WASMBED_ALPN];
        for r in routes {
            if let Some(a) = r.alpn.as_deref()
                && !names.contains(&a)
            {
                names.push(a);
            }
        }
        let counter = |label: String| counter!(crate::metrics::SESSIONS_BY_ALPN, "alpn" => label);
        AlpnCounts {
            known: names
                .into_iter()
                .map(|n| (n.as_bytes().to_vec(), counter(n.to_string())))
                .collect(),
            none: counter("none".into()),
            other: counter("other".into()),
        }
    }

    /// Counts one session by the first offered protocol that has a label of its own.
    fn count(&self, offered: &[Vec<u8>]) {
        if offered.is_empty() {
            return self.none.increment(1);
        }
        let known = offered
            .iter()
            .find_map(|p| self.known.iter().find(|(name, _)| name == p));
        match known {
            Some((_, c)) => c.increment(1),
            None => self.other.increment(1),
        }
    }
}

/// Connects to the best gateway of the first of `pools` that has one taking sessions; on a
/// failed connect, counts a passive failure and tries the next best, up to `connect_retries`
/// more.
async fn connect(ctx: &Context, pools: &[String]) -> Result<(Lease, TcpStream), Refused> {
    connect_with(ctx, pools, dial_gateway).await
}

/// Takes a lease on the best gateway of `pools` and reaches it with `dial`; on failure, the
/// next best (up to `connect_retries` more).
async fn connect_with<'c, T, F>(
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
    match links.open(ctx, &gateway).await {
        Ok(up) => {
            ctx.meters.connect.record(started.elapsed().as_secs_f64());
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
    let started = Instant::now();
    let error = match tokio::time::timeout(ctx.config.connect_timeout, dial(&gateway.addr)).await {
        Ok(Ok(stream)) => {
            ctx.meters.connect.record(started.elapsed().as_secs_f64());
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
    counter!(CONNECT_FAILURES, "gateway" => gateway.name.clone()).increment(1);
    gateway.suspect();
    tracing::debug!(gateway = %gateway.name, %error, "connect to gateway failed");
    let health = &ctx.config.health;
    if health.check != HealthCheck::None {
        let change = gateway.observe(false, health.rise, health.fall);
        crate::health::report(gateway, change, &error.to_string());
    }
}

async fn dial(addr: &str) -> io::Result<TcpStream> {
    let stream = match addr.parse::<std::net::SocketAddr>() {
        Ok(sa) => TcpStream::connect(sa).await?,
        Err(_) => TcpStream::connect(addr).await?,
    };
    stream.set_nodelay(true)?;
    Ok(stream)
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    /// An idle passthrough session's memory is mostly its task, that is this future: keep it
    /// small (about 0.9 KiB in release, 1 KiB in debug builds). Large states (connect, TLS)
    /// are boxed so they are freed once done.
    #[tokio::test]
    async fn a_passthrough_session_task_stays_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stream = TcpStream::connect(addr).await.unwrap();
        let limit = Arc::new(tokio::sync::Semaphore::new(1));
        let accepted = Accepted {
            stream,
            peer: addr,
            permit: limit.acquire_owned().await.unwrap(),
        };
        let config = ProxyConfig::from_toml("[[gateway]]\naddr = \"127.0.0.1:1\"").unwrap();
        let gateways = Arc::new(GatewaySet::new(&config.gateways, std::time::Duration::ZERO));
        let listener_config = Arc::new(Listener::new(config.listeners[0].clone()));
        let device_tls = Arc::new(crate::DeviceTls::load(&config).unwrap());
        let ctx = Arc::new(Context::new(
            config,
            gateways,
            (device_tls, None),
            CancellationToken::new(),
        ));
        let session = serve(ctx, listener_config, accepted);
        let size = std::mem::size_of_val(&session);
        assert!(size <= 1200, "the session future grew to {size} bytes");
    }
}
