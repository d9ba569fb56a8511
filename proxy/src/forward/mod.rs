//! forward: bytes both ways between a device and its gateway, until either side closes.
//!
//! For plain TCP pairs (passthrough) each direction waits for readiness holding no buffer,
//! then reads into a per-thread buffer and writes straight on; only when the other side's
//! socket is full does a direction keep the unsent bytes, and it frees them once sent. An
//! idle session therefore holds no copy buffer at all: its cost is the task and two sockets.
//!
//! Fairness: `poll_read` and `poll_write` take from tokio's cooperative budget, so a busy
//! direction yields to other tasks like any tokio I/O.
//!
//! A session's two directions are one task, so each wake-up polls both. On a current-thread
//! runtime, a direction whose last read found nothing checks its source's readiness (an atomic
//! load) before reading, and while that is empty it is not polled: its waker is still the one
//! its source holds ([`Direction::read_armed`]).

pub(crate) mod splice;

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

use crate::balancer::Cancel;
use tokio::net::TcpStream;
use tokio::net::tcp::{ReadHalf, WriteHalf};

const CHUNK: usize = 64 * 1024;

thread_local! {
    static BUFFER: RefCell<Box<[u8]>> = RefCell::new(vec![0; CHUNK].into_boxed_slice());
}

/// Runs `f` on this thread's copy buffer (64 KiB), for bytes that are read and copied on
/// within one poll. `f` must not call it again.
pub(crate) fn with_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    BUFFER.with(|cell| f(&mut cell.borrow_mut()))
}

/// Where a direction counts its bytes as they go: a plain atomic (tests), or the proxy's
/// series of `wasmbed_proxy_bytes_total` (live while sessions last: one atomic add per chunk
/// read).
pub trait Count: Sync {
    fn add(&self, n: u64);
}

impl Count for AtomicU64 {
    fn add(&self, n: u64) {
        self.fetch_add(n, Ordering::Relaxed);
    }
}

impl Count for crate::metrics::AtomicSeries {
    fn add(&self, n: u64) {
        self.increment(n);
    }
}

type Total = dyn Count;

/// Why forwarding stopped with an error, and on which side: the proxy treats errors on the
/// gateway's side as a hint that the gateway is failing (it probes it at once).
#[derive(Debug)]
pub struct Failure {
    /// The error was on the gateway's socket (reading from it or writing to it).
    pub gateway: bool,
    pub error: io::Error,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let side = if self.gateway { "gateway" } else { "device" };
        write!(f, "{side} side: {}", self.error)
    }
}

impl Failure {
    /// Whether the gateway's side failed the way a dead or failing host does (a reset, an
    /// abort, a broken pipe, a timeout), rather than by an ordinary close.
    pub fn gateway_failed(&self) -> bool {
        self.gateway
            && matches!(
                self.error.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::TimedOut
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            )
    }
}

/// Forwards between two TCP streams until the session ends or either side fails. `up` and
/// `down` count the bytes as they go.
///
/// A device's end of stream is passed on (its gateway may still be answering). A gateway's end
/// of stream ends the session once its bytes are written to the device and what the device had
/// sent by then is forwarded, unless `half_close` (`--half-close`): then it is passed on too,
/// and the device's bytes keep flowing until it closes. Ending at once is what a gateway that
/// closes its socket means (ours always do), and it spares a round of wake-ups, a FIN and, when
/// the device still sends (a TLS `close_notify`), a reset from the gateway: about a tenth of
/// the proxy's cost per TLS passthrough connection (measured: `docs/performance.md`).
///
/// Hand-written rather than two `async` loops: it waits through the sockets' own registered
/// wakers, so an idle session's whole forwarding state is about a hundred bytes (two `async`
/// pumps with their readiness futures take ~750).
///
/// `splice`: `Off` copies through a per-thread buffer; `On` moves every chunk with
/// `splice(2)` ([`splice`]); `Auto` copies until a read fills the whole buffer (a bulk
/// transfer), then splices that direction from then on.
pub fn tcp<'a>(
    device: &'a mut TcpStream,
    gateway: &'a mut TcpStream,
    up: &'a Total,
    down: &'a Total,
    splice: SpliceMode,
    half_close: bool,
) -> Tcp<'a> {
    let (device_read, device_write) = device.split();
    let (gateway_read, gateway_write) = gateway.split();
    let auto = splice == SpliceMode::Auto;
    Tcp {
        up: Direction::new(device_read, gateway_write, up, false, false, auto),
        down: Direction::new(gateway_read, device_write, down, true, !half_close, auto),
        splice: (splice == SpliceMode::On).then(|| {
            Box::new(Splicing {
                up: Some(splice::Pipes::default()),
                down: Some(splice::Pipes::default()),
            })
        }),
        armed_with: None,
        arms: one_worker(),
    }
}

