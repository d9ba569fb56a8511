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

#![expect(
    clippy::disallowed_methods,
    reason = "terminate mode only, whose data plane keeps its time driver (`data_plane_timers`)"
)]

pub mod core;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use metrics::counter;
use std::task::Poll;

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use wasmbed_certs::{Fired, Trigger};
use wasmbed_protocol::{Frame, Hello, Kind, Welcome};

pub use self::core::{Cause, LINK_CHECK};
use self::core::{Core, End, Phase, Settings, Step, Tally};

use crate::balancer::{Cancel, Gateway, Lease, UNASSIGNED};
use crate::context::Context;
use crate::metric_names::{MOVES, REVOKED};
use crate::tls::Upstream;

/// The device's TLS stream.
pub(crate) type Device = crate::tls::TlsStream;

/// A device's connection, decrypted: TLS over TCP, or a QUIC stream.
pub(crate) trait DeviceStream:
    tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send
{
    /// Ends the connection abruptly (a shutdown's cut: the device reconnects at once; or a
    /// newer connection of the device took its session, [`crate::seats`]).
    fn cut(&self, why: Cut);

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

/// Why a session's connection is cut (QUIC says which in its close code).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cut {
    /// The proxy is stopping and its grace period is over.
    Shutdown,
    /// A newer connection of the same device (by its certificate) took the session.
    Superseded,
}

/// The future of [`DeviceStream::goodbye`].
pub(crate) type Goodbye<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

