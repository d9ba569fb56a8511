//! anchor: a terminate-mode session, held by the proxy so that it can move between gateways.
//!
//! The proxy decodes the session's frames both ways and keeps what a move needs: the device's
//! HELLO, the latest CHECKPOINT ticket (absorbed; passed on only with
//! `--forward-checkpoints`), and the DATA not covered by that ticket (the replay window). When
//! the gateway closes without GOAWAY, resets, is marked down, sends garbage, says GOAWAY, or
//! is drained or rebalanced by moving, the session moves: a lease on another gateway, HELLO
//! with the device's identity and the ticket, WELCOME `resumed`, the window replayed above
//! the resumed sequence, answers the device already has dropped by sequence. The device keeps
//! its one TLS connection and sees every answer exactly once.
//!
//! I/O is one task per session: a `select!` over the four half-streams (each write and read
//! cancel-safe), the gateway's down token, its move orders, a paced move, and a move in
//! progress. Per session the proxy holds the frames of the window (bounded by
//! `--replay-window`: past it, the device is not read) and the ticket.

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metrics::counter;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};
use tokio_util::sync::CancellationToken;
use wasmbed_protocol::codec::{CodecError, FrameCodec};
use wasmbed_protocol::{Checkpoint, DEFAULT_MAX_FRAME, ErrorCode, Frame, Hello, Kind, Welcome};

use crate::balancer::{Gateway, Lease};
use crate::metrics::{MOVES, REVOKED, SESSIONS_CANCELLED, UPSTREAM_HANDSHAKES};
use crate::session::{Context, Upstream};

/// The device's TLS stream.
pub(crate) type Device = tokio_rustls::server::TlsStream<TcpStream>;

/// A device's connection, decrypted: TLS over TCP, or a QUIC stream.
pub(crate) trait DeviceStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
    /// Ends the connection abruptly (a shutdown's cut): the device reconnects at once.
    fn cut(&self);

    /// Sends `last` (what the device is owed: an ERROR, answers), then closes in order,
    /// within `within`: the one way every transport ends a session it does not cut, so a
    /// refusal's ERROR reaches the device before the close on each of them.
    fn goodbye<'a>(&'a mut self, last: &'a [u8], how: Close, within: Duration) -> Goodbye<'a>;
}

/// How a session ends in order (QUIC says which in its close code: [`crate::quic`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Close {
    /// The session ended (the device left, or the gateway ended it and said why).
    Done,
    /// The proxy refused the session or ended it for cause; an ERROR frame says why.
    Refused,
}

/// The future of [`DeviceStream::goodbye`].
pub(crate) type Goodbye<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl DeviceStream for Device {
    fn cut(&self) {
        crate::listener::reset_on_close(self.get_ref().0);
    }

    /// TLS over TCP: the bytes, `close_notify` and FIN (the kernel sends what is queued
    /// before the FIN).
    fn goodbye<'a>(&'a mut self, last: &'a [u8], _how: Close, within: Duration) -> Goodbye<'a> {
        Box::pin(async move {
            let bye = async {
                self.write_all(last).await?;
                self.shutdown().await
            };
            let _ = tokio::time::timeout(within, bye).await;
        })
    }
}

/// The device's side of a session: its TLS stream and its certificate's serial number (for
/// revocation at a CRL reload).
pub(crate) struct DeviceSide {
    /// Boxed: an async fn keeps its arguments in its future for its whole life, and a TLS
    /// stream is over a kilobyte.
    pub tls: Box<dyn DeviceStream>,
    pub serial: Option<Vec<u8>>,
    /// For a PROXY protocol header on each link, where the gateway's pool wants one.
    pub origin: crate::proxy_protocol::Origin,
}

/// Bytes queued for one side past which the other side is not read.
const HIGH_WATER: usize = 256 * 1024;
/// PINGs of a device waiting for the gateway's PONG; past it the proxy answers them itself.
const MAX_PINGS: usize = 8;
/// Between two rounds over every gateway while a session waits for one to take it.
const RETRY_EVERY: Duration = Duration::from_millis(100);
/// How long a link whose gateway was marked down has to answer the proxy's PING before the
/// session moves; while the gateway stays down, the link is checked again this often.
pub const LINK_CHECK: Duration = Duration::from_secs(1);
/// The sequence of the proxy's own PINGs on a link (not forwarded: the PONG is the proxy's).
const PROBE_SEQ: u64 = u64::MAX;

/// Why a session moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The gateway closed or reset without GOAWAY, sent garbage, or was marked down.
    Failover,
    /// The gateway said GOAWAY.
    Goaway,
    /// `drain?move=true`.
    Drain,
    /// Rebalancing (`--rebalance on`).
    Rebalance,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Failover => "failover",
            Cause::Goaway => "goaway",
            Cause::Drain => "drain",
            Cause::Rebalance => "rebalance",
        }
    }

    /// Whether the move takes its `--move-rate` slot when it starts relinking. Every cause but
    /// failover is paced (a dead gateway's sessions go now); a drained or rebalanced session
    /// took its slot before it let go of its link (which stays up meanwhile), so only a
    /// GOAWAY's move takes one here.
    fn slot_at_relink(self) -> bool {
        self == Cause::Goaway
    }
}

