//! `--upstream link`: multiplexed QUIC connections (quinn) to the gateways, one per gateway
//! for each thread serving sessions, a bidirectional stream per device session, instead of a
//! TCP (+ TLS) connection per session.
//!
//! The link is mutual TLS: the gateway's server certificate is checked against
//! `[upstream_tls] ca` (and `server_name`), the proxy presents its client certificate, and the
//! gateway (`wasmbed gateway --link`) accepts only proxies' certificates. A stream opens with
//! a PROXY v2 header (the device's address, SNI and verified identity), then the session's
//! frames: the gateway serves it exactly as a session on TCP. Opening a stream costs no
//! round trip, no descriptor and no handshake, so a move to another gateway is a stream open.
//!
//! A link is made on first use and shared by every session to that gateway served by the
//! same thread: with session workers (`workers`), each worker has its own links (its own UDP
//! socket and quinn endpoint, made on its runtime), so a session's stream, its connection and
//! their endpoint are driven on the thread that serves the session, and no frame crosses
//! threads (measured: docs/performance.md, "A link per session worker"). Sessions on the main
//! runtime (QUIC devices; TCP ones without workers) share the main runtime's links. When a
//! link is lost (the gateway closed it, or nothing was heard for `--link-timeout` while
//! keep-alives went out at a quarter of it) every stream on it fails, so its sessions move at
//! once, and the next session makes a new link.

#![expect(
    clippy::disallowed_methods,
    reason = "`--upstream link` (terminate mode) only, whose data plane keeps its time driver (`data_plane_timers`)"
)]

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use metrics::counter;
use quinn::crypto::rustls::QuicClientConfig;
use quinn::{Connection, Endpoint, VarInt};
use tokio::sync::OnceCell;
use wasmbed_config::ProxyConfig;

use crate::balancer::Gateway;
use crate::events::Counted;
use crate::tls::Upstream;
use home::Home;

mod home;

/// The link's ALPN protocol (the gateway's `wasmbed_gateway::link::ALPN`).
pub const ALPN: &[u8] = b"wasmbed-link/1";
/// Close code when the proxy drops a link (gateway removed, proxy stopping).
const GONE: u32 = 0;
/// Receive window per stream (gateway to proxy): a frame (64 KiB at most) and its header.
const STREAM_WINDOW: u32 = 128 << 10;
/// Receive window per link, shared by its streams.
const LINK_WINDOW: u32 = 16 << 20;

/// A link made, and the gateway it is watched for ([`watch`]): the last one that opened a
/// stream on it. A gateway replaced at the same address (a reload that changed its health
/// address or pool) is a new object whose sessions ride the same link; watching the first
/// object would close the link once that one is gone, and move every session again.
#[derive(Clone)]
struct Made {
    conn: Connection,
    watched: Watched,
    /// The trust it was made with: a reload that changes `[upstream_tls]` makes it stale.
    trust: Arc<Trust>,
    /// Its streams open now ([`LinkStream`]).
    streams: Arc<AtomicUsize>,
    /// The time the gateway's certificate was checked good for ([`current`]).
    valid: Option<wasmbed_certs::Validity>,
}

/// Whether a link's check of its gateway's certificate (made at its handshake) still holds:
/// past the certificate's `notAfter` the link takes no new session, as a full handshake
/// would refuse the certificate; the next session makes a new link, which checks the
/// certificate the gateway presents then (renewed, or refused as expired). Its sessions keep
/// it until they end, as TCP sessions keep theirs. A certificate whose validity cannot be
/// read (its handshake passed it) holds for the link's life, as before there was a check.
fn current(valid: Option<wasmbed_certs::Validity>) -> bool {
    valid.is_none_or(|v| v.holds_now())
}

/// The validity of the gateway's certificate as the link's handshake left it: the one
/// presented, or, for a resumed session, the one its first handshake checked (a resumption
/// shows no certificate, and rustls, as TLS means it, does not check that one again).
fn validity(conn: &Connection) -> Option<wasmbed_certs::Validity> {
    let chain = conn.peer_identity()?;
    let chain = chain
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    wasmbed_certs::Validity::of_leaf(&chain)
}