pub use wasmbed_config::proxy::SpliceMode;

/// Whether the runtime this thread has entered is a current-thread one: the only kind where a
/// direction may be armed ([`Direction::read_armed`]).
///
/// Why: tokio's driver sets a socket's readiness, then takes its waker, in two steps. On a
/// multi-thread runtime the session may run on another worker between them: read the bytes,
/// find the socket drained, leave its waker again (the slot still holds it) and be armed; then
/// the driver's second step takes that waker. The wake it brings finds the direction armed and
/// the readiness empty, and the socket holds no waker any more: the direction would never be
/// woken again. On a current-thread runtime the thread that holds its core turns the driver
/// between the polls of its tasks (and of its `block_on` future), never during one. That holds
/// for a session as this crate runs it: [`tcp`] is called in the session's own task, on the
/// runtime its sockets are registered with, which polls it there. It would not for a future
/// polled on another thread that only entered the runtime (`Handle::block_on` while the core
/// is elsewhere): nothing here does that. (Found by review; on a multi-thread runtime both
/// directions are polled at every wake-up, as before.)
fn one_worker() -> bool {
    tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::CurrentThread)
}

/// The future [`tcp`] returns.
pub struct Tcp<'a> {
    up: Direction<'a>,
    down: Direction<'a>,
    /// One pointer in the session, allocated only once a direction splices: from the start
    /// with `--splice on`, at a direction's first full read with `auto` (most sessions never
    /// fill the buffer, and carry no allocation for splicing).
    splice: Option<Box<Splicing>>,
    /// The waker the directions' armed reads left with their sources ([`Direction::read_armed`]),
    /// a clone held here so that no other waker can take its addresses while it is compared
    /// with (as `wasmbed_certs::Fired` does). Polled with another, the session disarms both
    /// directions, and each leaves the new one with its next read.
    armed_with: Option<Waker>,
    /// Whether a direction may be armed at all: on a current-thread runtime only
    /// ([`one_worker`]). Without it the session keeps no waker and compares none.
    arms: bool,
}

/// Splicing state of a session: per direction, the pipes it splices through (`Some` from
/// the start with `--splice on`, since a full read with `auto`).
#[derive(Default)]
struct Splicing {
    up: Option<splice::Pipes>,
    down: Option<splice::Pipes>,
}

impl Splicing {
    /// The pipes slot of the direction whose source is the gateway (`from_gateway`) or not.
    fn slot(&mut self, from_gateway: bool) -> &mut Option<splice::Pipes> {
        if from_gateway {
            &mut self.down
        } else {
            &mut self.up
        }
    }
}