/// Spaces moves at `--move-rate`: each takes the next free slot.
pub struct Pacer {
    /// The next free slot, and the gap between two slots.
    state: Mutex<(Instant, Duration)>,
}

impl Pacer {
    pub fn new(per_second: u32) -> Pacer {
        Pacer {
            state: Mutex::new((Instant::now(), Self::gap(per_second))),
        }
    }

    fn gap(per_second: u32) -> Duration {
        Duration::from_secs(1) / per_second.max(1)
    }

    /// Changes the rate (a config reload); slots already handed out stay.
    pub fn set_rate(&self, per_second: u32) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.1 = Self::gap(per_second);
    }

    /// The instant this move may start.
    pub fn slot(&self) -> Instant {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let slot = state.0.max(Instant::now());
        state.0 = slot + state.1;
        slot
    }
}

/// A session's connection to its gateway (the seam a multiplexed link will replace).
pub(crate) struct Link {
    lease: Lease,
    read: ReadHalf<Box<dyn Upstream>>,
    write: WriteHalf<Box<dyn Upstream>>,
    /// Cancelled when the gateway goes down (`None`: not watched, while the link is checked
    /// by PINGs instead).
    down: Option<CancellationToken>,
    /// The link's own check after its gateway was marked down.
    probe: Probe,
    orders: tokio::sync::watch::Receiver<u64>,
    /// Bytes written since the last flush.
    dirty: bool,
}

impl Link {
    pub(crate) fn new(lease: Lease, up: Box<dyn Upstream>) -> Link {
        let gateway = lease.gateway().clone();
        gateway.sessions_started.increment(1);
        tracing::Span::current().record("gateway", gateway.name.as_str());
        let (read, write) = tokio::io::split(up);
        let mut orders = gateway.move_orders();
        orders.mark_unchanged();
        Link {
            down: gateway.session_token(),
            probe: Probe::Idle,
            orders,
            lease,
            read,
            write,
            dirty: false,
        }
    }

    fn gateway(&self) -> &Arc<Gateway> {
        self.lease.gateway()
    }
}

/// A link's check after its gateway was marked down. Health checks judge a gateway from
/// outside, and on an overloaded host they time out on gateways that still serve: moving
/// every session of each gateway a probe timed out on would feed the overload (a storm of
/// moves, then of more timeouts). So a session first asks its own link: a PING the gateway
/// answers within [`LINK_CHECK`] keeps the session where it is; no answer moves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    /// The gateway is up (the down token is watched).
    Idle,
    /// A PING is out; no PONG by then: move.
    Waiting(Instant),
    /// The PONG came and the gateway is still marked down: check again then.
    Next(Instant),
}

/// A gateway that took a moved session.
struct Relinked {
    link: Link,
    welcome: Welcome,
    /// What the gateway sent after WELCOME.
    rest: BytesMut,
}

type Moving = Pin<Box<dyn Future<Output = Option<Relinked>> + Send>>;

/// How a session ended.
enum End {
    /// Closed in order (the device left, or the gateway ended the session and said why).
    Closed,
    /// The device gets this ERROR, then the close.
    Refuse(Frame),
    /// The proxy cut the session (shutdown): the device's connection is reset.
    Cut,
}

/// What the proxy keeps of one session.
struct State {
    ctx: Arc<Context>,
    /// The pools the session may go to, in order (a route's pool, its fallbacks, default).
    pools: Vec<String>,
    hello: Hello,
    /// The latest ticket and the DATA it covers.
    ticket: Option<Vec<u8>>,
    covered: u64,
    /// DATA sent by the device above `covered` (or, with no ticket, not answered yet).
    window: VecDeque<Frame>,
    window_bytes: usize,
    /// The last DATA the device sent, the last it got an answer to.
    sent: u64,
    /// The last DATA handed to the current (or last) gateway.
    forwarded: u64,
    delivered: u64,
    /// The last PUSH the device got; a fresh session's pushes are numbered on from it.
    pushed: u64,
    push_offset: u64,
    /// The device's PINGs the gateway has not answered yet.
    pings: Vec<u64>,
    moved_at: Option<Instant>,
    /// When the current move started (the old gateway found lost, or the move's turn came).
    move_started: Instant,
    to_device: BytesMut,
    to_gateway: BytesMut,
    from_device: BytesMut,
    from_gateway: BytesMut,
    device_codec: FrameCodec,
    gateway_codec: FrameCodec,
    /// The device closed its side: the session ends once its DATA are answered.
    device_done: bool,
    linked: bool,
    going: bool,
    /// Why the session is moving (or last moved).
    cause: Option<Cause>,
    /// Where the device comes from (PROXY protocol headers on new links).
    origin: Arc<crate::proxy_protocol::Origin>,
    /// The proxy's PING is out on the link; its PONG came.
    probing: bool,
    probe_answered: bool,
}