/// What links are made with: the QUIC client settings from `[upstream_tls]`, and a
/// fingerprint of what they were read from (the files' bytes and the server name). A reload
/// that changes them makes every link stale, as a TCP session's TLS is made anew for each
/// session: new sessions and moves get a link made with the new trust, and a stale link is
/// closed once its last stream ends (its sessions keep theirs, as TCP sessions do). One that
/// changes nothing replaces no link.
pub(crate) struct Trust {
    client: quinn::ClientConfig,
    /// The same, resuming no TLS session: a link made again when its resumption brought back
    /// a gateway's certificate that has run out since ([`current`]).
    full: quinn::ClientConfig,
    fingerprint: u64,
}

/// A session's stream on a link, counted while it lives (a stale link closes at none).
struct LinkStream {
    inner: tokio::io::Join<quinn::RecvStream, quinn::SendStream>,
    _counted: Counted,
}

impl tokio::io::AsyncRead for LinkStream {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for LinkStream {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

type Watched = Arc<Mutex<std::sync::Weak<Gateway>>>;

/// Why a link could not be made, kept for every session that waited on the attempt (each
/// gets it as its own error).
#[derive(Clone)]
enum Failed {
    /// quinn's (a TLS alert among them: `failures::is_tls_failure` reads it).
    Connection(quinn::ConnectionError),
    Other(io::ErrorKind, String),
}

impl Failed {
    fn error(&self) -> io::Error {
        match self {
            Failed::Connection(e) => io::Error::other(e.clone()),
            Failed::Other(kind, text) => io::Error::new(*kind, text.clone()),
        }
    }
}

impl From<io::Error> for Failed {
    fn from(e: io::Error) -> Failed {
        Failed::Other(e.kind(), e.to_string())
    }
}

/// One attempt at a link, and what came of it: the sessions that arrive while it runs wait
/// for it, and share its outcome, a failure too (each trying again in turn would hold the
/// k-th up to k connect timeouts, with its lease).
type Cell = Arc<OnceCell<Result<Made, Failed>>>;
/// The links by gateway address. An entry lives as long as its link: a closed connection
/// kept here would keep all of quinn's state of it (every stream's buffers, sent packets),
/// hundreds of kilobytes per gateway ever linked, since gateways come and go by address.
type Conns = Arc<Mutex<HashMap<String, Cell>>>;

/// The links of one proxy: a [`Lane`] per runtime that serves sessions.
pub struct Links {
    /// The main runtime's first when it serves sessions that reach gateways (QUIC devices,
    /// or every session without workers), then each session worker's, in the workers' order.
    lanes: Vec<Lane>,
    /// Whether `lanes` starts with the main runtime's.
    main: bool,
    trust: ArcSwap<Trust>,
}

/// The links of the sessions one runtime serves: one client endpoint (one UDP socket) and a
/// connection per gateway address.
struct Lane {
    endpoint: Endpoint,
    conns: Conns,
    /// Where the endpoint runs, and each of its links' own tasks (quinn's connection driver
    /// and its timers, the liveness watch). The stop closes the links before it ends the
    /// workers (`Proxy::run`).
    home: Arc<Home>,
}

impl Lane {
    /// A lane on `home`: its endpoint's socket is registered there and its driver runs there.
    fn on(home: Home) -> Result<Lane, crate::error::ProxyError> {
        let home = Arc::new(home);
        let bind = |addr| {
            let socket = wasmbed_certs::udp::socket(addr)?;
            wasmbed_certs::udp::endpoint_with(socket, None, home.clone())
        };
        // Dual-stack, so that gateways found later (DNS: A or AAAA) are reachable whatever
        // their family; IPv4 alone on a host without IPv6.
        let v6: SocketAddr = (std::net::Ipv6Addr::UNSPECIFIED, 0).into();
        let v4: SocketAddr = (std::net::Ipv4Addr::UNSPECIFIED, 0).into();
        let endpoint =
            bind(v6)
                .or_else(|_| bind(v4))
                .map_err(|source| crate::error::ProxyError::Bind {
                    what: "link (QUIC client socket)",
                    addr: v4,
                    source,
                })?;
        Ok(Lane {
            endpoint,
            conns: Conns::default(),
            home,
        })
    }

