//! terminate: a device's TLS ended at the proxy (TLS over TCP here; QUIC devices, one layer up,
//! joins at [`anchor_device`]): the certificate read once ([`Verified`]), the HELLO checked
//! against it before any gateway sees it, the first gateway's WELCOME, then the session
//! anchored. Raw listeners forward the decrypted bytes instead. Every refusal goes one way
//! for every transport: its ERROR, an orderly close, one count.

use std::io;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::TcpStream;
use tokio_util::codec::Decoder;
use wasmbed_protocol::codec::{CodecError, FrameCodec};
use wasmbed_protocol::{ErrorCode, Frame, Hello, Kind};

use crate::anchor;
use crate::balancer::Counts;
use crate::context::Context;
use crate::forward::{self, supervise};
use crate::listener::reset_on_close;
use crate::refusal::{Refusal, Refused, refused};
use crate::route::device_pools;
use crate::upstream::{connect_avoiding, connect_with};

/// Terminate mode up to the session's anchoring: the device's TLS handshake and HELLO, the
/// first gateway's WELCOME. `None`: the gateway refused the session (the device was told),
/// or, on a `raw` listener, the decrypted bytes were forwarded to their end.
pub(crate) async fn terminate(
    ctx: &Arc<Context>,
    device: TcpStream,
    peer: std::net::SocketAddr,
    raw: bool,
) -> Result<Option<Box<anchor::Anchored>>, Refused> {
    let local = device.local_addr().ok();
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + ctx.config.handshake_timeout;
    // A slot of the handshake cap (shared with QUIC) only once the device has sent
    // something: a connection that sends nothing (a port scan, a TCP health check) must not
    // shut devices out; it waits out `handshake_timeout` holding only its connection.
    let mut first = [0u8; 1];
    match ctx
        .deadlines
        .timeout_at(deadline, device.peek(&mut first))
        .await
    {
        Ok(Ok(n)) if n > 0 => {}
        Ok(Ok(_)) => {
            return Err(refused(
                Refusal::ClientClosed,
                "closed before its ClientHello",
            ));
        }
        Ok(Err(e)) => return Err(refused(Refusal::ClientError, e)),
        Err(_) => {
            return Err(refused(Refusal::HandshakeTimeout, "no ClientHello in time"));
        }
    }
    // Counted from here to the handshake's end; past the cap, in line up to `handshake_wait`
    // (within the handshake's own deadline) with the ClientHello unread.
    let Some(handshake) = ctx
        .device_tls
        .admit_by(&ctx.config, &ctx.deadlines, deadline)
        .await
    else {
        // Closed with the ClientHello unread, so the kernel answers with a reset (as QUIC's
        // refusal, immediate): the device learns at once, and the proxy keeps no TIME_WAIT
        // per refused connection through a storm. Nothing may read from `device` before here.
        return Err(refused(
            Refusal::HandshakesBusy,
            "max_handshakes device handshakes already in progress",
        ));
    };
    // The trust in use as the handshake starts (not before the wait in line: a reload may
    // come meanwhile).
    let Some(config) = ctx.device_tls.tcp() else {
        return Err(refused(
            Refusal::Internal,
            "terminate mode without a TLS acceptor",
        ));
    };
    let (mut tls, sni) = ctx
        .deadlines
        .timeout_at(
            deadline,
            crate::tls::TlsStream::accept(config.clone(), device),
        )
        .await
        .map_err(|_| {
            refused(
                Refusal::HandshakeTimeout,
                "TLS handshake not finished in time",
            )
        })?
        .map_err(|e| refused(tls_reason(&e), e))?;
    drop(handshake);
    ctx.meters.handshake.record(started.elapsed());
    // A chain not checked under the trust in use now: resumed from a ticket, or checked
    // under trust a reload replaced during the handshake.
    let resumed = tls.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let replaced = !ctx
        .device_tls
        .tcp()
        .is_some_and(|now| Arc::ptr_eq(&now, &config));
    let verified = Verified::check(
        ctx,
        sni,
        (tls.peer_certificates().unwrap_or(&[]), resumed || replaced),
        (peer, local, started),
    )?;
    // What the session needed of the handshake is read: the connection keeps only its traffic
    // secrets from here on (`tls::records`).
    tls.shed_handshake()
        .map_err(|e| refused(Refusal::Internal, e))?;
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
    mut tls: crate::tls::TlsStream,
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
    let origin = crate::proxy_protocol::Origin {
        src: peer,
        dst: local.unwrap_or(peer),
        sni,
        identity,
    };
    // The connection made ready as an anchored session's is (TLS within `handshake_timeout`;
    // a failure counted against the gateway and the next one tried), always over TCP.
    let (lease, mut up) = connect_with(ctx, &pools, |c, g| {
        crate::upstream::reach_tcp(c, g, &origin)
    })
    .await?;
    let (bytes_up, bytes_down) = (ctx.meters.bytes_up, ctx.meters.bytes_down);
    let forwarding = forward::streams(&mut tls, &mut up, bytes_up, bytes_down);
    if supervise(ctx, &lease, forwarding).await.is_some() {
        // Cut by the proxy (gateway down, shutdown): the client reconnects at once.
        reset_on_close(tls.tcp());
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
    /// For revocation at a CRL reload: its issuer and serial number
    /// ([`wasmbed_certs::Leaf::revocation_key`]).
    serial: Option<Vec<u8>>,
    peer: std::net::SocketAddr,
    local: Option<std::net::SocketAddr>,
    /// When the device's connection arrived ([`crate::seats::stamp`]): which of two
    /// sessions of one device is the newer.
    arrival: u64,
    /// The HELLO's deadline, when its wait began before the session's stream was open
    /// (QUIC: the stream's wait and the HELLO's share one `handshake_timeout`, as a TCP
    /// device's HELLO has one); else `handshake_timeout` from the HELLO's first read.
    pub(crate) hello_by: Option<tokio::time::Instant>,
    /// Why its certificate names no device, when it names none
    /// ([`wasmbed_certs::device_identity`]): refused before a HELLO is read.
    unnamed: Option<String>,
}

impl Verified {
    /// From the SNI and the certificate chain (empty without `client_ca`) of the handshake,
    /// refused (`client_cert`, as a full handshake's would be) if the certificate no longer
    /// passes: a handshake resumed from a TLS ticket skipped the certificate's verification
    /// (`resumed`, or not known to be full: QUIC does not tell), so the check in use now (CA,
    /// validity, CRLs) runs on its chain here, where every transport's handshake ends; any
    /// chain is refused if the CRLs in use revoke it (one may have been installed during
    /// the handshake). A certificate that names no device ([`wasmbed_certs::device_identity`])
    /// is noted, and refused where a HELLO would be held to it.
    pub(crate) fn check(
        ctx: &Context,
        sni: Option<String>,
        (chain, resumed): (&[rustls::pki_types::CertificateDer<'_>], bool),
        (peer, local, arrived): (std::net::SocketAddr, Option<std::net::SocketAddr>, Instant),
    ) -> Result<Verified, Refused> {
        if resumed && let Err(why) = ctx.device_tls.check_client(chain) {
            return Err(refused(
                Refusal::ClientCert,
                format!(
                    "its certificate no longer passes (a TLS session resumed from a ticket, \
                     or the trust replaced during its handshake): {why}"
                ),
            ));
        }
        // The leaf read once, for its revocation key, its device and its routing attributes.
        let leaf = wasmbed_certs::Leaf::of(chain);
        if leaf
            .as_ref()
            .and_then(|l| l.revocation_key.as_deref())
            .is_some_and(|k| ctx.device_tls.is_revoked(k))
        {
            return Err(refused(Refusal::ClientCert, "certificate revoked"));
        }
        // A certificate that names no device has no name to hold a HELLO to: refused where a
        // HELLO is read ([`open_session`]; a raw listener reads none and takes it).
        let (identity, unnamed) = match wasmbed_certs::device_identity(leaf.as_ref()) {
            Ok(identity) => (identity, None),
            Err(why) => (None, Some(why)),
        };
        let (serial, attributes) = match leaf {
            Some(l) => (l.revocation_key, Some(l.attributes)),
            None => (None, None),
        };
        Ok(Verified {
            sni,
            identity,
            attributes,
            serial,
            peer,
            local,
            arrival: crate::seats::stamp(arrived),
            hello_by: None,
            unnamed,
        })
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
            arrival: first.arrival,
            device: anchor::DeviceSide {
                tls: device,
                serial: first.serial.map(Vec::into_boxed_slice),
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

/// What a device refused for want of a gateway is told (the detail stays in the log).
const UNAVAILABLE: &str = "no gateway took the session";

/// A session the first gateway WELCOMEd, in parts.
struct Opened {
    pools: crate::context::Pools,
    hello: Hello,
    link: anchor::Link,
    welcome: Frame,
    rest: BytesMut,
    pending: BytesMut,
    serial: Option<Vec<u8>>,
    origin: crate::proxy_protocol::Origin,
    /// The arrival of a device named by its certificate: the session takes its seat.
    arrival: Option<u64>,
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
        arrival,
        hello_by,
        unnamed,
    }: Verified,
) -> Result<Result<Opened, Vec<u8>>, Refused> {
    if let Some(why) = unnamed {
        return Err(refused(Refusal::ClientCert, why));
    }
    note_device(ctx, identity.as_deref(), sni.as_deref());
    // The device's HELLO is checked against its certificate before any gateway sees it.
    // (Durations from the config are at most `wasmbed_config::MAX_DURATION`: the sum does
    // not overflow.)
    let by = hello_by.unwrap_or_else(|| tokio::time::Instant::now() + ctx.config.handshake_timeout);
    let (hello, hello_bytes, pending) = ctx
        .deadlines
        .timeout_at(by, first_frame(device, identity.as_deref()))
        .await
        .map_err(|_| refused(Refusal::HandshakeTimeout, "no HELLO in time"))??;
    // Terminate mode sees no offered ALPN list (rustls negotiates it): routes match on SNI.
    ctx.alpn.count(&crate::clienthello::NO_ALPN);
    let pools = device_pools(ctx, sni.as_deref(), attributes);
    let origin = crate::proxy_protocol::Origin {
        src: peer,
        dst: local.unwrap_or(peer),
        sni: sni.clone(),
        identity: identity.clone(),
    };
    // HELLO goes first and the gateway's first frame comes back before the session is
    // anchored: a gateway that refuses the link itself (with TLS 1.3 a client certificate is
    // refused only after the client's side of the handshake is done) is seen here, named,
    // and counted, instead of being a session that just closes.
    let seated = identity.is_some().then_some(arrival);
    // A gateway that answers GOAWAY drains: noted (as a session's GOAWAY is), and the next
    // one tried, as over TCP, where a draining gateway's closed listener refuses the connect
    // (its link still takes streams). The last one's GOAWAY goes to the device, and so does
    // it when no other gateway can be reached.
    let mut draining = Vec::new();
    let mut goaway = None;
    let (lease, up, first, rest) = loop {
        let dial = |c, g| crate::upstream::reach(c, g, &origin);
        let (lease, up) = match connect_avoiding(ctx, &pools, &draining, dial).await {
            Ok(reached) => reached,
            Err(r) => match goaway.take() {
                Some(answered) => break answered,
                None => return Err(r.answered_with(ErrorCode::Unavailable, UNAVAILABLE)),
            },
        };
        let opened = ctx
            .deadlines
            .timeout(
                ctx.config.handshake_timeout,
                crate::upstream::open(ctx, lease.gateway(), up, &hello_bytes),
            )
            .await;
        let (up, first, rest) = match opened {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => {
                return Err(open_failed(e).answered_with(ErrorCode::Unavailable, UNAVAILABLE));
            }
            Err(_) => {
                let r = refused(Refusal::GatewayError, "no answer to HELLO in time");
                return Err(r.answered_with(ErrorCode::Unavailable, UNAVAILABLE));
            }
        };
        let retries = usize::try_from(ctx.config.connect_retries).unwrap_or(usize::MAX);
        if first.kind == Kind::Goaway && draining.len() < retries {
            if ctx.config.health.check != wasmbed_config::HealthCheck::None {
                crate::health::note_drain(lease.gateway(), true, "a GOAWAY");
            }
            draining.push(lease.gateway().clone());
            goaway = Some((lease, up, first, rest));
            continue;
        }
        break (lease, up, first, rest);
    };
    drop(goaway);
    ctx.meters.bytes_up.increment(hello_bytes.len() as u64);
    if first.kind != Kind::Welcome {
        Counts::bump(&lease.gateway().counts.sessions_started);
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
        arrival: seated,
    }))
}

/// The refusal for a session a gateway made ready did not open: one label per failure (a
/// TLS failure was counted against the gateway by `upstream::open`).
fn open_failed(e: crate::upstream::OpenError) -> Refused {
    match e {
        crate::upstream::OpenError::Tls(e) => refused(Refusal::UpstreamTls, e),
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

fn tls_reason(e: &io::Error) -> Refusal {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    rustls_error.map_or(Refusal::ClientError, Refusal::of_tls)
}