/// Bytes one read takes, through a buffer on the stack ([`read_into`]).
const READ_CHUNK: usize = 16 << 10;

/// Frees a buffer once it is empty: an idle session (most sessions, most of the time) then
/// holds no buffer at all; reads go through the stack ([`read_into`]).
fn trim(buf: &mut BytesMut) {
    if buf.is_empty() && buf.capacity() > 0 {
        *buf = BytesMut::new();
    }
}

/// Reads what is there into `buf` through a buffer on the stack, so that `buf` is allocated
/// only while it holds bytes (a partial frame, or frames not yet handled). Cancel-safe: bytes
/// read are in `buf` before the poll returns.
async fn read_into<R: AsyncRead + Unpin + ?Sized>(
    r: &mut R,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        // Uninitialized: zeroing 16 KiB on every read would cost more than the read.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut read = ReadBuf::uninit(&mut chunk);
        std::task::ready!(Pin::new(&mut *r).poll_read(cx, &mut read))?;
        buf.extend_from_slice(read.filled());
        std::task::Poll::Ready(Ok(read.filled().len()))
    })
    .await
}

/// Appends `frame`'s encoding (the protocol codec's). Every frame here was decoded under the
/// same maximum, or is a small one the proxy made, so the encoder's size check cannot fail.
fn put(dst: &mut BytesMut, frame: &Frame) {
    let _ = FrameCodec::new(DEFAULT_MAX_FRAME).encode(frame, dst);
}

fn frame_size(frame: &Frame) -> usize {
    wasmbed_protocol::PREFIX + wasmbed_protocol::HEADER + frame.body.len()
}

/// What the gateway's frames asked for.
enum Verdict {
    Go,
    /// Drop this upstream and move.
    Move(Cause),
    End(End),
}

impl State {
    fn limit(&self) -> usize {
        self.ctx.config.migration.replay_window
    }