    /// Live links.
    fn live(&self) -> usize {
        locked(&self.conns)
            .values()
            .filter(|c| {
                c.get()
                    .is_some_and(|r| r.as_ref().is_ok_and(|m| m.conn.close_reason().is_none()))
            })
            .count()
    }
}

/// The QUIC client settings from `[upstream_tls]` and `--link-timeout`, with their
/// fingerprint ([`Trust`]).
pub(crate) fn client_config(config: &ProxyConfig) -> Result<Trust, crate::error::ProxyError> {
    // Read before the files are loaded for the client: a rotation landing in between leaves
    // the fingerprint older than the client, and the next reload replaces the links again,
    // never the other way round (links kept on old trust).
    let fingerprint = fingerprint(config);
    let tls = crate::tls::upstream_client_config(config)?.ok_or_else(|| {
        crate::error::ProxyError::Reload("--upstream link needs [upstream_tls]".into())
    })?;
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    // No 0-RTT on the link: its first bytes carry HELLO and DATA, which must not be replayable.
    tls.enable_early_data = false;
    let mut full = tls.clone();
    full.resumption = rustls::client::Resumption::disabled();
    let quic = |tls: rustls::ClientConfig| {
        QuicClientConfig::try_from(Arc::new(tls))
            .map(|crypto| quinn::ClientConfig::new(Arc::new(crypto)))
            .map_err(|e| crate::error::ProxyError::Reload(format!("link TLS: {e}")))
    };
    let (mut client, mut full) = (quic(tls)?, quic(full)?);
    let timeout = config.link_timeout;
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(VarInt::from_u32(0))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .stream_receive_window(VarInt::from_u32(STREAM_WINDOW))
        .receive_window(VarInt::from_u32(LINK_WINDOW))
        .send_window(u64::from(LINK_WINDOW))
        .keep_alive_interval(Some(timeout / 4))
        .max_idle_timeout(quinn::IdleTimeout::try_from(timeout).ok());
    let transport = Arc::new(transport);
    client.transport_config(transport.clone());
    full.transport_config(transport);
    Ok(Trust {
        client,
        full,
        fingerprint,
    })
}

/// What `[upstream_tls]` says, read again: its server name and its files' bytes (a file that
/// cannot be read counts as empty; `client_config` has just read it, so its error would
/// have been the reload's).
fn fingerprint(config: &ProxyConfig) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    if let Some(up) = &config.upstream_tls {
        up.server_name.hash(&mut h);
        let files = std::iter::once(&up.ca).chain(up.client.iter().flat_map(|(c, k)| [c, k]));
        for path in files {
            std::fs::read(path).unwrap_or_default().hash(&mut h);
        }
    }
    h.finish()
}

impl Links {
    /// The links of `config`, when it says `--upstream link`: a lane on each of `workers`,
    /// and one on the current runtime (the main one) when sessions run there: without
    /// workers, or with QUIC devices (each lane holds a UDP socket and quinn's receive buffer,
    /// so none is made that no session would use).
    pub(crate) fn new(
        config: &ProxyConfig,
        workers: Option<&crate::workers::Workers>,
    ) -> Result<Option<Arc<Links>>, crate::error::ProxyError> {
        if config.upstream != wasmbed_config::proxy::UpstreamMode::Link {
            return Ok(None);
        }
        let client = client_config(config)?;
        let main = workers.is_none() || config.quic.listen.is_some();
        let on_main = || Home {
            handle: tokio::runtime::Handle::current(),
            others: None,
        };
        let on_workers = workers.into_iter().flat_map(|w| w.homes());
        let homes = main
            .then(on_main)
            .into_iter()
            .chain(on_workers.map(|(handle, others)| Home {
                handle,
                others: Some(others),
            }));
        let lanes = homes.map(Lane::on).collect::<Result<Vec<_>, _>>()?;
        Ok(Some(Arc::new(Links {
            lanes,
            main,
            trust: ArcSwap::from_pointee(client),
        })))
    }

