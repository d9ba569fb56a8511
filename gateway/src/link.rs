//! The multiplexed link of terminating proxies (`--link`): QUIC on UDP at the session port,
//! ALPN `wasmbed-link/1`, mutual TLS with the gateway's own certificate and key.
//!
//! Only a proxy may hold a link: its client certificate must chain to `--trusted-proxy-ca`
//! or carry one of the `--proxy-identity` names; any other certificate (a device's) gets the
//! connection closed with [`NOT_A_PROXY`] and counted. A link carries one bidirectional
//! stream per device session: the stream opens with a PROXY v2 header (the device's address,
//! SNI and the identity the proxy verified; mandatory, since the link itself is the proxy's)
//! and then the session's frames, served by [`crate::session::serve`] exactly as a session on
//! TCP. A stream that does not start with a valid header is reset and counted.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicServerConfig;
use quinn::{Endpoint, Incoming, VarInt};
use rustls::pki_types::CertificateDer;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::{DeviceTls, GatewayError, Shared, metrics, proxy_header};

/// The ALPN protocol of the link.
pub const ALPN: &[u8] = b"wasmbed-link/1";
/// Application close code: the peer's certificate is not a proxy's.
pub const NOT_A_PROXY: u32 = 1;
/// Application close code: the gateway is shutting down.
pub const SHUTDOWN: u32 = 2;
/// Stream reset code: the stream did not open with a valid PROXY header.
pub const BAD_HEADER: u32 = 3;

/// How long a link's peer may stay silent before the link is dropped. The proxy sends
/// keep-alives well within it, and sets its own (shorter) timeout.
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// Per-stream receive window: a device session's frames are small; the largest frame must fit.
const STREAM_WINDOW: u32 = 128 << 10;
/// Per-link receive window, shared by all its streams.
const LINK_WINDOW: u32 = 16 << 20;

/// The link's QUIC server settings, from the gateway's TLS configuration.
pub(crate) fn server_config(
    tls: &DeviceTls,
    max_sessions: u32,
    max_frame: usize,
) -> Result<quinn::ServerConfig, GatewayError> {
    let mut crypto = (**tls.acceptor.config()).clone();
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    // 0-RTT stays off: a link's first bytes are HELLOs and DATA, which must not be replayable.
    crypto.max_early_data_size = 0;
    let crypto = QuicServerConfig::try_from(Arc::new(crypto))
        .map_err(|e| GatewayError::Link(format!("TLS configuration: {e}")))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let window = STREAM_WINDOW.max(u32::try_from(max_frame + 64).unwrap_or(u32::MAX));
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(max_sessions))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(window))
        .receive_window(VarInt::from_u32(LINK_WINDOW.max(window)))
        .send_window(u64::from(LINK_WINDOW))
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(IDLE_TIMEOUT).expect("30 s is a valid idle timeout"),
        ));
    config.transport_config(Arc::new(transport));
    Ok(config)
}

/// Binds TCP `addr` for sessions and, with `link`, UDP on the same address and port. With
/// port 0 the pair is picked together: a few tries until a port is free for both.
pub(crate) fn bind_pair(
    addr: SocketAddr,
    link: bool,
) -> std::io::Result<(std::net::TcpListener, Option<std::net::UdpSocket>)> {
    let tcp = |a: SocketAddr| -> std::io::Result<std::net::TcpListener> {
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(a),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&a.into())?;
        socket.listen(1024)?;
        Ok(socket.into())
    };
    if !link {
        return Ok((tcp(addr)?, None));
    }
    let tries = if addr.port() == 0 { 16 } else { 1 };
    let mut last = None;
    for _ in 0..tries {
        let listener = tcp(addr)?;
        let bound = listener.local_addr()?;
        match wasmbed_certs::udp::socket(bound) {
            Ok(udp) => return Ok((listener, Some(udp))),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no port free for both TCP and UDP")))
}

/// Accepts links until `stop`; their streams' sessions join `sessions`.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    endpoint: Endpoint,
    sessions: TaskTracker,
    stop: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.cancelled() => break,
        };
        let Some(incoming) = incoming else { break };
        let span = tracing::info_span!("link", peer = %incoming.remote_address());
        // Not tracked with the sessions: a link lives until the endpoint closes, after them.
        tokio::spawn(link(shared.clone(), incoming, sessions.clone()).instrument(span));
    }
}

/// A link counted open (`wasmbed_gateway_links_open`) until dropped: when its connection ends
/// (counted by cause: [`ended`]), or its task is dropped.
struct Open(Arc<Shared>);