    /// Handles the device's buffered frames.
    fn on_device_frames(&mut self) -> Result<(), End> {
        loop {
            let frame = match self.device_codec.decode(&mut self.from_device) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(CodecError::Protocol(e)) => {
                    return Err(End::Refuse(e.code().frame(0, e.to_string())));
                }
                Err(CodecError::Io(_)) => return Err(End::Closed),
            };
            let open = self.linked && !self.going;
            match frame.kind {
                Kind::Data => {
                    if frame.seq <= self.sent {
                        let text = format!(
                            "DATA {} after DATA {}: sequences must increase",
                            frame.seq, self.sent
                        );
                        return Err(End::Refuse(ErrorCode::BadFrame.frame(frame.seq, text)));
                    }
                    self.sent = frame.seq;
                    if open {
                        put(&mut self.to_gateway, &frame);
                        self.forwarded = frame.seq;
                    }
                    self.window_bytes += frame_size(&frame);
                    self.window.push_back(frame);
                }
                Kind::Ping if open && self.pings.len() < MAX_PINGS => {
                    self.pings.push(frame.seq);
                    put(&mut self.to_gateway, &frame);
                }
                Kind::Ping => put(&mut self.to_device, &Frame::new(Kind::Pong, frame.seq, [])),
                Kind::Pong if open => put(&mut self.to_gateway, &frame),
                Kind::Pong => {}
                Kind::Hello => {
                    let text = "HELLO sent twice".to_string();
                    return Err(End::Refuse(ErrorCode::BadHello.frame(frame.seq, text)));
                }
                other => {
                    let text = format!("a device may not send {}", other.as_str());
                    return Err(End::Refuse(ErrorCode::BadFrame.frame(frame.seq, text)));
                }
            }
        }
    }

    /// Handles the gateway's buffered frames.
    fn on_gateway_frames(&mut self) -> Verdict {
        loop {
            let frame = match self.gateway_codec.decode(&mut self.from_gateway) {
                Ok(Some(f)) => f,
                Ok(None) => return Verdict::Go,
                Err(e) => {
                    tracing::debug!(error = %e, "the gateway sent a bad frame: moving");
                    return Verdict::Move(Cause::Failover);
                }
            };
            match frame.kind {
                // An answer to DATA the device never sent would make later real answers look
                // like duplicates: that gateway is not believed.
                Kind::Reply | Kind::Error if frame.seq > self.sent => {
                    tracing::debug!(
                        seq = frame.seq,
                        sent = self.sent,
                        "the gateway answered DATA never sent: moving"
                    );
                    return Verdict::Move(Cause::Failover);
                }
                Kind::Reply | Kind::Error if frame.seq > 0 => {
                    if frame.seq > self.delivered {
                        self.delivered = frame.seq;
                        put(&mut self.to_device, &frame);
                        self.prune();
                    } else {
                        self.ctx.meters.duplicates.increment(1);
                    }
                }
                // The gateway ended the session (too many traps, idle): the device is told.
                Kind::Error => {
                    put(&mut self.to_device, &frame);
                    return Verdict::End(End::Closed);
                }
                Kind::Push => {
                    let seq = frame.seq + self.push_offset;
                    if seq > self.pushed {
                        self.pushed = seq;
                        put(
                            &mut self.to_device,
                            &Frame::new(Kind::Push, seq, frame.body),
                        );
                    } else {
                        self.ctx.meters.duplicates.increment(1);
                    }
                }
                Kind::Pong if frame.seq == PROBE_SEQ && self.probing => {
                    self.probing = false;
                    self.probe_answered = true;
                }
                Kind::Pong => {
                    self.pings.retain(|&s| s != frame.seq);
                    put(&mut self.to_device, &frame);
                }
                Kind::Ping => put(&mut self.to_device, &frame),
                // A ticket claiming DATA not answered yet would prune DATA still owed an answer.
                Kind::Checkpoint if frame.seq > self.delivered => {
                    tracing::debug!(
                        seq = frame.seq,
                        delivered = self.delivered,
                        "CHECKPOINT beyond the answers: moving"
                    );
                    return Verdict::Move(Cause::Failover);
                }
                Kind::Checkpoint => match frame.decode_body::<Checkpoint>("CHECKPOINT") {
                    Ok(c) => {
                        if self.ctx.config.migration.forward_checkpoints {
                            put(&mut self.to_device, &frame);
                        }
                        self.ticket = Some(c.ticket.into_vec());
                        self.covered = frame.seq;
                        self.prune();
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "bad CHECKPOINT from the gateway: moving");
                        return Verdict::Move(Cause::Failover);
                    }
                },
                Kind::Goaway => self.going = true,
                other => {
                    tracing::debug!(
                        kind = other.as_str(),
                        "the gateway sent a frame it may not send: moving"
                    );
                    return Verdict::Move(Cause::Failover);
                }
            }
        }
    }

    /// Drops the DATA a move would not replay: covered by the ticket, or (with no ticket)
    /// answered. A window full of answered DATA that no checkpoint covers would never drain:
    /// the ticket goes (a later move starts the app afresh), counted.
    fn prune(&mut self) {
        let floor = if self.ticket.is_some() {
            self.covered
        } else {
            self.delivered
        };
        while self.window.front().is_some_and(|f| f.seq <= floor) {
            self.drop_front();
        }
        let all_answered = self.window.back().is_none_or(|f| f.seq <= self.delivered);
        if self.ticket.is_some() && self.window_bytes >= self.limit() && all_answered {
            tracing::debug!("replay window full of answered DATA with no checkpoint");
            self.ctx.meters.overflows.increment(1);
            self.ticket = None;
            self.prune();
        }
    }

    fn drop_front(&mut self) {
        if let Some(f) = self.window.pop_front() {
            self.window_bytes -= frame_size(&f);
        }
    }

    /// The HELLO that moves this session: the device's, with the latest ticket.
    fn resume_hello(&self) -> Vec<u8> {
        let mut hello = self.hello.clone();
        if let Some(t) = &self.ticket {
            hello.resume = Some(serde_bytes::ByteBuf::from(t.clone()));
        } else {
            hello.resume = None;
        }
        Frame::control(Kind::Hello, 0, &hello).encode()
    }

    /// Takes the new gateway: replays what its WELCOME does not cover.
    fn relinked(&mut self, welcome: &Welcome, rest: BytesMut) -> &'static str {
        let (from, result) = match &welcome.resumed {
            Some(r) => (r.seq, "resumed"),
            None => {
                // A new session: the ticket describes nothing there, PUSHes count from 1.
                if let Some(why) = &welcome.resume_refused {
                    tracing::debug!(reason = %why, "the new gateway refused the ticket");
                }
                self.ticket = None;
                self.covered = 0;
                self.push_offset = self.pushed;
                (self.delivered, "fresh")
            }
        };
        let mut replayed = 0;
        for f in self.window.iter().filter(|f| f.seq > from) {
            put(&mut self.to_gateway, f);
            // Sent before to the old gateway: a replay (the rest is new to any gateway).
            replayed += u64::from(f.seq <= self.forwarded);
        }
        self.forwarded = self.sent;
        self.ctx.meters.replayed.increment(replayed);
        self.gateway_codec = FrameCodec::new(DEFAULT_MAX_FRAME);
        self.from_gateway = rest;
        self.linked = true;
        self.going = false;
        self.prune();
        result
    }
}

/// A terminate-mode session whose first link is up and WELCOMEd, ready to be served.
pub(crate) struct Anchored {
    pub ctx: Arc<Context>,
    pub device: DeviceSide,
    pub pools: Vec<String>,
    pub hello: Hello,
    pub link: Link,
    /// The WELCOME, what the gateway sent after it, what the device sent after its HELLO.
    pub first: (Frame, BytesMut, BytesMut),
}

impl Anchored {
    /// Not an async fn itself: a wrapper's future would hold a second copy of the arguments.
    pub(crate) fn serve(self: Box<Self>) -> impl Future<Output = ()> {
        let Anchored {
            ctx,
            device,
            pools,
            hello,
            link,
            first,
        } = *self;
        serve(ctx, device, pools, hello, link, first)
    }
}