    /// The lane of the sessions this thread serves: its worker's, or the main runtime's
    /// (or, were there none, the first: a session there would still reach its gateway).
    fn lane(&self) -> &Lane {
        let worker =
            crate::workers::current().and_then(|w| self.lanes.get(w + usize::from(self.main)));
        // Every session that reaches a gateway runs on a worker or, when the main runtime
        // has a lane, there: a session elsewhere would cross threads at every frame.
        debug_assert!(
            worker.is_some() || self.main,
            "a link opened off the workers with no main-runtime lane"
        );
        // `lanes` is never empty: `new` makes the main runtime's, or there are workers.
        worker.unwrap_or(&self.lanes[0])
    }

    /// A reload's trust: if it changed anything, new links use it and every link made before
    /// is stale ([`Trust`]); if not, nothing changes.
    pub(crate) fn set_trust(&self, trust: Trust) {
        if trust.fingerprint != self.trust.load().fingerprint {
            self.trust.store(Arc::new(trust));
        }
    }

    /// Opens a session's stream on the link to `gateway`, making the link if there is none.
    /// The stream within `connect_timeout` too: a gateway at its `--max-sessions` gives its
    /// links no more streams until one ends (over TCP it answers ERROR `unavailable` at once),
    /// and a session waiting for one would hold its lease unbounded; timed out, the next
    /// gateway is tried (not counted against this one's health: full is not down). A link
    /// that could not be made was counted against the gateway by its attempt, once.
    pub(crate) async fn open(
        self: &Arc<Self>,
        config: &ProxyConfig,
        gateway: &Arc<Gateway>,
    ) -> io::Result<Box<dyn Upstream>> {
        let made = self.connection(config, gateway).await?;
        // Counted from before its open is awaited (a stale link is not closed under a stream
        // opening) to its drop, whichever way the open ends.
        let counted = Counted::new(&made.streams);
        match tokio::time::timeout(config.connect_timeout, made.conn.open_bi()).await {
            Ok(Ok((send, recv))) => Ok(Box::new(LinkStream {
                inner: tokio::io::join(recv, send),
                _counted: counted,
            })),
            // Not counted against the gateway: a link lost is its watch's to report, and a
            // gateway full is not down.
            Ok(Err(e)) => Err(io::Error::other(e)),
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "no stream on the link in time",
            )),
        }
    }

    /// The live link to `gateway`, made now if needed (one attempt at a time per gateway:
    /// sessions arriving meanwhile wait for it, and share its outcome).
    async fn connection(
        self: &Arc<Self>,
        config: &ProxyConfig,
        gateway: &Arc<Gateway>,
    ) -> io::Result<Made> {
        let lane = self.lane();
        let cell = {
            let mut conns = locked(&lane.conns);
            let cell = conns.entry(gateway.addr.clone()).or_default();
            // A link closed or stale (trust replaced, or its gateway's certificate out of
            // date), or an attempt that failed: a new attempt.
            let trust = self.trust.load();
            let ended = |r: &Result<Made, Failed>| {
                r.as_ref().map_or(true, |m| {
                    m.conn.close_reason().is_some()
                        || !Arc::ptr_eq(&m.trust, &trust)
                        || !current(m.valid)
                })
            };
            if cell.get().is_some_and(ended) {
                *cell = Cell::default();
            }
            cell.clone()
        };
        let made = cell
            .get_or_init(|| self.connect(lane, config, gateway, Arc::downgrade(&cell)))
            .await
            .clone();
        let made = match made {
            Ok(made) => made,
            Err(failed) => {
                // No link made: no entry kept for it (an address that never answers, found
                // in DNS and gone again, would stay forever), unless a newer attempt has
                // taken the address.
                forget(&lane.conns, &gateway.addr, |c| Arc::ptr_eq(c, &cell));
                return Err(failed.error());
            }
        };
        // Watched for the gateway object that opens streams on it now (see [`Made`]).
        let mut watched = made.watched.lock().unwrap_or_else(|e| e.into_inner());
        if !std::ptr::eq(watched.as_ptr(), Arc::as_ptr(gateway)) {
            *watched = Arc::downgrade(gateway);
        }
        drop(watched);
        Ok(made)
    }

    /// Makes the link to `gateway` on `lane` for `cell` (the lane's entry it will be stored
    /// in).
    async fn connect(
        self: &Arc<Self>,
        lane: &Lane,
        config: &ProxyConfig,
        gateway: &Arc<Gateway>,
        cell: std::sync::Weak<OnceCell<Result<Made, Failed>>>,
    ) -> Result<Made, Failed> {
        let started = Instant::now();
        let trust = self.trust.load_full();
        // One `connect_timeout` for the link, a second attempt without resumption included.
        let deadline = tokio::time::Instant::now() + config.connect_timeout;
        let attempt = |client: &quinn::ClientConfig| {
            let client = client.clone();
            let attempt = async move {
                let addrs = crate::dial::addresses(&gateway.addr).await?;
                let name = crate::tls::upstream_name(config, &gateway.addr);
                let name = name.to_str();
                // Each of a name's addresses in turn, staggered: a UDP port nothing listens
                // at draws no refusal quinn reports, and would hold the link to its timeout.
                let stagger = (crate::dial::NEXT_ADDRESS_AFTER, tokio::time::sleep);
                crate::dial::first_to_answer(addrs, stagger, |addr| {
                    // The connection's driver is spawned on the lane's runtime (`Home`).
                    let connecting = lane
                        .endpoint
                        .connect_with(client.clone(), addr, &name)
                        .map_err(io::Error::other);
                    async move { connecting?.await.map_err(Failed::Connection) }
                })
                .await
            };
            async move {
                tokio::time::timeout_at(deadline, attempt)
                    .await
                    .unwrap_or_else(|_| {
                        Err(Failed::Other(
                            io::ErrorKind::TimedOut,
                            "link timed out".into(),
                        ))
                    })
            }
        };
        let mut made = attempt(&trust.client).await;
        if let Ok(resumed) = &made
            && !current(validity(resumed))
        {
            // Resumed on a session whose gateway certificate has run out since: made again
            // with a full handshake, which checks the certificate the gateway presents now.
            resumed.close(VarInt::from_u32(GONE), b"resumed past the certificate");
            made = attempt(&trust.full).await;
        }
        let conn = match made {
            Ok(c) => c,
            Err(e) => {
                counter!(crate::metric_names::LINKS, "result" => "failed").increment(1);
                let error = e.error();
                tracing::warn!(gateway = %gateway.name, %error, "link to the gateway failed");
                // Counted against the gateway once for the attempt, not once for each session
                // that waited on it (one failure would pass `fall` for a crowd).
                crate::failures::failed(config, gateway, &error);
                return Err(e);
            }
        };
        counter!(crate::metric_names::LINKS, "result" => "up").increment(1);
        tracing::info!(gateway = %gateway.name, took = ?started.elapsed(), "link up");
        let (conns, addr) = (Arc::downgrade(&lane.conns), gateway.addr.clone());
        let watched: Watched = Arc::new(Mutex::new(Arc::downgrade(gateway)));
        let streams = Arc::new(AtomicUsize::new(0));
        let valid = validity(&conn);
        let stale = {
            let (links, made_with) = (Arc::downgrade(self), Arc::downgrade(&trust));
            let streams = streams.clone();
            // Stale and carrying no stream: closed (or the proxy's links gone).
            move || {
                let replaced = links.upgrade().is_none_or(|l| {
                    !std::ptr::eq(Arc::as_ptr(&l.trust.load()), made_with.as_ptr())
                });
                (replaced || !current(valid)) && streams.load(Ordering::Acquire) == 0
            }
        };
        let watching = watch(conn.clone(), watched.clone(), config.link_timeout, stale);
        lane.home.spawn_task(async move {
            watching.await;
            // Closed: its entry goes, unless a newer link to the address has taken it (a new
            // link always gets a new cell). By the cell, not the connection in it: a link
            // closed before it was stored in its cell is forgotten too.
            if let Some(conns) = conns.upgrade() {
                forget(&conns, &addr, |c| {
                    std::ptr::eq(Arc::as_ptr(c), cell.as_ptr())
                });
            }
        });
        Ok(Made {
            conn,
            watched,
            trust,
            streams,
            valid,
        })
    }

    /// Links held: open, being made, or closed and not yet forgotten (for tests and
    /// embedding programs; [`Links::live`] counts the open ones).
    pub fn held(&self) -> usize {
        let held = |l: &Lane| locked(&l.conns).len();
        self.lanes.iter().map(held).sum()
    }

    /// Live links (for tests and embedding programs).
    pub fn live(&self) -> usize {
        self.lanes.iter().map(Lane::live).sum()
    }

    /// Lanes made: one per session worker, and the main runtime's when sessions run there
    /// (for tests and embedding programs).
    pub fn lanes(&self) -> usize {
        self.lanes.len()
    }

    /// Live links by lane: the main runtime's (0 when it has none), then each session
    /// worker's (for tests and embedding programs).
    pub fn live_by_lane(&self) -> Vec<usize> {
        let none = (!self.main).then_some(0);
        none.into_iter()
            .chain(self.lanes.iter().map(Lane::live))
            .collect()
    }

    /// Closes every link and waits (bounded) until the gateways know.
    pub(crate) async fn close(&self) {
        for lane in &self.lanes {
            lane.endpoint
                .close(VarInt::from_u32(GONE), b"proxy stopping");
        }
        // Each endpoint's driver runs on its own runtime: they finish together.
        let idle = async {
            for lane in &self.lanes {
                lane.endpoint.wait_idle().await;
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), idle).await;
    }
}