impl Future for Tcp<'_> {
    type Output = Result<(), Failure>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        let this = &mut *self;
        if this.arms
            && !this
                .armed_with
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
        {
            // A waker left with a socket before is not one this poll may rely on.
            this.up.read_armed = false;
            this.down.read_armed = false;
            this.armed_with = Some(cx.waker().clone());
        }
        // The device's direction first: what it has sent is forwarded before a gateway's end
        // of stream closes its socket (closing with unread bytes would reset the device).
        let up = this.up.poll(cx, &mut this.splice, this.arms);
        let down = this.down.poll(cx, &mut this.splice, this.arms)?;
        if down.is_ready() && this.down.ends_session {
            // The gateway ended: so does the session (a write to the closed gateway failing on
            // the way is part of that ending, not a gateway failure).
            return Poll::Ready(Ok(()));
        }
        let up = up?;
        if up.is_ready() && down.is_ready() {
            // Both ends closed: dropping the sockets closes them; no half-close to pass on.
            return Poll::Ready(Ok(()));
        }
        // One end closed: pass the half-close on. Deciding here, after both directions were
        // polled, saves the shutdown when both ends close at once (the common case).
        this.up.pass_on_eof(cx);
        this.down.pass_on_eof(cx);
        Poll::Pending
    }
}

/// Why a session could not be quiesced for a hand-over: it stays where it is.
#[derive(Debug)]
pub enum NotMovable {
    /// One end has closed (a half-close the new process could not resume).
    HalfClosed,
    /// A direction splices through a pipe: bytes may sit in the kernel pipe.
    Splicing,
    /// A write failed while flushing.
    Failed(Failure),
}

impl Tcp<'_> {
    /// Stops reading and writes out what was read: when this resolves `Ok`, no byte of the
    /// session is held by the proxy (the rest is in the two sockets' kernel buffers and moves
    /// with them). Poll it instead of the forwarding, once the forwarding is stopped.
    pub fn quiesce(self: Pin<&mut Self>) -> impl Future<Output = Result<(), NotMovable>> + '_ {
        let this = self.get_mut();
        std::future::poll_fn(move |cx| {
            if this
                .splice
                .as_ref()
                .is_some_and(|s| s.up.is_some() || s.down.is_some())
            {
                return Poll::Ready(Err(NotMovable::Splicing));
            }
            for d in [&mut this.up, &mut this.down] {
                if d.done || d.eof_to_pass {
                    return Poll::Ready(Err(NotMovable::HalfClosed));
                }
            }
            let from_gateway = [this.up.from_gateway, this.down.from_gateway];
            for (d, from_gateway) in [&mut this.up, &mut this.down].into_iter().zip(from_gateway) {
                if let Err(error) = ready!(d.flush(cx)) {
                    return Poll::Ready(Err(NotMovable::Failed(Failure {
                        gateway: !from_gateway,
                        error,
                    })));
                }
            }
            Poll::Ready(Ok(()))
        })
    }
}

/// One direction: read from `src`, write to `dst`; on end of stream, shut `dst`'s write half.
struct Direction<'a> {
    src: ReadHalf<'a>,
    dst: WriteHalf<'a>,
    total: &'a Total,
    /// Bytes read but not yet taken by `dst` (empty, and unallocated, while `dst` keeps up).
    backlog: Vec<u8>,
    sent: usize,
    done: bool,
    /// `src` ended and `dst` has not been told yet.
    eof_to_pass: bool,
    /// `src` is the gateway (the gateway -> device direction).
    from_gateway: bool,
    /// `src`'s end of stream ends the session (kept here, where it costs no padding).
    ends_session: bool,
    /// `--splice auto`: a read that fills the buffer switches this direction to splicing.
    auto_splice: bool,
    /// `src` holds this session's waker (the one [`Tcp::armed_with`] holds) for reading: its
    /// last read found no bytes and left the waker there, and `src`'s readiness has not been
    /// seen since. On a current-thread runtime a socket gives its waker up only as it becomes
    /// readable (tokio's driver sets the readiness, then takes the waker, between tasks'
    /// polls), so while its readiness reads empty the waker is still there, and a poll need not
    /// read again to leave it anew (a lock, the cooperative budget, the read's own steps: ~130
    /// instructions, at every wake-up of the other direction). The runtime's shutdown takes
    /// the waker without setting a readiness, but tokio drops every task before it shuts its
    /// I/O driver down, so no armed direction is polled after it.
    read_armed: bool,
}