/// Serves a terminate-mode session whose first link is up and WELCOMEd: forwards, anchors,
/// moves, until it ends. `first` is the WELCOME (sent to the device first), `rest` what the
/// gateway sent after it, `pending` what the device sent after its HELLO.
async fn serve(
    ctx: Arc<Context>,
    DeviceSide {
        tls: device,
        serial,
        origin,
    }: DeviceSide,
    pools: Vec<String>,
    hello: Hello,
    link: Link,
    (first, rest, pending): (Frame, BytesMut, BytesMut),
) {
    let mut st = State {
        ctx: ctx.clone(),
        pools,
        ticket: None,
        covered: 0,
        window: VecDeque::new(),
        window_bytes: 0,
        sent: 0,
        forwarded: 0,
        delivered: 0,
        pushed: 0,
        push_offset: 0,
        pings: Vec::new(),
        moved_at: None,
        move_started: Instant::now(),
        to_device: BytesMut::new(),
        to_gateway: BytesMut::new(),
        from_device: pending,
        from_gateway: rest,
        device_codec: FrameCodec::new(DEFAULT_MAX_FRAME),
        gateway_codec: FrameCodec::new(DEFAULT_MAX_FRAME),
        device_done: false,
        linked: true,
        going: false,
        cause: None,
        origin: Arc::new(origin),
        probing: false,
        probe_answered: false,
        hello,
    };
    // A device resuming its own session: the ticket stays good until the first checkpoint.
    if let Ok(w) = first.decode_body::<Welcome>("WELCOME")
        && let Some(r) = w.resumed
    {
        st.ticket = st.hello.resume.as_ref().map(|t| t.to_vec());
        (st.covered, st.sent, st.delivered, st.forwarded) = (r.seq, r.seq, r.seq, r.seq);
    }
    put(&mut st.to_device, &first);
    let (mut dev_r, mut dev_w) = tokio::io::split(device);
    let mut reloads = ctx.device_tls.trust.subscribe();
    let mut dev_dirty = false;
    let mut moving: Option<Moving> = None;
    // A paced move's turn, its cause, and its place among the moves in flight.
    let mut move_at: Option<(Instant, Cause, crate::balancer::InFlight)> = None;
    let mut link = Some(link);
    let end = loop {
        if let Err(end) = st.on_device_frames() {
            break end;
        }
        let mut verdict = if link.is_some() {
            st.on_gateway_frames()
        } else {
            Verdict::Go
        };
        if st.device_done && st.delivered >= st.sent && st.pings.is_empty() {
            verdict = Verdict::End(End::Closed);
        }
        match verdict {
            Verdict::Go => {}
            Verdict::End(end) => break end,
            Verdict::Move(cause) => {
                let avoid = unlink(&mut link, true);
                moving = Some(begin_move(&mut st, cause, avoid));
            }
        }
        if std::mem::take(&mut st.probe_answered)
            && let Some(l) = link.as_mut()
        {
            l.probe = Probe::Next(Instant::now() + LINK_CHECK);
        }
        if st.going && !st.pings.is_empty() {
            answer_pings(&mut st);
        }
        let reading_device = !st.device_done
            && st.window_bytes < st.limit()
            && st.to_gateway.len() < HIGH_WATER
            && st.to_device.len() < HIGH_WATER;
        let reading_gateway = link.is_some() && st.to_device.len() < HIGH_WATER;
        for buf in [
            &mut st.from_device,
            &mut st.from_gateway,
            &mut st.to_device,
            &mut st.to_gateway,
        ] {
            trim(buf);
        }
        let writing_gateway = link.is_some() && !st.going;
        let linked = link.is_some();
        let (up_r, up_w, down, orders, up_dirty, probe) = match link.as_mut() {
            Some(l) => (
                Some(&mut l.read),
                Some(&mut l.write),
                l.down.as_ref(),
                Some(&mut l.orders),
                l.dirty,
                l.probe,
            ),
            None => (None, None, None, None, false, Probe::Idle),
        };
        let probe_at = match probe {
            Probe::Idle => None,
            Probe::Waiting(at) | Probe::Next(at) => Some((at, Cause::Failover)),
        };
        let event = tokio::select! {
            biased;
            _ = ctx.hard_stop.cancelled() => Event::HardStop,
            r = send(up_w, &mut st.to_gateway), if writing_gateway && (up_dirty || !st.to_gateway.is_empty()) => Event::GatewaySent(r),
            r = send(Some(&mut dev_w), &mut st.to_device), if dev_dirty || !st.to_device.is_empty() => Event::DeviceSent(r),
            r = read(up_r, &mut st.from_gateway), if reading_gateway => Event::GatewayRead(r),
            _ = cancelled(down), if linked && probe == Probe::Idle => Event::Down,
            _ = sleep_until(probe_at), if linked && probe != Probe::Idle => Event::Probe,
            _ = changed(orders), if linked && move_at.is_none() => Event::Ordered,
            _ = sleep_until(move_at.as_ref().map(|m| (m.0, m.1))), if move_at.is_some() => Event::MoveNow,
            r = poll_moving(&mut moving), if moving.is_some() => Event::Relinked(r),
            _ = changed(Some(&mut reloads)), if serial.is_some() => Event::Reloaded,
            r = read_into(&mut dev_r, &mut st.from_device), if reading_device => Event::DeviceRead(r),
        };
        match event {
            Event::HardStop => break End::Cut,
            Event::Reloaded => {
                if let Some(s) = &serial
                    && ctx.device_tls.is_revoked(s)
                {
                    counter!(REVOKED).increment(1);
                    tracing::info!(device = %st.hello.device, "certificate revoked: session closed");
                    let text = "the device's certificate was revoked".to_string();
                    break End::Refuse(ErrorCode::Revoked.frame(0, text));
                }
            }
            Event::DeviceRead(Ok(0)) => st.device_done = true,
            Event::DeviceRead(Ok(n)) => ctx.meters.bytes_up.increment(n as u64),
            Event::DeviceRead(Err(_)) | Event::DeviceSent(Err(_)) => {
                // The device is gone: nothing to move for.
                break End::Closed;
            }
            Event::DeviceSent(Ok(Sent::Wrote(n))) => {
                ctx.meters.bytes_down.increment(n as u64);
                dev_dirty = true;
            }
            Event::DeviceSent(Ok(Sent::Flushed)) => dev_dirty = false,
            Event::GatewaySent(Ok(sent)) => {
                if let Some(l) = link.as_mut() {
                    l.dirty = matches!(sent, Sent::Wrote(_));
                }
            }
            Event::GatewayRead(Ok(n)) if n > 0 => {}
            Event::GatewayRead(Ok(_)) if st.device_done && !st.going => break End::Closed,
            Event::GatewayRead(r) => {
                let cause = if st.going && r.is_ok() {
                    Cause::Goaway
                } else {
                    Cause::Failover
                };
                if let Err(e) = &r {
                    tracing::debug!(error = %e, "gateway link failed");
                }
                let avoid = unlink(&mut link, cause == Cause::Failover);
                move_at = None;
                moving = Some(begin_move(&mut st, cause, avoid));
            }
            Event::GatewaySent(Err(e)) => {
                tracing::debug!(error = %e, "gateway link failed");
                let avoid = unlink(&mut link, true);
                move_at = None;
                moving = Some(begin_move(&mut st, Cause::Failover, avoid));
            }
            Event::Down => {
                if ctx.hard_stop.is_cancelled() {
                    break End::Cut;
                }
                if st.going {
                    // Answers still due on a GOAWAY link: its close moves the session.
                    if let Some(l) = link.as_mut() {
                        l.down = None;
                    }
                } else if let Some(l) = link.as_mut() {
                    // Ask the link itself before moving (see `Probe`).
                    l.down = None;
                    l.probe = Probe::Waiting(Instant::now() + LINK_CHECK);
                    st.probing = true;
                    put(&mut st.to_gateway, &Frame::new(Kind::Ping, PROBE_SEQ, []));
                }
            }
            Event::Probe => {
                let Some(l) = link.as_mut() else { continue };
                match l.probe {
                    Probe::Waiting(_) => {
                        tracing::debug!(gateway = %l.gateway().name, "the link did not answer: moving");
                        let avoid = unlink(&mut link, true);
                        move_at = None;
                        moving = Some(begin_move(&mut st, Cause::Failover, avoid));
                    }
                    _ if l.gateway().is_healthy() => {
                        l.down = l.gateway().session_token();
                        l.probe = Probe::Idle;
                    }
                    _ => {
                        l.probe = Probe::Waiting(Instant::now() + LINK_CHECK);
                        st.probing = true;
                        put(&mut st.to_gateway, &Frame::new(Kind::Ping, PROBE_SEQ, []));
                    }
                }
            }
            Event::Ordered => {
                if let Some(l) = link.as_ref() {
                    let gateway = l.gateway();
                    let cause = if gateway.is_draining() {
                        Cause::Drain
                    } else {
                        Cause::Rebalance
                    };
                    let cooling = cause == Cause::Rebalance
                        && st
                            .moved_at
                            .is_some_and(|t| t.elapsed() < ctx.config.migration.rebalance_cooldown);
                    if !st.going && !cooling && gateway.take_move() {
                        move_at = Some((ctx.pacer.slot(), cause, ctx.gateways.in_flight()));
                    }
                }
            }
            Event::MoveNow => {
                if let Some((_, cause, _scheduled)) = move_at.take()
                    && link.is_some()
                {
                    let avoid = unlink(&mut link, false);
                    moving = Some(begin_move(&mut st, cause, avoid));
                }
            }
            Event::Relinked(None) => {
                moving = None;
                ctx.meters.held.decrement(1.0);
                counter!(MOVES, "cause" => st.cause_label(), "result" => "failed").increment(1);
                tracing::debug!(device = %st.hello.device, cause = st.cause_label(), "no gateway took the session");
                let text = "no gateway took the session in time".to_string();
                break End::Refuse(ErrorCode::Unavailable.frame(0, text));
            }
            Event::Relinked(Some(r)) => {
                moving = None;
                ctx.meters.held.decrement(1.0);
                let pause = st.move_started.elapsed();
                ctx.meters.pause.record(pause.as_secs_f64());
                let result = st.relinked(&r.welcome, r.rest);
                counter!(MOVES, "cause" => st.cause_label(), "result" => result).increment(1);
                crate::events::COUNTS
                    .moved
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!(
                    device = %st.hello.device,
                    to = %r.link.gateway().name,
                    cause = st.cause_label(),
                    result,
                    pause_ms = pause.as_millis() as u64,
                    "session moved"
                );
                st.moved_at = Some(Instant::now());
                link = Some(r.link);
            }
        }
    };
    if moving.is_some() {
        ctx.meters.held.decrement(1.0);
    }
    let mut device = dev_r.unsplit(dev_w);
    match end {
        End::Cut => {
            let gateway = link.as_ref().map(|l| l.gateway().name.clone());
            counter!(SESSIONS_CANCELLED, "gateway" => gateway.unwrap_or_default(), "cause" => "shutdown")
                .increment(1);
            device.cut();
        }
        End::Closed | End::Refuse(_) => {
            let how = match &end {
                End::Refuse(frame) => {
                    put(&mut st.to_device, frame);
                    Close::Refused
                }
                _ => Close::Done,
            };
            let timeout = ctx.config.handshake_timeout;
            device.goodbye(&st.to_device, how, timeout).await;
        }
    }
}