impl DeviceStream for Device {
    fn cut(&self, _why: Cut) {
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
    /// Read and written by the session's loop, which polls it by hand (no `split`).
    io: Box<dyn Upstream>,
    /// The gateway's news (cut, moves ordered), taken when the link was made and waited on
    /// by the session's loop once it runs the link.
    news: Option<Trigger>,
    /// The gateway's cuts and orders the session has seen (taken after `news`, with a drain
    /// or a down that came while the link was made kept unseen:
    /// [`Gateway::seen_by_new_session`]): only later ones are news to it.
    seen: crate::balancer::Seen,
    /// Bytes written since the last flush.
    dirty: bool,
}

impl Link {
    pub(crate) fn new(lease: Lease, up: Box<dyn Upstream>) -> Link {
        let gateway = lease.gateway().clone();
        gateway.session_started();
        let news = gateway.news();
        Link {
            news: Some(news),
            seen: gateway.seen_by_new_session(),
            lease,
            io: up,
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

/// Bytes one read takes, through a buffer on the stack ([`poll_read_into`]).
const READ_CHUNK: usize = 16 << 10;

/// Reads what is there into `buf` through a buffer on the stack, so that `buf` is allocated
/// only while it holds bytes (a partial frame, or frames not yet handled). Bytes read are in
/// `buf` when this returns ready.
fn poll_read_into<R: AsyncRead + Unpin + ?Sized>(
    cx: &mut std::task::Context<'_>,
    r: &mut R,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>> {
    // Uninitialized: zeroing 16 KiB on every read would cost more than the read.
    let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut read = ReadBuf::uninit(&mut chunk);
    std::task::ready!(Pin::new(r).poll_read(cx, &mut read))?;
    buf.extend_from_slice(read.filled());
    Poll::Ready(Ok(read.filled().len()))
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
    /// The connection's arrival, when its certificate names the device: the session takes
    /// the device's seat ([`crate::seats`]) and ends if a newer one takes it.
    pub arrival: Option<u64>,
}

impl Anchored {
    /// Not an async fn itself: a wrapper's future would hold a second copy of the arguments.
    pub(crate) fn serve(self: Box<Self>) -> impl Future<Output = ()> {
        serve(self)
    }
}

/// A session's parts, as its loop keeps them ([`Anchored::unpack`]).
struct Parts {
    ctx: Arc<Context>,
    core: Core,
    device: Box<dyn DeviceStream>,
    /// The device certificate's serial (checked against CRL reloads).
    serial: Option<Box<[u8]>>,
    origin: Arc<crate::proxy_protocol::Origin>,
    pools: crate::context::Pools,
    link: Link,
    /// See [`Anchored::arrival`].
    arrival: Option<u64>,
}

impl Anchored {
    /// The session's parts; the box (and the WELCOME, now in the core's output) freed. A
    /// plain fn: what it unpacks through is not kept in the session's future.
    fn unpack(self: Box<Self>) -> Parts {
        let Anchored {
            ctx,
            arrival,
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
        } = *self;
        let settings = Settings {
            replay_window: ctx.config.migration.replay_window,
            forward_checkpoints: ctx.config.migration.forward_checkpoints,
        };
        let core = Core::new(settings, hello, &first, (rest, pending));
        Parts {
            ctx,
            core,
            device,
            serial,
            origin: Arc::new(origin),
            pools,
            link,
            arrival,
        }
    }
}

/// Trust reloads (a CRL that may revoke this device): a trigger the device trust fires at
/// each install. Taken before the check below, so an install after the handshake's own check
/// is seen either way; a device revoked between the handshake and here gets a fired
/// trigger, and the loop's first turn handles it as a reload.
fn reloads(ctx: &Context, serial: Option<&[u8]>) -> Trigger {
    let installs = ctx.device_tls.installs();
    if serial.is_some_and(|s| ctx.device_tls.is_revoked(s)) {
        let revoked = Trigger::new();
        revoked.fire();
        return revoked;
    }
    installs
}

/// One timer for the core's deadline and the hand-back's slot, whichever is first: moved
/// when its time changes, and there only while one of them is set. An idle session has
/// neither, and a timer is over 100 bytes: boxed when armed, freed when not. Returns whether
/// it is armed, and if so whether for the slot.
fn set_timer(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    deadline: Option<Instant>,
    slot: Option<Instant>,
) -> Option<bool> {
    let slot_first = slot.is_some_and(|s| deadline.is_none_or(|d| s <= d));
    let Some(wake) = (if slot_first { slot } else { deadline }) else {
        *timer = None;
        return None;
    };
    let at = tokio::time::Instant::from_std(wake);
    match timer {
        Some(t) if t.deadline() == at => {}
        Some(t) => t.as_mut().reset(at),
        None => *timer = Some(Box::pin(tokio::time::sleep_until(at))),
    }
    Some(slot_first)
}

/// How a session ended, for the driver.
enum Ending {
    /// In order, maybe with an ERROR ([`core::End`]).
    Core(End),
    /// The proxy cut the session (shutdown): the device's connection is reset.
    Cut,
    /// A newer connection of the device took its seat: this one is cut.
    Superseded,
}

/// The events of one turn of a session's loop.
enum Event {
    HardStop,
    Superseded,
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
    let Parts {
        ctx,
        mut core,
        mut device,
        serial,
        origin,
        pools,
        link,
        arrival,
    } = anchored.unpack();
    // The device's seat (a device named by its certificate), freed when dropped, and the
    // trigger that says a newer connection of the device took it.
    let (seat, seat_trigger) = match arrival {
        Some(arrival) => {
            let hello = core.hello();
            let (seat, token) = ctx.seats.take((&hello.device, &hello.app), arrival);
            (Some(seat), Some(token))
        }
        None => (None, None),
    };
    // The loop's own state lives in this block: dropped before the close below, so the
    // session's future does not hold it beside the close's.
    let ending = {
        let mut waits = std::pin::pin!(Waits {
            // The proxy's stop, in two steps in one future: first its start (`stopping`: the
            // hand-back), then, once that came, the hard stop (grace over: cut).
            stop: ctx.gateways.stopping().fired(),
            timer: None,
            gateway: None,
            reloaded: reloads(&ctx, serial.as_deref()).fired(),
            moving: None,
            superseded: seat_trigger.map(|t| Box::pin(t.fired())),
        });
        let mut dev_dirty = false;
        // A paced move's place among the moves in flight, from its order to its start.
        let mut in_flight: Option<crate::balancer::InFlight> = None;
        // The link's gateway said GOAWAY and that was recorded on it.
        let mut goaway_noted = false;
        // The proxy is stopping: when this session's GOAWAY goes (paced at --move-rate, so
        // the devices of a stopping proxy do not all reconnect at once); `Some(None)`: sent.
        let mut hand_back: Option<Option<Instant>> = None;
        let mut link = Some(link);
        let end = 'session: {
            if let Some(end) = (Turn {
                ctx: &ctx,
                core: &mut core,
                link: &mut link,
                in_flight: &mut in_flight,
                route: (&pools, &origin),
            })
            .settle(waits.as_mut(), Step::Go)
            {
                break 'session Ending::Core(end);
            }
            loop {
                let wants = Wants {
                    device: core.reading_device(),
                    gateway: link.is_some() && core.reading_gateway(),
                    to_gateway: link.is_some() && core.writing_gateway(),
                    down: link.is_some() && core.watching_down(),
                    timer: set_timer(
                        waits.as_mut().project().timer,
                        core.deadline(),
                        hand_back.flatten(),
                    ),
                    reloads: serial.is_some(),
                    handing_back: hand_back.is_some(),
                };
                let event = std::future::poll_fn(|cx| {
                    let ends = (&mut device, dev_dirty, link.as_mut());
                    next_event(cx, &wants, waits.as_mut(), ends, core.io())
                })
                .await;
                let mut waits_now = waits.as_mut().project();
                let step = match event {
                    Event::HardStop => break Ending::Cut,
                    Event::Superseded => break Ending::Superseded,
                    Event::Stopping => {
                        hand_back = Some(Some(ctx.pacer.slot()));
                        waits_now.stop.set(ctx.hard_stop.fired());
                        Step::Go
                    }
                    Event::HandBack => {
                        hand_back = Some(None);
                        if core.hand_back() {
                            tracing::debug!(device = %core.hello().device, "proxy stopping: GOAWAY to the device");
                        }
                        Step::Go
                    }
                    Event::Reloaded => {
                        waits_now.reloaded.set(ctx.device_tls.installs().fired());
                        if serial
                            .as_ref()
                            .is_some_and(|s| ctx.device_tls.is_revoked(s))
                        {
                            counter!(REVOKED).increment(1);
                            tracing::info!(device = %core.hello().device, "certificate revoked: session closed");
                            break Ending::Core(core.revoked());
                        }
                        Step::Go
                    }
                    Event::DeviceRead(Ok(0)) => {
                        core.device_finished();
                        Step::Go
                    }
                    Event::DeviceRead(Ok(n)) => {
                        ctx.meters.bytes_up.increment(n as u64);
                        Step::Go
                    }
                    Event::DeviceRead(Err(_)) | Event::DeviceSent(Err(_)) => {
                        // The device is gone: nothing to move for.
                        break Ending::Core(End::Closed);
                    }
                    Event::DeviceSent(Ok(Sent::Wrote(n))) => {
                        ctx.meters.bytes_down.increment(n as u64);
                        dev_dirty = true;
                        Step::Go
                    }
                    Event::DeviceSent(Ok(Sent::Flushed)) => {
                        dev_dirty = false;
                        Step::Go
                    }
                    Event::GatewaySent(Ok(sent)) => {
                        if let Some(l) = link.as_mut() {
                            l.dirty = matches!(sent, Sent::Wrote(_));
                        }
                        Step::Go
                    }
                    Event::GatewayRead(Ok(n)) if n > 0 => {
                        if let Some(l) = &link {
                            l.gateway().heard_from();
                        }
                        Step::Go
                    }
                    Event::GatewayRead(r) => {
                        if let Err(e) = &r {
                            tracing::debug!(error = %e, "gateway link failed");
                        }
                        core.gateway_closed(r.is_ok())
                    }
                    Event::GatewaySent(Err(e)) => {
                        tracing::debug!(error = %e, "gateway link failed");
                        Step::Move(Cause::Failover)
                    }
                    Event::Down => {
                        if ctx.hard_stop.is_fired() {
                            break Ending::Cut;
                        }
                        // Ask the link itself before moving (see `core::Check`).
                        core.gateway_down(Instant::now());
                        Step::Go
                    }
                    Event::Tick => {
                        let healthy = link.as_ref().is_some_and(|l| l.gateway().is_healthy());
                        let step = core.tick(Instant::now(), healthy);
                        if let Step::Move(Cause::Failover) = step
                            && let Some(l) = link.as_ref()
                        {
                            tracing::debug!(gateway = %l.gateway().name, "the link did not answer: moving");
                        }
                        step
                    }
                    Event::Ordered => {
                        if let Some(l) = &link {
                            // An order of none (undrain, a plain drain) withdraws the move
                            // this session took and has not begun; another may give it one.
                            if l.gateway().moves_withdrawn() && core.withdraw_order() {
                                in_flight = None;
                                // The last withdrawn: the turns handed out go to the next moves.
                                if ctx.gateways.moves_in_flight() == 0 {
                                    ctx.pacer.release_all();
                                }
                            }
                            if let Some(place) = take_order(&ctx, &mut core, l.gateway()) {
                                in_flight = Some(place);
                            }
                        }
                        Step::Go
                    }
                    Event::Relinked(None) => {
                        *waits_now.moving = None;
                        ctx.meters.held.decrement(1.0);
                        let cause = moving_cause(&core);
                        counter!(MOVES, "cause" => cause, "result" => "failed").increment(1);
                        tracing::debug!(device = %core.hello().device, cause, "no gateway took the session");
                        break Ending::Core(core.relink_failed());
                    }
                    Event::Relinked(Some(r)) => {
                        *waits_now.moving = None;
                        goaway_noted = false;
                        link = Some(relinked(&ctx, &mut core, r));
                        Step::Go
                    }
                };
                // A GOAWAY read: the gateway drains (no new sessions for it; not down).
                // (Only when probes run: a probe that finds the gateway serving clears it.)
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
                let turn = Turn {
                    ctx: &ctx,
                    core: &mut core,
                    link: &mut link,
                    in_flight: &mut in_flight,
                    route: (&pools, &origin),
                }
                .settle(waits.as_mut(), step);
                if let Some(end) = turn {
                    break Ending::Core(end);
                }
            }
        };
        drop(in_flight);
        if waits.moving.is_some() {
            ctx.meters.held.decrement(1.0);
        }
        (end, link.as_ref().map(|l| l.gateway().clone()))
    };
    drop(seat);
    tally(&ctx, &mut core);
    close(&ctx, &mut core, device, ending).await;
}

/// What the core's steps act on between two events.
struct Turn<'a> {
    ctx: &'a Arc<Context>,
    core: &'a mut Core,
    link: &'a mut Option<Link>,
    in_flight: &'a mut Option<crate::balancer::InFlight>,
    route: (
        &'a crate::context::Pools,
        &'a Arc<crate::proxy_protocol::Origin>,
    ),
}

impl Turn<'_> {
    /// Takes the core's steps after an event (`step`, then what the core says next) until it
    /// waits for the next event (`None`) or the session ends. A move drops the link (and its
    /// waits) and starts finding another gateway; a new link's triggers become the waits.
    fn settle(&mut self, waits: Pin<&mut Waits>, mut step: Step) -> Option<End> {
        let mut waits = waits.project();
        loop {
            if step == Step::Go {
                step = self.core.advance();
            }
            tally(self.ctx, self.core);
            match std::mem::replace(&mut step, Step::Go) {
                Step::Go => break,
                Step::End(end) => return Some(end),
                Step::Move(cause) => {
                    let avoid = unlink(self.link, cause == Cause::Failover);
                    waits.gateway.set(None);
                    *self.in_flight = None;
                    *waits.moving = Some(begin_move(self.ctx, self.core, self.route, cause, avoid));
                }
            }
        }
        if let Some(l) = self.link.as_mut()
            && let Some(news) = l.news.take()
        {
            // A new link: its gateway's news becomes the loop's wait.
            waits.gateway.set(Some(news.fired()));
        }
        None
    }
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
    (end, gateway): (Ending, Option<Arc<Gateway>>),
) {
    let counts = gateway.as_deref().map_or(&UNASSIGNED, |g| &g.counts);
    match end {
        Ending::Cut => {
            counts.cancelled(Cancel::Shutdown);
            device.cut(Cut::Shutdown);
        }
        Ending::Superseded => {
            counts.cancelled(Cancel::Superseded);
            tracing::info!(device = %core.hello().device, "a newer connection of the device took its session: this one is closed");
            device.cut(Cut::Superseded);
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
    let (hello, origin) = hello;
    let up = crate::upstream::reach(ctx, lease.gateway().clone(), origin)
        .await
        .map_err(|e| e.to_string())?;
    let opened = ctx
        .deadlines
        .timeout(
            ctx.config.handshake_timeout,
            crate::upstream::open(ctx, lease.gateway(), up, hello),
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

/// What the loop waits for in this turn (the core's and the session's state decide).
struct Wants {
    device: bool,
    gateway: bool,
    to_gateway: bool,
    down: bool,
    /// The timer, and whether it is the hand-back's slot (else the core's deadline).
    timer: Option<bool>,
    reloads: bool,
    /// The stop's first step came: the stop future is now the hard stop's.
    handing_back: bool,
}

pin_project_lite::pin_project! {
    /// The loop's waits, each one future for the session's life, polled by hand
    /// ([`next_event`]): made afresh at each turn (as a `select!` does), a wait would register
    /// with its trigger each time (a lock on a mutex shared by every session), and each would
    /// sit in the session's state beside the persistent ones. Kept, each poll of one that has
    /// not fired is a flag read ([`Fired`]).
    struct Waits {
        // The proxy's stop: first its start, then (set by the loop) its hard stop.
        #[pin]
        stop: Fired,
        // The core's deadline or the hand-back's slot ([`set_timer`]).
        timer: Option<Pin<Box<tokio::time::Sleep>>>,
        // The link's gateway's news: it went down, or moves were ordered off it (`None`: no
        // link).
        #[pin]
        gateway: Option<Fired>,
        // The device trust was installed anew (a CRL may revoke this device).
        #[pin]
        reloaded: Fired,
        // The move under way: a gateway found, or none.
        moving: Option<Moving>,
        // A newer connection of the device took its seat (`None`: no certificate names it).
        // Boxed: rarely ready, and the session's future stays in its allocation class.
        superseded: Option<Pin<Box<Fired>>>,
    }
}

/// The first of the session's sources that is ready, in this order (as a `biased`
/// `select!` would, without a future per source made at each turn: the streams are polled
/// directly and the waits are kept): the proxy's stop, a newer connection of the device
/// taking its seat, writes to the gateway and to the
/// device (before reads, so that what is owed goes first), the gateway's bytes, its going
/// down, the core's timer, move orders, the move under way, trust reloads, the device's
/// bytes. Every source not ready has registered the task's waker. Nothing is lost by
/// returning early: bytes read or written are in `io` (or out of it) when a poll says so.
fn next_event(
    cx: &mut std::task::Context<'_>,
    wants: &Wants,
    waits: Pin<&mut Waits>,
    (device, dev_dirty, link): (&mut Box<dyn DeviceStream>, bool, Option<&mut Link>),
    io: core::Io<'_>,
) -> Poll<Event> {
    use std::task::Poll::Ready;
    let mut waits = waits.project();
    if waits.stop.as_mut().poll(cx).is_ready() {
        return Ready(if wants.handing_back {
            Event::HardStop
        } else {
            Event::Stopping
        });
    }
    if let Some(w) = waits.superseded.as_mut()
        && w.as_mut().poll(cx).is_ready()
    {
        return Ready(Event::Superseded);
    }
    let mut link = link;
    if wants.to_gateway
        && let Some(l) = link.as_deref_mut()
        && let Ready(r) = poll_send(cx, &mut *l.io, io.to_gateway, l.dirty)
    {
        return Ready(Event::GatewaySent(r));
    }
    if let Ready(r) = poll_send(cx, &mut **device, io.to_device, dev_dirty) {
        return Ready(Event::DeviceSent(r));
    }
    if wants.gateway
        && let Some(l) = link.as_deref_mut()
        && let Ready(r) = poll_read_into(cx, &mut *l.io, io.from_gateway)
    {
        return Ready(Event::GatewayRead(r));
    }
    // Moves ordered off the gateway: acted on after the timer, so a link check that is due
    // (its move) is not taken over by an order it would then waste.
    let mut ordered = None;
    if let Some(l) = link.as_deref_mut() {
        // The gateway's news wakes the task; its counts say what happened.
        while poll_wait(waits.gateway.as_mut(), cx).is_ready() {
            waits.gateway.set(Some(l.gateway().news().fired()));
        }
        let now = l.gateway().seen();
        if now.cuts != l.seen.cuts {
            l.seen.cuts = now.cuts;
            // Not watched while the link is checked by PINGs instead ([`core::Check`]): a cut
            // then is dropped, not kept for later.
            if wants.down {
                return Ready(Event::Down);
            }
        }
        // Also while a move is ordered: an order of none (an undrain) withdraws it.
        if now.orders != l.seen.orders {
            ordered = Some(now.orders);
        }
    }
    if let Some(slot) = wants.timer
        && let Some(timer) = waits.timer.as_mut()
        && timer.as_mut().poll(cx).is_ready()
    {
        return Ready(if slot { Event::HandBack } else { Event::Tick });
    }
    if let Some(orders) = ordered
        && let Some(l) = link
    {
        l.seen.orders = orders;
        return Ready(Event::Ordered);
    }
    if let Some(m) = waits.moving.as_mut()
        && let Ready(r) = m.as_mut().poll(cx)
    {
        return Ready(Event::Relinked(r));
    }
    if wants.reloads && waits.reloaded.as_mut().poll(cx).is_ready() {
        return Ready(Event::Reloaded);
    }
    if wants.device
        && let Ready(r) = poll_read_into(cx, &mut **device, io.from_device)
    {
        return Ready(Event::DeviceRead(r));
    }
    Poll::Pending
}

/// Writes what `buf` holds, or, when it is empty and bytes were written since the last
/// flush, flushes (TLS keeps written bytes until flushed). Pending when there is nothing to
/// do. A write of zero bytes is an error.
fn poll_send<W: AsyncWrite + Unpin + ?Sized>(
    cx: &mut std::task::Context<'_>,
    w: &mut W,
    buf: &mut BytesMut,
    dirty: bool,
) -> Poll<io::Result<Sent>> {
    if !buf.is_empty() {
        let n = std::task::ready!(Pin::new(w).poll_write(cx, buf))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        bytes::Buf::advance(buf, n);
        Poll::Ready(Ok(Sent::Wrote(n)))
    } else if dirty {
        std::task::ready!(Pin::new(w).poll_flush(cx))?;
        Poll::Ready(Ok(Sent::Flushed))
    } else {
        Poll::Pending
    }
}

/// A wait that is not armed never comes.
fn poll_wait(wait: Pin<&mut Option<Fired>>, cx: &mut std::task::Context<'_>) -> Poll<()> {
    match wait.as_pin_mut() {
        Some(w) => w.poll(cx),
        None => Poll::Pending,
    }
}