impl<'a> Direction<'a> {
    fn new(
        src: ReadHalf<'a>,
        dst: WriteHalf<'a>,
        total: &'a Total,
        from_gateway: bool,
        ends_session: bool,
        auto_splice: bool,
    ) -> Self {
        Direction {
            from_gateway,
            ends_session,
            auto_splice,
            src,
            dst,
            total,
            backlog: Vec::new(),
            sent: 0,
            done: false,
            eof_to_pass: false,
            read_armed: false,
        }
    }

    /// Shuts `dst`'s write half if `src` ended; the peer may already be gone, and its own
    /// direction reports that.
    fn pass_on_eof(&mut self, cx: &mut Context<'_>) {
        if std::mem::take(&mut self.eof_to_pass) {
            let _ = Pin::new(&mut self.dst).poll_shutdown(cx);
        }
    }

    /// `splicing`: the session's pipes, if a direction splices (this one when its slot is
    /// `Some`); `arms`: whether a read that finds nothing may arm it ([`Tcp::arms`]).
    fn poll(
        &mut self,
        cx: &mut Context<'_>,
        splicing: &mut Option<Box<Splicing>>,
        arms: bool,
    ) -> Poll<Result<(), Failure>> {
        // Read errors are `src`'s side's, write errors `dst`'s.
        let from_gateway = self.from_gateway;
        let on_src = |error| Failure {
            gateway: from_gateway,
            error,
        };
        let on_dst = |error| Failure {
            gateway: !from_gateway,
            error,
        };
        while !self.done {
            ready!(self.flush(cx)).map_err(on_dst)?;
            if let Some(pipes) = splicing
                .as_deref_mut()
                .and_then(|s| s.slot(from_gateway).as_mut())
            {
                let (src, dst): (&TcpStream, &TcpStream) = (self.src.as_ref(), self.dst.as_ref());
                match ready!(pipes.poll(src, dst, self.total, cx)) {
                    Ok(()) => {
                        self.done = true;
                        self.eof_to_pass = true;
                    }
                    Err(splice::Side::Src(e)) => return Poll::Ready(Err(on_src(e))),
                    Err(splice::Side::Dst(e)) => return Poll::Ready(Err(on_dst(e))),
                }
                continue;
            }
            if self.idle() {
                return Poll::Pending;
            }
            let (src, dst, backlog) = (&mut self.src, &mut self.dst, &mut self.backlog);
            let read = with_buffer(|buf| {
                let mut filled = ReadBuf::new(buf);
                // A partial read tells tokio the socket is drained: no extra read to find out.
                ready!(Pin::new(src).poll_read(cx, &mut filled)).map_err(on_src)?;
                let n = filled.filled().len();
                let written = write_now(dst, cx, &buf[..n]).map_err(on_dst)?;
                if written < n {
                    *backlog = buf[written..n].to_vec();
                }
                Poll::Ready(Ok(n))
            });
            let Poll::Ready(read) = read else {
                // No bytes, and the waker left with `src`; unless the task's cooperative
                // budget ran out first: that `Pending` leaves no waker with `src` (its
                // readiness unread), and leaves no budget, where a read that found nothing
                // gives its unit back. (tokio's task dumps, a `tokio_unstable` build, can also
                // end a read early with budget left; this project does not build them.)
                self.read_armed = arms && tokio::task::coop::has_budget_remaining();
                return Poll::Pending;
            };
            match read? {
                0 => {
                    self.done = true;
                    self.eof_to_pass = true;
                }
                n => {
                    self.sent = 0;
                    self.total.add(n as u64);
                    // A read that filled the buffer: a bulk transfer, spliced from now on.
                    if self.auto_splice && n == CHUNK {
                        *splicing.get_or_insert_with(Box::default).slot(from_gateway) =
                            Some(splice::Pipes::default());
                    }
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Whether this direction is armed and its source's readiness still empty: its waker is
    /// still `src`'s, and nothing came. Disarms it once the readiness is there.
    fn idle(&mut self) -> bool {
        if !self.read_armed {
            return false;
        }
        if !readable(&self.src) {
            return true;
        }
        self.read_armed = false;
        false
    }

    /// Writes the backlog, if any, then frees it.
    fn flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.backlog.len() {
            let n = ready!(Pin::new(&mut self.dst).poll_write(cx, &self.backlog[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        if !self.backlog.is_empty() {
            self.backlog = Vec::new();
            self.sent = 0;
        }
        Poll::Ready(Ok(()))
    }
}

/// Whether tokio has seen `src` readable (or closed) since it last found it drained: an atomic
/// load, with no read, lock or cooperative budget (`try_io`'s check before it calls its
/// closure; the closure does nothing, so the readiness stays as it is).
fn readable(src: &ReadHalf<'_>) -> bool {
    let src: &TcpStream = src.as_ref();
    src.try_io(Interest::READABLE, || Ok(())).is_ok()
}

/// Writes as much of `bytes` as the socket takes now; when it is full, `cx` is woken once it
/// has room again.
fn write_now(dst: &mut WriteHalf<'_>, cx: &mut Context<'_>, bytes: &[u8]) -> io::Result<usize> {
    let mut written = 0;
    while written < bytes.len() {
        match Pin::new(&mut *dst).poll_write(cx, &bytes[written..]) {
            Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
            Poll::Ready(Ok(n)) => written += n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => break,
        }
    }
    Ok(written)
}

/// Forwards between any two async streams (TLS on one or both sides) until both directions
/// have ended or either fails; `up` and `down` count the bytes as they are read.
pub async fn streams<A, B>(
    device: &mut A,
    gateway: &mut B,
    up: &Total,
    down: &Total,
) -> Result<(), Failure>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut a, mut b) = (
        Counted {
            inner: device,
            count: up,
            failed: false,
        },
        Counted {
            inner: gateway,
            count: down,
            failed: false,
        },
    );
    match tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 16 * 1024, 16 * 1024).await {
        Ok(_) => Ok(()),
        Err(error) => Err(Failure {
            // Which side failed: the one whose own read or write returned the error.
            gateway: b.failed && !a.failed,
            error,
        }),
    }
}

/// A stream whose reads are counted as they happen, and which remembers if it failed.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    count: &'a Total,
    failed: bool,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        let polled = Pin::new(&mut *this.inner).poll_read(cx, buf);
        match &polled {
            Poll::Ready(Ok(())) => this.count.add((buf.filled().len() - before) as u64),
            Poll::Ready(Err(_)) => this.failed = true,
            Poll::Pending => {}
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let polled = Pin::new(&mut *this.inner).poll_write(cx, buf);
        this.failed |= matches!(polled, Poll::Ready(Err(_)));
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut *this.inner).poll_flush(cx);
        this.failed |= matches!(polled, Poll::Ready(Err(_)));
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let polled = Pin::new(&mut *this.inner).poll_shutdown(cx);
        this.failed |= matches!(polled, Poll::Ready(Err(_)));
        polled
    }
}

/// Runs a session's forwarding until it ends, its gateway goes down, or the grace period of a
/// shutdown is over. Returns the cause when the proxy cut the session: the caller then closes
/// the device's connection with a reset, so the device reconnects at once.
///
/// A future of its own rather than an `async fn`: an `async fn` keeps its argument (the
/// forwarding) and the `select!` it is moved into side by side, and a session's task carries
/// both for its life (408 bytes against 200, by `size_of_val`). Counts the session started
/// when called: await it at once, and once (it is not fused).
pub(crate) fn supervise<'a, F: Future<Output = Result<(), Failure>>>(
    ctx: &'a crate::context::Context,
    lease: &'a crate::balancer::Lease,
    forwarding: F,
) -> Supervised<'a, F> {
    let gateway = lease.gateway();
    gateway.session_started();
    Supervised::new(ctx, gateway, forwarding)
}