/// The events of one turn of a session's loop.
enum Event {
    HardStop,
    DeviceRead(io::Result<usize>),
    DeviceSent(io::Result<Sent>),
    GatewayRead(io::Result<usize>),
    GatewaySent(io::Result<Sent>),
    Down,
    Probe,
    Reloaded,
    Ordered,
    MoveNow,
    Relinked(Option<Relinked>),
}

impl State {
    fn cause_label(&self) -> &'static str {
        self.cause.map_or("failover", Cause::as_str)
    }
}

/// Drops the session's link (its lease with it); returns its gateway, for the move to try
/// the others first. `failed`: the link failed, so the gateway's prober probes it now.
fn unlink(link: &mut Option<Link>, failed: bool) -> Option<Arc<Gateway>> {
    let l = link.take()?;
    let gateway = l.gateway().clone();
    if failed {
        gateway.suspect();
    }
    Some(gateway)
}

/// Answers the PINGs the gateway will not: the link is going or gone.
fn answer_pings(st: &mut State) {
    for seq in std::mem::take(&mut st.pings) {
        put(&mut st.to_device, &Frame::new(Kind::Pong, seq, []));
    }
}

/// Starts moving the session (its old link already dropped).
fn begin_move(st: &mut State, cause: Cause, avoid: Option<Arc<Gateway>>) -> Moving {
    st.linked = false;
    st.going = false;
    st.cause = Some(cause);
    st.move_started = Instant::now();
    st.to_gateway.clear();
    st.from_gateway.clear();
    answer_pings(st);
    st.ctx.meters.held.increment(1.0);
    let start = cause.slot_at_relink().then(|| st.ctx.pacer.slot());
    Box::pin(relink(
        st.ctx.clone(),
        st.pools.clone(),
        (st.resume_hello(), st.origin.clone()),
        avoid,
        (start, st.ctx.gateways.in_flight()),
    ))
}

