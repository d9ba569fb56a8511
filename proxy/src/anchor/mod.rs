//! anchor: a terminate-mode session, held by the proxy so that it can move between gateways.
//!
//! Two layers. [`core`] is the session's state and rules with no I/O and no clock: the
//! device's HELLO, the latest CHECKPOINT ticket (absorbed; passed on only with
//! `--forward-checkpoints`), the DATA not covered by that ticket (the replay window), dedup of
//! answers by sequence, PUSH renumbering, and the move state machine ([`core::Phase`]). This
//! file is its driver: one task per session that moves bytes between the device, the gateway
//! and the core, and turns the core's [`core::Step`]s into I/O: a lease on another gateway,
//! HELLO with the device's identity and the ticket, WELCOME `resumed`, the window replayed.
//! The device keeps its one connection and sees every answer exactly once.
//!
//! When the gateway closes without GOAWAY, resets, is marked down (and its link does not
//! answer a PING), sends garbage, says GOAWAY, or is drained or rebalanced by moving, the
//! session moves. Per session the proxy holds the frames of the window (bounded by
//! `--replay-window`: past it, the device is not read) and the ticket.

pub mod core;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metrics::counter;
use tokio::io::{AsyncRead, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio_util::sync::CancellationToken;
use wasmbed_protocol::{Frame, Hello, Kind, Welcome};

pub use self::core::{Cause, LINK_CHECK};
use self::core::{Core, End, Phase, Settings, Step, Tally};

use crate::balancer::{Gateway, Lease};
use crate::context::Context;
use crate::metric_names::{MOVES, REVOKED, SESSIONS_CANCELLED};
use crate::tls::Upstream;

/// The device's TLS stream.
pub(crate) type Device = crate::tls::TlsStream;

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

/// How a session ends in order (QUIC says which in its close code).
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
        crate::listener::reset_on_close(self.tcp());
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
    pub serial: Option<Box<[u8]>>,
    /// For a PROXY protocol header on each link, where the gateway's pool wants one.
    pub origin: crate::proxy_protocol::Origin,
}

/// Between two rounds over every gateway while a session waits for one to take it.
const RETRY_EVERY: Duration = Duration::from_millis(100);