pin_project_lite::pin_project! {
    /// [`supervise`]'s future.
    #[must_use = "the session is counted started: await it"]
    pub(crate) struct Supervised<'a, F> {
        #[pin]
        forwarding: F,
        cut: Option<wasmbed_certs::Fired>,
        ctx: &'a crate::context::Context,
        gateway: &'a crate::balancer::Gateway,
    }
}

impl<'a, F> Supervised<'a, F> {
    /// Without counting the session started ([`supervise`] does; [`watch`]'s caller has).
    fn new(
        ctx: &'a crate::context::Context,
        gateway: &'a crate::balancer::Gateway,
        forwarding: F,
    ) -> Supervised<'a, F> {
        // One trigger ends the session: the gateway's, which fires when it goes down and, at
        // the end of a shutdown's grace period, for every gateway. `None`: the gateway is
        // down already (cut at once, the forwarding never polled).
        let cut = gateway.cut_trigger().map(|t| t.fired());
        Supervised {
            forwarding,
            cut,
            ctx,
            gateway,
        }
    }
}

impl<F: Future<Output = Result<(), Failure>>> Future for Supervised<'_, F> {
    type Output = Option<Cancel>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Cancel>> {
        let this = self.project();
        // The forwarding first, then the cut: a flag read (`wasmbed_certs::Fired`) at every
        // wake-up. The order also decides a tie: a forwarding that ends in the poll the cut
        // comes in counts as ended, not cut.
        let Some(cut) = this.cut.as_mut() else {
            return Poll::Ready(cut_cause(this.ctx, this.gateway, true));
        };
        if let Poll::Ready(r) = this.forwarding.poll(cx) {
            ended(this.gateway, r);
            return Poll::Ready(cut_cause(this.ctx, this.gateway, false));
        }
        ready!(Pin::new(cut).poll(cx));
        Poll::Ready(cut_cause(this.ctx, this.gateway, true))
    }
}