/// Finds a gateway that takes the session: the least loaded other one first; when every
/// gateway was tried, again after a pause, until `--migrate-timeout`.
async fn relink(
    ctx: Arc<Context>,
    pools: Vec<String>,
    (hello, origin): (Vec<u8>, Arc<crate::proxy_protocol::Origin>),
    avoid: Option<Arc<Gateway>>,
    // The guard counts the move among those in flight until this returns.
    (start, _in_flight): (Option<Instant>, crate::balancer::InFlight),
) -> Option<Relinked> {
    if let Some(at) = start {
        tokio::time::sleep_until(at.into()).await;
    }
    let deadline = Instant::now() + ctx.config.migration.migrate_timeout;
    let mut tried: Vec<Arc<Gateway>> = avoid.into_iter().collect();
    loop {
        match ctx.gateways.acquire_first(&pools, &tried) {
            Some(lease) => {
                let gateway = lease.gateway().clone();
                match attempt(&ctx, lease, (&hello, &origin)).await {
                    Ok(r) => return Some(r),
                    Err(e) => {
                        tracing::debug!(gateway = %gateway.name, error = %e, "move attempt failed");
                        tried.push(gateway);
                    }
                }
            }
            None => {
                let now = Instant::now();
                if now >= deadline {
                    return None;
                }
                tried.clear();
                tokio::time::sleep(RETRY_EVERY.min(deadline - now)).await;
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
    }
}

/// One gateway: connect, HELLO with the ticket, WELCOME.
async fn attempt(
    ctx: &Context,
    lease: Lease,
    hello: (&[u8], &crate::proxy_protocol::Origin),
) -> Result<Relinked, String> {
    let stream = crate::session::dial_upstream(ctx, lease.gateway().clone())
        .await
        .map_err(|e| e.to_string())?;
    let opened = tokio::time::timeout(
        ctx.config.handshake_timeout,
        open(ctx, lease.gateway(), stream, hello),
    )
    .await
    .map_err(|_| "no answer to HELLO in time".to_string())?
    .map_err(|e| e.to_string())?;
    let (up, first, rest) = opened;
    match first.kind {
        Kind::Welcome => {
            let welcome: Welcome = first.decode_body("WELCOME").map_err(|e| e.to_string())?;
            Ok(Relinked {
                link: Link::new(lease, up),
                welcome,
                rest,
            })
        }
        Kind::Error => Err(
            match first.decode_body::<wasmbed_protocol::ErrorBody>("ERROR") {
                Ok(body) => format!("answered {body}"),
                Err(e) => e.to_string(),
            },
        ),
        other => Err(format!("answered HELLO with {}", other.as_str())),
    }
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
}

/// A connection to `gateway` made ready for bytes: the PROXY header first where its pool
/// wants one, then TLS when `[upstream_tls]` is configured.
pub(crate) async fn over_tcp(
    ctx: &Context,
    gateway: &Gateway,
    mut stream: tokio::net::TcpStream,
    origin: &crate::proxy_protocol::Origin,
) -> Result<Box<dyn Upstream>, OpenError> {
    if crate::session::wants_proxy_header(ctx, gateway) {
        let header = origin.header().map_err(OpenError::Io)?;
        stream.write_all(&header).await.map_err(OpenError::Io)?;
    }
    let Some(connector) = &ctx.connector else {
        return Ok(Box::new(stream));
    };
    let name = crate::session::upstream_name(ctx, &gateway.addr);
    let up = connector
        .connect(name, stream)
        .await
        .map_err(OpenError::Tls)?;
    let kind = match up.get_ref().1.handshake_kind() {
        Some(rustls::HandshakeKind::Resumed) => "resumed",
        _ => "full",
    };
    counter!(UPSTREAM_HANDSHAKES, "kind" => kind).increment(1);
    Ok(Box::new(up))
}

/// Opens a link on `dialed`: TLS when configured (a PROXY header first for pools that want
/// one; always on a link stream), HELLO, and the gateway's first frame.
pub(crate) async fn open(
    ctx: &Context,
    gateway: &Gateway,
    dialed: crate::session::Dialed,
    (hello, origin): (&[u8], &crate::proxy_protocol::Origin),
) -> Result<(Box<dyn Upstream>, Frame, BytesMut), OpenError> {
    let mut up: Box<dyn Upstream> = match dialed {
        crate::session::Dialed::Link(mut up) => {
            let header = origin.header().map_err(OpenError::Io)?;
            up.write_all(&header).await.map_err(OpenError::Io)?;
            up
        }
        crate::session::Dialed::Tcp(stream) => over_tcp(ctx, gateway, stream, origin).await?,
    };
    let tls_or_io = |e: io::Error| {
        if crate::session::is_tls_error(&e) {
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
            Ok(Some(frame)) => return Ok((up, frame, buf)),
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

/// What one send did.
enum Sent {
    Wrote(usize),
    Flushed,
}

/// Writes what `buf` holds, or, when it is empty, flushes (TLS keeps written bytes until
/// flushed). A write of zero bytes is an error.
async fn send<W: tokio::io::AsyncWrite + Unpin>(
    w: Option<&mut W>,
    buf: &mut BytesMut,
) -> io::Result<Sent> {
    let Some(w) = w else {
        return std::future::pending().await;
    };
    if buf.is_empty() {
        return w.flush().await.map(|()| Sent::Flushed);
    }
    match w.write_buf(buf).await? {
        0 => Err(io::ErrorKind::WriteZero.into()),
        n => Ok(Sent::Wrote(n)),
    }
}

async fn read(
    r: Option<&mut ReadHalf<Box<dyn Upstream>>>,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    match r {
        Some(r) => read_into(r, buf).await,
        None => std::future::pending().await,
    }
}

async fn cancelled(token: Option<&CancellationToken>) {
    match token {
        Some(t) => t.cancelled().await,
        // Not watched (a link made as its gateway went down is checked by its own I/O).
        None => std::future::pending().await,
    }
}

async fn changed(orders: Option<&mut tokio::sync::watch::Receiver<u64>>) {
    match orders {
        Some(o) => {
            if o.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}

async fn sleep_until(at: Option<(Instant, Cause)>) {
    match at {
        Some((at, _)) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

async fn poll_moving(moving: &mut Option<Moving>) -> Option<Relinked> {
    match moving {
        Some(m) => m.await,
        None => std::future::pending().await,
    }
}