impl Open {
    fn counted(shared: &Arc<Shared>) -> Open {
        shared
            .links
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Open(shared.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0
            .links
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Why a link ended, as `wasmbed_gateway_link_ends_total` says it: a proxy that stops closes
/// its links (`closed`); one that vanished without closing leaves them to time out.
/// (A transport-level close from the peer carries a protocol error: `error`, not `closed`.)
fn ended(e: &quinn::ConnectionError) -> &'static str {
    match e {
        quinn::ConnectionError::ApplicationClosed(_) => "closed",
        quinn::ConnectionError::TimedOut => "timeout",
        quinn::ConnectionError::LocallyClosed => "local",
        quinn::ConnectionError::Reset => "reset",
        _ => "error",
    }
}

/// The proxy a link's chain belongs to (its name, for the logs), under the TLS in use now,
/// by the check TCP connections get ([`crate::DeviceTls::speaker`]: quinn does not tell a
/// resumed handshake from a full one, so the chain is checked again), or why not: the close
/// code, the reason counted, and the words.
fn proxy_of(
    shared: &Shared,
    tls: Option<&crate::DeviceTls>,
    chain: &[CertificateDer<'static>],
) -> Result<String, (u32, &'static str, String)> {
    let Some(tls) = tls else {
        return Err((NOT_A_PROXY, "not_a_proxy", "no TLS in use".into()));
    };
    match tls.speaker(&shared.settings, chain, true) {
        Ok(crate::Speaker::Proxy(name)) => Ok(name.unwrap_or_default()),
        Ok(crate::Speaker::Device { .. }) => Err((
            NOT_A_PROXY,
            "not_a_proxy",
            "the client certificate is not a proxy's".into(),
        )),
        Err(why) => Err((NOT_A_PROXY, "client_cert", why)),
    }
}

/// One link: the handshake, the proxy check, then a session per stream.
async fn link(shared: Arc<Shared>, incoming: Incoming, sessions: TaskTracker) {
    let refused = |reason: &'static str| {
        ::metrics::counter!(metrics::LINKS, "result" => reason).increment(1);
    };
    let conn = match tokio::time::timeout(crate::HANDSHAKE_TIMEOUT, incoming).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "link handshake failed");
            return refused("handshake");
        }
        Err(_) => return refused("timeout"),
    };
    let chain = conn
        .peer_identity()
        .and_then(|any| any.downcast::<Vec<CertificateDer<'static>>>().ok())
        .map(|b| *b)
        .unwrap_or_default();
    let mut checked = shared.tls.load();
    let proxy = match proxy_of(&shared, checked.as_deref(), &chain) {
        Ok(proxy) => proxy,
        Err((code, reason, why)) => {
            conn.close(VarInt::from_u32(code), why.as_bytes());
            tracing::warn!(why, "link refused");
            return refused(reason);
        }
    };
    refused("accepted");
    // The time its certificate's check holds for: past it, the check is made again (and
    // fails). One whose validity cannot be read (the check passed it) holds for the link's
    // life, as before there was a check.
    let valid = wasmbed_certs::Validity::of_leaf(&chain);
    let mut verdict: Result<(), (u32, &'static str, String)> = Ok(());
    tracing::debug!(%proxy, "link up");
    let _open = Open::counted(&shared);
    loop {
        // While draining, streams are still accepted: their sessions answer GOAWAY at once.
        let (mut send, mut recv) = match conn.accept_bi().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "link closed");
                ::metrics::counter!(metrics::LINK_ENDS, "cause" => ended(&e)).increment(1);
                return;
            }
        };
        // Each new session is the proxy's statement again, held to the trust in use now and
        // to the time (the chain checked again when a reload replaced the trust, or once its
        // validity has run out): a reload that revokes the proxy's certificate or stops
        // trusting its CA, or the certificate's expiry, refuses its new sessions here, as
        // each would refuse its next TCP connection; the sessions already open go on, as
        // over TCP.
        let now = shared.tls.load();
        let same = match (&now, &checked) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        };
        let expired = verdict.is_ok() && valid.is_some_and(|v| !v.holds_now());
        if !same || expired {
            verdict = proxy_of(&shared, now.as_deref(), &chain).map(drop);
            checked = now;
        }
        if let Err((code, _, why)) = &verdict {
            let _ = send.reset(VarInt::from_u32(*code));
            let _ = recv.stop(VarInt::from_u32(*code));
            tracing::debug!(
                why,
                "a session refused on a link: its proxy is no longer trusted"
            );
            ::metrics::counter!(metrics::LINK_STREAMS_REFUSED).increment(1);
            continue;
        }
        let shared = shared.clone();
        let span = tracing::info_span!("session", proxy = %proxy, device_addr = tracing::field::Empty, sni = tracing::field::Empty, device = tracing::field::Empty, app = tracing::field::Empty);
        sessions.spawn(
            async move {
                ::metrics::counter!(metrics::SESSIONS_TOTAL).increment(1);
                let header = proxy_header::read_from(&mut recv, crate::HANDSHAKE_TIMEOUT).await;
                let info = match header {
                    Ok(info) => info,
                    Err(refused) => {
                        ::metrics::counter!(metrics::PROXY_HEADERS, "result" => refused.as_str())
                            .increment(1);
                        let _ = recv.stop(VarInt::from_u32(BAD_HEADER));
                        return;
                    }
                };
                crate::header_accepted(&info);
                let drain = shared.draining.clone();
                let stream = tokio::io::join(recv, send);
                crate::session::serve(shared, stream, (info.identity, None), drain).await;
            }
            .instrument(span),
        );
    }
}