/// How a watched session's forwarding stopped.
pub(crate) enum Watched {
    /// It ended, or the proxy cut it (with the cause).
    Ended(Option<Cancel>),
    /// `hand_over` fired: the forwarding is stopped, not ended (quiesce it, hand it over).
    HandOver,
}

/// [`supervise`] for a session that may move to a new process (`--takeover`): also stops
/// when `hand_over` fires. A function of its own so that sessions without `--takeover` do
/// not carry the extra wait.
pub(crate) async fn watch(
    ctx: &crate::context::Context,
    lease: &crate::balancer::Lease,
    forwarding: impl Future<Output = Result<(), Failure>>,
    hand_over: Option<&wasmbed_certs::Trigger>,
) -> Watched {
    let handing = async {
        match hand_over {
            Some(t) => t.fired().await,
            None => std::future::pending().await,
        }
    };
    // `biased`: the supervised forwarding (the forwarding, then the cut), then the hand-over
    // (a session cut as the hand-over comes is cut, not handed over).
    tokio::select! {
        biased;
        cut = Supervised::new(ctx, lease.gateway(), forwarding) => Watched::Ended(cut),
        _ = handing => Watched::HandOver,
    }
}

/// A forwarding that ended by itself: an error on the gateway's side has it probed now.
fn ended(gateway: &crate::balancer::Gateway, result: Result<(), Failure>) {
    if let Err(e) = result {
        tracing::debug!(error = %e, "session ended with an error");
        if e.gateway_failed() {
            gateway.suspect();
        }
    }
}

/// The cause of a cut (`None`: not cut), counted.
fn cut_cause(
    ctx: &crate::context::Context,
    gateway: &crate::balancer::Gateway,
    cut: bool,
) -> Option<Cancel> {
    let cause = match (cut, ctx.hard_stop.is_fired()) {
        (false, _) => None,
        (true, true) => Some(Cancel::Shutdown),
        (true, false) => Some(Cancel::GatewayDown),
    };
    if let Some(cause) = cause {
        gateway.counts.cancelled(cause);
        if cause == Cancel::GatewayDown {
            crate::events::COUNTS
                .cut
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    cause
}

#[cfg(test)]
mod tests;