/// A session's connection to its gateway: a TCP/TLS connection or a stream on the link.
pub(crate) struct Link {
    lease: Lease,
    read: ReadHalf<Box<dyn Upstream>>,
    write: WriteHalf<Box<dyn Upstream>>,
    /// Cancelled when the gateway goes down (`None`: not watched, while the link is checked
    /// by PINGs instead: [`core::Check`]).
    down: Option<CancellationToken>,
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

/// A gateway that took a moved session.
struct Relinked {
    link: Link,
    welcome: Welcome,
    /// What the gateway sent after WELCOME.
    rest: BytesMut,
}

type Moving = Pin<Box<dyn Future<Output = Option<Relinked>> + Send>>;

/// Bytes one read takes, through a buffer on the stack ([`read_into`]).
const READ_CHUNK: usize = 16 << 10;

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

/// A terminate-mode session whose first link is up and WELCOMEd, ready to be served.
pub(crate) struct Anchored {
    pub ctx: Arc<Context>,
    pub device: DeviceSide,
    pub pools: crate::context::Pools,
    pub hello: Hello,
    pub link: Link,
    /// The WELCOME, what the gateway sent after it, what the device sent after its HELLO.
    pub first: (Frame, BytesMut, BytesMut),
}

impl Anchored {
    /// Not an async fn itself: a wrapper's future would hold a second copy of the arguments.
    pub(crate) fn serve(self: Box<Self>) -> impl Future<Output = ()> {
        serve(self)
    }
}

/// How a session ended, for the driver.
enum Ending {
    /// In order, maybe with an ERROR ([`core::End`]).
    Core(End),
    /// The proxy cut the session (shutdown): the device's connection is reset.
    Cut,
}

/// The events of one turn of a session's loop.
enum Event {
    HardStop,
    DeviceRead(io::Result<usize>),
    DeviceSent(io::Result<Sent>),
    GatewayRead(io::Result<usize>),
    GatewaySent(io::Result<Sent>),
    Down,
    Tick,
    Reloaded,
    Ordered,
    Relinked(Option<Relinked>),
    /// The proxy began to stop: the session's hand-back gets its paced slot.
    Stopping,
    /// The slot came: GOAWAY to the device.
    HandBack,
}

/// Serves a terminate-mode session whose first link is up and WELCOMEd: feeds the [`Core`]
/// what the device, the gateway, the balancer and the clock say, and does what it returns,
/// until the session ends. `first` is the WELCOME (sent to the device first), `rest` what
/// the gateway sent after it, `pending` what the device sent after its HELLO.
///
/// This future is most of an idle session's memory, so its one argument is a box: an async
/// fn keeps its arguments in its future for its whole life (beside the locals they are
/// moved into), and the box is freed once unpacked. Measured by
/// `session::tests::session_tasks_stay_small`.
async fn serve(anchored: Box<Anchored>) {
    let Anchored {
        ctx,
        device:
            DeviceSide {
                tls: device,
                serial,
                origin,
            },
        pools,
        hello,
        link,
        first: (first, rest, pending),
    } = *anchored;
    let settings = Settings {
        replay_window: ctx.config.migration.replay_window,
        forward_checkpoints: ctx.config.migration.forward_checkpoints,
    };
    let mut core = Core::new(settings, hello, &first, (rest, pending));
    // The WELCOME is in `core`'s output now: its bytes are not kept for the session's life.
    drop(first);
    let origin = Arc::new(origin);
    let (mut dev_r, mut dev_w) = tokio::io::split(device);
    // Trust reloads (a CRL that may revoke this device): a token the device trust cancels at
    // each install. Taken before the check below, so an install after the handshake's own
    // check is seen either way.
    let mut installs = ctx.device_tls.installs();
    if serial
        .as_ref()
        .is_some_and(|s| ctx.device_tls.is_revoked(s))
    {
        // Revoked between the handshake and here: the first turn handles it as a reload.
        installs = CancellationToken::new();
        installs.cancel();
    }
    // Waited on by one future for the session's life, as `stop` below (made afresh at every
    // turn, it would lock the token's mutex twice per turn, shared by every session).
    let mut reloaded = std::pin::pin!(installs.cancelled_owned());
    let mut dev_dirty = false;
    let mut moving: Option<Moving> = None;
    // A paced move's place among the moves in flight, from its order to its start.
    let mut in_flight: Option<crate::balancer::InFlight> = None;
    // The link's gateway said GOAWAY and that was recorded on it.
    let mut goaway_noted = false;
    // The proxy is stopping: when this session's GOAWAY goes (paced at --move-rate, so the
    // devices of a stopping proxy do not all reconnect at once); `Some(None)`: sent.
    let mut hand_back: Option<Option<Instant>> = None;
    // The proxy's stop, in two steps in one future: first its start (`stopping`: the
    // hand-back), then, once that came, the hard stop (grace over: cut). The hard stop comes
    // only after the start. Made once, not at every pass of the loop: a new `cancelled()`
    // future registers with the process-wide token each time it is polled afresh (a lock per
    // message otherwise).
    let mut stop = std::pin::pin!(ctx.gateways.stopping().clone().cancelled_owned());
    // One timer for the session's life, moved when its time changes (a timer made afresh
    // for each turn of the loop would sit in the `select!`'s state beside the others).
    let mut timer = std::pin::pin!(tokio::time::sleep_until(tokio::time::Instant::now()));
    let mut link = Some(link);
    let mut step = Step::Go;
    let end = loop {
        if step == Step::Go {
            step = core.advance();
        }
        tally(&ctx, &mut core);
        match std::mem::replace(&mut step, Step::Go) {
            Step::Go => {}
            Step::End(end) => break Ending::Core(end),
            Step::Move(cause) => {
                let avoid = unlink(&mut link, cause == Cause::Failover);
                in_flight = None;
                moving = Some(begin_move(&ctx, &mut core, (&pools, &origin), cause, avoid));
                continue;
            }
        }
        if let Some(l) = link.as_mut()
            && core.watching_down()
            && l.down.is_none()
            && l.gateway().is_healthy()
        {
            l.down = l.gateway().session_token();
        }
        let reading_device = core.reading_device();
        let reading_gateway = link.is_some() && core.reading_gateway();
        let writing_gateway = link.is_some() && core.writing_gateway();
        let watching = link.is_some() && core.watching_down();
        let ordered = matches!(core.phase(), Phase::Linked { order: Some(_), .. });
        // One timer for the core's deadline and the hand-back's slot, whichever is first (a
        // timer is over 100 bytes of every idle session's task).
        let deadline = core.deadline();
        let slot = hand_back.flatten();
        let slot_first = slot.is_some_and(|s| deadline.is_none_or(|d| s <= d));
        let wake = if slot_first { slot } else { deadline };
        if let Some(at) = wake.map(tokio::time::Instant::from_std)
            && timer.deadline() != at
        {
            timer.as_mut().reset(at);
        }
        let (up_r, up_w, down, orders, up_dirty) = match link.as_mut() {
            Some(l) => (
                Some(&mut l.read),
                Some(&mut l.write),
                l.down.as_ref(),
                Some(&mut l.orders),
                l.dirty,
            ),
            None => (None, None, None, None, false),
        };
        let io = core.io();
        let event = tokio::select! {
            biased;
            _ = &mut stop => if hand_back.is_none() { Event::Stopping } else { Event::HardStop },
            r = send(up_w, io.to_gateway), if writing_gateway && (up_dirty || !io.to_gateway.is_empty()) => Event::GatewaySent(r),
            r = send(Some(&mut dev_w), io.to_device), if dev_dirty || !io.to_device.is_empty() => Event::DeviceSent(r),
            r = read(up_r, io.from_gateway), if reading_gateway => Event::GatewayRead(r),
            _ = cancelled(down), if watching => Event::Down,
            _ = &mut timer, if wake.is_some() => if slot_first { Event::HandBack } else { Event::Tick },
            _ = changed(orders), if !ordered => Event::Ordered,
            r = poll_moving(&mut moving), if moving.is_some() => Event::Relinked(r),
            _ = &mut reloaded, if serial.is_some() => Event::Reloaded,
            r = read_into(&mut dev_r, io.from_device), if reading_device => Event::DeviceRead(r),
        };
        match event {
            Event::HardStop => break Ending::Cut,
            Event::Stopping => {
                hand_back = Some(Some(ctx.pacer.slot()));
                stop.set(ctx.hard_stop.clone().cancelled_owned());
            }
            Event::HandBack => {
                hand_back = Some(None);
                if core.hand_back() {
                    tracing::debug!(device = %core.hello().device, "proxy stopping: GOAWAY to the device");
                }
            }
            Event::Reloaded => {
                reloaded.set(ctx.device_tls.installs().cancelled_owned());
                if serial
                    .as_ref()
                    .is_some_and(|s| ctx.device_tls.is_revoked(s))
                {
                    counter!(REVOKED).increment(1);
                    tracing::info!(device = %core.hello().device, "certificate revoked: session closed");
                    break Ending::Core(core.revoked());
                }
            }
            Event::DeviceRead(Ok(0)) => core.device_finished(),
            Event::DeviceRead(Ok(n)) => ctx.meters.bytes_up.increment(n as u64),
            Event::DeviceRead(Err(_)) | Event::DeviceSent(Err(_)) => {
                // The device is gone: nothing to move for.
                break Ending::Core(End::Closed);
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
            Event::GatewayRead(Ok(n)) if n > 0 => {
                if let Some(l) = &link {
                    l.gateway().heard_from();
                }
            }
            Event::GatewayRead(r) => {
                if let Err(e) = &r {
                    tracing::debug!(error = %e, "gateway link failed");
                }
                step = core.gateway_closed(r.is_ok());
            }
            Event::GatewaySent(Err(e)) => {
                tracing::debug!(error = %e, "gateway link failed");
                step = Step::Move(Cause::Failover);
            }
            Event::Down => {
                if ctx.hard_stop.is_cancelled() {
                    break Ending::Cut;
                }
                // Ask the link itself before moving (see `core::Check`).
                core.gateway_down(Instant::now());
                if let Some(l) = link.as_mut() {
                    l.down = None;
                }
            }
            Event::Tick => {
                let healthy = link.as_ref().is_some_and(|l| l.gateway().is_healthy());
                step = core.tick(Instant::now(), healthy);
                if let Step::Move(Cause::Failover) = step
                    && let Some(l) = link.as_ref()
                {
                    tracing::debug!(gateway = %l.gateway().name, "the link did not answer: moving");
                }
            }
            Event::Ordered => {
                if let Some(l) = &link
                    && let Some(place) = take_order(&ctx, &mut core, l.gateway())
                {
                    in_flight = Some(place);
                }
            }
            Event::Relinked(None) => {
                moving = None;
                ctx.meters.held.decrement(1.0);
                let cause = moving_cause(&core);
                counter!(MOVES, "cause" => cause, "result" => "failed").increment(1);
                tracing::debug!(device = %core.hello().device, cause, "no gateway took the session");
                break Ending::Core(core.relink_failed());
            }
            Event::Relinked(Some(r)) => {
                moving = None;
                goaway_noted = false;
                link = Some(relinked(&ctx, &mut core, r));
            }
        }
        // A GOAWAY read: the gateway drains (no new sessions for it; not down).
        // (Only when probes run: a probe that finds the gateway serving clears it again.)
        if !goaway_noted
            && ctx.config.health.check != wasmbed_config::HealthCheck::None
            && matches!(core.phase(), Phase::Going { .. })
            && let Some(l) = &link
        {
            goaway_noted = true;
            crate::health::note_drain(l.gateway(), true, "a GOAWAY");
        }
        // A paced move that started, or a link that went, holds no place any more.
        if !matches!(core.phase(), Phase::Linked { order: Some(_), .. }) {
            in_flight = None;
        }
    };
    drop(in_flight);
    if moving.is_some() {
        ctx.meters.held.decrement(1.0);
    }
    tally(&ctx, &mut core);
    let device = dev_r.unsplit(dev_w);
    let gateway = link.as_ref().map(|l| l.gateway().name.clone());
    close(&ctx, &mut core, device, (end, gateway)).await;
}

/// A move order (drain, rebalance) from the gateway: taken when the core may move and the
/// gateway's quota has one left; the move waits for its `--move-rate` slot. Returns its place
/// among the moves in flight.
fn take_order(
    ctx: &Context,
    core: &mut Core,
    gateway: &Arc<Gateway>,
) -> Option<crate::balancer::InFlight> {
    let cause = if gateway.is_draining() {
        Cause::Drain
    } else {
        Cause::Rebalance
    };
    let cooldown = ctx.config.migration.rebalance_cooldown;
    if core.takes_order(cause, Instant::now(), cooldown) && gateway.take_move() {
        core.order(cause, ctx.pacer.slot());
        return Some(ctx.gateways.in_flight());
    }
    None
}

/// A gateway took the moving session: the core replays what its WELCOME does not cover; the
/// move is counted (metrics, dashboard, pause) and logged. Returns the new link.
fn relinked(ctx: &Context, core: &mut Core, r: Relinked) -> Link {
    ctx.meters.held.decrement(1.0);
    let cause = moving_cause(core);
    let had_state = core.has_state_to_move();
    let (result, pause) = core.relinked(&r.welcome, r.rest, Instant::now());
    ctx.meters.pause.record(pause.as_secs_f64());
    counter!(MOVES, "cause" => cause, "result" => result).increment(1);
    crate::events::COUNTS
        .moved
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let to = r.link.gateway();
    if result == "fresh" && had_state {
        to.note_fresh_move(r.welcome.resume_refused.as_deref());
    }
    tracing::debug!(
        device = %core.hello().device,
        to = %to.name,
        cause,
        result,
        refused = r.welcome.resume_refused.as_deref().unwrap_or(""),
        pause_ms = pause.as_millis() as u64,
        "session moved"
    );
    r.link
}

/// Ends the session on the device's side: cut (a shutdown: the device reconnects at once), or
/// what it is owed and an orderly close ([`DeviceStream::goodbye`]).
async fn close(
    ctx: &Context,
    core: &mut Core,
    mut device: Box<dyn DeviceStream>,
    (end, gateway): (Ending, Option<String>),
) {
    match end {
        Ending::Cut => {
            counter!(SESSIONS_CANCELLED, "gateway" => gateway.unwrap_or_default(), "cause" => "shutdown")
                .increment(1);
            device.cut();
        }
        Ending::Core(end) => {
            let how = match &end {
                End::Refuse(frame) => {
                    core.push_to_device(frame);
                    Close::Refused
                }
                End::Closed => Close::Done,
            };
            let timeout = ctx.config.handshake_timeout;
            device.goodbye(core.io().to_device, how, timeout).await;
        }
    }
}

/// The core's counts into the proxy's metrics.
fn tally(ctx: &Context, core: &mut Core) {
    let t = core.take_tally();
    if t != Tally::default() {
        ctx.meters.duplicates.increment(t.duplicates.into());
        ctx.meters.replayed.increment(t.replayed.into());
        ctx.meters.overflows.increment(t.overflows.into());
    }
}

/// The cause of the move under way, as a label.
fn moving_cause(core: &Core) -> &'static str {
    match core.phase() {
        Phase::Moving { cause, .. } => cause.as_str(),
        _ => Cause::Failover.as_str(),
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

/// Starts moving the session (its old link already dropped): the core's resume HELLO goes
/// to the gateways [`relink`] tries.
fn begin_move(
    ctx: &Arc<Context>,
    core: &mut Core,
    (pools, origin): (&crate::context::Pools, &Arc<crate::proxy_protocol::Origin>),
    cause: Cause,
    avoid: Option<Arc<Gateway>>,
) -> Moving {
    let hello = core.begin_move(cause, Instant::now());
    ctx.meters.held.increment(1.0);
    let start = cause.slot_at_relink().then(|| ctx.pacer.slot());
    Box::pin(relink(
        ctx.clone(),
        pools.clone(),
        (hello, origin.clone()),
        avoid,
        (start, ctx.gateways.in_flight()),
    ))
}

/// Finds a gateway that takes the session: the least loaded other one first; when every
/// gateway was tried, again after a pause, until `--migrate-timeout`.
async fn relink(
    ctx: Arc<Context>,
    pools: crate::context::Pools,
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
    let stream = crate::upstream::dial_upstream(ctx, lease.gateway().clone())
        .await
        .map_err(|e| e.to_string())?;
    let opened = tokio::time::timeout(
        ctx.config.handshake_timeout,
        crate::upstream::open(ctx, lease.gateway(), stream, hello),
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

async fn poll_moving(moving: &mut Option<Moving>) -> Option<Relinked> {
    match moving {
        Some(m) => m.await,
        None => std::future::pending().await,
    }
}