/// A lane's map of links, locked (a panic while it was held left no half-made entry: every
/// change to it is one insert or remove).
fn locked(
    conns: &Mutex<HashMap<String, Cell>>,
) -> std::sync::MutexGuard<'_, HashMap<String, Cell>> {
    conns.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes the entry for `addr` when `which` says it is the one to remove.
fn forget(conns: &Mutex<HashMap<String, Cell>>, addr: &str, which: impl Fn(&Cell) -> bool) {
    let mut conns = locked(conns);
    if conns.get(addr).is_some_and(which) {
        conns.remove(addr);
    }
}

/// Watches a link: when it is lost, says so and has its gateway probed (its sessions move by
/// themselves: their streams fail). When health checks mark the gateway down, checks the
/// link's UDP port at once ([`port_closed`]): a closed port means the gateway's process is
/// gone, and the link is closed then instead of after `--link-timeout` of silence. Once the
/// gateway it is watched for (the last object that opened a stream on it: [`Made`]) has left
/// the set, and its last session with it, the link is closed.
async fn watch(conn: Connection, watched: Watched, every: Duration, stale: impl Fn() -> bool) {
    let gateway = || watched.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let lost = |why: &dyn std::fmt::Display| {
        counter!(crate::metric_names::LINKS, "result" => "lost").increment(1);
        if let Some(g) = gateway().upgrade() {
            tracing::warn!(gateway = %g.name, reason = %why, "link lost: its sessions move");
            g.suspect();
        }
    };
    loop {
        let down = gateway().upgrade().and_then(|g| g.cut_trigger());
        let marked_down = async {
            match &down {
                Some(cut) => cut.fired().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            reason = conn.closed() => {
                if !matches!(reason, quinn::ConnectionError::LocallyClosed) {
                    lost(&reason);
                }
                return;
            }
            _ = marked_down => {
                if port_closed(conn.remote_address()).await {
                    lost(&"the gateway's link port is closed");
                    conn.close(VarInt::from_u32(GONE), b"gateway gone");
                    return;
                }
                tokio::time::sleep(every).await;
            }
            _ = tokio::time::sleep(every) => {
                if gateway().strong_count() == 0 {
                    conn.close(VarInt::from_u32(GONE), b"gateway removed");
                    return;
                }
                if stale() {
                    counter!(crate::metric_names::LINKS, "result" => "replaced").increment(1);
                    conn.close(VarInt::from_u32(GONE), b"replaced: new trust, or the certificate out of date");
                    return;
                }
            }
        }
    }
}

/// Whether nothing listens on UDP `addr`: one datagram (a byte, which a QUIC endpoint
/// drops unread) from a connected socket, and the ICMP "port unreachable" it draws back as
/// ECONNREFUSED within 200 ms. No answer proves nothing (a firewall, a busy host): `false`.
async fn port_closed(addr: SocketAddr) -> bool {
    let bind: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(bind).await else {
        return false;
    };
    if socket.connect(addr).await.is_err() || socket.send(&[0]).await.is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    let answer = tokio::time::timeout(Duration::from_millis(200), socket.recv(&mut buf)).await;
    matches!(answer, Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused)
}
